"""Import ScaNN with the SIMD kernels this CPU supports.

ScaNN picks its AVX2 and AVX-512 kernels (tree scoring, LUT16 scanning, re-ranking dot products) from two
process-wide flags, ``research_scann::flags_internal::should_use_avx2`` / ``should_use_avx512``, set once
by a CPU check when its extension loads. With the scann 1.4.2 wheel on this project's machine (AMD EPYC
with AVX2, FMA and AVX-512F/DQ/BW, which numpy and OpenBLAS use) both flags come out False, so every
search ran on the SSE4/AVX1 fallbacks (seen with ``perf``: ``avx1::DenseManyToManyTransposed``,
``LUT16Sse4``). `import_scann` sets each flag that is False where numpy's own CPU detection (which also
checks the OS saves the wider registers) reports the features ScaNN's check asks for; a flag ScaNN set
itself is never touched, so on machines where its check works this changes nothing.

Measured on the 1M x 256 routed benchmark memory (2,000 queries, one search thread, three alternating
processes per mode; identical neighbour ids either way): median 27.5k -> 29.2k queries/s at 2 leaves per
shard and re-rank 60, 23.8k -> 24.6k at re-rank 100, 14.6k -> 15.1k with ratio routing 1.3 and re-rank
200, i.e. +3-6%, within this machine's run-to-run noise (+-15%) for any single pair. perf shows why the
gain is small: re-ranking's random row reads and the AH lookup-table build (which ScaNN runs on a
non-FMA path either way) dominate the per-query cost, not the kernels switched.

Set ``VMEM_SCANN_CPU_FEATURES=0`` to leave ScaNN's flags as it set them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from typing import Any

__all__ = ["SCANN_FLAGS", "describe", "import_scann", "scann_cpu_flags"]

_LOG = logging.getLogger(__name__)
_ENV = "VMEM_SCANN_CPU_FEATURES"

# ScaNN flag -> the numpy CPU features its own check asks for (scann/utils/intrinsics/flags.cc: AVX2; AVX512F
# and DQ and BW, which numpy's AVX512_SKX group includes). AVX-512 kernels are only enabled with AVX2's.
SCANN_FLAGS = (("should_use_avx2", ("AVX2", "FMA3")),
               ("should_use_avx512", ("AVX2", "FMA3", "AVX512F", "AVX512_SKX")))

_lock = threading.Lock()
_done = False
_enabled: list[str] = []  # Flags this module turned on.


def _flag(lib: ctypes.CDLL, name: str) -> ctypes.c_bool:
    return ctypes.c_bool.in_dll(lib, f"_ZN14research_scann14flags_internal{len(name)}{name}E")


def _extension() -> ctypes.CDLL | None:
    module = sys.modules.get("scann_pybind")
    path = getattr(module, "__file__", None)
    return None if path is None else ctypes.CDLL(path)


def scann_cpu_flags() -> dict[str, bool]:
    """ScaNN's SIMD flags as they stand now ({} when its extension is not loaded or exports none)."""
    lib = _extension()
    out = {}
    for name, _ in SCANN_FLAGS if lib is not None else ():
        try:
            out[name] = bool(_flag(lib, name).value)
        except ValueError:  # Symbol not exported by this ScaNN build.
            continue
    return out


def import_scann() -> Any:
    """``import scann``, then (once per process) turn on the SIMD kernels ScaNN failed to detect."""
    global _done
    import scann  # pylint: disable=g-import-not-at-top  # Heavy (imports TF); only needed by the indexes.
    if _done:
        return scann
    with _lock:
        if not _done:
            _done = True
            if os.environ.get(_ENV, "1") != "0":
                _enable_detected_features()
    return scann


def _enable_detected_features() -> None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu  # pylint: disable=g-import-not-at-top
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as cpu  # pylint: disable=g-import-not-at-top
    lib = _extension()
    if lib is None:
        return
    for name, needs in SCANN_FLAGS:
        try:
            flag = _flag(lib, name)
        except ValueError:
            return  # A ScaNN build without these flags: leave it alone.
        if not flag.value and all(cpu.get(f, False) for f in needs):
            flag.value = True
            _enabled.append(name)
    if _enabled:
        _LOG.info("ScaNN did not detect this CPU's %s; enabled them (numpy detects them; set %s=0 to keep "
                  "ScaNN's own choice)", ", ".join(_enabled), _ENV)


def describe() -> str:
    """One line for benchmark headers: which SIMD kernels ScaNN runs and who chose them."""
    flags = scann_cpu_flags()
    if not flags:
        return "ScaNN SIMD flags: not available (ScaNN not loaded, or a build without them)"
    short = lambda name: name.removeprefix("should_use_")  # noqa: E731
    state = ", ".join(f"{short(name)} {'on' if on else 'off'}" for name, on in flags.items())
    how = (f"; enabled by memory.index.scann_cpu (ScaNN's own check missed them): {', '.join(map(short, _enabled))}"
           if _enabled else "; as ScaNN set them")
    return f"ScaNN SIMD kernels: {state}{how}"
