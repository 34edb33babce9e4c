"""Tests for loading user models (SavedModel, TF-Hub path, Keras) as encoders."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from encoders import (
    EncoderError,
    EncoderIdentity,
    EncoderKind,
    EncoderSpec,
    PreprocessSpec,
    load_encoder,
)
from encoders import loaders

_SIZE = 16  # Tiny inputs keep these tests fast; the models are size-agnostic.


class _MeanProject(tf.Module):
    """Global-mean-pool then a linear map: ``[N, H, W, 3] -> [N, D]``."""

    def __init__(self, weights: np.ndarray, dict_output: bool = False):
        super().__init__()
        self.w = tf.Variable(weights)
        self.dict_output = dict_output

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, x):
        pooled = tf.reduce_mean(x, axis=[1, 2])
        features = pooled @ self.w
        if self.dict_output:
            return {"features": features, "pooled": pooled}
        return features


class _FeatureMap(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, x):
        return x * 2.0


def _weights(seed: int, dim: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, dim)).astype(np.float32)


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, _SIZE, _SIZE, 3)).astype(np.float32)


def _reference(images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return images.mean(axis=(1, 2)) @ weights


def _save(module: tf.Module, path, **kwargs) -> str:
    tf.saved_model.save(module, str(path), **kwargs)
    return str(path)


_SMALL = PreprocessSpec(image_size=_SIZE)


def test_saved_model_embeddings_match_direct_call(tmp_path):
    weights = _weights(0)
    path = _save(_MeanProject(weights), tmp_path / "m")
    images = _images()

    encoder = load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path, preprocess=_SMALL))

    got = encoder.embed(images)
    assert got.dtype == np.float32 and got.shape == (4, 5)
    np.testing.assert_allclose(got, _reference(images, weights), rtol=1e-5, atol=1e-6)
    assert encoder.dim == 5
    assert encoder.preprocess_spec == _SMALL
    assert encoder.identity.name == "m"
    assert encoder.identity.content_hash.startswith("sha256:")
    assert encoder.embed(images[:0]).shape == (0, 5)


def test_saved_model_identity_is_stable_and_content_addressed(tmp_path):
    path_a = _save(_MeanProject(_weights(0)), tmp_path / "a")
    path_b = _save(_MeanProject(_weights(1)), tmp_path / "b")
    spec = EncoderSpec(EncoderKind.SAVED_MODEL, path_a)

    first = load_encoder(spec).identity
    second = load_encoder(spec).identity
    other = load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path_b, name="a")).identity

    assert first == second
    assert first.content_hash == loaders.hash_tree(path_a)
    assert other.name == first.name and other.content_hash != first.content_hash
    # Default preprocessing when the spec gives none.
    assert first.preprocess == PreprocessSpec()
    # Identity is plain data: JSON and back.
    assert EncoderIdentity.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def test_hash_tree_depends_on_paths_and_bytes(tmp_path):
    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.bin").write_bytes(b"abc")
    h1 = loaders.hash_tree(str(root))
    (root / "sub" / "x.bin").write_bytes(b"abd")
    h2 = loaders.hash_tree(str(root))
    (root / "sub" / "x.bin").rename(root / "sub" / "y.bin")
    h3 = loaders.hash_tree(str(root))
    assert len({h1, h2, h3}) == 3


def test_dict_outputs_need_output_key(tmp_path):
    weights = _weights(2)
    path = _save(_MeanProject(weights, dict_output=True), tmp_path / "d")
    images = _images()

    with pytest.raises(EncoderError, match=r"\['features', 'pooled'\].*output_key"):
        load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path))
    with pytest.raises(EncoderError, match="'nope' not in outputs"):
        load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path, output_key="nope"))

    pooled = load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path, output_key="pooled"))
    features = load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path, output_key="features"))

    np.testing.assert_allclose(pooled.embed(images), images.mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(features.embed(images), _reference(images, weights), atol=1e-5)
    assert pooled.dim == 3 and features.dim == 5
    # Same files, different outputs: the identities must not compare equal.
    assert pooled.identity.name == "d#pooled" and pooled.identity != features.identity


def test_saved_model_without_signatures_uses_call(tmp_path):
    weights = _weights(3)
    path = _save(_MeanProject(weights), tmp_path / "nosig", signatures={})
    assert not tf.saved_model.load(path).signatures  # Precondition of this test.
    images = _images()

    encoder = load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path, preprocess=_SMALL))

    np.testing.assert_allclose(encoder.embed(images), _reference(images, weights), atol=1e-5)


def test_feature_map_outputs_are_rejected(tmp_path):
    path = _save(_FeatureMap(), tmp_path / "fm")
    with pytest.raises(EncoderError, match=r"returned shape \(1, 16, 16, 3\).*\[N, D\]"):
        load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, path, preprocess=_SMALL))


def test_tf_hub_kind_on_local_path(tmp_path):
    weights = _weights(4)
    path = _save(_MeanProject(weights), tmp_path / "hub")
    images = _images()

    encoder = load_encoder(EncoderSpec(EncoderKind.TF_HUB, path, preprocess=_SMALL))

    np.testing.assert_allclose(encoder.embed(images), _reference(images, weights), atol=1e-5)
    assert encoder.identity.content_hash == loaders.hash_tree(path)


def test_keras_file(tmp_path):
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(6)(x))
    path = str(tmp_path / "enc.keras")
    model.save(path)
    images = _images()

    encoder = load_encoder(EncoderSpec(EncoderKind.KERAS, path, preprocess=_SMALL))

    np.testing.assert_allclose(
        encoder.embed(images), model.predict(images, verbose=0), rtol=1e-5, atol=1e-5
    )
    assert encoder.dim == 6 and encoder.identity.name == "enc"
    assert encoder.identity.content_hash == loaders.hash_file(path)


def test_remote_uris_are_copied_locally(tmp_path):
    # ram:// is an in-process tf.io.gfile filesystem: it exercises the same
    # copy-then-load path as gs:// without any network.
    weights = _weights(6)
    local = _save(_MeanProject(weights), tmp_path / "r")
    remote = "ram://vmem-test/model"
    for dirpath, _, filenames in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        target = remote if rel == "." else f"{remote}/{rel}"
        tf.io.gfile.makedirs(target)
        for f in filenames:
            tf.io.gfile.copy(os.path.join(dirpath, f), f"{target}/{f}", overwrite=True)
    images = _images()

    encoder = load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, remote, preprocess=_SMALL))

    np.testing.assert_allclose(encoder.embed(images), _reference(images, weights), atol=1e-5)
    assert encoder.identity.content_hash == loaders.hash_tree(local)
    assert encoder.identity.name == "model"


@pytest.mark.parametrize(
    "kind, suffix, message",
    [
        (EncoderKind.SAVED_MODEL, "missing_dir", "not an existing directory"),
        (EncoderKind.TF_HUB, "missing_dir", "missing_dir"),
        (EncoderKind.KERAS, "missing.keras", "does not exist"),
        (EncoderKind.KERAS, "model.h5", "'.keras' file"),
    ],
)
def test_bad_uri_names_the_uri(tmp_path, kind, suffix, message):
    uri = str(tmp_path / suffix)
    with pytest.raises(EncoderError, match=message) as info:
        load_encoder(EncoderSpec(kind, uri))
    assert uri in str(info.value)


def test_directory_without_saved_model_pb(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no saved_model.pb"):
        load_encoder(EncoderSpec(EncoderKind.SAVED_MODEL, str(tmp_path / "empty")))


def test_unknown_bundled_name_lists_available():
    with pytest.raises(EncoderError, match=r"'resnet50'.*'efficientnet-lite0'"):
        load_encoder(EncoderSpec(EncoderKind.BUNDLED, "resnet50"))


def test_embed_rejects_raw_pixels(tmp_path):
    encoder = load_encoder(
        EncoderSpec(EncoderKind.SAVED_MODEL, _save(_MeanProject(_weights(7)), tmp_path / "m"))
    )
    with pytest.raises(EncoderError, match="uint8"):
        encoder.embed(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(EncoderError, match=r"\(8, 8, 3\)"):
        encoder.embed(np.zeros((8, 8, 3), np.float32))


def test_encoder_spec_is_plain_data():
    spec = EncoderSpec(
        EncoderKind.SAVED_MODEL, "gs://bucket/model", output_key="emb",
        preprocess=PreprocessSpec(image_size=240),
    )
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert EncoderSpec.from_dict({"kind": "keras", "uri": "/m/x.keras"}).display_name == "x"
    assert EncoderSpec().kind is EncoderKind.BUNDLED and EncoderSpec().uri == "efficientnet-lite0"
    with pytest.raises(EncoderError, match="'bundled', 'saved_model', 'tf_hub', 'keras'"):
        EncoderSpec(kind="onnx")


def test_resolve_preprocess_matches_loaded_encoder_without_tensorflow(tmp_path):
    from encoders import bundled, resolve_preprocess

    assert resolve_preprocess(EncoderSpec()) == bundled.PREPROCESS
    custom = PreprocessSpec(image_size=_SIZE, resize="resize_square")
    assert resolve_preprocess(EncoderSpec(preprocess=custom)) == custom
    path = _save(_MeanProject(_weights(8)), tmp_path / "m")
    spec = EncoderSpec(EncoderKind.SAVED_MODEL, path)
    assert resolve_preprocess(spec) == load_encoder(spec).preprocess_spec == PreprocessSpec()
    with pytest.raises(EncoderError, match="'nope'"):
        resolve_preprocess(EncoderSpec(uri="nope"))
    # Graph construction only needs specs: importing them must not pull in TF.
    code = (
        "import sys, encoders\n"
        "encoders.resolve_preprocess(encoders.EncoderSpec())\n"
        "assert 'tensorflow' not in sys.modules, 'TF imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr
