"""Statistics for reproducible experiments: calibration, AUROC, risk-coverage and power-law fits.

Pure numpy (no scipy, sklearn, Beam or TensorFlow). Every function validates its inputs and raises
``ValueError`` naming the bad value and the allowed range; randomness comes only from a seeded
``numpy.random.Generator``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

__all__ = ["PowerLawFit", "ReliabilityBins", "RiskCoverage", "auroc", "coverage_at_risk",
           "expected_calibration_error", "fit_power_law", "geometric_sizes", "reliability_bins",
           "risk_at_coverage", "risk_coverage"]

_SLACK = 1e-12  # Floating-point slack when comparing a requested coverage / risk with an emitted one.


class ReliabilityBins(NamedTuple):
    """Equal-width confidence bins of a reliability diagram (all arrays have shape ``[bins]``).

    Bin ``i`` covers ``(lower[i], upper[i]]``; the first bin also holds confidence 0. Empty bins have
    ``count == 0`` and NaN ``mean_confidence`` / ``accuracy``.
    """
    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray


class RiskCoverage(NamedTuple):
    """Selective-classification curve: accept the most confident queries first.

    Attributes:
        coverage: ``[m]`` ascending fraction of queries accepted, ending at 1 (``m`` = number of distinct
            confidence values; ``m == n`` without ties, then coverage runs 1/n, 2/n, ..., 1).
        risk: ``[m]`` error rate among the accepted queries.
        threshold: ``[m]`` confidence of the last accepted query (every query with confidence
            ``>= threshold`` is accepted).
        aurc: Area under the step curve, ``sum_j risk[j] * (coverage[j] - coverage[j-1])``: the mean of
            risk over the n coverage levels 1/n..1 (equal to ``risk.mean()`` when there are no ties).
    """
    coverage: np.ndarray
    risk: np.ndarray
    threshold: np.ndarray
    aurc: float


class PowerLawFit(NamedTuple):
    """Least-squares fit of ``log10(error) = intercept + slope * log10(size)``.

    Attributes:
        slope: Change of log10(error) per decade of memory size.
        intercept: log10(error) extrapolated to size 1.
        slope_low: Lower end of the bootstrap percentile interval of the slope (NaN without bootstrap).
        slope_high: Upper end of that interval (NaN without bootstrap).
        r2: Coefficient of determination of the fit in log-log space.
        points: Number of (size, error) points used.
        dropped: Number of points dropped because their error was 0 (log undefined).
    """
    slope: float
    intercept: float
    slope_low: float
    slope_high: float
    r2: float
    points: int
    dropped: int


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_1d(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    return arr


def _as_real(name: str, values: object) -> np.ndarray:
    arr = _as_1d(name, values)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not contain NaN, got NaN at index {int(np.flatnonzero(np.isnan(arr))[0])}")
    return arr


def _as_confidence(values: object) -> np.ndarray:
    conf = _as_real("confidence", values)
    bad = np.flatnonzero((conf < 0) | (conf > 1))
    if bad.size:
        raise ValueError(f"confidence must lie in [0, 1], got {conf[bad[0]].item()!r} at index {int(bad[0])}")
    return conf


def _as_correct(values: object, shape: tuple[int, ...], name: str = "correct") -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
            raise ValueError(f"{name} must be bool or 0/1, got dtype {arr.dtype}")
        bad = np.flatnonzero(~np.isin(arr.ravel(), (0, 1)))
        if bad.size:
            raise ValueError(f"{name} must be bool or 0/1, got {arr.ravel()[bad[0]].item()!r} "
                             f"at flat index {int(bad[0])}")
    return arr.astype(bool)


def _bin_stats(confidence: object, correct: object, bins: int) -> tuple[ReliabilityBins, int]:
    bins = _check_int("bins", bins, 1)
    conf = _as_confidence(confidence)
    hit = _as_correct(correct, conf.shape)
    edges = np.arange(bins + 1, dtype=np.float64) / bins  # i / B exactly rounded, so 0.6 lands in (0.4, 0.6].
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=bins) / count
        accuracy = np.bincount(index, weights=hit.astype(np.float64), minlength=bins) / count
    return ReliabilityBins(edges[:-1], edges[1:], count.astype(np.int64), mean_conf, accuracy), conf.size


def reliability_bins(confidence: object, correct: object, *, bins: int = 15) -> ReliabilityBins:
    """Per-bin counts, mean confidence and accuracy for a reliability diagram.

    Args:
        confidence: ``[n]`` floats in [0, 1], the confidence of each prediction.
        correct: ``[n]`` bool (or 0/1): whether each prediction was right.
        bins: Number of equal-width bins over [0, 1] (>= 1).

    Returns:
        The bins; ``expected_calibration_error`` is exactly their count-weighted |accuracy - confidence|.

    Raises:
        ValueError: on empty or mismatched arrays, NaN or out-of-range confidence, non-0/1 correctness or
            ``bins < 1``.
    """
    return _bin_stats(confidence, correct, bins)[0]


def expected_calibration_error(confidence: object, correct: object, *, bins: int = 15) -> float:
    """Expected calibration error: ``sum_b |acc_b - conf_b| * n_b / n`` over equal-width bins.

    Bin ``i`` covers ``(i/B, (i+1)/B]``; the first bin also holds confidence 0. Arguments and errors as in
    ``reliability_bins``.
    """
    rb, n = _bin_stats(confidence, correct, bins)
    filled = rb.count > 0
    gap = np.abs(rb.accuracy[filled] - rb.mean_confidence[filled])
    return float(np.sum(gap * rb.count[filled]) / n)


def auroc(scores_positive: object, scores_negative: object) -> float:
    """Area under the ROC curve: ``P(pos > neg) + 0.5 * P(pos == neg)``, exact and tie-aware.

    Computed from average ranks of the pooled scores (Mann-Whitney U) in O(n log n).

    Args:
        scores_positive: ``[n_pos]`` real scores of the positive class (higher = more positive).
        scores_negative: ``[n_neg]`` real scores of the negative class.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: if either array is empty, not 1-D, or contains NaN.
    """
    pos = _as_real("scores_positive", scores_positive)
    neg = _as_real("scores_negative", scores_negative)
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)  # 1-based rank of the last member of each tie group.
    ranks = (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def risk_coverage(confidence: object, correct: object) -> RiskCoverage:
    """Risk-coverage curve of accepting queries in descending confidence; ties are accepted together.

    Args:
        confidence: ``[n]`` finite real confidences (any scale; only their order matters).
        correct: ``[n]`` bool (or 0/1): whether each prediction was right.

    Returns:
        One point per distinct confidence value (see ``RiskCoverage``).

    Raises:
        ValueError: on empty or mismatched arrays, NaN/infinite confidence or non-0/1 correctness.
    """
    conf = _as_real("confidence", confidence)
    bad = np.flatnonzero(~np.isfinite(conf))
    if bad.size:
        raise ValueError(f"confidence must be finite, got {conf[bad[0]].item()!r} at index {int(bad[0])}")
    wrong = ~_as_correct(correct, conf.shape)
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], wrong[order]
    ends = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))  # Last index of each tie group.
    accepted = ends + 1
    coverage = accepted / conf.size
    risk = np.cumsum(wrong)[ends] / accepted
    aurc = float(np.sum(risk * np.diff(coverage, prepend=0.0)))
    return RiskCoverage(coverage, risk, conf[ends], aurc)


def risk_at_coverage(rc: RiskCoverage, coverage: float) -> float:
    """Risk at the smallest emitted coverage >= ``coverage`` (which must lie in (0, 1])."""
    if not isinstance(coverage, numbers.Real) or not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    i = int(np.searchsorted(rc.coverage, coverage - _SLACK, side="left"))
    return float(rc.risk[min(i, len(rc.risk) - 1)])


def coverage_at_risk(rc: RiskCoverage, max_risk: float) -> float:
    """Largest emitted coverage whose risk is <= ``max_risk`` (in [0, 1]); 0.0 if there is none."""
    if not isinstance(max_risk, numbers.Real) or not 0.0 <= max_risk <= 1.0:
        raise ValueError(f"max_risk must lie in [0, 1], got {max_risk!r}")
    ok = np.asarray(rc.risk) <= max_risk + _SLACK
    return float(np.max(np.asarray(rc.coverage)[ok])) if ok.any() else 0.0


def _fit_columns(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope / intercept of each column of ``y`` on ``x`` (``[s, 1]`` or ``[s, b]``), using
    rows where ``mask``; NaN where fewer than 3 rows or only one distinct x remain."""
    w = mask.astype(np.float64)
    y = np.where(mask, y, 0.0)
    n = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (w * x).sum(axis=0) / n
        my = (w * y).sum(axis=0) / n
        dx = np.where(mask, x - mx, 0.0)
        sxx = (dx * dx).sum(axis=0)
        slope = (dx * (y - my)).sum(axis=0) / sxx
    slope = np.where((n >= 3) & (sxx > 1e-24), slope, np.nan)  # 1e-24: rounding noise of equal sizes.
    return slope, my - slope * mx


