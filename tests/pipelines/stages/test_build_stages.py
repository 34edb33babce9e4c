"""The build's column and array steps against their row-at-a-time definitions (seeded, no runner)."""

import logging
import posixpath

import numpy as np
import pyarrow as pa
import pytest

from memory.search.routing import router_sample_key
from pipelines.io import embedding_sources as es
from pipelines.records import EntryBlock
from pipelines.stages import write
from pipelines.stages.progress import Progress
from pipelines.stages.train import SmallestKeysFn, read_sample


def _reference_sample(blocks, size):
    """The sample's definition: the ``size`` smallest keys, first copy of an id, in key order."""
    keys = np.concatenate([np.array([router_sample_key(i) for i in b.ids.tolist()], dtype="S16") for b in blocks])
    emb = np.concatenate([b.embeddings for b in blocks])
    keys, first = np.unique(keys, return_index=True)
    return keys[:size], emb[first][:size]


def _blocks(rng, count, max_rows, id_range, dim=4):
    out = []
    for _ in range(count):
        n = int(rng.integers(0, max_rows))
        ids = np.array([f"id{int(x)}" for x in rng.integers(0, id_range, n)], dtype=str)
        out.append(EntryBlock(ids, ids, ids, rng.standard_normal((n, dim)).astype(np.float32)))
    return out


@pytest.mark.parametrize("size", [1, 7, 150, 5000])
def test_smallest_keys_sample_equals_its_definition_across_bundles(size):
    rng = np.random.default_rng(size)
    blocks = _blocks(rng, 40, 300, 4000)
    fn = SmallestKeysFn(size)
    accs = [fn.create_accumulator() for _ in range(3)]
    for i, block in enumerate(blocks):  # Three bundles, merged as a runner would.
        accs[i % 3] = fn.add_input(accs[i % 3], block)
    keys, emb = fn.extract_output(fn.merge_accumulators([fn.compact(a) for a in accs]))
    ref_keys, ref_emb = _reference_sample([blocks[i] for i in range(0, 40, 3)] + [blocks[i] for i in range(1, 40, 3)]
                                          + [blocks[i] for i in range(2, 40, 3)], size)
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_array_equal(emb, ref_emb)


def test_sample_files_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    blocks = _blocks(rng, 20, 200, 10_000)
    paths = []
    for half in (blocks[:10], blocks[10:]):
        sampler = SmallestKeysFn(50)
        acc = sampler.create_accumulator()
        for b in half:
            acc = sampler.add_input(acc, b)
        ((k, e),) = sampler.compact(acc)
        path = tmp_path / f"{len(paths)}.npz"
        np.savez(path, keys=k, embeddings=e)
        paths.append(str(path))
    keys, emb = read_sample(paths, 50)
    ref_keys, ref_emb = _reference_sample(blocks, 50)
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_array_equal(emb, ref_emb)


def _spill(tmp_path, name, block):
    path = tmp_path / name
    path.write_bytes(write._spill_bytes(block))  # pylint: disable=protected-access
    return str(path)


def test_read_shard_spills_matches_concat_dedupe_and_sort(tmp_path):
    rng = np.random.default_rng(2)
    blocks = _blocks(rng, 6, 500, 800, dim=8)  # Many duplicate ids across and within files.
    blocks = [EntryBlock(b.ids, np.array([f"c{int(x)}" for x in rng.integers(0, 5, len(b))], dtype=str),
                         np.array([f"u{i}-{j}" for j in range(len(b))], dtype=str), b.embeddings)
              for i, b in enumerate(blocks)]
    paths = [_spill(tmp_path, f"{i}.npz", b) for i, b in enumerate(blocks)]
    class_names = [f"c{i}" for i in range(5)]
    data, failures = write.read_shard_spills(paths, class_names)
    full = write.read_spills(paths)
    kept, dups = write.dedupe_block(full)
    kept = kept.take(np.argsort(kept.ids, kind="stable"))
    np.testing.assert_array_equal(data.ids, kept.ids)
    np.testing.assert_array_equal(data.uris, kept.uris)
    np.testing.assert_array_equal(data.embeddings, kept.embeddings)
    np.testing.assert_array_equal(data.labels, [class_names.index(l) for l in kept.labels.tolist()])
    assert len(failures) == len(dups) > 0
    assert {f.value.id for f in failures} <= set(kept.ids.tolist())


