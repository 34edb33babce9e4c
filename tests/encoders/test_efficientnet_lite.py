"""Faithfulness and caching of the bundled EfficientNet-Lite0 and -Lite1 encoders."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from encoders import bundled, efficientnet_lite, loaders, torch_legacy
from encoders.preprocess import decode_and_preprocess

# The reference PyTorch model gets 18/20 top-1 on these images; allow one slip.
MIN_CORRECT = 17


@pytest.fixture(scope="session")
def imagenet_samples(foolbox_data_dir):
    """(preprocessed images [20, 224, 224, 3], labels [20]) from foolbox."""
    files = sorted(glob.glob(os.path.join(foolbox_data_dir, "imagenet_*_*.jpg")))
    assert len(files) == 20, files
    # File names are imagenet_<index>_<label>.jpg.
    labels = np.array([int(os.path.basename(f)[:-4].split("_")[2]) for f in files])
    images = np.stack(
        [decode_and_preprocess(pathlib.Path(f).read_bytes(), bundled.PREPROCESS)
         for f in files]
    )
    return images, labels


@pytest.fixture(scope="session")
def serving_outputs(bundled_encoder, imagenet_samples):
    """The bundled SavedModel's raw signature outputs on the samples."""
    path = loaders.bundled_saved_model_dir()
    signature = tf.saved_model.load(path).signatures["serving_default"]
    outputs = signature(images=tf.constant(imagenet_samples[0]))
    return {k: v.numpy() for k, v in outputs.items()}


def test_classifier_head_is_accurate_on_imagenet_samples(serving_outputs, imagenet_samples):
    _, labels = imagenet_samples
    predicted = serving_outputs["logits"].argmax(axis=1)
    correct = int((predicted == labels).sum())
    print(f"EfficientNet-Lite0 port: {correct}/20 foolbox ImageNet samples top-1 correct")
    assert correct >= MIN_CORRECT, list(zip(predicted.tolist(), labels.tolist()))


def test_logits_are_the_head_applied_to_the_embedding(serving_outputs):
    state = torch_legacy.load_state_dict(efficientnet_lite.weights_path())
    embedding, logits = serving_outputs["embedding"], serving_outputs["logits"]
    assert embedding.shape == (20, 1280) and logits.shape == (20, 1000)
    expected = embedding @ state["_fc.weight"].T + state["_fc.bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    # ReLU6 output averaged: features lie in [0, 6] and are not all zero.
    assert embedding.min() >= 0 and embedding.max() <= 6 and embedding.mean() > 0.05


def test_embedding_is_pooled_last_feature_map(imagenet_samples, serving_outputs):
    import keras

    model = efficientnet_lite.build_pretrained_model()
    feature_map = keras.Model(model.input, model.get_layer("head_relu").output)
    images = imagenet_samples[0][:4]
    maps = feature_map(images, training=False).numpy()
    assert maps.shape == (4, 7, 7, 1280)
    np.testing.assert_allclose(
        maps.mean(axis=(1, 2)), serving_outputs["embedding"][:4], rtol=1e-4, atol=1e-5
    )


def test_encoder_embed_equals_signature_embedding(bundled_encoder, imagenet_samples,
                                                  serving_outputs):
    images = imagenet_samples[0]
    got = bundled_encoder.embed(images[:6])
    assert got.dtype == np.float32 and got.shape == (6, 1280)
    np.testing.assert_allclose(got, serving_outputs["embedding"][:6], rtol=1e-5, atol=1e-5)
    # Inference mode: each image's features are independent of its batch mates.
    np.testing.assert_allclose(bundled_encoder.embed(images[3:4]), got[3:4], rtol=1e-4, atol=1e-5)


def test_bundled_identity(bundled_encoder):
    identity = bundled_encoder.identity
    assert identity.name == "efficientnet-lite0"
    assert identity.dim == 1280 and bundled_encoder.dim == 1280
    assert identity.preprocess == bundled.PREPROCESS
    # torch hub names weight files by the sha256 prefix: "-57934424.pth".
    assert identity.content_hash.startswith("sha256:57934424")
    assert identity.content_hash == loaders.hash_file(efficientnet_lite.weights_path())


def test_export_is_cached_and_reused(bundled_encoder, bundled_cache_dir):
    path = loaders.bundled_saved_model_dir()
    assert os.path.dirname(path) == bundled_cache_dir
    assert os.path.basename(path) == "efficientnet-lite0-579344248a93"
    marker = os.path.join(path, "visual_memory_bundled.json")
    before = os.stat(marker).st_mtime_ns
    assert loaders.bundled_saved_model_dir() == path
    assert os.stat(marker).st_mtime_ns == before  # Not re-exported.
    # No temporary directories are left behind.
    assert os.listdir(bundled_cache_dir) == [os.path.basename(path)]


def test_stale_cache_is_replaced(tmp_path):
    final = tmp_path / "efficientnet-lite0-579344248a93"
    final.mkdir()
    (final / "junk.txt").write_text("half-written export")
    (final / "visual_memory_bundled.json").write_text(json.dumps({"export_version": 0}))

    path = loaders.bundled_saved_model_dir(cache_dir=str(tmp_path))

    assert path == str(final)
    assert not (final / "junk.txt").exists()
    assert (final / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path)) == [final.name]