def fit_power_law(sizes: object, errors: object, *, per_query_correct: object | None = None,
                  bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> PowerLawFit:
    """Fits ``log10(error) = intercept + slope * log10(size)`` with a bootstrap interval for the slope.

    Points with error 0 cannot be logged: they are dropped (and counted in ``dropped``), also inside each
    bootstrap replicate; replicates left with fewer than 3 points or one distinct size are skipped.

    Args:
        sizes: ``[s]`` positive integer memory sizes (at least two distinct among usable points).
        errors: ``[s]`` error rates in [0, 1] (0 is dropped, so usable ones lie in (0, 1]).
        per_query_correct: Optional ``[s, q]`` bool (or 0/1): whether query ``j`` was right with memory
            ``sizes[i]``; ``errors`` must equal ``1 - per_query_correct.mean(axis=1)`` (to 1e-9). When
            given, the bootstrap resamples queries (one resampled query set shared by every size);
            otherwise it resamples the usable (size, error) points.
        bootstrap: Number of bootstrap replicates (>= 0; 0 gives NaN interval ends).
        seed: Seed of the ``numpy.random.Generator`` used for resampling.
        confidence: Coverage of the percentile interval, in (0, 1).

    Returns:
        The fit; see ``PowerLawFit``.

    Raises:
        ValueError: on bad shapes or values, fewer than 3 usable points, or all usable sizes equal.
    """
    size_arr = _as_real("sizes", sizes)
    bad = np.flatnonzero((size_arr < 1) | (size_arr != np.round(size_arr)) | ~np.isfinite(size_arr))
    if bad.size:
        raise ValueError(f"sizes must be positive integers (>= 1), got {size_arr[bad[0]].item()!r} "
                         f"at index {int(bad[0])}")
    err = _as_real("errors", errors)
    if err.shape != size_arr.shape:
        raise ValueError(f"errors must have shape {size_arr.shape} like sizes, got {err.shape}")
    bad = np.flatnonzero((err < 0) | (err > 1))
    if bad.size:
        raise ValueError(f"errors must lie in [0, 1], got {err[bad[0]].item()!r} at index {int(bad[0])}")
    bootstrap = _check_int("bootstrap", bootstrap, 0)
    seed = _check_int("seed", seed, 0)
    if not isinstance(confidence, numbers.Real) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    usable = err > 0
    if usable.sum() < 3:
        raise ValueError(f"need at least 3 points with error > 0 to fit a power law, got {int(usable.sum())}")
    x = np.log10(size_arr)
    with np.errstate(divide="ignore"):
        y = np.log10(err)
    slope, intercept = (float(v[0]) for v in _fit_columns(x[:, None], y[:, None], usable[:, None]))
    if math.isnan(slope):
        raise ValueError(f"usable sizes must not all be equal, got only size {int(size_arr[usable][0])}")
    resid = y[usable] - (intercept + slope * x[usable])
    sst = float(np.sum((y[usable] - y[usable].mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / sst if sst > 0 else 1.0

    rng = np.random.default_rng(seed)
    slopes = np.empty(0)
    if per_query_correct is not None:
        pqc = np.asarray(per_query_correct)
        if pqc.ndim != 2 or pqc.shape[0] != size_arr.size or pqc.shape[1] == 0:
            raise ValueError(f"per_query_correct must have shape [{size_arr.size}, num_queries >= 1], "
                             f"got {pqc.shape}")
        pqc = _as_correct(pqc, pqc.shape, "per_query_correct").astype(np.float64)
        implied = 1.0 - pqc.mean(axis=1)
        mismatch = np.flatnonzero(np.abs(implied - err) > 1e-9)
        if mismatch.size:
            i = int(mismatch[0])
            raise ValueError(f"errors[{i}] = {err[i].item()!r} but 1 - mean(per_query_correct[{i}]) = "
                             f"{implied[i].item()!r}; they must agree to 1e-9")
        q = pqc.shape[1]
        chunk = max(1, min(bootstrap, 4_000_000 // q))
        parts = []
        for start in range(0, bootstrap, chunk):
            b = min(chunk, bootstrap - start)
            draws = rng.integers(0, q, size=(b, q)) + (np.arange(b) * q)[:, None]
            weights = np.bincount(draws.ravel(), minlength=b * q).reshape(b, q)
            boot_err = 1.0 - (pqc @ weights.T.astype(np.float64)) / q  # [s, b]; sums of 0/1 are exact.
            with np.errstate(divide="ignore"):
                parts.append(_fit_columns(x[:, None], np.log10(boot_err), boot_err > 0)[0])
        slopes = np.concatenate(parts) if parts else slopes
    elif bootstrap:
        ux, uy = x[usable], y[usable]
        picks = rng.integers(0, ux.size, size=(bootstrap, ux.size))
        slopes = _fit_columns(ux[picks].T, uy[picks].T, np.ones((ux.size, bootstrap), bool))[0]  # [s, b]
    slopes = slopes[~np.isnan(slopes)]
    low = high = math.nan
    if slopes.size:
        low, high = (float(v) for v in np.quantile(slopes, [(1 - confidence) / 2, (1 + confidence) / 2]))
    return PowerLawFit(slope, intercept, low, high, r2, int(usable.sum()), int((~usable).sum()))


def geometric_sizes(low: int, high: int, *, per_decade: int = 3) -> list[int]:
    """Increasing unique integers from ``low`` to ``high`` (both included) on a geometric grid.

    Interior points are ``round(10 ** (k / per_decade))``, aligned to powers of ten (``per_decade=3``
    gives 1, 2, 5, 10, 22, 46, 100, ...), e.g. ``geometric_sizes(10, 1000)`` ->
    ``[10, 22, 46, 100, 215, 464, 1000]``.

    Raises:
        ValueError: unless ``1 <= low <= high`` and ``per_decade >= 1`` are integers.
    """
    low = _check_int("low", low, 1)
    high = _check_int("high", high, low)
    per_decade = _check_int("per_decade", per_decade, 1)
    first = math.floor(per_decade * math.log10(low)) - 1
    last = math.ceil(per_decade * math.log10(high)) + 1
    grid = {round(10 ** (k / per_decade)) for k in range(first, last + 1)}
    return sorted({low, high} | {v for v in grid if low < v < high})
