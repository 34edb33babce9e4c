"""The real thing: the bundled EfficientNet-Lite0 encoder, real Fashion-MNIST PNGs, real ScaNN, real Beam."""

from __future__ import annotations

import os

import numpy as np
import pytest

from memory.store.versions import read_manifest
from memory.store.shard import read_shard_data
from memory.visual_memory import VisualMemory
from vmem import main as cli
from tests.conftest import brute_force_topk


def _stored(memory_dir):
    manifest = read_manifest(memory_dir)
    parts = [read_shard_data(os.path.join(memory_dir, s.path)) for s in manifest.shards]
    return (manifest, np.concatenate([p.ids for p in parts]), np.concatenate([p.embeddings for p in parts]))


def _recall_at_10(memory_dir: str, queries: np.ndarray) -> float:
    _, ids, emb = _stored(memory_dir)
    res = VisualMemory.open(memory_dir).search(queries, 10)
    true_idx, _ = brute_force_topk(emb, queries, 10)
    return float(np.mean([len(set(res.ids[i]) & set(ids[true_idx[i]])) / 10 for i in range(len(queries))]))


@pytest.fixture(scope="module")
def bundled_memory(fmnist_small, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bundled") / "memory")
    rc = cli.main(["build", "--images", os.path.join(fmnist_small, "train"), "--output", out, "--shards", "3"])
    assert rc == 0
    return out


def test_vmem_build_with_bundled_encoder_is_exact(bundled_memory, capsys):
    manifest, ids, emb = _stored(bundled_memory)
    assert manifest.counts.embedded == 200 and len(manifest.shards) == 3
    assert manifest.encoder["name"] == "efficientnet-lite0" and manifest.dim == 1280
    assert manifest.encoder["content_hash"].startswith("sha256:")
    assert {s.index_kind for s in manifest.shards} == {"brute_force"}
    # Queries: the memory's own embeddings (each must find itself first) and perturbed copies.
    rng = np.random.default_rng(1)
    q = emb[rng.choice(200, 40, replace=False)]
    noisy = q + rng.normal(0, 0.02, q.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    assert _recall_at_10(bundled_memory, noisy) == 1.0
    res = VisualMemory.open(bundled_memory).search(q, 1)
    assert np.all(res.distances[:, 0] < 1e-4)
    assert cli.main(["info", bundled_memory]) == 0
    out = capsys.readouterr().out
    assert "entries      200" in out and "efficientnet-lite0" in out


def test_forced_tree_ah_shards_reach_recall_095(fmnist_small, bundled_memory, tmp_path):
    out = str(tmp_path / "tree_ah")
    rc = cli.main(["build", "--images", os.path.join(fmnist_small, "train"), "--output", out, "--shards", "3",
                   "--config", "configs.fashion_mnist:tree_ah"])
    assert rc == 0
    assert {s.index_kind for s in read_manifest(out).shards} == {"tree_ah"}
    # Same images, same encoder: the embeddings must match the exact build's.
    _, ids_a, emb_a = _stored(bundled_memory)
    _, ids_b, emb_b = _stored(out)
    order_a, order_b = np.argsort(ids_a), np.argsort(ids_b)
    np.testing.assert_allclose(emb_a[order_a], emb_b[order_b], atol=1e-5)
    rng = np.random.default_rng(2)
    q = emb_b[rng.choice(200, 50, replace=False)] + rng.normal(0, 0.02, (50, emb_b.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    recall = _recall_at_10(out, q)
    assert recall >= 0.95, recall


@pytest.mark.slow
def test_one_and_four_shards_return_identical_neighbours(fmnist_small, bundled_memory, tmp_path):
    images = os.path.join(fmnist_small, "train")
    for n in (1, 4):
        assert cli.main(["build", "--images", images, "--output", str(tmp_path / f"m{n}"), "--shards", str(n),
                         "--runner=DirectRunner"]) == 0
    _, _, emb = _stored(bundled_memory)
    test_images = VisualMemory.open(str(tmp_path / "m1"))
    res1 = test_images.search(emb, 10)
    res4 = VisualMemory.open(str(tmp_path / "m4")).search(emb, 10)
    np.testing.assert_array_equal(res1.ids, res4.ids)
    np.testing.assert_allclose(res1.distances, res4.distances, atol=1e-6)
