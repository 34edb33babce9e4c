"""Image encoders for the visual memory: specs, preprocessing and loaders (TF, LiteRT, ONNX Runtime).

``encoders.base`` and ``encoders.preprocess`` are importable without
TensorFlow. The TF-backed names (``load_encoder``, ``export_bundled_saved_model``)
are imported on first access (PEP 562), so configs and Beam graph construction
that only need the specs do not pay TensorFlow's multi-second import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from encoders.base import (
    Encoder,
    EncoderError,
    EncoderIdentity,
    EncoderKind,
    EncoderSpec,
    Layout,
    ModelIO,
    OutputKind,
    PreprocessSpec,
    ResizeMode,
    Runtime,
)
from encoders.bundled import resolve_preprocess
# The ``preprocess`` function is deliberately not re-exported: binding it here
# would shadow the ``encoders.preprocess`` submodule attribute, so that
# ``import encoders.preprocess as p`` would yield the function. Use
# ``from encoders.preprocess import preprocess``.
from encoders.preprocess import ImageDecodeError, decode_and_preprocess, decode_image

if TYPE_CHECKING:
    from encoders.loaders import (
        bundled_saved_model_dir,
        export_bundled_saved_model,
        load_encoder,
    )

_LAZY = ("load_encoder", "export_bundled_saved_model", "bundled_saved_model_dir")

__all__ = [
    "Encoder",
    "EncoderError",
    "EncoderIdentity",
    "EncoderKind",
    "EncoderSpec",
    "ImageDecodeError",
    "Layout",
    "ModelIO",
    "OutputKind",
    "PreprocessSpec",
    "ResizeMode",
    "Runtime",
    "decode_and_preprocess",
    "decode_image",
    "resolve_preprocess",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from encoders import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'encoders' has no attribute {name!r}")
