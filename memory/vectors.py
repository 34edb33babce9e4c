"""Vector helpers shared by the build and query paths."""

from __future__ import annotations

import numpy as np

# A float32 row whose float32 sum of squares is within this of 1 is already unit length to float32 precision:
# rows scaled to unit length in float64 and rounded to float32 come out within 5e-7 at 1,280 dims (the
# demo's encoder), so this leaves headroom for wider rows' summation error. Such rows are kept as they are
# (a query's scale never changes its neighbour order; a distance moves by at most 2e-6, so an entry's scale
# can only swap neighbours whose distances are that close).
UNIT_SUMSQ_TOL = 4e-6


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12, first_row: int = 0) -> np.ndarray:
    """Scales each row to unit L2 norm.

    Cosine distance in the memory is ``1 - dot`` of unit vectors, so every embedding and every query goes
    through here. The norm is computed in float64 so float32 inputs with large or tiny magnitudes do not
    overflow/underflow before the division. Rows of a float32 array that are already unit length (within
    UNIT_SUMSQ_TOL on the sum of squares) are not rescaled: queries that come from the memory's own
    embedding step skip a float64 pass (2 ms per 1,000 x 1,280 queries, against 0.25 ms for the check).

    Args:
      x: Array of shape [n, d] (or [d], treated as one row).
      eps: Rows with norm <= eps are rejected rather than silently turned into NaN or zeros.
      first_row: Index of x's first row in the caller's array (a chunk of it), for the error message.

    Returns:
      float32 array of the same shape with unit-length rows; ``x`` itself when it is a float32 array whose
      rows are all unit length already.

    Raises:
      ValueError: naming the first offending row index, for zero (or non-finite) rows or a bad rank.
    """
    arr = np.asarray(x)
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"l2_normalize expects a [n, d] array, got shape {arr.shape}")
    if arr.dtype != np.float32 or not arr.size:
        out = _rescale(arr, eps, first_row)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            off = np.flatnonzero(~(np.abs(np.einsum("ij,ij->i", arr, arr) - 1) <= UNIT_SUMSQ_TOL))
        if not off.size:
            out = arr
        elif off.size == arr.shape[0]:
            out = _rescale(arr, eps, first_row)
        else:
            out = arr.copy()
            out[off] = _rescale(arr[off], eps, first_row, rows=off)
    return out[0] if squeeze else out


def _rescale(arr: np.ndarray, eps: float, first_row: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``arr`` divided by their float64 norms, as float32 (``rows``: their indices in the caller's x)."""
    arr64 = arr.astype(np.float64, copy=False)
    norms = np.linalg.norm(arr64, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms <= eps))
    if bad.size:
        i = int(bad[0])
        at = first_row + (i if rows is None else int(rows[i]))
        raise ValueError(
            f"cannot L2-normalise row {at}: norm {float(norms[i])!r} (rows with zero or non-finite norm "
            f"have no direction; {bad.size} such row(s) in total); drop or fix these embeddings")
    return (arr64 / norms[:, None]).astype(np.float32)