def test_exported_copy_loads_as_a_user_saved_model(bundled_encoder, imagenet_samples, tmp_path):
    from encoders import EncoderError, EncoderKind, EncoderSpec, load_encoder

    out = loaders.export_bundled_saved_model(str(tmp_path / "export"))
    spec = EncoderSpec(EncoderKind.SAVED_MODEL, out, output_key="embedding",
                       preprocess=bundled.PREPROCESS)
    encoder = load_encoder(spec)
    images = imagenet_samples[0][:2]
    np.testing.assert_allclose(encoder.embed(images), bundled_encoder.embed(images), atol=1e-5)
    with pytest.raises(EncoderError, match="not empty"):
        loaders.export_bundled_saved_model(out)


# --------------------------------------------------------------------------- EfficientNet-Lite1

LITE1 = "efficientnet-lite1"
# Measured: the Keras port and the reference PyTorch model (efficientnet-lite-pytorch 0.1.0,
# torch 2.13 CPU) both get 18/20 top-1 at 240 px, with logits equal to ~1e-5; allow one slip.
LITE1_MIN_CORRECT = 17


def _sample_files(foolbox_data_dir):
    files = sorted(glob.glob(os.path.join(foolbox_data_dir, "imagenet_*_*.jpg")))
    assert len(files) == 20, files
    return files


@pytest.fixture(scope="module")
def lite1_samples(foolbox_data_dir):
    """(images preprocessed for Lite1 [20, 240, 240, 3], labels [20])."""
    files = _sample_files(foolbox_data_dir)
    labels = np.array([int(os.path.basename(f)[:-4].split("_")[2]) for f in files])
    spec = bundled.preprocess_spec(LITE1)
    images = np.stack([decode_and_preprocess(pathlib.Path(f).read_bytes(), spec) for f in files])
    return images, labels


@pytest.fixture(scope="module")
def lite1_state():
    return torch_legacy.load_state_dict(efficientnet_lite.weights_path(LITE1))


@pytest.fixture(scope="module")
def lite1_model(lite1_state):
    model = efficientnet_lite.build_model(LITE1)
    # Raises on any missing, unused or mis-shaped tensor.
    efficientnet_lite.load_torch_weights(model, lite1_state)
    return model


@pytest.fixture(scope="module")
def lite1_outputs(lite1_model, lite1_samples):
    embedding, logits = lite1_model(lite1_samples[0], training=False)
    return np.asarray(embedding), np.asarray(logits)