def test_read_shard_spills_refuses_a_label_outside_the_class_names(tmp_path):
    block = EntryBlock(np.array(["a", "b"]), np.array(["cat", "dog"]), np.array(["u1", "u2"]),
                       np.eye(2, dtype=np.float32))
    path = _spill(tmp_path, "0.npz", block)
    with pytest.raises(write.BuildError, match="label 'dog' is not among the build's 1 class names"):
        write.read_shard_spills([path], ["cat"])


def test_text_uri_and_parent_dir_columns_match_the_row_rules():
    values = ["  a ", None, "", "x/y", "\tb\n", "é"]
    np.testing.assert_array_equal(es._text_column(pa.array(values, pa.string())),  # pylint: disable=protected-access
                                  [es._text(v) for v in values])  # pylint: disable=protected-access
    ints = [3, None, 10]
    assert es._text_column(pa.array(ints, pa.int64())).tolist() == ["3", "", "10"]  # pylint: disable=protected-access
    uris = ["rel/a.jpg", "/abs/b.jpg", "gs://b/c.jpg", "", " d.jpg ", None]
    got = es._uri_column(pa.array(uris, pa.string()), len(uris), 100, npy="/d/img_emb/img_emb_0.npy",  # pylint: disable=protected-access
                         location="/data/emb")
    want = []
    for row, uri in enumerate(uris):
        uri = es._text(uri)  # pylint: disable=protected-access
        want.append(f"/d/img_emb/img_emb_0.npy#{100 + row}" if not uri else
                    uri if es._is_absolute(uri) else posixpath.join("/data/emb", uri))  # pylint: disable=protected-access
    assert got.tolist() == want
    paths = ["a/b/c.jpg", "c.jpg", "/c.jpg", "a//c.jpg", "x/a/c.jpg", "a/b/", "///x", "", "é/ü/z"]
    assert es._parent_dir_column(np.array(paths, dtype=object)).tolist() == [  # pylint: disable=protected-access
        posixpath.basename(posixpath.dirname(p)) for p in paths]


def test_progress_lines_give_rate_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 12.0, 20.0, 20.0])
    monkeypatch.setattr("pipelines.stages.progress.time.perf_counter", lambda: next(clock))
    progress = Progress("read", total=1000, every_s=5.0)
    with caplog.at_level(logging.INFO, logger="visual_memory"):
        assert progress.add(250) == "read: 250 / 1,000 entries (25%), 25 entries/s over 10s, ETA 30s"
        assert progress.add(50) is None  # 2 s after the last line.
        assert progress.add(200) == "read: 500 / 1,000 entries (50%), 25 entries/s over 20s, ETA 20s"
        assert progress.flush() is None  # Nothing new since.
    assert len(caplog.records) == 2


def test_progress_every_n_logs_each_time_the_count_passes_a_multiple(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 4.0])
    monkeypatch.setattr("pipelines.stages.progress.time.perf_counter", lambda: next(clock))
    progress = Progress("embedded on this worker", every_n=200, unit="images")
    with caplog.at_level(logging.INFO, logger="visual_memory"):
        assert [progress.add(1) for _ in range(199)] == [None] * 199  # However long it takes.
        assert progress.add(1) == "embedded on this worker: 200 images, 200 images/s over 1s"
        assert progress.add(150) is None
        assert progress.add(100) == "embedded on this worker: 450 images, 225 images/s over 2s"  # Passed 400.
        assert progress.flush() is None
        assert progress.add(10, force=True) == "embedded on this worker: 460 images, 115 images/s over 4s"
    assert len(caplog.records) == 3
    with pytest.raises(ValueError, match="every_n must be >= 1, got 0"):
        Progress("x", every_n=0)


def test_training_threads_are_the_cores():
    from memory.index.shard_index import training_threads  # pylint: disable=g-import-not-at-top
    assert training_threads() >= 1
