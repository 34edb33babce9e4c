"""What every experiment shares: re-voting stored neighbour lists, report files and plots.

Re-voting is how experiments that change only labels or per-entry weights avoid searching again: the
neighbours of a query do not depend on the labels or weights of the memory's entries, so the neighbour
lists ``vmem evaluate`` wrote, relabelled or reweighted by entry id, are exactly what the changed memory
would retrieve. The vote is ``memory.decide.voting.predict_all_k`` over ``evaluation.neighbors_io.to_arrays``,
the same two functions ``vmem vote`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from evaluation import metrics, neighbors_io
from evaluation.html_report import REPORT_HTML, Section, png_paths, write_html
from memory.decide import voting

__all__ = ["Revote", "plot_lines", "revote", "rule_summary", "split_timings", "write_report"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_TIMINGS = "timings.json"
# Result keys holding wall-clock measurements (``add_seconds``, ``speedup``, ...): they go to timings.json, so
# report.json holds only what the data and the seed determine and two runs of one command diff empty.
_TIMING_KEYS = ("seconds", "speedup")


def split_timings(results: Any) -> tuple[Any, Any]:
    """Splits nested results into (everything else, the wall-clock measurements), keeping the nesting.

    A key is a measurement when its name contains "seconds" or "speedup"; the second part holds only the
    branches that lead to one (None when there is none).
    """
    if not isinstance(results, Mapping):
        return results, None
    kept, timed = {}, {}
    for key, value in results.items():
        if any(t in str(key) for t in _TIMING_KEYS):
            timed[key] = value
            continue
        kept[key], sub = split_timings(value)
        if sub is not None:
            timed[key] = sub
    return kept, (timed or None)


@dataclasses.dataclass(frozen=True)
class Revote:
    """Predictions of every rule at every k for a set of neighbour lists.

    Attributes:
      table: ``{rule: {k: accuracy}}``.
      preds: ``{rule name: int64 [n, k_max]}``; column k - 1 is the vote of the first k neighbours.
      true: ``[n]`` true labels.
      seconds: Time spent re-voting (relabelling included).
    """
    table: dict[str, dict[int, float]]
    preds: dict[str, np.ndarray]
    true: np.ndarray
    seconds: float

    def correct(self, rule: str, k: int) -> np.ndarray:
        """Per-query correctness of ``rule`` at ``k``."""
        return self.preds[rule][:, k - 1] == self.true


def neighbor_ids(records: Sequence[neighbors_io.NeighborRecord], k_max: int) -> np.ndarray:
    """``[n, k_max]`` neighbour ids ("" for padding), aligned with ``to_arrays``."""
    out = np.full((len(records), k_max), "", dtype=object)
    for i, r in enumerate(records):
        m = min(len(r.neighbor_ids), k_max)
        out[i, :m] = r.neighbor_ids[:m]
    return out


def _lookup(ids: np.ndarray, values: Mapping[str, float], default: float, dtype) -> np.ndarray:
    flat = [values.get(i, default) if i else default for i in ids.ravel().tolist()]
    return np.asarray(flat, dtype=dtype).reshape(ids.shape)


def revote(records: Sequence[neighbors_io.NeighborRecord], *, k_max: int,
           params: voting.VotingParams = voting.VotingParams(), rules: Iterable[voting.VotingRule] = voting.ALL_RULES,
           relabel: Mapping[str, int] | None = None, entry_weights: Mapping[str, float] | None = None,
           use_stored_weights: bool = True) -> Revote:
    """Votes stored neighbour lists again, optionally under new entry labels or entry weights.

    Args:
      records: Neighbour lists (``vmem evaluate``'s JSONL).
      k_max: Neighbours voted over.
      params: Voting parameters.
      rules: Rules to vote with.
      relabel: ``{entry id: label index}``: the memory's entries under other labels (label noise); entries
        not listed keep their stored label.
      entry_weights: ``{entry id: weight}`` multiplied into the votes (soft pruning); entries not listed
        weigh 1. Replaces any weights stored in the records.
      use_stored_weights: Whether weights stored in the records (a soft-pruned memory) apply when
        ``entry_weights`` is None.
    """
    start = time.perf_counter()
    labels, distances, true, stored = neighbors_io.to_arrays(records, k_max)
    ids = None
    if relabel is not None or entry_weights is not None:
        ids = neighbor_ids(records, k_max)
    if relabel is not None:
        new = _lookup(ids, relabel, -2, np.int64)
        labels = np.where((new >= 0) & (labels >= 0), new, labels)
    weights = stored if use_stored_weights else None
    if entry_weights is not None:
        weights = np.where(labels >= 0, _lookup(ids, entry_weights, 1.0, np.float64), 0.0)
    preds = voting.predict_all_k(labels, distances, rules=list(rules), k_max=k_max, params=params,
                                 entry_weights=weights)
    table = metrics.accuracy_table(preds, true)
    return Revote(table=table, preds={r.value: p for r, p in preds.items()}, true=true,
                  seconds=time.perf_counter() - start)


def read_neighbors(eval_dir: str) -> list[neighbors_io.NeighborRecord]:
    """An evaluation's neighbour lists, sorted by query id (JSONL shard order is the runner's)."""
    return sorted(neighbors_io.read_neighbor_files(neighbors_io.evaluation_files(eval_dir)), key=lambda r: r.query_id)


def table_from_report(report: Mapping[str, Any], key: str = "accuracy", *, k_max: int
                      ) -> dict[str, dict[int, float]]:
    """``report.json``'s accuracy table with int k, for k = 1..k_max.

    ``vmem evaluate`` caps its k at the memory's live entries (a smaller memory than the setup's k_max: a
    subset, a pruned version); past them every vote is the vote of every entry, so the accuracy at the
    report's last k stands for every larger k, as `revote`'s padded arrays give it.
    """
    out = {}
    for rule, by_k in report[key].items():
        table = {int(k): float(a) for k, a in by_k.items()}
        last = max(table)
        out[rule] = {**table, **{k: table[last] for k in range(last + 1, k_max + 1)}}
    return out


def rule_summary(table: Mapping[str, Mapping[int, float]], *, k: int = 10) -> dict[str, dict[str, float]]:
    """Per rule: accuracy at k, the best accuracy over k and the k that reached it (smallest on ties)."""
    best = metrics.best_k(table)
    return {rule: {f"k{k}": float(table[rule][k]), "best": float(best[rule]["accuracy"]),
                   "best_k": int(best[rule]["k"])} for rule in table}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def write_report(out: str, *, name: str, setup: Any, results: Mapping[str, Any], markdown: str,
                 seconds: Mapping[str, float], command: str) -> dict[str, str]:
    """Writes ``report.json``, ``timings.json``, ``report.md`` and ``report.html`` for one experiment; returns
    their paths.

    ``report.json`` holds ``experiment``, ``setup`` (every parameter), ``command`` and ``results`` without
    wall-clock measurements (`split_timings`): two runs of one seeded command write the same bytes.
    ``timings.json`` holds ``seconds`` (by job) and ``results``' measurements, under the same keys.
    Numbers are plain JSON floats. ``report.html`` shows all of it with every PNG plot in ``out`` embedded
    (evaluation.html_report), and opens offline.
    """
    os.makedirs(out, exist_ok=True)
    kept, timed = split_timings(results)
    payload = {"schema_version": 2, "experiment": name, "command": command,
               "setup": dataclasses.asdict(setup) if dataclasses.is_dataclass(setup) else dict(setup),
               "results": kept}
    timings = {"experiment": name, "seconds": {k: round(float(v), 2) for k, v in seconds.items()},
               "results": timed or {}}
    paths = {"json": os.path.join(out, REPORT_JSON), "timings": os.path.join(out, REPORT_TIMINGS),
             "markdown": os.path.join(out, REPORT_MD)}
    for key, content in (("json", payload), ("timings", timings)):
        with open(paths[key], "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(f"# Experiment: {name}\n\n`{command}`\n\n{markdown.rstrip()}\n\n")
        f.write("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + "\n")
    paths["html"] = write_html(os.path.join(out, REPORT_HTML), f"Experiment: {name}", [
        Section("Results", markdown=markdown, figures=png_paths(out)),
        Section("Setup", facts=payload["setup"]), Section("Seconds", facts=timings["seconds"]),
        Section("report.json results", data=kept)], command=command)
    return paths


def plot_lines(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
               ylabel: str, title: str, logx: bool = False, logy: bool = False,
               references: Sequence[tuple[str, float]] = (), styles: Mapping[str, str] | None = None,
               bands: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None) -> str:
    """One line per series (x, y), dashed horizontal references, optional shaded bands; writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, (styles or {}).get(label, "-"), marker=".", markersize=4, color=f"C{i % 10}", label=label)
    for i, (label, (x, low, high)) in enumerate((bands or {}).items()):
        ax.fill_between(x, low, high, alpha=0.15, color=f"C{i % 10}", label=label)
    for j, (label, y) in enumerate(references):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{(len(series) + j) % 10}", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_bars(path: str, groups: Sequence[str], bars: Mapping[str, Sequence[float]], *, ylabel: str, title: str,
              ylim: tuple[float, float] | None = None) -> str:
    """Grouped bars: one group per entry of ``groups``, one bar per series of ``bars``; writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(bars), 1)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(bars.items()):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label, color=f"C{i % 10}")
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# Two searches of the same entries can differ in the last float32 bits of a distance (the query batch a
# query lands in changes how ScaNN's brute-force matmul is blocked: seen up to 1.1e-6 here), which can swap
# two neighbours at a near-tie. Comparisons allow that and nothing else.
TIE_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class ListComparison:
    """How two evaluations' neighbour lists of the same queries compare (ids by position, distances).

    Attributes:
      queries: Queries compared.
      identical: Lists with the same ids in the same order.
      near_tie_swaps: Lists that differ only where the two distances at a position are within
        TIE_TOLERANCE (near-tied neighbours in another order).
      other_differences: Lists that differ otherwise (or queries missing from one side): a real difference.
      max_distance_gap: Largest distance difference at one position.
    """
    queries: int
    identical: int
    near_tie_swaps: int
    other_differences: int
    max_distance_gap: float

    @property
    def equivalent(self) -> bool:
        return self.other_differences == 0

    def accuracy_bound(self) -> float:
        """The largest accuracy difference near-tie swaps can explain: each swapped query flips at most once."""
        return self.near_tie_swaps / max(self.queries, 1)


def _compare_pair(ids_a, dist_a, ids_b, dist_b) -> tuple[str, float]:
    if len(ids_a) != len(ids_b):
        return "different", float("inf")
    gaps = np.abs(np.subtract(dist_a, dist_b)) if len(ids_a) else np.zeros(0)
    gap = float(gaps.max(initial=0.0))
    if list(ids_a) == list(ids_b):
        return "identical", gap
    mismatched = np.asarray([x != y for x, y in zip(ids_a, ids_b)])
    return ("ties" if bool((gaps[mismatched] <= TIE_TOLERANCE).all()) else "different"), gap


def compare_neighbor_lists(a: Sequence[neighbors_io.NeighborRecord], b: Sequence[neighbors_io.NeighborRecord],
                           *, drop_labels_from_a: Iterable[int] = ()) -> ListComparison:
    """Compares two evaluations' lists query by query (both sorted by query id, as `read_neighbors` gives).

    ``drop_labels_from_a`` removes neighbours of those labels from ``a`` first and compares the rest with
    the same-length prefix of ``b`` (an add: the old list is the new list without the new classes).
    """
    drop = set(drop_labels_from_a)
    counts = {"identical": 0, "ties": 0, "different": abs(len(a) - len(b))}
    largest = 0.0
    for x, y in zip(a, b):
        if x.query_id != y.query_id:
            counts["different"] += 1
            continue
        kept = [(i, d) for i, lab, d in zip(x.neighbor_ids, x.neighbor_labels, x.neighbor_distances)
                if lab not in drop]
        m = len(kept)
        verdict, gap = _compare_pair([i for i, _ in kept], [d for _, d in kept], y.neighbor_ids[:m],
                                     y.neighbor_distances[:m])
        counts[verdict] += 1
        if np.isfinite(gap):
            largest = max(largest, gap)
    return ListComparison(queries=max(len(a), len(b)), identical=counts["identical"], near_tie_swaps=counts["ties"],
                          other_differences=counts["different"], max_distance_gap=largest)


def max_table_difference(a: Mapping[str, Mapping[int, float]], b: Mapping[str, Mapping[int, float]]) -> float:
    """Largest accuracy difference over every rule and k of two tables of the same rules and ks."""
    if set(a) != set(b) or any(set(a[r]) != set(b[r]) for r in a):
        return float("inf")
    return max(abs(a[r][k] - b[r][k]) for r in a for k in a[r])


def check_equivalent(what: str, lists: ListComparison, table_a, table_b) -> dict[str, Any]:
    """Verifies that two ways to one answer agree up to near-tie swaps; returns the evidence as a dict.

    Raises:
      RuntimeError: naming ``what``, on a real difference in the lists or an accuracy difference that
        the near-tie swaps cannot explain.
    """
    diff = max_table_difference(table_a, table_b)
    evidence = {**dataclasses.asdict(lists), "max_accuracy_difference": diff,
                "accuracy_difference_bound": lists.accuracy_bound(), "identical_tables": diff == 0.0}
    if not lists.equivalent or diff > lists.accuracy_bound() + 1e-12:
        raise RuntimeError(f"{what}: the two disagree beyond near-tie swaps ({evidence}); this is a bug")
    return evidence
