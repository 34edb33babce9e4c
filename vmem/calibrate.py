"""``vmem calibrate``: fit the confidence of a memory's votes on a held-out split and store it in the memory.

A vote's raw confidence (the winner's share of the score, the margin to the runner-up, or the nearest
neighbour's similarity; see memory.decide.confidence) is not a probability. This command fits the map from it to
"the vote is right" on the neighbour lists of a labelled split the memory never saw -- the output
directory of ``vmem evaluate`` on that split -- and publishes it as the memory's next version. From then on
``vmem classify`` and ``VisualMemory.classify`` report calibrated confidences for that rule and k, and
``--abstain-below P`` / ``abstain_below=P`` answers "unknown" below P.

Example::

        vmem evaluate --memory out/fmnist-memory --images data/fashion-mnist/calib --output out/calib-eval
        vmem calibrate --evaluation out/calib-eval --rule rank --k 10 [--method platt] [--score combined]
        vmem classify --memory out/fmnist-memory img.png --abstain-below 0.9

The memory is the one the evaluation searched (``--memory`` to name it explicitly); the evaluation must
have searched the memory's latest version (otherwise re-run ``vmem evaluate``). The voting parameters
(tau, alpha) are the evaluation's. ECE before and after is printed: measured on the same split the map was
fitted on, so the "after" figure is optimistic; the ``abstain`` experiment measures it on another split.

Exit status: 0 on success (or a --dry-run), 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from evaluation import neighbors_io
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "fit_from_evaluation", "main"]


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
    parser.add_argument("--bins", type=int, default=15, help="ECE bins (default 15)")
    parser.add_argument("--dry-run", action="store_true", help="fit and report, publish nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _evaluation_inputs(directory: str):
    report_path = os.path.join(directory, "report.json")
    try:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--evaluation {directory!r} holds no report.json; pass the --output directory of a "
                         "`vmem evaluate` run") from None
    try:
        files = neighbors_io.evaluation_files(directory)
    except FileNotFoundError:
        raise UsageError(f"--evaluation {directory!r} holds no neighbors-*.jsonl files") from None
    return report, neighbors_io.read_neighbor_files(files)


def fit_from_evaluation(directory: str, *, memory: str | None = None, rule: str = "rank", k: int = 10,
                        method: str = "platt", score: str = "combined"):
    """Fits a calibration on a ``vmem evaluate`` output directory.

    Returns:
      ``(root, calibration, correct, raw, calibrated)``: the memory root, the fitted
      ``memory.decide.confidence.Calibration`` and the split's per-query correctness, raw scores and calibrated
      confidences (for ECE).

    Raises:
      UsageError: naming the bad value: no report, a memory that changed since, k beyond the neighbours.
    """
    import numpy as np

    from memory.decide.confidence import fit_on_confidence, raw_score, vote_confidence
    from memory.store.versions import read_manifest
    from memory.decide.voting import VotingParams

    report, records = _evaluation_inputs(directory)
    extra = report.get("extra") or {}
    root = (memory or extra.get("memory") or "").rstrip("/")
    if not root:
        raise UsageError(f"{directory}/report.json does not name the memory; pass --memory")
    latest = read_manifest(root)
    searched = extra.get("memory_version")
    if searched is not None and searched != latest.version:
        raise UsageError(f"the evaluation in {directory} searched version {searched} of {root}, which is now at "
                         f"version {latest.version}; re-run `vmem evaluate` on the held-out split first")
    k_max = int(report.get("k_max") or 0)
    if not 1 <= k <= k_max:
        raise UsageError(f"--k {k} is out of range; the evaluation retrieved {k_max} neighbours per query "
                         f"(allowed 1..{k_max})")
    params = VotingParams(softmax_tau=float(extra.get("softmax_tau", 0.07)),
                          rank_alpha=float(extra.get("rank_alpha", 2.0)))
    labels, distances, true, weights = neighbors_io.to_arrays(records, k_max)
    try:
        vc = vote_confidence(labels, distances, rule=rule, k=k, params=params, entry_weights=weights)
        calibration = fit_on_confidence(vc, true, rule=rule, k=k, params=params, method=method, score=score,
                                        fitted_on_version=latest.version, source=os.path.abspath(directory))
    except ValueError as e:
        raise UsageError(str(e)) from None
    correct = (vc.labels == true) & (true >= 0)
    return root, calibration, np.asarray(correct), raw_score(vc, calibration.score), calibration.confidence(vc)


def _run(args: argparse.Namespace) -> int:
    from evaluation.stats import expected_calibration_error
    from memory.decide.confidence import ConfidenceScore, publish_calibration

    root, calibration, correct, raw, calibrated = fit_from_evaluation(
        args.evaluation, memory=args.memory, rule=args.rule, k=args.k, method=args.method, score=args.score)
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
    print(f"published version {version} of {root}" if version else "dry run: nothing published")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem calibrate``; returns the exit status (0 ok, 2 usage or input error)."""
    from memory.store.manifest import ManifestError
    from memory.store.versions import ConcurrentUpdateError
    return run_command("vmem calibrate", build_parser(), _run, argv,
                       errors=(ValueError, ManifestError, ConcurrentUpdateError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
