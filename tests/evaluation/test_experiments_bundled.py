"""Slow: every paper experiment end to end on real Fashion-MNIST images with the bundled encoder."""

from __future__ import annotations

import json
import os

import pytest

from evaluation.experiments.registry import EXPERIMENTS
from tests.browser import assert_loaded, dump_dom
from vmem import main as cli


def _results(out, name) -> dict:
    with open(os.path.join(out, name, "report.json")) as f:
        return json.load(f)["results"]


@pytest.mark.slow
def test_vmem_experiment_all_on_real_images(tmp_path, capsys):
    out, work = str(tmp_path / "paper"), str(tmp_path / "work")
    argv = ["experiment", "all", "--dataset", "fashion-mnist", "--output", out, "--work-dir", work,
            "--train-per-class", "30", "--calib-per-class", "10", "--test-per-class", "10"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "embeddings ready" in printed and '"train": 300' in printed
    for name in EXPERIMENTS:
        assert os.path.getsize(os.path.join(out, name, "report.md")) > 200
        pngs = [f for f in os.listdir(os.path.join(out, name)) if f.endswith(".png")]
        assert pngs, name
        assert_loaded(dump_dom(os.path.join(out, name, "report.html")), images=len(pngs))
    assert _results(out, "k-sweep")["revote_equals_evaluate"]
    assert _results(out, "label-noise")["verification"]["other_differences"] == 0
    assert _results(out, "new-classes")["neighbour_lists_not_exact"] == 0
    unlearning = _results(out, "unlearning")
    assert unlearning["class"]["forgotten_class_predictions"] == 0
    assert unlearning["random_ids"]["neighbour_lists_differing_from_rebuilt"] == 0
    assert _results(out, "abstain")["api_abstain_mismatches"] == 0
    # The embeddings are cached: a second run embeds nothing and gives the same numbers.
    assert cli.main(["experiment", "k-sweep", "--output", str(tmp_path / "again"), "--work-dir", work,
                     "--train-per-class", "30", "--calib-per-class", "10", "--test-per-class", "10"]) == 0
    with open(tmp_path / "again" / "report.json") as f:
        assert json.load(f)["results"]["accuracy"] == _results(out, "k-sweep")["accuracy"]
