"""One shard searched on its own, and exact merging of per-shard partial top-k lists.

This is what the distributed query job runs: each worker loads one shard (:class:`LoadedShard`), answers
every query batch for it with a :class:`PartialTopK`, and the partials of one query are merged with
:func:`merge_partials` (associative and commutative, so it can be a Beam CombineFn). Ties break by entry id,
exactly as :meth:`memory.visual_memory.VisualMemory.search` does, so both paths return the same lists.

A living memory (memory.store.mutations) is searched the same way: fan out over `searchable_shards(manifest)`
(main shards and delta shards) and load each with ``forgotten=load_forgotten(root, manifest)`` so that
tombstoned rows are skipped exactly (`search_live_rows`, shared with VisualMemory.search); with
``entry_weights=load_entry_weights(root, manifest)`` each hit also carries its soft-pruning weight
(``PartialTopK.weights``), which merging keeps with its neighbour.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
from typing import Callable, NamedTuple, Sequence

import numpy as np

from memory import storage
from memory.index.shard_index import IndexConfig, IndexKind, ShardIndex
from memory.store.manifest import Manifest, ShardInfo
from memory.search.filters import Crowding, QueryFilter, RowAttributes, crowd, crowded_search, search_filtered
from memory.search.merge import merge_topk
from memory.store.mutations import read_entry_weights, read_forgotten, row_weights
from memory.store.shard import load_unit_index, read_shard_entries
from memory.vectors import l2_normalize

PAD_ID = ""
# Brute-force indices over a shard's filtered live rows kept for this many distinct filters.
FILTER_INDEX_CACHE = 8
# Extra neighbours asked of an index beyond k, to make up for forgotten rows: max(k, 64), never more than the
# shard's forgotten rows. Enough for tombstones scattered over the shard; a query that still finds fewer than
# k live rows (e.g. its whole neighbourhood was forgotten with its class) is searched by brute force over the
# live rows instead of asking the index for k + (every forgotten row).
MIN_OVERFETCH = 64


def overfetch(k: int, dead: int) -> int:
    """Neighbours asked of a shard index holding ``dead`` forgotten rows: at most 2k + 64, whatever ``dead`` is."""
    return int(k) + min(int(dead), max(int(k), MIN_OVERFETCH))


def build_live_index(embeddings: np.ndarray, dead: np.ndarray) -> tuple[ShardIndex | None, np.ndarray]:
    """A brute-force index over a shard's live rows, and the shard row of each of its rows (ascending).

    Live rows keep their order (ascending id), so searching it is exactly searching a shard written without
    the forgotten rows: same vectors, same brute-force scoring, same tie order. (None, []) when none is live.
    """
    rows = np.flatnonzero(~np.asarray(dead, dtype=bool))
    if not rows.size:
        return None, rows
    emb = np.asarray(embeddings, dtype=np.float32)[rows]
    return ShardIndex.build(emb, IndexConfig(kind=IndexKind.BRUTE_FORCE)), rows


def search_live_rows(index: ShardIndex, queries: np.ndarray, k: int, dead: np.ndarray | None, *,
                     live_index: Callable[[], tuple[ShardIndex | None, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k live rows of one shard for unit queries, without ever asking the index for k + (all forgotten rows).

    The index is asked for `overfetch(k, forgotten rows)` neighbours and the forgotten ones are dropped. For a
    brute-force index, a query left with at least min(k, live rows) live hits then has exactly its top-k live
    rows (the dropped rows only move the cut-off). A query left with fewer -- forgetting a whole class empties
    the neighbourhood of that class's queries -- is answered by ``live_index()`` (see `build_live_index`,
    built once by the caller on first need), which is exactly the search of the shard without those rows.

    Args:
      index: The shard's index (all physical rows).
      queries: float32 [nq, d] unit rows.
      k: Neighbours per query.
      dead: bool [n] forgotten rows, or None when none is.
      live_index: Returns (brute-force index over the live rows, shard row of each of its rows).

    Returns:
      (local rows int64 [nq, k], cosine distances float32 [nq, k]); padding is -1 / +inf.
    """
    dead_count = 0 if dead is None else int(dead.sum())
    if not dead_count:
        return index.search(queries, k)
    local, dist = index.search(queries, overfetch(k, dead_count))
    valid = (local >= 0) & ~dead[np.maximum(local, 0)]
    # Stable: live rows keep their (distance, id) order; dropped ones move to the end, then cut to k.
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    valid = np.take_along_axis(valid, order, axis=1)
    local = np.where(valid, np.take_along_axis(local, order, axis=1), -1)
    dist = np.where(valid, np.take_along_axis(dist, order, axis=1), np.inf).astype(np.float32)
    short = np.flatnonzero(valid.sum(axis=1) < min(int(k), len(index) - dead_count))
    if short.size:
        sub, rows = live_index()
        found, found_dist = sub.search(queries[short], k)
        local[short] = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        dist[short] = np.where(found >= 0, found_dist, np.inf)
    return local, dist


