"""``vmem experiment`` on your own data: an ImageFolder, and clip-retrieval embeddings no preset knows.

Every experiment runs through the CLI on specs (``--memory-data``, ``--queries``, ``--calibration``) the build
job reads; the runner flags after the experiment's own reach every job; data an experiment cannot run on,
and a wrong class list, are refused with the flag named.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from evaluation.experiments.registry import EXPERIMENTS
from vmem import main as cli

# Fashion-MNIST classes the tiny encoder (4x4 average pooling) tells apart well.
IMAGE_CLASSES = ("bag", "sandal", "trouser")
CLIP_CLASSES = ("heron", "osprey", "puffin", "wren")  # No preset has them.
RUNNER_FLAGS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _report(out: str, name: str = "") -> dict:
    with open(os.path.join(out, name, "report.json")) as f:
        return json.load(f)


def _assert_every_report(out: str) -> None:
    for name in EXPERIMENTS:
        assert os.path.getsize(os.path.join(out, name, "report.md")) > 200, name
        assert any(f.endswith(".png") for f in os.listdir(os.path.join(out, name))), name
        with open(os.path.join(out, name, "timings.json")) as f:
            assert json.load(f)["seconds"], name
    assert _report(out, "k-sweep")["results"]["revote_equals_evaluate"]
    assert _report(out, "label-noise")["results"]["verification"]["other_differences"] == 0
    assert _report(out, "new-classes")["results"]["neighbour_lists_not_exact"] == 0
    unlearning = _report(out, "unlearning")["results"]
    assert unlearning["class"]["forgotten_class_predictions"] == 0
    assert unlearning["random_ids"]["neighbour_lists_differing_from_rebuilt"] == 0
    assert _report(out, "abstain")["results"]["api_abstain_mismatches"] == 0


@pytest.fixture(scope="module")
def image_folder(fmnist_small, tmp_path_factory) -> str:
    """3 classes of real Fashion-MNIST PNGs: train (12 per class), calib (8) and test (5) ImageFolders."""
    root = tmp_path_factory.mktemp("image-data")
    for cls in IMAGE_CLASSES:
        train = sorted(os.listdir(os.path.join(fmnist_small, "train", cls)))
        test = sorted(os.listdir(os.path.join(fmnist_small, "test", cls)))
        for split, names, src in (("train", train[:12], "train"), ("calib", train[12:], "train"),
                                  ("test", test, "test")):
            os.makedirs(root / split / cls)
            for name in names:
                shutil.copy(os.path.join(fmnist_small, src, cls, name), root / split / cls / name)
    return str(root)


def write_clip_split(root: str, per_class: int, *, centres: np.ndarray, seed: int, parts: int = 2) -> str:
    """clip-retrieval's layout (float16 img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet), labels in a
    ``category`` column: ``per_class`` rows of every class around its centre, split over ``parts`` files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLIP_CLASSES)), per_class)
    x = centres[labels] + 0.35 * rng.normal(size=(labels.size, centres.shape[1]))
    os.makedirs(os.path.join(root, "img_emb"))
    os.makedirs(os.path.join(root, "metadata"))
    for i, rows in enumerate(np.array_split(rng.permutation(labels.size), parts)):
        np.save(os.path.join(root, "img_emb", f"img_emb_{i}.npy"), x[rows].astype(np.float16))
        keys = [f"{os.path.basename(root)}-{r:04d}" for r in rows]
        pq.write_table(pa.table({"key": keys, "category": [CLIP_CLASSES[labels[r]] for r in rows],
                                 "image_path": [f"/photos/{k}.jpg" for k in keys]}),
                       os.path.join(root, "metadata", f"metadata_{i}.parquet"))
    return f"clip:{root},label_column=category"


@pytest.fixture(scope="module")
def clip_specs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clip-data")
    centres = np.random.default_rng(7).normal(size=(len(CLIP_CLASSES), 24))
    return {flag: write_clip_split(str(root / split), n, centres=centres, seed=seed)
            for flag, split, n, seed in (("--memory-data", "train", 15, 1), ("--queries", "val", 6, 2),
                                         ("--calibration", "calib", 5, 3))}


