"""``vmem experiment NAME``: one of the paper's findings, reproduced on your data or a bundled dataset by the real jobs.

    vmem experiment k-sweep --memory-data DIR/train --queries DIR/test --output out/k-sweep
    vmem experiment all --memory-data 'clip:EMB/train,label_column=label' --queries 'clip:EMB/val,label_column=label' \\
        --calibration 'clip:EMB/calib,label_column=label' --encoder-id dinov2-vitl14 --hold-out goldfish,tench \\
        --output out/paper-in1k --direct_running_mode=multi_processing --direct_num_workers=2
    vmem experiment label-noise --dataset mnist --output /tmp/noise --train-per-class 200

--memory-data, --queries and --calibration take what ``vmem build`` takes: ``--images`` specs (ImageFolder,
webdataset:, tfrecord:, manifest: or .csv/.jsonl) embedded by --config's encoder, or with --encoder-id
``--embeddings`` specs (clip:DIR,..., tfrecord:PATTERN,...). --dataset fashion-mnist|mnist is a preset of
the same path: it writes the bundled splits as ImageFolders and uses its own defaults (sizes, --hold-out).
Every other flag is a Beam pipeline option, passed to every job the experiment runs (--runner=...,
--direct_running_mode=multi_processing --direct_num_workers=N, Dataflow's flags).

The data's splits are read once per --work-dir (cached; see evaluation.experiments.workspace); each
experiment writes report.json, timings.json, report.md, report.html and PNG plots into --output (``all``: one
sub-directory each). Everything is seeded (--seed); two runs with the same flags write the same
report.json. The experiments themselves are evaluation.experiments.registry's.

Studies on generated labelled embeddings (evaluation.synthetic_data) make their own data and take their own
flags instead of the data flags (``vmem experiment NAME --help`` lists them); they are not part of ``all``:

    vmem experiment synthetic-scale --work-dir /tmp/syn --output out/scale --classes 100 --max-entries 1000000
    vmem experiment label-noise-classes --work-dir /tmp/lnc --output out/lnc --classes 10,100,1000 --per-class 100

Exit status: 0 done; 1 an experiment failed (e.g. the dataset is not installed); 2 a bad flag, an unknown
experiment or class, or data an experiment cannot run on (the message names the flag).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from evaluation.experiments.registry import EXPERIMENTS, STUDIES
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem experiment`` argument parser (other flags are Beam pipeline options)."""
    from evaluation.experiments.data import PRESETS  # pylint: disable=g-import-not-at-top
    from evaluation.experiments.workspace import CUSTOM, Setup  # pylint: disable=g-import-not-at-top
    d = Setup()
    preset = PRESETS[d.dataset]
    parser = RaisingArgumentParser(prog="vmem experiment", description=__doc__.split("\n")[0],
                                   epilog="Other flags are Beam pipeline options (--runner, --direct_num_workers, "
                                          "--project, ...), passed to every job.")
    parser.add_argument("name", help=f"one of: {', '.join(EXPERIMENTS)}, or all; or a study on generated data: "
                                     f"{', '.join(STUDIES)} (its own flags: vmem experiment NAME --help)")
    data = parser.add_argument_group("your data (instead of --dataset)")
    data.add_argument("--memory-data", metavar="SPEC", default=None,
                      help="the memory pool: an ImageFolder DIR, webdataset:, tfrecord:, manifest: (vmem build "
                           "--images), or with --encoder-id clip:DIR,label_column=COL or tfrecord:PATTERN "
                           "(--embeddings)")
    data.add_argument("--queries", metavar="SPEC", default=None, help="the labelled queries (same forms)")
    data.add_argument("--calibration", metavar="SPEC", default=None,
                      help="labelled calibration queries, never in a memory (same forms; abstain needs it)")
    data.add_argument("--encoder-id", default=None,
                      help="the specs are precomputed embeddings of this encoder (as vmem build --encoder-id)")
    data.add_argument("--config", default=None,
                      help="with image specs: build config file.py[:variant] or module whose encoder embeds them "
                           "(default configs.default, as vmem build)")
    data.add_argument("--name", dest="data_name", default=None,
                      help=f"the data's name in reports and under --work-dir (default {CUSTOM})")
    parser.add_argument("--dataset", default=None,
                        help=f"a bundled preset: {' or '.join(PRESETS)} (default {d.dataset} without --memory-data)")
    parser.add_argument("--output", required=True, help="directory for report.json, timings.json, report.md, report.html and plots")
    parser.add_argument("--work-dir", default="out/paper-work",
                        help="embeddings and memories (cached across runs; default out/paper-work)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help=f"preset memory pool: training images per class (default {preset.train_per_class})")
    parser.add_argument("--calib-per-class", type=int, default=None,
                        help=f"preset calibration split: further training images per class "
                             f"(default {preset.calib_per_class})")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help=f"preset queries: test images per class (default {preset.test_per_class})")
    parser.add_argument("--shards", type=int, default=d.shards, help=f"shards per memory (default {d.shards})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random choice (default {d.seed})")
    parser.add_argument("--hold-out", default=None,
                        help="comma-separated classes held out of the memory by new-classes and abstain, the first "
                             "forgotten by unlearning (presets' default: "
                             + "; ".join(f"{k}: {','.join(v.hold_out)}" for k, v in PRESETS.items())
                             + "; your data: none, so those experiments need it)")
    return parser


