"""The re-index job: fold delta shards into the main shards and drop forgotten rows physically.

Local (in-process runner)::

    vmem reindex --memory out/fmnist-memory
    vmem reindex --memory out/fmnist-memory --if-needed --delta-threshold 0.1 --forgotten-threshold 0.1
    python pipelines/reindex.py --memory out/fmnist-memory --target-shard-size 50000

Local with two worker processes::

    vmem reindex --memory out/fmnist-memory --direct_running_mode=multi_processing --direct_num_workers=2

Dataflow (ship the code with setup.py, as for ``vmem build``; scheduled runs: docs/scheduling.md)::

    vmem reindex --memory gs://BUCKET/memories/in1k --if-needed \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

The graph::

    ListSourceShards ─► SpreadSources ─┬► ScanSources ─┬► summaries ─► CollectSummaries ─► Plan (side input)
                                       │               └► delta rows, spilled ───┐
                                       └► ReadLiveRows ─► main rows, spilled ────┤
    RebuiltTargets ──────────────────────────────────────────────────────────────┴► GroupByTarget ─►
        WriteTargetShard ─► Publish (last, once)

Where the work happens (bounded memory on the launcher and in the graph): the launcher reads only the
latest version n (its manifest, and the version files, for a pending ``--purge-history``) and decides from
its counts alone whether a re-index is needed and the target shard count (``ceil(live / N)``, live =
ShardInfo counts minus the tombstone count). It reads no shard, no tombstone list (which can hold millions
of ids), no router and no weights file, and the DoFns carry the manifest and paths only. Workers read the
rest, each the shard it processes (one shard per element after a Reshuffle), the tombstone list once per
worker process, the router once per DoFn instance:

* ScanSources: a main shard's ids (the id column only) -> its ShardSummary (rows, forgotten rows, ids that
  hash to another shard). A delta shard (always a source) is read in full: every row's target shard is
  computed once -- ``shard_for_id(id, target count)``, or ``router.assign(embedding)`` for a partition-routed
  memory -- and that one result both feeds its summary (rows per target) and spills its live rows, so the
  plan and the rows agree row for row (recomputing a nearest centroid elsewhere could break a
  floating-point tie differently).
* Plan: the summaries (a few counts per shard) are combined into the plan (memory.store.compaction
  .plan_from_summaries): with an unchanged shard count, a main shard holding no forgotten row and receiving
  no delta row is *reused* as is (same directory); every other target shard is *rebuilt*. Counting
  forgotten rows per shard needs the ids (tombstones say which ids, not where they are stored), and so does
  verifying the hash partition, so that pass is on the workers; it reads ids, never embeddings.
* ReadLiveRows: each main shard the plan reads (changed ones; all of them when the shard count changes) is
  read, forgotten rows are dropped and live rows go to ``shard_for_id(id, target count)`` (a routed
  memory's rows stay in their shard).
* Rows never travel as per-entry elements: blocks of <= BLOCK_ROWS rows are spilled by target shard to
  files under ``shards/r{n+1:06d}-<job id>/.build-tmp/`` (pipelines.stages.write.SpillBlocks), the GroupByKey moves
  only (target, spill file) references, and the worker writing a target shard reads its spill files, holding
  one shard. Each rebuilt shard is written with the memory's IndexConfig into a NEW directory
  ``shards/r{n+1:06d}-<job id>/shard-IIIII-of-NNNNN`` (never a path a published version uses).

Known limits: each worker process holds the whole tombstone list (sorted ids, read once; a re-index is due
by default once forgotten rows pass 10% of stored rows) -- a join bucketed by id hash, like ``vmem add``'s
RejectKnownIds, would bound that too; and the publish step reads the entry weights file to drop forgotten
ids from it.

One final step publishes version n+1 (change kind ``reindex``: rebuilt and reused shard names, dropped
forgotten rows, folded delta rows) with no delta shards, no tombstones and the entry weights minus forgotten
ids, then deletes the spill files. If a forget since the last re-index asked for ``--purge-history``, the
old versions and the shard files that still hold forgotten embeddings are then deleted
(memory.store.mutations.purge_history). A shard that disagrees with the manifest (row count) fails the job on the
worker that reads it; nothing is published.

Exit status: 0 re-indexed and published; 10 nothing to do (``--if-needed`` and below both thresholds; the
reason is printed; ``--nothing-to-do-status`` changes it, e.g. 0 under a scheduler); 2 usage error (bad
flag, no memory at --memory); 1 failure, including a concurrent publish (another writer published version
n+1 first: nothing of this run is live; re-run it).

Crash safety: until the final publish nothing a version references is touched, so a re-index killed at any
step leaves the memory exactly at version n. A killed run leaves its ``shards/r{n+1:06d}-<job id>/``
directory (spill files included) behind; it is never referenced (the next run picks a new job id). After each
successful publish the job deletes such orphans: ``shards/rNNNNNN-*`` directories with NNNNNN <= the latest
version that no existing version references (a run that would publish NNNNNN can no longer do so), and the
``.build-tmp/`` spill files a run killed right after its publish left in its referenced directory. Orphans of
other jobs (``deltas/``, ``tombstones/``, ``weights/`` files of a crashed add/forget/prune) are left alone.

Anything that is not a re-index flag is passed to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import secrets
import sys
import threading
import time
from typing import Optional, Sequence

if __name__ == "__main__" and __package__ in (None, ""):
    # `python pipelines/reindex.py` (the Flex Template launcher's entry point): make the repository root
    # importable when the package is not installed, and run the module under its real name so that
    # pickled DoFns refer to `pipelines.reindex`, not `__main__`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pipelines.reindex import main as _main
    sys.exit(_main())

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from memory.store import compaction

from memory import storage
from memory.store import shard as shard_io
from memory.index.shard_index import IndexConfig
from memory.store.manifest import Manifest, ManifestError, ShardInfo, WeightsRef, sha256_checksum
from memory.store.metadata import metadata_without
from memory.store.mutations import (WEIGHTS_DIR, in_sorted, purge_history, purge_requested_since_reindex,
                                    read_entry_weights, read_forgotten)
from memory.search.routing import read_router
from memory.store.shard import ShardData
from memory.index.template import local_template
from memory.store.sharding import shard_for_id
from memory.store.versions import (ConcurrentUpdateError, checked_deletion_paths, latest_version, list_versions,
                                   publish_version, read_version, versioned_file_name)
from pipelines.records import EntryBlock
from pipelines.runner import with_default_runner
from pipelines.stages.write import BLOCK_ROWS, SPILL_DIR, SPILL_ROWS, SpillBlocks, read_spills

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOTHING_TO_DO = 10
SUMMARY = "summary"  # Tag of the per-shard ShardSummary output.

__all__ = ["EXIT_FAILURE", "EXIT_NOTHING_TO_DO", "EXIT_OK", "EXIT_USAGE", "ReindexError", "ReindexJob",
           "build_arg_parser", "build_pipeline", "main", "prepare_job", "run"]


class ReindexError(RuntimeError):
    """The re-index cannot produce a faithful new version (nothing was published)."""


class UsageError(ValueError):
    """A bad flag; exit status 2."""


class _Parser(argparse.ArgumentParser):

    def error(self, message: str):  # Raise instead of sys.exit: main returns its status.
        raise UsageError(f"{message} (see `vmem reindex --help`)")


def _bool(value: str) -> bool:
    """Flex Template parameters arrive as ``--if_needed=true``; the CLI flag has no value."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y"):
        return True
    if v in ("0", "false", "no", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``vmem reindex`` flags (each also spelled with underscores, as Flex Template parameters are)."""
    parser = _Parser(prog="vmem reindex", description=__doc__.split("\n")[0],
                     epilog="Other flags are Beam pipeline options (--runner, --project, ...). Exit status: 0 "
                            "published, 10 nothing to do, 2 usage error, 1 failure (incl. a concurrent publish).")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    parser.add_argument("--if-needed", "--if_needed", dest="if_needed", nargs="?", const=True, default=False,
                        type=_bool, help="only re-index when a threshold is exceeded, the shard count changes or a "
                                         "purge is pending; otherwise print why not and exit 10")
    parser.add_argument("--target-shard-size", "--target_shard_size", dest="target_shard_size", type=int,
                        default=None, help="entries per main shard: ceil(live / N) shards (default: keep the "
                                           "current shard count)")
    parser.add_argument("--delta-threshold", "--delta_threshold", dest="delta_threshold", type=float, default=0.1,
                        help="with --if-needed: re-index when delta rows / live entries exceeds this (default 0.1)")
    parser.add_argument("--forgotten-threshold", "--forgotten_threshold", dest="forgotten_threshold", type=float,
                        default=0.1, help="with --if-needed: re-index when forgotten rows / stored rows exceeds "
                                          "this (default 0.1)")
    parser.add_argument("--nothing-to-do-status", "--nothing_to_do_status", dest="nothing_to_do_status", type=int,
                        default=EXIT_NOTHING_TO_DO,
                        help="exit status when --if-needed finds nothing to do (default 10; 0 under a scheduler "
                             "that treats any other status as a failed launch)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.target_shard_size is not None and args.target_shard_size < 1:
        raise UsageError(f"--target-shard-size must be >= 1, got {args.target_shard_size}")
    for flag, value in (("--delta-threshold", args.delta_threshold),
                        ("--forgotten-threshold", args.forgotten_threshold)):
        if not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value} (e.g. 0.1 for 10%)")
    if not 0 <= args.nothing_to_do_status <= 255:
        raise UsageError(f"--nothing-to-do-status must be in 0..255, got {args.nothing_to_do_status}")


@dataclasses.dataclass(frozen=True)
class ReindexJob:
    """What the launcher decides from version ``manifest.version`` alone (small: no ids, no arrays).

    The per-shard work -- which rows are live, which target shard each goes to -- and the plan built from it
    (which targets are rebuilt, which reused) happen on workers (see the module docstring); the DoFns get
    this job and read what they need from ``root``.

    Attributes:
      root: Memory root.
      manifest: The version being re-indexed (n); version n+1 is published with it as parent.
      num_shards: Main shards after the re-index (compaction.target_shard_count from the manifest's counts).
      job_token: Random token naming this run's directory (two runs never share a path).
      index_config: IndexConfig for rebuilt shards (the memory's own).
      needed: Whether --if-needed would run it; reason says why (not).
      purge: Whether a forget since the last re-index asked for --purge-history.
      spill_rows: Rows per spill file (pipelines.stages.write.SPILL_ROWS; smaller in tests).
    """
    root: str
    manifest: Manifest
    num_shards: int
    job_token: str
    index_config: IndexConfig
    needed: bool
    reason: str
    purge: bool
    spill_rows: int = SPILL_ROWS

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def new_version(self) -> int:
        return self.manifest.version + 1

    @property
    def job_dir(self) -> str:
        return compaction.reindex_dir(self.new_version, self.job_token)

    @property
    def spill_dir(self) -> str:
        """Where rows bound for rebuilt shards are spilled (inside job_dir: a crashed run's orphan holds them)."""
        return storage.join(self.root, self.job_dir, SPILL_DIR)

    def target_path(self, plan: compaction.ReindexPlan, index: int) -> tuple[str, str]:
        """(name, root-relative path) of a rebuilt target shard."""
        name = plan.targets[index].name
        return name, f"{self.job_dir}/{name}"


def prepare_job(root: str, *, target_shard_size: int | None = None, delta_threshold: float = 0.1,
                forgotten_threshold: float = 0.1, job_token: str | None = None,
                spill_rows: int = SPILL_ROWS) -> ReindexJob:
    """Reads the latest version's manifest (and the small version files) and decides what it can from them.

    Launcher side: reads no shard and no tombstone, router or weights file. The shard count comes from the
    manifest's live count (ShardInfo counts minus the tombstone count); the thresholds from the same counts.

    Raises:
      ManifestError: no memory at ``root``.
      UsageError: a shard count change of a partition-routed memory (a bad --target-shard-size).
    """
    root = root.rstrip("/") or root
    n = latest_version(root)
    manifest = read_version(root, n)
    target_n = compaction.target_shard_count(manifest.total, target_shard_size=target_shard_size,
                                             current=len(manifest.shards))
    try:
        compaction.check_shard_count(manifest, target_n)
    except ValueError as e:
        raise UsageError(str(e)) from None
    purge = purge_requested_since_reindex(root)
    needed, reason = compaction.needs_reindex(manifest, delta_threshold=delta_threshold,
                                              forgotten_threshold=forgotten_threshold, target_shards=target_n,
                                              purge_requested=purge)
    token = job_token or secrets.token_hex(4)
    job = ReindexJob(root=root, manifest=manifest, num_shards=target_n, job_token=token,
                     index_config=manifest.index_config, needed=needed, reason=reason, purge=purge,
                     spill_rows=spill_rows)
    if storage.exists(storage.join(root, job.job_dir)):
        raise ReindexError(f"{storage.join(root, job.job_dir)} already exists; pick another job token")
    return job


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
    data = shard_io.read_shard_data(storage.join(job.root, info.path))
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


class _ScanSourceFn(_SpillLiveRowsFn):
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
                ids = shard_io.read_shard_ids(storage.join(job.root, info.path))
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


class _ReadLiveRowsFn(_SpillLiveRowsFn):
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


def _plan(summaries: list, job: ReindexJob) -> compaction.ReindexPlan:
    plan = compaction.plan_from_summaries(job.manifest, summaries, num_shards=job.num_shards)
    _LOG.info("reindex: plan for version %d -> %d: %d shards, rebuild %s, reuse %s, %d forgotten rows to drop, %d "
              "delta rows to fold%s", job.version, job.new_version, plan.num_shards, list(plan.rebuilt),
              list(plan.reused), plan.forgotten_rows, plan.delta_rows, f" ({plan.note})" if plan.note else "")
    return plan


class _WriteTargetShardFn(beam.DoFn):
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


def _weights_without(root: str, manifest: Manifest, forgotten: np.ndarray, new_version: int) -> WeightsRef | None:
    """The entry weights minus forgotten ids: the same ref if none was weighted, else a new weights file."""
    ref = manifest.entry_weights
    loaded = read_entry_weights(root, manifest)
    if ref is None or loaded is None:
        return None
    ids, weights = loaded
    keep = ~in_sorted(forgotten, ids)
    if keep.all():
        return ref
    if not keep.any():
        return None
    buf = io.BytesIO()
    np.savez(buf, ids=ids[keep], weights=weights[keep].astype(np.float32))
    blob = buf.getvalue()
    rel = versioned_file_name(WEIGHTS_DIR, new_version, ".npz")
    storage.write_bytes(storage.join(root, rel), blob)
    return dataclasses.replace(ref, path=rel, count=int(keep.sum()), checksum=sha256_checksum(blob))


def assemble_manifest(job: ReindexJob, plan: compaction.ReindexPlan, rebuilt: dict[int, ShardInfo]) -> Manifest:
    """The new version's content (version/parent are set by publish_version), after checking the books.

    Raises:
      ReindexError: a rebuilt shard is missing, or the new version would not hold exactly the live entries.
    """
    m = job.manifest
    missing = sorted(set(plan.rebuilt) - set(rebuilt))
    if missing:
        raise ReindexError(f"rebuilt shard(s) {missing} were not written; nothing was published")
    shards = tuple(t.reused if t.reused is not None else rebuilt[t.index] for t in plan.targets)
    stored = sum(s.count for s in shards)
    if stored != m.total:
        raise ReindexError(f"bookkeeping mismatch: version {m.version} has {m.total} live entries but the re-indexed "
                           f"shards hold {stored}; nothing was published")
    forgotten = read_forgotten(job.root, m)
    weights = _weights_without(job.root, m, forgotten, job.new_version)
    metadata = metadata_without(job.root, m, forgotten, job.new_version)
    reused = [t.name for t in plan.targets if t.reused is not None]
    rebuilt_names = [t.name for t in plan.targets if t.reused is None]
    change = {"kind": "reindex", "job": job.job_token,
              "summary": (f"re-indexed into {plan.num_shards} shards: rebuilt {len(rebuilt_names)}, reused "
                          f"{len(reused)}; dropped {plan.forgotten_rows} forgotten rows, folded {plan.delta_rows} "
                          "delta rows"),
              "rebuilt": rebuilt_names, "reused": reused, "dropped_forgotten": plan.forgotten_rows,
              "folded_delta": plan.delta_rows, "num_shards": plan.num_shards,
              "reasons": {t.name: list(t.reasons) for t in plan.targets if t.reused is None}}
    if job.purge:
        change["purge_requested"] = True
    build_config = dict(m.build_config)
    if "num_shards" in build_config:
        build_config["num_shards"] = plan.num_shards
    return dataclasses.replace(m, shards=shards, delta_shards=(), forgotten=None, entry_weights=weights,
                               metadata=metadata, build_config=build_config, change=change)


def _published_by(root: str, n: int, job_token: str) -> Manifest | None:
    """Version n if it exists and this job published it (a retried publish step), else None."""
    if n not in list_versions(root):
        return None
    m = read_version(root, n)
    return m if m.change.get("kind") == "reindex" and m.change.get("job") == job_token else None


def remove_orphans(root: str) -> list[str]:
    """Deletes ``shards/rNNNNNN-*`` directories of crashed or losing re-index runs (compaction.orphan_reindex_dirs)."""
    try:
        children = storage.list_dir(storage.join(root, compaction.REINDEX_SHARDS_DIR))
    except FileNotFoundError:
        return []
    versions = list_versions(root) or [latest_version(root)]
    referenced = {s.path for n in versions for s in read_version(root, n).all_shards}
    orphans = compaction.orphan_reindex_dirs(children, referenced_paths=referenced, latest=versions[-1])
    paths = checked_deletion_paths(root, orphans, what="the orphan re-index directories under shards/")
    for rel, path in zip(orphans, paths):
        storage.remove_tree(path)
        _LOG.info("reindex: removed orphan directory %s (a crashed or superseded re-index)", rel)
    # A published re-index killed right after its publish may have left its spill files in its (referenced)
    # directory; every writer of those directories has finished, so they are safe to delete.
    prefix = compaction.REINDEX_SHARDS_DIR + "/"
    published_dirs = {p.split("/")[1] for p in referenced if p.startswith(prefix) and p.count("/") >= 2}
    for name in sorted(set(children) & published_dirs):
        spill = storage.join(root, compaction.REINDEX_SHARDS_DIR, name, SPILL_DIR)
        if storage.exists(spill):
            storage.remove_tree(spill)
    return orphans


def publish(job: ReindexJob, plan: compaction.ReindexPlan, rebuilt: dict[int, ShardInfo]) -> Manifest:
    """Publishes version n+1 (once; a retried step recognises its own version), then purges and cleans up.

    Raises:
      ConcurrentUpdateError: another writer published version n+1 first; nothing of this run is live.
    """
    published = _published_by(job.root, job.new_version, job.job_token)
    if published is None:
        published = publish_version(job.root, assemble_manifest(job, plan, rebuilt), expected_parent=job.version)
        _LOG.info("reindex: published version %d of %s", published.version, job.root)
    storage.remove_tree(job.spill_dir)
    if job.purge:
        purged = purge_history(job.root)
        _LOG.info("reindex: purged versions %s (a forget requested --purge-history)", purged)
    remove_orphans(job.root)
    return published


class _PublishFn(beam.DoFn):

    def __init__(self, job: ReindexJob):
        self._job = job

    def process(self, unused, infos, plan):
        yield publish(self._job, plan, dict(infos)).version


def build_pipeline(p: beam.Pipeline, job: ReindexJob) -> beam.PCollection:
    """Adds the re-index graph to ``p``; returns the PCollection of the published version number."""
    m = job.manifest
    sources = (p
               # Small elements (index, ShardInfo): main shards, then delta shards (index None).
               | "ListSourceShards" >> beam.Create([(i, s) for i, s in enumerate(m.shards)]
                                                   + [(None, s) for s in m.delta_shards])
               # One shard per element: let the runner spread the reads over workers.
               | "SpreadSources" >> beam.Reshuffle())
    scanned = sources | "ScanSources" >> beam.ParDo(_ScanSourceFn(job)).with_outputs(SUMMARY, main="spills")
    plan = (scanned[SUMMARY]
            | "CollectSummaries" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(_plan, job))
    plan_side = beam.pvalue.AsSingleton(plan)
    main_spills = sources | "ReadLiveRows" >> beam.ParDo(_ReadLiveRowsFn(job), plan=plan_side)
    # Every rebuilt target gets a group even when all its rows were forgotten (it becomes an empty shard).
    seeds = plan | "RebuiltTargets" >> beam.FlatMap(lambda pl: [(t, None) for t in pl.rebuilt])
    infos = ((scanned.spills, main_spills, seeds)
             | "AllSpills" >> beam.Flatten()
             | "GroupByTarget" >> beam.GroupByKey()
             | "WriteTargetShard" >> beam.ParDo(_WriteTargetShardFn(job), plan=plan_side))
    return (p
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(_PublishFn(job), infos=beam.pvalue.AsList(infos), plan=plan_side))


def finish_pending_purge(root: str) -> list[int]:
    """Completes the purge of a re-index that published but crashed before purging (see publish).

    The latest version being a re-index whose change says ``purge_requested`` means its purge never
    published (a purge publishes a version of its own first), and purge_requested_since_reindex no longer
    sees the request behind that re-index.

    Returns:
      The purged versions ([] when no purge was pending).
    """
    root = root.rstrip("/") or root
    change = read_version(root, latest_version(root)).change
    if change.get("kind") != "reindex" or not change.get("purge_requested"):
        return []
    purged = purge_history(root)
    _LOG.info("reindex: finished the purge of an earlier re-index: purged versions %s", purged)
    return purged


def _parse(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    args, beam_args = build_arg_parser().parse_known_args(argv)
    _check_args(args)
    return args, beam_args


def _prepare(args: argparse.Namespace) -> ReindexJob:
    finish_pending_purge(args.memory)
    return prepare_job(args.memory, target_shard_size=args.target_shard_size, delta_threshold=args.delta_threshold,
                       forgotten_threshold=args.forgotten_threshold)


def execute(job: ReindexJob, beam_args: Sequence[str] = (), test_pipeline: Optional[beam.Pipeline] = None):
    """Runs the planned job to completion; returns the PipelineResult.

    Raises:
      ConcurrentUpdateError: the memory moved past version n (before the run, or another writer won the
        publish); nothing of this run is live.
    """
    latest = latest_version(job.root)
    if latest != job.version:
        raise ConcurrentUpdateError.stale(job.root, job.new_version, job.version, latest)
    _LOG.info("reindex: %s version %d -> %d: %d shards; workers read the shards, plan and write to %s", job.root,
              job.version, job.new_version, job.num_shards, job.job_dir)
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    build_pipeline(p, job)
    try:
        result = p.run()
        if result is not None:  # DataflowRunner --dry_run=True returns None.
            result.wait_until_finish()
    except Exception as e:  # pylint: disable=broad-except  # Runners wrap worker errors in their own types.
        latest = latest_version(job.root)
        if latest > job.version and _published_by(job.root, job.new_version, job.job_token) is None:
            raise ConcurrentUpdateError.stale(job.root, job.new_version, job.version, latest) from e
        raise
    return result


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None):
    """Parses ``argv`` (re-index flags + Beam flags), plans, builds the graph and runs it to completion.

    Returns:
      The PipelineResult, or None when ``--if-needed`` found nothing to do.
    """
    args, beam_args = _parse(argv)
    job = _prepare(args)
    if args.if_needed and not job.needed:
        _LOG.info("reindex: %s: %s", job.root, job.reason)
        return None
    return execute(job, beam_args, test_pipeline)


def _report(job: ReindexJob, seconds: float) -> dict:
    published = _published_by(job.root, job.new_version, job.job_token)
    if published is None:  # A runner that only submitted the job (e.g. a template launch).
        return {"memory": job.root, "submitted": True, "version": job.new_version}
    change = published.change
    purged = []
    for n in list_versions(job.root):
        m = read_version(job.root, n)
        if m.parent == job.new_version and m.change.get("kind") == "purge":
            purged = m.change.get("purged_versions", [])
    return {"memory": job.root, "version": published.version, "parent": published.parent,
            "rebuilt": change["rebuilt"], "reused": change["reused"],
            "dropped_forgotten": change["dropped_forgotten"], "folded_delta": change["folded_delta"],
            "num_shards": change["num_shards"], "live_entries": published.total, "purged_versions": purged,
            "seconds": round(seconds, 3)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``vmem reindex``; returns the exit status (0 published, 10 nothing to do, 2 usage, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _LOG.setLevel(logging.INFO)
    if any(a in ("-h", "--help") for a in argv):
        build_arg_parser().print_help()
        return EXIT_OK
    start = time.perf_counter()
    try:
        args, beam_args = _parse(argv)
        job = _prepare(args)
    except (UsageError, ManifestError, FileNotFoundError) as e:
        print(f"vmem reindex: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.if_needed and not job.needed:
        print(f"vmem reindex: {job.root} is at version {job.version}; {job.reason}")
        return args.nothing_to_do_status
    if not job.needed:
        print(f"vmem reindex: re-indexing although not needed by the thresholds ({job.reason})")
    try:
        execute(job, beam_args)
    except (ConcurrentUpdateError, ReindexError) as e:
        print(f"vmem reindex: failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # pylint: disable=broad-except  # The CLI boundary: any failure is status 1.
        if os.environ.get("VMEM_DEBUG"):
            raise
        print(f"vmem reindex: failed: {type(e).__name__}: {e}\nversion {job.version} is unchanged unless a "
              f"version {job.new_version} with change.job={job.job_token!r} was published; re-run `vmem reindex` "
              "(set VMEM_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    r = _report(job, time.perf_counter() - start)
    if r.get("submitted"):
        print(f"vmem reindex: submitted the job that publishes version {job.new_version} of {job.root}")
        return EXIT_OK
    print(f"re-indexed {r['memory']}: version {r['version']} (parent {r['parent']}), {r['num_shards']} shards, "
          f"{r['live_entries']} live entries; {r['seconds']:.1f}s")
    print(f"  rebuilt {len(r['rebuilt'])}: {', '.join(r['rebuilt']) or '-'}")
    print(f"  reused  {len(r['reused'])}: {', '.join(r['reused']) or '-'}")
    print(f"  dropped {r['dropped_forgotten']} forgotten rows, folded {r['folded_delta']} delta rows"
          + (f"; purged versions {r['purged_versions']}" if job.purge else ""))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
