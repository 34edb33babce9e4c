"""The pruning job end to end: counts equal a brute-force leave-one-out reference over the stored
embeddings; hard pruning forgets exactly v >= T; soft pruning stores gamma exactly; the evaluation report
of a soft-pruned memory has both tables and re-votes to the same numbers."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from evaluation.metrics import accuracy_table, best_k
from evaluation.neighbors_io import read_neighbor_files
from memory.decide import pruning
from memory import storage
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig
from memory.store.versions import read_manifest
from memory.store.mutations import add_entries_local, forget, live_ids, read_entry_weights, read_forgotten
from memory.store.shard import read_shard_data
from memory.visual_memory import VisualMemory
from memory.decide.voting import VotingRule, predict_all_k
from vmem import main as cli
from vmem import prune as prune_cli
from pipelines import prune

ENCODER = {"name": "synthetic", "content_hash": "sha256:0", "dim": 16, "preprocess": {}}


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mixture(rng, centres, n, noise):
    cls = rng.integers(0, len(centres), n)
    return _unit(centres[cls] + noise * rng.normal(size=(n, centres.shape[1]))), cls


def _synthetic_memory(root: str, seed: int = 0):
    """Labelled clusters with 15% deliberately wrong labels, an exact duplicate pair with different labels,
    some entries forgotten and some added in a delta shard (so main + delta shards and tombstones)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16))
    emb, cls = _mixture(rng, centres, 240, 0.7)
    labels = cls.copy()
    wrong = rng.random(240) < 0.15
    labels[wrong] = (labels[wrong] + rng.integers(1, 6, int(wrong.sum()))) % 6
    emb[1] = emb[0]  # Exact duplicates: leave-one-out by id must let them count each other.
    labels[1] = (labels[0] + 1) % 6
    ids = [f"e{i:04d}" for i in range(240)]
    build_memory_local(root, ids=ids, labels=[f"c{x}" for x in labels], uris=[f"/img/{i}" for i in ids],
                       embeddings=emb, num_shards=3, index_config=IndexConfig(), encoder_identity=ENCODER)
    forget(root, ids=["e0100", "e0101", "e0102", "e0103"])
    extra, extra_cls = _mixture(rng, centres, 20, 0.7)
    add_entries_local(root, ids=[f"n{i:03d}" for i in range(20)], labels=[f"c{x}" for x in extra_cls],
                      uris=[f"/new/{i}" for i in range(20)], embeddings=extra)
    queries, true = _mixture(rng, centres, 400, 0.7)
    return queries, true


def _live_entries(root: str):
    """(ids, labels, embeddings) of the latest version's live entries, read from the stored shards."""
    m = read_manifest(root)
    gone = read_forgotten(root, m)
    ids, labels, emb = [], [], []
    for info in m.all_shards:
        if not info.count:
            continue
        d = read_shard_data(storage.join(root, info.path))
        live = ~np.isin(d.ids.astype(str), gone)
        ids.append(d.ids.astype(str)[live])
        labels.append(d.labels[live])
        emb.append(d.embeddings[live])
    ids, labels, emb = np.concatenate(ids), np.concatenate(labels), np.concatenate(emb)
    order = np.argsort(ids)
    return ids[order], labels[order], emb[order]


def _brute_force_counts(ids, labels, emb, k):
    """For each entry q: its k nearest *other* entries (ties by id); count those with another label."""
    d = 1.0 - emb.astype(np.float64) @ emb.astype(np.float64).T
    v = np.zeros(len(ids), dtype=np.int64)
    for q in range(len(ids)):
        others = np.delete(np.arange(len(ids)), q)
        nearest = others[np.lexsort((ids[others], d[q, others]))][:k]
        np.add.at(v, nearest[labels[nearest] != labels[q]], 1)
    return v


