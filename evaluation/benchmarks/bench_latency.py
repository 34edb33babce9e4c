"""Single-image latency: `VisualMemory.classify` of one image right after the memory is open.

    python -m evaluation.benchmarks.bench_latency --memory out/fmnist-memory --images data/fashion-mnist/test

Measures, in one process: opening the memory (lazy: the encoder loads on the first image query; and with
``load_encoder=True``, which loads and runs it once inside ``open``), the first ``classify([image])`` after
each kind of open, and the median of the next ``--n`` single-image calls (decode, embed, search all shards,
vote, explain). TensorFlow is imported before any timing. Then the cost of the shard-file check on open:
`open_timing.time_open`, the open with and without it, best of ``--open-repeats`` alternating opens, and
their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory", default="out/fmnist-memory")
    p.add_argument("--images", default="data/fashion-mnist/test")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--open-repeats", type=int, default=5, help="opens each way for the verification cost")
    args = p.parse_args(argv)
    import tensorflow  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top  # Not timed.

    from evaluation.benchmarks.open_timing import time_open  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.images) for f in fs)[:args.n + 1]
    rows = []
    for warm in (False, True):
        t0 = time.perf_counter()
        memory = VisualMemory.open(args.memory, load_encoder=warm)
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        memory.classify([paths[0]])
        first_s = time.perf_counter() - t0
        times = []
        for path in paths[1:]:
            t0 = time.perf_counter()
            memory.classify([path])
            times.append(time.perf_counter() - t0)
        rows.append((warm, open_s, first_s, statistics.median(times)))
    print(f"memory {args.memory} ({len(memory)} entries, {len(memory.manifest.all_shards)} shards), "
          f"{os.cpu_count()} cores")
    print("| open | open (s) | first classify of one image (s) | next ones, median (s) |")
    print("|---|---:|---:|---:|")
    for warm, open_s, first_s, med in rows:
        print(f"| {'load_encoder=True' if warm else 'lazy (default)'} | {open_s:.2f} | {first_s:.3f} | {med:.3f} |")
    print(time_open(args.memory, repeats=args.open_repeats).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
