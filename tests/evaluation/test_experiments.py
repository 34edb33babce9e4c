"""The paper experiments on synthetic embeddings with known answers, through the real jobs (no encoder).

A synthetic workspace skips the embedding step: it writes seeded clip-retrieval folders where the bundled
encoder's exported embeddings would be, and a stamp saying they are ready. Every memory is still built by
``vmem build --embeddings`` and searched by ``vmem evaluate`` on the in-process Beam runner.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from evaluation.experiments import abstain, k_sweep, label_noise, memory_size, new_classes, pruning, unlearning
from evaluation.experiments.common import read_neighbors, revote
from evaluation.experiments.workspace import Setup, Workspace
from memory.store.blocks import EntryBlock
from memory.store.export import write_clip_folder
from memory.vectors import l2_normalize

CLASSES = ("a", "b", "c", "d", "e")
HELD_OUT = ("d", "e")
DIM = 16


def _split(rng, centres, per_class: int, prefix: str, noise: float) -> EntryBlock:
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    x = centres[labels] + noise * rng.normal(size=(labels.size, DIM))
    ids = np.asarray([f"{CLASSES[c]}/{prefix}-{i:04d}" for i, c in enumerate(labels)])
    return EntryBlock(ids, np.asarray(CLASSES)[labels], np.asarray([f"/img/{i}.png" for i in ids]),
                          l2_normalize(x.astype(np.float32)))


def synthetic_workspace(work: str, *, per_class=40, noise=0.12, seed=0) -> Workspace:
    """Well-separated classes (random unit centres in 16-d), already 'embedded'."""
    setup = Setup(dataset="fashion-mnist", train_per_class=per_class, calib_per_class=20, test_per_class=20,
                  shards=2, k_max=30, hold_out=HELD_OUT, config="synthetic")
    ws = Workspace(work, setup)
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(len(CLASSES), DIM)))
    sizes = {"train": per_class, "calib": 20, "test": 20}
    for split, n in sizes.items():
        write_clip_folder(ws.path("embeddings", split), [_split(rng, centres, n, split, noise)])
    with open(ws.path("embeddings", "stamp.json"), "w") as f:
        json.dump({"key": setup.embedding_key(), "encoder_id": "synthetic@0", "counts": sizes}, f)
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return synthetic_workspace(str(tmp_path_factory.mktemp("paper-work")))


def _report(out) -> dict:
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert os.path.getsize(os.path.join(out, "report.md")) > 200
    return report


def test_k_sweep_equals_the_evaluation_and_separable_classes_are_all_right(ws, tmp_path):
    r = k_sweep.run(ws, str(tmp_path / "ks"))
    assert r["revote_equals_evaluate"] and r["queries"] == 100 and r["memory_entries"] == 200
    assert r["accuracy"]["rank"]["1"] == 1.0 and r["best"]["rank"]["accuracy"] == 1.0
    assert os.path.getsize(tmp_path / "ks" / "accuracy_vs_k.png") > 10_000
    report = _report(tmp_path / "ks")
    assert report["setup"]["k_max"] == 30
    assert report["command"] == ("vmem experiment k-sweep --dataset fashion-mnist --train-per-class 40 "
                                 "--calib-per-class 20 --test-per-class 20 --hold-out d,e")


def test_label_noise_at_100_percent_is_chance_and_re_voting_equals_a_rebuilt_memory(ws, tmp_path):
    r = label_noise.run(ws, str(tmp_path / "ln"), levels=(0, 30, 100), verify_level=30)
    acc = r["accuracy_k10"]
    assert acc["rank"]["0"] == 1.0
    # Every label drawn uniformly: nothing is left to vote for but chance (1/5; 100 queries, +-4 sigma).
    for rule in acc:
        assert abs(acc[rule]["100"] - 1 / len(CLASSES)) < 0.17, (rule, acc[rule]["100"])
    assert 0.7 < r["labels_changed_fraction"]["100"] < 0.9  # 4/5 of uniform draws land on another class.
    v = r["verification"]
    assert v["other_differences"] == 0 and v["identical"] + v["near_tie_swaps"] == 100
    assert v["max_accuracy_difference"] <= v["accuracy_difference_bound"] and v["speedup"] > 10
    assert _report(tmp_path / "ln")["results"]["levels_percent"] == [0, 30, 100]


def test_memory_size_fits_a_falling_power_law_with_an_interval(tmp_path):
    # Overlapping classes, so small memories make errors: error must fall with size.
    ws = synthetic_workspace(str(tmp_path / "w"), per_class=80, noise=0.3, seed=1)
    r = memory_size.run(ws, str(tmp_path / "ms"), sizes_per_class=[2, 5, 20, 80], bootstrap=200)
    assert r["entries"] == [10, 25, 100, 400]
    errors = r["error_k10"]["plurality"]
    assert errors[0] > errors[-1]
    fit = r["power_law"]["rank"]
    assert fit["slope"] < 0 and fit["slope_low"] <= fit["slope"] <= fit["slope_high"]
    assert os.path.getsize(tmp_path / "ms" / "error_vs_memory_size.png") > 10_000


def test_new_classes_are_learned_by_add_and_old_neighbour_lists_stay_exact(ws, tmp_path):
    r = new_classes.run(ws, str(tmp_path / "nc"))
    assert r["added_entries"] == 80 and r["version_after_add"] == 2 and r["training_steps"] == 0
    assert r["neighbour_lists_not_exact"] == 0
    assert all(v == 0 for v in r["changed_without_meeting_new_entries"].values())
    assert r["new_after"]["rank"]["k10"] == 1.0 and r["old_after"]["rank"]["k10"] == 1.0


def test_unlearning_equals_a_memory_rebuilt_without_the_forgotten_entries(ws, tmp_path):
    r = unlearning.run(ws, str(tmp_path / "un"))
    for case in (r["class"], r["random_ids"]):
        assert case["neighbour_lists_differing_from_rebuilt"] == 0
        assert case["max_accuracy_difference"] <= case["accuracy_difference_bound"]
        assert case["forgotten_ids_among_neighbours"] == 0 and case["forget_seconds"] < 5
    assert r["class"]["forgotten"] == 40 and r["random_ids"]["forgotten"] == 20
    assert r["class"]["forgotten_class_predictions"] == 0


def test_pruning_soft_re_vote_equals_the_evaluated_soft_version(ws, tmp_path):
    # Self-queries of depth 10 in a memory of 40 entries per class: a clean separable entry is never a
    # neighbour of another class, a randomised one is outvoted in most of the ~10 lists it appears in.
    r = pruning.run(ws, str(tmp_path / "pr"), levels=(0, 40), threshold=6, prune_k=10, verify_level=40)
    noisy = r["per_level"]["40"]
    sv = noisy["soft_verification"]
    assert sv["other_differences"] == 0 and sv["max_accuracy_difference"] <= sv["accuracy_difference_bound"]
    assert r["prune_k"] == 10
    assert noisy["hard_pruned_entries"] > 0 and noisy["hard_pruned_that_were_noisy"] > 0.5
    assert r["per_level"]["0"]["hard_pruned_entries"] == 0 and r["per_level"]["0"]["soft_weighted_entries"] == 0


def test_abstain_detects_held_out_classes_and_the_api_agrees_with_the_neighbour_files(ws, tmp_path):
    r = abstain.run(ws, str(tmp_path / "ab"))
    assert r["out_of_memory_queries"] == 40 and r["in_memory_queries"] == 60
    # Held-out classes are other clusters: the nearest neighbour is far for every one of them.
    assert r["auroc_in_vs_out"]["similarity"] > 0.95
    # A separable memory is right on every in-memory query with share 1: calibrated (ECE 0).
    assert r["accuracy_in_memory"] == 1.0 and r["ece_in_memory"]["calibrated"] < 0.05
    assert r["api_abstain_mismatches"] == 0
    assert r["calibration"]["fitted_on_version"] == 1 and r["calibration"]["queries"] == 60
    # The published calibration carries the out-of-memory test (fitted on the 60 in-memory calibration queries):
    # every held-out query is flagged, so none is answered, and the API names the same reasons.
    assert r["calibration"]["out_of_memory"]["queries"] == 60 and r["flagged_unlike_memory"]["out_of_memory"] == 1.0
    assert r["auroc_out_of_memory_test"] > 0.95 and r["auroc_in_vs_out"]["kth_similarity"] > 0.95
    assert r["api_reason_mismatches"] == 0 and r["abstain_below"]["0.9"]["out_of_memory_answered"] == 0
    # The default test compares the 10th similarity as it is and relative to the memory's own; the report compares
    # it with every other statistic and p-value combination, each fitted on the in-memory calibration queries.
    stats = r["out_of_memory_statistics"]
    assert r["out_of_memory_statistic"] == "kth_relative" and set(stats) == {
        "test:nearest", "test:kth", "test:kth_relative", "fisher:nearest+kth", "bonferroni:nearest+kth",
        "relative_kth_alone"}
    assert stats["test:kth_relative"]["auroc_in_vs_out"] == r["auroc_out_of_memory_test"] > 0.95
    assert stats["test:kth_relative"]["out_of_memory_flagged"] == r["flagged_unlike_memory"]["out_of_memory"]
    assert r["best_single_auroc"] == r["auroc_in_vs_out"][r["best_single_score"]]
    markdown = (tmp_path / "ab" / "report.md").read_text()
    assert "| test:kth_relative |" in markdown and "Out-of-memory test (kth_relative) at level 0.05" in markdown


def test_revote_relabels_by_entry_id(ws, tmp_path):
    _, _, eval_dir = ws.base()
    records = read_neighbors(eval_dir)
    flipped = {i: (CLASSES.index(lab) + 1) % len(CLASSES) for i, lab in zip(ws.table("train").ids.tolist(),
                                                                          ws.table("train").labels.tolist())}
    voted = revote(records, k_max=30, relabel=flipped)
    # Every entry renamed to the next class: every prediction is the next class, so every query is wrong.
    assert all(acc == 0.0 for by_k in voted.table.values() for acc in by_k.values())
    np.testing.assert_array_equal(voted.preds["rank"][:, 0], (voted.true + 1) % len(CLASSES))


def _record(qid, ids, dists, labels=None):
    from evaluation.neighbors_io import NeighborRecord
    return NeighborRecord(qid, 0, list(ids), list(labels or [0] * len(ids)), list(dists))


def test_list_comparison_tells_near_tie_swaps_from_real_differences():
    from evaluation.experiments.common import check_equivalent, compare_neighbor_lists
    a = [_record("q1", "xyz", [0.1, 0.2, 0.3]), _record("q2", "xyz", [0.1, 0.2, 0.2 + 1e-7]),
         _record("q3", "xyz", [0.1, 0.2, 0.3])]
    b = [_record("q1", "xyz", [0.1, 0.2, 0.3 + 1e-7]), _record("q2", "xzy", [0.1, 0.3, 0.3 + 1e-6]),
         _record("q3", "xyw", [0.1, 0.2, 0.25])]
    c = compare_neighbor_lists(a, b)
    assert (c.identical, c.near_tie_swaps, c.other_differences) == (1, 0, 2)  # q2's swap is 0.1 apart: real.
    b[1] = _record("q2", "xzy", [0.1, 0.2 + 2e-7, 0.2])
    b[2] = _record("q3", "xyw", [0.1, 0.2, 0.3 + 5e-7])  # Another entry at the cut-off, same distance.
    c = compare_neighbor_lists(a, b)
    assert (c.identical, c.near_tie_swaps, c.other_differences) == (1, 2, 0) and c.equivalent
    assert c.accuracy_bound() == pytest.approx(2 / 3)
    table = {"rank": {1: 0.5}}
    assert check_equivalent("x", c, table, {"rank": {1: 0.5 + 2 / 3}})["max_accuracy_difference"] > 0
    with pytest.raises(RuntimeError, match="disagree beyond near-tie swaps"):
        check_equivalent("x", c, table, {"rank": {1: 0.5 + 0.7}})
    # An add: the new list without the new class (label 9) must be the old list's prefix.
    after = [_record("q1", "xnyz", [0.1, 0.15, 0.2, 0.3], labels=[0, 9, 0, 0])]
    c = compare_neighbor_lists(after, [_record("q1", "xyzw", [0.1, 0.2, 0.3, 0.4])], drop_labels_from_a=[9])
    assert c.identical == 1 and c.equivalent


def test_setup_caps_k_max_at_the_memory_pool(caplog):
    # No experiment's memory holds more than train_per_class x 10 classes: the revotes' arrays stop there.
    with caplog.at_level("WARNING", logger="visual_memory"):
        setup = Setup(dataset="mnist", train_per_class=3, k_max=10 ** 9)
    assert setup.k_max == 30 and "k_max 1000000000 exceeds the memory pool of 30 entries (3 per class)" in caplog.text
    assert Setup(dataset="mnist", train_per_class=3, k_max=30).k_max == 30


def test_table_from_report_extends_a_report_capped_at_a_small_memory():
    from evaluation.experiments.common import table_from_report
    report = {"accuracy": {"rank": {"1": 0.5, "2": 0.75}}}
    assert table_from_report(report, k_max=4) == {"rank": {1: 0.5, 2: 0.75, 3: 0.75, 4: 0.75}}
    assert table_from_report(report, k_max=2) == {"rank": {1: 0.5, 2: 0.75}}
