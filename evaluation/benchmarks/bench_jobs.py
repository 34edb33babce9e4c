"""Job throughput: the Beam build and evaluation jobs vs the encoder's raw rate, in the same process.

    python -m evaluation.benchmarks.bench_jobs [--images 2000] [--queries 500] [--shards 4] [--batch-size 64] \
        [--repeats 2] [--runtime tf|litert|onnx|litert-int8] [--search-join auto[,shuffle,broadcast]]

Prints images/s of (a) the encoder alone on already-preprocessed batches (the ceiling), (b) decode +
preprocess alone, (c) the whole `vmem build` job (read files, decode, embed, normalise, shard,
ScaNN, manifest) on the local runner, (d) the whole `vmem evaluate` job (read, decode, embed, search every
shard, merge top-100, write neighbours, vote, report) once per ``--search-join`` listed, the ratios (c)/(a)
and (d)/(a), and peak RSS. (a), (c) and (d) are the best of ``--repeats`` runs each (the same for both sides
of each ratio; the evaluations of several joins alternate): on a shared 2-core machine single runs vary by
+-30%.
TensorFlow is imported before any timing, so neither side pays for it.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import numpy as np

from encoders.base import Runtime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="Fashion-MNIST training images (multiple of 10)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs for (a), (c) and (d)")
    parser.add_argument("--queries", type=int, default=500, help="Fashion-MNIST test images (multiple of 10)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the raw-encoder baseline")
    parser.add_argument("--runtime", default=None, choices=[r.value for r in Runtime],
                        help="what runs the encoder, in the raw baseline and both jobs (default: the config's)")
    parser.add_argument("--search-join", default="auto",
                        help="comma-separated --search-join values of the evaluate job, each timed (default auto)")
    parser.add_argument("--beam-args", default="", help="extra Beam flags for the job, e.g. '--runner=DirectRunner'")
    args = parser.parse_args(argv)

    from encoders import load_encoder, resolve_preprocess
    from configs.build import load_config
    from encoders.preprocess import decode_and_preprocess
    from evaluation.datasets import prepare_fashion_mnist
    from evaluation.vote_report import write_evaluation_report
    from pipelines.build import build_memory
    from pipelines.evaluate import evaluate_memory
    from pipelines.io.readers import parse_image_spec

    from evaluation.benchmarks.machine import describe as describe_machine  # pylint: disable=g-import-not-at-top
    print(describe_machine(), flush=True)
    work = tempfile.mkdtemp(prefix="vmem-bench-")
    prepare_fashion_mnist(work, per_class=args.images // 10, test_per_class=args.queries // 10)
    train = os.path.join(work, "train")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(train) for f in fs)
    spec = load_config(None).encoder.with_runtime(args.runtime)
    preprocess = resolve_preprocess(spec)

    t0 = time.perf_counter()
    encoder = load_encoder(spec)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    pixels = []
    for path in files:
        with open(path, "rb") as f:
            pixels.append(decode_and_preprocess(f.read(), preprocess))
    decode_s = time.perf_counter() - t0

    batch = np.stack(pixels[: args.batch_size])
    encoder.embed(batch)  # Warm-up: first call traces/compiles.
    raw_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, len(pixels), args.batch_size):
            encoder.embed(np.stack(pixels[i:i + args.batch_size]))
        raw_s = min(raw_s, time.perf_counter() - t0)
    del pixels, batch, encoder

    out = os.path.join(work, "memory")
    config = load_config(None).replace(num_shards=args.shards, encoder=spec)
    job_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        build_memory(source=parse_image_spec(train), output=out, config=config, overwrite=True,
                     pipeline_options=args.beam_args.split())
        job_s = min(job_s, time.perf_counter() - t0)

    test = os.path.join(work, "test")
    n_queries = sum(len(fs) for _, _, fs in os.walk(test))
    joins = args.search_join.split(",")
    eval_s = {join: float("inf") for join in joins}
    for i in range(args.repeats):
        for join in joins:
            eval_out = os.path.join(work, f"eval-{join}-{i}")
            t0 = time.perf_counter()
            evaluate_memory(memory=out, source=parse_image_spec(test), output=eval_out, k_max=100, search_join=join,
                            pipeline_options=args.beam_args.split())
            write_evaluation_report(eval_out)  # What `vmem evaluate` does after the job.
            eval_s[join] = min(eval_s[join], time.perf_counter() - t0)

    n = len(files)
    raw_rate, job_rate = n / raw_s, n / job_s
    print(f"\njob throughput, {n} Fashion-MNIST PNGs, bundled EfficientNet-Lite0 on {spec.runtime.value}, "
          f"{os.cpu_count()} CPUs")
    print("| stage | seconds | images/s |")
    print("|---|---:|---:|")
    print(f"| encoder load ({spec.runtime.value}, once) | {load_s:.1f} | |")
    print(f"| decode + preprocess only | {decode_s:.1f} | {n / decode_s:.0f} |")
    print(f"| encoder only (batch {args.batch_size}, preprocessed) | {raw_s:.1f} | {raw_rate:.1f} |")
    print(f"| `vmem build` job ({args.shards} shards) | {job_s:.1f} | {job_rate:.1f} |")
    for join, seconds in eval_s.items():
        print(f"| `vmem evaluate` job ({n_queries} queries, k=100, --search-join {join}) | {seconds:.1f} | "
              f"{n_queries / seconds:.1f} |")
    print(f"\nbuild job / raw encoder = {job_rate / raw_rate:.2f}x  (target >= 0.8x)")
    for join, seconds in eval_s.items():
        print(f"evaluate job (--search-join {join}) / raw encoder = {n_queries / seconds / raw_rate:.2f}x")
    print(f"peak RSS {_peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
