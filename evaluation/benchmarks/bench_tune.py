"""Decision-level autotuning on a large synthetic memory: how much cheaper is "the votes agree" than recall?

    python -m evaluation.benchmarks.bench_tune --n 1000000 --dim 256 --output out/bench-tune-1m

Builds (once; reused when --output already holds it) a tree+AH memory of ``--n`` structured unit vectors (the
bench_search generator) labelled by the nearest of ``--classes`` random anchor directions, so votes near class
boundaries are close; then runs `memory.tuning.tune` with ``--queries`` held-out vectors and prints every
trial, the setting decision agreement picks and the one recall@10 >= 0.95 picks. The demo memory is tuned with
the CLI instead (``vmem tune --memory out/fmnist-tree --queries data/fashion-mnist/test``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from evaluation.benchmarks import synthetic


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--noise-ratio", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out/bench-tune-1m")
    args = p.parse_args(argv)
    from memory.build import build_memory_local  # pylint: disable=g-import-not-at-top
    from memory.index import IndexConfig, IndexKind  # pylint: disable=g-import-not-at-top
    from memory.tuning import tune  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    from pipelines.tune_cli import render  # pylint: disable=g-import-not-at-top

    base = synthetic.structured_unit_vectors(args.n, args.dim, centres=args.centres, noise_ratio=args.noise_ratio,
                                             seed=args.seed)
    queries = synthetic.structured_unit_vectors(args.queries, args.dim, centres=args.centres,
                                                noise_ratio=args.noise_ratio, seed=args.seed, draw=1)
    anchors = synthetic.gaussian_unit_vectors(args.classes, args.dim, seed=args.seed + 7)
    labels = np.argmax(base @ anchors.T, axis=1)
    true = np.argmax(queries @ anchors.T, axis=1)
    memory_dir = os.path.join(args.output, "memory")
    build_s = 0.0
    if not os.path.exists(os.path.join(memory_dir, "manifest.json")):
        start = time.perf_counter()
        ids = np.char.add("e", np.char.zfill(np.arange(args.n).astype(str), 8))
        build_memory_local(memory_dir, ids=ids.tolist(), labels=[f"c{i:03d}" for i in labels],
                           uris=[""] * args.n, embeddings=base, num_shards=args.shards,
                           index_config=IndexConfig(kind=IndexKind.TREE_AH),
                           encoder_identity={"name": "synthetic", "content_hash": "sha256:" + "0" * 64,
                                             "dim": args.dim, "preprocess": {}})
        build_s = time.perf_counter() - start
        print(f"built {args.n} x {args.dim} tree+AH memory, {args.shards} shards, in {build_s:.0f}s", flush=True)
    memory = VisualMemory.open(memory_dir, search_defaults=False)
    index = {c: i for i, c in enumerate(memory.class_names)}
    true_idx = np.asarray([index.get(f"c{i:03d}", -1) for i in true])
    start = time.perf_counter()
    result = tune(memory, queries, true_idx, repeats=1)
    result.update(seconds=time.perf_counter() - start, build_seconds=build_s, n=args.n, dim=args.dim,
                  cores=os.cpu_count(), command="python -m evaluation.benchmarks.bench_tune " +
                  " ".join(sys.argv[1:] if argv is None else argv))
    print(render(result))
    with open(os.path.join(args.output, "report.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