def _data_from_args(args: argparse.Namespace):
    """The ExperimentData of --memory-data/--queries/..., or None for a preset (UsageError naming a bad flag)."""
    from evaluation.experiments.data import ExperimentData  # pylint: disable=g-import-not-at-top
    specs = {"--memory-data": args.memory_data, "--queries": args.queries, "--calibration": args.calibration,
             "--encoder-id": args.encoder_id, "--config": args.config, "--name": args.data_name}
    if args.memory_data is None and args.queries is None:
        given = [flag for flag, value in specs.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} describes your data: pass --memory-data SPEC --queries SPEC with it")
        return None
    if args.dataset is not None:
        raise UsageError(f"--dataset {args.dataset} is a preset of --memory-data/--queries; give one or the other")
    for flag, other in (("--memory-data", "--queries"), ("--queries", "--memory-data")):
        if specs[flag] is None:
            raise UsageError(f"{flag} SPEC is required with {other}")
    try:
        return ExperimentData(memory=args.memory_data, queries=args.queries, calibration=args.calibration,
                              encoder_id=args.encoder_id, config=args.config)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _setup_from_args(args: argparse.Namespace, runner_flags: Sequence[str]):
    """The experiments' Setup from the flags (UsageError naming a bad value)."""
    from evaluation.experiments.workspace import CUSTOM, Setup  # pylint: disable=g-import-not-at-top
    hold_out = tuple(c.strip() for c in (args.hold_out or "").split(",") if c.strip())
    data = _data_from_args(args)
    dataset = (args.data_name or CUSTOM) if data is not None else (args.dataset or Setup().dataset)
    try:
        return Setup(dataset=dataset, train_per_class=args.train_per_class, calib_per_class=args.calib_per_class,
                     test_per_class=args.test_per_class, shards=args.shards, seed=args.seed, hold_out=hold_out,
                     data=data, runner_flags=tuple(runner_flags))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _runner_flags(extra: Sequence[str]) -> list[str]:
    """The Beam flags among the arguments ``vmem experiment`` does not know, checked as every job checks them."""
    from pipelines.runner import resolve_pipeline_options  # pylint: disable=g-import-not-at-top
    if extra and not extra[0].startswith("-"):
        raise UsageError(f"unrecognized argument {extra[0]!r}; Beam pipeline options come as --flag=value")
    resolve_pipeline_options(list(extra))  # FlagError (exit 2) for a runner setting every job would refuse.
    return list(extra)


