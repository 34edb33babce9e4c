"""The labelled synthetic generator: the clip layout the build reads, bit-for-bit seeds, class structure."""

from __future__ import annotations

import json
import os
import re

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from evaluation import synthetic_data
from evaluation.synthetic_data import LabelledSpec
from pipelines.io.embedding_sources import ReadEmbeddings, parse_embeddings_spec

SMALL = LabelledSpec(classes=7, per_class=30, dim=16, seed=3, rows_per_file=80, dtype="float32")


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of 64 rows: generator blocks straddle file boundaries (80 rows per file).
    monkeypatch.setattr(synthetic_data, "BLOCK_ROWS", 64)


def _read(data_dir: str):
    names = sorted(os.listdir(os.path.join(data_dir, "img_emb")), key=lambda n: int(n[8:-4]))
    emb = [np.load(os.path.join(data_dir, "img_emb", n)) for n in names]
    meta = [pq.read_table(os.path.join(data_dir, "metadata", f"metadata_{i}.parquet")).to_pydict()
            for i in range(len(names))]
    return emb, meta


def test_layout_is_row_aligned_and_matches_the_in_memory_generator(tmp_path, small_blocks):
    out = str(tmp_path / "d")
    synthetic_data.write_dataset(out, SMALL)
    emb, meta = _read(out)
    assert [e.shape for e in emb] == [(80, 16), (80, 16), (50, 16)]
    assert [len(m["key"]) for m in meta] == [80, 80, 50]
    assert all(list(m) == ["key", "label", "superclass", "image_path"] for m in meta)
    labels, vectors = synthetic_data.generate(SMALL)
    assert np.concatenate(emb).tobytes() == vectors.tobytes()
    assert [k for m in meta for k in m["key"]] == [f"d0-{i:010d}" for i in range(210)]
    # Round robin: every prefix of 7 * m rows holds m entries of each class.
    assert [x for m in meta for x in m["label"]] == [f"class-{i % 7:04d}" for i in range(210)]
    assert (labels == np.arange(210) % 7).all()
    assert [x for m in meta for x in m["superclass"]][:7] == ["group-0000"] * 5 + ["group-0001"] * 2
    assert meta[2]["image_path"][0] == "gs://vmem-synthetic/labelled/seed-3/d0-0000000160.jpg"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    with open(os.path.join(out, "dataset.json")) as f:
        assert json.load(f) == SMALL.to_dict()
    assert not os.path.exists(out + ".tmp")


def test_the_builds_clip_reader_reads_every_row(tmp_path):
    out = str(tmp_path / "d")
    spec = LabelledSpec(classes=3, per_class=4, dim=8, seed=1)  # float16, clip-retrieval's dtype
    synthetic_data.write_dataset(out, spec)
    labels, vectors = synthetic_data.generate(spec)
    expected = sorted((f"d0-{i:010d}", f"class-{labels[i]:04d}") for i in range(12))
    with TestPipeline(runner="FnApiRunner") as p:
        blocks, failures = p | ReadEmbeddings(parse_embeddings_spec(f"clip:{out},label_column=label"), block_size=5)
        rows = blocks | "Rows" >> beam.FlatMap(
            lambda b: [(str(i), str(c)) for i, c in zip(b.ids, b.labels)])
        assert_that(rows, equal_to(expected), label="rows")
        assert_that(failures, equal_to([]), label="failures")
    # float16 on disk: the vectors are the generator's, rounded.
    emb, _ = _read(out)
    assert emb[0].dtype == np.float16
    np.testing.assert_allclose(emb[0].astype(np.float32), vectors, atol=1e-3)


