"""ReadEmbeddings on clip-retrieval folders and TFRecords: exact blocks, exact dead letters, ranged reads."""

from __future__ import annotations

import io
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.io.embedding_sources import (EmbeddingKind, EmbeddingSource, ReadEmbeddings, count_entries,
                                         embedding_dim, parse_embeddings_spec)
from pipelines.io.npy import read_npy_header, read_npy_rows
from pipelines.records import EntryBlock


def _write_part(root, i: int, embeddings: np.ndarray, columns: dict, *, row_group_size: int | None = None):
    os.makedirs(os.path.join(root, "img_emb"), exist_ok=True)
    os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    np.save(os.path.join(root, "img_emb", f"img_emb_{i}.npy"), embeddings)
    pq.write_table(pa.table(columns), os.path.join(root, "metadata", f"metadata_{i}.parquet"),
                   row_group_size=row_group_size)


def _unit(rows: np.ndarray) -> np.ndarray:
    wide = rows.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN and zero rows are never expected in a block.
        return (wide / np.linalg.norm(wide, axis=1, keepdims=True)).astype(np.float32)


def _check_blocks(expected: dict, *, block_sizes: list[int] | None = None):
    """assert_that matcher: blocks hold exactly ``expected`` (id -> (label, uri, unit row)), unit float32 rows."""
    def check(blocks):
        assert all(isinstance(b, EntryBlock) for b in blocks)
        assert all(b.embeddings.dtype == np.float32 and b.ids.dtype.kind == "U" for b in blocks)
        if block_sizes is not None:
            assert sorted(len(b) for b in blocks) == sorted(block_sizes)
        got = {}
        for b in blocks:
            assert len(b.ids) == len(b.labels) == len(b.uris) == b.embeddings.shape[0]
            for i in range(len(b)):
                assert str(b.ids[i]) not in got, f"duplicate id {b.ids[i]}"
                got[str(b.ids[i])] = (str(b.labels[i]), str(b.uris[i]), b.embeddings[i])
        assert sorted(got) == sorted(expected)
        for key, (label, uri, row) in expected.items():
            assert got[key][:2] == (label, uri), key
            np.testing.assert_allclose(got[key][2], row, atol=1e-6, err_msg=key)
            assert abs(np.linalg.norm(got[key][2]) - 1) < 1e-5
    return check


def _failure_keys(failures):
    return failures | "FailureKeys" >> beam.Map(lambda f: (f.id, f.stage, f.reason))


def test_parse_embeddings_spec_forms_and_errors():
    src = parse_embeddings_spec("clip:gs://b/emb/,label_column=label,id_column=key")
    assert src == EmbeddingSource(EmbeddingKind.CLIP, "gs://b/emb", (("id_column", "key"), ("label_column", "label")))
    assert src.to_dict() == {"kind": "clip", "location": "gs://b/emb",
                             "options": {"id_column": "key", "label_column": "label"}}
    assert parse_embeddings_spec("clip:/d,label_from=parent_dir").option("label_from") == "parent_dir"
    tf_src = parse_embeddings_spec("tfrecord:/d/part-*,embedding_feature=emb")
    assert tf_src.option("embedding_feature") == "emb" and tf_src.option("label_feature") == "label"
    assert tf_src.location == "/d/part-*"
    with pytest.raises(ValueError, match="exactly one of label_column"):
        parse_embeddings_spec("clip:/d")
    with pytest.raises(ValueError, match="exactly one of label_column"):
        parse_embeddings_spec("clip:/d,label_column=a,label_from=parent_dir")
    with pytest.raises(ValueError, match="not one of"):
        parse_embeddings_spec("clip:/d,label_from=grandparent")
    with pytest.raises(ValueError, match="bad option 'colour=red'"):
        parse_embeddings_spec("clip:/d,label_column=l,colour=red")
    with pytest.raises(ValueError, match="expected clip:DIR"):
        parse_embeddings_spec("/d/img_emb")


