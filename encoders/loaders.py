"""Turns an ``EncoderSpec`` into a loaded ``Encoder``: ``load_encoder``, the one entry point.

Under ``Runtime.TF`` every model kind ends up as a callable TF graph:

* ``SAVED_MODEL``: ``tf.saved_model.load``; the ``serving_default`` signature,
  or the object's ``__call__`` when it has no signatures.
* ``TF_HUB``: ``tensorflow_hub.load`` (a local path works offline), then as above.
* ``KERAS``: ``keras.models.load_model`` on a Keras 3 ``.keras`` file.
* ``BUNDLED``: project code converts the packaged PyTorch weights of one of
  ``BUNDLED_ENCODERS`` (EfficientNet-Lite0, the default, or -Lite1) into a
  SavedModel once (cached under ``$VMEM_CACHE_DIR`` or
  ``~/.cache/visual-memory/encoders``) and loads it exactly like a user model.

Under ``Runtime.LITERT`` / ``ONNX`` / ``LITERT_INT8``, the bundled encoder runs its conversion
(``encoders.convert``) and a ``MODEL_FILE`` (a user's ``.tflite`` / ``.onnx``) runs as it is, both through
``encoders.runtimes``.

``gs://`` (or any non-local ``tf.io.gfile``) URIs are first copied to a local
temporary directory, so hashing and loading only ever read local files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from encoders import bundled, cache, convert, efficientnet_lite, runtimes
from encoders.base import (
    Encoder,
    EncoderError,
    EncoderIdentity,
    EncoderKind,
    EncoderSpec,
    Images,
    PreprocessSpec,
    Runtime,
    cache_root,
)

# Bump when the bundled export changes (architecture, signature) so stale
# caches are rebuilt instead of silently reused.
_BUNDLED_EXPORT_VERSION = 1
_BUNDLED_OUTPUT_KEY = "embedding"
BUNDLED_ENCODERS = tuple(bundled.VARIANTS)


# --------------------------------------------------------------------------- hashing


def _update_with_file(h: "hashlib._Hash", path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def hash_file(path: str) -> str:
    """``"sha256:<hex>"`` of one local file's bytes."""
    h = hashlib.sha256()
    _update_with_file(h, path)
    return "sha256:" + h.hexdigest()


def hash_tree(root: str) -> str:
    """``"sha256:<hex>"`` over a local directory's files.

    Covers sorted ``/``-separated relative paths, sizes and bytes, so the value
    is the same on any machine and any OS for the same file contents.
    """
    entries = []
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            entries.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    h = hashlib.sha256()
    for rel, full in sorted(entries):
        # Length-prefix path and size so ("ab","c") and ("a","bc") cannot collide.
        name = rel.encode("utf-8")
        h.update(len(name).to_bytes(8, "little") + name)
        h.update(os.path.getsize(full).to_bytes(8, "little"))
        _update_with_file(h, full)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- paths


def _is_remote(uri: str) -> bool:
    # http(s) URIs are TF-Hub/Kaggle handles, resolved (and cached) by tensorflow_hub.
    return "://" in uri and not uri.startswith(("file://", "http://", "https://"))


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _copy_remote(uri: str) -> str:
    """Copies a remote file or directory tree to a fresh local temp dir."""
    local_root = tempfile.mkdtemp(prefix="vmem-encoder-")
    try:
        if tf.io.gfile.isdir(uri):
            base = uri.rstrip("/")
            for dirpath, _, filenames in tf.io.gfile.walk(base):
                rel = dirpath[len(base):].lstrip("/")
                os.makedirs(os.path.join(local_root, rel), exist_ok=True)
                for filename in filenames:
                    tf.io.gfile.copy(
                        f"{dirpath.rstrip('/')}/{filename}",
                        os.path.join(local_root, rel, filename),
                    )
            return local_root
        if tf.io.gfile.exists(uri):
            dest = os.path.join(local_root, uri.rstrip("/").rsplit("/", 1)[-1])
            tf.io.gfile.copy(uri, dest)
            return dest
    except tf.errors.OpError as e:
        shutil.rmtree(local_root, ignore_errors=True)
        raise EncoderError(f"Could not copy {uri!r} to a local directory: {e.message}") from e
    shutil.rmtree(local_root, ignore_errors=True)
    raise EncoderError(f"Encoder uri {uri!r} does not exist; check the path and permissions.")


