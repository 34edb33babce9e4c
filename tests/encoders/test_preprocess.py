"""Tests for image decoding, preprocessing and PreprocessSpec."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from encoders.base import EncoderError, PreprocessSpec, ResizeMode
from encoders.preprocess import (
    ImageDecodeError,
    decode_and_preprocess,
    decode_image,
    preprocess,
)


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _expected(value, spec: PreprocessSpec) -> np.ndarray:
    return ((np.asarray(value, np.float64) / 255.0 - spec.mean) / spec.std).astype(np.float32)


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (10, 10), (300, 200)])
def test_constant_colour_maps_to_normalised_constant(mode, shape):
    spec = PreprocessSpec(image_size=32, resize=mode)
    colour = (10, 128, 250)
    image = np.empty(shape + (3,), np.uint8)
    image[:] = colour

    out = preprocess(image, spec)

    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    expected = np.broadcast_to(_expected(colour, spec), out.shape)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_center_crop_takes_the_middle():
    # Shorter side already equals round(image_size / crop_fraction): no resampling,
    # so the crop window can be checked exactly via a column/row-coded image.
    spec = PreprocessSpec(image_size=50, crop_fraction=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    h, w = 100, 200
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :, 0] = np.arange(w)[None, :]
    image[:, :, 1] = np.arange(h)[:, None]

    out = np.rint(preprocess(image, spec) * 255).astype(int)

    np.testing.assert_array_equal(out[0, :, 0], np.arange(75, 125))
    np.testing.assert_array_equal(out[:, 0, 1], np.arange(25, 75))


def test_resize_square_keeps_the_whole_image():
    spec = PreprocessSpec(image_size=16, resize=ResizeMode.RESIZE_SQUARE,
                          mean=(0, 0, 0), std=(1, 1, 1))
    image = np.zeros((20, 80, 3), np.uint8)
    image[:, 40:] = 255  # Right half white: a centre crop would be half of each.

    out = preprocess(image, spec)

    np.testing.assert_allclose(out[:, :6], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, -6:], 1.0, atol=1e-6)


def test_greyscale_inputs_become_three_equal_channels():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)

    decoded = decode_image(_encode(grey, "PNG", "L"))

    assert decoded.shape == (28, 28, 3) and decoded.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(decoded[:, :, c], grey)
    spec = PreprocessSpec(image_size=28, resize=ResizeMode.RESIZE_SQUARE)
    # Arrays: [H, W] and [H, W, 1] are accepted and equal the decoded path.
    np.testing.assert_array_equal(preprocess(grey, spec), preprocess(decoded, spec))
    np.testing.assert_array_equal(preprocess(grey[:, :, None], spec), preprocess(decoded, spec))


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[:2, :, 3] = 255  # Top half opaque, bottom half fully transparent.

    decoded = decode_image(_encode(rgba, "PNG", "RGBA"))

    np.testing.assert_array_equal(decoded[:2].reshape(-1, 3), [[200, 10, 30]] * 8)
    np.testing.assert_array_equal(decoded[2:].reshape(-1, 3), [[255, 255, 255]] * 8)


def test_gif_first_frame_and_other_formats():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255
    frames = [Image.fromarray(red), Image.fromarray(blue)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])

    gif = decode_image(buf.getvalue())

    np.testing.assert_array_equal(gif, red)
    for fmt in ("BMP", "WEBP", "PNG"):
        lossless = {"lossless": True} if fmt == "WEBP" else {}
        np.testing.assert_array_equal(decode_image(_encode(blue, fmt, **lossless)), blue)
    jpeg = decode_image(_encode(blue, "JPEG", quality=95))
    assert jpeg.shape == (8, 8, 3)
    assert np.abs(jpeg.astype(int) - blue).max() <= 3


def test_decode_errors_have_reasons():
    valid_png = _encode(np.zeros((64, 64, 3), np.uint8) + 7, "PNG")
    rng = np.random.default_rng(2)
    valid_jpeg = _encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    cases = {
        b"": "empty_file",
        b"hello, I am a text file\n": "not_an_image",
        valid_png[: len(valid_png) // 2]: "corrupt_image",
        valid_jpeg[: len(valid_jpeg) // 2]: "corrupt_image",
        # A PNG signature followed by garbage: damaged, not a wrong file type.
        b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10: "corrupt_image",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert info.value.reason == reason, (data[:20], info.value)
        with pytest.raises(ImageDecodeError) as info:
            decode_and_preprocess(data, PreprocessSpec())
        assert info.value.reason == reason


def test_bad_arrays_are_rejected():
    spec = PreprocessSpec(image_size=8)
    with pytest.raises(ImageDecodeError, match="uint8") as info:
        preprocess(np.zeros((8, 8, 3), np.float32), spec)
    assert info.value.reason == "bad_array"
    with pytest.raises(ImageDecodeError, match=r"\(8, 8, 2\)"):
        preprocess(np.zeros((8, 8, 2), np.uint8), spec)


def test_decode_and_preprocess_matches_two_step_path():
    spec = PreprocessSpec()
    rng = np.random.default_rng(3)
    # A smooth large photo-like image: exercises JPEG draft (DCT-scaled) decoding.
    yy, xx = np.mgrid[0:1536, 0:2048]
    big = np.stack([xx / 8 % 256, yy / 6 % 256, (xx + yy) / 14 % 256], -1).astype(np.uint8)
    small = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for data, tol in ((_encode(big, "JPEG", quality=95), 2.0), (_encode(small, "PNG", "L"), 0.0)):
        one_step = decode_and_preprocess(data, spec)
        two_step = preprocess(decode_image(data), spec)
        assert one_step.shape == (224, 224, 3) and one_step.dtype == np.float32
        # Compare in grey levels: draft decoding may shift a few levels.
        diff = np.abs(one_step - two_step) * np.asarray(spec.std) * 255
        assert diff.mean() <= tol, diff.mean()


def test_preprocess_spec_round_trips_and_validates():
    spec = PreprocessSpec(image_size=96, resize=ResizeMode.RESIZE_SQUARE, mean=(0.5, 0.5, 0.5))
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PreprocessSpec().resize_size == 256
    assert PreprocessSpec(image_size=240).resize_size == 274
    with pytest.raises(EncoderError, match="'resize_square'"):
        PreprocessSpec(resize="squash")
    with pytest.raises(EncoderError, match="crop_fraction"):
        PreprocessSpec(crop_fraction=1.5)
    with pytest.raises(EncoderError, match="imagesize"):
        PreprocessSpec.from_dict({"imagesize": 3})


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("shape", [(28, 28), (37, 53), (300, 200)])
def test_greyscale_fast_path_is_bit_identical_to_rgb(mode, shape):
    """A greyscale file is resized as one band; the result equals converting it to RGB first, bit for bit."""
    spec = PreprocessSpec(resize=mode, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    grey = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    for data in (_encode(grey, "PNG", "L"), _encode(grey, "JPEG", "L", quality=90)):
        assert Image.open(io.BytesIO(data)).mode == "L"
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(decode_and_preprocess(data, spec), preprocess(rgb, spec))
