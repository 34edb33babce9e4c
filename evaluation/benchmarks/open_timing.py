"""What checking shard files on load costs: `VisualMemory.open` timed with and without it, in one process.

Opening checks every shard file against the size and crc32c its manifest records (memory.store.integrity);
``verify=False`` skips the check. `time_open` alternates the two opens (after one unmeasured open, so both
read from the page cache) and keeps the best of each, the figure least disturbed by other work on a shared
machine. `bench_latency` and `bench_scale` print it.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class OpenTimes:
    """Best-of-``repeats`` seconds of `VisualMemory.open` with the shard-file check and without it."""
    verified_s: float
    unverified_s: float
    repeats: int

    @property
    def ratio(self) -> float:
        """Verified / unverified open time (1.10 = the check adds 10 %)."""
        return self.verified_s / self.unverified_s

    def line(self) -> str:
        """One line for a benchmark's output."""
        return (f"open: {self.verified_s:.3f} s verified (default), {self.unverified_s:.3f} s with verify=False; "
                f"ratio {self.ratio:.3f} ({(self.ratio - 1) * 100:+.1f} %), best of {self.repeats} alternating "
                "opens each")


def time_open(path: str, *, repeats: int = 3, **open_kwargs: Any) -> OpenTimes:
    """Times ``VisualMemory.open(path, verify=...)`` both ways, ``repeats`` times each, alternating which goes
    first; ``open_kwargs`` go to every open (e.g. ``search_threads``)."""
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    VisualMemory.open(path, verify=False, **open_kwargs)  # Unmeasured: files into the page cache, imports.
    best = {True: float("inf"), False: float("inf")}
    for r in range(repeats):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            gc.collect()
            start = time.perf_counter()
            memory = VisualMemory.open(path, verify=verify, **open_kwargs)
            best[verify] = min(best[verify], time.perf_counter() - start)
            del memory
    gc.collect()
    return OpenTimes(verified_s=best[True], unverified_s=best[False], repeats=repeats)
