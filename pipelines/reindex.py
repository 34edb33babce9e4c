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

    ListSourceShards ─► ReadLiveRows ─► (target shard, rows) ─┐
    RebuiltTargets ──────────────────────────────────────────┴► GroupByTarget ─► WriteTargetShard ─► Publish (last, once)

The launcher reads the memory's latest version n once and plans (memory.compaction.plan_reindex): with an
unchanged shard count, a main shard holding no forgotten row and receiving no delta row is *reused* as is
(same directory); every other target shard is *rebuilt*. The sources (changed main shards -- all of them
when the shard count changes -- and every delta shard) are read once each, forgotten rows are dropped, every
live row goes to ``shard_for_id(id, target shard count)``, rows are grouped so one worker builds one target
shard, and each rebuilt shard is written with the memory's IndexConfig into a NEW directory
``shards/r{n+1:06d}-<job id>/shard-IIIII-of-NNNNN`` (never a path a published version uses). One final step
publishes version n+1 (change kind ``reindex``: rebuilt and reused shard names, dropped forgotten rows,
folded delta rows) with no delta shards, no tombstones and the entry weights minus forgotten ids. If a
forget since the last re-index asked for ``--purge-history``, the old versions and the shard files that
still hold forgotten embeddings are then deleted (memory.mutations.purge_history).

Exit status: 0 re-indexed and published; 10 nothing to do (``--if-needed`` and below both thresholds; the
reason is printed; ``--nothing-to-do-status`` changes it, e.g. 0 under a scheduler); 2 usage error (bad
flag, no memory at --memory); 1 failure, including a concurrent publish (another writer published version
n+1 first: nothing of this run is live; re-run it).

Crash safety: until the final publish nothing a version references is touched, so a re-index killed at any
step leaves the memory exactly at version n. A killed run leaves its ``shards/r{n+1:06d}-<job id>/``
directory behind; it is never referenced (the next run picks a new job id). After each successful publish
the job deletes such orphans: ``shards/rNNNNNN-*`` directories with NNNNNN <= the latest version that no
existing version references (a run that would publish NNNNNN can no longer do so). Orphans of other jobs
(``deltas/``, ``tombstones/``, ``weights/`` files of a crashed add/forget/prune) are left alone.

Anything that is not a re-index flag is passed to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import secrets
import sys
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

from memory import compaction, storage
from memory import shard as shard_io
from memory.index import IndexConfig
from memory.manifest import Manifest, ManifestError, ShardInfo, WeightsRef, sha256_checksum
from memory.mutations import (_fresh_name, _member, purge_history, purge_requested_since_reindex,
                              read_entry_weights, read_forgotten, WEIGHTS_DIR)
from memory.routing import read_router
from memory.shard import ShardData
from memory.sharding import shard_for_id
from memory.versions import (ConcurrentUpdateError, _conflict, checked_deletion_paths, latest_version, list_versions,
                             publish_version, read_version)
from pipelines.runner import with_default_runner

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOTHING_TO_DO = 10

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
    """Everything the workers need, computed once by the launcher from version ``manifest.version``.

    Attributes:
      root: Memory root.
      manifest: The version being re-indexed (n); version n+1 is published with it as parent.
      plan: Which target shards are rebuilt and reused, and from which source shards.
      job_token: Random token naming this run's directory (two runs never share a path).
      index_config: IndexConfig for rebuilt shards (the memory's own).
      needed: Whether --if-needed would run it; reason says why (not).
      purge: Whether a forget since the last re-index asked for --purge-history.
      delta_targets: Partition-routed memories: ``{delta ShardInfo.path: router shard of each row}``,
        computed once by the launcher so that the plan and the workers agree row for row (recomputing the
        nearest centroid on another CPU could break a floating-point tie differently). None when hashed.
    """
    root: str
    manifest: Manifest
    plan: compaction.ReindexPlan
    job_token: str
    index_config: IndexConfig
    needed: bool
    reason: str
    purge: bool
    delta_targets: dict[str, np.ndarray] | None = None

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def new_version(self) -> int:
        return self.manifest.version + 1

    @property
    def job_dir(self) -> str:
        return compaction.reindex_dir(self.new_version, self.job_token)

    def target_path(self, index: int) -> tuple[str, str]:
        """(name, root-relative path) of a rebuilt target shard."""
        name = self.plan.targets[index].name
        return name, f"{self.job_dir}/{name}"


def _read_ids(root: str, info: ShardInfo) -> np.ndarray:
    ids = shard_io.read_shard_ids(storage.join(root, info.path))
    if ids.shape != (info.count,):
        raise ManifestError(f"shard {info.name}: {info.path} holds {ids.shape[0]} ids, the manifest says {info.count}")
    return ids


