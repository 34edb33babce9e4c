"""ReadImages on each source kind, with TestPipeline + assert_that, bad inputs included."""

from __future__ import annotations

import io
import json
import os
import tarfile

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.io.readers import (ImageSource, ReadImages, SourceKind, list_one_level, parse_image_spec,
                               parse_manifest_line)

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
    assert parse_image_spec("gs://b/wds/*.tar") == ImageSource(SourceKind.WEBDATASET, "gs://b/wds/*.tar")
    wds = parse_image_spec("webdataset:/x/0000*.tar,uri_from=url,label_field=label")
    assert wds == ImageSource(SourceKind.WEBDATASET, "/x/0000*.tar", (("label_field", "label"), ("uri_from", "url")))
    assert wds.to_dict() == {"kind": "webdataset", "location": "/x/0000*.tar",
                             "options": {"label_field": "label", "uri_from": "url"}}
    assert parse_image_spec(str(tmp_path)).to_dict() == {"kind": "folder", "location": str(tmp_path)}
    with pytest.raises(ValueError, match="not one of"):
        parse_image_spec("webdataset:/x/*.tar,uri_from=http")
    with pytest.raises(ValueError, match="bad option 'label=cls'"):
        parse_image_spec("webdataset:/x/*.tar,label=cls")


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


def test_image_folder_lists_one_level_then_each_class(tmp_path):
    _tree(tmp_path, {"cat/a.png": b"a", "cat/sub/deep/b.png": b"b", "dog/c.png": b"c", "stray.png": b"x"})
    dirs, files = list_one_level(str(tmp_path) + "/")
    assert dirs == [str(tmp_path / "cat"), str(tmp_path / "dog")]
    assert files == [str(tmp_path / "stray.png")]  # Nothing below the class directories is listed here.
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_one_level(str(tmp_path / "missing"))


def test_image_folder_on_gcs(gcs_bucket, tmp_path):
    from memory import storage
    _tree(tmp_path, {"cat/a.png": b"aa", "cat/sub/b.png": b"bb", "dog/c.png": b"cc", "stray.png": b"x"})
    root = storage.join(gcs_bucket, "readers-test", "imgs")
    storage.upload_dir(str(tmp_path), root)
    assert list_one_level(root) == ([f"{root}/cat", f"{root}/dog"], [f"{root}/stray.png"])
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(root))
        assert_that(records | beam.Map(lambda r: (r.id, r.label, r.data, r.uri)), equal_to([
            ("cat/a.png", "cat", b"aa", f"{root}/cat/a.png"), ("cat/sub/b.png", "cat", b"bb", f"{root}/cat/sub/b.png"),
            ("dog/c.png", "dog", b"cc", f"{root}/dog/c.png")]), label="records")
        assert_that(failures | beam.Map(lambda f: (f.id, f.reason)), equal_to([("stray.png", "not_in_class_dir")]),
                    label="failures")


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _meta(key: str, **extra) -> bytes:
    return json.dumps({"key": key, "url": f"http://site/{key}.jpg", **extra}).encode()


@pytest.fixture()
def wds_shards(tmp_path):
    """Two img2dataset-style shards: labels in .cls and in the JSON 'label' field, three bad samples."""
    first = str(tmp_path / "00000.tar")
    _write_tar(first, [
        ("000000000.jpg", b"jpg0"), ("000000000.json", _meta("000000000", label="cat")),
        ("000000000.txt", b"a cat"), ("000000000.cls", b"cat\n"),
        ("000000001.png", b"png1"), ("000000001.json", _meta("000000001", label="dog")), ("000000001.cls", b"dog"),
        ("000000002.json", _meta("000000002", label="dog")), ("000000002.txt", b"no image"),  # No image.
        ("000000003.webp", b"webp3"), ("000000003.json", _meta("000000003")),  # No label anywhere.
    ])
    second = str(tmp_path / "00001.tar")
    _write_tar(second, [
        ("000010000.jpg", b"jpg10"), ("000010000.json", _meta("000010000", label="cat")),
        ("000010000.cls", b"cat"),
        ("000010001.jpg", b"jpg11"), ("000010001.json", b"{not json"),
    ])
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_webdataset_labels_from_cls_and_member_uris(wds_shards):
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(str(wds_shards / "*.tar")))
        assert_that(records | beam.Map(lambda r: (r.id, r.label, r.data, r.uri)), equal_to([
            ("000000000", "cat", b"jpg0", f"{wds_shards}/00000.tar#000000000.jpg"),
            ("000000001", "dog", b"png1", f"{wds_shards}/00000.tar#000000001.png"),
            ("000010000", "cat", b"jpg10", f"{wds_shards}/00001.tar#000010000.jpg")]), label="records")
        assert_that(failures | beam.Map(lambda f: (f.id, f.stage, f.reason)), equal_to([
            ("000000002", "read", "missing_image"), ("000000003", "read", "missing_label"),
            ("000010001", "read", "bad_json")]), label="failures")


