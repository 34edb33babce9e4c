"""PackedStrings: uris held as UTF-8 bytes + offsets give back exactly the strings packed."""

import numpy as np
import pyarrow as pa
import pytest

from memory.store.packed import PackedStrings

STRINGS = ["gs://b/a.png", "", "/img/ünï cödé/✓.jpg", "x" * 300, "c"]


def test_packed_strings_round_trip_from_python_and_arrow():
    packed = PackedStrings.of(np.asarray(STRINGS))
    assert len(packed) == 5 and packed.to_numpy().tolist() == STRINGS
    assert packed.nbytes == 6 * 8 + sum(len(s.encode()) for s in STRINGS)
    chunked = pa.chunked_array([pa.array(STRINGS[:2]), pa.array(STRINGS[2:])])
    assert PackedStrings.from_arrow(chunked).to_numpy().tolist() == STRINGS
    sliced = pa.array(["skip"] + STRINGS)[1:]  # A non-zero Arrow offset.
    assert PackedStrings.from_arrow(sliced).to_numpy().tolist() == STRINGS
    assert PackedStrings.from_arrow(pa.array(["a", None, "b"])).to_numpy().tolist() == ["a", "", "b"]
    assert len(PackedStrings.from_arrow(pa.array([], pa.string()))) == 0


def test_packed_strings_take_slice_and_concat():
    packed = PackedStrings.of(STRINGS)
    assert packed.take(np.asarray([[4, 0], [2, 2]])).tolist() == [["c", "gs://b/a.png"], [STRINGS[2]] * 2]
    assert packed.take([]).shape == (0,)
    assert packed.slice(2, 4).to_numpy().tolist() == STRINGS[2:4]
    both = PackedStrings.concat([packed.slice(0, 2), PackedStrings.of([]), packed.slice(2, 5)])
    assert both.to_numpy().tolist() == STRINGS
    assert len(PackedStrings.concat([])) == 0


def test_packed_strings_refuse_bad_rows_and_offsets():
    with pytest.raises(IndexError, match=r"rows must be in \[0, 5\), got range \[0, 5\]"):
        PackedStrings.of(STRINGS).take([0, 5])
    with pytest.raises(ValueError, match=r"offsets must run from 0 to the 3 data bytes"):
        PackedStrings(np.asarray([0, 2, 1, 3]), np.zeros(3, np.uint8))