def test_every_experiment_runs_on_an_image_folder(image_folder, tiny_encoder_config_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["experiment", "all", "--memory-data", os.path.join(image_folder, "train"),
            "--queries", os.path.join(image_folder, "test"), "--calibration", os.path.join(image_folder, "calib"),
            "--config", tiny_encoder_config_file, "--hold-out", "sandal", "--output", out,
            "--work-dir", str(tmp_path / "work")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f'"{split}": {n}' in printed for split, n in (("train", 36), ("calib", 24), ("test", 15)))
    _assert_every_report(out)
    report = _report(out, "k-sweep")
    assert report["setup"]["k_max"] == 36  # Capped at the memory pool of 3 x 12 images.
    assert report["setup"]["data"]["config"] == tiny_encoder_config_file
    assert report["command"] == (f"vmem experiment k-sweep --memory-data {image_folder}/train --queries "
                                 f"{image_folder}/test --calibration {image_folder}/calib --config "
                                 f"{tiny_encoder_config_file} --hold-out sandal")
    assert _report(out, "new-classes")["results"]["held_out_classes"] == ["sandal"]
    assert _report(out, "unlearning")["results"]["class"]["forgotten"] == 12


def test_every_experiment_runs_on_clip_embeddings_with_runner_flags_and_repeats_bit_for_bit(
        clip_specs, tmp_path, monkeypatch):
    import pipelines.add
    import pipelines.build
    import pipelines.evaluate
    import pipelines.prune
    calls = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("pipeline_options")))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((pipelines.build, "build_memory"), (pipelines.evaluate, "evaluate_memory"),
                         (pipelines.add, "add_to_memory"), (pipelines.prune, "prune_memory")):
        spy(module, name)
    data = [a for flag, spec in clip_specs.items() for a in (flag, spec)]

    def argv(name, output, work):
        return ["experiment", name, *data, "--encoder-id", "birds-vit", "--name", "birds", "--hold-out", "wren",
                "--seed", "3", "--output", output, "--work-dir", work, *RUNNER_FLAGS]

    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    assert cli.main(argv("all", out, work)) == 0
    _assert_every_report(out)
    # Every job of every experiment ran with the runner flags, the embedding reads included.
    assert {name for name, _ in calls} == {"build_memory", "evaluate_memory", "add_to_memory", "prune_memory"}
    assert all(options == RUNNER_FLAGS for _, options in calls), calls
    report = _report(out, "label-noise")
    assert report["setup"]["dataset"] == "birds" and report["setup"]["runner_flags"] == RUNNER_FLAGS
    assert report["command"] == ("vmem experiment label-noise --memory-data " + clip_specs["--memory-data"]
                                 + " --queries " + clip_specs["--queries"] + " --calibration "
                                 + clip_specs["--calibration"] + " --encoder-id birds-vit --name birds --seed 3 "
                                 "--hold-out wren " + " ".join(RUNNER_FLAGS))
    assert os.path.isdir(os.path.join(work, "birds", "embeddings", "calib"))
    assert _report(out, "abstain")["results"]["out_of_memory_queries"] == 6
    # The same command, from scratch in another work directory: the same report.json, byte for byte.
    again, again_work = str(tmp_path / "again"), str(tmp_path / "work-again")
    assert cli.main(argv("label-noise", again, again_work)) == 0
    with open(os.path.join(out, "label-noise", "report.json"), "rb") as a, \
            open(os.path.join(again, "report.json"), "rb") as b:
        assert a.read() == b.read()


def test_a_class_list_that_is_wrong_names_the_flag_and_the_allowed_classes(clip_specs, tmp_path, capsys):
    data = [a for flag, spec in clip_specs.items() if flag != "--calibration" for a in (flag, spec)]
    argv = ["experiment", "k-sweep", *data, "--encoder-id", "birds-vit", "--output", str(tmp_path / "o"),
            "--work-dir", str(tmp_path / "w")]
    assert cli.main([*argv, "--hold-out", "wren,unicorn"]) == 2
    err = capsys.readouterr().err
    assert "--hold-out: ['unicorn'] are not --memory-data" in err and "allowed: heron, osprey, puffin, wren" in err
    assert cli.main([*argv, "--hold-out", ",".join(CLIP_CLASSES)]) == 2
    assert "--hold-out holds out every --memory-data" in capsys.readouterr().err
    assert cli.main(["experiment", "new-classes", "--dataset", "mnist", "--output", str(tmp_path / "o"),
                     "--hold-out", "trouser"]) == 2
    assert "--hold-out: ['trouser'] are not mnist classes; allowed: zero, one" in capsys.readouterr().err


