"""Region embeddings from one encoder pass: the spatial feature map averaged over each cell of a G x G grid.

The bundled encoder's embedding is the mean of its last feature map (EfficientNet-Lite0 at 224 px: 7 x 7 cells
of 1280 channels), so averaging the same map over sub-windows gives region embeddings in the same space at no
extra encoder pass: the global embedding and the G * G region embeddings come out of one forward pass, where
crops would cost one pass per region (G * G + 1 passes per image). Each cell of the map sees the whole image
(its receptive field spans it), so a region embedding is "the image's features as pooled around that place",
not an embedding of the crop alone.

Cells follow adaptive average pooling (PyTorch's ``AdaptiveAvgPool2d``): cell i of ``size`` map rows spans
rows ``floor(i * size / G)`` to ``ceil((i + 1) * size / G)``, so a grid that does not divide the map (2 on 7)
shares the middle row between neighbouring cells instead of making them unequal.
"""

from __future__ import annotations

import math

import numpy as np

from memory.regions.layout import check_grid


def cell_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the ``grid`` cells along one map axis of ``size`` positions (end exclusive).

    Raises:
      ValueError: a grid finer than the map (``grid > size``), naming both.
    """
    grid = check_grid(grid)
    if grid > size:
        raise ValueError(f"region grid {grid} is finer than the encoder's {size}-cell feature map; use --regions "
                         f"{size} or less")
    return [(math.floor(i * size / grid), math.ceil((i + 1) * size / grid)) for i in range(grid)]


def pool_regions(maps: np.ndarray, grid: int) -> np.ndarray:
    """float32 [n, G*G, d]: the mean of each grid cell of ``maps`` float [n, h, w, d], cells in row-major order."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 4:
        raise ValueError(f"feature maps must be [n, h, w, d], got shape {maps.shape}")
    rows, cols = cell_bounds(maps.shape[1], grid), cell_bounds(maps.shape[2], grid)
    cells = [maps[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in rows for c0, c1 in cols]
    return np.stack(cells, axis=1).astype(np.float32, copy=False)


def region_vectors(maps: np.ndarray, grid: int) -> np.ndarray:
    """float32 [n, 1 + G*G, d]: each image's global vector (the mean of its whole map), then its region vectors.

    Raw, like `encoders.base.Encoder.embed`'s output; entries are L2-normalised where they enter the memory.
    """
    maps = np.asarray(maps, dtype=np.float32)
    pooled = pool_regions(maps, grid)
    return np.concatenate([maps.mean(axis=(1, 2))[:, None, :], pooled], axis=1)


def region_boxes(height: int, width: int, grid: int) -> np.ndarray:
    """float64 [G*G, 4]: each cell's ``(top, left, bottom, right)`` as fractions of the image, row-major.

    A map cell covers ``1 / height`` of the (preprocessed) image's height, so a region's box is its map rows and
    columns scaled to [0, 1].
    """
    rows, cols = cell_bounds(height, grid), cell_bounds(width, grid)
    return np.asarray([(r0 / height, c0 / width, r1 / height, c1 / width) for r0, r1 in rows for c0, c1 in cols],
                      dtype=np.float64)
