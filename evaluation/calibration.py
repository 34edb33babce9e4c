"""Fitting a memory's vote confidence on a ``vmem evaluate`` output directory (``vmem calibrate``'s work).

A held-out split the memory never saw is evaluated (its report.json and neighbour lists); the map from a
vote's raw confidence to "the vote is right" is fitted on it (memory.decide.confidence) for one rule and k,
with the evaluation's voting parameters. Publishing the fit as the memory's next version is
``memory.decide.confidence.publish_calibration``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from evaluation import neighbors_io
from pipelines.records import NeighborRecord

if TYPE_CHECKING:  # Annotations only: the memory is opened where it is needed.
    from memory.decide.out_of_memory import EntrySimilarities
    from memory.visual_memory import VisualMemory

__all__ = ["CalibrationFit", "EvaluationOutput", "entry_similarities", "fit_from_evaluation", "neighbor_id_array",
           "read_evaluation"]

# Entries searched per batch by the memory's self-search (entry_similarities).
_SELF_SEARCH_BATCH = 4096


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


def neighbor_id_array(records: Sequence[NeighborRecord], k: int) -> np.ndarray:
    """``[n, k]`` neighbour entry ids of each record, nearest first, "" past its list (the search's padding)."""
    out = np.full((len(records), k), "", dtype=object)
    for row, r in enumerate(records):
        ids = list(r.neighbor_ids)[:k]
        out[row, :len(ids)] = ids
    return out.astype(str)


def entry_similarities(memory: VisualMemory, *, k: int, batch: int = _SELF_SEARCH_BATCH) -> EntrySimilarities:
    """Each live entry's own k-th neighbour similarity among the other entries: the memory searched with its
    entries (leave-one-out), through the memory's own search.

    Args:
      memory: An open ``memory.visual_memory.VisualMemory``.
      k: The neighbour whose similarity is kept (the calibrated vote's k).
      batch: Entries searched at a time.

    Returns:
      A ``memory.decide.out_of_memory.EntrySimilarities``; an entry with fewer than k other entries keeps its
      farthest one's.
    """
    from memory.decide.out_of_memory import EntrySimilarities  # pylint: disable=g-import-not-at-top
    ids = memory.live_entry_ids()
    sims = np.empty(ids.size, dtype=np.float32)
    for lo in range(0, ids.size, batch):
        chunk = ids[lo:lo + batch]
        found = memory.search(memory.get_embeddings(chunk), k + 1)
        # Leave-one-out: drop the entry itself (not always first: an exact duplicate ties with it).
        others = (found.ids != chunk[:, None]) & (found.ids != "")
        distances = np.where(others, found.distances, np.inf)
        distances = np.sort(distances, axis=1)[:, :k]
        last = np.where(np.isfinite(distances), distances, -np.inf).max(axis=1)
        sims[lo:lo + chunk.size] = np.where(np.isfinite(last), 1.0 - last, -1.0)
    return EntrySimilarities(ids=ids, similarity=np.clip(sims, -1.0, 1.0), k=int(k))


def fit_from_evaluation(evaluation: EvaluationOutput, *, memory: str | None = None, rule: str = "rank", k: int = 10,
                        method: str = "platt", score: str = "combined",
                        out_of_memory_level: float | None = None,
                        out_of_memory_statistic: str = "kth_relative") -> CalibrationFit:
    """Fits a calibration on an evaluation of the memory's latest version.

    Args:
      evaluation: From `read_evaluation`.
      memory: The memory to calibrate (default: the one the evaluation searched, from its report).
      rule, k: The vote to calibrate (k <= the evaluation's k_max).
      method, score: See memory.decide.confidence.
      out_of_memory_level: Also fit the out-of-memory test at this level on the split (memory.decide.out_of_memory;
        the split's queries of classes the memory holds are its in-memory sample); None fits none.
      out_of_memory_statistic: What the test compares (nearest, kth, or kth_relative: which also searches the
        memory with its own entries, `entry_similarities`).

    Raises:
      ValueError: naming the problem and the fix: no memory named, a memory that changed since the
        evaluation, k beyond the neighbours, or a fit the split cannot support.
    """
    from memory.decide.confidence import (  # pylint: disable=g-import-not-at-top
        fit_on_confidence, raw_score, vote_confidence)
    from memory.decide.out_of_memory import OutOfMemoryStatistic  # pylint: disable=g-import-not-at-top
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
    entries = None
    if out_of_memory_level is not None and OutOfMemoryStatistic.parse(out_of_memory_statistic).needs_entries:
        from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
        entries = entry_similarities(VisualMemory.open(root, version=latest.version), k=k)
    calibration = fit_on_confidence(vc, true, rule=rule, k=k, params=params, method=method, score=score,
                                    fitted_on_version=latest.version, source=os.path.abspath(directory),
                                    out_of_memory_level=out_of_memory_level,
                                    out_of_memory_statistic=out_of_memory_statistic,
                                    neighbor_ids=neighbor_id_array(evaluation.records, k), entries=entries)
    correct = (vc.labels == true) & (true >= 0)
    return CalibrationFit(root, calibration, np.asarray(correct), raw_score(vc, calibration.score),
                          calibration.confidence(vc))
