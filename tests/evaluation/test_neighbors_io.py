"""Tests for evaluation.neighbors_io."""

import gzip
import json

import numpy as np
import pytest

from evaluation import neighbors_io
from evaluation.neighbors_io import NeighborFormatError, NeighborRecord

PAPER_RECORDS = [
    {"image_id": 17, "image_class": 3, "neighbor_image_ids": [101, 102],
     "neighbor_classes": [3, 5], "neighbor_distances": [0.125, 0.25]},
    {"image_id": "ILSVRC2012_val_00000002", "image_class": 5,
     "neighbor_image_ids": ["a", "b", "c"], "neighbor_classes": [5, 5, 3],
     "neighbor_distances": [0.5, 0.5, 0.75]},
]


def _records():
    return [
        NeighborRecord("q1", 0, ["m1", "m2"], [0, 1], [0.1, 0.2], [1.0, 0.5]),
        NeighborRecord("q2", 1, ["m3"], [1], [0.3], [0.875]),
    ]


@pytest.mark.parametrize("name", ["n.jsonl", "n.jsonl.gz"])
def test_roundtrip_our_format(tmp_path, name):
    path = tmp_path / name
    assert neighbors_io.write_records(path, _records()) == 2
    assert neighbors_io.read_records(path) == _records()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as f:
        first = json.loads(f.readline())
    assert first == {"query_id": "q1", "true_label": 0,
                     "neighbor_ids": ["m1", "m2"], "neighbor_labels": [0, 1],
                     "neighbor_distances": [0.1, 0.2],
                     "neighbor_entry_weights": [1.0, 0.5]}


def test_roundtrip_keeps_every_float_and_non_ascii_id(tmp_path):
    """float32 distances as the job writes them (float64 of float32) and a non-ASCII id come back exactly."""
    rng = np.random.default_rng(0)
    distances = np.sort(rng.random(100, dtype=np.float32)).astype(float).tolist() + [1e-12, 2.0]
    record = NeighborRecord("q/écharpe 😀", 3, [f"m{i}" for i in range(102)], [i % 7 for i in range(102)], distances)
    path = tmp_path / "n.jsonl"
    neighbors_io.write_records(path, [record])
    assert neighbors_io.read_records(path) == [record]
    assert json.loads(path.read_text(encoding="utf-8")) == record.to_json()


