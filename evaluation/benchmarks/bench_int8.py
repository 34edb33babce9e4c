"""The bundled encoder quantised to int8 (``--runtime litert-int8``) against float32 LiteRT: speed and votes.

    TF_CPP_MIN_LOG_LEVEL=1 python -m evaluation.benchmarks.bench_int8 [--images 10000] [--queries 1000] [--runs 3]

Prints (a) the raw encoder's images/s under ``litert`` and ``litert-int8`` on the same preprocessed test
images, ``--runs`` rounds alternating in one process (best of 3 per round); (b) the demo's experiment under
each runtime: a 4-shard memory of ``--images`` Fashion-MNIST training PNGs built by the build job and
``--queries`` test PNGs evaluated by the evaluate job, both with that runtime; (c) each rule's accuracy at
k = 10 and its best k under both, and how often the two memories' votes agree (the same predicted class for
a query) and their neighbour lists overlap (shared ids among the 10 nearest).
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import tempfile
import time

import numpy as np

from evaluation.benchmarks.timing import best_seconds
from evaluation.neighbors_io import NeighborRecord, evaluation_files, read_neighbor_files, to_arrays

RUNTIMES = ("litert", "litert-int8")
K = 10


def _raw_rates(test_dir: str, runs: int, batch: int = 64) -> dict[str, list[float]]:
    from encoders import load_encoder
    from encoders.base import EncoderSpec
    from encoders.preprocess import decode_and_preprocess

    encoders = {r: load_encoder(EncoderSpec(runtime=r)) for r in RUNTIMES}
    spec = encoders[RUNTIMES[0]].preprocess_spec
    files = sorted(glob.glob(os.path.join(test_dir, "*", "*")))[:256]
    pixels = np.stack([decode_and_preprocess(pathlib.Path(f).read_bytes(), spec) for f in files])
    rates: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for encoder in encoders.values():
        encoder.embed(pixels[:batch])  # Warm-up: interpreters are made per batch size.
    for _ in range(runs):
        for runtime, encoder in encoders.items():
            best, _ = best_seconds(lambda encoder=encoder: [encoder.embed(pixels[i:i + batch])
                                                            for i in range(0, len(pixels), batch)], repeats=3)
            rates[runtime].append(len(pixels) / best)
        print("raw encoder:", ", ".join(f"{r} {v[-1]:.1f}" for r, v in rates.items()), "img/s", flush=True)
    return rates


def _experiment(train: str, test: str, work: str, runtime: str) -> tuple[dict, dict[str, NeighborRecord]]:
    """Builds and evaluates with ``runtime``; returns the report and each query's neighbour record by id."""
    from configs.build import load_config
    from evaluation.vote_report import write_evaluation_report
    from pipelines.build import build_memory
    from pipelines.evaluate import evaluate_memory
    from pipelines.io.readers import parse_image_spec

    memory, out = os.path.join(work, f"memory-{runtime}"), os.path.join(work, f"eval-{runtime}")
    config = load_config(None)
    start = time.perf_counter()
    build_memory(source=parse_image_spec(train), output=memory, overwrite=True, pipeline_options=[],
                 config=config.replace(num_shards=4, encoder=config.encoder.with_runtime(runtime)))
    built = time.perf_counter() - start
    evaluate_memory(memory=memory, source=parse_image_spec(test), output=out, k_max=100, pipeline_options=[])
    report = write_evaluation_report(out)
    print(f"{runtime}: build {built:.1f} s, evaluation {time.perf_counter() - start - built:.1f} s", flush=True)
    records = read_neighbor_files(evaluation_files(out))
    return report, {r.query_id: r for r in records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000, help="Fashion-MNIST training images (multiple of 10)")
    parser.add_argument("--queries", type=int, default=1000, help="Fashion-MNIST test images (multiple of 10)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of the raw-rate comparison")
    args = parser.parse_args(argv)

    from evaluation.benchmarks.machine import describe as describe_machine
    from evaluation.datasets import prepare_fashion_mnist
    from memory.decide.voting import ALL_RULES, predict_all_k

    print(describe_machine(), flush=True)
    work = tempfile.mkdtemp(prefix="vmem-int8-")
    prepare_fashion_mnist(work, per_class=args.images // 10, test_per_class=args.queries // 10)
    train, test = os.path.join(work, "train"), os.path.join(work, "test")
    rates = _raw_rates(test, args.runs)
    results = {r: _experiment(train, test, work, r) for r in RUNTIMES}

    queries = sorted(results[RUNTIMES[0]][1])
    predictions, nearest = {}, {}
    for runtime, (_, by_query) in results.items():
        labels, distances, _, _ = to_arrays([by_query[q] for q in queries], k_max=K)
        predictions[runtime] = predict_all_k(labels, distances, k_max=K)
        nearest[runtime] = [set(by_query[q].neighbor_ids[:K]) for q in queries]
    a, b = RUNTIMES
    print(f"\nbundled EfficientNet-Lite0, {args.images} memory images, {len(queries)} queries")
    print("| runtime | " + " | ".join(f"run {i + 1}" for i in range(args.runs)) + " | ratio to litert |")
    print("|---|" + "---:|" * args.runs + "---|")
    for runtime, values in rates.items():
        ratio = " / ".join(f"{v / base:.2f}x" for v, base in zip(values, rates[a]))
        print(f"| {runtime} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {ratio} |")
    print(f"\n| rule | {a} @{K} | {b} @{K} | {a} best | {b} best | votes agreeing @{K} |")
    print("|---|---:|---:|---:|---:|---:|")
    ra, rb = (results[r][0] for r in RUNTIMES)
    for rule in ALL_RULES:
        agree = float(np.mean(predictions[a][rule][:, K - 1] == predictions[b][rule][:, K - 1]))
        best = {r: results[r][0]["best"][rule.value] for r in RUNTIMES}
        print(f"| {rule.value} | {100 * ra['accuracy'][rule.value][str(K)]:.2f} | "
              f"{100 * rb['accuracy'][rule.value][str(K)]:.2f} | {100 * best[a]['accuracy']:.2f} (k={best[a]['k']}) | "
              f"{100 * best[b]['accuracy']:.2f} (k={best[b]['k']}) | {100 * agree:.1f}% |")
    overlap = np.mean([len(x & y) / K for x, y in zip(nearest[a], nearest[b])])
    print(f"\nshared ids among the {K} nearest neighbours: {100 * overlap:.1f}% on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
