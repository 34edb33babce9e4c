"""Fitting a memory's vote confidence on a ``vmem evaluate`` output directory (``vmem calibrate``'s work).

A held-out split the memory never saw is evaluated (its report.json and neighbour lists); the map from a
vote's raw confidence to "the vote is right" is fitted on it (memory.decide.confidence) for one rule and k,
with the evaluation's voting parameters. Publishing the fit as the memory's next version is
``memory.decide.confidence.publish_calibration``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from evaluation import neighbors_io
from pipelines.records import NeighborRecord

__all__ = ["CalibrationFit", "EvaluationOutput", "fit_from_evaluation", "read_evaluation"]


class EvaluationOutput(NamedTuple):
    """What a ``vmem evaluate --output DIR`` wrote: its report and its neighbour lists."""
    directory: str
    report: dict[str, Any]
    records: list[NeighborRecord]

    @property
    def k_max(self) -> int:
        """Neighbours retrieved per query."""
        return int(self.report.get("k_max") or 0)


class CalibrationFit(NamedTuple):
    """A fitted calibration and what it was fitted on.

    Attributes:
      root: The memory's root.
      calibration: The fitted ``memory.decide.confidence.Calibration`` (its ``fitted_on_version`` is the
        memory's latest version).
      correct: Per query of the split, whether the vote was right.
      raw: Per query, the raw score the calibration maps.
      calibrated: Per query, the calibrated confidence.
    """
    root: str
    calibration: Any
    correct: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray


def read_evaluation(directory: str) -> EvaluationOutput:
    """Reads an evaluation's report.json and neighbour lists.

    Raises:
      FileNotFoundError: naming the directory, when it holds no report.json or no neighbour files.
    """
    try:
        with open(os.path.join(directory, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--evaluation {directory!r} holds no report.json; pass the --output directory of "
                                "a `vmem evaluate` run") from None
    try:
        files = neighbors_io.evaluation_files(directory)
    except FileNotFoundError:
        raise FileNotFoundError(f"--evaluation {directory!r} holds no neighbors-*.jsonl files") from None
    return EvaluationOutput(directory, report, neighbors_io.read_neighbor_files(files))


def fit_from_evaluation(evaluation: EvaluationOutput, *, memory: str | None = None, rule: str = "rank", k: int = 10,
                        method: str = "platt", score: str = "combined",
                        out_of_memory_level: float | None = None,
                        out_of_memory_statistic: str = "nearest") -> CalibrationFit:
    """Fits a calibration on an evaluation of the memory's latest version.

    Args:
      evaluation: From `read_evaluation`.
      memory: The memory to calibrate (default: the one the evaluation searched, from its report).
      rule, k: The vote to calibrate (k <= the evaluation's k_max).
      method, score: See memory.decide.confidence.
      out_of_memory_level: Also fit the out-of-memory test at this level on the split (memory.decide.out_of_memory;
        the split's queries of classes the memory holds are its in-memory sample); None fits none.
      out_of_memory_statistic: Which neighbour's similarity the test compares (nearest or kth).

    Raises:
      ValueError: naming the problem and the fix: no memory named, a memory that changed since the
        evaluation, k beyond the neighbours, or a fit the split cannot support.
    """
    from memory.decide.confidence import (  # pylint: disable=g-import-not-at-top
        fit_on_confidence, raw_score, vote_confidence)
    from memory.decide.voting import VotingParams  # pylint: disable=g-import-not-at-top
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top

    directory = evaluation.directory
    extra = evaluation.report.get("extra") or {}
    root = (memory or extra.get("memory") or "").rstrip("/")
    if not root:
        raise ValueError(f"{directory}/report.json does not name the memory; pass --memory")
    latest = read_manifest(root)
    searched = extra.get("memory_version")
    if searched is not None and searched != latest.version:
        raise ValueError(f"the evaluation in {directory} searched version {searched} of {root}, which is now at "
                         f"version {latest.version}; re-run `vmem evaluate` on the held-out split first")
    k_max = evaluation.k_max
    if not 1 <= k <= k_max:
        raise ValueError(f"k {k} is out of range; the evaluation retrieved {k_max} neighbours per query "
                         f"(allowed 1..{k_max})")
    params = VotingParams(softmax_tau=float(extra.get("softmax_tau", 0.07)),
                          rank_alpha=float(extra.get("rank_alpha", 2.0)))
    labels, distances, true, weights = neighbors_io.to_arrays(evaluation.records, k_max)
    vc = vote_confidence(labels, distances, rule=rule, k=k, params=params, entry_weights=weights)
    calibration = fit_on_confidence(vc, true, rule=rule, k=k, params=params, method=method, score=score,
                                    fitted_on_version=latest.version, source=os.path.abspath(directory),
                                    out_of_memory_level=out_of_memory_level,
                                    out_of_memory_statistic=out_of_memory_statistic)
    correct = (vc.labels == true) & (true >= 0)
    return CalibrationFit(root, calibration, np.asarray(correct), raw_score(vc, calibration.score),
                          calibration.confidence(vc))
