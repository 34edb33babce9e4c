"""A memory built with your own encoder file: an ``.onnx`` or ``.tflite`` export (e.g. DINOv2 or CLIP's image tower).

The file's input and output are declared here and checked when it loads (a mismatch names the key to fix):
``preprocess`` gives the input size and normalisation, ``model_io`` the input layout and what the output holds.
Point ``uri`` at your file (local or ``gs://``), then ``vmem build --config configs/own_encoder.py:VARIANT ...``;
the runtime follows the extension (``.onnx``: ONNX Runtime, ``.tflite``: LiteRT).

Variants:
  dinov2   a ViT-S/14 ONNX export in PyTorch layout: 224 px, ImageNet mean/std, patch tokens after a CLS token
           ([N, 1 + 16 * 16, 384]); the embedding is the CLS token, ``feature_map`` the 16 x 16 patch grid.
  clip     a CLIP image tower ONNX export: 224 px, CLIP's mean/std, the pooled image embedding ([N, 512]).
  tflite   a ``.tflite`` feature extractor taking [0, 255] pixels, NHWC, returning a spatial map [N, 7, 7, D]
           (the embedding is its mean).

``vmem build --regions G`` pools a declared map whose mean is the embedding: ``spatial`` (tflite above) or
``tokens`` without a CLS token; with a CLS token (dinov2 above) the embedding is not that mean, and it is refused.
"""

from configs.build import BuildConfig
from encoders.base import (EncoderKind, EncoderSpec, Layout, ModelIO, OutputKind, PreprocessSpec, ResizeMode,
                           mean_std_for_range)

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_CLIP = {"mean": (0.4815, 0.4578, 0.4082), "std": (0.2686, 0.2613, 0.2758)}
_RANGE_0_255 = dict(zip(("mean", "std"), mean_std_for_range(0.0, 255.0)))


def _encoder(uri: str, *, size: int, norm: dict, io: ModelIO) -> EncoderSpec:
    return EncoderSpec(kind=EncoderKind.MODEL_FILE, uri=uri, model_io=io,
                       preprocess=PreprocessSpec(image_size=size, resize=ResizeMode.RESIZE_SHORTER_CENTER_CROP,
                                                 crop_fraction=0.875, **norm))


def get_config(variant: str = "dinov2") -> BuildConfig:
    if variant == "dinov2":
        encoder = _encoder("models/dinov2-vits14.onnx", size=224, norm=_IMAGENET,
                           io=ModelIO(layout=Layout.NCHW, output=OutputKind.TOKENS, cls_token=True, dim=384))
    elif variant == "clip":
        encoder = _encoder("models/clip-vit-b32-image.onnx", size=224, norm=_CLIP,
                           io=ModelIO(layout=Layout.NCHW, output=OutputKind.POOLED, dim=512))
    elif variant == "tflite":
        encoder = _encoder("models/features.tflite", size=224, norm=_RANGE_0_255,
                           io=ModelIO(layout=Layout.NHWC, output=OutputKind.SPATIAL))
    else:
        raise ValueError(f"configs.own_encoder has no variant {variant!r}; use 'dinov2', 'clip' or 'tflite'.")
    return BuildConfig(encoder=encoder)