@pytest.fixture()
def clip_dir(tmp_path):
    """Part 0: float16, 5 rows (one NaN, one missing label, one relative path). Part 1: float32, 4 rows
    (one zero row, one empty key). Part 2: 3 npy rows but a 2-row parquet."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "emb")
    e0 = rng.normal(size=(5, 4)).astype(np.float16)
    e0[1, 2] = np.nan
    _write_part(root, 0, e0, {
        "key": ["k0", "k1", "k2", "k3", "k4"],
        "image_path": ["/img/cat/0.jpg", "/img/cat/1.jpg", "rel/dog/2.jpg", "/img/dog/3.jpg", "/img/x/4.jpg"],
        "label": ["cat", "cat", "dog", None, "bird"],
        "caption": ["a", "b", "c", "d", "e"]}, row_group_size=3)
    e1 = rng.normal(size=(4, 4)).astype(np.float32)
    e1[2] = 0
    _write_part(root, 1, e1, {
        "key": ["m0", "", "m2", "m3"],
        "image_path": ["/i/a/0.png", "/i/a/1.png", "/i/b/2.png", "/i/b/3.png"],
        "label": ["ant", "ant", "bee", "bee"]})
    _write_part(root, 2, rng.normal(size=(3, 4)).astype(np.float32), {
        "key": ["z0", "z1"], "image_path": ["/z/0", "/z/1"], "label": ["zz", "zz"]})
    return root, e0, e1


def test_clip_folder_blocks_and_dead_letters(clip_dir):
    root, e0, e1 = clip_dir
    source = parse_embeddings_spec(f"clip:{root},label_column=label")
    assert embedding_dim(source) == 4
    assert count_entries(source) == 5 + 4 + 3
    u0, u1 = _unit(e0.astype(np.float32)), _unit(e1)
    expected = {
        "k0": ("cat", "/img/cat/0.jpg", u0[0]),
        "k2": ("dog", os.path.join(root, "rel/dog/2.jpg"), u0[2]),
        "k4": ("bird", "/img/x/4.jpg", u0[4]),
        "m0": ("ant", "/i/a/0.png", u1[0]),
        "m3": ("bee", "/i/b/3.png", u1[3]),
    }
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(source, block_size=2)
        # Part 0 has row groups of 3 and 2 rows, block_size 2: blocks [0,2) [2,3) [3,5); part 1 [0,2) [2,4);
        # each keeps one row.
        assert_that(blocks, _check_blocks(expected, block_sizes=[1, 1, 1, 1, 1]), label="blocks")
        assert_that(_failure_keys(failures), equal_to([
            ("k1", "read", "non_finite_embedding"),
            ("k3", "read", "missing_label"),
            ("img_emb_1.npy:1", "read", "missing_id"),
            ("m2", "read", "zero_norm_embedding"),
            ("img_emb_2.npy:0", "read", "row_count_mismatch"),
            ("img_emb_2.npy:1", "read", "row_count_mismatch"),
            ("img_emb_2.npy:2", "read", "row_count_mismatch"),
        ]), label="failures")
        assert_that(failures | "Details" >> beam.Filter(lambda f: f.reason == "row_count_mismatch")
                    | beam.Map(lambda f: "has 3 rows but" in f.detail and "has 2" in f.detail),
                    equal_to([True] * 3), label="mismatch_detail")


def test_clip_label_from_parent_dir_id_defaults_to_image_path_and_wrong_dim(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(1)
    e0 = rng.normal(size=(3, 6)).astype(np.float32)
    _write_part(root, 0, e0, {"image_path": ["/d/cat/a.jpg", "/d/dog/b.jpg", "c.jpg"],
                              "url": ["http://x/a", "http://x/b", "http://x/c"]})
    _write_part(root, 1, rng.normal(size=(2, 5)).astype(np.float32),
                {"image_path": ["/d/cat/c.jpg", "/d/cat/d.jpg"]})
    os.makedirs(os.path.join(root, "img_emb"), exist_ok=True)
    np.save(os.path.join(root, "img_emb", "img_emb_3.npy"), rng.normal(size=(1, 6)).astype(np.float32))
    source = parse_embeddings_spec(f"clip:{root},label_from=parent_dir")
    assert count_entries(source) == 3 + 2 + 1
    u0 = _unit(e0)
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(source)
        assert_that(blocks, _check_blocks({"/d/cat/a.jpg": ("cat", "/d/cat/a.jpg", u0[0]),
                                           "/d/dog/b.jpg": ("dog", "/d/dog/b.jpg", u0[1])}), label="blocks")
        assert_that(_failure_keys(failures), equal_to([
            ("c.jpg", "read", "missing_label"),  # No parent directory to name a class.
            ("img_emb_1.npy:0", "read", "wrong_dim"), ("img_emb_1.npy:1", "read", "wrong_dim"),
            ("img_emb_3.npy:0", "read", "missing_metadata")]), label="failures")


def test_clip_large_file_is_read_in_many_blocks(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(2)
    n = 50
    e = rng.normal(size=(n, 3)).astype(np.float16)
    _write_part(root, 0, e, {"key": [f"r{i:02d}" for i in range(n)], "label": [f"c{i % 3}" for i in range(n)],
                             "url": [f"gs://b/{i}.jpg" for i in range(n)]}, row_group_size=20)
    u = _unit(e.astype(np.float32))
    expected = {f"r{i:02d}": (f"c{i % 3}", f"gs://b/{i}.jpg", u[i]) for i in range(n)}
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(parse_embeddings_spec(f"clip:{root},label_column=label"), block_size=7)
        # Row groups [0,20) [20,40) [40,50), each read in batches of 7 rows.
        assert_that(blocks, _check_blocks(expected, block_sizes=[7, 7, 6, 7, 7, 6, 7, 3]), label="blocks")
        assert_that(failures, equal_to([]), label="failures")


class _CountingFile(io.RawIOBase):
    """A file that records how many bytes were read through it."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def read(self, n=-1):
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data