@pytest.mark.parametrize("name, extra, message", [
    ("new-classes", [], "new-classes needs --hold-out: pass --hold-out CLASS"),
    ("unlearning", [], "unlearning needs --hold-out"),
    ("abstain", ["--hold-out", "wren"], "abstain needs --calibration: pass --calibration SPEC"),
    ("k-sweep", ["--train-per-class", "5"], "--train-per-class sizes a --dataset preset's splits"),
    ("k-sweep", ["--dataset", "mnist"], "--dataset mnist is a preset of --memory-data/--queries"),
    ("k-sweep", ["--config", "configs.default"], "--config configs.default: the config's encoder embeds images"),
    ("k-sweep", ["--name", "../elsewhere"], "--name '../elsewhere': letters, digits"),
    ("k-sweep", ["--name", "mnist"], "not a preset's name (fashion-mnist, mnist)"),
    ("k-sweep", ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
     "--direct_running_mode=multi_threading with --direct_num_workers=2 is refused"),
])
def test_data_an_experiment_cannot_run_on_is_refused_naming_the_flag(clip_specs, tmp_path, capsys, name, extra,
                                                                     message):
    argv = ["experiment", name, "--memory-data", clip_specs["--memory-data"], "--queries", clip_specs["--queries"],
            "--encoder-id", "birds-vit", "--output", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"), *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")  # Refused before anything was read.


@pytest.mark.parametrize("argv, message", [
    (["--memory-data", "CLIP", "--queries", "CLIP"],
     "--memory-data 'clip:"),  # ... clip: without --encoder-id
    (["--memory-data", "TMP", "--queries", "/no/such/dir"], "--queries '/no/such/dir': --images"),
    (["--memory-data", "CLIP", "--encoder-id", "e"], "--queries SPEC is required with --memory-data"),
    (["--calibration", "CLIP"], "--calibration describes your data: pass --memory-data SPEC --queries SPEC"),
    (["--memory-data", "clip:/x,label_colum=y", "--queries", "CLIP", "--encoder-id", "e"],
     "--memory-data 'clip:/x,label_colum=y': --embeddings clip:/x,label_colum=y: bad option"),
])
def test_a_bad_spec_is_refused_naming_its_flag(clip_specs, tmp_path, capsys, argv, message):
    argv = [{"CLIP": clip_specs["--memory-data"], "TMP": str(tmp_path)}.get(a, a) for a in argv]
    assert cli.main(["experiment", "k-sweep", *argv, "--output", str(tmp_path / "o"),
                     "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert message in err
    if message == "--memory-data 'clip:":
        assert "pass --encoder-id NAME" in err


@pytest.mark.slow
def test_an_experiment_runs_on_the_local_multi_process_runner(clip_specs, tmp_path):
    data = [a for flag, spec in clip_specs.items() for a in (flag, spec)]
    out = str(tmp_path / "out")
    assert cli.main(["experiment", "k-sweep", *data, "--encoder-id", "birds-vit", "--output", out,
                     "--work-dir", str(tmp_path / "work"), "--direct_running_mode=multi_processing",
                     "--direct_num_workers=2"]) == 0
    report = _report(out)
    assert report["results"]["revote_equals_evaluate"] and report["results"]["queries"] == 24
    assert report["command"].endswith("--direct_running_mode=multi_processing --direct_num_workers=2")


def test_make_paper_checks_the_runner_flags_it_passes_to_every_job(tmp_path, capsys):
    from evaluation.experiments import paper
    assert paper.main(["--output", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"),
                       "--direct_running_mode=multi_threading", "--direct_num_workers=2"]) == 2
    assert "--direct_running_mode=multi_threading with --direct_num_workers=2 is refused" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")
