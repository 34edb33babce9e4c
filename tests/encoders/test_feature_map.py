"""``Encoder.feature_map``: the bundled encoder's last feature map, whose mean is its embedding; other
encoders refuse with the fix."""

from __future__ import annotations

import numpy as np
import pytest

from encoders import EncoderSpec, load_encoder
from encoders.base import EncoderError, EncoderKind


def test_bundled_feature_map_averages_to_the_embedding(bundled_encoder):
    images = np.random.default_rng(0).normal(size=(3, 224, 224, 3)).astype(np.float32)
    maps = bundled_encoder.feature_map(images)
    assert maps.shape == (3, 7, 7, 1280) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), bundled_encoder.embed(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(EncoderError, match=r"embed\(\) expects float32 \[N, H, W, 3\]"):
        bundled_encoder.feature_map(images[0])


def test_an_encoder_without_a_feature_map_says_so(tiny_encoder_dir):
    encoder = load_encoder(EncoderSpec(kind=EncoderKind.SAVED_MODEL, uri=tiny_encoder_dir))
    with pytest.raises(EncoderError, match="exposes no spatial feature map, which region memories"):
        encoder.feature_map(np.zeros((1, 16, 16, 3), np.float32))