def test_npy_rows_are_read_by_range_not_whole(tmp_path):
    rows = np.arange(1000 * 8, dtype=np.float16).reshape(1000, 8)
    path = str(tmp_path / "img_emb_0.npy")
    np.save(path, rows)
    header = read_npy_header(path)
    assert (header.rows, header.dim, np.dtype(header.dtype)) == (1000, 8, np.float16)
    f = _CountingFile(path)
    got = read_npy_rows(f, header, 500, 510)
    np.testing.assert_array_equal(got, rows[500:510].astype(np.float32))
    assert got.dtype == np.float32
    assert f.bytes_read == 10 * 8 * 2  # Ten rows, not the 16 kB file.
    # A truncated file yields the rows that exist.
    with open(path, "r+b") as g:
        g.truncate(header.offset + 995 * 16)
    assert read_npy_rows(open(path, "rb"), header, 990, 1000).shape == (5, 8)


def test_clip_truncated_npy_rows_are_dead_letters(tmp_path):
    root = str(tmp_path)
    e = np.ones((4, 2), np.float32)
    _write_part(root, 0, e, {"key": ["a", "b", "c", "d"], "label": ["x"] * 4})
    path = os.path.join(root, "img_emb", "img_emb_0.npy")
    offset = read_npy_header(path).offset
    with open(path, "r+b") as g:
        g.truncate(offset + 3 * 8)
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(parse_embeddings_spec(f"clip:{root},label_column=label"))
        assert_that(blocks | beam.FlatMap(lambda b: list(b.ids)), equal_to(["a", "b", "c"]), label="ids")
        assert_that(_failure_keys(failures), equal_to([("d", "read", "truncated_embeddings")]), label="failures")


