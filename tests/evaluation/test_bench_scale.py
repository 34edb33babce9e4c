"""The pure parts of the scale benchmark: streamed data, clip-retrieval layout, ground truth, reports."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.benchmarks import bench_scale, synthetic
from tests.conftest import brute_force_topk

# Small blocks and files so that generator blocks straddle file boundaries.
SPEC = bench_scale.DataSpec(n=1000, dim=16, seed=5, centres=20, noise_ratio=0.9, num_classes=7, rows_per_file=300,
                            dtype="float32", queries=25)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(synthetic, "_BLOCK_ROWS", 128)


def test_blocks_concatenate_to_the_in_memory_generator():
    args = dict(centres=9, noise_ratio=0.2, seed=3, draw=1)
    blocks = list(synthetic.iter_structured_blocks(1000, 8, **args))
    assert [b.shape[0] for _, b in blocks] == [128] * 7 + [104]
    stacked = np.concatenate([b for _, b in blocks])
    assert stacked.tobytes() == synthetic.structured_unit_vectors(1000, 8, **args).tobytes()
    # Each row is its reported centre plus small noise: its direction is nearest that centre's direction.
    centre_vecs = np.random.default_rng([3, 0]).standard_normal((9, 8), dtype=np.float32)
    centre_vecs /= np.linalg.norm(centre_vecs, axis=1, keepdims=True)
    which = np.concatenate([c for c, _ in blocks])
    assert (np.argmax(stacked @ centre_vecs.T, axis=1) == which).mean() > 0.98


def test_blocks_depend_on_seed_and_draw():
    a = np.concatenate([b for _, b in synthetic.iter_structured_blocks(200, 8, centres=4, noise_ratio=0.9, seed=1)])
    b = np.concatenate([b for _, b in synthetic.iter_structured_blocks(200, 8, centres=4, noise_ratio=0.9, seed=2)])
    c = np.concatenate([b for _, b in synthetic.iter_structured_blocks(200, 8, centres=4, noise_ratio=0.9, seed=1,
                                                                      draw=1)])
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def _read_layout(data_dir: str, spec: bench_scale.DataSpec):
    files = bench_scale.num_files(spec.n, spec.rows_per_file)
    emb = [np.load(bench_scale.emb_path(data_dir, i)) for i in range(files)]
    meta = [pq.read_table(bench_scale.metadata_path(data_dir, i)).to_pydict() for i in range(files)]
    return emb, meta


def test_clip_layout_is_row_aligned_deterministic_and_matches_the_generator(tmp_path):
    data_dir = str(tmp_path / "data")
    bench_scale.write_clip_dataset(data_dir, SPEC)
    assert sorted(os.listdir(os.path.join(data_dir, "img_emb"))) == [f"img_emb_{i}.npy" for i in range(4)]
    assert sorted(os.listdir(os.path.join(data_dir, "metadata"))) == [f"metadata_{i}.parquet" for i in range(4)]
    emb, meta = _read_layout(data_dir, SPEC)
    assert [e.shape for e in emb] == [(300, 16)] * 3 + [(100, 16)]
    assert all(e.dtype == np.float32 for e in emb)
    assert [len(m["key"]) for m in meta] == [300, 300, 300, 100]
    assert all(set(m) == {"key", "label", "image_path"} for m in meta)
    keys = [k for m in meta for k in m["key"]]
    assert keys == [f"{i:010d}" for i in range(1000)]
    expected = list(synthetic.iter_structured_blocks(1000, 16, centres=20, noise_ratio=0.9, seed=5))
    assert np.concatenate(emb).tobytes() == np.concatenate([b for _, b in expected]).tobytes()
    labels = [lab for m in meta for lab in m["label"]]
    centres = np.concatenate([c for c, _ in expected])
    assert labels == [f"class-{c % 7:04d}" for c in centres]
    assert meta[3]["image_path"][0] == "gs://vmem-synthetic/synthetic-structured-256/seed-5/0000000900.jpg"
    with open(os.path.join(data_dir, "dataset.json")) as f:
        assert json.load(f) == SPEC.to_dict()
    # Same spec, same bytes.
    bench_scale.write_clip_dataset(str(tmp_path / "again"), SPEC)
    emb2, meta2 = _read_layout(str(tmp_path / "again"), SPEC)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(emb, emb2)) and meta == meta2


def test_float16_layout_rounds_the_same_vectors(tmp_path):
    spec = bench_scale.DataSpec(**{**SPEC.to_dict(), "dtype": "float16"})
    bench_scale.write_clip_dataset(str(tmp_path / "d"), spec)
    emb, _ = _read_layout(str(tmp_path / "d"), spec)
    ref = synthetic.structured_unit_vectors(1000, 16, centres=20, noise_ratio=0.9, seed=5)
    assert emb[0].dtype == np.float16
    np.testing.assert_array_equal(np.concatenate(emb), ref.astype(np.float16))


def test_ground_truth_over_files_equals_brute_force(tmp_path):
    data_dir = str(tmp_path / "data")
    bench_scale.write_clip_dataset(data_dir, SPEC)
    paths = [bench_scale.emb_path(data_dir, i) for i in range(4)]
    queries = synthetic.structured_unit_vectors(25, 16, centres=20, noise_ratio=0.9, seed=5, draw=1)
    # Blocks of 64 rows: every file is split into several matmul blocks, with a partial last one.
    ids, scores = bench_scale.exact_topk_files(paths, queries, 10, block=64)
    base = np.concatenate([np.load(p) for p in paths])
    expected, _ = brute_force_topk(base, queries, 10)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, axis=1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ensure_dataset_caches_by_spec(tmp_path):
    logs = []
    spec = bench_scale.DataSpec(**{**SPEC.to_dict(), "n": 200})
    data_dir, first_s = bench_scale.ensure_dataset(str(tmp_path), spec, log=logs.append)
    assert first_s > 0 and os.path.basename(data_dir) == spec.dirname()
    assert np.load(os.path.join(data_dir, "gt_ids.npy")).shape == (25, 10)
    assert np.load(os.path.join(data_dir, "queries.npy")).shape == (25, 16)
    again_dir, again_s = bench_scale.ensure_dataset(str(tmp_path), spec, log=logs.append)
    assert (again_dir, again_s) == (data_dir, 0.0) and "cached" in logs[-1]


@pytest.mark.parametrize("rel, kind", [
    ("shard-00000-of-00004/scann/dataset.npy", "vectors"),
    ("shard-00000-of-00004/scann/bfloat16_dataset.npy", "vectors"),
    ("shard-00000-of-00004/scann/hashed_dataset.npy", "scann"),
    ("shard-00000-of-00004/scann/scann_config.pb", "scann"),
    ("shard-00000-of-00004/embeddings.npy", "vectors"),
    ("shard-00000-of-00004/entries.parquet", "entries"),
    ("shard-00000-of-00004/ids.npy", "entries"),
    ("router/router-abc.npz", "router"),
    ("versions/v000001.json", "manifest+other"),
    ("manifest.json", "manifest+other"),
])
def test_file_kind(rel, kind):
    assert bench_scale.file_kind(rel) == kind


def _result(n: int, **changes) -> bench_scale.SizeResult:
    fields = dict(n=n, builder=bench_scale.BEAM_MARK, build_s=12.345, build_peak_rss_bytes=2_500_000_000,
                  build_peak_rss_source="os.wait4 ru_maxrss (largest process)", bytes_total=n * 1100,
                  bytes_by_kind={"vectors": n * 1024, "scann": n * 60, "entries": n * 10, "router": n * 5,
                                 "manifest+other": n * 1},
                  num_shards=4, shard_kinds=["tree_ah"], load_rss_bytes=1_000_000_000,
                  load_rss_delta_bytes=500_000_000, target_recall=0.95, reached=True,
                  settings="route 2, leaves 0.01, reorder 50/shard", recall=0.9612, qps=1234.4,
                  batch_ms_per_query=0.81, p50_ms=1.234, p99_ms=5.678)
    fields.update(changes)
    return bench_scale.SizeResult(**fields)


def test_table_formats_every_column():
    table = bench_scale.format_table([_result(10_000), _result(100_000, reached=False, recall=0.9)])
    lines = table.splitlines()
    assert lines[0].startswith("| size | build s | build peak RSS GB | bytes/entry | QPS@R>=0.95 | recall@10 | p50 ms")
    assert lines[2] == ("| 10,000 | 12.3 | 2.50 | 1,100 | 1,234 | 0.961 | 1.23 | 5.68 | 1.00 | 4 tree_ah | "
                        "route 2, leaves 0.01, reorder 50/shard | vmem build (Beam) |")
    assert "| MISS (1,234) | 0.900 |" in lines[3]
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    kinds = bench_scale.format_bytes_table([_result(10_000)]).splitlines()
    assert kinds[0] == "| size | total | vectors | scann | entries | router | manifest+other |"
    assert kinds[2] == "| 10,000 | 1,100.0 | 1,024.0 | 60.0 | 10.0 | 5.0 | 1.0 |"


def test_result_json_round_trips_with_bytes_per_entry():
    d = json.loads(json.dumps(_result(1000).to_dict()))
    assert d["bytes_per_entry"] == 1100.0 and d["n"] == 1000 and d["builder"] == bench_scale.BEAM_MARK
    d.pop("bytes_per_entry")
    assert bench_scale.SizeResult(**d) == _result(1000)


def test_select_fastest_and_sizes():
    trials = [bench_scale.Trial("a", 1, 50, 0.01, 0.94, 0.1), bench_scale.Trial("b", 1, 50, 0.02, 0.96, 0.3),
              bench_scale.Trial("c", 2, 20, 0.01, 0.97, 0.2)]
    assert bench_scale.select_fastest(trials, 0.95).settings == "c"
    assert bench_scale.select_fastest(trials, 0.99) is None
    assert bench_scale.parse_sizes("10000,100000") == (10_000, 100_000)
    with pytest.raises(ValueError, match="--sizes"):
        bench_scale.parse_sizes("10k")


def test_spec_and_commands_name_the_data_dir():
    assert "/d/x" in bench_scale.embeddings_spec("/d/x")
    cmd = bench_scale.beam_build_command("/d/x", "/m", sharding="partition", shards=None)
    assert cmd[1:] == ["build", "--embeddings", bench_scale.embeddings_spec("/d/x"), "--encoder-id",
                       bench_scale.ENCODER_ID, "--output", "/m", "--sharding", "partition", "--overwrite"]
    assert bench_scale.beam_build_command("/d/x", "/m", sharding="hash", shards=8)[-4:] == [
        "hash", "--overwrite", "--shards", "8"]


def test_spec_parses_as_the_clip_layout_written():
    embedding_sources = pytest.importorskip("pipelines.io.embedding_sources")
    source = embedding_sources.parse_embeddings_spec(bench_scale.embeddings_spec("/d/x"))
    assert source.kind is embedding_sources.EmbeddingKind.CLIP and source.location == "/d/x"
    # write_clip_dataset's label column; ids and uris come from the default key / image_path columns.
    assert source.option("label_column") == "label"
    assert source.option("id_column") is None and source.option("uri_column") is None