def test_webdataset_label_field_and_url_uris(wds_shards):
    spec = f"webdataset:{wds_shards}/0000[0].tar,label_field=label,uri_from=url"
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(spec))
        assert_that(records | beam.Map(lambda r: (r.id, r.label, r.uri)), equal_to([
            ("000000000", "cat", "http://site/000000000.jpg"),
            ("000000001", "dog", "http://site/000000001.jpg")]), label="records")
        assert_that(failures | beam.Map(lambda f: (f.id, f.reason, f.detail)), equal_to([
            ("000000002", "missing_image", "sample has ['json', 'txt'] but no jpg/jpeg/png/webp member"),
            ("000000003", "missing_label", "sample has no label: expected JSON field 'label'")]), label="failures")


def test_webdataset_truncated_shard_reports_and_keeps_earlier_samples(tmp_path):
    path = str(tmp_path / "00000.tar")
    _write_tar(path, [("a.jpg", b"A" * 600), ("a.cls", b"x"), ("b.jpg", b"B" * 5000), ("b.cls", b"y")])
    with open(path, "r+b") as f:
        f.truncate(512 * 6)  # Cuts b.jpg's data short.
    with TestPipeline(runner="FnApiRunner") as p:
        records, failures = p | ReadImages(parse_image_spec(path))
        assert_that(records | beam.Map(lambda r: (r.id, r.label)), equal_to([("a", "x")]), label="records")
        assert_that(failures | beam.Map(lambda f: (f.id, f.reason, f.detail.split(":")[0])),
                    equal_to([("00000.tar", "unreadable_tar", "ReadError")]), label="failures")


def test_relative_locations_record_absolute_uris_and_gcs_stays(tmp_path, monkeypatch):
    _tree(tmp_path, {"data/x/cat/a.png": PNG_1PX, "data/img/b.png": b"bb"})
    (tmp_path / "data" / "list.csv").write_text("img/b.png,dog\n")
    monkeypatch.chdir(tmp_path)
    folder, manifest = parse_image_spec("data/x"), parse_image_spec("data/list.csv")
    assert folder.location == str(tmp_path / "data" / "x") and manifest.location == str(tmp_path / "data/list.csv")
    assert parse_image_spec("gs://b/train/").location == "gs://b/train"
    assert parse_image_spec("tfrecord:gs://b/t-*").location == "gs://b/t-*"
    with TestPipeline(runner="FnApiRunner") as p:
        folder_records, _ = p | "Folder" >> ReadImages(folder)
        manifest_records, _ = p | "Manifest" >> ReadImages(manifest)
        assert_that(folder_records | beam.Map(lambda r: (r.id, r.uri)),
                    equal_to([("cat/a.png", str(tmp_path / "data/x/cat/a.png"))]), label="folder")
        assert_that(manifest_records | beam.Map(lambda r: r.uri), equal_to([str(tmp_path / "data/img/b.png")]),
                    label="manifest")


def test_build_with_relative_images_records_absolute_uris(fmnist_small, tiny_encoder_config_file, tmp_path,
                                                          monkeypatch):
    from memory.store.mutations import live_ids
    from memory.visual_memory import VisualMemory
    from pipelines import build
    monkeypatch.chdir(fmnist_small)
    out = str(tmp_path / "mem")
    build.run(["--images", "test", "--output", out, "--config", tiny_encoder_config_file])
    monkeypatch.chdir(tmp_path)  # Somewhere else: the recorded uris must still name the images.
    ids = live_ids(out)
    uris = VisualMemory.open(out).get_uris(ids)
    assert len(uris) == 50
    assert all(u == os.path.join(fmnist_small, "test", i) for u, i in zip(uris, ids))
