"""Search every (routed) shard for batches of query embeddings and merge their top-K exactly: the Beam stages
behind `vmem evaluate` and `vmem prune`. Each unit is searched by memory.search.shard_search.LoadedShard and the
partial answers merged by its `merge_partials`: the searcher and merge `VisualMemory.search` runs.

    queries | SearchMemory(root, manifest, k=100)   # -> (query id, QueryNeighbors)

The shuffle join (SearchShards | MergeNeighbors): query batches fan out to the search units
(memory.store.shard.search_units), grouped by unit so each is loaded once by the one worker that searches every
batch routed to it. Each unit answers a whole batch (the queries of it that were routed there), keyed by the
batch, and the partial answers of one batch merge as batches: one exact merge per batch and unit instead of one
per query and unit, and a few hundred shuffled elements per 10,000 queries instead of one per query and unit.
Only the merged batch is split into one element per query. The broadcast join (SearchBroadcastFn), for memories
small enough for every worker to hold: the same routing, unit searches and merge, run where each batch is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
from typing import NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from memory.search.filters import Crowding, QueryFilter
from memory.store.manifest import Manifest
from memory.store.metadata import read_metadata
from memory.search.routing import read_router, search_mask
from memory.store.shard import search_units
from memory.search.shard_search import (LoadedShard, PartialTopK, load_entry_weights, load_forgotten, merge_partials,
                                 one_thread_blas, searchable_shards)
from memory.search.setting import SearchSetting, tuned_index
from pipelines.runner import worker_pool_threads

_NAMESPACE = "visual_memory"


class QueryBatch(NamedTuple):
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    uris: tuple[str, ...]
    embeddings: np.ndarray
    filters: tuple[dict | None, ...] | None = None  # memory.search.filters.QueryFilter.to_dict() per query, or None.

    def take(self, rows: np.ndarray) -> QueryBatch:
        return QueryBatch(tuple(self.ids[i] for i in rows), tuple(self.labels[i] for i in rows),
                          tuple(self.uris[i] for i in rows), self.embeddings[rows],
                          None if self.filters is None else tuple(self.filters[i] for i in rows))


class QueryNeighbors(NamedTuple):
    """One query's true class name, source uri and (partial or merged) neighbours (a 1-row PartialTopK)."""
    label: str
    uri: str
    neighbors: PartialTopK


class BatchNeighbors(NamedTuple):
    """Some queries of one batch (ids, true class names, uris) and their neighbours, one PartialTopK row each."""
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    uris: tuple[str, ...]
    neighbors: PartialTopK

    def queries(self):
        """(query id, QueryNeighbors) per query."""
        return [(qid, QueryNeighbors(self.labels[i], self.uris[i], self.neighbors.row(i)))
                for i, qid in enumerate(self.ids)]


def merge_batch_neighbors(parts: Sequence[BatchNeighbors], k: int, *,
                          max_per_group: int | None = None) -> BatchNeighbors:
    """Exact per-query merge of partial answers for queries of one batch (each part may cover some of them).

    A query's rows are matched by id; the result covers every query any part covers, in first-seen order.
    Associative and order-independent in the neighbours (`merge_partials`), so Beam may combine in any grouping.
    """
    if len(parts) == 1:
        return parts[0]
    position: dict[str, int] = {}
    ids, labels, uris = [], [], []
    for part in parts:
        for i, qid in enumerate(part.ids):
            if qid not in position:
                position[qid] = len(ids)
                ids.append(qid)
                labels.append(part.labels[i])
                uris.append(part.uris[i])
    rows = [np.fromiter((position[q] for q in p.ids), np.int64, len(p.ids)) for p in parts]
    merged = merge_partials([p.neighbors for p in parts], k, rows=rows, num_queries=len(ids),
                            max_per_group=max_per_group)
    return BatchNeighbors(tuple(ids), tuple(labels), tuple(uris), merged)


