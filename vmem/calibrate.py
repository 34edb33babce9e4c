"""``vmem calibrate``: fit the confidence of a memory's votes on a held-out split and store it in the memory.

A vote's raw confidence (the winner's share of the score, the margin to the runner-up, or the nearest
neighbour's similarity; see memory.decide.confidence) is not a probability. This command fits the map from it to
"the vote is right" on the neighbour lists of a labelled split the memory never saw -- the output
directory of ``vmem evaluate`` on that split -- and publishes it as the memory's next version. From then on
``vmem classify`` and ``VisualMemory.classify`` report calibrated confidences for that rule and k, and
``--abstain-below P`` / ``abstain_below=P`` abstains below P (label -1, no class name).

By default it also fits an out-of-memory test on the same split (memory.decide.out_of_memory; no query of
an unknown class is needed): a query whose k-th neighbour is less similar, as it is and relative to those
neighbours' own k-th neighbour similarities in the memory, than in all but 5 % of the split's queries
(``--out-of-memory-level``) is unlike anything in memory, and ``--abstain-below`` then also abstains on it;
an abstention names its reason, ``unlike_memory`` or ``split_vote``. The relative part searches the memory
once with its own entries and stores each entry's k-th similarity next to the calibration
(``--out-of-memory-statistic nearest`` or ``kth`` compare that one similarity alone, without the search). ``--no-out-of-memory`` fits the vote's confidence alone, as calibrations without the
test, which keep working, do.

Example::

        vmem evaluate --memory out/fmnist-memory --images data/fashion-mnist/calib --output out/calib-eval
        vmem calibrate --evaluation out/calib-eval --rule rank --k 10 [--method platt] [--score combined]
        vmem classify --memory out/fmnist-memory img.png --abstain-below 0.9

The memory is the one the evaluation searched (``--memory`` to name it explicitly); the evaluation must
have searched the memory's latest version (otherwise re-run ``vmem evaluate``). The voting parameters
(tau, alpha) are the evaluation's. ECE before and after is printed: measured on the same split the map was
fitted on, so the "after" figure is optimistic; the ``abstain`` experiment measures it on another split.

The fit itself is evaluation.calibration.fit_from_evaluation (the ``abstain`` experiment calls it too).

Exit status: 0 on success (or a --dry-run); 1 when the evaluation or the memory cannot be read, the memory
changed since the evaluation, or the split cannot support the fit; 2 on a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from memory.decide.out_of_memory import DEFAULT_LEVEL, DEFAULT_STATISTIC, OutOfMemoryStatistic
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem calibrate`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--evaluation", required=True, metavar="DIR",
                        help="output directory of `vmem evaluate` on a labelled held-out split (report.json + "
                             "neighbors-*.jsonl)")
    parser.add_argument("--memory", default=None, help="the memory to calibrate (default: the one the evaluation "
                                                       "searched, from its report.json)")
    parser.add_argument("--rule", default="rank", help="voting rule to calibrate (default rank)")
    parser.add_argument("--k", type=int, default=10, help="neighbours that vote (default 10)")
    parser.add_argument("--method", default="platt", help="platt (default) or isotonic")
    parser.add_argument("--score", default="combined",
                        help="raw score: combined (default: share, margin and nearest similarity in one logistic "
                             "fit; needs --method platt), share, margin or similarity")
    parser.add_argument("--out-of-memory-level", type=float, default=DEFAULT_LEVEL, metavar="A",
                        help="also fit the out-of-memory test on the split: a query whose neighbour (see "
                             "--out-of-memory-statistic) is less similar than in all but a fraction A of the "
                             "split's queries is unlike anything in memory (abstained on with --abstain-below); in "
                             f"(0, 1), default {DEFAULT_LEVEL}")
    parser.add_argument("--out-of-memory-statistic", default=DEFAULT_STATISTIC.value,
                        help="what the test compares: kth_relative (default: the k-th neighbour similarity as it is "
                             "and relative to its neighbours' own, k as --k; searches the memory with its entries "
                             "once), kth (the k-th alone) or nearest")
    parser.add_argument("--no-out-of-memory", dest="out_of_memory", action="store_false",
                        help="fit the vote's confidence alone, without the out-of-memory test")
    parser.add_argument("--bins", type=int, default=15, help="ECE bins (default 15)")
    parser.add_argument("--dry-run", action="store_true", help="fit and report, publish nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _run(argv: Sequence[str]) -> int:
    from evaluation.calibration import fit_from_evaluation, read_evaluation
    from evaluation.stats import expected_calibration_error
    from memory.decide.confidence import CalibrationMethod, ConfidenceScore, publish_calibration
    from memory.decide.voting import VotingRule

    args = build_parser().parse_args(argv)
    try:
        VotingRule.parse(args.rule)
        method, score = CalibrationMethod.parse(args.method), ConfidenceScore.parse(args.score)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if score is ConfidenceScore.COMBINED and method is not CalibrationMethod.PLATT:
        raise UsageError(f"--score combined needs --method platt (got --method {args.method}); isotonic maps one "
                         "score: pass --score share, margin or similarity with it")
    level = args.out_of_memory_level if args.out_of_memory else None
    if level is not None and not 0.0 < level < 1.0:
        raise UsageError(f"--out-of-memory-level must be in (0, 1), got {level}; e.g. {DEFAULT_LEVEL}, or pass "
                         "--no-out-of-memory")
    try:
        statistic = OutOfMemoryStatistic.parse(args.out_of_memory_statistic)
    except ValueError as e:
        raise UsageError(str(e)) from None
    evaluation = read_evaluation(args.evaluation)
    if not 1 <= args.k <= evaluation.k_max:
        raise UsageError(f"--k {args.k} is out of range; the evaluation retrieved {evaluation.k_max} neighbours per "
                         f"query (allowed 1..{evaluation.k_max})")
    root, calibration, correct, raw, calibrated = fit_from_evaluation(
        evaluation, memory=args.memory, rule=args.rule, k=args.k, method=args.method, score=args.score,
        out_of_memory_level=level, out_of_memory_statistic=statistic.value)
    # The raw score as a stand-in probability: share (also for combined) and margin are in [0, 1];
    # similarity is rescaled.
    as_prob = (raw + 1) / 2 if calibration.score is ConfidenceScore.SIMILARITY else raw
    before = expected_calibration_error(as_prob, correct, bins=args.bins)
    after = expected_calibration_error(calibrated, correct, bins=args.bins)
    version = None
    if not args.dry_run:
        version = publish_calibration(root, calibration, expected_version=calibration.fitted_on_version).version
    result = {"memory": root, "calibration": calibration.to_dict(), "ece_raw": before, "ece_calibrated": after,
              "ece_bins": args.bins, "ece_split": "the calibration split itself (in-sample)",
              "published_version": version}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(f"calibration: {calibration.describe()}")
    print(f"ECE ({args.bins} bins, on the calibration split itself): raw {before:.4f} -> calibrated {after:.4f}")
    if calibration.out_of_memory is not None:
        print(f"out-of-memory test: {calibration.out_of_memory.describe()}")
    print(f"published version {version} of {root}" if version else "dry run: nothing published")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem calibrate``; returns the exit status."""
    return run_command("vmem calibrate", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