class PartialTopK(NamedTuple):
    """Neighbours of a batch of queries within some subset of the memory, nearest first.

    Attributes:
      ids: unicode [nq, k] entry ids ("" = padding).
      labels: int32 [nq, k] class indices (-1 = padding).
      distances: float32 [nq, k] cosine distances (+inf = padding).
      weights: float32 [nq, k] entry weight of each neighbour (soft pruning; 1.0 for unweighted entries and
        for padding), or None when the memory has no entry weights.
      uris: unicode [nq, k] source uri of each neighbour ("" = padding), when the search was asked for them
        (a re-ranker shows the neighbours' images); else None.
      groups: unicode [nq, k] crowding group of each neighbour (memory.search.filters.Crowding), for a crowded
        search; else None.
    """
    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    weights: np.ndarray | None = None
    uris: np.ndarray | None = None
    groups: np.ndarray | None = None

    def row(self, i: int) -> "PartialTopK":
        return PartialTopK(*(None if a is None else a[i:i + 1] for a in self))

    def scatter(self, rows: np.ndarray, n: int) -> "PartialTopK":
        """This partial's rows placed at ``rows`` of an n-row partial whose other rows are all padding.

        Padding never wins a merge (`merge_partials`), so merging partials that cover different queries of one
        batch, each scattered to the batch's rows, is the per-query merge of the queries each covers.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (self.ids.shape[0],):
            raise ValueError(f"scatter needs one row index per query: {rows.shape} for {self.ids.shape[0]} queries")
        fills = (PAD_ID, -1, np.inf, 1.0, PAD_ID, PAD_ID)
        out = []
        for a, fill in zip(self, fills):
            if a is None:
                out.append(None)
                continue
            full = np.full((n,) + a.shape[1:], fill, dtype=a.dtype)
            full[rows] = a
            out.append(full)
        return PartialTopK(*out)


class _OneThreadBlas:
    """Context manager: numpy's BLAS on one thread while any search is inside it (re-entrant across threads).

    After each call OpenBLAS's worker threads keep spinning for a while, on the very cores the search threads
    need: measured on the 1M x 256 routed benchmark memory (2 cores), two search threads answered 30,700
    queries/s with the router's matmul on two BLAS threads and 44,400 with it on one (one search thread:
    28,100); and a 2-thread search right after a 1-thread one whose matmul had used two BLAS threads took
    25 ms per 1,000 queries instead of 14 (the workers were still spinning). The first search in sets the
    limit and the last one out restores it, so concurrent searches from several caller threads cannot leave
    BLAS limited. OpenBLAS's thread count is process-wide, and threadpoolctl lets one thread at a time
    control it (a limit set or restored from any other thread is silently ignored), so both are done on one
    dedicated thread here, whichever caller thread enters first or leaves last. A caller that holds its own
    threadpoolctl limit keeps control: this then changes nothing.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._limiter = None
        self._control: concurrent.futures.ThreadPoolExecutor | None = None

    def _on_control_thread(self, fn):
        if self._control is None:
            self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmem-blas-limit")
        return self._control.submit(fn).result()

    def __enter__(self):
        with self._lock:
            if self._inside == 0:
                self._limiter = self._on_control_thread(_limit_blas_to_one_thread)
            self._inside += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                limiter, self._limiter = self._limiter, None
                self._on_control_thread(lambda: limiter.__exit__(None, None, None))

    def _after_fork_in_child(self):
        # The control thread does not survive a fork: the child starts with no limit held and no thread.
        self._lock, self._inside, self._limiter, self._control = threading.Lock(), 0, None, None