def prepare_job(root: str, *, target_shard_size: int | None = None, delta_threshold: float = 0.1,
                forgotten_threshold: float = 0.1, job_token: str | None = None) -> ReindexJob:
    """Reads the latest version once and plans the re-index (launcher side; reads every shard's ids.npy).

    Raises:
      ManifestError: no memory at ``root``, or a shard disagrees with the manifest.
    """
    root = root.rstrip("/") or root
    n = latest_version(root)
    manifest = read_version(root, n)
    forgotten = read_forgotten(root, manifest)
    target_n = compaction.target_shard_count(manifest.total, target_shard_size=target_shard_size,
                                             current=len(manifest.shards))
    router = read_router(root, manifest)
    purge = purge_requested_since_reindex(root)
    needed, reason = compaction.needs_reindex(manifest, delta_threshold=delta_threshold,
                                              forgotten_threshold=forgotten_threshold, target_shards=target_n,
                                              purge_requested=purge)
    delta_targets = None
    if router is not None:
        # Delta shards are small by design (a re-index is due at 10% of the memory): route their rows here.
        delta_targets = [router.assign(shard_io.read_shard_data(storage.join(root, s.path)).embeddings)
                         for s in manifest.delta_shards]
    try:
        plan = compaction.plan_reindex(
            manifest, main_ids={s.path: _read_ids(root, s) for s in manifest.shards}, forgotten=forgotten,
            delta_ids=[_read_ids(root, s) for s in manifest.delta_shards], num_shards=target_n,
            delta_targets=delta_targets)
    except ValueError as e:  # A shard count change of a partition-routed memory: a bad --target-shard-size.
        raise UsageError(str(e)) from None
    token = job_token or secrets.token_hex(4)
    job = ReindexJob(root=root, manifest=manifest, plan=plan, job_token=token,
                     index_config=compaction.index_config_of(manifest), needed=needed, reason=reason, purge=purge,
                     delta_targets=None if delta_targets is None else {
                         s.path: t for s, t in zip(manifest.delta_shards, delta_targets)})
    if storage.exists(storage.join(root, job.job_dir)):
        raise ReindexError(f"{storage.join(root, job.job_dir)} already exists; pick another job token")
    return job


class _ReadLiveRowsFn(beam.DoFn):
    """Source ShardInfo -> (target shard index, ShardData of its live rows bound for that target)."""

    def __init__(self, job: ReindexJob):
        self._job = job
        self._forgotten = None
        self._rows = Metrics.counter(_NAMESPACE, "reindex_rows_read")
        self._dropped = Metrics.counter(_NAMESPACE, "reindex_forgotten_rows_dropped")
        self._folded = Metrics.counter(_NAMESPACE, "reindex_delta_rows_folded")

    def setup(self):
        # Tombstones can hold millions of ids: read once per worker from the memory, not pickled in the graph.
        self._forgotten = read_forgotten(self._job.root, self._job.manifest)

    def process(self, info: ShardInfo):
        job = self._job
        data = shard_io.read_shard_data(storage.join(job.root, info.path))
        ids = data.ids.astype(str)
        if ids.shape != (info.count,):
            raise ManifestError(f"shard {info.name}: {ids.shape[0]} rows stored, the manifest says {info.count}")
        keep = ~_member(self._forgotten, ids)
        self._rows.inc(int(ids.size))
        self._dropped.inc(int((~keep).sum()))
        if info in job.manifest.delta_shards:
            self._folded.inc(int(ids.size))
        ids = ids[keep]
        if job.delta_targets is None:
            target = np.fromiter((shard_for_id(i, job.plan.num_shards) for i in ids.tolist()), np.int64, ids.size)
        elif info in job.manifest.shards:  # Routed main rows stay where they are.
            target = np.full(ids.size, job.manifest.shards.index(info), np.int64)
        else:
            target = np.asarray(job.delta_targets[info.path], np.int64)[keep]
        rebuilt = set(job.plan.rebuilt)
        for t in np.unique(target).tolist():
            if t not in rebuilt:  # plan_reindex verified the hash partition; this would lose entries.
                raise ReindexError(f"shard {info.name} holds live rows of target shard {t}, which the plan reuses; "
                                   "nothing was published (re-run with --target-shard-size to rebuild every shard)")
            rows = np.flatnonzero(keep)[target == t]
            yield int(t), ShardData(ids=data.ids[rows], labels=data.labels[rows], uris=data.uris[rows],
                                    embeddings=data.embeddings[rows])
        _LOG.info("reindex: read %s (%d rows, %d forgotten dropped)", info.name, info.count, int((~keep).sum()))


