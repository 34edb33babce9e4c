"""From neighbour lists to an accuracy report: the one path of ``vmem vote`` and ``vmem evaluate``.

`count_votes` votes neighbour records with every rule at every k (``memory.decide.voting.predict_all_k`` over
``evaluation.neighbors_io.to_arrays``), a chunk of records at a time, and sums the per-rule, per-k counts of
correct answers, so its memory does not grow with the number of queries. ``vmem vote`` runs it over any
neighbour files; `write_evaluation_report` runs it over the files the evaluate job wrote and adds what the
job counted (its `pipelines.records.EvaluationSummary`): failed records, the memory's version and weights,
the query classes the memory does not know, the re-rank summary and the raw-pixel baseline.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from evaluation import neighbors_io
from evaluation import report as report_lib
from evaluation.metrics import CorrectCounts
from memory import storage
from memory.decide.voting import ALL_RULES, VotingParams, VotingRule, predict_all_k
from pipelines.records import EvaluationSummary, NeighborRecord

__all__ = ["NoRecordsError", "VoteCounts", "count_votes", "read_evaluation_summary", "write_evaluation_report"]

# Records voted at once: [chunk, k_max] arrays per rule, a few MB at k_max 100, plus the chunk's parsed records.
CHUNK_RECORDS = 4096


class NoRecordsError(ValueError):
    """`count_votes` was given no record."""


class VoteCounts(NamedTuple):
    """Correct answers per rule and k of a set of queries.

    Attributes:
      counts: The vote with the records' entry weights, when they carry them (a soft-pruned memory).
      unpruned: With ``unpruned=True`` and weighted records, the same neighbours voted without weights; else None.
      weighted: Whether the records carry entry weights (all of them do, or none).
    """
    counts: CorrectCounts
    unpruned: CorrectCounts | None
    weighted: bool = False


def _add(total: CorrectCounts | None, part: CorrectCounts) -> CorrectCounts:
    """``total + part``, the narrower widened first (its queries' lists all end before the wider's k_max)."""
    if total is None:
        return part
    width = max(total.k_max, part.k_max)
    return CorrectCounts.sum([total.widened(width), part.widened(width)])


def count_votes(records: Iterable[NeighborRecord], *, k_max: int | None = None,
                rules: Sequence[VotingRule] = ALL_RULES, params: VotingParams = VotingParams(),
                unpruned: bool = False, chunk_records: int = CHUNK_RECORDS) -> VoteCounts:
    """Votes every record with each rule at k = 1..k_max and counts the correct answers.

    Records are read, voted and counted one chunk at a time, and only the running counts are kept, so memory
    is bounded by the chunk, not by the number of records. Each chunk is voted up to its own longest list:
    beyond a list its vote no longer changes (padding never votes), so no array is wider than the neighbour
    lists themselves, whatever ``k_max`` is asked.

    Args:
      records: Neighbour lists, nearest first (their order does not matter); an iterator is read once.
      k_max: Largest k counted, >= 1; capped at the longest neighbour list (the counts then end there). None:
        the longest list.
      rules: The voting rules, in report order.
      params: Voting parameters.
      unpruned: Also count the vote without entry weights, when the records carry them.
      chunk_records: Records voted at once.

    Raises:
      NoRecordsError: on no records.
      ValueError: on k_max < 1, a list not sorted nearest first, or entry weights on only some
        records.
    """
    if k_max is not None and k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    total, unweighted, weighted = None, None, set()
    records = iter(records)
    while chunk := list(itertools.islice(records, chunk_records)):
        longest = max(max(len(r.neighbor_labels) for r in chunk), 1)
        k = longest if k_max is None else min(k_max, longest)
        labels, distances, true, weights = neighbors_io.to_arrays(chunk, k)
        weighted.add(weights is not None)
        if len(weighted) > 1:
            raise ValueError(f"only some records carry neighbor_entry_weights (query {chunk[0].query_id!r} and "
                             "others differ); write them for every query or for none")
        total = _add(total, CorrectCounts.of(predict_all_k(labels, distances, rules=list(rules), k_max=k,
                                                           params=params, entry_weights=weights), true))
        if unpruned and weights is not None:
            unweighted = _add(unweighted, CorrectCounts.of(predict_all_k(labels, distances, rules=list(rules),
                                                                         k_max=k, params=params), true))
    if total is None:
        raise NoRecordsError("no neighbour records to vote on")
    return VoteCounts(total, unweighted, weighted=weighted == {True})


def read_evaluation_summary(output: str) -> EvaluationSummary:
    """The summary the evaluate job wrote into ``output``.

    Raises:
      FileNotFoundError: naming the directory, when the job did not finish there.
    """
    path = storage.join(output, EvaluationSummary.FILE_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"{output} holds no {EvaluationSummary.FILE_NAME}: the evaluate job did not finish "
                                "there; run `vmem evaluate --output` on it")
    return EvaluationSummary.from_json(storage.read_text(path))


def _pixel_baseline(summary: EvaluationSummary) -> dict[str, float]:
    import numpy as np  # pylint: disable=g-import-not-at-top

    from evaluation.baselines import memory_pixel_baseline  # pylint: disable=g-import-not-at-top
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    manifest = read_manifest(summary.memory, version=summary.memory_version)
    return memory_pixel_baseline(summary.memory, manifest, [uri for _, uri, _ in summary.pixel_queries],
                                 np.array([label for _, _, label in summary.pixel_queries], dtype=np.int64),
                                 k=summary.pixel_baseline)


def _write(output: str, report: dict[str, Any], baselines: dict[str, float]) -> None:
    """report.json, report.md and the plot into ``output`` (local or gs://)."""
    if not storage.is_gcs(output):
        report_lib.write_report(output, report, baselines=baselines)
        return
    with tempfile.TemporaryDirectory() as tmp:
        report_lib.write_report(tmp, report, baselines=baselines)
        storage.upload_dir(tmp, output)


def write_evaluation_report(output: str) -> dict[str, Any]:
    """Votes the neighbour files the evaluate job wrote into ``output`` and writes its report there.

    Every rule at every k up to the job's k_max, with the job's voting parameters; on a soft-pruned memory
    ``accuracy`` is the weighted vote and ``accuracy_unpruned`` the unweighted one (evaluation.report).

    Returns:
      The report as written to ``output/report.json`` (baselines included).

    Raises:
      FileNotFoundError: the job did not finish in ``output``.
      ValueError: the neighbour files no longer hold the queries the job answered.
    """
    summary = read_evaluation_summary(output)
    params = VotingParams(softmax_tau=summary.softmax_tau, rank_alpha=summary.rank_alpha)
    records = itertools.chain.from_iterable(neighbors_io.iter_records(f) for f in summary.neighbor_files)
    votes = count_votes(records, k_max=summary.k_max, params=params, unpruned=True)
    # The report covers k = 1..k_max of the job even where every list is shorter (a filter, a small memory).
    votes = VoteCounts(votes.counts.widened(summary.k_max),
                       None if votes.unpruned is None else votes.unpruned.widened(summary.k_max), votes.weighted)
    if votes.counts.queries != summary.queries:
        raise ValueError(f"the neighbour files of {output} hold {votes.counts.queries} queries but the job answered "
                         f"{summary.queries}; re-run `vmem evaluate`")
    baselines = _pixel_baseline(summary) if summary.pixel_baseline else {}
    rerank = {} if summary.rerank is None else {"rerank": dict(summary.extra.get("rerank") or {}, **summary.rerank)}
    report = report_lib.build_report(
        votes.counts.table(), queries=votes.counts.queries, failed=summary.failed, extra=dict(
            summary.extra, neighbor_files=list(summary.neighbor_files), memory_entries=summary.memory_entries,
            memory_version=summary.memory_version, entry_weights=summary.entry_weights,
            query_classes_unknown_to_memory=list(summary.unknown_labels), softmax_tau=params.softmax_tau,
            rank_alpha=params.rank_alpha, rank_convention="weight 1/(alpha + i), i 0-based",
            tie_rule="first class to reach the top score wins", **rerank),
        unpruned_table=None if votes.unpruned is None else votes.unpruned.table())
    _write(output, report, baselines)
    return dict(report, baselines=baselines)
