"""Progress lines of a long stage: how many entries so far, at what rate, and when it should end.

A worker logs what it has done itself (on a distributed runner each worker reports its own share; the
runner's counters add them up), at most once per ``every_s`` seconds (or each ``every_n`` entries), so a log
stays readable at any size.
"""

from __future__ import annotations

import logging
import time

_LOG = logging.getLogger("visual_memory")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts entries through a stage and logs ``WHAT: n / total entries (p%), r entries/s, ETA t``.

    Args:
      what: The stage, as the line names it.
      total: Entries the stage will see in all, when known (the ETA needs it; on several workers it is the
        whole job's, so each worker's ETA is an upper bound).
      every_s: Seconds between two lines at least.
      every_n: Instead of ``every_s``: a line each time the count passes a multiple of this.
      unit: What the count counts, as the line names it.
    """

    def __init__(self, what: str, *, total: int | None = None, every_s: float = 10.0, every_n: int | None = None,
                 unit: str = "entries"):
        if every_n is not None and every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {every_n}")
        self._what = what
        self._total = total
        self._every_s = every_s
        self._every_n = every_n
        self._unit = unit
        self._start = time.perf_counter()
        self._last = self._start
        self.count = 0
        self._logged = 0

    def add(self, n: int, *, force: bool = False) -> str | None:
        """Counts ``n`` more entries; returns the line logged (None when it is not yet time for one)."""
        self.count += n
        if self._every_n is not None and not force:
            if self.count // self._every_n == (self.count - n) // self._every_n:
                return None
            force = True
        now = time.perf_counter()
        if not force and now - self._last < self._every_s:
            return None
        self._last = now
        return self._log(now)

    def flush(self) -> str | None:
        """Logs the count now if it moved since the last line (the end of a bundle, say)."""
        if self.count == self._logged:
            return None
        return self.add(0, force=True)

    def _log(self, now: float) -> str:
        self._logged = self.count
        elapsed = max(now - self._start, 1e-9)
        rate = self.count / elapsed
        line = f"{self._what}: {self.count:,}"
        if self._total:
            line += f" / {self._total:,} {self._unit} ({100 * self.count / self._total:.0f}%)"
            left = max(self._total - self.count, 0)
            eta = f", ETA {_duration(left / rate)}" if rate > 0 else ""
        else:
            line += f" {self._unit}"
            eta = ""
        line += f", {rate:,.0f} {self._unit}/s over {_duration(elapsed)}{eta}"
        _LOG.info("%s", line)
        return line
