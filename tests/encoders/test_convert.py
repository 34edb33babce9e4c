"""The bundled encoder under LiteRT and ONNX Runtime: converted from its weights, checked against TF, cached."""

from __future__ import annotations

import glob
import json
import os
import pathlib

import numpy as np
import pytest

from encoders import EncoderError, EncoderSpec, bundled, load_encoder
from encoders.base import RUNTIME_TOLERANCE, Runtime
from encoders.convert import bundled_model_file
from encoders.preprocess import decode_and_preprocess


@pytest.fixture(scope="module")
def converted_cache(bundled_encoder, tmp_path_factory):
    """A cache root holding both conversions of Lite0, checked against the session's TF encoder."""
    root = str(tmp_path_factory.mktemp("vmem-converted"))
    for runtime in (Runtime.LITERT, Runtime.ONNX):
        bundled_model_file(bundled.NAME, runtime, reference=lambda: bundled_encoder, cache_dir=root)
    return root


@pytest.fixture(scope="module")
def photos(foolbox_data_dir) -> np.ndarray:
    """The 20 foolbox ImageNet photos, preprocessed for Lite0."""
    files = sorted(glob.glob(os.path.join(foolbox_data_dir, "imagenet_*_*.jpg")))
    return np.stack([decode_and_preprocess(pathlib.Path(f).read_bytes(), bundled.PREPROCESS) for f in files])


def _one_minus_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("runtime", [Runtime.LITERT, Runtime.ONNX])
def test_converted_encoder_matches_the_tf_reference(converted_cache, bundled_encoder, photos, monkeypatch, runtime):
    monkeypatch.setenv("VMEM_CACHE_DIR", converted_cache)
    encoder = load_encoder(EncoderSpec(runtime=runtime))
    reference = bundled_encoder.embed(photos)
    got = encoder.embed(photos)
    assert got.shape == (20, 1280) and got.dtype == np.float32
    assert float(np.max(_one_minus_cos(got, reference))) <= RUNTIME_TOLERANCE
    # Same name and content hash as TF: the runtime and its measured deviation tell them apart.
    identity, tf_identity = encoder.identity, bundled_encoder.identity
    assert (identity.name, identity.content_hash, identity.dim, identity.preprocess) == (
        tf_identity.name, tf_identity.content_hash, tf_identity.dim, tf_identity.preprocess)
    assert identity.runtime is runtime and tf_identity.runtime is Runtime.TF
    assert 0.0 <= identity.reference_deviation <= RUNTIME_TOLERANCE
    # The final feature map, whose mean is the embedding.
    maps = encoder.feature_map(photos[:3])
    assert maps.shape == (3, 7, 7, 1280)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), got[:3], rtol=1e-5, atol=1e-6)


def test_conversion_is_cached_by_content_hash(converted_cache, bundled_encoder):
    calls = []

    def reference():
        calls.append(1)
        return bundled_encoder

    first = bundled_model_file(bundled.NAME, Runtime.ONNX, reference=reference, cache_dir=converted_cache)
    assert calls == [] and os.path.basename(os.path.dirname(first.path)) == "efficientnet-lite0-579344248a93-onnx"
    marker = json.loads(pathlib.Path(os.path.dirname(first.path), "visual_memory_bundled.json").read_text())
    assert marker["runtime"] == "onnx" and marker["reference_deviation"] == first.reference_deviation
    # A damaged file fails its sha256 and is converted (and checked) again.
    with open(first.path, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 64)
    again = bundled_model_file(bundled.NAME, Runtime.ONNX, reference=reference, cache_dir=converted_cache)
    assert calls == [1] and again.path == first.path
    assert sorted(os.listdir(converted_cache)) == [
        "efficientnet-lite0-579344248a93-litert", "efficientnet-lite0-579344248a93-onnx"]


def test_int8_conversion_stays_near_tf_and_searches_only_int8(tmp_path, bundled_encoder, photos, monkeypatch):
    """litert-int8: calibrated, cached, within QUANTIZED_TOLERANCE of TF, and never mixed with a float runtime."""
    from encoders.base import QUANTIZED_TOLERANCE
    from encoders.compatibility import runtime_mismatch
    converted = bundled_model_file(bundled.NAME, Runtime.LITERT_INT8, reference=lambda: bundled_encoder,
                                   cache_dir=str(tmp_path))
    assert converted.path.endswith("model-int8.tflite")
    assert RUNTIME_TOLERANCE < converted.reference_deviation <= QUANTIZED_TOLERANCE
    monkeypatch.setenv("VMEM_CACHE_DIR", str(tmp_path))
    encoder = load_encoder(EncoderSpec(runtime="litert-int8"))
    got, reference = encoder.embed(photos), bundled_encoder.embed(photos)
    assert got.shape == (20, 1280) and got.dtype == np.float32
    assert float(np.max(_one_minus_cos(got, reference))) <= QUANTIZED_TOLERANCE
    int8, tf = encoder.identity.to_dict(), bundled_encoder.identity.to_dict()
    assert int8["runtime"] == "litert-int8" and int8["content_hash"] == tf["content_hash"]
    assert runtime_mismatch(int8, dict(int8)) is None
    for memory, queries, fix in ((tf, int8, "--runtime tf"), (int8, tf, "--runtime litert-int8")):
        assert f"Fix: query with {fix} (the memory's own)" in runtime_mismatch(memory, queries)


def test_a_conversion_that_disagrees_with_tf_is_refused(tmp_path, bundled_encoder):
    class Skewed:
        def embed(self, images):
            out = bundled_encoder.embed(images)
            out[:, :640] *= 1.5  # A conversion bug: half the features scaled.
            return out

    with pytest.raises(EncoderError, match=r"litert conversion of 'efficientnet-lite0' differs from the TF "
                                           r"reference by .* \(tolerance 0.0001\); use --runtime tf"):
        bundled_model_file(bundled.NAME, Runtime.LITERT, reference=Skewed, cache_dir=str(tmp_path))
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []  # Nothing published.


def test_bundled_output_key_other_than_the_embedding_needs_tf():
    with pytest.raises(EncoderError, match=r"output_key='logits'.*--runtime tf"):
        load_encoder(EncoderSpec(output_key="logits", runtime=Runtime.ONNX))
