"""``vmem reindex``: fold delta shards in and drop forgotten rows; rebuild only changed shards (the Beam job of
pipelines/reindex/).

    vmem reindex --memory out/fmnist-memory
    vmem reindex --memory out/fmnist-memory --if-needed --delta-threshold 0.1 --forgotten-threshold 0.1
    vmem reindex --memory gs://BUCKET/memories/in1k --if-needed --runner=DataflowRunner ...
    python vmem/reindex.py --memory=gs://BUCKET/memories/in1k --if_needed=true --nothing_to_do_status=0

The last line is what the Flex Template launcher runs (templates/reindex/, docs/scheduling.md): every flag is
also spelled with underscores, as template parameters are.

Exit status: 0 re-indexed and published; 10 nothing to do (``--if-needed`` and below both thresholds; the
reason is printed; ``--nothing-to-do-status`` changes it, e.g. 0 under a scheduler); 1 failure, including no
memory at --memory and a concurrent publish (another writer published version n+1 first: nothing of this run
is live; re-run it) and a failure after the publish (the message names the published version first, then
what failed: the memory is readable at the new version); 2 a bad flag.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # `python vmem/reindex.py` (the Flex Template launcher's entry point): the repository root, not vmem/, is
    # what must be importable when the package is not installed.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402  (after the launcher's path fix)
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from vmem.args import UsageError, run_command  # noqa: E402

EXIT_NOTHING_TO_DO = 10

__all__ = ["EXIT_NOTHING_TO_DO", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (pipelines/reindex/job.py) and ``--nothing-to-do-status``."""
    from pipelines import reindex  # pylint: disable=g-import-not-at-top
    parser = reindex.build_arg_parser()
    parser.epilog = ("Other flags are Beam pipeline options (--runner, --project, ...). Exit status: 0 published, "
                     f"{EXIT_NOTHING_TO_DO} nothing to do, 2 bad flag, 1 failure (incl. a concurrent publish).")
    parser.add_argument("--nothing-to-do-status", "--nothing_to_do_status", dest="nothing_to_do_status", type=int,
                        default=EXIT_NOTHING_TO_DO,
                        help=f"exit status when --if-needed finds nothing to do (default {EXIT_NOTHING_TO_DO}; 0 "
                             "under a scheduler that treats any other status as a failed launch)")
    return parser


def _published(job, seconds: float) -> dict:
    """What the run published (or that it only submitted the job), for the printout."""
    from memory.store.versions import list_versions, read_version  # pylint: disable=g-import-not-at-top
    from pipelines.reindex import published_by  # pylint: disable=g-import-not-at-top
    published = published_by(job.root, job.new_version, job.job_token)
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


def _run(argv: Sequence[str]) -> int:
    from memory.store.versions import ConcurrentUpdateError  # pylint: disable=g-import-not-at-top
    from memory.store.after_publish import AfterPublishError, cause_text  # pylint: disable=g-import-not-at-top
    from pipelines import reindex  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    args, beam_args = reindex.parse_flags(argv, build_parser())
    if not 0 <= args.nothing_to_do_status <= 255:
        raise UsageError(f"--nothing-to-do-status must be in 0..255, got {args.nothing_to_do_status}")
    job = reindex.prepare(args)
    if args.if_needed and not job.needed:
        print(f"vmem reindex: {job.root} is at version {job.version}; {job.reason}")
        return args.nothing_to_do_status
    if not job.needed:
        print(f"vmem reindex: re-indexing although not needed by the thresholds ({job.reason})")
    try:
        reindex.execute(job, beam_args)
    except (ConcurrentUpdateError, reindex.ReindexError, AfterPublishError):
        raise
    except Exception as e:  # pylint: disable=broad-except  # Any failure of the job: say what is live now.
        # execute raises AfterPublishError once this run's version is published, so here nothing of it is.
        raise reindex.ReindexError(
            f"{cause_text(e)}\nversion {job.version} is unchanged (nothing of this run was "
            "published); re-run `vmem reindex`") from e
    r = _published(job, time.perf_counter() - start)
    if r.get("submitted"):
        print(f"vmem reindex: submitted the job that publishes version {job.new_version} of {job.root}")
        return 0
    print(f"re-indexed {r['memory']}: version {r['version']} (parent {r['parent']}), {r['num_shards']} shards, "
          f"{r['live_entries']} live entries; {r['seconds']:.1f}s")
    print(f"  rebuilt {len(r['rebuilt'])}: {', '.join(r['rebuilt']) or '-'}")
    print(f"  reused  {len(r['reused'])}: {', '.join(r['reused']) or '-'}")
    print(f"  dropped {r['dropped_forgotten']} forgotten rows, folded {r['folded_delta']} delta rows"
          + (f"; purged versions {r['purged_versions']}" if job.purge else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem reindex``; returns the exit status (0 published, 10 nothing to do, 1 failure, 2 bad flag)."""
    return run_command("vmem reindex", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
