"""The re-index job's flags and graph: `build_pipeline` (typed), `prepare`, `execute` and `run` (Beam's
``run(argv)``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from memory.store.after_publish import AfterPublishError
from memory.store.integrity import NO_VERIFY_HELP
from memory.store.versions import latest_version
from pipelines.reindex.plan import ReindexJob, finish_pending_purge, prepare_job, published_by
from pipelines.reindex.commit import conflict_error, publish
from pipelines.reindex.stages import SUMMARY, ReadLiveRowsFn, ScanSourceFn, WriteTargetShardFn, make_plan
from pipelines.runner import FlagError, after_publish_error, with_default_runner

_LOG = logging.getLogger("visual_memory")
REINDEX_DESCRIPTION = ("The re-index job: fold delta shards into the main shards and drop forgotten rows "
                       "physically.")

__all__ = ["build_arg_parser", "build_pipeline", "check_args", "execute", "parse_flags", "prepare", "run"]


def _bool(value: str) -> bool:
    """Flex Template parameters arrive as ``--if_needed=true``; the CLI flag has no value."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y"):
        return True
    if v in ("0", "false", "no", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    """The re-index job's flags (each also spelled with underscores, as Flex Template parameters are)."""
    parser = argparse.ArgumentParser(prog="vmem reindex", description=REINDEX_DESCRIPTION,
                                     epilog="Other flags are Beam pipeline options (--runner, --project, ...).")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    parser.add_argument("--if-needed", "--if_needed", dest="if_needed", nargs="?", const=True, default=False,
                        type=_bool, help="only re-index when a threshold is exceeded, the shard count changes or a "
                                         "purge is pending; otherwise do nothing (vmem reindex: print why not and exit "
                                         "10)")
    parser.add_argument("--target-shard-size", "--target_shard_size", dest="target_shard_size", type=int,
                        default=None, help="entries per main shard: ceil(live / N) shards (default: keep the "
                                           "current shard count)")
    parser.add_argument("--delta-threshold", "--delta_threshold", dest="delta_threshold", type=float, default=0.1,
                        help="with --if-needed: re-index when delta rows / live entries exceeds this (default 0.1)")
    parser.add_argument("--forgotten-threshold", "--forgotten_threshold", dest="forgotten_threshold", type=float,
                        default=0.1, help="with --if-needed: re-index when forgotten rows / stored rows exceeds "
                                          "this (default 0.1)")
    # true/false like --if_needed, so the Flex Template's name=value parameter can set it too.
    parser.add_argument("--no-verify", "--no_verify", dest="no_verify", nargs="?", const=True, default=False,
                        type=_bool, help=NO_VERIFY_HELP)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuses flag values out of range (FlagError naming the flag)."""
    if args.target_shard_size is not None and args.target_shard_size < 1:
        raise FlagError(f"--target-shard-size must be >= 1, got {args.target_shard_size}")
    for flag, value in (("--delta-threshold", args.delta_threshold),
                        ("--forgotten-threshold", args.forgotten_threshold)):
        if not value >= 0:
            raise FlagError(f"{flag} must be >= 0, got {value} (e.g. 0.1 for 10%)")


def parse_flags(argv: Optional[Sequence[str]], parser: argparse.ArgumentParser | None = None
                ) -> tuple[argparse.Namespace, list[str]]:
    """(re-index flags, Beam flags) of ``argv``, checked; ``parser`` extends `build_arg_parser`'s flags."""
    args, beam_args = (parser or build_arg_parser()).parse_known_args(argv)
    check_args(args)
    return args, with_default_runner(beam_args)


def prepare(args: argparse.Namespace) -> ReindexJob:
    """Finishes an earlier re-index's pending purge, then plans this one (`prepare_job`) from the flags."""
    finish_pending_purge(args.memory)
    return prepare_job(args.memory, target_shard_size=args.target_shard_size, delta_threshold=args.delta_threshold,
                       forgotten_threshold=args.forgotten_threshold, verify=not args.no_verify)


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
    scanned = sources | "ScanSources" >> beam.ParDo(ScanSourceFn(job)).with_outputs(SUMMARY, main="spills")
    plan = (scanned[SUMMARY]
            | "CollectSummaries" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(make_plan, job))
    plan_side = beam.pvalue.AsSingleton(plan)
    main_spills = sources | "ReadLiveRows" >> beam.ParDo(ReadLiveRowsFn(job), plan=plan_side)
    # Every rebuilt target gets a group even when all its rows were forgotten (it becomes an empty shard).
    seeds = plan | "RebuiltTargets" >> beam.FlatMap(lambda pl: [(t, None) for t in pl.rebuilt])
    infos = ((scanned.spills, main_spills, seeds)
             | "AllSpills" >> beam.Flatten()
             | "GroupByTarget" >> beam.GroupByKey()
             | "WriteTargetShard" >> beam.ParDo(WriteTargetShardFn(job), plan=plan_side))
    return (p
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(_PublishFn(job), infos=beam.pvalue.AsList(infos), plan=plan_side))


def execute(job: ReindexJob, beam_args: Sequence[str] = (), test_pipeline: Optional[beam.Pipeline] = None):
    """Runs the planned job to completion; returns the PipelineResult.

    Raises:
      WriteConflictError: (a ConcurrentUpdateError naming the winning version) the memory moved past version
        n, before the run or while it ran; nothing of this run is live.
      AfterPublishError: version n+1 is published (readers get it), then the job failed (its clean-up, the
        purge a forget asked for); the message names the version first, then the failure.
    """
    if latest_version(job.root) != job.version:
        raise conflict_error(job)
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
        published = published_by(job.root, job.new_version, job.job_token)
        if latest > job.version and published is None:
            raise conflict_error(job) from e
        if published is None:
            raise
        # This run's version is live: say so first, then what failed after it.
        raise after_publish_error(e) or AfterPublishError.after(
            root=job.root, version=job.new_version, step="the re-index job", error=e,
            fix="Re-run `vmem reindex` to finish its clean-up.") from e
    return result


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None):
    """Parses ``argv`` (re-index flags + Beam flags), plans, builds the graph and runs it to completion.

    Returns:
      The PipelineResult, or None when ``--if-needed`` found nothing to do.
    """
    args, beam_args = parse_flags(argv)
    job = prepare(args)
    if args.if_needed and not job.needed:
        _LOG.info("reindex: %s: %s", job.root, job.reason)
        return None
    return execute(job, beam_args, test_pipeline)
