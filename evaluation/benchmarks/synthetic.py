"""Seeded synthetic unit vectors for search benchmarks, and recall@k.

Two families:

* ``structured_unit_vectors``: a mixture of Gaussian clusters (like embeddings of images of many classes):
  points sit near one of ``centres`` random centres, so a partitioning index can prune most of the data.
* ``gaussian_unit_vectors``: iid Gaussian directions, uniform on the sphere. Every point is about equally
  far from every query (in high dimension), so no index can skip much work at high recall; this is the
  honest worst case.

``iter_structured_blocks`` streams the structured family block by block (with each row's centre) for
data sets too large to hold in memory.

Pure numpy; every function takes a seed and returns the same bytes for the same arguments.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Rows generated per step: bounds the float32 temporaries to ~block * d * 4 bytes beyond the output.
_BLOCK_ROWS = 65_536


def _normalise_rows_inplace(x: np.ndarray) -> None:
    # float32 norms are accurate to ~1e-7 relative for these magnitudes; doing it in place avoids a second
    # n x d copy (1 GB at 1M x 256).
    x /= np.linalg.norm(x, axis=1, keepdims=True)


def gaussian_unit_vectors(n: int, d: int, *, seed: int) -> np.ndarray:
    """Returns float32 [n, d] iid Gaussian vectors scaled to unit length (uniform on the sphere).

    Args:
      n: Number of vectors, >= 0.
      d: Dimension, >= 1.
      seed: Seed of the generator; equal seeds give identical arrays.
    """
    _check_shape(n, d)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, _BLOCK_ROWS):
        block = out[start:start + _BLOCK_ROWS]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
        _normalise_rows_inplace(block)
    return out


def structured_unit_vectors(n: int, d: int, *, centres: int, noise_ratio: float, seed: int,
                            draw: int = 0) -> np.ndarray:
    """Returns float32 [n, d] unit vectors clustered around ``centres`` random centres.

    Centres are iid N(0, I) (spread 1 per dimension); each point is a uniformly chosen centre plus
    N(0, noise_ratio**2 I) noise, then L2-normalised. With noise_ratio 0.9 and d = 256 two points of one
    cluster have cosine ~0.55 and points of different clusters ~0, so true neighbours are mostly in-cluster
    but the clusters are wide (a partitioner still has to probe several cells for high recall).

    Args:
      n: Number of vectors, >= 0.
      d: Dimension, >= 1.
      centres: Number of mixture centres, >= 1.
      noise_ratio: Per-point noise standard deviation relative to the centres' spread, >= 0.
      seed: Seeds the centres (and, with ``draw``, the points).
      draw: Which independent sample of points from the same mixture: use 0 for a base set and 1 for
        held-out queries of the same distribution (same centres, disjoint random points).

    Returns:
      float32 [n, d] unit rows.
    """
    out = np.empty((n, d), dtype=np.float32)
    start = 0
    for _, block in iter_structured_blocks(n, d, centres=centres, noise_ratio=noise_ratio, seed=seed, draw=draw):
        out[start:start + block.shape[0]] = block
        start += block.shape[0]
    return out


def iter_structured_blocks(n: int, d: int, *, centres: int, noise_ratio: float, seed: int, draw: int = 0
                           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields `structured_unit_vectors`' rows block by block, with the mixture centre of each row.

    Memory stays at one block (``_BLOCK_ROWS`` rows) whatever n is, so 10M x 256 can be streamed to disk.
    The blocks, concatenated, are byte-identical to ``structured_unit_vectors(n, d, ...)`` with the same
    arguments (one random stream, consumed in the same order).

    Args:
      n, d, centres, noise_ratio, seed, draw: As in `structured_unit_vectors`.

    Yields:
      (centre int64 [b], vectors float32 [b, d] unit rows), b <= _BLOCK_ROWS, n rows in all.
    """
    _check_shape(n, d)
    if centres < 1:
        raise ValueError(f"centres must be >= 1, got {centres}")
    if not noise_ratio >= 0:
        raise ValueError(f"noise_ratio must be >= 0, got {noise_ratio}")
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    # Centres depend on seed only, so every draw shares them; points get their own stream per draw.
    centre_vecs = np.random.default_rng([seed, 0]).standard_normal((centres, d), dtype=np.float32)
    rng = np.random.default_rng([seed, 1 + draw])
    noise = np.float32(noise_ratio)
    for start in range(0, n, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, n - start)
        which = rng.integers(0, centres, size=rows)
        block = rng.standard_normal((rows, d), dtype=np.float32)
        block *= noise
        block += centre_vecs[which]
        _normalise_rows_inplace(block)
        yield which, block


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found among its returned ids.

    The set-overlap definition used by ann-benchmarks and ScaNN's papers: order within the top-k does not
    matter, and padding (negative ids) never counts as found.

    Args:
      found_ids: int [nq, k_found] returned ids per query (-1 = padding).
      true_ids: int [nq, k] exact top-k ids per query; k = true_ids.shape[1].

    Returns:
      Recall in [0, 1] (1.0 for zero queries).
    """
    found = np.asarray(found_ids)
    true = np.asarray(true_ids)
    if found.ndim != 2 or true.ndim != 2 or found.shape[0] != true.shape[0]:
        raise ValueError(f"found_ids {found.shape} and true_ids {true.shape} must be [nq, *] with the same nq")
    nq, k = true.shape
    if nq == 0 or k == 0:
        return 1.0
    found = found[:, :k]
    # [nq, k_found, k] equality table: tiny for k = 10; each true id counts once however often it is
    # returned, and padding (-1) never equals a real id.
    hit = (found[:, :, None] == true[:, None, :]).any(axis=1)
    return float(hit.sum()) / (nq * k)


def _check_shape(n: int, d: int) -> None:
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 and d >= 1, got n={n}, d={d}")
