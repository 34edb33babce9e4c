"""Accuracy reports: report.json, report.md and accuracy_vs_k.png.

Schema of ``report.json`` (``build_report`` returns the same dict, except that
``write_report`` adds ``baselines``)::

        {
            "schema_version": 1,
            "queries": 50000,          # queries that were voted on (the denominator)
            "failed": 0,               # queries that could not be evaluated (not in
                                                                  # the denominator), e.g. dead-lettered ones
            "k_max": 100,
            "rules": ["plurality", "rank"],
            "accuracy": {"rank": {"1": 0.811, "2": 0.811, ...}},
            "best": {"rank": {"k": 20, "accuracy": 0.836}},
            "extra": {...},            # caller's free-form, JSON-serialisable info
            "baselines": {"linear probe": 0.863}
        }

A report of a soft-pruned memory (neighbours carrying entry weights) also has
``"accuracy_unpruned"`` and ``"best_unpruned"`` (same layout): ``accuracy`` is
then the weighted vote ("with pruning") and ``accuracy_unpruned`` the same
neighbours voted without weights; report.md shows both tables.

Accuracies are fractions in [0, 1]. JSON object keys are strings, so the k
keys of ``accuracy`` are strings ("1", "2", ...); use
:func:`accuracy_from_report` to get ``{rule: {int k: accuracy}}`` back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from evaluation.metrics import best_k

__all__ = [
    "SCHEMA_VERSION",
    "accuracy_from_report",
    "build_report",
    "markdown_table",
    "table_ks",
    "tune_markdown",
    "write_report",
]

SCHEMA_VERSION = 1
_ROW_KS = (1, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_k.png"


def build_report(
    table: Mapping[str, Mapping[int, float]],
    *,
    queries: int,
    failed: int,
    extra: Mapping[str, Any] | None = None,
    unpruned_table: Mapping[str, Mapping[int, float]] | None = None,
) -> dict[str, Any]:
    """Assembles the report dict (see the module docstring for the schema).

    Args:
        table: ``{rule name: {k: accuracy}}`` from
            ``evaluation.metrics.accuracy_table``.
        queries: Number of queries the accuracies are computed over.
        failed: Number of queries that could not be evaluated.
        extra: JSON-serialisable details (inputs, parameters, timings).
        unpruned_table: For a soft-pruned memory, the accuracy table of the
            same neighbours voted without entry weights; stored as
            ``accuracy_unpruned`` / ``best_unpruned`` (``table`` is then the
            weighted one).

    Raises:
        ValueError: on an empty table, negative counts or non-serialisable extra.
    """
    if not table:
        raise ValueError("accuracy table is empty; evaluate at least one rule")
    if queries < 0 or failed < 0:
        raise ValueError(
            f"queries and failed must be >= 0, got {queries} and {failed}")
    extra = dict(extra or {})
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra is not JSON-serialisable: {e}") from None
    k_max = max(int(k) for by_k in table.values() for k in by_k)
    report = {
        "schema_version": SCHEMA_VERSION,
        "queries": int(queries),
        "failed": int(failed),
        "k_max": k_max,
        "rules": list(table),
        "accuracy": {rule: {str(int(k)): float(a)
                            for k, a in sorted(by_k.items(),
                                               key=lambda ka: int(ka[0]))}
                     for rule, by_k in table.items()},
        "best": best_k(table),
        "extra": extra,
    }
    if unpruned_table is not None:
        if set(unpruned_table) != set(table):
            raise ValueError(f"unpruned_table rules {sorted(unpruned_table)} != "
                             f"table rules {sorted(table)}")
        report["accuracy_unpruned"] = _string_keys(unpruned_table)
        report["best_unpruned"] = best_k(unpruned_table)
    return report


def _string_keys(table: Mapping[str, Mapping[int, float]]
                 ) -> dict[str, dict[str, float]]:
    return {rule: {str(int(k)): float(a)
                   for k, a in sorted(by_k.items(), key=lambda ka: int(ka[0]))}
            for rule, by_k in table.items()}


def accuracy_from_report(report: Mapping[str, Any], key: str = "accuracy"
                         ) -> dict[str, dict[int, float]]:
    """``report[key]`` (``"accuracy"`` or ``"accuracy_unpruned"``) with integer k
    keys (JSON stores strings)."""
    return {rule: {int(k): float(a) for k, a in by_k.items()}
            for rule, by_k in report[key].items()}


def table_ks(k_max: int) -> list[int]:
    """The k rows shown in the Markdown table: 1, 3, 5, 10, ... and k_max."""
    ks = [k for k in _ROW_KS if k <= k_max]
    if k_max not in ks:
        ks.append(k_max)
    return ks


def _check_baselines(baselines: Mapping[str, float] | None
                     ) -> dict[str, float]:
    out = {}
    for name, value in (baselines or {}).items():
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(
                f"baseline {name!r}={value} must be a fraction in [0, 1] "
                f"(e.g. 0.863 for 86.3%)")
        out[str(name)] = value
    return out


def _table_lines(accuracy: Mapping[str, Mapping[int, float]],
                 best: Mapping[str, Any], rules: list[str],
                 k_max: int) -> list[str]:
    lines = [
        "| k | " + " | ".join(rules) + " |",
        "|---:|" + "---:|" * len(rules),
    ]
    for k in table_ks(k_max):
        cells = []
        for rule in rules:
            a = accuracy[rule].get(k)
            cells.append("" if a is None else f"{100 * a:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| best | " + " | ".join(
        f"{100 * best[r]['accuracy']:.2f} (k={best[r]['k']})" for r in rules)
                 + " |")
    return lines


def markdown_table(report: Mapping[str, Any], *,
                   baselines: Mapping[str, float] | None = None) -> str:
    """Renders the report as Markdown (top-1 in percent, rules as columns).

    A report with ``accuracy_unpruned`` (soft-pruned memory) gets two tables:
    with pruning (the weighted vote) and without (the same neighbours,
    unweighted).
    """
    accuracy = accuracy_from_report(report)
    rules = list(report["rules"])
    baselines = _check_baselines(baselines)
    k_max = int(report["k_max"])
    lines = [
        f"Top-1 accuracy (%) over {report['queries']} queries "
        f"({report['failed']} failed).",
        "",
    ]
    if "accuracy_unpruned" in report:
        unpruned = accuracy_from_report(report, "accuracy_unpruned")
        lines += ["With pruning (votes weighted by the memory's entry "
                  "weights):", ""]
        lines += _table_lines(accuracy, report["best"], rules, k_max)
        lines += ["", "Without pruning (the same neighbours, unweighted):",
                  ""]
        lines += _table_lines(unpruned, report["best_unpruned"], rules, k_max)
    else:
        lines += _table_lines(accuracy, report["best"], rules, k_max)
    if baselines:
        lines += ["", "Baselines:", ""]
        lines += [f"- {name}: {100 * v:.2f}" for name, v in baselines.items()]
    return "\n".join(lines) + "\n"


def _plot(path: str, report: Mapping[str, Any],
          baselines: Mapping[str, float]) -> None:
    # The object-oriented Agg API leaves pyplot's global backend untouched, so
    # this is safe inside notebooks and workers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    accuracy = accuracy_from_report(report)
    unpruned = (accuracy_from_report(report, "accuracy_unpruned")
                if "accuracy_unpruned" in report else None)
    for i, rule in enumerate(report["rules"]):
        ks = sorted(accuracy[rule])
        ax.plot(ks, [100 * accuracy[rule][k] for k in ks], marker=".",
                markersize=3, color=f"C{i % 10}",
                label=rule + (" (pruned)" if unpruned else ""))
        if unpruned:
            ks = sorted(unpruned[rule])
            ax.plot(ks, [100 * unpruned[rule][k] for k in ks], linestyle=":",
                    linewidth=1, color=f"C{i % 10}", label=f"{rule} (unpruned)")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(100 * value, linestyle="--", linewidth=1,
                   color=f"C{(len(report['rules']) + i) % 10}", label=name)
    ax.set_xscale("log")
    k_max = int(report["k_max"])
    ax.set_xlim(0.9, max(k_max, 2) * 1.1)
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy vs k ({report['queries']} queries)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rerank_markdown(r: Mapping[str, Any]) -> str:
    """The re-rank section of report.md (memory.rerank.base.RerankTally.to_dict plus the job's settings)."""
    lines = [f"## Re-ranking: {r['reranker']} over the {r['rule']}@{r['k']} vote",
             "",
             f"Cost gate: vote margin < {r['below']:g}; top {r['top_n']} neighbours shown"
             + (" (**dry run: no call made**)" if r.get("dry_run") else "") + ".",
             "",
             "| queries | vote accuracy | after re-ranking | sent | re-ranked | changed (to right / to wrong) "
             "| calls | from cache | fallbacks |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {r['queries']} | {r['accuracy_vote']:.2f} | {r['accuracy_reranked']:.2f} "
             f"| {r['sent']} ({100 * r['fraction_sent']:.1f}%) | {r['reranked']} ({100 * r['fraction_reranked']:.1f}%) "
             f"| {r['changed']} ({r['changed_to_right']} / {r['changed_to_wrong']}) | {r['calls']} | {r['cached']} "
             f"| {r['fallbacks']} |",
             ""]
    if r.get("dry_run"):
        lines += [f"A real run would send {r['would_send']} queries (at least {r['would_send']} calls; retries "
                  "add more).", ""]
    lines += ["Outcomes: " + ", ".join(f"{k} {v}" for k, v in r["reasons"].items()), ""]
    return "\n".join(lines)


def tune_markdown(result: Mapping[str, Any]) -> str:
    """The table ``vmem tune`` prints: every setting it tried, the chosen one and the recall-based comparison."""
    lines = [f"exact search: accuracy {result['exact']['accuracy']:.2f} over {result['exact']['queries']} queries "
             f"({result['criteria']['rule']}@{result['criteria']['k']})",
             "", "| setting | queries/s | recall | vote agreement | accuracy |", "|---|---:|---:|---:|---:|"]
    from memory.search.setting import SearchSetting  # pylint: disable=g-import-not-at-top
    for t in sorted(result["trials"], key=lambda t: -t["qps"]):
        lines.append(f"| {SearchSetting.from_dict(t).describe()} | {t['qps']:.0f} | {t['recall']:.4f} | "
                     f"{100 * t['agreement']:.2f}% | {t['accuracy']:.2f} |")
    lines.append("")
    for key, what in (("chosen", f"votes agree >= {100 * result['criteria']['min_agreement']:g}%"),
                      ("by_recall", f"recall >= {result['criteria']['min_recall']:g}")):
        t = result[key]
        lines.append(f"fastest with {what}: " + ("none" if t is None else
                                                 f"{SearchSetting.from_dict(t).describe()} at {t['qps']:.0f} q/s"))
    if result.get("speedup_vs_recall"):
        lines.append(f"decision agreement is {result['speedup_vs_recall']:.2f}x the queries/s of recall >= "
                     f"{result['criteria']['min_recall']:g}")
    return "\n".join(lines)


def write_report(
    output_dir: str | os.PathLike,
    report: Mapping[str, Any],
    *,
    baselines: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """Writes report.json, report.md and accuracy_vs_k.png.

    Args:
        output_dir: Local directory, created if missing.
        report: From :func:`build_report`.
        baselines: ``{name: accuracy in [0, 1]}`` shown as dashed lines and
            listed in the Markdown and JSON.

    Returns:
        ``{"json": path, "markdown": path, "plot": path}``.
    """
    baselines = _check_baselines(baselines)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, REPORT_JSON),
        "markdown": os.path.join(output_dir, REPORT_MD),
        "plot": os.path.join(output_dir, PLOT_PNG),
    }
    full = dict(report)
    full["baselines"] = baselines
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2, allow_nan=False)
        f.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("# Visual memory voting report\n\n")
        f.write(markdown_table(report, baselines=baselines))
        rerank = (report.get("extra") or {}).get("rerank")
        if rerank and "queries" in rerank:
            f.write("\n" + rerank_markdown(rerank))
    _plot(paths["plot"], report, baselines)
    return paths
