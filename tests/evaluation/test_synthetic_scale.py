"""Memory-size, label-noise and unlearning on generated data, end to end through the real jobs (tiny sizes)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from evaluation.experiments import synthetic_scale
from evaluation.experiments.synthetic_scale import ScaleSetup


def test_all_parts_run_and_forgetting_equals_a_rebuilt_memory(tmp_path):
    setup = ScaleSetup(classes=4, min_entries=8, max_entries=64, per_decade=2, queries=12, dim=8, seed=2, k_max=5,
                       bootstrap=20)
    assert setup.sizes() == [8, 32, 64]
    lines = []
    out = str(tmp_path / "out")
    results = synthetic_scale.run(str(tmp_path / "work"), out, setup, log=lines.append)
    ms = results["memory_size"]
    assert ms["entries"] == [8, 32, 64] and ms["queries"] == 12 and ms["k"] == 5
    assert all(len(e) == 3 and all(0 <= x <= 1 for x in e) for e in ms["error_k5"].values())
    assert set(ms["power_law"]) == {"plurality", "distance", "softmax", "rank"}
    # Only the largest memory is kept.
    assert sorted(os.listdir(tmp_path / "work" / "synthetic-scale" / "memories")) == ["rebuilt", "size-64"]
    ln = results["label_noise"]
    assert ln["entries"] == 64 and ln["labels_changed_fraction"]["0"] == 0
    u = results["unlearning"]
    assert (u["forgotten"], u["live_entries"]) == (6, 58)
    assert u["neighbour_lists_differing_from_rebuilt"] == 0 and u["near_tie_swaps"] == 0
    assert u["forgotten_ids_among_neighbours"] == 0 and u["accuracy_tables_equal"]
    assert any(line.startswith("n=64: built in") for line in lines)
    assert set(results["wall_seconds"]) == {"memory_size", "label_noise", "unlearning"}
    assert {"report.json", "report.md", "error_vs_memory_size.png"} <= set(os.listdir(out))


@pytest.mark.parametrize("kwargs,message", [
    (dict(classes=0), "--classes must be >= 1, got 0"),
    (dict(classes=200, min_entries=100), "need --classes <= --min-entries <= --max-entries, got 200, 100, 1000000"),
    (dict(min_entries=1000, max_entries=100), "need --classes <= --min-entries <= --max-entries, got 100, 1000, 100"),
    (dict(parts=("memory-size", "pruning")), "--parts: unknown ['pruning']; allowed: memory-size, label-noise, "
                                             "unlearning"),
])
def test_bad_setup_is_refused_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError) as e:
        ScaleSetup(**kwargs)
    assert message in str(e.value)


def test_default_sizes_span_four_decades_in_whole_entries_per_class():
    sizes = ScaleSetup().sizes()
    assert sizes[0] == 100 and sizes[-1] == 1_000_000 and all(n % 100 == 0 for n in sizes)
    assert sizes == [100, 300, 1000, 3200, 10000, 31600, 100000, 316200, 1000000]


def test_generate_reuses_a_folder_of_the_same_spec_and_replaces_another(tmp_path):
    from evaluation import synthetic_data
    from evaluation.experiments import synthetic_jobs
    out = str(tmp_path / "d")
    spec = synthetic_data.LabelledSpec(classes=2, per_class=3, dim=4)
    assert synthetic_jobs.generate(out, spec) > 0
    assert synthetic_jobs.generate(out, spec) == 0.0  # cached: same dataset.json
    other = synthetic_data.LabelledSpec(classes=2, per_class=5, dim=4)
    assert synthetic_jobs.generate(out, other) > 0
    assert np.load(os.path.join(out, "img_emb", "img_emb_0.npy")).shape == (10, 4)
    with open(os.path.join(out, "dataset.json")) as f:
        assert '"per_class": 5' in f.read()


def test_vmem_experiment_refuses_a_bad_setup_naming_the_flag(tmp_path, capsys):
    from vmem import experiment as experiment_cli
    assert experiment_cli.main(["synthetic-scale", "--output", str(tmp_path), "--min-entries", "1000",
                                "--max-entries", "100"]) == 2
    assert "need --classes <= --min-entries <= --max-entries, got 100, 1000, 100" in capsys.readouterr().err
    assert experiment_cli.main(["synthetic-scale", "--output", str(tmp_path), "--parts", "pruning"]) == 2
    assert "--parts: unknown ['pruning']" in capsys.readouterr().err
    assert experiment_cli.main(["synthetic-scale", "--help"]) == 0
    assert "--max-entries" in capsys.readouterr().out
