"""ReadImages on each source kind, with TestPipeline + assert_that, bad inputs included."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.readers import ImageSource, ReadImages, SourceKind, parse_image_spec, parse_manifest_line

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c636000000002000148afa4710000000049454e44ae426082")


def _tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def test_parse_image_spec_kinds(tmp_path):
    assert parse_image_spec(str(tmp_path)) == ImageSource(SourceKind.IMAGE_FOLDER, str(tmp_path))
    assert parse_image_spec("gs://b/train/").kind is SourceKind.IMAGE_FOLDER
    assert parse_image_spec("gs://b/data/train-*.tfrecord").kind is SourceKind.TFRECORD
    assert parse_image_spec("/x/list.csv").kind is SourceKind.MANIFEST
    assert parse_image_spec("manifest:/x/list.txt") == ImageSource(SourceKind.MANIFEST, "/x/list.txt")
    assert parse_image_spec("tfrecord:/x/shard-*") == ImageSource(SourceKind.TFRECORD, "/x/shard-*")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        parse_image_spec(str(tmp_path / "missing"))


def test_parse_manifest_line_resolves_relative_uris():
    assert parse_manifest_line("a/1.png,cat", fmt="csv", base_dir="/m") == \
        parse_manifest_line('{"uri": "a/1.png", "label": "cat"}', fmt="jsonl", base_dir="/m")
    row = parse_manifest_line("gs://b/x.jpg,dog,id-7", fmt="csv", base_dir="/m")
    assert (row.uri, row.label, row.id) == ("gs://b/x.jpg", "dog", "id-7")
    with pytest.raises(ValueError, match="uri,label"):
        parse_manifest_line("only-one-field", fmt="csv", base_dir="")


def test_image_folder_reads_classes_and_reports_loose_files(tmp_path):
    _tree(tmp_path, {"cat/a.png": PNG_1PX, "cat/sub/b.png": b"bb", "dog/c.png": b"cc", "stray.png": b"x"})
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(ImageSource(SourceKind.IMAGE_FOLDER, str(tmp_path)))
        assert_that(records | beam.Map(lambda r: (r.id, r.label, r.data, r.uri)), equal_to([
            ("cat/a.png", "cat", PNG_1PX, str(tmp_path / "cat/a.png")),
            ("cat/sub/b.png", "cat", b"bb", str(tmp_path / "cat/sub/b.png")),
            ("dog/c.png", "dog", b"cc", str(tmp_path / "dog/c.png"))]), label="records")
        assert_that(failures | beam.Map(lambda f: (f.id, f.stage, f.reason)),
                    equal_to([("stray.png", "read", "not_in_class_dir")]), label="failures")


def test_manifest_csv_with_header_relative_paths_and_missing_file(tmp_path):
    _tree(tmp_path, {"img/a.png": b"aa", "img/b.png": b"bb"})
    (tmp_path / "list.csv").write_text("uri,label,id\nimg/a.png,cat,first\nimg/b.png,dog,\nimg/missing.png,dog,m\n"
                                       "broken-row\n")
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(str(tmp_path / "list.csv")))
        assert_that(records | beam.Map(lambda r: (r.id, r.label, r.data)), equal_to([
            ("first", "cat", b"aa"), (str(tmp_path / "img/b.png"), "dog", b"bb")]), label="records")
        assert_that(failures | beam.Map(lambda f: (f.id, f.reason)),
                    equal_to([("m", "unreadable"), ("broken-row", "bad_manifest_row")]), label="failures")


def test_manifest_jsonl(tmp_path):
    _tree(tmp_path, {"a.png": b"aa"})
    (tmp_path / "m.jsonl").write_text(json.dumps({"uri": "a.png", "label": "cat", "id": "x1"}) + "\n"
                                      + json.dumps({"uri": "a.png"}) + "\n")
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(str(tmp_path / "m.jsonl")))
        assert_that(records | beam.Map(lambda r: (r.id, r.label, r.data)), equal_to([("x1", "cat", b"aa")]),
                    label="records")
        assert_that(failures | beam.Map(lambda f: f.reason), equal_to(["bad_manifest_row"]), label="failures")


def test_imagenet_style_tfrecords(tmp_path):
    import tensorflow as tf

    def example(**features):
        feats = {}
        for key, value in features.items():
            if isinstance(value, int):
                feats[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
            else:
                feats[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()

    path = str(tmp_path / "train-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(example(**{"image/encoded": b"img1", "image/class/label": 7, "image/filename": b"n01_1.JPEG"}))
        w.write(example(**{"image/encoded": b"img2", "image/class/label": 3}))
        w.write(example(**{"image/encoded": b"img3"}))  # No label: dead letter.
        w.write(b"not a proto \xff\xff")
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(path))
        assert_that(records | beam.Map(lambda r: (r.id.split(":")[0], r.label, r.data)), equal_to([
            ("n01_1.JPEG", "7", b"img1"), ("train-00000-of-00001.tfrecord", "3", b"img2")]), label="records")
        assert_that(failures | beam.Map(lambda f: f.reason),
                    equal_to(["missing_feature", "bad_example"]), label="failures")