class SearchShardFn(beam.DoFn):
    """(unit, [(batch key, QueryBatch)]) -> (batch key, BatchNeighbors) with this unit's top-K per query.

    The input is grouped by unit, so each unit arrives exactly once (with every query batch routed to it):
    it is loaded here, for its one key, and released when the key is done. A ``Shared`` handle would not
    load it less often (no second element for the same unit ever comes), and would keep the last unit of the
    job alive in the worker (Shared's keep-alive) and, holding one object per handle, evict it as soon as
    another thread acquired another unit.

    The batches are searched on ``threads`` threads (ScaNN releases the GIL; numpy's BLAS is held at one
    thread meanwhile), at most 2 x ``threads`` in flight, answers in input order: after the shuffle barrier
    the unit's search is all the local runner does, on one thread otherwise. Filtered and crowded batches
    share the pool (`LoadedShard.search` builds what it derives from its rows once, under a lock).
    """

    def __init__(self, root: str, manifest: Manifest, k: int, *, crowding: Crowding | None = None,
                 with_uris: bool = False, with_metadata: bool = False, setting: SearchSetting | None = None,
                 units: Sequence[tuple[int, ...]] | None = None, threads: int | None = None, verify: bool = True):
        self._root = root
        self._manifest = manifest
        # Check each shard file the worker loads against the manifest (memory.store.integrity).
        self._verify = verify
        # Main and delta shards; tombstoned (forgotten) rows are skipped inside LoadedShard.search, and each
        # hit carries its entry weight when the version has soft-pruning weights. Each key is a search unit
        # (memory.store.shard.search_units): one shard, or shards built from one index template searched as one.
        self._infos = searchable_shards(manifest)
        self._units = [(s,) for s in range(len(self._infos))] if units is None else [tuple(u) for u in units]
        self._k = k
        self._crowding = crowding
        self._with_uris = with_uris
        self._with_metadata = with_metadata
        self._setting = setting  # The memory's tuned leaves / re-rank depth (`vmem tune`), if any.
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"search threads must be an int >= 1, got {threads!r}")
        self._threads = threads
        self._forgotten = None
        self._entry_weights = None
        self._metadata = None
        self._pool = None
        self._in_flight = 0
        self._searched = Metrics.counter(_NAMESPACE, "query_shard_searches")

    def setup(self):
        # Tombstones and weights can hold millions of ids: read once per DoFn instance on the worker (instances
        # are reused across bundles), never pickled into the graph.
        self._forgotten = load_forgotten(self._root, self._manifest)
        self._entry_weights = load_entry_weights(self._root, self._manifest)
        if self._with_metadata:
            self._metadata = read_metadata(self._root, self._manifest)
        threads = self._threads or worker_pool_threads()
        if threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vmem-shard")
        self._in_flight = 2 * threads

    def search(self, shard: LoadedShard, batch: QueryBatch) -> PartialTopK:
        """The unit's top-K for the batch's queries (their filters and the crowding applied)."""
        filters = None if batch.filters is None else [
            None if f is None else QueryFilter.from_dict(f) for f in batch.filters]
        return shard.search(batch.embeddings, self._k, filters=filters, crowding=self._crowding)

    @property
    def k(self) -> int:
        return self._k

    @property
    def num_units(self) -> int:
        return len(self._units)

    def search_routes(self, shards: Sequence[LoadedShard],
                      routes: Sequence[tuple[int, QueryBatch]]) -> list[BatchNeighbors]:
        """Each (unit, batch) route's answer from ``shards[unit]``, the units on the pool when there is one."""
        answer = lambda route: self.search(shards[route[0]], route[1])  # noqa: E731
        with one_thread_blas:
            partials = list(self._pool.map(answer, routes) if self._pool and len(routes) > 1 else map(answer, routes))
        out = []
        for (_, batch), partial in zip(routes, partials):
            self._searched.inc(len(batch.ids))
            out.append(BatchNeighbors(batch.ids, batch.labels, batch.uris, partial))
        return out

    def _answers(self, shard: LoadedShard, keyed_batches):
        """(key, batch, partial) per batch, in input order; searched on the pool when there is one."""
        pending = collections.deque()  # (key, batch, future of its partial), oldest first.

        def oldest():
            key, batch, future = pending.popleft()
            return key, batch, future.result()
        for key, batch in keyed_batches:
            if self._pool is None:
                yield key, batch, self.search(shard, batch)
                continue
            pending.append((key, batch, self._pool.submit(self.search, shard, batch)))
            while len(pending) > self._in_flight or (pending and pending[0][2].done()):
                yield oldest()
        while pending:
            yield oldest()

    def load_unit(self, unit: int) -> LoadedShard:
        """Search unit ``unit`` loaded (and tuned, with a setting) for this DoFn's searches."""
        info = [self._infos[s] for s in self._units[unit]]
        shard = LoadedShard.load(self._root, info, forgotten=self._forgotten, entry_weights=self._entry_weights,
                                 with_uris=self._with_uris, class_names=self._manifest.class_names,
                                 metadata=self._metadata, verify=self._verify)
        if self._setting is not None and shard.index is not None:
            shard = shard.with_index(tuned_index(shard.index, self._setting.leaves_fraction, self._setting.reorder))
        return shard

    def process(self, element):
        unit, keyed_batches = element
        shard = self.load_unit(unit)
        with one_thread_blas:
            for key, batch, partial in self._answers(shard, keyed_batches):
                self._searched.inc(len(batch.ids))
                yield key, BatchNeighbors(batch.ids, batch.labels, batch.uris, partial)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class _FanOutFn(beam.DoFn):
    """QueryBatch -> (unit, (batch key, QueryBatch of the queries that search that unit)).

    Hash-sharded memories send every batch to every non-empty unit; a partition-routed memory sends each
    query to the main shards its router picks (memory.search.routing.search_mask) and to every delta shard. The batch
    key (its first query's id) tells MergeNeighbors which partial answers belong to one batch.
    """

    def __init__(self, root: str, manifest: Manifest, probes: int | None, ratio: float | None = None,
                 units: Sequence[tuple[int, ...]] | None = None):
        self._root = root
        self._manifest = manifest
        self._probes = probes
        self._ratio = ratio
        self._router = None
        counts = [s.count for s in searchable_shards(manifest)]
        units = [(s,) for s in range(len(counts))] if units is None else units
        # A routed memory's units are its shards (search_units), so the router's shard mask indexes them.
        self._live = np.asarray([sum(counts[s] for s in unit) > 0 for unit in units], dtype=bool)
        self._routed = Metrics.counter(_NAMESPACE, "query_shard_routes")

    def setup(self):
        # The router file (centroids) is read once per worker, not pickled into the graph.
        self._router = read_router(self._root, self._manifest)

    def routes(self, batch: QueryBatch) -> list[tuple[int, QueryBatch]]:
        """(unit, the batch's queries that search it) per unit any of them searches."""
        visit = search_mask(self._router, batch.embeddings, self._live, probes=self._probes, ratio=self._ratio)
        out = []
        for s in np.flatnonzero(visit.any(axis=0)).tolist():
            rows = np.flatnonzero(visit[:, s])
            self._routed.inc(int(rows.size))
            out.append((s, batch if rows.size == len(batch.ids) else batch.take(rows)))
        return out

    def process(self, batch: QueryBatch):
        key = batch.ids[0]
        for s, part in self.routes(batch):
            yield s, (key, part)