def test_counts_equal_brute_force_leave_one_out(tmp_path, monkeypatch):
    root = str(tmp_path / "mem")
    _synthetic_memory(root)
    before = read_manifest(root).version
    # No step sees every (id, v) pair: each bucket decides on its own ids, the final step gets summaries.
    seen = []
    real_process = prune._DecideBucketFn.process

    def spy(self, element):
        seen.append(len(list(element[1])))
        return real_process(self, element)

    monkeypatch.setattr(prune._DecideBucketFn, "process", spy)
    prune.run(["--memory", root, "--counts-only", "--k", "10", "--count-buckets", "4"])
    assert read_manifest(root).version == before  # Counting publishes nothing.
    assert len(seen) == 4 and max(seen) < sum(seen) == len(live_ids(root))
    counts = prune.read_bucket_counts(root, before, buckets=4)
    ids, labels, emb = _live_entries(root)
    np.testing.assert_array_equal(counts.ids, ids)  # Every live entry, v = 0 included; no forgotten one.
    expected = _brute_force_counts(ids, labels, emb, 10)
    np.testing.assert_array_equal(counts.v, expected)
    assert (counts.k, counts.version) == (10, before)
    # The duplicate pair (different labels) counted each other.
    assert expected[list(ids).index("e0000")] >= 1 and expected[list(ids).index("e0001")] >= 1
    summary = json.loads(storage.read_text(pruning.summary_path(root, before)))
    assert summary["entries"] == len(ids) and summary["outcome"]["published_version"] is None
    assert sum(b["entries"] for b in summary["histogram"]) == len(ids)
    # Summed from the buckets' histograms, the summary is exactly the one of every entry's v.
    expected_summary = pruning.counts_summary(expected)
    assert {k: summary[k] for k in expected_summary if k != "mean"} == {
        k: v for k, v in expected_summary.items() if k != "mean"}
    assert summary["mean"] == pytest.approx(expected_summary["mean"])


@pytest.mark.parametrize("seed", range(6))
def test_summary_of_value_counts_equals_counts_summary(seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, [1, 3, 300, 5, 1000, 2][seed], size=[0, 1, 7, 10, 501, 64][seed])
    values, entries = np.unique(v, return_counts=True)
    got, expected = prune.summary_of_value_counts(values, entries), pruning.counts_summary(v)
    assert got == {**expected, "mean": pytest.approx(expected["mean"])}


def test_hard_prune_forgets_exactly_v_at_or_above_threshold(tmp_path, capsys):
    root = str(tmp_path / "mem")
    _synthetic_memory(root)
    base = read_manifest(root).version
    ids, labels, emb = _live_entries(root)
    v = _brute_force_counts(ids, labels, emb, 10)
    threshold = int(np.percentile(v, 90))
    expected = set(ids[v >= threshold].tolist())
    assert 0 < len(expected) < len(ids)
    gone_before = set(read_forgotten(root, read_manifest(root)).tolist())
    assert prune_cli.main(["--memory", root, "--mode", "hard", "--threshold", str(threshold), "--k", "10"]) == 0
    m = read_manifest(root)
    assert m.version == base + 1 and m.change["kind"] == "forget"
    assert set(read_forgotten(root, m).tolist()) - gone_before == expected
    assert set(live_ids(root).tolist()) == set(ids.tolist()) - expected
    # The pinned pre-prune version is untouched.
    assert set(live_ids(root, version=base).tolist()) == set(ids.tolist())
    out = capsys.readouterr().out
    assert f"forgot {len(expected)} of {len(ids)} entries" in out and f"--version {base}" in out


def test_hard_prune_above_every_count_publishes_nothing(tmp_path, capsys):
    root = str(tmp_path / "mem")
    _synthetic_memory(root)
    base = read_manifest(root).version
    assert prune_cli.main(["--memory", root, "--mode", "hard", "--threshold", "100000", "--k", "10"]) == 0
    assert read_manifest(root).version == base
    assert "nothing published" in capsys.readouterr().out


def test_soft_prune_stores_gamma_exactly_and_does_not_lower_best_rank_accuracy(tmp_path):
    root = str(tmp_path / "mem")
    queries, true = _synthetic_memory(root)
    base = read_manifest(root).version
    ids, labels, emb = _live_entries(root)
    v = _brute_force_counts(ids, labels, emb, 10)
    prune.run(["--memory", root, "--mode", "soft", "--k", "10", "--count-buckets", "3"])
    m = read_manifest(root)
    assert m.version == base + 1 and m.entry_weights is not None
    assert m.entry_weights.params["rule"] == "1.75/(1+v)" and m.entry_weights.params["k"] == 10
    assert m.entry_weights.params["counts"] == prune.counts_dir(root, base)
    w_ids, w = read_entry_weights(root, m)
    np.testing.assert_array_equal(w_ids, ids[v >= 1])  # Unlisted entries (v = 0) weigh 1.
    np.testing.assert_array_equal(w, (1.75 / (1.0 + v[v >= 1])).astype(np.float32))

    # Held-out, correctly labelled queries: the weighted vote must not be worse at its best k.
    memory = VisualMemory.open(root)
    res = memory.search(queries, 30)
    true_idx = np.array([memory.class_names.index(f"c{x}") for x in true])
    weighted = accuracy_table(predict_all_k(res.labels, res.distances, rules=[VotingRule.RANK],
                                            entry_weights=res.weights), true_idx)
    plain = accuracy_table(predict_all_k(res.labels, res.distances, rules=[VotingRule.RANK]), true_idx)
    assert best_k(weighted)["rank"]["accuracy"] >= best_k(plain)["rank"]["accuracy"]


