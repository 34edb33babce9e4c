"""memory-size: error against memory size, and the power law it follows (paper: ~-0.094 log10(error)/decade).

Memories of geometric sizes, from 10 entries per class up to the whole train split, are nested subsets
(the first n of a seeded per-class permutation), each built by ``vmem build --embeddings`` and searched by
``vmem evaluate`` with the same queries. The error at k = 10 (fixed in advance, not picked per size) is fitted
as ``log10(error) = a + slope * log10(entries)``; the interval resamples the queries (bootstrap), the same
queries for every size.
"""

from __future__ import annotations

import os

import numpy as np

from evaluation.experiments.common import pct, plot_lines, read_neighbors, revote, rule_summary, \
    table_from_report, write_report
from evaluation.experiments.workspace import Workspace, rng_for
from evaluation.stats import fit_power_law, geometric_sizes

NAME = "memory-size"
PAPER_SLOPE = -0.094  # DINOv2 ViT-L/14, ImageNet+JFT memory up to 1B entries; -0.109 for S/14.


def nested_subset(ws: Workspace, per_class: int) -> np.ndarray:
    """Rows of the first ``per_class`` entries of every class in a seeded permutation (nested in per_class)."""
    labels = ws.table("train").labels
    order = rng_for(ws.setup, NAME).permutation(labels.size)
    rank = np.empty(labels.size, dtype=np.int64)
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        rank[rows] = np.arange(rows.size)
    return np.flatnonzero(rank < per_class)


def run(ws: Workspace, out: str, *, sizes_per_class: list[int] | None = None, bootstrap: int = 1000) -> dict:
    s = ws.setup
    k = min(10, s.k_max)
    largest = int(np.unique(ws.table("train").labels, return_counts=True)[1].max())  # A preset: train_per_class.
    sizes_per_class = sizes_per_class or geometric_sizes(min(10, largest), largest)
    points = []
    for n in sizes_per_class:
        rows = nested_subset(ws, n)
        memory = ws.build(f"size-{n}", ws.write_table(f"size-{n}", ws.table("train").take(rows)))
        report, eval_dir = ws.evaluate(memory, ws.split_spec("test"), f"size-{n}-test")
        voted = revote(read_neighbors(eval_dir), k_max=s.k_max)
        if voted.table != table_from_report(report, k_max=s.k_max):
            raise RuntimeError(f"re-vote of {eval_dir} disagrees with its report")
        points.append((int(rows.size), voted))
    entries = [e for e, _ in points]
    rules = list(points[0][1].table)
    fits, errors = {}, {}
    for rule in rules:
        correct = np.stack([v.correct(rule, k) for _, v in points])
        errors[rule] = (1.0 - correct.mean(axis=1)).tolist()
        try:
            fit = fit_power_law(entries, errors[rule], per_query_correct=correct, bootstrap=bootstrap, seed=s.seed)
            fits[rule] = fit._asdict()
        except ValueError as e:  # e.g. fewer than 3 sizes with a non-zero error
            fits[rule] = {"error": str(e)}
    best = {rule: [rule_summary(v.table, k=k)[rule]["best"] for _, v in points] for rule in rules}
    results = {"entries": entries, "per_class": list(sizes_per_class), "k": k,
               f"error_k{k}": errors, "error_best_k": {r: [1 - a for a in best[r]] for r in rules},
               "power_law": fits, "paper_slope": PAPER_SLOPE, "queries": int(points[0][1].true.size)}
    os.makedirs(out, exist_ok=True)
    series = {f"{r} (k={k})": (entries, [100 * e for e in errors[r]]) for r in rules}
    rank_fit = fits.get("rank", {})
    if "slope" in rank_fit:
        x = np.asarray(entries, dtype=float)
        series[f"rank fit: slope {rank_fit['slope']:.3f}"] = (
            entries, (100 * 10 ** (rank_fit["intercept"] + rank_fit["slope"] * np.log10(x))).tolist())
        series[f"paper slope {PAPER_SLOPE} (through our first point)"] = (
            entries, (100 * errors["rank"][0] * (x / x[0]) ** PAPER_SLOPE).tolist())
    plot_lines(os.path.join(out, "error_vs_memory_size.png"), series, xlabel="memory entries",
               ylabel="top-1 error (%)", logx=True, logy=True,
               title=f"{s.dataset}: error vs memory size ({results['queries']} queries)",
               styles={name: "--" for name in series if "slope" in name})
    lines = ["| entries | per class | " + " | ".join(f"{r} err@{k}" for r in rules) + " |",
             "|---:|---:|" + "---:|" * len(rules)]
    for i, (e, n) in enumerate(zip(entries, sizes_per_class)):
        lines.append(f"| {e} | {n} | " + " | ".join(pct(errors[r][i]) for r in rules) + " |")
    lines += ["", "| rule | slope (log10 error per decade) | 95% bootstrap interval | r2 |", "|---|---:|---|---:|"]
    for r in rules:
        f = fits[r]
        lines.append(f"| {r} | {f['slope']:.3f} | [{f['slope_low']:.3f}, {f['slope_high']:.3f}] | {f['r2']:.3f} |"
                     if "slope" in f else f"| {r} | — | {f['error']} | |")
    lines += ["", f"Paper: {PAPER_SLOPE} per decade (DINOv2 ViT-L/14 up to 1B entries; -0.109 for S/14)."]
    write_report(out, name=NAME, setup=s, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=s.command(NAME))
    return results
