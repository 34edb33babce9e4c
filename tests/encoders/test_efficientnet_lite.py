"""Faithfulness and caching of the bundled EfficientNet-Lite0 encoder."""

from __future__ import annotations

import glob
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from encoders import efficientnet_lite, loaders, torch_legacy
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
        [decode_and_preprocess(pathlib.Path(f).read_bytes(), efficientnet_lite.PREPROCESS)
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
    assert identity.preprocess == efficientnet_lite.PREPROCESS
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
                       preprocess=efficientnet_lite.PREPROCESS)
    encoder = load_encoder(spec)
    images = imagenet_samples[0][:2]
    np.testing.assert_allclose(encoder.embed(images), bundled_encoder.embed(images), atol=1e-5)
    with pytest.raises(EncoderError, match="not empty"):
        loaders.export_bundled_saved_model(out)