@pytest.fixture(scope="module")
def lite1_encoder(bundled_cache_dir, tmp_path_factory):
    """(bundled Lite1 encoder, its cache root): a cache of its own, so the Lite0 cache
    tests above see only Lite0. Requesting bundled_cache_dir first makes the context
    restore that VMEM_CACHE_DIR afterwards."""
    from encoders import EncoderKind, EncoderSpec, load_encoder

    cache = str(tmp_path_factory.mktemp("vmem-cache-lite1"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMEM_CACHE_DIR", cache)
        encoder = load_encoder(EncoderSpec(EncoderKind.BUNDLED, LITE1, runtime="tf"))
    return encoder, cache


def test_variants_keep_lite0_the_default():
    assert bundled.NAME == "efficientnet-lite0"
    assert list(bundled.VARIANTS) == ["efficientnet-lite0", LITE1]
    assert bundled.preprocess_spec() == bundled.PREPROCESS
    assert bundled.PREPROCESS.image_size == 224
    assert efficientnet_lite.weights_path() == efficientnet_lite.weights_path("efficientnet-lite0")
    assert efficientnet_lite.build_model().name == "efficientnet_lite0"
    # Lite1: the same normalisation and crop, at 240 px.
    assert bundled.preprocess_spec(LITE1) == dataclasses.replace(
        bundled.PREPROCESS, image_size=240
    )
    weights = os.path.basename(efficientnet_lite.weights_path(LITE1))
    assert weights == "efficientnet-lite1-77cc7160.pth"
    from encoders import EncoderError

    with pytest.raises(EncoderError, match=r"'efficientnet-lite9'.*'efficientnet-lite1'"):
        efficientnet_lite.build_model("efficientnet-lite9")


def test_lite1_block_repeats_match_state_dict(lite1_state):
    blocks = sorted({int(k.split(".")[1]) for k in lite1_state if k.startswith("_blocks.")})
    assert blocks == list(range(21))
    lite0, lite1 = (bundled.VARIANTS[n].repeats for n in ("efficientnet-lite0", LITE1))
    # Lite depth scaling: first and last stage fixed, the others ceil(1.1 * r).
    assert lite1 == (1, *(math.ceil(1.1 * r) for r in lite0[1:-1]), 1) == (1, 3, 3, 4, 4, 5, 1)
    # Every block's kernel, width and expansion agree with its stage in the table.
    for index, kernel, _, expand, f_in, f_out in efficientnet_lite._block_configs(
        bundled.VARIANTS[LITE1]
    ):
        p = f"_blocks.{index}."
        assert lite1_state[p + "_depthwise_conv.weight"].shape == (f_in * expand, 1, kernel, kernel)
        assert lite1_state[p + "_project_conv.weight"].shape == (f_out, f_in * expand, 1, 1)
        assert (p + "_expand_conv.weight" in lite1_state) == (expand != 1)


def test_lite1_state_dict_maps_one_to_one(lite1_model, lite1_state):
    tensors = {k: v for k, v in lite1_state.items() if not k.endswith("num_batches_tracked")}
    assert len(lite1_model.weights) == len(tensors) == 386 - 64  # 64 BN counters dropped.
    assert sum(int(np.prod(w.shape)) for w in lite1_model.weights) == sum(
        v.size for v in tensors.values()
    )
    np.testing.assert_array_equal(
        lite1_model.get_layer("blocks_20_depthwise_conv").get_weights()[0],
        lite1_state["_blocks.20._depthwise_conv.weight"].transpose(2, 3, 0, 1),
    )
    np.testing.assert_array_equal(lite1_model.get_layer("fc").get_weights()[0],
                                  lite1_state["_fc.weight"].T)
    # The loader is strict both ways: the other variant's weights do not fit.
    lite0_state = torch_legacy.load_state_dict(efficientnet_lite.weights_path())
    with pytest.raises(ValueError, match="torch shape"):
        efficientnet_lite.load_torch_weights(efficientnet_lite.build_model(LITE1), lite0_state)
    with pytest.raises(ValueError, match="torch shape"):
        efficientnet_lite.load_torch_weights(efficientnet_lite.build_model(), lite1_state)


def test_lite1_classifies_imagenet_samples(lite1_outputs, lite1_samples, lite1_state):
    embedding, logits = lite1_outputs
    labels = lite1_samples[1]
    predicted = logits.argmax(axis=1)
    correct = int((predicted == labels).sum())
    print(f"EfficientNet-Lite1 port: {correct}/20 foolbox ImageNet samples top-1 correct")
    assert correct >= LITE1_MIN_CORRECT, list(zip(predicted.tolist(), labels.tolist()))
    assert embedding.shape == (20, 1280) and logits.shape == (20, 1000)
    expected = embedding @ lite1_state["_fc.weight"].T + lite1_state["_fc.bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert embedding.min() >= 0 and embedding.max() <= 6 and embedding.mean() > 0.05


def test_lite1_bundled_encoder(lite1_encoder, lite1_outputs, lite1_samples):
    encoder, cache = lite1_encoder
    identity = encoder.identity
    assert identity.name == LITE1 and identity.dim == 1280
    assert identity.preprocess == bundled.preprocess_spec(LITE1)
    assert identity.content_hash.startswith("sha256:77cc7160")
    assert identity.content_hash == loaders.hash_file(efficientnet_lite.weights_path(LITE1))
    # Its own cache entry and marker, never the Lite0 one.
    path = loaders.bundled_saved_model_dir(LITE1, cache_dir=cache)
    assert os.listdir(cache) == [os.path.basename(path)] == ["efficientnet-lite1-77cc7160d37b"]
    marker = json.loads(pathlib.Path(path, "visual_memory_bundled.json").read_text())
    assert marker["name"] == LITE1 and "sha256:" + marker["weights_sha256"] == identity.content_hash
    images = lite1_samples[0][:4]
    np.testing.assert_allclose(encoder.embed(images), lite1_outputs[0][:4], rtol=1e-5, atol=1e-5)
    outputs = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    assert sorted(outputs) == ["embedding", "logits"]
    np.testing.assert_allclose(outputs["logits"].numpy(), lite1_outputs[1][:4],
                               rtol=1e-4, atol=1e-4)


def test_lite1_export_loads_as_a_user_saved_model(lite1_encoder, lite1_samples, tmp_path,
                                                  monkeypatch):
    from encoders import EncoderKind, EncoderSpec, load_encoder

    encoder, cache = lite1_encoder
    monkeypatch.setenv("VMEM_CACHE_DIR", cache)  # Copies the cached export; no re-export.
    out = loaders.export_bundled_saved_model(str(tmp_path / "export"), name=LITE1)
    spec = EncoderSpec(EncoderKind.SAVED_MODEL, out, output_key="embedding",
                       preprocess=bundled.preprocess_spec(LITE1))
    images = lite1_samples[0][:2]
    np.testing.assert_allclose(load_encoder(spec).embed(images), encoder.embed(images), atol=1e-5)
