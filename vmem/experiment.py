"""``vmem experiment NAME``: one of the paper's findings, reproduced on a bundled dataset with the real jobs.

    vmem experiment k-sweep --dataset fashion-mnist --output out/paper/fashion-mnist/k-sweep
    vmem experiment all --dataset mnist --output out/paper/mnist [--work-dir out/paper-work]
    vmem experiment label-noise --dataset mnist --output /tmp/noise --train-per-class 200

The dataset's splits are embedded once per --work-dir (cached; see evaluation.experiments.workspace); each
experiment writes report.json, report.md and PNG plots into --output (``all``: one sub-directory each).
Everything is seeded (--seed); two runs with the same flags give the same numbers. The experiments
themselves are evaluation.experiments.registry's.

Exit status: 0 done; 1 an experiment failed (e.g. the dataset is not installed); 2 a bad flag, an unknown
experiment or class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from evaluation.experiments.registry import EXPERIMENTS
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem experiment`` argument parser."""
    from evaluation.experiments.workspace import HOLD_OUT, Setup  # pylint: disable=g-import-not-at-top
    d = Setup()
    parser = RaisingArgumentParser(prog="vmem experiment", description=__doc__.split("\n")[0])
    parser.add_argument("name", help=f"one of: {', '.join(EXPERIMENTS)}, or all")
    parser.add_argument("--dataset", default=d.dataset, help=f"{' or '.join(HOLD_OUT)} (default {d.dataset})")
    parser.add_argument("--output", required=True, help="directory for report.json, report.md and plots")
    parser.add_argument("--work-dir", default="out/paper-work",
                        help="embeddings and memories (cached across runs; default out/paper-work)")
    parser.add_argument("--train-per-class", type=int, default=d.train_per_class,
                        help=f"memory pool: training images per class (default {d.train_per_class})")
    parser.add_argument("--calib-per-class", type=int, default=d.calib_per_class,
                        help=f"calibration split: further training images per class (default {d.calib_per_class})")
    parser.add_argument("--test-per-class", type=int, default=d.test_per_class,
                        help=f"queries: test images per class (default {d.test_per_class})")
    parser.add_argument("--shards", type=int, default=d.shards, help=f"shards per memory (default {d.shards})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random choice (default {d.seed})")
    parser.add_argument("--hold-out", default=None,
                        help="comma-separated classes held out of the memory by new-classes and abstain "
                             "(default: " + "; ".join(f"{k}: {','.join(v)}" for k, v in HOLD_OUT.items()) + ")")
    return parser


def _setup_from_args(args: argparse.Namespace):
    """The experiments' Setup from the flags (UsageError naming a bad value)."""
    from evaluation.experiments.workspace import Setup  # pylint: disable=g-import-not-at-top
    hold_out = tuple(c.strip() for c in (args.hold_out or "").split(",") if c.strip())
    try:
        return Setup(dataset=args.dataset, train_per_class=args.train_per_class, calib_per_class=args.calib_per_class,
                     test_per_class=args.test_per_class, shards=args.shards, seed=args.seed, hold_out=hold_out)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run(argv: Sequence[str]) -> int:
    from evaluation.experiments.registry import run_experiments  # pylint: disable=g-import-not-at-top
    from evaluation.experiments.workspace import Workspace  # pylint: disable=g-import-not-at-top
    args = build_parser().parse_args(argv)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise UsageError(f"unknown experiment {unknown[0]!r}; allowed: {', '.join(EXPERIMENTS)}, all")
    setup = _setup_from_args(args)
    unknown_classes = sorted(set(setup.hold_out) - set(_classes(setup.dataset)))
    if unknown_classes:
        raise UsageError(f"--hold-out: {unknown_classes} are not {setup.dataset} classes; allowed: "
                         f"{', '.join(_classes(setup.dataset))}")
    ws = Workspace(args.work_dir, setup)
    start = time.monotonic()
    stamp = ws.prepare()
    print(f"{setup.dataset}: embeddings ready ({json.dumps(stamp['counts'])}; encoder {stamp['encoder_id']}) "
          f"in {time.monotonic() - start:.1f}s", flush=True)
    run_experiments(names, ws, args.output, nested=args.name == "all")
    print(f"done in {time.monotonic() - start:.1f}s; seconds by job: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ws.seconds.items()))
    return 0


def _classes(dataset: str) -> tuple[str, ...]:
    from evaluation.datasets import class_names  # pylint: disable=g-import-not-at-top
    return class_names(dataset)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem experiment``; returns the exit status."""
    return run_command("vmem experiment", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
