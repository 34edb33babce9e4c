"""Measures decode+preprocess latency and bundled-encoder throughput.

Usage (prints one line per measurement; no files written)::

    TF_CPP_MIN_LOG_LEVEL=1 python -m encoders.benchmark [--batch-size 32] [--repeats 5]

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
    args = parser.parse_args(argv)

    from encoders import bundled
    from encoders.preprocess import decode_and_preprocess

    spec = bundled.PREPROCESS
    for name, data in _sample_images().items():
        pil = _time_per_call(lambda: decode_and_preprocess(data, spec), args.repeats)
        line = f"decode+preprocess {name}: pillow {pil * 1e3:.2f} ms/img"
        if not args.skip_tf_preprocess:
            tfp = _time_per_call(lambda: _tf_decode_and_preprocess(data, spec), args.repeats)
            line += f", tf {tfp * 1e3:.2f} ms/img"
        print(line)

    from encoders.base import EncoderSpec
    from encoders.loaders import load_encoder

    start = time.perf_counter()
    encoder = load_encoder(EncoderSpec())
    print(f"load bundled encoder: {time.perf_counter() - start:.2f} s")
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(args.batch_size, 224, 224, 3)).astype(np.float32)
    per_batch = _time_per_call(lambda: encoder.embed(batch), args.repeats)
    print(
        f"embed {encoder.identity.name} batch {args.batch_size}: "
        f"{args.batch_size / per_batch:.1f} img/s ({per_batch * 1e3:.0f} ms/batch)"
    )


if __name__ == "__main__":
    main()
