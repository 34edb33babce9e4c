"""Wall-clock timing shared by the benchmarks: the best of several runs of one call."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(fn: Callable[[], object], *, repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` wall-clock timings of ``fn()``, and the last result (inf, None for none)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result