class _WriteTargetShardFn(beam.DoFn):
    """(target index, [ShardData chunks]) -> (target index, ShardInfo) after writing the new shard."""

    def __init__(self, job: ReindexJob):
        self._job = job
        self._written = Metrics.counter(_NAMESPACE, "reindex_shards_rebuilt")

    def process(self, element):
        index, chunks = element
        job = self._job
        chunks = [c for c in chunks if c is not None]
        dim = job.manifest.dim
        if chunks:
            data = ShardData(ids=np.concatenate([c.ids.astype(str) for c in chunks]),
                             labels=np.concatenate([c.labels for c in chunks]).astype(np.int32),
                             uris=np.concatenate([c.uris.astype(str) for c in chunks]),
                             embeddings=np.concatenate([c.embeddings for c in chunks]).reshape(-1, dim))
        else:  # Every row of this target was forgotten.
            data = ShardData(ids=np.zeros((0,), "<U1"), labels=np.zeros((0,), np.int32),
                             uris=np.zeros((0,), "<U1"), embeddings=np.zeros((0, dim), np.float32))
        name, rel = job.target_path(index)
        start = time.perf_counter()
        info = shard_io.write_shard(storage.join(job.root, rel), data, index_config=job.index_config, name=name,
                                    root_relative_path=rel)
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
    keep = ~_member(forgotten, ids)
    if keep.all():
        return ref
    if not keep.any():
        return None
    buf = io.BytesIO()
    np.savez(buf, ids=ids[keep], weights=weights[keep].astype(np.float32))
    blob = buf.getvalue()
    rel = _fresh_name(WEIGHTS_DIR, new_version, ".npz")
    storage.write_bytes(storage.join(root, rel), blob)
    return dataclasses.replace(ref, path=rel, count=int(keep.sum()), checksum=sha256_checksum(blob))


def assemble_manifest(job: ReindexJob, rebuilt: dict[int, ShardInfo]) -> Manifest:
    """The new version's content (version/parent are set by publish_version), after checking the books.

    Raises:
      ReindexError: a rebuilt shard is missing, or the new version would not hold exactly the live entries.
    """
    m, plan = job.manifest, job.plan
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
                               build_config=build_config, change=change)


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
    return orphans


def publish(job: ReindexJob, rebuilt: dict[int, ShardInfo]) -> Manifest:
    """Publishes version n+1 (once; a retried step recognises its own version), then purges and cleans up.

    Raises:
      ConcurrentUpdateError: another writer published version n+1 first; nothing of this run is live.
    """
    published = _published_by(job.root, job.new_version, job.job_token)
    if published is None:
        published = publish_version(job.root, assemble_manifest(job, rebuilt), expected_parent=job.version)
        _LOG.info("reindex: published version %d of %s", published.version, job.root)
    if job.purge:
        purged = purge_history(job.root)
        _LOG.info("reindex: purged versions %s (a forget requested --purge-history)", purged)
    remove_orphans(job.root)
    return published


class _PublishFn(beam.DoFn):

    def __init__(self, job: ReindexJob):
        self._job = job

    def process(self, unused, infos):
        yield publish(self._job, dict(infos)).version


def build_pipeline(p: beam.Pipeline, job: ReindexJob) -> beam.PCollection:
    """Adds the re-index graph to ``p``; returns the PCollection of the published version number."""
    rows = (p
            | "ListSourceShards" >> beam.Create(list(job.plan.sources))
            # One source shard per element: let the runner spread the reads over workers.
            | "SpreadSources" >> beam.Reshuffle()
            | "ReadLiveRows" >> beam.ParDo(_ReadLiveRowsFn(job)))
    # Every rebuilt target gets a group even when all its rows were forgotten (it becomes an empty shard).
    seeds = p | "RebuiltTargets" >> beam.Create([(t, None) for t in job.plan.rebuilt])
    infos = ((rows, seeds)
             | "AllRows" >> beam.Flatten()
             | "GroupByTarget" >> beam.GroupByKey()
             | "WriteTargetShard" >> beam.ParDo(_WriteTargetShardFn(job)))
    return (p
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(_PublishFn(job), infos=beam.pvalue.AsList(infos)))


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
        raise _conflict(job.root, job.new_version, job.version, latest)
    _LOG.info("reindex: %s version %d -> %d: %d shards (rebuild %s, reuse %s), %d forgotten rows to drop, %d delta "
              "rows to fold; writing to %s", job.root, job.version, job.new_version, job.plan.num_shards,
              list(job.plan.rebuilt), list(job.plan.reused), job.plan.forgotten_rows, job.plan.delta_rows,
              job.job_dir)
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    build_pipeline(p, job)
    try:
        result = p.run()
        if result is not None:  # DataflowRunner --dry_run=True returns None.
            result.wait_until_finish()
    except Exception as e:  # pylint: disable=broad-except  # Runners wrap worker errors in their own types.
        latest = latest_version(job.root)
        if latest > job.version and _published_by(job.root, job.new_version, job.job_token) is None:
            raise _conflict(job.root, job.new_version, job.version, latest) from e
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