def test_seeded_bit_for_bit_and_independent_of_file_size(tmp_path, small_blocks):
    a, b, c = (str(tmp_path / x) for x in "abc")
    synthetic_data.write_dataset(a, SMALL)
    synthetic_data.write_dataset(b, SMALL)
    synthetic_data.write_dataset(c, LabelledSpec(**{**SMALL.to_dict(), "rows_per_file": 1000}))
    ea, ma = _read(a)
    eb, mb = _read(b)
    ec, mc = _read(c)
    assert [x.tobytes() for x in ea] == [x.tobytes() for x in eb] and ma == mb
    assert np.concatenate(ea).tobytes() == np.concatenate(ec).tobytes()
    assert [k for m in ma for k in m["key"]] == mc[0]["key"]
    other_seed = synthetic_data.generate(LabelledSpec(**{**SMALL.to_dict(), "seed": 4}))[1]
    queries = synthetic_data.generate(LabelledSpec(**{**SMALL.to_dict(), "draw": 1}))[1]
    assert not np.array_equal(other_seed, np.concatenate(ea)) and not np.array_equal(queries, np.concatenate(ea))
    # Draws share the class structure.
    s0, s1 = synthetic_data.centres(SMALL), synthetic_data.centres(LabelledSpec(**{**SMALL.to_dict(), "draw": 1}))
    assert all(np.array_equal(x, y) for x, y in zip(s0, s1))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_class_structure_modes_and_confusable_neighbouring_classes():
    spec = LabelledSpec(classes=20, per_class=60, dim=256, seed=0)
    labels, memory = synthetic_data.generate(spec)
    q_labels, queries = synthetic_data.generate(LabelledSpec(**{**spec.to_dict(), "per_class": 20, "draw": 1}))
    group = labels // spec.classes_per_group
    # Many modes per class: entries of one mode are closer than entries of one class, which are closer than
    # entries of neighbouring classes (one superclass), closer than the rest.
    modes = np.concatenate([b.modes for b in synthetic_data.iter_blocks(spec)])
    sim = memory @ memory.T
    off_diag = ~np.eye(len(labels), dtype=bool)
    same_class, same_mode = labels[:, None] == labels[None], modes[:, None] == modes[None]
    same_group = group[:, None] == group[None]
    tiers = [sim[off_diag & same_class & same_mode].mean(), sim[same_class & ~same_mode].mean(),
             sim[same_group & ~same_class].mean(), sim[~same_group].mean()]
    assert tiers == sorted(tiers, reverse=True), tiers
    assert tiers[0] - tiers[1] > 0.01 and tiers[1] - tiers[2] > 0.02 and tiers[2] - tiers[3] > 0.1, tiers
    # Nearest class mean: good but not perfect, and nearly every error is a neighbouring class.
    means = _unit(np.stack([memory[labels == c].mean(axis=0) for c in range(spec.classes)]))
    predicted = np.argmax(queries @ means.T, axis=1)
    accuracy = (predicted == q_labels).mean()
    assert 0.6 < accuracy < 0.97, accuracy
    wrong = predicted != q_labels
    assert (predicted[wrong] // spec.classes_per_group == q_labels[wrong] // spec.classes_per_group).mean() > 0.9
    # Nearest neighbour: a class's modes make it harder than the class mean.
    nn_accuracy = (labels[np.argmax(queries @ memory.T, axis=1)] == q_labels).mean()
    assert 0.3 < nn_accuracy < accuracy, (nn_accuracy, accuracy)


@pytest.mark.parametrize("field,value,message", [
    ("classes", 0, "--classes must be >= 1, got 0"),
    ("per_class", -1, "--per-class must be >= 1, got -1"),
    ("noise", float("nan"), "--noise must be >= 0, got nan"),
    ("class_spread", -0.1, "--class-spread must be >= 0, got -0.1"),
    ("draw", -1, "--draw must be >= 0, got -1"),
    ("dtype", "float64", "--dtype must be one of float16, float32, got 'float64'"),
])
def test_bad_spec_is_refused_naming_the_flag(field, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        LabelledSpec(**{**dict(classes=2, per_class=2), field: value})


def test_cli_writes_the_layout_and_refuses_a_bad_flag(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert synthetic_data.main(["--out", out, "--classes", "4", "--per-class", "3", "--dim", "8", "--seed", "2",
                                "--draw", "1", "--classes-per-group", "2", "--dtype", "float32"]) == 0
    emb, meta = _read(out)
    assert emb[0].shape == (12, 8) and meta[0]["key"][0] == "d1-0000000000"
    spec = LabelledSpec(classes=4, per_class=3, dim=8, seed=2, draw=1, classes_per_group=2, dtype="float32")
    assert emb[0].tobytes() == synthetic_data.generate(spec)[1].tobytes()
    assert "wrote 12 rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        synthetic_data.main(["--out", out, "--classes", "0", "--per-class", "3"])
    assert exit_info.value.code == 2
    assert "--classes must be >= 1, got 0" in capsys.readouterr().err


def test_a_smaller_per_class_is_a_prefix_of_a_larger_one(small_blocks):
    small = LabelledSpec(classes=5, per_class=19, dim=8, seed=2)
    large = LabelledSpec(classes=5, per_class=40, dim=8, seed=2)
    s_labels, s_vectors = synthetic_data.generate(small)
    l_labels, l_vectors = synthetic_data.generate(large)
    assert s_vectors.tobytes() == l_vectors[:95].tobytes() and (s_labels == l_labels[:95]).all()
