"""Reliability counts, soft weights and hard-prune selection (memory.decide.pruning) against hand-computed cases
and a brute-force leave-one-out reference."""

from __future__ import annotations

import os

import numpy as np
import pytest

from memory.decide import pruning


def brute_force_counts(emb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The paper's definition, literally: for each entry q, its k nearest *other* entries; count hits."""
    n = emb.shape[0]
    d = 1.0 - emb.astype(np.float64) @ emb.astype(np.float64).T
    v = np.zeros(n, dtype=np.int64)
    for q in range(n):
        others = [j for j in range(n) if j != q]
        nearest = sorted(others, key=lambda j: (d[q, j], j))[:k]
        for j in nearest:
            if labels[j] != labels[q]:
                v[j] += 1
    return v


def neighbour_lists(emb: np.ndarray, ids: np.ndarray, labels: np.ndarray, k: int):
    """k nearest entries of each entry, itself included (ties by id, as the memory's search)."""
    d = 1.0 - emb.astype(np.float64) @ emb.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(ids, d.shape), d), axis=-1)[:, :k]
    return ids[order], labels[order]


def test_hand_computed_counts():
    # 4 entries; rows are the retrieved lists (self included somewhere), k = 2 after leaving one out.
    self_ids = np.array(["a", "b", "c", "d"])
    query_labels = np.array([0, 0, 1, 1])
    neighbor_ids = np.array([["a", "b", "c"],    # a: keeps b(0), c(1) -> c hit
                             ["b", "a", "c"],    # b: keeps a(0), c(1) -> c hit
                             ["c", "a", "d"],    # c: keeps a(0), d(1) -> a hit
                             ["c", "d", "b"]])   # d: self 2nd; keeps c(1), b(0) -> b hit
    neighbor_labels = np.array([[0, 0, 1], [0, 0, 1], [1, 0, 1], [1, 1, 0]])
    v = pruning.reliability_counts(query_labels, neighbor_ids, neighbor_labels, self_ids=self_ids, k=2)
    np.testing.assert_array_equal(v, [1, 1, 2, 0])
    # k = 1: a keeps b; b keeps a; c keeps a (hit); d keeps c.
    v1 = pruning.reliability_counts(query_labels, neighbor_ids, neighbor_labels, self_ids=self_ids, k=1)
    np.testing.assert_array_equal(v1, [1, 0, 0, 0])


def test_leave_one_out_is_by_id_so_exact_duplicates_count_each_other():
    # x and y are exact duplicates (distance 0 to each other) with different labels: each must count the
    # other, so dropping "the distance-0 neighbour" would be wrong when the duplicate comes first.
    self_ids = np.array(["x", "y"])
    neighbor_ids = np.array([["y", "x"], ["x", "y"]])  # The duplicate sorts first for x.
    neighbor_labels = np.array([[1, 0], [0, 1]])
    v = pruning.reliability_counts(np.array([0, 1]), neighbor_ids, neighbor_labels, self_ids=self_ids, k=1)
    np.testing.assert_array_equal(v, [1, 1])
    kept, kept_labels, found = pruning.leave_one_out(neighbor_ids, neighbor_labels, self_ids=self_ids, k=1)
    np.testing.assert_array_equal(kept, [["y"], ["x"]])
    assert found.all()


def test_leave_one_out_without_self_keeps_first_k_and_pads():
    kept, labels, found = pruning.leave_one_out(np.array([["p", "q", "r"], ["s", "", ""]]),
                                                np.array([[0, 1, 1], [2, -1, -1]]),
                                                self_ids=np.array(["z", "s"]), k=2)
    np.testing.assert_array_equal(kept, [["p", "q"], ["", ""]])
    np.testing.assert_array_equal(labels, [[0, 1], [-1, -1]])
    np.testing.assert_array_equal(found, [False, True])
    # Padding never counts as a hit.
    hits = pruning.mislabelled_hits(np.array([1, 0]), kept, labels)
    np.testing.assert_array_equal(hits, ["p"])


