"""unlearning: ``vmem forget`` of a whole class and of a random 10 % of ids is exact and takes milliseconds.

For each selection: build a memory of the train split, ``vmem forget`` (timed as the CLI reports it),
``vmem evaluate`` the test queries, then build a memory from scratch without the forgotten entries and
evaluate it too. With exact (brute-force) shards every query's neighbour list -- ids and distances -- must
be identical between the two, the forgotten class must never appear among any query's neighbours (so no
rule at any k can predict it), and the accuracies must be equal.
"""

from __future__ import annotations

import os
import time

import numpy as np

from evaluation.experiments.common import compare_neighbor_lists, pct, plot_bars, read_neighbors, revote, \
    max_table_difference, rule_summary, write_report
from evaluation.experiments.workspace import Workspace, rng_for

NAME = "unlearning"
PAPER = "deleting an entry removes its influence completely; deleting a feature from disk took under 20 ms"
FORGET_FRACTION = 0.10


def _forget(memory: str, *, ids: list[str] | None = None, label: str | None = None) -> dict:
    """``vmem forget --ids FILE`` / ``--label NAME``: the new version, timed as the command times it."""
    from memory.store.mutations import forget  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    manifest = forget(memory, ids=ids, label=label)
    return {"forgotten": manifest.change["forgotten"], "forget_seconds": round(time.perf_counter() - start, 4),
            "version": manifest.version, "live_entries": manifest.total}


def _case(ws: Workspace, name: str, selection: dict, keep: np.ndarray, forgotten_label: str | None) -> dict:
    s = ws.setup
    k = min(10, s.k_max)
    train = ws.table("train")
    memory = ws.build(f"unlearn-{name}", ws.split_spec("train"))
    result = _forget(memory, **selection)
    _, forgot_dir = ws.evaluate(memory, ws.split_spec("test"), f"unlearn-{name}-after-forget")
    rebuilt = ws.build(f"unlearn-{name}-rebuilt", ws.write_table(f"unlearn-{name}-kept", train.take(keep)))
    _, rebuilt_dir = ws.evaluate(rebuilt, ws.split_spec("test"), f"unlearn-{name}-rebuilt")
    forgot, again = read_neighbors(forgot_dir), read_neighbors(rebuilt_dir)
    gone = set(train.ids[~keep].tolist())
    v_forgot, v_again = revote(forgot, k_max=s.k_max), revote(again, k_max=s.k_max)
    lists = compare_neighbor_lists(forgot, again)
    case = {"forgotten": int(result["forgotten"]), "forget_seconds": float(result["forget_seconds"]),
            "version": int(result["version"]), "live_entries": int(result["live_entries"]),
            "forgotten_ids_among_neighbours": sum(i in gone for r in forgot for i in r.neighbor_ids),
            "neighbour_lists_differing_from_rebuilt": lists.other_differences,
            "near_tie_swaps": lists.near_tie_swaps, "largest_distance_difference": lists.max_distance_gap,
            "max_accuracy_difference": max_table_difference(v_forgot.table, v_again.table),
            "accuracy_after_forget": rule_summary(v_forgot.table, k=k),
            "accuracy_rebuilt": rule_summary(v_again.table, k=k),
            "accuracy_tables_equal": v_forgot.table == v_again.table,
            "accuracy_difference_bound": lists.accuracy_bound()}
    if forgotten_label is not None:
        from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
        label = read_manifest(memory).class_names.index(forgotten_label)
        case["forgotten_class"] = forgotten_label
        case["forgotten_class_predictions"] = int(sum((p == label).sum() for p in v_forgot.preds.values()))
    return case


def run(ws: Workspace, out: str) -> dict:
    s = ws.setup
    train = ws.table("train")
    label = s.hold_out[0]
    by_class = _case(ws, "class", {"label": label}, train.labels != label, label)
    rng = rng_for(s, NAME)
    chosen = rng.choice(len(train), size=int(round(FORGET_FRACTION * len(train))), replace=False)
    keep = np.ones(len(train), dtype=bool)
    keep[chosen] = False
    by_ids = _case(ws, "ids", {"ids": train.ids[chosen].tolist()}, keep, None)
    results = {"class": by_class, "random_ids": by_ids, "forget_fraction": FORGET_FRACTION, "paper": PAPER}
    k = min(10, s.k_max)
    rules = list(by_class["accuracy_after_forget"])
    os.makedirs(out, exist_ok=True)
    plot_bars(os.path.join(out, "forget_vs_rebuilt.png"), rules, {
        f"forget class {label}": [100 * by_class["accuracy_after_forget"][r][f"k{k}"] for r in rules],
        f"rebuilt without {label}": [100 * by_class["accuracy_rebuilt"][r][f"k{k}"] for r in rules],
        "forget 10% of ids": [100 * by_ids["accuracy_after_forget"][r][f"k{k}"] for r in rules],
        "rebuilt without them": [100 * by_ids["accuracy_rebuilt"][r][f"k{k}"] for r in rules]},
        ylabel=f"top-1 accuracy at k={k} (%)", ylim=(0, 100),
        title=f"{s.dataset}: vmem forget vs a memory rebuilt without the entries")
    lines = ["| forget | entries | vmem forget ms | neighbour lists differing from rebuilt | forgotten ids among "
             "neighbours | accuracy tables equal | rank@10 |", "|---|---:|---:|---:|---:|---|---:|"]
    for what, c in ((f"class {label}", by_class), ("random 10% of ids", by_ids)):
        lines.append(f"| {what} | {c['forgotten']} | {1000 * c['forget_seconds']:.1f} | "
                     f"{c['neighbour_lists_differing_from_rebuilt']} | {c['forgotten_ids_among_neighbours']} | "
                     f"{c['accuracy_tables_equal']} | {pct(c['accuracy_after_forget']['rank'][f'k{k}'])} |")
    lines += ["", "Neighbour lists are compared by id at every position; lists that differ only by swapping "
              "neighbours whose float32 distances agree to 1e-5 (two searches of the same rows can differ in the "
              f"last bits) count as near-tie swaps: class {by_class['near_tie_swaps']}, ids {by_ids['near_tie_swaps']}; "
              "largest distance difference "
              f"{max(by_class['largest_distance_difference'], by_ids['largest_distance_difference']):.1e}."]
    lines += ["", f"Predictions of the forgotten class {label} over every rule and k = 1..{s.k_max}: "
              f"{by_class['forgotten_class_predictions']} (must be 0).", "", f"Paper: {PAPER}."]
    write_report(out, name=NAME, setup=s, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=s.command(NAME))
    return results
