"""Decision-level autotuning on a large synthetic memory: how much cheaper is "the votes agree" than recall?

    python -m evaluation.benchmarks.bench_tune --n 1000000 --dim 256 --output out/bench-tune-1m

Builds (once; reused when --output already holds it) a tree+AH memory of ``--n`` structured unit vectors (the
bench_search generator) labelled by the nearest of ``--classes`` random anchor directions, so votes near class
boundaries are close; then runs `memory.search.tuning.tune` with ``--queries`` held-out vectors and prints every
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


def compare(reports: dict) -> str:
    """Each dtype at the settings float32's tuner chose and float32's recall-0.95 choice picked."""
    ref = reports.get("float32") or next(iter(reports.values()))
    picks = [(what, ref[key]) for what, key in (("votes agree 99.9%", "chosen"), ("recall 0.95", "by_recall"))
             if ref[key] is not None]
    lines = ["", "| dtype | bytes/entry | setting (picked on float32 by) | queries/s | recall | agreement | accuracy |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for dtype, rep in reports.items():
        trials = {(t.get("leaves_fraction"), t.get("reorder"), t.get("route_probes")): t for t in rep["trials"]}
        for what, pick in picks:
            t = trials[(pick.get("leaves_fraction"), pick.get("reorder"), pick.get("route_probes"))]
            lines.append(f"| {dtype} | {rep['bytes_per_entry']:.0f} | leaves {t.get('leaves_fraction'):.4g}, reorder "
                         f"{t.get('reorder')} ({what}) | {t['qps']:.0f} | {t['recall']:.4f} | "
                         f"{100 * t['agreement']:.2f}% | {t['accuracy']:.2f} |")
    return "\n".join(lines)


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
    p.add_argument("--dtypes", default="float32",
                   help="re-ranking dtypes to build and tune side by side, e.g. float32,int8 (bytes per entry, "
                        "recall and queries/s of each at the same settings)")
    args = p.parse_args(argv)
    from memory.build import build_memory_local  # pylint: disable=g-import-not-at-top
    from memory.index.shard_index import IndexConfig, IndexKind  # pylint: disable=g-import-not-at-top
    from memory.search.tuning import tune  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    from evaluation.report import tune_markdown  # pylint: disable=g-import-not-at-top

    from evaluation.benchmarks.machine import describe as describe_machine  # pylint: disable=g-import-not-at-top
    print(describe_machine(), flush=True)
    base = synthetic.structured_unit_vectors(args.n, args.dim, centres=args.centres, noise_ratio=args.noise_ratio,
                                             seed=args.seed)
    queries = synthetic.structured_unit_vectors(args.queries, args.dim, centres=args.centres,
                                                noise_ratio=args.noise_ratio, seed=args.seed, draw=1)
    anchors = synthetic.gaussian_unit_vectors(args.classes, args.dim, seed=args.seed + 7)
    labels = np.argmax(base @ anchors.T, axis=1)
    true = np.argmax(queries @ anchors.T, axis=1)
    from evaluation.benchmarks.bench_scale import bytes_by_kind  # pylint: disable=g-import-not-at-top
    reports, reference = {}, None
    for dtype in args.dtypes.split(","):
        memory_dir = os.path.join(args.output, "memory" if dtype == "float32" else f"memory-{dtype}")
        build_s = 0.0
        if not os.path.exists(os.path.join(memory_dir, "manifest.json")):
            start = time.perf_counter()
            ids = np.char.add("e", np.char.zfill(np.arange(args.n).astype(str), 8))
            build_memory_local(memory_dir, ids=ids.tolist(), labels=[f"c{i:03d}" for i in labels],
                               uris=[""] * args.n, embeddings=base, num_shards=args.shards,
                               index_config=IndexConfig(kind=IndexKind.TREE_AH, embedding_dtype=dtype),
                               encoder_identity={"name": "synthetic", "content_hash": "sha256:" + "0" * 64,
                                                 "dim": args.dim, "preprocess": {}})
            build_s = time.perf_counter() - start
            print(f"built {args.n} x {args.dim} tree+AH memory ({dtype} re-ranking rows), {args.shards} shards, in "
                  f"{build_s:.0f}s", flush=True)
        memory = VisualMemory.open(memory_dir, search_defaults=False)
        index = {c: i for i, c in enumerate(memory.class_names)}
        true_idx = np.asarray([index.get(f"c{i:03d}", -1) for i in true])
        start = time.perf_counter()
        if dtype == "float32":
            from memory.search.tuning import exact_search  # pylint: disable=g-import-not-at-top
            reference = exact_search(memory, queries, 10)
        # Every dtype is compared with float32's exact neighbours (the original vectors'), when float32 ran first.
        result = tune(memory, queries, true_idx, repeats=1, reference=reference)
        size = bytes_by_kind(memory_dir)
        result.update(seconds=time.perf_counter() - start, build_seconds=build_s, n=args.n, dim=args.dim,
                      dtype=dtype, bytes_per_entry=sum(size.values()) / args.n, bytes=size, cores=os.cpu_count(),
                      command="python -m evaluation.benchmarks.bench_tune " +
                      " ".join(sys.argv[1:] if argv is None else argv))
        print(f"\n## {dtype}: {result['bytes_per_entry']:.0f} bytes per entry\n\n{tune_markdown(result)}", flush=True)
        with open(os.path.join(args.output, "report.json" if dtype == "float32" else f"report-{dtype}.json"), "w",
                  encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        reports[dtype] = result
    if len(reports) > 1:
        print(compare(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
