"""The one shard searcher and the exact merge of its partial top-k lists: every search runs through here.

A search unit (a shard, or shards built from one index template and searched as one index) is a
:class:`LoadedShard`: its index, the ids, labels and weights of its rows, its forgotten rows and what filters
and crowding read of them. Its ``search`` answers a batch of queries with a :class:`PartialTopK`, and the
partials of the units a batch visited are merged with :func:`merge_partials` (exact, associative and
commutative, so it can be a Beam CombineFn). `memory.visual_memory.VisualMemory.search` (routing and
query-chunked threads on top) and the evaluate / prune job (`pipelines.stages.search_shards`, one unit per
worker) both search this way, so they return the same lists; ties break by entry id.

A living memory (memory.store.mutations) is searched the same way: fan out over `searchable_shards(manifest)`
(main shards and delta shards) and load each with ``forgotten=load_forgotten(root, manifest)`` so that
tombstoned rows are skipped exactly (`search_live_rows`); with ``entry_weights=load_entry_weights(root,
manifest)`` each hit also carries its soft-pruning weight (``PartialTopK.weights``), which merging keeps with
its neighbour.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from memory import storage
from memory.index.shard_index import IndexConfig, IndexKind, ShardIndex
from memory.store.manifest import Manifest, ManifestError, ShardInfo
from memory.search.filters import Crowding, QueryFilter, RowAttributes, crowd, crowded_search, search_filtered
from memory.search.merge import merge_shard_answers
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


def search_in_chunks(search: Callable[[int, int], tuple], nq: int, threads: int,
                     executor: Callable[[], concurrent.futures.Executor]) -> tuple | None:
    """The answers to queries [0, nq) searched as ``threads`` contiguous chunks on ``executor()``.

    ``search(start, stop)`` answers one chunk end to end (route, search its units one after another, merge)
    with a tuple of [n, ...] arrays (a `PartialTopK`, say; None fields stay None); the chunks' answers are
    concatenated field by field, in query order. Splitting the batch by queries instead of by units keeps
    every thread busy whatever the routing (four routed shards of unequal load on two threads leave one idle)
    and runs routing and merging in parallel too. Returns None when the batch is too small to split (fewer
    than MIN_CHUNK_QUERIES per thread): the caller then searches it whole, units in parallel.
    """
    if threads < 2 or nq < threads * MIN_CHUNK_QUERIES:
        return None
    bounds = np.linspace(0, nq, threads + 1).astype(int)
    parts = list(executor().map(search, bounds[:-1].tolist(), bounds[1:].tolist()))
    fields = [None if first is None else np.concatenate([p[i] for p in parts]) for i, first in enumerate(parts[0])]
    return parts[0]._make(fields) if hasattr(parts[0], "_make") else tuple(fields)


def empty_partial(nq: int, k: int, *, weighted: bool = False, with_uris: bool = False,
                  crowded: bool = False) -> PartialTopK:
    """An all-padding [nq, k] answer (queries that found nothing), with the optional fields asked for."""
    blank = np.full((nq, k), PAD_ID, dtype="<U1")
    return PartialTopK(blank, np.full((nq, k), -1, np.int32), np.full((nq, k), np.inf, np.float32),
                       np.ones((nq, k), np.float32) if weighted else None, blank.copy() if with_uris else None,
                       blank.copy() if crowded else None)


def merge_partials(partials: Sequence[PartialTopK], k: int, *, rows: Sequence[np.ndarray] | None = None,
                   num_queries: int | None = None, max_per_group: int | None = None) -> PartialTopK:
    """Exact top-k of the union of partials, per query (ties by ascending id).

    Every partial is nearest first with ties in id order (what `LoadedShard.search` and this function return),
    so a query that only one partial answers takes that partial's list as it is (a routed query's usual
    case); the others are merged (`memory.search.merge.merge_shard_answers`).

    Weights travel with their neighbours: the result has weights when any partial has them (a partial
    without weights counts as weight 1.0 for all its neighbours), else None; uris and groups likewise.
    With ``max_per_group`` (crowded partials, each carrying ``groups``) the union is crowded: at most that
    many per group, the greedy walk of memory.search.filters.crowd -- exact and associative when every
    partial is itself a crowded top-k.

    Args:
      partials: Per unit (or per already merged group of units), its answers.
      k: Neighbours per query.
      rows: Per partial, the rows (distinct ints, in any order) of a ``num_queries``-query batch its rows
        answer; None: every partial answers the same queries, row for row.
      num_queries: The batch's size, with ``rows``. A query no partial answers is all padding.
      max_per_group: Crowd the union (see above).

    Returns:
      The merged [nq, k] answers.
    """
    if not partials:
        raise ValueError("merge_partials needs at least one partial")
    if rows is None:
        nq = partials[0].ids.shape[0]
        bad = [i for i, p in enumerate(partials) if p.ids.shape[0] != nq]
        if bad:
            raise ValueError(f"partial {bad[0]} answers {partials[bad[0]].ids.shape[0]} queries, partial 0 {nq}: "
                             "pass rows= (and num_queries=) to merge partials of different queries")
        covered = [np.arange(nq)] * len(partials)
    else:
        if num_queries is None or len(rows) != len(partials):
            raise ValueError(f"rows= needs one row array per partial ({len(rows)} for {len(partials)}) and "
                             "num_queries=")
        nq = int(num_queries)
        covered = [np.asarray(r, dtype=np.int64) for r in rows]
        bad = [i for i, (p, r) in enumerate(zip(partials, covered)) if r.shape != (p.ids.shape[0],)]
        if bad:
            raise ValueError(f"partial {bad[0]}: {covered[bad[0]].shape} rows for its "
                             f"{partials[bad[0]].ids.shape[0]} queries; give one row per query")
    if max_per_group is not None and any(p.groups is None for p in partials):
        raise ValueError("crowded merge: every partial must carry groups (search with crowding)")
    if len(partials) == 1 and partials[0].ids.shape[1] == k and (
            rows is None or np.array_equal(covered[0], np.arange(nq))):
        return partials[0]
    visits = np.full(nq, len(partials)) if rows is None else np.bincount(np.concatenate(covered), minlength=nq)
    # Candidates are numbered across the partials' flattened [n_p, k_p] lists: every field is then gathered
    # with one index, and ids are only compared for rows with equal distances (merge_topk's tie keys).
    starts = np.cumsum([0] + [p.ids.size for p in partials])
    if not starts[-1]:
        return empty_partial(nq, k, weighted=any(p.weights is not None for p in partials),
                             with_uris=any(p.uris is not None for p in partials), crowded=max_per_group is not None)
    found = [(r, np.where(p.labels >= 0, np.arange(start, start + p.ids.size).reshape(p.ids.shape), -1),
              p.distances) for p, r, start in zip(partials, covered, starts)]
    flat_ids = np.concatenate([p.ids.ravel() for p in partials]).astype(str, copy=False)
    width = k if max_per_group is None else max(k, int(sum(p.ids.shape[1] for p in partials)))
    idx, dist = merge_shard_answers(found, nq, width, visits, tie_keys=lambda i: flat_ids[i])
    if max_per_group is not None:
        # A query answered by one crowded partial keeps its list (cut to k); the union of several is crowded.
        several = np.flatnonzero(visits > 1)
        crowded_idx, crowded_dist = idx[:, :k].copy(), dist[:, :k].copy()
        if several.size:
            groups = np.concatenate([p.groups.ravel() for p in partials]).astype(str, copy=False)
            sub = idx[several]
            cols, _ = crowd(np.where(sub >= 0, groups[np.maximum(sub, 0)], ""), sub >= 0, k, max_per_group)
            keep = cols >= 0
            cols = np.maximum(cols, 0)
            crowded_idx[several] = np.where(keep, np.take_along_axis(sub, cols, axis=1), -1)
            crowded_dist[several] = np.where(keep, np.take_along_axis(dist[several], cols, axis=1), np.inf)
        idx, dist = crowded_idx, crowded_dist
    valid = idx >= 0
    safe = np.maximum(idx, 0)

    def gather(field: str, fill, dtype):
        if all(getattr(p, field) is None for p in partials):
            return None
        flat = np.concatenate([np.full(p.ids.size, fill, dtype) if getattr(p, field) is None else
                               getattr(p, field).ravel() for p in partials]).astype(dtype, copy=False)
        return np.where(valid, flat[safe], fill).astype(dtype, copy=False)

    return PartialTopK(np.where(valid, flat_ids[safe], PAD_ID), gather("labels", -1, np.int32), dist,
                       gather("weights", np.float32(1.0), np.float32), gather("uris", PAD_ID, str),
                       gather("groups", PAD_ID, str))


def searchable_shards(manifest: Manifest) -> tuple[ShardInfo, ...]:
    """Every shard a search must visit: main shards, then delta shards (entries added since the last re-index)."""
    return manifest.all_shards


def load_forgotten(root: str, manifest: Manifest) -> np.ndarray:
    """The version's tombstoned ids (sorted unicode; empty when nothing is forgotten) for LoadedShard.load."""
    return read_forgotten(root, manifest)