@functools.cache
def _process_wide_blas():
    from threadpoolctl import ThreadpoolController  # pylint: disable=g-import-not-at-top
    # Made once: a ThreadpoolController scans every loaded library (0.7 ms with TensorFlow loaded). numpy's
    # BLAS is loaded before any search. Only BLAS pools on pthreads (numpy's OpenBLAS) are process-wide;
    # OpenMP-threaded ones (faiss's bundled OpenBLAS, MKL) take per-thread limits that would bind the control
    # thread alone, and searches never call them.
    return ThreadpoolController().select(user_api="blas").select(threading_layer="pthreads")


def _limit_blas_to_one_thread():
    return _process_wide_blas().limit(limits=1).__enter__()


one_thread_blas = _OneThreadBlas()
os.register_at_fork(after_in_child=one_thread_blas._after_fork_in_child)  # pylint: disable=protected-access

# Below this many queries per thread a batch is not split into query chunks (each chunk's ScaNN calls would
# get too few queries to amortise their per-call cost); its shards are searched in parallel instead.
MIN_CHUNK_QUERIES = 64


def search_in_chunks(search: Callable[[int, int], tuple[np.ndarray, np.ndarray]], nq: int, threads: int,
                     executor: Callable[[], concurrent.futures.Executor]) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows and distances of queries [0, nq) searched as ``threads`` contiguous chunks on ``executor()``.

    ``search(start, stop)`` answers one chunk end to end (route, search its shards one after another, merge).
    Splitting the batch by queries instead of by shards keeps every thread busy whatever the routing (four
    routed shards of unequal load on two threads leave one idle) and runs routing and merging in parallel
    too. Returns None when the batch is too small to split (fewer than MIN_CHUNK_QUERIES per thread): the
    caller then searches it whole, shards in parallel.
    """
    if threads < 2 or nq < threads * MIN_CHUNK_QUERIES:
        return None
    bounds = np.linspace(0, nq, threads + 1).astype(int)
    parts = list(executor().map(search, bounds[:-1].tolist(), bounds[1:].tolist()))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def empty_partial(nq: int, k: int, *, weighted: bool = False, with_uris: bool = False,
                  crowded: bool = False) -> PartialTopK:
    blank = np.full((nq, k), PAD_ID, dtype="<U1")
    return PartialTopK(blank, np.full((nq, k), -1, np.int32), np.full((nq, k), np.inf, np.float32),
                       np.ones((nq, k), np.float32) if weighted else None, blank.copy() if with_uris else None,
                       blank.copy() if crowded else None)


def merge_partials(partials: Sequence[PartialTopK], k: int, *, max_per_group: int | None = None) -> PartialTopK:
    """Exact top-k of the union of partials over the same queries (ties by ascending id).

    Weights travel with their neighbours: the result has weights when any partial has them (a partial
    without weights counts as weight 1.0 for all its neighbours), else None; uris and groups likewise.
    With ``max_per_group`` (crowded partials, each carrying ``groups``) the union is crowded: at most that
    many per group, the greedy walk of memory.search.filters.crowd -- exact and associative when every partial is
    itself a crowded top-k.
    """
    if not partials:
        raise ValueError("merge_partials needs at least one partial")
    nq = partials[0].ids.shape[0]
    offsets = np.cumsum([0] + [p.ids.shape[1] for p in partials])
    pairs, keys = [], []
    for off, p in zip(offsets, partials):
        cols = np.broadcast_to(np.arange(p.ids.shape[1], dtype=np.int64) + off, p.ids.shape)
        pairs.append((np.where(p.labels >= 0, cols, -1), p.distances))
        keys.append(p.ids.astype(str))
    width = int(offsets[-1]) if max_per_group is not None else k
    idx, dist = merge_topk(pairs, width, tie_keys=keys)
    if max_per_group is not None:
        if any(p.groups is None for p in partials):
            raise ValueError("crowded merge: every partial must carry groups (search with crowding)")
        groups = np.concatenate([p.groups.astype(str) for p in partials], axis=1)
        rows = np.arange(nq)[:, None]
        cols, _ = crowd(np.where(idx >= 0, groups[rows, np.maximum(idx, 0)], ""), idx >= 0, k, max_per_group)
        keep = cols >= 0
        idx = np.where(keep, np.take_along_axis(idx, np.maximum(cols, 0), axis=1), -1)
        dist = np.where(keep, np.take_along_axis(dist, np.maximum(cols, 0), axis=1), np.inf).astype(np.float32)
    valid = idx >= 0
    safe = np.maximum(idx, 0)
    rows = np.arange(nq)[:, None]

    def gather(field: str, fill, dtype=None):
        if all(getattr(p, field) is None for p in partials):
            return None
        parts = [getattr(p, field) if getattr(p, field) is not None else np.full(p.ids.shape, fill, dtype)
                 for p in partials]
        both = np.concatenate([np.asarray(x, dtype) if dtype else x.astype(str) for x in parts], axis=1)
        return np.where(valid, both[rows, safe], fill)

    all_ids = np.concatenate([p.ids.astype(str) for p in partials], axis=1)
    all_labels = np.concatenate([p.labels for p in partials], axis=1)
    weights = gather("weights", np.float32(1.0), np.float32)
    return PartialTopK(np.where(valid, all_ids[rows, safe], PAD_ID),
                       np.where(valid, all_labels[rows, safe], -1).astype(np.int32), dist,
                       None if weights is None else weights.astype(np.float32),
                       gather("uris", PAD_ID), gather("groups", PAD_ID))


def searchable_shards(manifest: Manifest) -> tuple[ShardInfo, ...]:
    """Every shard a search must visit: main shards, then delta shards (entries added since the last re-index)."""
    return manifest.all_shards


def load_forgotten(root: str, manifest: Manifest) -> np.ndarray:
    """The version's tombstoned ids (sorted unicode; empty when nothing is forgotten) for LoadedShard.load."""
    return read_forgotten(root, manifest)


