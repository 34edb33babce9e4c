"""label-noise: accuracy when p % of the memory's labels are randomised (paper: rank ~unchanged up to ~60 %).

Only labels change, never embeddings, so a query's neighbours are the same at every noise level: the
neighbour lists of one ``vmem evaluate`` of the clean memory, relabelled by entry id, are re-voted per
level. To show that this is exact (and what it saves), one level is also run the long way -- a memory
built by ``vmem build --embeddings`` with the noisy labels, searched by ``vmem evaluate`` -- and its
accuracy table must be identical.

Noise model: each entry independently, with probability p, gets a label drawn uniformly from all classes
(possibly its own), seeded per level; the fraction of labels that actually changed is reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from evaluation.experiments.common import check_equivalent, compare_neighbor_lists, pct, plot_lines, \
    read_neighbors, revote, rule_summary, table_from_report, write_report
from evaluation.experiments.workspace import Workspace, rng_for
from evaluation.neighbors_io import NeighborRecord

NAME = "label-noise"
LEVELS = tuple(range(0, 90, 10))  # percent
VERIFY_LEVEL = 50


class NoiseSweep(NamedTuple):
    """`sweep`'s result: ``{level: {rule: {k: accuracy}}}``, ``{level: fraction changed}``, re-vote seconds."""
    tables: dict[int, dict[str, dict[int, float]]]
    changed: dict[int, float]
    revote_seconds: list[float]


def randomise_labels(labels: np.ndarray, classes: np.ndarray, *, percent: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, float]:
    """``labels`` after the noise model (module docstring) at ``percent`` %; and the fraction that changed."""
    flip = rng.random(len(labels)) < percent / 100
    drawn = classes[rng.integers(0, classes.size, len(labels))]
    noisy = np.where(flip, drawn, labels)
    return noisy, float((noisy != labels).mean())


def noisy_labels(ws: Workspace, percent: int) -> tuple[np.ndarray, float]:
    """The train split's class names after randomising ``percent`` % of them; and the fraction changed."""
    table = ws.table("train")
    classes = np.asarray(ws.class_names(), dtype=str)
    return randomise_labels(table.labels, classes, percent=percent, rng=rng_for(ws.setup, NAME, percent))


def sweep(records: Sequence[NeighborRecord], *, ids: Sequence[str], labels: np.ndarray, classes: Sequence[str],
          levels: Sequence[int], k_max: int, rng: Callable[[int], np.random.Generator]) -> NoiseSweep:
    """Re-votes one evaluation's neighbour lists with the memory's labels randomised at each level.

    Args:
      records: The clean memory's neighbour lists (`read_neighbors`).
      ids, labels: The memory's entry ids and class names, row-aligned.
      classes: Class names in the memory's order (sorted, as the build stores them).
      levels: Noise levels in percent.
      k_max: Neighbours voted over.
      rng: The generator of a level (seeded per level, so levels draw independently).
    """
    index = {c: i for i, c in enumerate(classes)}
    names = np.asarray(classes, dtype=str)
    tables, changed, seconds = {}, {}, []
    for percent in levels:
        noisy, changed[percent] = randomise_labels(np.asarray(labels, dtype=str), names, percent=percent,
                                                   rng=rng(percent))
        voted = revote(records, k_max=k_max, relabel=dict(zip(ids, (index[c] for c in noisy.tolist()))))
        seconds.append(voted.seconds)
        tables[percent] = voted.table
    return NoiseSweep(tables, changed, seconds)