def load_entry_weights(root: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """The version's (sorted ids, float32 weights) for LoadedShard.load; None for an unweighted memory."""
    return read_entry_weights(root, manifest)


class _DerivedRows:
    """What a unit derives from its rows on first need, shared by its views with another index (`with_index`).

    Searches of one unit may run on several threads at once (VisualMemory's query chunks, the job's pool):
    the lock makes each brute-force index over admitted rows, and the filters' view of the rows, built once.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.live: dict[str, tuple[ShardIndex | None, np.ndarray]] = {}
        self.attributes: RowAttributes | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedShard:
    """One search unit: a shard (or shards searched as one index) with what naming and filtering its hits needs.

    Attributes:
      name: The shard's name (names joined by "+" for a unit of several), for messages.
      index: The unit's index over all its rows (forgotten ones included), or None for an empty unit.
      ids: unicode [n] entry id of each row.
      labels: int32 [n] class index of each row.
      dead: bool [n], rows that are forgotten (tombstoned) and must never be returned; None for none.
      weights: float32 [n] entry weight of each row (soft pruning; 1.0 for unlisted ids), or None when the
        memory has no entry weights (then search returns PartialTopK.weights = None).
      shard_dirs: Where the unit's shards are: the embeddings are read from there (once per exclusion) only
        when a query must be searched by brute force over the live (admitted) rows (see `search_live_rows`),
        and the uris when a filter or crowding needs them and ``uris`` is None.
      shard_infos: The unit's shards' manifest entries (one per ``shard_dirs``), which those later reads check
        their files against; () reads them unchecked.
      verify: Check the files those later reads load against ``shard_infos`` (memory.store.integrity).
      uris: unicode [n] source uris, loaded with the unit; then every hit carries its uri
        (``PartialTopK.uris``, what a re-ranker shows). None: hits carry none.
      class_names: The memory's class names (label filters name classes).
      metadata: Returns the version's metadata table (memory.store.metadata.MetadataTable, or None when it has
        none); called on the first metadata filter or crowding.
      read_uris: Returns unicode [n] source uris for filters and crowding, from what the caller holds (an opened
        VisualMemory keeps them, so a purge of its version's files cannot fail them); None reads them from
        ``shard_dirs``.
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
    metadata: Callable[[], Any] | None = None
    shard_infos: tuple[ShardInfo, ...] = ()
    verify: bool = True
    read_uris: Callable[[], np.ndarray] | None = None
    _derived: _DerivedRows = dataclasses.field(default_factory=_DerivedRows, repr=False)

    @classmethod
    def load(cls, root: str, info: ShardInfo | Sequence[ShardInfo], *, forgotten: np.ndarray | None = None,
             entry_weights: tuple[np.ndarray, np.ndarray] | None = None, with_uris: bool = False,
             class_names: Sequence[str] = (), metadata: Any | None = None, verify: bool = True) -> LoadedShard:
        """Loads a main or delta shard, or a `memory.store.shard.search_units` unit of shards searched as one index.

        Args:
          root: Memory root.
          info: The shard (from `searchable_shards(manifest)`), or a unit's shards in order.
          forgotten: The version's tombstoned ids (`load_forgotten`); rows with these ids are skipped.
          entry_weights: The version's (sorted ids, weights) (`load_entry_weights`), or None for an
            unweighted memory.
          with_uris: Load the rows' source uris now, and return each hit's (re-ranking).
          class_names: The memory's class names, for label filters.
          metadata: The version's `memory.store.metadata.read_metadata` table, for metadata filters and
            crowding.
          verify: Check every shard file loaded, now and later, against the manifest (memory.store.integrity:
            `ShardCorruptError` names the shard and the file); False accepts the risk of serving altered files.
        """
        infos = [info] if isinstance(info, ShardInfo) else list(info)
        dirs = tuple(storage.join(root, i.path) for i in infos)
        # The embeddings live in the index only.
        entries = [read_shard_entries(d, i, verify=verify) for d, i in zip(dirs, infos)]
        ids = np.concatenate([e.ids for e in entries])
        dead = None
        if forgotten is not None and len(forgotten) and ids.size:
            dead = np.isin(ids, np.asarray(forgotten, dtype=str))
        return cls.of_rows("+".join(i.name for i in infos), load_unit_index(dirs, infos, verify=verify), ids,
                           np.concatenate([e.labels for e in entries]).astype(np.int32), dead=dead,
                           weights=None if entry_weights is None else row_weights(entry_weights, ids),
                           shard_dirs=dirs, uris=np.concatenate([e.uris for e in entries]) if with_uris else None,
                           class_names=class_names, metadata=None if metadata is None else lambda: metadata,
                           shard_infos=infos, verify=verify)

    @classmethod
    def of_rows(cls, name: str, index: ShardIndex | None, ids: np.ndarray, labels: np.ndarray, *,
                dead: np.ndarray | None = None, weights: np.ndarray | None = None, shard_dirs: Sequence[str] = (),
                uris: np.ndarray | None = None, class_names: Sequence[str] = (),
                metadata: Callable[[], Any] | None = None, shard_infos: Sequence[ShardInfo] = (),
                verify: bool = True, read_uris: Callable[[], np.ndarray] | None = None) -> LoadedShard:
        """A unit over rows its caller has read (VisualMemory reads every shard's entry table at once).

        ``dead`` may be all False (then it is dropped: the unit searches as one without forgotten rows); the
        other arguments are the attributes of the same names.
        """
        return cls(name=name, index=index, ids=ids, labels=labels,
                   dead=None if dead is None or not dead.any() else dead, weights=weights,
                   shard_dirs=tuple(shard_dirs), uris=uris, class_names=tuple(class_names), metadata=metadata,
                   shard_infos=tuple(shard_infos), verify=verify, read_uris=read_uris)

    def with_index(self, index: ShardIndex | None) -> LoadedShard:
        """This unit searched with another index over the same rows (memory.search.tuning.tuned_index); what it
        derived from its rows (brute-force indices over admitted rows, filter masks, groups) is shared."""
        return dataclasses.replace(self, index=index)

    @property
    def live_rows(self) -> int:
        """Rows a search can return: all, less the forgotten ones."""
        return int(self.ids.size) - (0 if self.dead is None else int(self.dead.sum()))

    def _live_index(self, key: str, excluded: np.ndarray) -> tuple[ShardIndex | None, np.ndarray]:
        derived = self._derived
        with derived.lock:
            if key not in derived.live:
                if not self.shard_dirs:
                    raise ValueError(f"shard {self.name}: a query needs the brute-force search over the live rows, "
                                     "which reads the shard's embeddings; give the unit its shard_dirs")
                from memory.store.shard import read_shard_data  # pylint: disable=g-import-not-at-top
                if key != "dead" and len(derived.live) >= FILTER_INDEX_CACHE:  # Bounded: filters can be many.
                    del derived.live[next(kk for kk in derived.live if kk != "dead")]
                # Read again for each new exclusion, not kept: the embeddings would double the unit's footprint.
                parts = [read_shard_data(d, i, verify=self.verify).embeddings for d, i in self._shards()]
                derived.live[key] = build_live_index(parts[0] if len(parts) == 1 else np.concatenate(parts), excluded)
            return derived.live[key]

    def _shards(self) -> list[tuple[str, ShardInfo | None]]:
        """(directory, manifest entry or None) of each of the unit's shards, for reads after loading."""
        infos = self.shard_infos or (None,) * len(self.shard_dirs)
        return list(zip(self.shard_dirs, infos))

    def attributes(self) -> RowAttributes:
        """What filters and crowding read of this unit's rows (one instance, so what it derives is kept)."""
        derived = self._derived
        with derived.lock:
            if derived.attributes is None:
                derived.attributes = RowAttributes(self.labels, self.class_names, self._row_uris,
                                                   self._metadata_values, ids=self.ids)
            return derived.attributes

    def _row_uris(self) -> np.ndarray:
        if self.uris is not None:
            return self.uris
        if self.read_uris is not None:
            uris = self.read_uris()
        elif not self.shard_dirs:
            raise ValueError(f"shard {self.name}: uri filters and crowding need the uris; give the unit its "
                             "shard_dirs or its uris")
        else:  # Only the entry tables are read (not the embeddings).
            uris = np.concatenate([read_shard_entries(d, i, verify=self.verify).uris for d, i in self._shards()])
        if uris.shape != self.ids.shape:
            raise ManifestError(f"shard {self.name}: {self.shard_dirs} hold {uris.shape} uris for {self.ids.size} "
                                "entries; rebuild the memory")
        return uris

    def _metadata_values(self, column: str) -> np.ndarray:
        table = None if self.metadata is None else self.metadata()
        if table is None:
            raise ValueError(f"shard {self.name}: this memory version has no metadata columns, so nothing can "
                             f"select on {column!r}; attach some with `vmem metadata`")
        return table.values(column, self.ids)

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
        """Top-k live rows of this unit for each (normalised here) query; safe to call from several threads.

        Forgotten rows are skipped with a bounded over-fetch, and queries left short by it are searched by
        brute force over the live rows (`search_live_rows`): for a brute-force unit, exactly the top-k of
        the unit without the forgotten rows. ``filters`` (one per query, None = unfiltered) exclude rows the
        same way (memory.search.filters); ``crowding`` returns this unit's crowded top-k with each hit's group
        (so `merge_partials(..., max_per_group=c)` crowds the union exactly).
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

            def fetch(rows, n):
                return self._rows(q[rows], n, None if filters is None else [filters[i] for i in rows])
            local, dist = crowded_search(fetch, q.shape[0], k, lambda rows: row_groups[rows],
                                         crowding.max_per_group, self.live_rows)
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
