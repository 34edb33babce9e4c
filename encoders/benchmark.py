"""Measures decode+preprocess latency and the bundled encoder's throughput under each runtime, side by side.

Usage (prints one line per measurement and a table; no files written)::

    TF_CPP_MIN_LOG_LEVEL=1 python -m encoders.benchmark [--batch-size 32] [--repeats 5] \
        [--runtimes tf,litert,onnx] [--runs 3] [--chunks 4]

Every runtime is loaded (and converted, on first use) before any timing; then each of ``--runs`` rounds
times every runtime in turn on the same preprocessed batch, so each round's ratios to TF come from one
process and one moment of the machine. The rate is also given as a fraction of ``BOUND_IMAGES_PER_S``,
what 2 AVX-512 cores could reach on the model's ~0.4 GFLOPs per 224 px image.

Inputs are synthetic-but-realistic: a 28x28 greyscale PNG (Fashion-MNIST-like)
and a 500x375 JPEG (a typical web photo) made from a seeded noise image,
smoothed so JPEG compression behaves as on a photo.
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter


def _sample_images(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(png, "PNG")
    photo = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), "RGB")
    photo = photo.filter(ImageFilter.GaussianBlur(2))
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    return {"png_28x28": png.getvalue(), "jpeg_500x375": jpeg.getvalue()}


def _time_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()  # Warm-up: caches, lazy imports, TF kernel selection.
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.2:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - start) / n)
    return best


def _tf_decode_and_preprocess(data: bytes, spec) -> np.ndarray:
    """The TensorFlow alternative to the Pillow path, for comparison only."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    h, w = image.shape[0], image.shape[1]
    short = spec.resize_size
    size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    image = tf.image.resize(image, size, method="bicubic", antialias=True)
    top, left = (size[0] - spec.image_size) // 2, (size[1] - spec.image_size) // 2
    image = image[top : top + spec.image_size, left : left + spec.image_size]
    mean = tf.constant(spec.mean) * 255.0
    std = tf.constant(spec.std) * 255.0
    return ((image - mean) / std).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-tf-preprocess", action="store_true")
    parser.add_argument("--skip-preprocess", action="store_true", help="time the encoders only")
    parser.add_argument("--runtimes", default="tf,litert,onnx", help="comma-separated; the first is the reference")
    parser.add_argument("--runs", type=int, default=3, help="rounds of all runtimes, side by side")
    parser.add_argument("--chunks", default="2", help="comma-separated images per runtime call (litert, onnx)")
    parser.add_argument("--one-session", action="store_true",
                        help="also time one session on every core (litert, onnx) next to one per core")
    args = parser.parse_args(argv)

    from encoders import bundled
    from encoders.base import parse_runtime
    from encoders.preprocess import decode_and_preprocess

    spec = bundled.PREPROCESS
    for name, data in ({} if args.skip_preprocess else _sample_images()).items():
        pil = _time_per_call(lambda: decode_and_preprocess(data, spec), args.repeats)
        line = f"decode+preprocess {name}: pillow {pil * 1e3:.2f} ms/img"
        if not args.skip_tf_preprocess:
            tfp = _time_per_call(lambda: _tf_decode_and_preprocess(data, spec), args.repeats)
            line += f", tf {tfp * 1e3:.2f} ms/img"
        print(line)

    compare_runtimes(runtimes=[parse_runtime(r) for r in args.runtimes.split(",")], batch_size=args.batch_size,
                     repeats=args.repeats, runs=args.runs, chunks=[int(c) for c in args.chunks.split(",")],
                     one_session=args.one_session)


# 2 AVX-512 cores at ~100 GFLOP/s each (fp32 FMA) over ~0.4 GFLOPs per EfficientNet-Lite0 image.
BOUND_IMAGES_PER_S = 500.0


def compare_runtimes(*, runtimes: list, batch_size: int, repeats: int, runs: int, chunks: list[int],
                     one_session: bool = False) -> None:
    """Prints images/s of the bundled encoder under each runtime (and chunk size), ``runs`` rounds, vs TF.

    ``one_session`` adds, for LiteRT and ONNX, one session on every core next to the default of one
    single-threaded session per core (``encoders.runtimes.REPLICAS``).
    """
    from encoders import bundled
    from encoders.base import EncoderSpec, Runtime
    from encoders.convert import BUNDLED_IO, bundled_model_file, probe_images
    from encoders.loaders import load_encoder
    from encoders.runtimes import load_model_file

    encoders = {}
    for runtime in runtimes:
        start = time.perf_counter()
        encoders[runtime] = load_encoder(EncoderSpec(runtime=runtime))
        print(f"load bundled encoder ({runtime.value}): {time.perf_counter() - start:.2f} s", flush=True)
    batch = probe_images(224, count=batch_size, seed=1)
    reference = encoders[runtimes[0]].embed(batch)
    cases = []  # (label, encoder, chunk or None)
    for runtime in runtimes:
        if runtime is Runtime.TF:
            cases.append((runtime.value, encoders[runtime], None))
            continue
        variants = [("", encoders[runtime])]
        if one_session:
            path = bundled_model_file(bundled.NAME, runtime, reference=lambda: encoders[Runtime.TF]).path
            single = load_model_file(path, runtime=runtime, io=BUNDLED_IO, name=bundled.NAME, content_hash="",
                                     preprocess=bundled.PREPROCESS, replicas=False)
            variants.append((" one session", single))
        cases += [(f"{runtime.value}{suffix} chunk {c}", encoder, c) for suffix, encoder in variants for c in chunks]
    for label, encoder, chunk in cases:
        if chunk is not None:
            encoder.chunk = chunk
        out = encoder.embed(batch)
        cos = np.sum(out * reference, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        print(f"{label}: max 1 - cos to {runtimes[0].value} {float(np.max(1 - cos)):.2g}", flush=True)
    rates: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(runs):
        for label, encoder, chunk in cases:
            if chunk is not None:
                encoder.chunk = chunk
            per_batch = _time_per_call(lambda: encoder.embed(batch), repeats)
            rates[label].append(batch_size / per_batch)
        print("run:", ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), "img/s", flush=True)
    base = rates.get(Runtime.TF.value)
    print(f"\nbundled EfficientNet-Lite0, batch {batch_size}, {runs} runs (img/s, best of {repeats} per run)")
    print("| runtime | " + " | ".join(f"run {i + 1}" for i in range(runs))
          + " | ratio to tf (per run) | fraction of 500 img/s (median) |")
    print("|---|" + "---:|" * runs + "---|---:|")
    for label, values in rates.items():
        ratio = "" if base is None else " / ".join(f"{v / b:.2f}x" for v, b in zip(values, base))
        cells = " | ".join(f"{v:.1f}" for v in values)
        print(f"| {label} | {cells} | {ratio} | {float(np.median(values)) / BOUND_IMAGES_PER_S:.2f} |")


if __name__ == "__main__":
    main()
