"""One shard searched on its own, and exact merging of per-shard partial top-k lists.

This is what the distributed query job runs: each worker loads one shard (:class:`LoadedShard`), answers
every query batch for it with a :class:`PartialTopK`, and the partials of one query are merged with
:func:`merge_partials` (associative and commutative, so it can be a Beam CombineFn). Ties break by entry id,
exactly as :meth:`memory.visual_memory.VisualMemory.search` does, so both paths return the same lists.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from memory import storage
from memory.index import ShardIndex
from memory.manifest import ShardInfo
from memory.merge import merge_topk
from memory.shard import load_shard_index, read_shard_data
from memory.vectors import l2_normalize

PAD_ID = ""


class PartialTopK(NamedTuple):
    """Neighbours of a batch of queries within some subset of the memory, nearest first.

    Attributes:
      ids: unicode [nq, k] entry ids ("" = padding).
      labels: int32 [nq, k] class indices (-1 = padding).
      distances: float32 [nq, k] cosine distances (+inf = padding).
    """
    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray

    def row(self, i: int) -> "PartialTopK":
        return PartialTopK(self.ids[i:i + 1], self.labels[i:i + 1], self.distances[i:i + 1])


def empty_partial(nq: int, k: int) -> PartialTopK:
    return PartialTopK(np.full((nq, k), PAD_ID, dtype="<U1"), np.full((nq, k), -1, np.int32),
                       np.full((nq, k), np.inf, np.float32))


def merge_partials(partials: Sequence[PartialTopK], k: int) -> PartialTopK:
    """Exact top-k of the union of partials over the same queries (ties by ascending id)."""
    if not partials:
        raise ValueError("merge_partials needs at least one partial")
    nq = partials[0].ids.shape[0]
    offsets = np.cumsum([0] + [p.ids.shape[1] for p in partials])
    pairs, keys = [], []
    for off, p in zip(offsets, partials):
        cols = np.broadcast_to(np.arange(p.ids.shape[1], dtype=np.int64) + off, p.ids.shape)
        pairs.append((np.where(p.labels >= 0, cols, -1), p.distances))
        keys.append(p.ids.astype(str))
    idx, dist = merge_topk(pairs, k, tie_keys=keys)
    all_ids = np.concatenate([p.ids.astype(str) for p in partials], axis=1)
    all_labels = np.concatenate([p.labels for p in partials], axis=1)
    valid = idx >= 0
    safe = np.maximum(idx, 0)
    rows = np.arange(nq)[:, None]
    return PartialTopK(np.where(valid, all_ids[rows, safe], PAD_ID),
                       np.where(valid, all_labels[rows, safe], -1).astype(np.int32), dist)


@dataclasses.dataclass
class LoadedShard:
    """A shard's index plus the ids and labels needed to name its hits."""
    name: str
    index: ShardIndex | None
    ids: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, root: str, info: ShardInfo) -> "LoadedShard":
        shard_dir = storage.join(root, info.path)
        data = read_shard_data(shard_dir)
        return cls(name=info.name, index=load_shard_index(shard_dir, info), ids=data.ids.astype(str),
                   labels=data.labels.astype(np.int32))

    def search(self, queries: np.ndarray, k: int) -> PartialTopK:
        """Top-k of this shard for each (normalised here) query."""
        q = l2_normalize(np.asarray(queries, dtype=np.float32))
        if self.index is None:
            return empty_partial(q.shape[0], k)
        local, dist = self.index.search(q, k)
        valid = local >= 0
        safe = np.maximum(local, 0)
        return PartialTopK(np.where(valid, self.ids[safe], PAD_ID), np.where(valid, self.labels[safe], -1),
                           np.where(valid, dist, np.inf).astype(np.float32))
