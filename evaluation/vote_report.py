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

__all__ = ["VoteCounts", "count_votes", "read_evaluation_summary", "write_evaluation_report"]

# Records voted at once: [chunk, k_max] arrays per rule, a few MB at k_max 100.
CHUNK_RECORDS = 4096


class VoteCounts(NamedTuple):
    """Correct answers per rule and k of a set of queries.

    Attributes:
      counts: The vote with the records' entry weights, when they carry them (a soft-pruned memory).
      unpruned: With ``unpruned=True`` and weighted records, the same neighbours voted without weights; else None.
    """
    counts: CorrectCounts
    unpruned: CorrectCounts | None


def count_votes(records: Iterable[NeighborRecord], *, k_max: int, rules: Sequence[VotingRule] = ALL_RULES,
                params: VotingParams = VotingParams(), unpruned: bool = False,
                chunk_records: int = CHUNK_RECORDS) -> VoteCounts:
    """Votes every record with each rule at k = 1..k_max and counts the correct answers.

    Args:
      records: Neighbour lists, nearest first (their order does not matter).
      k_max: Neighbours voted over; shorter lists are padded (padding never votes).
      rules: The voting rules, in report order.
      params: Voting parameters.
      unpruned: Also count the vote without entry weights, when the records carry them.
      chunk_records: Records voted at once.

    Raises:
      ValueError: on no records, a list not sorted nearest first, or entry weights on only some records.
    """
    parts, unweighted, weighted = [], [], set()
    records = iter(records)
    while chunk := list(itertools.islice(records, chunk_records)):
        labels, distances, true, weights = neighbors_io.to_arrays(chunk, k_max)
        weighted.add(weights is not None)
        if len(weighted) > 1:
            raise ValueError(f"only some records carry neighbor_entry_weights (query {chunk[0].query_id!r} and "
                             "others differ); write them for every query or for none")
        parts.append(CorrectCounts.of(predict_all_k(labels, distances, rules=list(rules), k_max=k_max,
                                                    params=params, entry_weights=weights), true))
        if unpruned and weights is not None:
            unweighted.append(CorrectCounts.of(predict_all_k(labels, distances, rules=list(rules), k_max=k_max,
                                                             params=params), true))
    if not parts:
        raise ValueError("no neighbour records to vote on")
    return VoteCounts(CorrectCounts.sum(parts), CorrectCounts.sum(unweighted) if unweighted else None)


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
