"""``vmem prune``: reliability counts by leave-one-out self-query; hard or soft pruning (the Beam job of
pipelines/prune.py).

    vmem prune --memory out/fmnist-memory --mode soft
    vmem prune --memory out/fmnist-memory --mode hard --threshold 64
    vmem prune --memory out/fmnist-memory --mode soft --counts-only      # counts and summary only

Runs the job on the latest version, then prints the distribution of v (mislabelled neighbours per entry) and
what was forgotten or down-weighted, from the summary the job wrote.

Exit status: 0 done (also when nothing met the threshold); 1 not a memory, or the job failed (another writer
published meanwhile: nothing was published, re-run); 2 a bad flag.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

from vmem.args import run_command

__all__ = ["main"]


def _run(argv: Sequence[str]) -> int:
    from memory import storage  # pylint: disable=g-import-not-at-top
    from memory.decide import pruning  # pylint: disable=g-import-not-at-top
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from pipelines import prune  # pylint: disable=g-import-not-at-top
    args, _ = prune.build_arg_parser().parse_known_args(argv)
    prune.check_args(args)  # A bad flag is reported before the memory is read.
    start = time.monotonic()
    root = args.memory.rstrip("/")
    base = read_manifest(root).version
    prune.run(argv)
    elapsed = time.monotonic() - start
    summary = json.loads(storage.read_text(pruning.summary_path(root, base)))
    outcome = summary["outcome"]
    print(pruning.format_summary(summary))
    if outcome["mode"] == "counts-only":
        print(f"counts of version {base} (k={summary['k']}) in {outcome['counts_path']}; nothing published")
    elif outcome["published_version"] is None:
        print(f"no entry has v >= {summary['threshold']}: nothing to prune, nothing published "
              f"(version {base} stays the latest)")
    elif outcome["mode"] == pruning.PruningMode.HARD.value:
        print(f"hard pruning: forgot {outcome['pruned']} of {outcome['entries']} entries (v >= "
              f"{summary['threshold']}) -> version {outcome['published_version']}; compare with "
              f"`vmem evaluate --version {base}`")
    else:
        print(f"soft pruning: down-weighted {outcome['down_weighted']} of {outcome['entries']} entries "
              f"(gamma = 1.75/(1+v) for v >= 1) -> version {outcome['published_version']}")
    print(f"done in {elapsed:.1f}s; counts in {outcome['counts_path']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem prune``; returns the exit status."""
    return run_command("vmem prune", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
