"""pruning: none vs hard vs soft (the paper's reliability count), on memories with 0, 20 and 40 % label noise.

Per noise level (the same seeded noise as label-noise): build the memory with the noisy labels, evaluate
it (none), ``vmem prune --mode soft`` (entry weights gamma = 1.75/(1+v)), then ``vmem prune --mode hard
--threshold T`` (forget v >= T) and evaluate that version (hard; its report's unweighted table). Soft
pruning changes only per-entry weights, so it is scored by re-voting the unpruned neighbour lists with the
weights; at one level the soft-pruned version is also evaluated by the real job, and the tables must match.

T = 64 of the k = 100 self-query neighbours is fixed in advance (the paper's 128 was for 1.28M entries;
every entry appears in ~k neighbour lists on average, whatever the memory size), not tuned on the queries.
The report also says how many pruned entries really had a randomised label (the pruning's precision).
"""

from __future__ import annotations

import os

import numpy as np


from evaluation.experiments.common import check_equivalent, compare_neighbor_lists, pct, plot_lines, \
    read_neighbors, revote, rule_summary, table_from_report, write_report
from evaluation.experiments.label_noise import noisy_labels
from evaluation.experiments.workspace import Workspace
from memory.decide.pruning import PruningMode

NAME = "pruning"
LEVELS = (0, 20, 40)
THRESHOLD = 64
PRUNE_K = 100  # The paper's self-query depth.
VERIFY_LEVEL = 40
PAPER = "hard (v >= 128) 83.6 -> 83.7, soft (gamma = 1.75/(1+v)) 83.6 -> 84.1 (Rank, ImageNet, no added noise)"


def _level(ws: Workspace, percent: int, *, threshold: int, prune_k: int, verify: bool) -> dict:
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from memory.store.mutations import read_entry_weights, read_forgotten  # pylint: disable=g-import-not-at-top
    s = ws.setup
    k = min(10, s.k_max)
    train = ws.table("train")
    labels, changed = noisy_labels(ws, percent)
    memory = ws.build(f"prune-{percent}", ws.write_table(f"noise-{percent}", train.with_labels(labels)))
    none_report, none_dir = ws.evaluate(memory, ws.split_spec("test"), f"prune-{percent}-none")
    records = read_neighbors(none_dir)
    none = revote(records, k_max=s.k_max)
    ws.prune(memory, mode=PruningMode.SOFT, k=prune_k)
    soft_version = read_manifest(memory)
    # No entry outvoted even once: the soft prune publishes no weights, and every entry weighs 1.
    ids, weights = read_entry_weights(memory, soft_version) or (np.zeros(0, str), np.zeros(0, np.float32))
    soft = revote(records, k_max=s.k_max, entry_weights=dict(zip(ids.tolist(), weights.tolist())))
    out = {"labels_changed_fraction": changed, "soft_weighted_entries": int((weights < 1).sum())}
    if verify:
        soft_report, soft_dir = ws.evaluate(memory, ws.split_spec("test"), f"prune-{percent}-soft")
        out["soft_verification"] = check_equivalent(
            "re-voting with the soft-pruning weights vs vmem evaluate of the soft-pruned version",
            compare_neighbor_lists(records, read_neighbors(soft_dir)), table_from_report(soft_report, k_max=s.k_max),
            soft.table)
        out["soft_speedup"] = {"revote_seconds": soft.seconds}
    ws.prune(memory, mode=PruningMode.HARD, threshold=threshold, k=prune_k)
    hard_version = read_manifest(memory)
    pruned = set(read_forgotten(memory, hard_version).tolist())
    hard_report, _ = ws.evaluate(memory, ws.split_spec("test"), f"prune-{percent}-hard")
    hard_table = table_from_report(hard_report, "accuracy_unpruned" if "accuracy_unpruned" in hard_report
                                   else "accuracy", k_max=s.k_max)
    noisy = set(train.ids[labels != train.labels].tolist())
    out.update({"none": rule_summary(none.table, k=k), "soft": rule_summary(soft.table, k=k),
                "hard": rule_summary(hard_table, k=k), "hard_pruned_entries": len(pruned),
                "hard_pruned_fraction": len(pruned) / len(train),
                "hard_pruned_that_were_noisy": len(pruned & noisy) / max(len(pruned), 1),
                "noisy_entries": len(noisy), "queries": int(none_report["queries"])})
    return out


