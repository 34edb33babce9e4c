"""Runner defaults shared by every job (no Beam or TensorFlow import: launchers stay quick)."""

from __future__ import annotations

import os
from typing import Sequence


def _has_flag(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def with_default_runner(beam_args: Sequence[str], *, threads_per_cpu: bool = False) -> list[str]:
    """Defaults to Beam's in-process portable runner (what DirectRunner itself delegates to).

    DirectRunner in Beam 2.77 first tries to download the Prism binary; offline that costs a failed
    download on every run, so without an explicit ``--runner`` we go straight to the in-process runner.

    With ``threads_per_cpu`` (the embedding jobs) it also runs one worker thread per CPU: the single
    default worker decodes a bundle and then runs the encoder on it, back to back; with two threads one
    bundle decodes while another is embedded (measured: build job 0.76x -> 1.00x of the raw encoder rate,
    evaluation/benchmarks/bench_jobs.py). The price: an error inside the pipeline reaches the caller as a
    RuntimeError carrying the original message, not as the original exception type.
    """
    args = list(beam_args)
    if not _has_flag(args, "--runner"):
        args.append("--runner=FnApiRunner")
        chosen = _has_flag(args, "--direct_running_mode") or _has_flag(args, "--direct_num_workers")
        if threads_per_cpu and not chosen:
            args += ["--direct_running_mode=multi_threading", f"--direct_num_workers={os.cpu_count() or 1}"]
    return args
