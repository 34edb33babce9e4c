"""The re-index job's worker stages: scan the source shards, spill their live rows, rebuild target shards.

`ScanSourceFn` summarises each main shard from its ids (and spills every delta shard's live rows),
`make_plan` turns the summaries into the plan (memory.store.compaction), `ReadLiveRowsFn` spills the live
rows of the main shards the plan reads, and `WriteTargetShardFn` writes one rebuilt shard from its spill
files. Each worker process reads the tombstone list once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from memory import storage
from memory.index.template import local_template
from memory.search.routing import read_router
from memory.store import compaction
from memory.store import shard as shard_io
from memory.store.manifest import ManifestError, ShardInfo
from memory.store.mutations import in_sorted, read_forgotten
from memory.store.shard import ShardData
from memory.store.sharding import shard_for_id
from pipelines.records import EntryBlock
from pipelines.reindex.plan import ReindexError, ReindexJob
from pipelines.stages.write import BLOCK_ROWS, SpillBlocks, read_spills

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
SUMMARY = "summary"  # Tag of the per-shard ShardSummary output.

__all__ = ["ReadLiveRowsFn", "SUMMARY", "ScanSourceFn", "WriteTargetShardFn", "make_plan"]


_FORGOTTEN_CACHE: dict = {}
_FORGOTTEN_LOCK = threading.Lock()


def _forgotten_of(job: ReindexJob) -> np.ndarray:
    """The version's tombstoned ids, read once per worker process (shared by its DoFns and threads)."""
    ref = job.manifest.forgotten
    if ref is None:
        return np.zeros((0,), "<U1")
    key = (job.root, ref.path, ref.checksum)
    with _FORGOTTEN_LOCK:
        if key not in _FORGOTTEN_CACHE:
            _FORGOTTEN_CACHE.clear()  # One tombstone list per process: the one of the job running here.
            _FORGOTTEN_CACHE[key] = read_forgotten(job.root, job.manifest)
        return _FORGOTTEN_CACHE[key]


def _given_targets(block: EntryBlock, targets: np.ndarray) -> np.ndarray:
    return targets


def _read_source(job: ReindexJob, info: ShardInfo) -> ShardData:
    data = shard_io.read_shard_data(storage.join(job.root, info.path), info, verify=job.verify)
    if data.ids.shape != (info.count,):
        raise ManifestError(f"shard {info.name}: {data.ids.shape[0]} rows stored, the manifest says {info.count}")
    return data


class _SpillLiveRowsFn(SpillBlocks):
    """Base of the DoFns that read a source shard and spill its live rows to the target shards' files.

    Rows travel as EntryBlocks of at most BLOCK_ROWS rows into pipelines.stages.write's SpillBlocks, which writes them
    to ``job.spill_dir`` and emits ``(target shard, spill path)``; ``labels`` hold label indices here.
    """

    def __init__(self, job: ReindexJob):
        super().__init__(job.spill_dir, _given_targets, job.spill_rows)
        self._job = job
        self._rows = Metrics.counter(_NAMESPACE, "reindex_rows_read")
        self._dropped = Metrics.counter(_NAMESPACE, "reindex_forgotten_rows_dropped")

    def _spill(self, info: ShardInfo, data: ShardData, keep: np.ndarray, targets: np.ndarray):
        """Spills the rows of ``data`` where ``keep``, row i to target ``targets[i]``."""
        self._rows.inc(len(data))
        self._dropped.inc(int((~keep).sum()))
        rows = np.flatnonzero(keep)
        for start in range(0, rows.size, BLOCK_ROWS):
            r = rows[start:start + BLOCK_ROWS]
            block = EntryBlock(ids=data.ids[r].astype(str), labels=np.asarray(data.labels[r], np.int32),
                               uris=data.uris[r].astype(str), embeddings=data.embeddings[r])
            yield from SpillBlocks.process(self, block, targets[r])
        _LOG.info("reindex: read %s (%d rows, %d forgotten dropped)", info.name, len(data), int((~keep).sum()))