class SearchShards(beam.PTransform):
    """EmbeddedImage queries -> (batch key, BatchNeighbors) once per search unit a batch's queries search.

    Every non-empty unit for a hash-sharded memory; the routed main shards and every delta shard for a
    partition-routed one (``route_probes`` nearest centroids, or distance-ratio routing with ``route_ratio``;
    neither -> the router's default probes). ``search_threads``: threads each worker searches a unit's batches
    on (default `pipelines.runner.worker_pool_threads`). ``verify``: each worker checks the shard files it loads
    against the manifest (memory.store.integrity); False accepts the risk of searching altered files.
    """

    def __init__(self, root: str, manifest: Manifest, *, k: int, batch_size: int = 256,
                 route_probes: int | None = None, route_ratio: float | None = None,
                 default_filter: QueryFilter | None = None,
                 query_filters: dict[str, dict] | None = None, crowding: Crowding | None = None,
                 with_uris: bool = False, setting: SearchSetting | None = None, search_threads: int | None = None,
                 verify: bool = True):
        super().__init__()
        self._verify = verify
        self._root = root
        self._manifest = manifest
        self._k = k
        self._batch_size = batch_size
        self._route_probes = route_probes
        self._route_ratio = route_ratio
        self._default = None if default_filter is None else default_filter.to_dict()
        self._query_filters = query_filters or {}
        self._crowding = crowding
        self._setting = setting
        self._search_threads = search_threads
        self._with_uris = with_uris or crowding is not None or default_filter is not None or bool(query_filters)

    def expand(self, queries):
        fan_out, search = self.stage_fns()
        return (self.batches(queries)
                | "FanOutToShards" >> beam.ParDo(fan_out)
                | "GroupByShard" >> beam.GroupByKey()
                | "SearchShard" >> beam.ParDo(search))

    def batches(self, queries):
        """EmbeddedImage queries -> QueryBatch of ``batch_size`` (fewer at a bundle's end), each query's filter
        with it. Fixed, not sized by timing: a float32 distance's last bits depend on the batch it is computed
        in, and a broadcast search times its batches with the search in them, so adaptive sizes differed from
        run to run (and between runners) where a shuffle's did not."""
        default, per_query = self._default, self._query_filters
        filtered = default is not None or bool(per_query)
        return (queries
                | "BatchQueries" >> beam.BatchElements(min_batch_size=self._batch_size,
                                                       max_batch_size=self._batch_size)
                | "ToQueryBatch" >> beam.Map(lambda qs: QueryBatch(
                    tuple(q.id for q in qs), tuple(q.label for q in qs), tuple(q.uri for q in qs),
                    np.stack([q.embedding for q in qs]),
                    tuple(per_query.get(q.id, default) for q in qs) if filtered else None)))

    def stage_fns(self) -> tuple[_FanOutFn, SearchShardFn]:
        """The router of batches to search units, and the searcher of one unit."""
        filtered = self._default is not None or bool(self._query_filters)
        meta = filtered or (self._crowding is not None and self._crowding.by.startswith("meta:"))
        # The units VisualMemory.open searches, so the same answers.
        units = search_units(self._root, self._manifest, verify=self._verify)
        return (_FanOutFn(self._root, self._manifest, self._route_probes, self._route_ratio, units=units),
                SearchShardFn(self._root, self._manifest, self._k, crowding=self._crowding, with_uris=self._with_uris,
                              with_metadata=meta and self._manifest.metadata is not None, setting=self._setting,
                              units=units, threads=self._search_threads, verify=self._verify))


