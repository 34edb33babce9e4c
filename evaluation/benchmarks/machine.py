"""What a benchmark ran on: one line with the core count, the CPU and the versions of the libraries compared."""

from __future__ import annotations

import importlib.metadata
import os
import platform

_PACKAGES = ("scann", "faiss-cpu", "numpy", "tensorflow-cpu", "apache-beam")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions(packages=_PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe() -> str:
    """``machine: N cores (CPU model), Python X; scann A, faiss-cpu B, ...``."""
    libs = ", ".join(f"{k} {v}" for k, v in versions().items())
    return f"machine: {os.cpu_count()} cores ({_cpu_model()}), Python {platform.python_version()}; {libs}"