@pytest.mark.parametrize("field", ["neighbor_distances", "neighbor_weights"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_write_refuses_non_finite_numbers(tmp_path, field, bad):
    values = {"neighbor_distances": [0.1, 0.2], "neighbor_weights": [1.0, 1.0]}
    values[field] = [0.1, bad]
    record = NeighborRecord("q", 0, ["m1", "m2"], [0, 1], values["neighbor_distances"], values["neighbor_weights"])
    stored = {"neighbor_weights": "neighbor_entry_weights"}.get(field, field)
    with pytest.raises(ValueError, match=rf"query 'q': {stored} holds {bad!r}; NaN and infinities are not JSON"):
        neighbors_io.write_records(tmp_path / "n.jsonl", [record])


def test_weights_key_omitted_when_none(tmp_path):
    path = tmp_path / "n.jsonl"
    neighbors_io.write_records(
        path, [NeighborRecord("q", 2, ["m"], [2], [0.0])])
    assert "neighbor_entry_weights" not in json.loads(path.read_text())
    assert neighbors_io.read_records(path)[0].neighbor_weights is None


def _expected_paper():
    return [
        NeighborRecord("17", 3, ["101", "102"], [3, 5], [0.125, 0.25]),
        NeighborRecord("ILSVRC2012_val_00000002", 5, ["a", "b", "c"],
                       [5, 5, 3], [0.5, 0.5, 0.75]),
    ]


def test_paper_format_jsonl(tmp_path):
    path = tmp_path / "paper.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAPER_RECORDS) + "\n\n")
    assert neighbors_io.read_records(path) == _expected_paper()


def test_paper_format_json_array_gz(tmp_path):
    path = tmp_path / "paper.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(PAPER_RECORDS, f, indent=2)
    assert neighbors_io.read_records(path) == _expected_paper()


def test_paper_array_error_names_line(tmp_path):
    bad = [PAPER_RECORDS[0], {k: v for k, v in PAPER_RECORDS[1].items()
                              if k != "neighbor_classes"}]
    path = tmp_path / "paper.json"
    path.write_text(json.dumps(bad, indent=1))
    text = path.read_text().splitlines()
    # Line where the second element's "{" is.
    line = [i for i, t in enumerate(text, 1) if t.strip() == "{"][1]
    with pytest.raises(NeighborFormatError) as e:
        neighbors_io.read_records(path)
    assert str(e.value).startswith(f"{path}:{line}: paper record is missing "
                                   f"field 'neighbor_classes'")


def _read_or_error(path):
    try:
        return neighbors_io.read_records(path)
    except NeighborFormatError as e:
        return str(e)


@pytest.mark.parametrize("text", [
    json.dumps(PAPER_RECORDS, indent=2),
    "[\n" + ",\n\n".join(json.dumps(r) for r in PAPER_RECORDS * 20) + "\n]\n",
    json.dumps(PAPER_RECORDS, indent=1)[:-30],                        # Unterminated.
    json.dumps(PAPER_RECORDS, indent=1).replace("},", "}", 1),        # A missing comma.
    json.dumps(PAPER_RECORDS, indent=1).replace('"neighbor_classes"', 'neighbor_classes', 1),  # Invalid JSON.
    "[\n" + json.dumps(PAPER_RECORDS[0]) + ",\n  12345678\n]",      # Not an object, split at any block end.
    "[ ]",
])
def test_a_json_array_read_in_small_blocks_reads_as_one_block(tmp_path, monkeypatch, text):
    # The array is streamed a block at a time (memory bounded by the block, not the file): every block size
    # gives the same records, and the same errors on the same lines, as one block holding the whole file.
    path = tmp_path / "paper.json"
    path.write_text(text)
    whole = _read_or_error(path)
    assert whole == [] or (isinstance(whole, list) and len(whole) >= 2) or whole.startswith(f"{path}:")
    for block in (1, 2, 3, 7, 64):
        monkeypatch.setattr(neighbors_io, "ARRAY_BLOCK_CHARS", block)
        assert _read_or_error(path) == whole, block


def test_empty_json_array(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[ ]\n")
    assert neighbors_io.read_records(path) == []


def test_mixed_formats_in_one_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(_records()[0].to_json()) + "\n" +
                    json.dumps(PAPER_RECORDS[0]) + "\n")
    got = neighbors_io.read_records(path)
    assert [r.query_id for r in got] == ["q1", "17"]
    assert got[1].neighbor_labels == [3, 5]


def test_missing_field_names_file_line_field(tmp_path):
    path = tmp_path / "ours.jsonl"
    good = _records()[0].to_json()
    bad = dict(good)
    del bad["neighbor_distances"]
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(NeighborFormatError,
                       match=rf"^{path}:2: visual-memory record is missing "
                       r"field 'neighbor_distances'"):
        neighbors_io.read_records(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n')
    with pytest.raises(NeighborFormatError,
                       match=rf"^{path}:1: record matches neither format.*"
                       r"query_id.*image_id.*got id"):
        neighbors_io.read_records(path)


def test_invalid_json_and_bad_types(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(NeighborFormatError, match=rf"^{path}:1: invalid JSON"):
        neighbors_io.read_records(path)
    rec = dict(PAPER_RECORDS[0], neighbor_classes=[3, "dog"])
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(NeighborFormatError,
                       match=r"field 'neighbor_classes' must be an integer "
                       r"label, got 'dog'"):
        neighbors_io.read_records(path)


def test_length_mismatch(tmp_path):
    path = tmp_path / "x.jsonl"
    rec = dict(PAPER_RECORDS[0], neighbor_distances=[0.1])
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(NeighborFormatError,
                       match=rf"^{path}:1: query '17': neighbour lists differ"):
        neighbors_io.read_records(path)


@pytest.mark.parametrize("bad", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_distances_are_refused_with_file_and_line(tmp_path, bad):
    # In the arrays inf marks padding: a -Infinity nearest neighbour would silently stop voting.
    path = tmp_path / "x.jsonl"
    good = json.dumps(_records()[0].to_json())
    path.write_text(good + "\n" + good.replace('"q1"', '"q2"').replace("[0.1, 0.2]", f"[{bad}, 0.2]") + "\n")
    with pytest.raises(NeighborFormatError, match=rf"^{path}:2: field 'neighbor_distances' must hold finite "
                       r"numbers, got -?(inf|nan); NaN and \+/-Infinity are not distances"):
        neighbors_io.read_records(path)
    rec = dict(PAPER_RECORDS[0], neighbor_distances=[0.1, bad])
    path.write_text(json.dumps(rec).replace(f'"{bad}"', bad) + "\n")
    with pytest.raises(NeighborFormatError, match=rf"^{path}:1: field 'neighbor_distances' must hold finite"):
        neighbors_io.read_records(path)


@pytest.mark.parametrize("field, value", [("neighbor_labels", [0, 2 ** 63]), ("true_label", -2 ** 63 - 1),
                                          ("neighbor_labels", [0, 1e300]), ("true_label", 2.0 ** 63)])
def test_labels_outside_int64_are_refused_with_file_and_line(tmp_path, field, value):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(_records()[0].to_json()) + "\n"
                    + json.dumps(dict(_records()[1].to_json(), query_id="q3", **{field: value},
                                      **({"neighbor_ids": ["a", "b"], "neighbor_distances": [0.1, 0.2],
                                          "neighbor_entry_weights": [1.0, 1.0]} if field == "neighbor_labels"
                                         else {}))) + "\n")
    with pytest.raises(NeighborFormatError, match=rf"^{path}:2: field '{field}' holds label .*, outside the int64 "
                       r"range \[-9223372036854775808, 9223372036854775807\]"):
        neighbors_io.read_records(path)


def test_a_bad_true_label_names_its_location_once(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(dict(_records()[0].to_json(), true_label="x")) + "\n")
    with pytest.raises(NeighborFormatError) as e:
        neighbors_io.read_records(path)
    assert str(e.value) == f"{path}:1: field 'true_label' must be an integer label, got 'x'"


def test_read_neighbor_files_missing_and_duplicates(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    neighbors_io.write_records(a, _records())
    neighbors_io.write_records(b, _records()[:1])
    with pytest.raises(FileNotFoundError,
                       match=f"neighbours file not found: {tmp_path}/nope"):
        neighbors_io.read_neighbor_files([a, tmp_path / "nope"])
    with pytest.raises(NeighborFormatError,
                       match=rf"query id 'q1' occurs twice: in {a} and {b}"):
        neighbors_io.read_neighbor_files([a, b])


def test_to_arrays_pads_and_truncates():
    labels, dists, true, weights = neighbors_io.to_arrays(_records(), 3)
    np.testing.assert_array_equal(labels, [[0, 1, -1], [1, -1, -1]])
    np.testing.assert_array_equal(dists, [[0.1, 0.2, np.inf],
                                          [0.3, np.inf, np.inf]])
    np.testing.assert_array_equal(true, [0, 1])
    np.testing.assert_array_equal(weights, [[1.0, 0.5, 0.0],
                                            [0.875, 0.0, 0.0]])
    assert labels.dtype == np.int64 and true.dtype == np.int64
    labels, dists, _, _ = neighbors_io.to_arrays(_records(), 1)
    np.testing.assert_array_equal(labels, [[0], [1]])
    labels, _, _, weights = neighbors_io.to_arrays(_expected_paper())
    assert labels.shape == (2, 3)
    assert weights is None


def test_to_arrays_errors():
    mixed = [_records()[0], _expected_paper()[0]]
    with pytest.raises(ValueError, match=r"only some records carry "
                       r"neighbor_entry_weights \(query '17' has none\)"):
        neighbors_io.to_arrays(mixed, 2)
    unsorted = [NeighborRecord("u", 0, ["a", "b"], [0, 1], [0.9, 0.1])]
    with pytest.raises(ValueError, match=r"query 'u': neighbor_distances are "
                       r"not sorted nearest first"):
        neighbors_io.to_arrays(unsorted, 2)
    with pytest.raises(ValueError, match=r"k_max must be >= 1, got 0"):
        neighbors_io.to_arrays(_records(), 0)