def test_publish_step_retried_after_success_accepts_its_own_version(tmp_path):
    """A runner may retry the final DoFn after it published: it must recognise its change, not fail."""
    root = str(tmp_path / "mem")
    _synthetic_memory(root)
    m = read_manifest(root)
    ids, labels, emb = _live_entries(root)
    counts = list(zip(ids.tolist(), _brute_force_counts(ids, labels, emb, 10).tolist()))
    for mode, threshold in ((pruning.PruningMode.SOFT, None), (pruning.PruningMode.HARD, 3)):
        m = read_manifest(root)
        decide = prune._DecideBucketFn(root, m.version, 10, mode, threshold, False, 1)
        buckets = list(decide.process((0, counts)))
        fn = prune._PublishFn(root, m, mode, 10, threshold, False, 1)
        first = list(fn.process(None, buckets, len(counts)))
        again = list(fn.process(None, buckets, len(counts)))
        assert first[0].published_version == again[0].published_version == m.version + 1
        assert read_manifest(root).version == m.version + 1
        ids, labels, emb = _live_entries(root)
        counts = list(zip(ids.tolist(), _brute_force_counts(ids, labels, emb, 10).tolist()))


def test_prune_flag_errors_name_the_fix(tmp_path):
    root = str(tmp_path / "mem")
    _synthetic_memory(root)
    with pytest.raises(ValueError, match="--threshold"):
        prune.run(["--memory", root, "--mode", "hard"])
    with pytest.raises(ValueError, match="--mode"):
        prune.run(["--memory", root])
    with pytest.raises(ValueError, match="hard only"):
        prune.run(["--memory", root, "--mode", "soft", "--threshold", "3"])


def test_main_returns_the_status_with_the_reason(tmp_path, capsys):
    assert prune_cli.main(["--memory", str(tmp_path / "nothing-here"), "--mode", "soft"]) == 1  # Not a memory.
    assert "not a visual memory" in capsys.readouterr().err
    root = str(tmp_path / "mem")
    _synthetic_memory(root)
    assert prune_cli.main(["--memory", root, "--mode", "hard", "--threshold", "0"]) == 2
    assert "--threshold T >= 1" in capsys.readouterr().err


def _evaluate(memory, fmnist_small, out, *extra):
    assert cli.main(["evaluate", "--memory", memory, "--images", os.path.join(fmnist_small, "test"),
                     "--output", out, "--k-max", "20", *extra]) == 0
    return json.load(open(os.path.join(out, "report.json")))


def test_evaluation_of_soft_pruned_memory_reports_both_tables(tiny_memory, fmnist_small, tmp_path):
    import shutil
    root = str(tmp_path / "mem")
    shutil.copytree(tiny_memory, root)
    base = read_manifest(root).version
    before = _evaluate(root, fmnist_small, str(tmp_path / "before"))
    assert "accuracy_unpruned" not in before

    assert prune_cli.main(["--memory", root, "--mode", "soft", "--k", "10"]) == 0
    out = str(tmp_path / "after")
    report = _evaluate(root, fmnist_small, out)
    assert report["extra"]["entry_weights"]["params"]["rule"] == "1.75/(1+v)"
    assert report["extra"]["memory_version"] == base + 1
    # Without pruning = the very same neighbours voted unweighted = the pre-prune version's table.
    assert report["accuracy_unpruned"] == before["accuracy"]
    assert report["best_unpruned"] == before["best"]
    md = open(os.path.join(out, "report.md")).read()
    assert "With pruning" in md and "Without pruning" in md

    # The neighbour lists carry each entry's weight, and re-voting them reproduces the weighted table.
    files = sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl")))
    records = read_neighbor_files(files)
    w_ids, w = read_entry_weights(root, read_manifest(root))
    weight_of = dict(zip(w_ids.tolist(), w.tolist()))
    for r in records:
        assert r.neighbor_weights == [pytest.approx(weight_of.get(i, 1.0)) for i in r.neighbor_ids]
    assert any(x < 1 for r in records for x in r.neighbor_weights)
    revote = str(tmp_path / "revote")
    assert cli.main(["vote", "--neighbors", *files, "--output", revote, "--k-max", "20"]) == 0
    assert json.load(open(os.path.join(revote, "report.json")))["accuracy"] == report["accuracy"]

    # Pinned version: evaluating the pre-prune version again gives the unweighted report.
    pinned = _evaluate(root, fmnist_small, str(tmp_path / "pinned"), "--version", str(base))
    assert pinned["accuracy"] == before["accuracy"] and "accuracy_unpruned" not in pinned
    assert pinned["extra"]["memory_version"] == base
