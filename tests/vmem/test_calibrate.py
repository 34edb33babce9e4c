"""``vmem calibrate`` (vmem.calibrate) on neighbour lists of a local memory, and `vmem info`."""

from __future__ import annotations

import json
import os

import numpy as np

from vmem import calibrate as calibrate_cli
from evaluation.neighbors_io import NeighborRecord, write_records
from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.decide.confidence import memory_calibration
from memory.store.versions import read_manifest
from memory.store.mutations import forget
from vmem import main as cli
from tests.memory.helpers import ENCODER, clustered


def _memory_and_evaluation(tmp_path, *, k_max=20):
    x, q = clustered(300, 32, centres=3, noise=0.9, seed=3, nq=200)
    labels = np.arange(300) % 3
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=[f"e{i}" for i in range(300)], labels=[f"c{v}" for v in labels],
                       uris=[f"/d/{i}" for i in range(300)], embeddings=x, num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    memory = VisualMemory.open(root)
    result = memory.search(q, k_max)
    # A query's true class: the majority of its 5 nearest entries, flipped for every 4th query (so the
    # vote is sometimes wrong, with a confidence that says so).
    true = np.asarray([np.bincount(row[:5], minlength=3).argmax() for row in result.labels])
    true[::4] = (true[::4] + 1) % 3
    out = tmp_path / "eval"
    out.mkdir()
    write_records(out / "neighbors-00000-of-00001.jsonl", [
        NeighborRecord(f"q{i}", int(true[i]), result.ids[i].tolist(), result.labels[i].tolist(),
                       result.distances[i].astype(float).tolist()) for i in range(len(q))])
    (out / "report.json").write_text(json.dumps({"k_max": k_max, "extra": {
        "memory": root, "memory_version": 1, "softmax_tau": 0.07, "rank_alpha": 2.0}}))
    return root, str(out), q


def test_calibrate_publishes_a_version_classify_then_uses(tmp_path, capsys):
    root, eval_dir, q = _memory_and_evaluation(tmp_path)
    assert calibrate_cli.main(["--evaluation", eval_dir, "--rule", "rank", "--k", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["published_version"] == 2 and out["ece_calibrated"] < out["ece_raw"]
    manifest = read_manifest(root)
    cal = memory_calibration(manifest)
    assert manifest.change["kind"] == "calibrate" and cal.fitted_on_version == 1 and cal.queries == 200
    assert (cal.rule.value, cal.k, cal.method.value, cal.score.value) == ("rank", 10, "platt", "combined")
    predictions = VisualMemory.open(root).classify(q[:20], rule="rank", k=10)
    assert all(p.calibrated for p in predictions)
    # The memory changes after calibrating: `vmem info` says the calibration is stale.
    assert cli.main(["info", root]) == 0
    assert "calibration  platt on combined of rule rank, k 10" in capsys.readouterr().out
    forget(root, ids=["e0"])
    assert cli.main(["info", root]) == 0
    assert "the memory changed since (re-run vmem calibrate)" in capsys.readouterr().out


def test_calibrate_refuses_a_stale_evaluation_a_bad_k_and_dry_runs(tmp_path, capsys):
    root, eval_dir, _ = _memory_and_evaluation(tmp_path)
    assert calibrate_cli.main(["--evaluation", eval_dir, "--k", "21"]) == 2
    assert "--k 21 is out of range; the evaluation retrieved 20 neighbours" in capsys.readouterr().err
    assert calibrate_cli.main(["--evaluation", eval_dir, "--method", "spline"]) == 2
    assert "unknown calibration method 'spline'" in capsys.readouterr().err
    assert calibrate_cli.main(["--evaluation", eval_dir, "--score", "margin", "--method", "platt", "--dry-run"]) == 0
    assert "dry run: nothing published" in capsys.readouterr().out and read_manifest(root).version == 1
    forget(root, ids=["e1"])
    assert calibrate_cli.main(["--evaluation", eval_dir]) == 1  # The memory changed since: a runtime failure.
    assert "searched version 1" in capsys.readouterr().err
    assert calibrate_cli.main(["--evaluation", str(tmp_path)]) == 1
    assert "holds no report.json" in capsys.readouterr().err


def test_vmem_experiment_refuses_unknown_names_and_classes(capsys):
    assert cli.main(["experiment", "grokking", "--output", "/tmp/unused"]) == 2
    assert "unknown experiment 'grokking'" in capsys.readouterr().err
    assert cli.main(["experiment", "k-sweep", "--output", "/tmp/unused", "--hold-out", "unicorn"]) == 2
    assert "['unicorn'] are not fashion-mnist classes" in capsys.readouterr().err
    assert cli.main(["experiment", "--help"]) == 0
    assert "memory-size" in " ".join(capsys.readouterr().out.split())


def test_calibrate_fits_the_out_of_memory_test_unless_told_not_to(tmp_path, capsys):
    root, eval_dir, _ = _memory_and_evaluation(tmp_path)
    assert calibrate_cli.main(["--evaluation", eval_dir, "--out-of-memory-level", "1.5"]) == 2
    assert "--out-of-memory-level must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert calibrate_cli.main(["--evaluation", eval_dir, "--out-of-memory-level", "0.1", "--dry-run",
                               "--out-of-memory-statistic", "nearest"]) == 0
    assert ("out-of-memory test: out of memory below the 10th percentile of 200 held-out queries' nearest neighbour "
            "similarity") in capsys.readouterr().out
    assert read_manifest(root).version == 1
    assert calibrate_cli.main(["--evaluation", eval_dir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    test = memory_calibration(read_manifest(root)).out_of_memory
    assert test.level == 0.05 and test.queries == 200 and out["calibration"]["out_of_memory"]["level"] == 0.05
    # The default compares the 10th similarity as it is and relative to the memory's own: every live entry's own
    # 10th similarity is stored next to the calibration and read back (checked) with the memory's root.
    assert test.statistic.value == "kth_relative" and test.entries.k == 10 and test.entry_table is None
    assert test.entries.count == len(VisualMemory.open(root)) and os.path.isfile(os.path.join(root, test.entries.path))
    loaded = memory_calibration(read_manifest(root), root=root).out_of_memory
    assert loaded.entry_table.ids.size == test.entries.count and loaded.entry_table.k == 10
    (tmp_path / "again").mkdir()
    root2, eval_dir2, _ = _memory_and_evaluation(tmp_path / "again")
    assert calibrate_cli.main(["--evaluation", eval_dir2, "--out-of-memory-statistic", "median"]) == 2
    assert "unknown out-of-memory statistic 'median'; allowed: nearest, kth, kth_relative" in capsys.readouterr().err
    assert calibrate_cli.main(["--evaluation", eval_dir2, "--no-out-of-memory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "out_of_memory" not in out["calibration"]
    assert memory_calibration(read_manifest(root2)).out_of_memory is None
