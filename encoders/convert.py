"""The bundled encoders as LiteRT (``.tflite``) and ONNX files, converted from their weights and checked against TF.

On first use under ``--runtime litert`` or ``onnx`` (ahead of time, e.g. in a container image: load the encoder
once, ``load_encoder(EncoderSpec(runtime="litert"))``), the bundled Keras model is rebuilt from the packaged weights, cut at its final feature map (the input of its
global average pool) and converted: by ``tf.lite.TFLiteConverter`` for LiteRT, by ``encoders.onnx_export``
for ONNX Runtime. Before the file is published in the cache (``encoders.cache``: one directory per weights
hash and runtime, the file's sha256 in its marker and checked on every load), the converted model embeds a
fixed set of probe images next to the TF SavedModel, the reference, and the largest ``1 - cosine`` between
them is recorded as the identity's ``reference_deviation``; a conversion over ``RUNTIME_TOLERANCE`` is
refused. ``litert-int8`` quantises the same model to int8, its activation ranges calibrated on seeded synthetic
images (`calibration_images`), and is held to ``QUANTIZED_TOLERANCE`` instead. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from encoders import bundled, cache, efficientnet_lite
from encoders.base import (
    QUANTIZED_TOLERANCE,
    RUNTIME_TOLERANCE,
    Encoder,
    EncoderError,
    EncoderSpec,
    Layout,
    ModelIO,
    OutputKind,
    Runtime,
    cache_root,
    parse_runtime,
)
from encoders.runtimes import ModelFileEncoder, load_model_file

# Bump when a conversion changes (graph, outputs, probe images) so stale caches are rebuilt.
CONVERSION_VERSION = 1
_FILES = {Runtime.LITERT: "model.tflite", Runtime.ONNX: "model.onnx", Runtime.LITERT_INT8: "model-int8.tflite"}
# The int8 conversion's activation ranges are calibrated on this many images (`calibration_images`).
_CALIBRATION_IMAGES = 128
# What a converted bundled model returns: the final feature map, so it also serves ``feature_map``.
BUNDLED_IO = ModelIO(layout=Layout.NHWC, output=OutputKind.SPATIAL, dim=efficientnet_lite.EMBEDDING_DIM)
_PROBE_IMAGES = 16


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
    """A bundled encoder converted for one runtime.

    Attributes:
        path: The cached model file.
        runtime: The runtime that runs it.
        reference_deviation: Largest ``1 - cosine`` to the TF SavedModel on the probe images.
    """

    path: str
    runtime: Runtime
    reference_deviation: float


def _bundled_preprocess(image_size: int):
    """The bundled preprocessing at ``image_size`` px."""
    if image_size == bundled.PREPROCESS.image_size:
        return bundled.PREPROCESS
    return dataclasses.replace(bundled.PREPROCESS, image_size=image_size)


def probe_images(image_size: int, *, count: int = _PROBE_IMAGES, seed: int = 0) -> np.ndarray:
    """Seeded photo-like probe images, preprocessed for a bundled encoder: float32 ``[count, S, S, 3]``.

    Blurred noise at a photo's size, through the bundled preprocessing: smooth regions and edges at every
    scale, which exercise the model more like real photos than white noise does.
    """
    from PIL import Image, ImageFilter

    from encoders.preprocess import preprocess

    rng = np.random.default_rng(seed)
    spec = _bundled_preprocess(image_size)
    images = []
    for i in range(count):
        noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), "RGB")
        images.append(preprocess(np.asarray(noise.filter(ImageFilter.GaussianBlur(1 + i % 4))), spec))
    return np.stack(images)


def calibration_images(image_size: int, *, count: int = _CALIBRATION_IMAGES, seed: int = 1) -> np.ndarray:
    """Seeded images an int8 conversion calibrates its activation ranges on: float32 ``[count, S, S, 3]``.

    Blurred noise of every size from 28 px (small images upsampled, as Fashion-MNIST's) to photo size, half of
    it greyscale, a third with flat black or white borders (product shots): ranges taken from photo-sized colour
    noise alone clipped such inputs (the demo's rank@10 fell from 89.00 to 85.40; with these, 89.10).
    """
    from PIL import Image, ImageFilter

    from encoders.preprocess import preprocess

    rng = np.random.default_rng(seed)
    spec = _bundled_preprocess(image_size)
    images = []
    for i in range(count):
        h, w = int(rng.integers(28, 400)), int(rng.integers(28, 400))
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        image = noise.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 4))))
        if i % 2:
            image = image.convert("L").convert("RGB")
        pixels = np.array(image)
        if i % 3 == 0:
            border = 0 if i % 6 else 255
            pixels[: h // 4] = border
            pixels[:, : w // 4] = border
        images.append(preprocess(pixels, spec))
    return np.stack(images)


def _feature_model(name: str) -> Any:
    import keras

    model = efficientnet_lite.build_pretrained_model(variant=name)
    return keras.Model(model.input, model.get_layer("embedding").input, name=model.name)


def _write_tflite(path: str, name: str, *, int8: bool = False) -> None:
    import keras
    import tensorflow as tf

    size = bundled.get_variant(name).image_size
    # A fixed image size (the batch stays open): the converter plans every tensor statically.
    images = keras.Input(shape=(size, size, 3), dtype="float32", name="images")
    model = keras.Model(images, _feature_model(name)(images))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        # Full-integer quantisation (int8 weights and activations, float input and output), the activation
        # ranges calibrated on `calibration_images`: XNNPACK's int8 kernels. Weights-only ("dynamic range")
        # quantisation ran slower than float32: LiteRT runs it outside XNNPACK.
        calibration = calibration_images(size)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
    # Otherwise float32 as the reference: no optimizations, no quantization.
    with open(path, "wb") as f:
        f.write(converter.convert())


def _write_onnx(path: str, name: str) -> None:
    import onnx

    from encoders.onnx_export import keras_to_onnx

    model = efficientnet_lite.build_pretrained_model(variant=name)
    onnx.save(keras_to_onnx(model, outputs=["head_relu"]), path)


def _reference_deviation(encoder: ModelFileEncoder, reference: Encoder) -> float:
    images = probe_images(encoder.preprocess_spec.image_size)
    expected = reference.embed(images)
    converted = encoder.embed(images)
    cosine = np.sum(expected * converted, axis=1) / (
        np.linalg.norm(expected, axis=1) * np.linalg.norm(converted, axis=1))
    return float(np.max(1.0 - cosine.astype(np.float64)))


def _open(path: str, runtime: Runtime, name: str, weights_sha: str) -> ModelFileEncoder:
    return load_model_file(path, runtime=runtime, io=BUNDLED_IO, name=name, content_hash="sha256:" + weights_sha,
                           preprocess=bundled.preprocess_spec(name),
                           where=f"bundled encoder {name!r} under runtime {runtime.value!r}")


def bundled_model_file(name: str, runtime: Runtime | str, *, reference: Callable[[], Encoder],
                       cache_dir: str | None = None) -> ConvertedModel:
    """The cached conversion of a bundled encoder for ``runtime``, converting and checking it if needed.

    Args:
        name: Bundled encoder name (``encoders.bundled.VARIANTS``).
        runtime: ``litert``, ``onnx`` or ``litert-int8``.
        reference: Loads the TF SavedModel of ``name`` (called only when a conversion is checked).
        cache_dir: Cache root; defaults to ``encoders.base.cache_root()``.

    Returns:
        The file, its runtime and its measured deviation from the TF reference.

    Raises:
        EncoderError: an unknown name or runtime, a missing runtime package, or a conversion whose
            embeddings differ from the reference by more than ``RUNTIME_TOLERANCE`` (int8: ``QUANTIZED_TOLERANCE``).
    """
    runtime = parse_runtime(runtime)
    if runtime not in _FILES:
        raise EncoderError(f"runtime {runtime.value!r} needs no conversion; convert for one of "
                           f"{[r.value for r in _FILES]}.")
    bundled.get_variant(name)
    weights_sha = efficientnet_lite.file_sha256(efficientnet_lite.weights_path(name))
    final = os.path.join(cache_dir or cache_root(), f"{name}-{weights_sha[:12]}-{runtime.value}")
    filename = _FILES[runtime]
    expected = {"name": name, "weights_sha256": weights_sha, "runtime": runtime.value,
                "conversion_version": CONVERSION_VERSION}

    def write(out_dir: str) -> dict[str, Any]:
        path = os.path.join(out_dir, filename)
        if runtime is Runtime.ONNX:
            _write_onnx(path, name)
        else:
            _write_tflite(path, name, int8=runtime is Runtime.LITERT_INT8)
        deviation = _reference_deviation(_open(path, runtime, name, weights_sha), reference())
        tolerance = QUANTIZED_TOLERANCE if runtime is Runtime.LITERT_INT8 else RUNTIME_TOLERANCE
        if not deviation <= tolerance:
            raise EncoderError(
                f"the {runtime.value} conversion of {name!r} differs from the TF reference by {deviation:.3g} in "
                f"1 - cosine (tolerance {tolerance:g}); use --runtime tf and report the versions of "
                "tensorflow and the runtime package.")
        return {"model_sha256": efficientnet_lite.file_sha256(path), "reference_deviation": deviation}

    def intact(path: str, marker: dict) -> bool:
        file = os.path.join(path, filename)
        return os.path.isfile(file) and efficientnet_lite.file_sha256(file) == marker.get("model_sha256")

    marker = cache.cached_export(final, expected, write, valid=intact)
    return ConvertedModel(os.path.join(final, filename), runtime, float(marker["reference_deviation"]))


def load_bundled(spec: EncoderSpec, *, reference: Callable[[], Encoder]) -> ModelFileEncoder:
    """A bundled encoder under ``spec.runtime`` (LiteRT or ONNX), converted on first use.

    ``reference`` loads the TF SavedModel the conversion is checked against (see ``bundled_model_file``).

    Its identity has the TF encoder's name and content hash (the weights'), so memories and queries of
    either runtime are told apart only by the runtime and its ``reference_deviation``.
    """
    if spec.output_key not in (None, "embedding"):
        raise EncoderError(
            f"output_key={spec.output_key!r} of the bundled encoder exists under --runtime tf only; the "
            f"{spec.runtime.value} conversion returns the embedding (and feature_map); pass --runtime tf.")
    converted = bundled_model_file(spec.uri, spec.runtime, reference=reference)
    weights_sha = efficientnet_lite.file_sha256(efficientnet_lite.weights_path(spec.uri))
    # Named as under TF (loaders' naming): an explicit output_key is part of the name there.
    name = spec.name or (f"{spec.display_name}#{spec.output_key}" if spec.output_key else spec.display_name)
    return load_model_file(converted.path, runtime=spec.runtime, io=BUNDLED_IO, name=name,
                           content_hash="sha256:" + weights_sha, preprocess=bundled.resolve_preprocess(spec),
                           reference_deviation=converted.reference_deviation,
                           where=f"bundled encoder {spec.uri!r} under runtime {spec.runtime.value!r}")