def _example(**features) -> bytes:
    import tensorflow as tf
    feats = {}
    for key, value in features.items():
        if isinstance(value, list):
            feats[key] = tf.train.Feature(float_list=tf.train.FloatList(value=value))
        else:
            feats[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def test_tfrecord_embeddings(tmp_path):
    import tensorflow as tf
    path = str(tmp_path / "emb-00000.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(_example(emb=[3.0, 0.0, 4.0], id=b"a", label=b"cat", uri=b"gs://b/a.jpg"))
        w.write(_example(emb=[0.0, 2.0, 0.0], id=b"b", label=b"dog", uri=b"imgs/b.jpg"))  # Relative uri.
        w.write(_example(emb=[1.0, 1.0, 1.0], id=b"c", label=b"dog"))  # No uri: the record's place.
        w.write(_example(emb=[1.0, 1.0], id=b"d", label=b"dog"))
        w.write(_example(emb=[float("inf"), 1.0, 1.0], id=b"e", label=b"dog"))
        w.write(_example(emb=[0.0, 0.0, 0.0], id=b"f", label=b"dog"))
        w.write(_example(emb=[1.0, 0.0, 0.0], id=b"g"))
        w.write(_example(emb=[1.0, 0.0, 0.0], label=b"dog"))
    source = parse_embeddings_spec(f"tfrecord:{tmp_path}/emb-*.tfrecord,embedding_feature=emb")
    assert embedding_dim(source) == 3
    assert count_entries(source) is None
    s = 1 / np.sqrt(3)
    expected = {"a": ("cat", "gs://b/a.jpg", np.array([0.6, 0, 0.8])),
                "b": ("dog", str(tmp_path / "imgs/b.jpg"), np.array([0, 1.0, 0])),
                "c": ("dog", f"{path}#c", np.array([s, s, s]))}
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(source, block_size=2)
        assert_that(blocks, _check_blocks(expected), label="blocks")
        assert_that(failures | beam.Map(lambda f: (f.id if f.reason != "missing_id" else "?", f.reason)), equal_to([
            ("d", "wrong_dim"), ("e", "non_finite_embedding"), ("f", "zero_norm_embedding"),
            ("g", "missing_label"), ("?", "missing_id")]), label="failures")


def test_memory_error_while_parsing_an_embedding_example_propagates():
    from pipelines.io.embedding_sources import ParseEmbeddingExampleFn
    fn = ParseEmbeddingExampleFn(parse_embeddings_spec("tfrecord:/x/emb-*.tfrecord"), 3)

    class _Example:
        error = MemoryError("huge example")

        @classmethod
        def FromString(cls, data):  # noqa: N802  (protobuf's name)
            raise cls.error

    fn._example_cls = _Example
    with pytest.raises(MemoryError, match="huge example"):  # Not a dead letter: the runner retries the bundle.
        list(fn.process(("/x/emb-00000.tfrecord", b"serialized")))
    _Example.error = RuntimeError("not a proto")  # Other errors still become dead letters.
    (failed,) = list(fn.process(("/x/emb-00000.tfrecord", b"serialized")))
    assert failed.value.reason == "bad_example" and failed.value.detail == "RuntimeError: not a proto"


def test_clip_folder_on_gcs(gcs_bucket, clip_dir):
    from memory import storage
    root, e0, e1 = clip_dir
    remote = storage.join(gcs_bucket, "emb-test", "emb")
    storage.upload_dir(root, remote)
    source = parse_embeddings_spec(f"clip:{remote},label_column=label")
    assert embedding_dim(source) == 4 and count_entries(source) == 12
    u0 = _unit(e0.astype(np.float32))
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(source, block_size=2)
        kept = blocks | beam.FlatMap(lambda b: [(str(i), str(u)) for i, u in zip(b.ids, b.uris)])
        assert_that(kept, equal_to([("k0", "/img/cat/0.jpg"), ("k2", f"{remote}/rel/dog/2.jpg"),
                                    ("k4", "/img/x/4.jpg"), ("m0", "/i/a/0.png"), ("m3", "/i/b/3.png")]),
                    label="kept")
        assert_that(blocks | beam.Filter(lambda b: "k4" in b.ids) | beam.Map(lambda b: b.embeddings[0].tolist()),
                    lambda got: np.testing.assert_allclose(got, [u0[4]], atol=1e-6), label="k4_row")
        assert_that(failures | beam.combiners.Count.Globally(), equal_to([7]), label="failures")
