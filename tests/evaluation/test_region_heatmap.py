"""Heat maps of region matches: the shading each image gets, and PNGs that decode."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from evaluation.region_heatmap import data_uri, heatmap_png, match_maps
from memory.regions.classify import NeighborRegions
from memory.regions.pooling import region_boxes


def test_match_maps_shade_query_regions_by_their_match_and_neighbour_regions_by_who_chose_them():
    maps = match_maps(NeighborRegions("img", matched=(2, 2, 0, 3), similarity=(0.9, 0.7, 0.5, 0.8)))
    np.testing.assert_allclose(maps.query, [0.9, 0.7, 0.5, 0.8])
    assert maps.query_labels == ["->2", "->2", "->0", "->3"]
    np.testing.assert_allclose(maps.memory, [0.5, np.nan, 0.9, 0.8])  # Region 1 was chosen by none.
    assert maps.memory_labels == ["2", "", "0,1", "3"]


def test_heatmap_png_shades_the_strongest_cell_most():
    pixels = np.full((224, 224, 3), 255, np.uint8)
    png = heatmap_png(pixels, region_boxes(2, 2, 2), np.asarray([0.2, 0.9, np.nan, 0.5]), ["", "", "", ""],
                      low=0.2, high=0.9, size=100)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert img.shape == (100, 100, 3)
    green = {name: img[y, x, 1] for name, (y, x) in {"weak": (25, 25), "strong": (25, 75), "none": (75, 25),
                                                     "mid": (75, 75)}.items()}
    assert green["strong"] < green["mid"] < green["weak"] < green["none"] == 255  # Red covers white: less green.
    assert data_uri(png).startswith("data:image/png;base64,iVBOR")
