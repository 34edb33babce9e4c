"""The label-noise-over-class-counts study: real jobs on generated data, re-votes equal to the evaluation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from evaluation.experiments import label_noise, label_noise_classes
from evaluation.experiments.common import table_from_report
from evaluation.experiments.label_noise_classes import StudySetup


def test_study_runs_the_jobs_and_its_clean_re_vote_equals_the_evaluation(tmp_path):
    setup = StudySetup(classes=(3, 6), per_class=12, queries=12, dim=16, seed=1, k_max=10, levels=(0, 60, 100))
    out, lines = str(tmp_path / "out"), []
    results = label_noise_classes.run(str(tmp_path / "work"), out, setup, log=lines.append)
    assert set(results["by_classes"]) == {"3", "6"}
    for c in (3, 6):
        r = results["by_classes"][str(c)]
        assert (r["memory_entries"], r["queries"]) == (12 * c, 12 // c * c)
        with open(tmp_path / "work" / f"classes-{c}" / "evals" / "test" / "report.json") as f:
            evaluated = table_from_report(json.load(f), k_max=10)
        # 0 % noise re-votes the clean memory's neighbour lists: exactly the evaluation's table.
        for rule, by_level in r["accuracy"].items():
            assert by_level["0"] == {str(k): evaluated[rule][k] for k in (1, 5, 10)}, rule
        # 100 % noise: every label drawn anew (about 1 - 1/C of them change).
        assert abs(r["labels_changed_fraction"]["100"] - (1 - 1 / c)) < 0.2
        assert r["labels_changed_fraction"]["0"] == 0
        assert set(r["seconds"]) == {"generate", "build", "evaluate", "revote"}
    assert any(line.startswith("C=6: built in") for line in lines)
    assert {"report.json", "report.md", "accuracy_vs_noise.png", "drop_at_60_vs_k.png"} <= set(os.listdir(out))
    with open(os.path.join(out, "report.md")) as f:
        assert "| 6 | rank |" in f.read()


def test_robust_k_is_the_smallest_k_within_the_points():
    tables = {0: {"rank": {1: 0.80, 2: 0.85, 3: 0.84}}, 60: {"rank": {1: 0.70, 2: 0.82, 3: 0.84}}}
    assert label_noise_classes.robust_k(tables, "rank", points=2.0) == 3  # 0.85 - 0.84 = 1 point
    assert label_noise_classes.robust_k(tables, "rank", points=0.5) is None


def test_sweep_is_the_label_noise_experiments_noise_model():
    labels = np.asarray(["a", "b", "c"] * 1000)
    classes = np.asarray(["a", "b", "c"])
    noisy, changed = label_noise.randomise_labels(labels, classes, percent=60, rng=np.random.default_rng(0))
    # With probability 0.6 a label is redrawn uniformly, so 0.6 * 2/3 of them change.
    assert abs(changed - 0.4) < 0.03 and set(noisy) == {"a", "b", "c"}
    again, _ = label_noise.randomise_labels(labels, classes, percent=60, rng=np.random.default_rng(0))
    assert (again == noisy).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(classes=(1, 10)), "--classes needs class counts >= 2, got (1, 10)"),
    (dict(per_class=0), "--per-class must be >= 1, got 0"),
    (dict(levels=(20, 60)), "--levels must include 0 and lie in 0..100, got (20, 60)"),
    (dict(classes=(10,), per_class=5, k_max=100), "--k-max 100 exceeds the smallest memory (10 x 5)"),
])
def test_bad_setup_is_refused_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError) as e:
        StudySetup(**kwargs)
    assert message in str(e.value)


def test_cli_refuses_a_bad_class_list(tmp_path, capsys):
    from vmem import experiment as experiment_cli
    assert experiment_cli.main(["label-noise-classes", "--work-dir", str(tmp_path), "--output", str(tmp_path),
                                "--classes", "10,x"]) == 2
    assert "expected comma-separated integers, got '10,x'" in capsys.readouterr().err
    assert experiment_cli.main(["label-noise-classes", "--work-dir", str(tmp_path), "--output", str(tmp_path),
                                "--classes", "1,10"]) == 2
    assert "--classes needs class counts >= 2, got (1, 10)" in capsys.readouterr().err


def test_vmem_experiment_runs_the_study_with_the_runner_flags(tmp_path, capsys):
    from vmem import experiment as experiment_cli
    out = tmp_path / "out"
    assert experiment_cli.main(["label-noise-classes", "--work-dir", str(tmp_path / "work"), "--output", str(out),
                                "--classes", "3", "--per-class", "12", "--queries", "6", "--dim", "8", "--k-max", "5",
                                "--levels", "0,60", "--direct_num_workers=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("vmem experiment label-noise-classes --classes 3 --per-class 12 --queries 6")
    assert report["results"]["by_classes"]["3"]["memory_entries"] == 36
    # Built and searched as every experiment's memories: in the study's workspace, from its generated folders.
    assert (tmp_path / "work" / "classes-3" / "memories" / "memory" / "manifest.json").is_file()
    assert (tmp_path / "work" / "classes-3" / "embeddings" / "stamp.json").is_file()
    assert "label-noise-classes: report in" in capsys.readouterr().out
    assert experiment_cli.main(["label-noise-classes", "--output", str(out), "--direct_num_workers=x"]) == 2