def run(ws: Workspace, out: str, *, levels=LEVELS, threshold: int = THRESHOLD, prune_k: int = PRUNE_K,
        verify_level: int | None = VERIFY_LEVEL) -> dict:
    s = ws.setup
    k = min(10, s.k_max)
    per_level = {}
    for p in levels:
        before = dict(ws.seconds)
        per_level[p] = _level(ws, p, threshold=threshold, prune_k=prune_k, verify=p == verify_level)
        if p == verify_level:
            # What re-voting saves: the real job for the soft-pruned version is one more evaluation.
            evaluate_s = (ws.seconds["evaluate"] - before.get("evaluate", 0.0)) / 3
            sp = per_level[p]["soft_speedup"]
            sp.update(evaluate_seconds=evaluate_s, speedup=evaluate_s / max(sp["revote_seconds"], 1e-9))
    rules = list(per_level[levels[0]]["none"])
    results = {"levels_percent": list(levels), "threshold": threshold, "prune_k": prune_k, "k": k, "per_level": {
        str(p): v for p, v in per_level.items()}, "paper": PAPER}
    os.makedirs(out, exist_ok=True)
    series = {}
    for mode, style in (("none", "-"), ("hard", "--"), ("soft", ":")):
        for r in ("rank", "softmax", "plurality"):
            if r in rules:
                series[f"{r}, {mode}"] = (list(levels), [100 * per_level[p][mode][r][f"k{k}"] for p in levels])
    plot_lines(os.path.join(out, "pruning_vs_noise.png"), series, xlabel="memory labels randomised (%)",
               ylabel=f"top-1 accuracy at k={k} (%)", title=f"{s.dataset}: none / hard (v >= {threshold}) / soft",
               styles={name: ("--" if name.endswith("hard") else ":" if name.endswith("soft") else "-")
                       for name in series})
    lines = [f"| noise % | rule | none @{k} | hard @{k} | soft @{k} | none best | hard best | soft best |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in levels:
        v = per_level[p]
        for r in rules:
            lines.append(f"| {p} | {r} | " + " | ".join(pct(v[m][r][f"k{k}"]) for m in ("none", "hard", "soft"))
                         + " | " + " | ".join(f"{pct(v[m][r]['best'])} ({v[m][r]['best_k']})"
                                              for m in ("none", "hard", "soft")) + " |")
    lines += ["", "| noise % | hard-pruned entries | of which noisy | soft-weighted entries (v >= 1) |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {p} | {per_level[p]['hard_pruned_entries']} ({100 * per_level[p]['hard_pruned_fraction']:.1f}%) | "
              f"{100 * per_level[p]['hard_pruned_that_were_noisy']:.1f}% | {per_level[p]['soft_weighted_entries']} |"
              for p in levels]
    if verify_level in per_level:
        sp = per_level[verify_level]["soft_speedup"]
        sv = per_level[verify_level]["soft_verification"]
        lines += ["", f"Soft pruning was scored by re-voting the unpruned lists with the weights. At {verify_level} % "
                      f"the real evaluation of the soft-pruned version agrees: same neighbours for {sv['identical']} "
                      f"of {sv['queries']} queries, {sv['near_tie_swaps']} near-tie swaps, largest accuracy "
                      f"difference {100 * sv['max_accuracy_difference']:.2f} points "
                      f"({sp['evaluate_seconds']:.1f} s per evaluation vs {sp['revote_seconds']:.3f} s per re-vote: "
                      f"{sp['speedup']:.0f}x)."]
    lines += ["", f"Paper: {PAPER}."]
    write_report(out, name=NAME, setup=s, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=s.command(NAME))
    return results