def _check_hold_out(setup, classes: Sequence[str], whose: str) -> None:
    """Refuses --hold-out classes that are not ``whose`` classes, or that leave none in the memory."""
    unknown = sorted(set(setup.hold_out) - set(classes))
    if unknown:
        raise UsageError(f"--hold-out: {unknown} are not {whose} classes; allowed: {', '.join(classes)}")
    if setup.hold_out and not set(classes) - set(setup.hold_out):
        raise UsageError(f"--hold-out holds out every {whose} class; leave at least one in the memory")


def study_parser(name: str) -> argparse.ArgumentParser:
    """The ``vmem experiment STUDY`` argument parser: the study's own flags (other flags are Beam options)."""
    from evaluation.experiments.registry import study_module  # pylint: disable=g-import-not-at-top
    module = study_module(name)
    parser = RaisingArgumentParser(prog=f"vmem experiment {name}", description=module.__doc__.split("\n")[0],
                                   epilog="Other flags are Beam pipeline options, passed to every job.")
    parser.add_argument("name", help=name)
    parser.add_argument("--output", required=True, help="directory for report.json, report.md, report.html and plots")
    parser.add_argument("--work-dir", default="out/synthetic-work",
                        help="generated data, memories and evaluations (kept across runs; default out/synthetic-work)")
    module.add_flags(parser)
    return parser


def _run_study(name: str, argv: Sequence[str]) -> int:
    from evaluation.experiments.registry import study_module  # pylint: disable=g-import-not-at-top
    from evaluation.experiments.synthetic_jobs import setup_values  # pylint: disable=g-import-not-at-top
    module = study_module(name)
    args, extra = study_parser(name).parse_known_args(argv)
    runner_flags = _runner_flags(extra)
    try:
        setup = module.SETUP(**setup_values(args, module.SETUP))
    except ValueError as e:
        raise UsageError(str(e)) from None
    start = time.monotonic()
    module.run(args.work_dir, args.output, setup, log=lambda line: print(line, file=sys.stderr, flush=True),
               runner_flags=runner_flags)
    print(f"{name}: report in {args.output} after {time.monotonic() - start:.1f}s", flush=True)
    return 0


def _run(argv: Sequence[str]) -> int:
    from evaluation.experiments.registry import check_needs, run_experiments  # pylint: disable=g-import-not-at-top
    from evaluation.experiments.workspace import Workspace  # pylint: disable=g-import-not-at-top
    if argv and argv[0] in STUDIES:  # Its own flags (and --help): --queries and --classes are counts there.
        return _run_study(argv[0], argv)
    args, extra = build_parser().parse_known_args(argv)
    if args.name in STUDIES:
        return _run_study(args.name, argv)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise UsageError(f"unknown experiment {unknown[0]!r}; allowed: {', '.join(EXPERIMENTS)}, all, or a study: "
                         f"{', '.join(STUDIES)}")
    setup = _setup_from_args(args, _runner_flags(extra))
    try:
        check_needs(names, setup)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if setup.preset is not None:  # Known before anything is embedded.
        _check_hold_out(setup, setup.preset.classes(), setup.dataset)
    ws = Workspace(args.work_dir, setup)
    start = time.monotonic()
    stamp = ws.prepare()
    print(f"{setup.dataset}: embeddings ready ({json.dumps(stamp['counts'])}; encoder {stamp['encoder_id']}) "
          f"in {time.monotonic() - start:.1f}s", flush=True)
    if setup.preset is None:
        _check_hold_out(setup, ws.class_names(), f"--memory-data {setup.data.memory}")
    run_experiments(names, ws, args.output, nested=args.name == "all")
    print(f"done in {time.monotonic() - start:.1f}s; seconds by job: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ws.seconds.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem experiment``; returns the exit status."""
    return run_command("vmem experiment", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
