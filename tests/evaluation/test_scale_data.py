"""The scale benchmark's data: streamed synthetic blocks, the clip-retrieval layout on disk, exact ground truth."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.benchmarks import scale_data, synthetic
from tests.conftest import brute_force_topk

# Small blocks and files so that generator blocks straddle file boundaries.
SPEC = scale_data.DataSpec(n=1000, dim=16, seed=5, centres=20, noise_ratio=0.9, num_classes=7, rows_per_file=300,
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


def _read_layout(data_dir: str, spec: scale_data.DataSpec):
    files = scale_data.num_files(spec.n, spec.rows_per_file)
    emb = [np.load(scale_data.emb_path(data_dir, i)) for i in range(files)]
    meta = [pq.read_table(scale_data.metadata_path(data_dir, i)).to_pydict() for i in range(files)]
    return emb, meta


def test_clip_layout_is_row_aligned_deterministic_and_matches_the_generator(tmp_path):
    data_dir = str(tmp_path / "data")
    scale_data.write_clip_dataset(data_dir, SPEC)
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
    scale_data.write_clip_dataset(str(tmp_path / "again"), SPEC)
    emb2, meta2 = _read_layout(str(tmp_path / "again"), SPEC)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(emb, emb2)) and meta == meta2


def test_float16_layout_rounds_the_same_vectors(tmp_path):
    spec = scale_data.DataSpec(**{**SPEC.to_dict(), "dtype": "float16"})
    scale_data.write_clip_dataset(str(tmp_path / "d"), spec)
    emb, _ = _read_layout(str(tmp_path / "d"), spec)
    ref = synthetic.structured_unit_vectors(1000, 16, centres=20, noise_ratio=0.9, seed=5)
    assert emb[0].dtype == np.float16
    np.testing.assert_array_equal(np.concatenate(emb), ref.astype(np.float16))


def test_ground_truth_over_files_equals_brute_force(tmp_path):
    data_dir = str(tmp_path / "data")
    scale_data.write_clip_dataset(data_dir, SPEC)
    paths = [scale_data.emb_path(data_dir, i) for i in range(4)]
    queries = synthetic.structured_unit_vectors(25, 16, centres=20, noise_ratio=0.9, seed=5, draw=1)
    # Blocks of 64 rows: every file is split into several matmul blocks, with a partial last one.
    ids, scores = scale_data.exact_topk_files(paths, queries, 10, block=64)
    base = np.concatenate([np.load(p) for p in paths])
    expected, _ = brute_force_topk(base, queries, 10)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, axis=1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ensure_dataset_caches_by_spec(tmp_path):
    logs = []
    spec = scale_data.DataSpec(**{**SPEC.to_dict(), "n": 200})
    data_dir, first_s = scale_data.ensure_dataset(str(tmp_path), spec, log=logs.append)
    assert first_s > 0 and os.path.basename(data_dir) == spec.dirname()
    assert np.load(os.path.join(data_dir, "gt_ids.npy")).shape == (25, 10)
    assert np.load(os.path.join(data_dir, "queries.npy")).shape == (25, 16)
    again_dir, again_s = scale_data.ensure_dataset(str(tmp_path), spec, log=logs.append)
    assert (again_dir, again_s) == (data_dir, 0.0) and "cached" in logs[-1]
