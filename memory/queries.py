"""Image queries: how `VisualMemory` turns query images into embeddings, and what a re-ranker sees of them.

An image query is embedded exactly as the build embedded the memory's entries: decoded and preprocessed with
the manifest's preprocess spec, then embedded by the memory's own encoder (loaded from the ``EncoderSpec`` the
manifest records) or by a loaded encoder whose identity equals the manifest's. TensorFlow is imported only
once a model is really needed: vector queries never load it.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from memory import storage
from memory.store.manifest import Manifest
from memory.vectors import l2_normalize

if TYPE_CHECKING:
    from encoders.base import Encoder, EncoderIdentity, PreprocessSpec, Runtime

# Images embedded per encoder call: bounds the float32 pixel batch held in memory.
_EMBED_BATCH = 32


def split_queries(queries: np.ndarray | Sequence[Any], dim: int) -> tuple[np.ndarray | None, list[Any] | None]:
    """(vectors, None) for a float array of embeddings, (None, images) for a sequence of images.

    Args:
      queries: A float [n, dim] array of embeddings; or images: a sequence of encoded bytes, file paths and
        uint8 [H, W, 3] arrays, or one uint8 [n, H, W, 3] array.
      dim: The memory's embedding dimension (for the error message).

    Raises:
      ValueError: for a single image or any other array, naming its type and the fix.
    """
    if isinstance(queries, np.ndarray) and queries.dtype.kind == "f":
        return queries, None
    if isinstance(queries, np.ndarray) and queries.dtype == np.uint8 and queries.ndim == 4:
        return None, list(queries)
    if isinstance(queries, (np.ndarray, str, bytes, bytearray, os.PathLike)):
        raise ValueError(
            f"queries must be a float [n, {dim}] array of embeddings or a list of images, got "
            f"{type(queries).__name__}"
            + (f" {queries.dtype} {queries.shape}" if isinstance(queries, np.ndarray) else "")
            + "; wrap a single image in a list: classify([image])")
    return None, list(queries)


def query_preprocess(manifest: Manifest, root: str) -> PreprocessSpec:
    """The preprocess spec the build recorded in the manifest of the memory at ``root``.

    Raises:
      ValueError: the recorded spec is unusable (naming it and the fix).
    """
    from encoders.base import EncoderError, PreprocessSpec  # pylint: disable=g-import-not-at-top
    raw = manifest.encoder.get("preprocess")
    try:
        return PreprocessSpec.from_dict(raw)
    except (EncoderError, TypeError) as e:
        raise ValueError(f"the manifest of {root} has an unusable encoder preprocess spec {raw!r} "
                         f"({e}); query with vectors embedded by the memory's encoder instead") from None


class OnUnreadable(enum.Enum):
    """What a batch of image queries does with an image that cannot be read or decoded."""
    RAISE = "raise"    # The first one fails the batch (naming it), before the encoder loads.
    REPORT = "report"  # It is named with its reason (`UnreadableQuery`); every readable one is answered.


@dataclasses.dataclass(frozen=True)
class UnreadableQuery:
    """An image query that could not be read or decoded.

    Attributes:
      index: Its position in the batch.
      query: Its path as given, or what it was (``"12 bytes"``, ``"array uint8 (2, 2)"``).
      reason: Why, naming the query: the message `OnUnreadable.RAISE` raises for it.
    """
    index: int
    query: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _preprocess_one(i: int, item: Any, spec: PreprocessSpec) -> np.ndarray:
    """One image query decoded and preprocessed; raises FileNotFoundError or ValueError naming it."""
    from encoders.preprocess import ImageDecodeError, decode_and_preprocess, preprocess
    where = f"query {i}"
    try:
        if isinstance(item, (bytes, bytearray, memoryview)):
            where += f" ({len(item)} bytes)"
            return decode_and_preprocess(bytes(item), spec)
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            where += f" ({path!r})"
            local = path[len("file://"):] if path.startswith("file://") else path
            try:
                data = storage.read_bytes(local)
            except IsADirectoryError:
                raise FileNotFoundError(f"{where}: {path!r} is a directory, not an image file") from None
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}: no such image file {path!r}") from None
            return decode_and_preprocess(data, spec)
        if isinstance(item, np.ndarray):
            where += f" (array {item.dtype} {item.shape})"
            return preprocess(item, spec)
        raise ValueError(
            f"{where}: unsupported query of type {type(item).__name__}; pass encoded image bytes, a "
            "file path or a uint8 [H, W, 3] array (or a float [n, dim] array of embeddings)")
    except ImageDecodeError as e:
        raise ValueError(f"cannot read {where} as an image: {e}") from None


def _described(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"{len(item)} bytes"
    if isinstance(item, np.ndarray):
        return f"array {item.dtype} {item.shape}"
    return type(item).__name__


def preprocess_queries(images: Sequence[Any], spec: PreprocessSpec, *,
                       on_unreadable: OnUnreadable = OnUnreadable.RAISE
                       ) -> tuple[list[np.ndarray], list[UnreadableQuery]]:
    """Decodes and preprocesses every image query (see `VisualMemory.embed_images` for the accepted items).

    Args:
      images: The queries.
      spec: The manifest's preprocess spec (`query_preprocess`).
      on_unreadable: RAISE: the first unreadable query raises. REPORT: each is returned as an `UnreadableQuery`
        (a missing file, a directory, an undecodable image, an unsupported item, a read error) and the
        others are preprocessed.

    Returns:
      The pixels of every readable query, in order, and the unreadable ones (always [] with RAISE).

    Raises:
      FileNotFoundError: naming the query and path, for a missing file (RAISE).
      ValueError: naming the query, for an undecodable image or an unsupported item type (RAISE).
    """
    pixels, unreadable = [], []
    for i, item in enumerate(images):
        try:
            pixels.append(_preprocess_one(i, item, spec))
        except (OSError, ValueError) as e:  # FileNotFoundError is an OSError; read errors are too.
            if on_unreadable is OnUnreadable.RAISE:
                raise
            unreadable.append(UnreadableQuery(index=i, query=_described(item), reason=str(e)))
    return pixels, unreadable


def embed_pixels(encoder: Encoder, pixels: Sequence[np.ndarray]) -> np.ndarray:
    """float32 [len(pixels), dim] unit-length embeddings of preprocessed images, in batches of 32."""
    features = [encoder.embed(np.stack(pixels[s:s + _EMBED_BATCH])) for s in range(0, len(pixels), _EMBED_BATCH)]
    return l2_normalize(np.concatenate(features))


def encoder_mismatch(identity: EncoderIdentity, manifest: Manifest) -> str | None:
    """Why an encoder of ``identity`` cannot embed queries of the memory (None when it can)."""
    want = manifest.encoder
    if (identity.name, identity.content_hash) == (want.get("name"), want.get("content_hash")):
        return None
    return (f"query encoder {identity.name!r} ({identity.content_hash}) differs from the encoder this memory "
            f"was built with, {want.get('name')!r} ({want.get('content_hash')}); embeddings of different "
            f"encoders are not comparable")


def _check_runtime(encoder: Encoder, manifest: Manifest) -> Encoder:
    from encoders.compatibility import runtime_mismatch  # pylint: disable=g-import-not-at-top
    problem = runtime_mismatch(manifest.encoder, encoder.identity.to_dict())
    if problem:
        raise ValueError(problem)
    return encoder


def check_query_encoder(encoder: Encoder, manifest: Manifest, root: str) -> Encoder:
    """``encoder``, when its identity (name and content hash) equals the manifest's and its runtime agrees.

    Raises:
      ValueError: naming both identities (or both runtimes, `encoders.compatibility`) and the fix.
    """
    problem = encoder_mismatch(encoder.identity, manifest)
    if problem:
        raise ValueError(f"{problem}. Fix: omit encoder= to load this memory's own encoder from its "
                         f"manifest, or pass the encoder {manifest.encoder.get('name')!r} that built {root}.")
    return _check_runtime(encoder, manifest)


def load_query_encoder(manifest: Manifest, root: str, *, runtime: Runtime | str | None = None) -> Encoder:
    """Loads the encoder from the ``EncoderSpec`` the manifest's build_config records (``build_config["encoder"]``).

    Args:
      manifest: The memory's manifest.
      root: The memory's root, for messages.
      runtime: An ``encoders.base.Runtime`` (or its name) to run the encoder with instead of the recorded one;
        its embeddings must agree with the memory's (`encoders.compatibility`).

    Raises:
      ValueError: the manifest records no encoder spec, the model at the recorded uri no longer has the
        recorded identity, or ``runtime``'s embeddings may differ from the memory's beyond the tolerance.
    """
    from encoders.base import EncoderSpec  # pylint: disable=g-import-not-at-top
    spec_dict = manifest.build_config.get("encoder")
    if not isinstance(spec_dict, dict):
        raise ValueError(
            f"the manifest of {root} records no encoder spec (build_config['encoder'] is "
            f"{spec_dict!r}; memories built by memory.build.build_memory_local without one have none); "
            "pass encoder=load_encoder(<the spec that built it>) or query with vectors")
    from encoders.loaders import load_encoder  # pylint: disable=g-import-not-at-top  # TensorFlow.
    loaded = load_encoder(EncoderSpec.from_dict(spec_dict).with_runtime(runtime))
    problem = encoder_mismatch(loaded.identity, manifest)
    if problem:
        raise ValueError(f"{problem}. The model at {spec_dict.get('uri')!r} changed after the build; "
                         "restore the original model files or rebuild the memory with the new model.")
    return _check_runtime(loaded, manifest)


def query_uri(item: Any) -> str:
    """Where a re-ranker reads an image query from: its path, or "" for bytes and arrays (see `query_bytes`)."""
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else ""


def query_bytes(item: Any) -> bytes | None:
    """The encoded image a re-ranker is shown for a bytes or uint8 array query (arrays are PNG-encoded); None for
    a path (the re-ranker reads it from its `query_uri`)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        from PIL import Image  # pylint: disable=g-import-not-at-top
        buf = io.BytesIO()
        Image.fromarray(item).save(buf, format="PNG")
        return buf.getvalue()
    return None
