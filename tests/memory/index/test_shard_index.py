"""ShardIndex: exact brute force, tree+AH recall, persistence, padding."""

import gzip
import os

import numpy as np
import pytest

from memory.index.shard_index import IndexConfig, IndexKind, ShardIndex
from memory.vectors import l2_normalize
from tests.memory.helpers import assert_exact_topk, clustered, recall_at_k

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def test_brute_force_equals_numpy_exact():
    x, q = clustered(3000, 32, centres=30, noise=0.7, seed=0, nq=200)
    x[100] = x[7]  # An exact duplicate: a real tie.
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.BRUTE_FORCE))
    assert index.kind is IndexKind.BRUTE_FORCE
    idx, dist = index.search(q, 10)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (200, 10)
    assert_exact_topk(idx, dist, q, x, 10)
    # A query equal to the duplicated row: both copies at distance ~0, lower row first.
    idx, dist = index.search(x[7:8], 3)
    assert idx[0, :2].tolist() == [7, 100]
    assert abs(float(dist[0, 0])) < 1e-6


def test_tree_ah_recall_on_clustered_data():
    x, q = clustered(20000, 64, centres=200, noise=1.0, seed=1, nq=300)
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH))
    assert index.kind is IndexKind.TREE_AH
    idx, dist = index.search(q, 10)
    assert recall_at_k(idx, q, x, 10) >= 0.95
    # Returned distances are exact (float reordering), nearest first.
    d_true = 1.0 - np.einsum("qd,qkd->qk", q.astype(np.float64), x[idx].astype(np.float64))
    np.testing.assert_allclose(dist, d_true, atol=2e-6)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_with_search_params_trades_recall_for_speed_without_rebuilding():
    x, q = clustered(20000, 64, centres=200, noise=1.0, seed=3, nq=200)
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH, reorder=20))
    leaves = index.config.resolve_leaves(len(index))[0]
    narrow = index.with_search_params(leaves_to_search=1, reorder=10)
    full = index.with_search_params(leaves_to_search=leaves, reorder=200)
    r_narrow = recall_at_k(narrow.search(q, 10)[0], q, x, 10)
    r_full = recall_at_k(full.search(q, 10)[0], q, x, 10)
    assert r_full >= 0.99 and r_narrow < r_full - 0.1, (r_narrow, r_full)
    assert full.num_leaves_to_search == leaves and index.num_leaves_to_search != leaves  # The original is unchanged.
    with pytest.raises(ValueError, match="leaves_to_search"):
        index.with_search_params(leaves_to_search=0)


@pytest.mark.parametrize("n", [16, 40, 70, 300])
def test_tree_ah_recall_on_small_shards(n):
    # Shards of a few dozen entries (200 images over 3 shards) must not lose recall to the tree.
    x, q = clustered(n, 64, centres=10, noise=1.5, seed=n, nq=100)
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH))
    assert index.kind is IndexKind.TREE_AH
    idx, _ = index.search(q, 10)
    assert recall_at_k(idx, q, x, 10) >= 0.95


@pytest.mark.skipif(not os.path.exists(FASHION), reason="Debian dataset-fashion-mnist not installed")
def test_tree_ah_recall_on_fashion_mnist_pixels_over_three_shards():
    with gzip.open(FASHION) as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)[:300].astype(np.float32)
    x, q = l2_normalize(pixels[:200]), l2_normalize(pixels[200:])
    rng = np.random.default_rng(0)
    shard_of = rng.integers(0, 3, 200)
    for s in range(3):
        xs = x[shard_of == s]
        idx, _ = ShardIndex.build(xs, IndexConfig(kind=IndexKind.TREE_AH)).search(q, 10)
        assert recall_at_k(idx, q, xs, 10) >= 0.95


def test_tiny_shard_falls_back_to_brute_force():
    x, q = clustered(5, 8, centres=2, noise=0.5, seed=2, nq=3)
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH))
    assert index.kind is IndexKind.BRUTE_FORCE
    assert_exact_topk(*index.search(q, 5), q, x, 5)


@pytest.mark.parametrize("kind", [IndexKind.BRUTE_FORCE, IndexKind.TREE_AH])
def test_k_larger_than_n_is_padded(kind):
    x, q = clustered(40, 16, centres=4, noise=0.5, seed=3, nq=4)
    idx, dist = ShardIndex.build(x, IndexConfig(kind=kind)).search(q, 50)
    assert idx.shape == (4, 50)
    assert (idx[:, 40:] == -1).all() and np.isinf(dist[:, 40:]).all()
    assert_exact_topk(idx[:, :40], dist[:, :40], q, x, 40)