class _MergeBatchFn(beam.CombineFn):
    """Exact merge of a batch's per-unit partial answers (associative: partial combining is safe)."""

    def __init__(self, k: int, max_per_group: int | None = None):
        self._k = k
        self._max_per_group = max_per_group

    def create_accumulator(self):
        return None

    def add_input(self, acc, value: BatchNeighbors):
        return self.merge_accumulators([acc, value])

    def merge_accumulators(self, accumulators):
        present = [a for a in accumulators if a is not None]
        if not present:
            return None
        return merge_batch_neighbors(present, self._k, max_per_group=self._max_per_group)

    def extract_output(self, acc):
        return acc


class MergeNeighbors(beam.PTransform):
    """(batch key, per-unit BatchNeighbors) -> (query id, QueryNeighbors) holding each query's global top-K."""

    def __init__(self, k: int, crowding: Crowding | None = None):
        super().__init__()
        self._k = k
        self._max_per_group = None if crowding is None else crowding.max_per_group

    def expand(self, partials):
        return (partials
                | "MergeTopK" >> beam.CombinePerKey(_MergeBatchFn(self._k, self._max_per_group))
                | "PerQuery" >> beam.FlatMapTuple(lambda _, batch: batch.queries()))


class SearchJoin(enum.Enum):
    """How query batches meet the memory's search units."""
    AUTO = "auto"  # BROADCAST when the memory's vectors take at most BROADCAST_MAX_BYTES, else SHUFFLE.
    BROADCAST = "broadcast"  # Each worker loads the whole memory and searches batches where they are embedded.
    SHUFFLE = "shuffle"  # Batches are grouped by unit; each worker loads only the units it owns (SearchShards).