@pytest.mark.parametrize("seed,k", [(0, 5), (1, 20), (2, 1)])
def test_counts_equal_brute_force_on_random_data(seed, k):
    rng = np.random.default_rng(seed)
    n = 120
    emb = rng.normal(size=(n, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=n)
    ids = np.array([f"e{i:04d}" for i in range(n)])
    nbr_ids, nbr_labels = neighbour_lists(emb, ids, labels, k + 1)
    v = pruning.reliability_counts(labels, nbr_ids, nbr_labels, self_ids=ids, k=k)
    np.testing.assert_array_equal(v, brute_force_counts(emb, labels, k))
    # Aligned with an explicit entry order too (entries never hit get 0).
    perm = rng.permutation(n)
    v_perm = pruning.reliability_counts(labels, nbr_ids, nbr_labels, self_ids=ids, k=k, entry_ids=ids[perm])
    np.testing.assert_array_equal(v_perm, v[perm])
    assert v.sum() == int((nbr_labels[:, :k + 1] != labels[:, None]).sum())  # Self never differs from itself.


def test_counts_refuse_unknown_neighbour_and_duplicate_entries():
    with pytest.raises(ValueError, match="not memory entries"):
        pruning.reliability_counts(np.array([0]), np.array([["a", "zz"]]), np.array([[0, 1]]),
                                   self_ids=np.array(["a"]), k=1)
    with pytest.raises(ValueError, match="duplicates"):
        pruning.reliability_counts(np.array([0, 0]), np.array([["a"], ["a"]]), np.array([[0], [0]]),
                                   self_ids=np.array(["a", "a"]), k=1)


def test_soft_weights_follow_the_paper():
    v = np.array([0, 1, 2, 6, 127])
    np.testing.assert_array_equal(pruning.soft_weights(v), [1.0, 1.75 / 2, 1.75 / 3, 1.75 / 7, 1.75 / 128])
    with pytest.raises(ValueError, match=">= 0"):
        pruning.soft_weights(np.array([-1]))


def test_hard_prune_ids_are_exactly_v_at_or_above_threshold():
    ids = np.array(["d", "a", "c", "b", "e"])
    v = np.array([3, 0, 2, 5, 2])
    np.testing.assert_array_equal(pruning.hard_prune_ids(ids, v, 2), ["b", "c", "d", "e"])
    np.testing.assert_array_equal(pruning.hard_prune_ids(ids, v, 4), ["b"])
    assert pruning.hard_prune_ids(ids, v, 6).size == 0
    with pytest.raises(ValueError, match="threshold"):
        pruning.hard_prune_ids(ids, v, 0)


def test_counts_file_round_trip_and_summary(tmp_path):
    counts = pruning.PruningCounts(np.array(["b", "a", "c"]), np.array([4, 0, 1]), 100, 3)
    path = pruning.write_counts(str(tmp_path), counts)
    assert path.endswith("pruning/v000003-counts/bucket-00000-of-00001.npz")
    back = pruning.read_counts(path)
    np.testing.assert_array_equal(back.ids, ["a", "b", "c"])
    np.testing.assert_array_equal(back.v, [0, 4, 1])
    assert (back.k, back.version) == (100, 3)
    # The prune job's layout: one file per id-hash bucket (empty buckets have none), read back as one.
    for b, part in ((0, [0]), (2, [1, 2])):
        pruning.write_counts(str(tmp_path), pruning.PruningCounts(counts.ids[part], counts.v[part], 100, 7),
                             bucket=b, buckets=3)
    assert sorted(os.listdir(tmp_path / "pruning" / "v000007-counts")) == [
        "bucket-00000-of-00003.npz", "bucket-00002-of-00003.npz"]
    whole = pruning.read_all_counts(str(tmp_path), 7, buckets=3)
    np.testing.assert_array_equal(whole.ids, ["a", "b", "c"])
    np.testing.assert_array_equal(whole.v, [0, 4, 1])
    with pytest.raises(FileNotFoundError, match="no counts of version 7"):
        pruning.read_all_counts(str(tmp_path), 7, buckets=4)
    with pytest.raises(ValueError, match="bucket"):
        pruning.bucket_counts_path(str(tmp_path), 7, 3, 3)
    s = pruning.counts_summary(np.array([0, 0, 1, 2, 3, 4, 9]))
    assert [(b["v_min"], b["v_max"], b["entries"]) for b in s["histogram"]] == [
        (0, 0, 2), (1, 1, 1), (2, 3, 2), (4, 7, 1), (8, 15, 1)]
    assert s["at_or_above"]["4"] == 2 and s["hit"] == 5 and s["max"] == 9
    assert "T=128: 0" in pruning.format_summary(s)


def test_entry_weights_travel_through_shard_search_and_merge(tmp_path):
    """LoadedShard.search + merge_partials (the evaluation job's path) carry each hit's soft-pruning weight,
    exactly as VisualMemory.search does; an unweighted memory gives weights None."""
    from memory.build import build_memory_local
    from memory.index.shard_index import IndexConfig
    from memory.store.versions import read_manifest
    from memory.store.mutations import forget, publish_entry_weights
    from memory.search.shard_search import (LoadedShard, load_entry_weights, load_forgotten, merge_partials,
                                     searchable_shards)
    from memory.visual_memory import VisualMemory

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(90, 8)).astype(np.float32)
    ids = [f"e{i:03d}" for i in range(90)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=ids, labels=[f"c{i % 3}" for i in range(90)], uris=ids, embeddings=emb,
                       num_shards=3, index_config=IndexConfig(),
                       encoder_identity={"name": "s", "content_hash": "sha256:0", "dim": 8, "preprocess": {}})
    q = rng.normal(size=(7, 8)).astype(np.float32)

    def via_shards():
        m = read_manifest(root)
        shards = [LoadedShard.load(root, info, forgotten=load_forgotten(root, m),
                                   entry_weights=load_entry_weights(root, m)) for info in searchable_shards(m)]
        return merge_partials([s.search(q, 15) for s in shards], 15)

    assert via_shards().weights is None
    forget(root, ids=["e005", "e010"])
    weighted_ids = ids[20:60]
    gamma = pruning.soft_weights(rng.integers(0, 9, size=40))
    publish_entry_weights(root, ids=weighted_ids, weights=gamma, params={"rule": pruning.SOFT_RULE})
    got, ref = via_shards(), VisualMemory.open(root).search(q, 15)
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_array_equal(got.weights, ref.weights)
    weight_of = dict(zip(weighted_ids, gamma.astype(np.float32)))
    expected = np.vectorize(lambda i: weight_of.get(i, np.float32(1.0)), otypes=[np.float32])(got.ids)
    np.testing.assert_array_equal(got.weights, expected)
    assert (got.weights < 1).any()
    # A partial without weights counts as weight 1 when merged with weighted ones; row() keeps weights.
    mixed = merge_partials([got, got._replace(weights=None)], 15)
    assert mixed.weights is not None and set(np.unique(mixed.weights)) <= set(np.unique(got.weights)) | {1.0}
    np.testing.assert_array_equal(got.row(2).weights, got.weights[2:3])
