"""Vector helpers shared by the build and query paths."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12, first_row: int = 0) -> np.ndarray:
    """Scales each row to unit L2 norm.

    Cosine distance in the memory is ``1 - dot`` of unit vectors, so every embedding and every query goes
    through here. The norm is computed in float64 so float32 inputs with large or tiny magnitudes do not
    overflow/underflow before the division.

    Args:
      x: Array of shape [n, d] (or [d], treated as one row).
      eps: Rows with norm <= eps are rejected rather than silently turned into NaN or zeros.
      first_row: Index of x's first row in the caller's array (a chunk of it), for the error message.

    Returns:
      float32 array of the same shape with unit-length rows.

    Raises:
      ValueError: naming the first offending row index, for zero (or non-finite) rows or a bad rank.
    """
    arr = np.asarray(x)
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"l2_normalize expects a [n, d] array, got shape {arr.shape}")
    arr64 = arr.astype(np.float64, copy=False)
    norms = np.linalg.norm(arr64, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms <= eps))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"cannot L2-normalise row {first_row + i}: norm {float(norms[i])!r} (rows with zero or non-finite norm "
            f"have no direction; {bad.size} such row(s) in total); drop or fix these embeddings")
    out = (arr64 / norms[:, None]).astype(np.float32)
    return out[0] if squeeze else out