def load_entry_weights(root: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """The version's (sorted ids, float32 weights) for LoadedShard.load; None for an unweighted memory."""
    return read_entry_weights(root, manifest)


@dataclasses.dataclass
class LoadedShard:
    """A shard's index plus the ids and labels needed to name its hits.

    Attributes:
      dead: bool [n], rows that are forgotten (tombstoned) and must never be returned; None for none.
      weights: float32 [n] entry weight of each row (soft pruning; 1.0 for unlisted ids), or None when the
        memory has no entry weights (then search returns PartialTopK.weights = None).
      shard_dirs: Where the shard's files are (each shard's, for a unit searched as one index): the embeddings
        are read from there (once) only when a query must be searched by brute force over the live rows (see
        `search_live_rows`).
      uris: unicode [n] source uris (for filters, crowding and re-ranking), or None when not loaded.
      class_names: The memory's class names (label filters name classes).
      metadata: The version's metadata table (memory.store.metadata.MetadataTable) for metadata filters and
        crowding, or None.
    """
    name: str
    index: ShardIndex | None
    ids: np.ndarray
    labels: np.ndarray
    dead: np.ndarray | None = None
    weights: np.ndarray | None = None
    shard_dirs: tuple[str, ...] = ()
    uris: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    metadata: object | None = None
    _live: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _attributes: RowAttributes | None = dataclasses.field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, root: str, info: ShardInfo | Sequence[ShardInfo], *, forgotten: np.ndarray | None = None,
             entry_weights: tuple[np.ndarray, np.ndarray] | None = None, with_uris: bool = False,
             class_names: Sequence[str] = (), metadata: object | None = None) -> "LoadedShard":
        """Loads a main or delta shard, or a `memory.store.shard.search_units` unit of shards searched as one index.

        Args:
          root: Memory root.
          info: The shard (from `searchable_shards(manifest)`), or a unit's shards in order.
          forgotten: The version's tombstoned ids (`load_forgotten`); rows with these ids are skipped.
          entry_weights: The version's (sorted ids, weights) (`load_entry_weights`), or None for an
            unweighted memory.
          with_uris: Keep the rows' source uris (filters by uri prefix, crowding by uri, re-ranking).
          class_names: The memory's class names, for label filters.
          metadata: The version's `memory.store.metadata.read_metadata` table, for metadata filters and crowding.
        """
        infos = [info] if isinstance(info, ShardInfo) else list(info)
        dirs = tuple(storage.join(root, i.path) for i in infos)
        entries = [read_shard_entries(d) for d in dirs]  # The embeddings live in the index only.
        ids = np.concatenate([e.ids for e in entries])
        dead = None
        if forgotten is not None and len(forgotten) and ids.size:
            dead = np.isin(ids, np.asarray(forgotten, dtype=str))
            dead = dead if dead.any() else None
        weights = None if entry_weights is None else row_weights(entry_weights, ids)
        return cls(name="+".join(i.name for i in infos), index=load_unit_index(dirs, infos), ids=ids,
                   labels=np.concatenate([e.labels for e in entries]).astype(np.int32), dead=dead, weights=weights,
                   shard_dirs=dirs, uris=np.concatenate([e.uris for e in entries]) if with_uris else None,
                   class_names=tuple(class_names), metadata=metadata)

    def _live_index(self, key: str, excluded: np.ndarray) -> tuple[ShardIndex | None, np.ndarray]:
        if key not in self._live:
            if not self.shard_dirs:
                raise ValueError(f"shard {self.name}: a query needs the brute-force search over the live rows, which "
                                 "reads the shard's embeddings; load the shard with LoadedShard.load")
            from memory.store.shard import read_shard_data  # pylint: disable=g-import-not-at-top
            if key != "dead" and len(self._live) >= FILTER_INDEX_CACHE:  # Bounded: filters can be many.
                del self._live[next(kk for kk in self._live if kk != "dead")]
            parts = [read_shard_data(d).embeddings for d in self.shard_dirs]
            self._live[key] = build_live_index(parts[0] if len(parts) == 1 else np.concatenate(parts), excluded)
        return self._live[key]

    def attributes(self) -> RowAttributes:
        """What filters and crowding read of this shard's rows (one instance, so what it derives is kept)."""
        if self._attributes is None:
            self._attributes = self._make_attributes()
        return self._attributes

    def _make_attributes(self) -> RowAttributes:
        def uris():
            if self.uris is None:
                raise ValueError(f"shard {self.name}: uri filters and crowding need the uris; load the shard with "
                                 "LoadedShard.load(..., with_uris=True)")
            return self.uris

        def metadata(column):
            if self.metadata is None:
                raise ValueError(f"shard {self.name}: no metadata table loaded, so nothing can select on {column!r}; "
                                 "attach metadata with `vmem metadata` and load it (memory.store.metadata.read_metadata)")
            return self.metadata.values(column, self.ids)
        return RowAttributes(self.labels, self.class_names, uris, metadata)

    def _rows(self, q: np.ndarray, k: int, filters: Sequence[QueryFilter | None] | None
              ) -> tuple[np.ndarray, np.ndarray]:
        def live_search(queries, excluded, key):
            return search_live_rows(self.index, queries, k, excluded,
                                    live_index=lambda: self._live_index(key, excluded))
        if filters is None or all(f is None for f in filters):
            return live_search(q, self.dead, "dead")
        return search_filtered(live_search, q, k, self.dead, list(filters), self.attributes())

    def search(self, queries: np.ndarray, k: int, *, filters: Sequence[QueryFilter | None] | None = None,
               crowding: Crowding | None = None) -> PartialTopK:
        """Top-k live rows of this shard for each (normalised here) query.

        Forgotten rows are skipped with a bounded over-fetch, and queries left short by it are searched by
        brute force over the live rows (`search_live_rows`): for a brute-force shard, exactly the top-k of
        the shard without the forgotten rows. ``filters`` (one per query, None = unfiltered) exclude rows the
        same way (memory.search.filters); ``crowding`` returns this shard's crowded top-k with each hit's group (so
        `merge_partials(..., max_per_group=c)` crowds the union exactly).
        """
        q = l2_normalize(np.asarray(queries, dtype=np.float32))
        if self.index is None:
            return empty_partial(q.shape[0], k, weighted=self.weights is not None, with_uris=self.uris is not None,
                                 crowded=crowding is not None)
        groups = None
        if crowding is None:
            local, dist = self._rows(q, k, filters)
        else:
            row_groups = crowding.groups(self.attributes())
            live = len(self.index) - (0 if self.dead is None else int(self.dead.sum()))

            def fetch(rows, n):
                return self._rows(q[rows], n, None if filters is None else [filters[i] for i in rows])
            local, dist = crowded_search(fetch, q.shape[0], k, lambda rows: row_groups[rows],
                                         crowding.max_per_group, live)
        valid = local >= 0
        safe = np.maximum(local, 0)
        if crowding is not None:
            groups = np.where(valid, row_groups[safe], PAD_ID)
        weights = None
        if self.weights is not None:
            weights = np.where(valid, self.weights[safe], np.float32(1.0)).astype(np.float32)
        return PartialTopK(np.where(valid, self.ids[safe], PAD_ID), np.where(valid, self.labels[safe], -1),
                           np.where(valid, dist, np.inf).astype(np.float32), weights,
                           None if self.uris is None else np.where(valid, self.uris[safe], PAD_ID), groups)