class ScanSourceFn(_SpillLiveRowsFn):
    """(main shard index or None, ShardInfo) -> its ShardSummary (tagged SUMMARY); delta shards also spill.

    A main shard: reads its ids only (whether it is read in full depends on the plan). A delta shard (always
    a source): reads it, computes every row's target shard once -- ``shard_for_id(id, num_shards)``, or the
    router's shard -- and from that one computation both spills its live rows and summarises its targets,
    so the plan and the rows agree row for row.
    """

    def __init__(self, job: ReindexJob):
        super().__init__(job)
        self._router = None
        self._folded = Metrics.counter(_NAMESPACE, "reindex_delta_rows_folded")

    def setup(self):
        self._router = read_router(self._job.root, self._job.manifest)  # Small (centroids); None when hashed.

    def process(self, element):
        index, info = element
        job = self._job
        forgotten = _forgotten_of(job)
        if index is not None:
            ids = np.zeros((0,), "<U1")
            if info.count:
                ids = shard_io.read_shard_ids(storage.join(job.root, info.path), info, verify=job.verify)
                if ids.shape != (info.count,):
                    raise ManifestError(f"shard {info.name}: {info.path} holds {ids.shape[0]} ids, the manifest "
                                        f"says {info.count}")
            yield beam.pvalue.TaggedOutput(SUMMARY, compaction.summarize_main_shard(
                info.path, index, ids, forgotten, num_main=len(job.manifest.shards), routed=self._router is not None))
            return
        data = _read_source(job, info) if info.count else None
        if data is None or not len(data):
            yield beam.pvalue.TaggedOutput(SUMMARY, compaction.ShardSummary(path=info.path, rows=0))
            return
        ids = data.ids.astype(str)
        if self._router is None:
            targets = np.fromiter((shard_for_id(i, job.num_shards) for i in ids.tolist()), np.int64, ids.size)
        else:
            targets = np.asarray(self._router.assign(data.embeddings), np.int64)
        self._folded.inc(len(data))
        yield beam.pvalue.TaggedOutput(SUMMARY, compaction.summarize_delta_shard(info.path, ids, targets, forgotten))
        yield from self._spill(info, data, ~in_sorted(forgotten, ids), targets)


class ReadLiveRowsFn(_SpillLiveRowsFn):
    """(main shard index, ShardInfo), plan -> (target, spill path) of its live rows, if the plan reads it."""

    def process(self, element, plan: compaction.ReindexPlan):
        index, info = element
        if index is None or info not in plan.sources:
            return
        job = self._job
        data = _read_source(job, info)
        ids = data.ids.astype(str)
        keep = ~in_sorted(_forgotten_of(job), ids)
        if job.manifest.router is None:
            targets = np.fromiter((shard_for_id(i, plan.num_shards) for i in ids.tolist()), np.int64, ids.size)
        else:  # Routed main rows stay where they are.
            targets = np.full(ids.size, index, np.int64)
        rebuilt = set(plan.rebuilt)
        bad = sorted(set(np.unique(targets[keep]).tolist()) - rebuilt)
        if bad:  # plan_from_summaries verified the hash partition; this would lose entries.
            raise ReindexError(f"shard {info.name} holds live rows of target shard(s) {bad}, which the plan reuses; "
                               "nothing was published (re-run with --target-shard-size to rebuild every shard)")
        yield from self._spill(info, data, keep, targets)


def make_plan(summaries: list, job: ReindexJob) -> compaction.ReindexPlan:
    """The plan from every source shard's ShardSummary (compaction.plan_from_summaries), logged."""
    plan = compaction.plan_from_summaries(job.manifest, summaries, num_shards=job.num_shards)
    _LOG.info("reindex: plan for version %d -> %d: %d shards, rebuild %s, reuse %s, %d forgotten rows to drop, %d "
              "delta rows to fold%s", job.version, job.new_version, plan.num_shards, list(plan.rebuilt),
              list(plan.reused), plan.forgotten_rows, plan.delta_rows, f" ({plan.note})" if plan.note else "")
    return plan


class WriteTargetShardFn(beam.DoFn):
    """(target index, [spill paths]), plan -> (target index, ShardInfo) after writing the new shard."""

    def __init__(self, job: ReindexJob):
        self._job = job
        self._written = Metrics.counter(_NAMESPACE, "reindex_shards_rebuilt")

    def process(self, element, plan: compaction.ReindexPlan):
        index, paths = element
        job = self._job
        block = read_spills([p for p in paths if p is not None], dim=job.manifest.dim)
        block = block.take(np.argsort(block.ids, kind="stable"))  # The order write_shard stores.
        # An empty target (every row forgotten) becomes an empty shard; duplicate ids fail in write_shard.
        data = ShardData(ids=block.ids, labels=np.asarray(block.labels, np.int32), uris=block.uris,
                         embeddings=block.embeddings.reshape(-1, job.manifest.dim))
        del block
        name, rel = job.target_path(plan, index)
        start = time.perf_counter()
        # A hash memory built with an index template keeps it: its rebuilt tree+AH shards still search as one.
        template = job.manifest.build_config.get("index_template") if job.manifest.router is None else None
        with contextlib.ExitStack() as stack:
            template_dir = stack.enter_context(local_template(job.root, template)) if template else None
            info = shard_io.write_shard(storage.join(job.root, rel), data, index_config=job.index_config, name=name,
                                        root_relative_path=rel, template_dir=template_dir)
        self._written.inc()
        _LOG.info("reindex: rebuilt %s: %d entries, index %s, %.1fs -> %s", name, info.count, info.index_kind,
                  time.perf_counter() - start, rel)
        yield index, info
