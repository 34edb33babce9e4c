"""Exact merge of per-shard top-k lists into a global top-k."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

# Per-partial key arrays, or a function from global indices (any shape) to keys of that shape.
TieKeys = Union[Sequence[np.ndarray], Callable[[np.ndarray], np.ndarray]]


def merge_topk(partials: Sequence[tuple[np.ndarray, np.ndarray]], k: int, *,
               tie_keys: TieKeys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-shard top-k results into the global top-k, nearest first.

    The result is exact given exact partials: every true global top-k neighbour is in its own shard's top-k,
    so sorting the union of the partials and keeping k (what faiss' ResultHeap / knn_ground_truth do with
    a heap) loses nothing. Equal distances are ordered by a secondary key so the answer does not depend on
    how entries are spread over shards: a 1-shard and a 4-shard memory return the same lists, provided each
    shard also breaks ties by the same key (rows sorted by id do; see memory.store.shard).

    Args:
      partials: One (global_idx int64 [nq, k_s], distances float32 [nq, k_s]) per shard, padded with index
        -1 and distance +inf. k_s may differ between shards.
      k: Number of neighbours to return, >= 1.
      tie_keys: Optional per-partial arrays shaped like the indices (e.g. entry ids as strings) used to
        order equal distances, or a function mapping global indices to such keys (only called for the
        rare query rows that have a tie among their first k + 1 candidates); by default the global index
        orders them.

    Returns:
      (global_idx int64 [nq, k], distances float32 [nq, k]); padded with -1 / +inf when fewer than k
      candidates exist.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not partials:
        raise ValueError("merge_topk needs at least one partial result")
    keys_fn = tie_keys if callable(tie_keys) else None
    if tie_keys is not None and keys_fn is None and len(tie_keys) != len(partials):
        raise ValueError(f"tie_keys has {len(tie_keys)} arrays for {len(partials)} partials; pass one per partial")
    nq = np.shape(partials[0][0])[0]
    idx_parts, dist_parts = [], []
    for s, (idx, dist) in enumerate(partials):
        idx = np.asarray(idx, dtype=np.int64)
        dist = np.asarray(dist, dtype=np.float32)
        if idx.ndim != 2 or idx.shape != dist.shape or idx.shape[0] != nq:
            raise ValueError(
                f"partial {s}: indices {idx.shape} and distances {dist.shape} must both be [nq={nq}, k_s]")
        if tie_keys is not None and keys_fn is None and np.shape(tie_keys[s]) != idx.shape:
            raise ValueError(f"tie_keys[{s}] has shape {np.shape(tie_keys[s])}, expected {idx.shape}")
        idx_parts.append(idx)
        dist_parts.append(dist)
    all_idx = np.concatenate(idx_parts, axis=1)
    all_dist = np.concatenate(dist_parts, axis=1)
    # Padding must sort after every real hit whatever its tie key, so force pads to +inf.
    all_dist = np.where(all_idx < 0, np.float32(np.inf), all_dist)
    # Row-wise lexsort: last key (distance) is primary. The candidate count is shards * k, small enough that
    # a full sort beats argpartition, which cannot honour the secondary key at the k-th boundary. Numeric
    # keys first; only rows with equal distances among their first k + 1 candidates need the tie keys
    # (string ids are ~10x slower to sort, and exact ties are rare).
    order = np.lexsort((all_idx, all_dist), axis=-1)
    if tie_keys is not None:
        head = np.take_along_axis(all_dist, order[:, :k + 1], axis=1)
        tied = np.flatnonzero((np.isfinite(head[:, 1:]) & (head[:, 1:] == head[:, :-1])).any(axis=1))
        if tied.size:
            if keys_fn is not None:
                keys = np.asarray(keys_fn(np.maximum(all_idx[tied], 0)))
            else:
                keys = np.concatenate([np.asarray(t)[tied] for t in tie_keys], axis=1)
            order[tied] = np.lexsort((keys, all_dist[tied]), axis=-1)
    take = min(k, order.shape[1])
    order = order[:, :take]
    out_idx = np.full((nq, k), -1, dtype=np.int64)
    out_dist = np.full((nq, k), np.inf, dtype=np.float32)
    out_idx[:, :take] = np.take_along_axis(all_idx, order, axis=1)
    out_dist[:, :take] = np.take_along_axis(all_dist, order, axis=1)
    out_idx[~np.isfinite(out_dist)] = -1
    return out_idx, out_dist


def merge_shard_answers(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]], nq: int, k: int,
                        visits: np.ndarray, *, tie_keys: Callable[[np.ndarray], np.ndarray] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k [nq, k] of queries that each searched some of the shards.

    A query that searched one shard (a routed query's usual case) takes that shard's answer as it is: a
    shard breaks distance ties by row, which is id order (memory.store.shard), as `merge_topk` does. Only the
    queries that searched several shards are merged, over padded partials of just those queries; that
    skips the merge's sort for most queries of a routed memory.

    Args:
      found: Per searched shard, (query rows int [n_s], distinct, global rows int64 [n_s, k_s], distances
        float32 [n_s, k_s]), nearest first, padded with -1 / +inf; k_s may differ from k.
      nq: Queries in the batch.
      k: Neighbours per query.
      visits: int [nq]: how many of the ``found`` shards each query searched.
      tie_keys: Keys of global rows ordering equal distances across shards, as for `merge_topk`.

    Returns:
      (global rows int64 [nq, k], distances float32 [nq, k]); a query that searched no shard is all padding.
    """
    out_idx = np.full((nq, k), -1, dtype=np.int64)
    out_dist = np.full((nq, k), np.inf, dtype=np.float32)
    single = visits == 1
    for rows, glob, dist in found:
        one = single[rows]
        width = min(k, glob.shape[1])  # A list longer than k is cut (it is nearest first), a shorter one padded.
        out_idx[rows[one], :width], out_dist[rows[one], :width] = glob[one, :width], dist[one, :width]
    several = np.flatnonzero(visits > 1)
    if several.size:
        at = np.full(nq, -1, dtype=np.int64)
        at[several] = np.arange(several.size)
        partials = []
        for rows, glob, dist in found:
            if several.size == nq and rows.size == nq and (rows == np.arange(nq)).all():
                # Every query searched several shards, this one included, row for row.
                partials.append((glob, dist))
                continue
            pos = at[rows]
            keep = pos >= 0
            p_idx = np.full((several.size, glob.shape[1]), -1, dtype=np.int64)
            p_dist = np.full((several.size, glob.shape[1]), np.inf, dtype=np.float32)
            p_idx[pos[keep]], p_dist[pos[keep]] = glob[keep], dist[keep]
            partials.append((p_idx, p_dist))
        out_idx[several], out_dist[several] = merge_topk(partials, k, tie_keys=tie_keys)
    return out_idx, out_dist
