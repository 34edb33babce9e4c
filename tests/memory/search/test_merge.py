"""merge_topk against brute force, with padding and ties."""

import numpy as np
import pytest

from memory.search.merge import merge_shard_answers, merge_topk


def _partials(dist: np.ndarray, shard_of: np.ndarray, num_shards: int, k: int):
    """Exact per-shard top-k of a [nq, n] distance matrix, ties by global index, padded to k."""
    parts = []
    for s in range(num_shards):
        cols = np.flatnonzero(shard_of == s)
        d = dist[:, cols]
        order = np.lexsort((np.broadcast_to(cols, d.shape), d), axis=1)[:, :k]
        idx = np.full((dist.shape[0], k), -1, np.int64)
        dd = np.full((dist.shape[0], k), np.inf, np.float32)
        idx[:, :order.shape[1]] = cols[order]
        dd[:, :order.shape[1]] = np.take_along_axis(d, order, axis=1)
        parts.append((idx, dd))
    return parts


def _reference(dist: np.ndarray, k: int):
    n = dist.shape[1]
    order = np.lexsort((np.broadcast_to(np.arange(n), dist.shape), dist), axis=1)[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


@pytest.mark.parametrize("num_shards", [1, 4, 7])
def test_merge_matches_brute_force_with_ties(num_shards):
    rng = np.random.default_rng(0)
    nq, n, k = 50, 300, 10
    # Quantised distances: many exact ties, including across shards and at the k-th boundary.
    dist = (rng.integers(0, 20, size=(nq, n)) / 20).astype(np.float32)
    shard_of = rng.integers(0, num_shards, n)
    idx, d = merge_topk(_partials(dist, shard_of, num_shards, k), k)
    ref_idx, ref_d = _reference(dist, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(d, ref_d)


def test_one_vs_four_partitions_identical_with_string_tie_keys():
    rng = np.random.default_rng(1)
    nq, n, k = 20, 120, 15
    ids = np.array([f"id-{rng.integers(0, 10**6):07d}-{i}" for i in range(n)])
    dist = (rng.integers(0, 5, size=(nq, n)) / 5).astype(np.float32)
    results = []
    for num_shards in (1, 4):
        shard_of = rng.integers(0, num_shards, n)
        parts, keys = [], []
        for s in range(num_shards):
            cols = np.flatnonzero(shard_of == s)
            d = dist[:, cols]
            order = np.lexsort((np.broadcast_to(ids[cols], d.shape), d), axis=1)[:, :k]
            parts.append((cols[order], np.take_along_axis(d, order, axis=1)))
            keys.append(ids[cols[order]])
        idx, d = merge_topk(parts, k, tie_keys=keys)
        # Keys looked up from the global index give the same answer.
        idx_fn, d_fn = merge_topk(parts, k, tie_keys=lambda rows: ids[rows])
        np.testing.assert_array_equal(idx_fn, idx)
        np.testing.assert_array_equal(d_fn, d)
        results.append((ids[idx], d))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    # And it is the id-ordered exact answer.
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    np.testing.assert_array_equal(results[0][0], ids[order])


def test_tie_keys_only_reorder_rows_with_ties():
    """Rows without equal distances take the fast numeric path; tied rows still follow the key order."""
    rng = np.random.default_rng(2)
    nq, n, k = 40, 200, 10
    ids = np.array([f"{rng.integers(0, 10**6):07d}-{i}" for i in range(n)])  # Key order != index order.
    dist = rng.random((nq, n)).astype(np.float32)
    dist[::3] = (rng.integers(0, 6, size=dist[::3].shape) / 6).astype(np.float32)  # Every third row: ties.
    shard_of = rng.integers(0, 3, n)
    parts = []
    for s in range(3):
        cols = np.flatnonzero(shard_of == s)
        d = dist[:, cols]
        order = np.lexsort((np.broadcast_to(ids[cols], d.shape), d), axis=1)[:, :k]
        parts.append((cols[order], np.take_along_axis(d, order, axis=1)))
    idx, d = merge_topk(parts, k, tie_keys=lambda rows: ids[rows])
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(d, np.take_along_axis(dist, order, axis=1))


def test_padding_when_fewer_than_k_candidates():
    dist = np.array([[0.3, 0.1, 0.2]], np.float32)
    parts = _partials(dist, np.array([0, 1, 1]), 2, k=5)  # Shards of 1 and 2 entries, padded to 5.
    idx, d = merge_topk(parts, 5)
    np.testing.assert_array_equal(idx, [[1, 2, 0, -1, -1]])
    np.testing.assert_array_equal(d, np.array([[0.1, 0.2, 0.3, np.inf, np.inf]], np.float32))
    # Padding never outranks a real hit, even with a smaller tie key.
    idx, d = merge_topk([(np.array([[-1, 5]]), np.array([[np.inf, 1.5]], np.float32))], 2,
                        tie_keys=[np.array([["", "z"]])])
    np.testing.assert_array_equal(idx, [[5, -1]])


def test_rejects_bad_arguments():
    part = (np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        merge_topk([part], 0)
    with pytest.raises(ValueError, match="partial 1"):
        merge_topk([part, (np.zeros((3, 3), np.int64), np.zeros((3, 3), np.float32))], 2)
    with pytest.raises(ValueError, match="tie_keys"):
        merge_topk([part], 2, tie_keys=[])


@pytest.mark.parametrize("seed", range(3))
def test_merge_shard_answers_equals_merging_padded_partials(seed):
    """Queries that searched one shard keep its answer, the others are merged: the result equals merge_topk over
    every shard padded to the whole batch (the routed memory's old path), ties and short shards included."""
    rng = np.random.default_rng(seed)
    nq, k, shards = 200, 5, 4
    visit = rng.random((nq, shards)) < [0.9, 0.3, 0.2, 0.1]
    visit[rng.random(nq) < 0.1] = False  # Some queries searched nothing.
    found, padded = [], []
    for s in range(shards):
        rows = np.flatnonzero(visit[:, s])
        # Distances on a coarse grid (ties within and across shards), sorted per row; global rows ascending
        # within ties (what a shard whose rows are sorted by id returns); a few rows short of k.
        dist = np.sort(rng.integers(0, 6, (rows.size, k)) / 8, axis=1).astype(np.float32)
        glob = s * 1000 + np.sort(rng.choice(1000, (rows.size, k)), axis=1)
        order = np.lexsort((glob, dist), axis=-1)
        glob, dist = np.take_along_axis(glob, order, 1), np.take_along_axis(dist, order, 1)
        short = rng.random(rows.size) < 0.2
        glob[short, -2:], dist[short, -2:] = -1, np.inf
        found.append((rows, glob, dist))
        p_idx, p_dist = np.full((nq, k), -1), np.full((nq, k), np.inf, dtype=np.float32)
        p_idx[rows], p_dist[rows] = glob, dist
        padded.append((p_idx, p_dist))
    keys = lambda rows: np.char.zfill(rows.astype(str), 6)  # noqa: E731  (id strings order like the rows)
    want = merge_topk(padded, k, tie_keys=keys)
    got = merge_shard_answers(found, nq, k, visit.sum(axis=1), tie_keys=keys)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (got[0][~visit.any(axis=1)] == -1).all()
    assert (visit.sum(axis=1) == 1).sum() > 50 and (visit.sum(axis=1) > 1).sum() > 20  # Both paths ran.