# Memories whose vectors (entries x dim x 4 bytes) fit this are broadcast by SearchJoin.AUTO: every worker process
# then holds one copy, and a 10,000-query evaluation of a 4,000-entry memory skips a ~0.2 GB shuffle.
BROADCAST_MAX_BYTES = 256 << 20


def memory_vector_bytes(manifest: Manifest) -> int:
    """Bytes of the float32 vectors of every searchable shard (main and delta) of ``manifest``."""
    return sum(s.count for s in searchable_shards(manifest)) * manifest.dim * 4


def resolve_join(join: SearchJoin | str, manifest: Manifest) -> SearchJoin:
    """``join`` with AUTO decided for this memory (BROADCAST when its vectors take <= BROADCAST_MAX_BYTES)."""
    try:
        join = SearchJoin(join)
    except ValueError:
        raise ValueError(f"search join {join!r}: use one of {', '.join(j.value for j in SearchJoin)}") from None
    if join is SearchJoin.AUTO:
        return SearchJoin.BROADCAST if memory_vector_bytes(manifest) <= BROADCAST_MAX_BYTES else SearchJoin.SHUFFLE
    return join


class _LoadedUnits:
    """Every search unit of one memory version, loaded: what a worker of a broadcast search holds (an object:
    Beam's Shared handle keeps a weak reference to what it shares)."""

    def __init__(self, shards: Sequence[LoadedShard]):
        self.shards = list(shards)


class SearchBroadcastFn(beam.DoFn):
    """QueryBatch -> (query id, QueryNeighbors): every unit the batch routes to searched here, merged exactly.

    The broadcast join: the worker loads every unit once (a ``Shared`` handle: one copy per worker process,
    whatever its threads) and answers batches where they are embedded, so searching overlaps embedding and no
    query crosses a shuffle. Routing, each unit's search and the merge are the shuffle join's own
    (`_FanOutFn.routes`, `SearchShardFn.search_routes`, `merge_batch_neighbors`), so the answers are the same.
    """

    def __init__(self, fan_out: _FanOutFn, search: SearchShardFn, max_per_group: int | None = None):
        self._fan_out = fan_out
        self._search = search
        self._max_per_group = max_per_group
        self._shared = Shared()
        self._units = None

    def setup(self):
        self._fan_out.setup()
        self._search.setup()
        search = self._search
        self._units = self._shared.acquire(
            lambda: _LoadedUnits([search.load_unit(u) for u in range(search.num_units)]))

    def process(self, batch: QueryBatch):
        parts = self._search.search_routes(self._units.shards, self._fan_out.routes(batch))
        if parts:  # None when no unit holds a live row: unanswered, as the shuffle join leaves them.
            yield from merge_batch_neighbors(parts, self._search.k, max_per_group=self._max_per_group).queries()

    def teardown(self):
        self._search.teardown()


class SearchMemory(beam.PTransform):
    """EmbeddedImage queries -> (query id, QueryNeighbors) holding each query's global top-K.

    ``join``: SHUFFLE runs SearchShards | MergeNeighbors (each worker loads only the units routed batches are
    grouped under: the memory never has to fit one worker); BROADCAST searches every batch where it was
    embedded (`SearchBroadcastFn`); AUTO picks BROADCAST for memories whose vectors take at most
    BROADCAST_MAX_BYTES. Both give the same neighbours. Other arguments are SearchShards'.
    """

    def __init__(self, root: str, manifest: Manifest, *, k: int, join: SearchJoin | str = SearchJoin.AUTO,
                 **search_args):
        super().__init__()
        self._join = resolve_join(join, manifest)
        self._crowding = search_args.get("crowding")
        self._k = k
        self._shards = SearchShards(root, manifest, k=k, **search_args)

    @property
    def join(self) -> SearchJoin:
        return self._join

    def expand(self, queries):
        if self._join is SearchJoin.SHUFFLE:
            return (queries
                    | "SearchShards" >> self._shards
                    | "MergeNeighbors" >> MergeNeighbors(self._k, self._crowding))
        fan_out, search = self._shards.stage_fns()
        max_per_group = None if self._crowding is None else self._crowding.max_per_group
        return (self._shards.batches(queries)
                | "SearchBroadcast" >> beam.ParDo(SearchBroadcastFn(fan_out, search, max_per_group)))
