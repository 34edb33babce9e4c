"""new-classes: a memory learns classes it was built without, by ``vmem add``, with zero training.

Build a memory without the held-out classes, evaluate the other classes' test queries, ``vmem add
--embeddings`` the held-out classes' training rows (exact delta shards), evaluate again (old classes and
new classes). Exactness is checked query by query: removing the new-class entries from a query's new
neighbour list must give exactly its old list (ids and distances); only queries that met a new-class
entry among their first k can change their vote.
"""

from __future__ import annotations

import os

import numpy as np

from evaluation.experiments.common import compare_neighbor_lists, pct, plot_bars, read_neighbors, revote, \
    rule_summary, write_report
from evaluation.experiments.workspace import Workspace, per_class_rows

NAME = "new-classes"
PAPER = "adding 64 NINCO OOD classes leaves ImageNet accuracy unchanged (83.6) and classifies them at ~87%"


def run(ws: Workspace, out: str) -> dict:
    s = ws.setup
    k = min(10, s.k_max)
    held = tuple(s.hold_out)
    train, test = ws.table("train"), ws.table("test")
    new_rows = per_class_rows(train.labels, held)
    old_spec = ws.write_table("old-classes", train.take(~new_rows))
    new_spec = ws.write_table("new-classes", train.take(new_rows))
    old_test = ws.write_table("test-old-classes", test.take(~per_class_rows(test.labels, held)))
    new_test = ws.write_table("test-new-classes", test.take(per_class_rows(test.labels, held)))
    memory = ws.build("new-classes", old_spec)
    _, before_dir = ws.evaluate(memory, old_test, "new-classes-old-before")
    before_add = dict(ws.seconds)
    version = ws.add(memory, new_spec)
    add_seconds = ws.seconds["add"] - before_add.get("add", 0.0)
    _, after_dir = ws.evaluate(memory, old_test, "new-classes-old-after")
    new_report, new_dir = ws.evaluate(memory, new_test, "new-classes-new-after")
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    names = read_manifest(memory).class_names
    new_labels = {names.index(c) for c in held}
    before, after = read_neighbors(before_dir), read_neighbors(after_dir)
    vb, va = revote(before, k_max=s.k_max), revote(after, k_max=s.k_max)
    vn = revote(read_neighbors(new_dir), k_max=s.k_max)
    lists = compare_neighbor_lists(after, before, drop_labels_from_a=new_labels)
    met = np.asarray([any(lab in new_labels for lab in r.neighbor_labels[:k]) for r in after])
    changed = {r: vb.preds[r][:, k - 1] != va.preds[r][:, k - 1] for r in vb.preds}
    results = {
        "held_out_classes": list(held), "version_after_add": version, "add_seconds": add_seconds,
        "added_entries": int(new_rows.sum()), "memory_entries_before": int((~new_rows).sum()),
        "old_queries": len(before), "new_queries": int(new_report["queries"]), "k": k,
        "old_before": rule_summary(vb.table, k=k), "old_after": rule_summary(va.table, k=k),
        "new_after": rule_summary(vn.table, k=k),
        "old_queries_meeting_new_entries": int(met.sum()),
        "old_predictions_changed": {r: int(c.sum()) for r, c in changed.items()},
        "changed_without_meeting_new_entries": {r: int((c & ~met).sum()) for r, c in changed.items()},
        "neighbour_lists_not_exact": lists.other_differences, "near_tie_swaps": lists.near_tie_swaps,
        "max_distance_gap": lists.max_distance_gap,
        "training_steps": 0, "paper": PAPER}
    rules = list(vb.table)
    os.makedirs(out, exist_ok=True)
    plot_bars(os.path.join(out, "accuracy_before_after_add.png"), rules, {
        "old classes, before add": [100 * results["old_before"][r][f"k{k}"] for r in rules],
        "old classes, after add": [100 * results["old_after"][r][f"k{k}"] for r in rules],
        f"new classes {', '.join(held)}": [100 * results["new_after"][r][f"k{k}"] for r in rules]},
        ylabel=f"top-1 accuracy at k={k} (%)", ylim=(0, 100),
        title=f"{s.dataset}: adding {', '.join(held)} by vmem add (no training)")
    lines = [f"Memory of {results['memory_entries_before']} entries without {', '.join(held)}; `vmem add` of "
             f"{results['added_entries']} entries took {add_seconds:.1f} s (version {version}; no training).", "",
             f"| rule | old classes @{k} before | after | change (points) | new classes @{k} | new best (k) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rules:
        b, a, n = results["old_before"][r], results["old_after"][r], results["new_after"][r]
        lines.append(f"| {r} | {pct(b[f'k{k}'])} | {pct(a[f'k{k}'])} | {100 * (a[f'k{k}'] - b[f'k{k}']):+.2f} | "
                     f"{pct(n[f'k{k}'])} | {pct(n['best'])} ({n['best_k']}) |")
    lines += ["", f"Old-class queries with a new-class entry among their first {k} neighbours: "
              f"{results['old_queries_meeting_new_entries']} of {len(before)}; predictions changed (rank): "
              f"{results['old_predictions_changed'].get('rank')}, of which without meeting a new entry: "
              f"{results['changed_without_meeting_new_entries'].get('rank')} (must be 0).",
              f"Neighbour lists that are not exactly the old list once new-class entries are removed: "
              f"{results['neighbour_lists_not_exact']} (exact delta shards: must be 0; {lists.near_tie_swaps} swap "
              f"near-tied neighbours, distances within {lists.max_distance_gap:.1e}).", "", f"Paper: {PAPER}."]
    write_report(out, name=NAME, setup=s, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=s.command(NAME))
    return results