def run(ws: Workspace, out: str, *, levels=LEVELS, verify_level: int | None = VERIFY_LEVEL) -> dict:
    memory, report, eval_dir = ws.base()
    k_max, k = ws.setup.k_max, min(10, ws.setup.k_max)
    records = read_neighbors(eval_dir)
    train = ws.table("train")
    per_level, changed, revote_seconds = sweep(records, ids=train.ids.tolist(), labels=train.labels,
                                               classes=ws.class_names(), levels=levels, k_max=k_max,
                                               rng=lambda percent: rng_for(ws.setup, NAME, percent))
    rules = list(per_level[levels[0]])
    summaries = {p: rule_summary(t, k=k) for p, t in per_level.items()}
    verification = None
    if verify_level is not None:
        labels, _ = noisy_labels(ws, verify_level)
        spec = ws.write_table(f"noise-{verify_level}", ws.table("train").with_labels(labels))
        before = dict(ws.seconds)
        noisy = ws.build(f"noise-{verify_level}", spec)
        noisy_report, noisy_dir = ws.evaluate(noisy, ws.split_spec("test"), f"noise-{verify_level}-test")
        long_way = sum(ws.seconds[key] - before.get(key, 0.0) for key in ("build", "evaluate"))
        mean_revote = float(np.mean(revote_seconds))
        verification = {"level": verify_level, **check_equivalent(
            f"the memory rebuilt with {verify_level}% noisy labels vs the relabelled neighbour lists",
            compare_neighbor_lists(records, read_neighbors(noisy_dir)), table_from_report(noisy_report, k_max=k_max),
            per_level[verify_level]),
            "build_and_evaluate_seconds": long_way, "revote_seconds": mean_revote,
            "speedup": long_way / max(mean_revote, 1e-9)}
    results = {"levels_percent": list(levels), "labels_changed_fraction": {str(p): changed[p] for p in levels},
               f"accuracy_k{k}": {r: {str(p): per_level[p][r][k] for p in levels} for r in rules},
               "best": {r: {str(p): {"accuracy": summaries[p][r]["best"], "k": summaries[p][r]["best_k"]}
                            for p in levels} for r in rules},
               "verification": verification,
               "paper": "RankVoting accuracy almost unchanged with up to ~60% of memory labels randomised"}
    os.makedirs(out, exist_ok=True)
    series = {f"{r} (k={k})": (list(levels), [100 * per_level[p][r][k] for p in levels]) for r in rules}
    series.update({f"{r} (best k)": (list(levels), [100 * summaries[p][r]["best"] for p in levels]) for r in rules})
    plot_lines(os.path.join(out, "accuracy_vs_noise.png"), series, xlabel="memory labels randomised (%)",
               ylabel="top-1 accuracy (%)", title=f"{ws.setup.dataset}: label noise ({report['queries']} queries)",
               styles={f"{r} (best k)": ":" for r in rules})
    lines = ["| noise % | changed % | " + " | ".join(f"{r}@{k}" for r in rules) + " | "
             + " | ".join(f"{r} best (k)" for r in rules) + " |",
             "|---:|---:|" + "---:|" * (2 * len(rules))]
    for p in levels:
        lines.append(f"| {p} | {100 * changed[p]:.1f} | " + " | ".join(pct(per_level[p][r][k]) for r in rules)
                     + " | " + " | ".join(f"{pct(summaries[p][r]['best'])} ({summaries[p][r]['best_k']})"
                                          for r in rules) + " |")
    if 60 in per_level and 0 in per_level:
        lines += ["", "Change from 0 % to 60 % noise at the rule's best k (points): " + ", ".join(
            f"{r} {100 * (summaries[60][r]['best'] - summaries[0][r]['best']):+.2f}" for r in rules)
            + " (paper: rank almost unchanged up to ~60 %)."]
    if verification:
        v = verification
        lines += ["", f"Verified at {verify_level} %: a memory rebuilt with the noisy labels and evaluated by the real "
                      f"jobs retrieves the same neighbours for {v['identical']} of {v['queries']} queries "
                      f"({v['near_tie_swaps']} swap two neighbours whose float32 distances differ by at most "
                      f"{v['max_distance_gap']:.1e}); the largest accuracy difference over every rule and k is "
                      f"{100 * v['max_accuracy_difference']:.2f} points (bound from the swaps: "
                      f"{100 * v['accuracy_difference_bound']:.2f}). Build + evaluate took "
                      f"{v['build_and_evaluate_seconds']:.1f} s vs {v['revote_seconds']:.3f} s per re-vote: "
                      f"{v['speedup']:.0f}x."]
    write_report(out, name=NAME, setup=ws.setup, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=ws.setup.command(NAME))
    return results
