"""Users' own .onnx / .tflite encoder files (declared by ModelIO) and which runtimes' embeddings agree."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from encoders import EncoderError, EncoderKind, EncoderSpec, PreprocessSpec, load_encoder
from encoders.base import (RUNTIME_TOLERANCE, Layout, ModelIO, OutputKind, ResizeMode, Runtime, mean_std_for_range,
                           runtime_of_file)
from encoders.compatibility import runtime_disagreement, runtime_mismatch

_RNG = np.random.default_rng(0)
_CONV = _RNG.normal(size=(4, 3, 2, 2)).astype(np.float32)  # OIHW: 3 -> 4 channels, 2x2, stride 2.
_PROJ = _RNG.normal(size=(3, 5)).astype(np.float32)
_SIZE = 8
_SQUARE = PreprocessSpec(image_size=_SIZE, resize=ResizeMode.RESIZE_SQUARE, mean=(0.5, 0.5, 0.5),
                         std=(0.5, 0.5, 0.5))


def _save(model, path) -> str:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _spatial_onnx(path) -> str:
    """NCHW [N, 3, 8, 8] -> Conv 2x2 stride 2 -> NCHW [N, 4, 4, 4] (a PyTorch-style feature-map export)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixels", "w"], ["map"], kernel_shape=[2, 2], strides=[2, 2])], "spatial",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, _SIZE, _SIZE])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["n", 4, _SIZE // 2, _SIZE // 2])],
        initializer=[numpy_helper.from_array(_CONV, "w")])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _tokens_onnx(path) -> str:
    """NHWC [N, 8, 8, 3] -> 64 pixel tokens projected to 5-d, after a CLS token (their mean): [N, 65, 5]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Reshape", ["images", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "proj"], ["patches"]),
        helper.make_node("ReduceMean", ["patches"], ["cls"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["cls", "patches"], ["tokens"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", _SIZE, _SIZE, 3])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["n", 1 + _SIZE * _SIZE, 5])],
        initializer=[numpy_helper.from_array(np.array([-1, _SIZE * _SIZE, 3], np.int64), "shape"),
                     numpy_helper.from_array(_PROJ, "proj")])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, _SIZE, _SIZE, 3)).astype(np.float32)


def _conv_reference(images: np.ndarray) -> np.ndarray:
    """[N, 4, 4, 4] NHWC: the 2x2 stride-2 convolution in numpy."""
    patches = images.reshape(len(images), _SIZE // 2, 2, _SIZE // 2, 2, 3)  # n, i, di, j, dj, c
    return np.einsum("nidjec,ocde->nijo", patches, _CONV)


def _file_spec(uri: str, **io) -> EncoderSpec:
    return EncoderSpec(kind=EncoderKind.MODEL_FILE, uri=uri, preprocess=_SQUARE, model_io=ModelIO(**io))


def test_onnx_spatial_file_gives_pooled_embeddings_and_a_feature_map(tmp_path):
    path = _spatial_onnx(tmp_path / "spatial.onnx")
    encoder = load_encoder(_file_spec(path, layout=Layout.NCHW, output=OutputKind.SPATIAL, dim=4))
    images = _images()
    expected = _conv_reference(images)
    features = encoder.feature_map(images)
    assert features.shape == (3, 4, 4, 4) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encoder.embed(images), expected.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    identity = encoder.identity
    assert identity.name == "spatial" and identity.dim == 4 and identity.runtime is Runtime.ONNX
    assert identity.reference_deviation == 0.0 and identity.content_hash.startswith("sha256:")


def test_onnx_tokens_with_cls_become_a_grid_and_the_cls_embedding(tmp_path):
    path = _tokens_onnx(tmp_path / "tokens.onnx")
    encoder = load_encoder(_file_spec(path, output=OutputKind.TOKENS, cls_token=True))
    images = _images(2)
    patches = images.reshape(2, _SIZE * _SIZE, 3) @ _PROJ
    grid = encoder.feature_map(images)
    assert grid.shape == (2, _SIZE, _SIZE, 5)
    np.testing.assert_allclose(grid, patches.reshape(2, _SIZE, _SIZE, 5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encoder.embed(images), patches.mean(axis=1), rtol=1e-5, atol=1e-5)
    # Batches are run a chunk at a time; any batch size gives the same rows.
    np.testing.assert_allclose(encoder.embed(np.concatenate([images] * 5))[-2:], encoder.embed(images), atol=1e-6)


def test_a_list_of_images_embeds_as_the_stacked_batch(tmp_path):
    """Jobs hand a batch over as a list (the sessions stack their own chunks): same rows as the array, in order,
    whichever session takes which chunk; images of different shapes or uint8 pixels are refused."""
    path = _spatial_onnx(tmp_path / "spatial.onnx")
    encoder = load_encoder(_file_spec(path, layout=Layout.NCHW, output=OutputKind.SPATIAL, dim=4))
    images = _images(9)  # Odd: the last chunk is short.
    np.testing.assert_array_equal(encoder.embed(list(images)), encoder.embed(images))
    np.testing.assert_array_equal(encoder.feature_map(list(images)), encoder.feature_map(images))
    with pytest.raises(EncoderError, match="shapes"):
        encoder.embed([images[0], images[1][:4]])
    with pytest.raises(EncoderError, match="uint8"):
        encoder.embed([images[0], images[1].astype(np.uint8)])
    assert encoder.embed([]).shape == (0, 4)


def test_tokens_without_the_declared_cls_are_not_a_grid(tmp_path):
    path = _tokens_onnx(tmp_path / "tokens.onnx")
    with pytest.raises(EncoderError, match=r"65 tokens.*model_io.cls_token"):
        load_encoder(_file_spec(path, output=OutputKind.TOKENS))


def test_tflite_file_from_a_tf_function(tmp_path):
    import tensorflow as tf

    weights = tf.constant(_PROJ)

    @tf.function(input_signature=[tf.TensorSpec([None, _SIZE, _SIZE, 3], tf.float32)])
    def pooled(images):
        return tf.reduce_mean(tf.tensordot(images, weights, axes=1), axis=[1, 2])

    converter = tf.lite.TFLiteConverter.from_concrete_functions([pooled.get_concrete_function()], tf.Module())
    path = tmp_path / "pooled.tflite"
    path.write_bytes(converter.convert())
    encoder = load_encoder(_file_spec(str(path), dim=5))
    images = _images(5)
    assert encoder.identity.runtime is Runtime.LITERT and encoder.dim == 5
    np.testing.assert_allclose(encoder.embed(images), pooled(images).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(EncoderError, match=r"declares output 'pooled'.*model_io.output='spatial' or 'tokens'"):
        encoder.feature_map(images)


@pytest.mark.parametrize("io, preprocess_size, message", [
    ({"layout": Layout.NHWC, "output": OutputKind.SPATIAL},
     _SIZE, r"input 'pixels' has shape \[\?, 3, 8, 8\] but the config declares \[\?, 8, 8, 3\].*model_io.layout"),
    ({"layout": Layout.NCHW, "output": OutputKind.SPATIAL},
     16, r"has shape \[\?, 3, 8, 8\] but the config declares \[\?, 3, 16, 16\].*preprocess.image_size"),
    ({"layout": Layout.NCHW, "output": OutputKind.POOLED},
     _SIZE, r"output 'map' has shape \[\?, 4, 4, 4\] but the config declares model_io.output='pooled', \[N, D\]"),
    ({"layout": Layout.NCHW, "output": OutputKind.SPATIAL, "dim": 8},
     _SIZE, r"output 'map' has D=4 but the config declares model_io.dim=8"),
    ({"layout": Layout.NCHW, "output": OutputKind.SPATIAL, "output_name": "features"},
     _SIZE, r"has no output 'features' \(its outputs: \['map'\]\); fix model_io.output_name"),
])
def test_declared_shapes_that_differ_from_the_file_are_refused(tmp_path, io, preprocess_size, message):
    import dataclasses

    path = _spatial_onnx(tmp_path / "spatial.onnx")
    spec = dataclasses.replace(_file_spec(path, **io), preprocess=dataclasses.replace(
        _SQUARE, image_size=preprocess_size))
    with pytest.raises(EncoderError, match=message):
        load_encoder(spec)


def test_model_file_specs_are_checked():
    with pytest.raises(EncoderError, match=r"needs its inputs and outputs declared.*model_io"):
        EncoderSpec(kind=EncoderKind.MODEL_FILE, uri="m.onnx", preprocess=_SQUARE)
    with pytest.raises(EncoderError, match=r"input size and normalisation.*preprocess"):
        EncoderSpec(kind=EncoderKind.MODEL_FILE, uri="m.onnx", model_io=ModelIO())
    with pytest.raises(EncoderError, match=r"runs on runtime 'onnx', got runtime='litert'; pass --runtime onnx"):
        EncoderSpec(kind=EncoderKind.MODEL_FILE, uri="m.onnx", preprocess=_SQUARE, model_io=ModelIO(),
                    runtime=Runtime.LITERT)
    with pytest.raises(EncoderError, match=r"runs on runtime 'litert', got runtime='litert-int8'; pass --runtime "
                                           r"litert"):  # int8 is a conversion of the bundled encoders, not a file's.
        EncoderSpec(kind=EncoderKind.MODEL_FILE, uri="m.tflite", preprocess=_SQUARE, model_io=ModelIO(),
                    runtime="litert-int8")
    with pytest.raises(EncoderError, match=r"neither .tflite nor .onnx"):
        runtime_of_file("model.pt")
    with pytest.raises(EncoderError, match=r"runs on TensorFlow only, got runtime='onnx'; pass --runtime tf"):
        EncoderSpec(kind=EncoderKind.SAVED_MODEL, uri="/m").with_runtime("onnx")
    with pytest.raises(EncoderError, match=r"Invalid runtime='jax'; allowed values: 'tf', 'litert', 'onnx'"):
        EncoderSpec(runtime="jax")
    spec = EncoderSpec(kind=EncoderKind.MODEL_FILE, uri="gs://b/m.tflite", preprocess=_SQUARE,
                       model_io=ModelIO(output=OutputKind.TOKENS, cls_token=True))
    assert spec.runtime is Runtime.LITERT and EncoderSpec.from_dict(spec.to_dict()) == spec
    # A spec recorded before runtimes existed: its SavedModel ran on TF.
    old = {k: v for k, v in EncoderSpec(kind=EncoderKind.SAVED_MODEL, uri="/m").to_dict().items()
           if k not in ("runtime", "model_io")}
    assert EncoderSpec.from_dict(old).runtime is Runtime.TF


def test_input_range_normalisation():
    mean, std = mean_std_for_range(0, 255)
    x = np.array([0.0, 1.0])  # Pixels / 255.
    np.testing.assert_allclose((x - mean[0]) / std[0], [0.0, 255.0])
    mean, std = mean_std_for_range(-1, 1)
    np.testing.assert_allclose((x - mean[0]) / std[0], [-1.0, 1.0])
    with pytest.raises(EncoderError, match=r"low < high"):
        mean_std_for_range(1, 1)


@pytest.mark.parametrize("module, runtime, package", [
    ("onnxruntime", "onnx", "onnxruntime==1.32.0"), ("ai_edge_litert.interpreter", "litert", "ai-edge-litert==2.3.0")])
def test_a_missing_runtime_package_is_named_with_the_fix(tmp_path, monkeypatch, module, runtime, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import` then raises ImportError.
    path = str(tmp_path / ("m.onnx" if runtime == "onnx" else "m.tflite"))
    open(path, "wb").close()
    with pytest.raises(EncoderError, match=rf"--runtime {runtime} needs the package {package}.*--runtime tf"):
        load_encoder(_file_spec(path))


def _identity(runtime: str, deviation: float) -> dict:
    return {"name": "e", "content_hash": "sha256:0", "dim": 4, "runtime": runtime, "reference_deviation": deviation}


def test_runtimes_agree_within_the_tolerance():
    assert runtime_mismatch(_identity("litert", 0.5), _identity("litert", 0.5)) is None  # Same runtime.
    assert runtime_mismatch(_identity("tf", 0.0), _identity("litert", 2e-7)) is None
    assert runtime_mismatch(_identity("onnx", 2e-7), _identity("litert", 2e-7)) is None
    # A memory recorded before runtimes existed ran on TF.
    assert runtime_mismatch({"name": "e", "content_hash": "sha256:0", "dim": 4}, _identity("onnx", 1e-6)) is None
    assert runtime_disagreement(RUNTIME_TOLERANCE / 4, RUNTIME_TOLERANCE / 4) == pytest.approx(RUNTIME_TOLERANCE)
    message = runtime_mismatch(_identity("tf", 0.0), _identity("litert", 3e-3))
    assert message == (
        "the memory was built with runtime 'tf' and the queries were embedded with runtime 'litert', whose "
        "embeddings may differ by up to 0.003 in 1 - cosine (tolerance 0.0001). Fix: query with --runtime tf "
        "(the memory's own), or rebuild the memory with --runtime litert")
    # Each within the tolerance of TF, but not of each other.
    assert "runtime 'onnx'" in runtime_mismatch(_identity("onnx", 6e-5), _identity("litert", 6e-5))


def test_job_refuses_queries_of_a_disagreeing_runtime():
    from pipelines.stages.embed import EncoderMismatchError, check_same_identity

    check_same_identity(_identity("tf", 0.0), _identity("onnx", 1e-7), what="queries", fix="")
    with pytest.raises(EncoderMismatchError, match=r"queries: the memory was built with runtime 'onnx'.*"
                                                   r"runtime 'tf'.*Fix: query with --runtime onnx"):
        check_same_identity(_identity("onnx", 1e-3), _identity("tf", 0.0), what="queries", fix="")
