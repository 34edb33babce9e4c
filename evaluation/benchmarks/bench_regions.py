"""Classify latency of region memories against the global memory: same process, same queries, three runs.

Times `VisualMemory.classify` on the global memory and `memory.regions.classify.classify_regions` (MaxSim) on the
2 x 2 and 3 x 3 region memories that ``python -m evaluation.experiments.regions --output WORK`` built, on the
first ``--per-class`` queries of each class, the encoder pass excluded (the same one for every memory), after one
warm-up call each (a region memory reads its stored vectors on first use)::

    python -m evaluation.benchmarks.bench_regions out/regions
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from evaluation.experiments.regions import Progress, embed, read_folder
from memory.regions.classify import classify_regions
from memory.visual_memory import VisualMemory

GRIDS = (2, 3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.benchmarks.bench_regions", description=__doc__)
    parser.add_argument("work", help="the experiment's --output (memory-global, memory-regions-2, -3)")
    parser.add_argument("--queries", default="data/fashion-mnist/test", help="ImageFolder of queries")
    parser.add_argument("--per-class", type=int, default=20, help="queries per class (default 20)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    from encoders import EncoderSpec, load_encoder  # pylint: disable=g-import-not-at-top
    queries = read_folder(args.queries, per_class=args.per_class)
    vectors, regions, _, _ = embed(load_encoder(EncoderSpec()), queries.pixels, list(GRIDS), Progress(), "queries")
    flat = VisualMemory.open(f"{args.work}/memory-global")
    memories = {g: VisualMemory.open(f"{args.work}/memory-regions-{g}") for g in GRIDS}
    for g in GRIDS:
        classify_regions(memories[g], regions[g][:2], k=10)
    flat.classify(vectors[:2], k=10)
    for run in range(args.runs):
        t = time.monotonic()
        flat.classify(vectors, k=10)
        base = (time.monotonic() - t) / len(vectors)
        line = [f"run {run}: global {1000 * base:.2f} ms/query"]
        for g in GRIDS:
            t = time.monotonic()
            classify_regions(memories[g], regions[g], k=10)
            ms = (time.monotonic() - t) / len(vectors)
            line.append(f"{g}x{g} maxsim {1000 * ms:.2f} ms/query ({ms / base:.1f}x)")
        print("; ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
