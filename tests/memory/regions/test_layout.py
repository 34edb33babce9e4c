"""Region entry ids: naming, parsing, expansion to whole images, and the grid a manifest records."""

from __future__ import annotations

import numpy as np
import pytest

from memory.regions import layout


def test_region_ids_round_trip_to_their_image():
    ids = layout.region_ids(["a", "b#x", "c#r"], 2)
    assert ids.shape == (3, 4)
    assert ids[0].tolist() == ["a#r0", "a#r1", "a#r2", "a#r3"]
    assert layout.image_ids_of(ids).tolist() == [["a"] * 4, ["b#x"] * 4, ["c#r"] * 4]
    assert layout.parse_entry_id("b#x#r3") == layout.EntryRef("b#x", 3)
    assert layout.parse_entry_id("b#x") == layout.EntryRef("b#x", None)
    # Not a region id: no digits, a leading zero, nothing before the separator.
    assert layout.is_region_id(np.asarray(["a#r", "a#r01", "#r1", "a#r10", "a"])).tolist() == [
        False, False, False, True, False]


def test_whole_image_ids_expands_images_and_refuses_region_ids():
    got = layout.whole_image_ids(np.asarray(["b", "a", "a"]), 2)
    assert got.tolist() == sorted(["a", "b"] + [f"{i}#r{r}" for i in "ab" for r in range(4)])
    assert layout.whole_image_ids(np.asarray(["b", "a"]), None).tolist() == ["a", "b"]
    with pytest.raises(ValueError, match=r"region id\(s\) given.*pass the image id \('a'\)"):
        layout.whole_image_ids(np.asarray(["a#r2"]), 2)


def test_check_image_ids_refuses_ids_that_read_as_regions():
    layout.check_image_ids(["a", "a#r", "x/y.png"])
    with pytest.raises(ValueError, match=r"1 image id\(s\) end like a region id.*'img#r7'"):
        layout.check_image_ids(["ok", "img#r7"])


@pytest.mark.parametrize("grid", [1, 0, 17, 2.0, True, "2"])
def test_check_grid_refuses_bad_grids(grid):
    with pytest.raises(ValueError, match=r"region grid must be an int in \[2, 16\]"):
        layout.check_grid(grid)