def _localise(uri: str) -> tuple[str, str | None]:
    """Returns ``(local_path, temp_root_to_delete_or_None)`` for ``uri``."""
    if not _is_remote(uri):
        return os.path.expanduser(_strip_file_scheme(uri)), None
    local = _copy_remote(uri)
    temp_root = local if os.path.isdir(local) else os.path.dirname(local)
    return local, temp_root


def _require_saved_model_dir(path: str, spec: EncoderSpec) -> None:
    if not os.path.isdir(path):
        raise EncoderError(
            f"{spec.kind.name} encoder uri {spec.uri!r} is not an existing directory; pass the "
            "directory written by tf.saved_model.save (it holds saved_model.pb)."
        )
    if not any(os.path.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        hint = (
            " For a .keras file use kind=EncoderKind.KERAS."
            if path.endswith(".keras")
            else ""
        )
        raise EncoderError(
            f"{spec.kind.name} encoder uri {spec.uri!r} has no saved_model.pb, so it is not a "
            f"SavedModel directory.{hint}"
        )


# --------------------------------------------------------------------------- encoders


def _select_output(outputs: Any, output_key: str | None, where: str) -> Any:
    """Picks the embedding tensor out of a model's output structure."""
    if isinstance(outputs, dict):
        if output_key is not None:
            if output_key not in outputs:
                raise EncoderError(
                    f"{where}: output_key={output_key!r} not in outputs {sorted(outputs)}; set "
                    "EncoderSpec.output_key to one of them."
                )
            return outputs[output_key]
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        raise EncoderError(
            f"{where} returns several outputs {sorted(outputs)}; set EncoderSpec.output_key "
            "to the one holding the image embedding."
        )
    if output_key is not None:
        raise EncoderError(
            f"{where} returns a single tensor, not a dict; remove output_key={output_key!r}."
        )
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            return outputs[0]
        raise EncoderError(
            f"{where} returns {len(outputs)} unnamed outputs; export a model with a single "
            "output or a dict of named outputs and set EncoderSpec.output_key."
        )
    return outputs


class TFEncoder(Encoder):
    """An ``Encoder`` over any TF callable mapping images to features.

    Keeps a reference to the object that owns the callable's variables: a
    loaded SavedModel's functions fail once the loaded object is collected.
    """

    def __init__(
        self,
        fn: Callable[[tf.Tensor], Any],
        *,
        owner: Any,
        output_key: str | None,
        name: str,
        content_hash: str,
        preprocess: PreprocessSpec,
        where: str,
        dim: int | None = None,
        feature_map: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self._fn = fn
        self._feature_map = feature_map
        self._owner = owner
        self._output_key = output_key
        self._where = where
        if dim is None:
            # Probe once: the cheapest reliable way to learn D when the output
            # shape is not declared statically.
            size = preprocess.image_size
            probe = self._run(np.zeros((1, size, size, 3), np.float32))
            dim = int(probe.shape[1])
        self._identity = EncoderIdentity(
            name=name, content_hash=content_hash, dim=int(dim), preprocess=preprocess
        )

    @property
    def identity(self) -> EncoderIdentity:
        return self._identity

    def _run(self, images: np.ndarray) -> np.ndarray:
        outputs = self._fn(tf.constant(images))
        features = _select_output(outputs, self._output_key, self._where)
        features = np.asarray(features.numpy() if hasattr(features, "numpy") else features)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise EncoderError(
                f"{self._where} returned shape {features.shape} for {images.shape[0]} images; "
                "an image encoder must return [N, D] features (add global pooling to "
                "feature-map models, or pick another output_key)."
            )
        return features.astype(np.float32, copy=False)

    def embed(self, images: Images) -> np.ndarray:
        """See ``Encoder.embed``."""
        images = self._check_batch(images)
        if images.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._run(images)

    def feature_map(self, images: Images) -> np.ndarray:
        """See ``Encoder.feature_map``: the bundled encoders expose theirs; other models do not."""
        if self._feature_map is None:
            return super().feature_map(images)
        images = self._check_batch(images)
        maps = self._feature_map(images)
        if maps.ndim != 4 or maps.shape[0] != images.shape[0] or maps.shape[-1] != self.dim:
            raise EncoderError(
                f"{self._where}: feature map of shape {maps.shape} for {images.shape[0]} images; expected "
                f"[N, h, w, {self.dim}]."
            )
        return maps


def _signature_callable(
    loaded: Any, where: str
) -> tuple[Callable[[tf.Tensor], Any], Any]:
    """Returns ``(fn, output_structure_or_None)`` for a loaded SavedModel."""
    signatures = getattr(loaded, "signatures", None) or {}
    if "serving_default" in signatures:
        sig = signatures["serving_default"]
        _, kwargs = sig.structured_input_signature
        if len(kwargs) != 1:
            raise EncoderError(
                f"{where}: serving_default takes inputs {sorted(kwargs)}; an image encoder "
                "signature must take exactly one float32 [N, H, W, 3] input."
            )
        (input_name, input_spec), = kwargs.items()
        if input_spec.dtype != tf.float32:
            raise EncoderError(
                f"{where}: serving_default input {input_name!r} has dtype "
                f"{input_spec.dtype.name}; only models taking preprocessed float32 images "
                "are supported."
            )
        return (lambda x: sig(**{input_name: x})), sig.structured_outputs
    if callable(loaded):
        return _plain_call(loaded), None
    available = sorted(signatures)
    raise EncoderError(
        f"{where} has no 'serving_default' signature (signatures: {available}) and is not "
        "callable; export it with signatures={'serving_default': fn}."
    )


def _plain_call(loaded: Any) -> Callable[[tf.Tensor], Any]:
    # Restored tf.functions only accept argument patterns that were traced at
    # save time; Keras-style exports also want training=False. Try both once.
    state: dict[str, bool] = {}

    def call(x: tf.Tensor) -> Any:
        if "training" not in state:
            try:
                out = loaded(x)
                state["training"] = False
                return out
            except (TypeError, ValueError):
                out = loaded(x, training=False)
                state["training"] = True
                return out
        return loaded(x, training=False) if state["training"] else loaded(x)

    return call


def _static_dim(output_structure: Any, output_key: str | None) -> int | None:
    if output_structure is None:
        return None
    try:
        spec = _select_output(output_structure, output_key, "")
    except EncoderError:
        return None  # Let the probe call raise the error with the full message.
    shape = getattr(spec, "shape", None)
    if shape is None or shape.rank != 2 or shape[-1] is None:
        return None
    return int(shape[-1])


def _default_name(spec: EncoderSpec) -> str:
    # Two outputs of one model are different embedding spaces with the same
    # files: keep them apart in the identity when the caller chose an output.
    if spec.name:
        return spec.name
    if spec.output_key is not None:
        return f"{spec.display_name}#{spec.output_key}"
    return spec.display_name


def _load_saved_model_dir(
    path: str,
    spec: EncoderSpec,
    *,
    loader: Callable[[str], Any],
    name: str,
    content_hash: str,
    preprocess: PreprocessSpec,
    output_key: str | None,
    feature_map: Callable[[np.ndarray], np.ndarray] | None = None,
) -> TFEncoder:
    where = f"{spec.kind.name} model {spec.uri!r}"
    try:
        loaded = loader(path)
    except (tf.errors.OpError, OSError, ValueError) as e:
        raise EncoderError(f"Could not load {where}: {e}") from e
    fn, outputs = _signature_callable(loaded, where)
    return TFEncoder(
        fn,
        owner=loaded,
        output_key=output_key,
        name=name,
        content_hash=content_hash,
        preprocess=preprocess,
        where=where,
        dim=_static_dim(outputs, output_key),
        feature_map=feature_map,
    )


def _load_saved_model(spec: EncoderSpec, path: str) -> TFEncoder:
    _require_saved_model_dir(path, spec)
    return _load_saved_model_dir(
        path,
        spec,
        loader=tf.saved_model.load,
        name=_default_name(spec),
        content_hash=hash_tree(path),
        preprocess=bundled.resolve_preprocess(spec),
        output_key=spec.output_key,
    )


def _load_tf_hub(spec: EncoderSpec, path: str) -> TFEncoder:
    # Imported lazily: tensorflow_hub is only needed for this kind and pulls in
    # pkg_resources at import time.
    import tensorflow_hub as hub

    if os.path.exists(path):
        resolved = path
    else:
        try:
            resolved = hub.resolve(spec.uri)
        except Exception as e:  # hub raises assorted types for network/handle errors.
            raise EncoderError(
                f"Could not resolve TF-Hub handle {spec.uri!r} ({type(e).__name__}: {e}). "
                "Without network access, download the model and pass its local directory."
            ) from e
    _require_saved_model_dir(resolved, spec)
    return _load_saved_model_dir(
        resolved,
        spec,
        loader=hub.load,
        name=_default_name(spec),
        content_hash=hash_tree(resolved),
        preprocess=bundled.resolve_preprocess(spec),
        output_key=spec.output_key,
    )


def _load_keras(spec: EncoderSpec, path: str) -> TFEncoder:
    import keras

    where = f"KERAS model {spec.uri!r}"
    if not path.endswith(".keras"):
        raise EncoderError(
            f"{where}: expected a Keras 3 '.keras' file; for a SavedModel directory use "
            "kind=EncoderKind.SAVED_MODEL."
        )
    if not os.path.isfile(path):
        raise EncoderError(f"{where} does not exist; check the path.")
    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as e:
        raise EncoderError(f"Could not load {where}: {e}") from e
    # One traced graph instead of layer-by-layer eager execution per batch.
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return TFEncoder(
        fn,
        owner=model,
        output_key=spec.output_key,
        name=_default_name(spec),
        content_hash=hash_file(path),
        preprocess=bundled.resolve_preprocess(spec),
        where=where,
    )


# --------------------------------------------------------------------------- bundled


def _check_bundled_name(name: str) -> None:
    if name not in BUNDLED_ENCODERS:
        raise EncoderError(
            f"Unknown bundled encoder {name!r}; available: {list(BUNDLED_ENCODERS)}. For your "
            "own model use kind=SAVED_MODEL, TF_HUB or KERAS."
        )


def bundled_saved_model_dir(
    name: str = bundled.NAME, *, cache_dir: str | None = None
) -> str:
    """Returns the cached SavedModel of a bundled encoder, exporting it if needed.

    The export goes to a temporary sibling directory that is renamed into place,
    so concurrent workers never see a half-written model; the loser of a race
    discards its copy.

    Args:
        name: Bundled encoder name (see ``BUNDLED_ENCODERS``).
        cache_dir: Cache root; defaults to ``$VMEM_CACHE_DIR`` or
            ``~/.cache/visual-memory/encoders``.

    Returns:
        ``<cache_dir>/<name>-<first 12 hex of the weights sha256>``.
    """
    _check_bundled_name(name)
    weights = efficientnet_lite.weights_path(name)
    weights_sha = efficientnet_lite.file_sha256(weights)
    final = os.path.join(cache_dir or cache_root(), f"{name}-{weights_sha[:12]}")
    expected = {
        "name": name,
        "weights_sha256": weights_sha,
        "export_version": _BUNDLED_EXPORT_VERSION,
    }

    def write(out_dir: str) -> dict[str, Any]:
        efficientnet_lite.export_saved_model(out_dir, path=weights, variant=name)
        return {}

    cache.cached_export(final, expected, write)
    return final


def export_bundled_saved_model(out_dir: str, *, name: str = bundled.NAME) -> str:
    """Exports a bundled encoder as a SavedModel (e.g. to upload for Dataflow).

    The result loads with ``EncoderSpec(kind=SAVED_MODEL, uri=out_dir,
    output_key="embedding", preprocess=bundled.preprocess_spec(name))``.

    Args:
        out_dir: Destination directory, local or ``gs://``; must not exist or be empty.
        name: Bundled encoder name.

    Returns:
        ``out_dir``.
    """
    _check_bundled_name(name)
    if tf.io.gfile.exists(out_dir) and tf.io.gfile.listdir(out_dir):
        raise EncoderError(f"export directory {out_dir!r} is not empty; pass a new directory.")
    source = bundled_saved_model_dir(name)
    for dirpath, _, filenames in os.walk(source):
        rel = os.path.relpath(dirpath, source).replace(os.sep, "/")
        target_dir = out_dir.rstrip("/") if rel == "." else f"{out_dir.rstrip('/')}/{rel}"
        tf.io.gfile.makedirs(target_dir)
        for filename in filenames:
            tf.io.gfile.copy(os.path.join(dirpath, filename), f"{target_dir}/{filename}")
    return out_dir


def _load_bundled(spec: EncoderSpec) -> TFEncoder:
    _check_bundled_name(spec.uri)
    path = bundled_saved_model_dir(spec.uri)
    preprocess = bundled.resolve_preprocess(spec)
    return _load_saved_model_dir(
        path,
        spec,
        loader=tf.saved_model.load,
        name=_default_name(spec),
        # The weights file is the stable identity: the exported graph's bytes
        # may differ between TF versions while computing the same function.
        content_hash="sha256:"
        + efficientnet_lite.file_sha256(efficientnet_lite.weights_path(spec.uri)),
        preprocess=preprocess,
        output_key=spec.output_key or _BUNDLED_OUTPUT_KEY,
        # Built from the same weights on first use: region builds and queries pool it per cell.
        feature_map=efficientnet_lite.FeatureMap(spec.uri),
    )


def _load_model_file(spec: EncoderSpec, path: str) -> Encoder:
    name = spec.display_name
    for ext in (".onnx", ".tflite"):
        name = name[: -len(ext)] if not spec.name and name.endswith(ext) else name
    if not spec.name and spec.model_io.output_name is not None:
        name = f"{name}#{spec.model_io.output_name}"  # Two outputs of one file are two embedding spaces.
    if not os.path.isfile(path):
        raise EncoderError(f"model file {spec.uri!r} does not exist; check the path (uri in the config).")
    return runtimes.load_model_file(path, runtime=spec.runtime, io=spec.model_io, name=name,
                                    content_hash=hash_file(path), preprocess=bundled.resolve_preprocess(spec),
                                    where=f"model file {spec.uri!r}")


# --------------------------------------------------------------------------- entry point


def load_encoder(spec: EncoderSpec) -> Encoder:
    """Loads the encoder described by ``spec``.

    Call once per worker (e.g. in ``DoFn.setup`` via ``apache_beam.utils.shared``):
    loading builds TF graphs and takes seconds.

    Args:
        spec: What to load.

    Returns:
        A ready ``Encoder``.

    Raises:
        EncoderError: The uri does not exist, is not the stated kind, or the
            model's inputs/outputs do not fit an image encoder.
    """
    if not isinstance(spec, EncoderSpec):
        raise EncoderError(f"load_encoder expects an EncoderSpec, got {type(spec).__name__}.")
    if spec.kind is EncoderKind.BUNDLED:
        if spec.runtime is Runtime.TF:
            return _load_bundled(spec)
        return convert.load_bundled(
            spec, reference=lambda: _load_bundled(dataclasses.replace(spec, runtime=Runtime.TF, preprocess=None)))
    path, temp_root = _localise(spec.uri)
    try:
        if spec.kind is EncoderKind.MODEL_FILE:
            encoder = _load_model_file(spec, path)
        elif spec.kind is EncoderKind.SAVED_MODEL:
            encoder = _load_saved_model(spec, path)
        elif spec.kind is EncoderKind.TF_HUB:
            encoder = _load_tf_hub(spec, path)
        else:
            encoder = _load_keras(spec, path)
    except BaseException:
        if temp_root:
            shutil.rmtree(temp_root, ignore_errors=True)
        raise
    if temp_root:
        # Model assets may be read lazily; delete the copy with the encoder.
        weakref.finalize(encoder, shutil.rmtree, temp_root, ignore_errors=True)
    return encoder