@pytest.mark.parametrize("kind", [IndexKind.BRUTE_FORCE, IndexKind.TREE_AH])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    x, q = clustered(2000, 32, centres=20, noise=0.8, seed=4, nq=50)
    index = ShardIndex.build(x, IndexConfig(kind=kind, num_leaves=30, num_leaves_to_search=5))
    before = index.search(q, 10)
    index.save(str(tmp_path / "a"))
    # Moving the directory must not break loading (paths are stored relative).
    os.rename(tmp_path / "a", tmp_path / "b")
    loaded = ShardIndex.load(str(tmp_path / "b"))
    assert loaded.kind is kind and len(loaded) == 2000 and loaded.dim == 32
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_search_validates_arguments():
    x, _ = clustered(20, 8, centres=2, noise=0.5, seed=5)
    index = ShardIndex.build(x, IndexConfig())
    with pytest.raises(ValueError, match=r"\[nq, 8\]"):
        index.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(x[:1], 0)


def test_index_config():
    assert IndexConfig().resolve_kind(49_999) is IndexKind.BRUTE_FORCE
    assert IndexConfig().resolve_kind(50_000) is IndexKind.TREE_AH
    assert IndexConfig(kind=IndexKind.BRUTE_FORCE).resolve_kind(10**6) is IndexKind.BRUTE_FORCE
    cfg = IndexConfig(kind=IndexKind.TREE_AH, num_leaves=10, reorder=50)
    assert IndexConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["kind"] == "tree_ah"
    assert IndexConfig(kind="brute_force").kind is IndexKind.BRUTE_FORCE
    # Default leaves: ~sqrt(n); small shards probe every leaf, large ones at least 1/8.
    assert IndexConfig().resolve_leaves(70) == (8, 8)
    leaves, probe = IndexConfig().resolve_leaves(1_000_000)
    assert leaves == 1000 and probe == 125
    assert IndexConfig(num_leaves=500).resolve_leaves(100) == (100, 100)
    with pytest.raises(ValueError, match="allowed"):
        IndexConfig(kind="hnsw")
    with pytest.raises(ValueError, match="reorder"):
        IndexConfig(reorder=0)
    with pytest.raises(ValueError, match="unknown IndexConfig field"):
        IndexConfig.from_dict({"kind": "auto", "leaves": 3})
    with pytest.raises(ValueError, match="ah_training_iterations"):
        IndexConfig(ah_training_iterations=0)
    # Configs saved before a field existed load with its default.
    old = cfg.to_dict()
    del old["ah_training_iterations"]
    assert IndexConfig.from_dict(old).ah_training_iterations == 10


def test_ah_training_iterations_reach_scann():
    x, _ = clustered(3000, 16, centres=20, noise=0.5, seed=5, nq=1)
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH, ah_training_iterations=3))
    assert "max_clustering_iterations: 3" in index._searcher.config()
    assert index.config.ah_training_iterations == 3


def test_avq_and_soar_validated_and_reach_scann():
    for field in ("avq", "soar_lambda"):
        for bad in (0, -1.0, float("nan"), True, "2"):
            with pytest.raises(ValueError, match=field):
                IndexConfig(**{field: bad})
    assert IndexConfig().avq == 2.5 and IndexConfig().soar_lambda is None
    assert IndexConfig(avq=None).to_dict()["avq"] is None
    x, q = clustered(3000, 16, centres=20, noise=0.5, seed=5, nq=50)
    plain = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH, avq=None))
    tuned = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH, avq=3.0, soar_lambda=1.5))
    assert "avq" not in plain._searcher.config() and "database_spilling" not in plain._searcher.config()
    text = tuned._searcher.config()
    assert "avq: 3" in text and "orthogonality_amplification_lambda: 1.5" in text
    # A spilled entry sits in two leaves; a query probing both must still get it once, at its true distance.
    idx, dist = tuned.with_search_params(leaves_to_search=tuned.num_leaves_to_search).search(q, 10)
    assert all(len(set(row.tolist())) == 10 for row in idx)
    np.testing.assert_allclose(dist, 1.0 - np.einsum("qd,qkd->qk", q, x[idx]), atol=1e-5)
    assert recall_at_k(idx, q, x, 10) >= 0.9
