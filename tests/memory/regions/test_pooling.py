"""Region pooling: per-cell means of a feature map (adaptive average pooling), global first."""

from __future__ import annotations

import numpy as np
import pytest

from memory.regions.pooling import cell_bounds, pool_regions, region_boxes, region_vectors


def test_cell_bounds_follow_adaptive_pooling():
    assert cell_bounds(7, 2) == [(0, 4), (3, 7)]  # The middle row is shared, not given to one cell.
    assert cell_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert cell_bounds(7, 7) == [(i, i + 1) for i in range(7)]
    with pytest.raises(ValueError, match="region grid 8 is finer than the encoder's 7-cell feature map"):
        cell_bounds(7, 8)


def test_pool_regions_is_the_mean_of_each_cell_in_row_major_order():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 7, 7, 5)).astype(np.float32)
    pooled = pool_regions(maps, 2)
    assert pooled.shape == (3, 4, 5) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[:, 1], maps[:, 0:4, 3:7].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 2], maps[:, 3:7, 0:4].mean(axis=(1, 2)), rtol=1e-6)
    # A map constant per quadrant (4 x 4, grid 2) pools to exactly those constants.
    quad = np.zeros((1, 4, 4, 1), np.float32)
    quad[0, :2, 2:] = 1.0
    quad[0, 2:, :2] = 2.0
    quad[0, 2:, 2:] = 3.0
    assert pool_regions(quad, 2)[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_region_vectors_put_the_global_mean_first():
    rng = np.random.default_rng(1)
    maps = rng.random((2, 7, 7, 4)).astype(np.float32)
    vectors = region_vectors(maps, 3)
    assert vectors.shape == (2, 10, 4)
    np.testing.assert_allclose(vectors[:, 0], maps.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(vectors[:, 1:], pool_regions(maps, 3), rtol=1e-6)
    with pytest.raises(ValueError, match=r"feature maps must be \[n, h, w, d\]"):
        region_vectors(maps[0], 2)


def test_region_boxes_are_the_cells_as_image_fractions():
    boxes = region_boxes(7, 7, 2)
    np.testing.assert_allclose(boxes[0], [0, 0, 4 / 7, 4 / 7])
    np.testing.assert_allclose(boxes[3], [3 / 7, 3 / 7, 1, 1])
