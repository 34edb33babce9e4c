"""Encoders over a model file run by LiteRT (``.tflite``, XNNPACK) or ONNX Runtime (``.onnx``); no TensorFlow.

``load_model_file`` opens the file with the runtime its ``Runtime`` names, checks the file's input and output
against the declared ``ModelIO`` and ``PreprocessSpec`` (the error names the declared shape, the file's, and
the config key to fix), and returns a ``ModelFileEncoder``: ``embed`` gives one vector per image, and
``feature_map`` the declared spatial map or patch-token grid as ``[N, h, w, D]``. The bundled encoder under
``--runtime litert`` / ``onnx`` is such a file, converted from its weights (``encoders.convert``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
from typing import Any, Sequence

import numpy as np

from encoders.base import (
    Encoder,
    EncoderError,
    EncoderIdentity,
    Images,
    Layout,
    ModelIO,
    OutputKind,
    PreprocessSpec,
    Runtime,
)

# The pip requirement of each runtime, for the message when it is missing (setup.py pins the same).
PACKAGES = {Runtime.LITERT: "ai-edge-litert==2.3.0", Runtime.LITERT_INT8: "ai-edge-litert==2.3.0",
            Runtime.ONNX: "onnxruntime==1.32.0"}

# Images per runtime call. A batch of 32 at 224 px has activations of ~150 MB per tensor, far beyond the
# caches; two images keep the working set near them (docs/benchmarks.md#encoder-runtimes measures 1, 2, 4).
CHUNK = 2
# Run one single-threaded session per core on whole images in parallel, rather than one session on all cores.
REPLICAS = True


def runtime_threads() -> int:
    """Threads a runtime uses: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


def missing_runtime(runtime: Runtime, error: ImportError) -> EncoderError:
    """The error for a runtime whose package is not installed: names the package and both fixes."""
    return EncoderError(
        f"--runtime {runtime.value} needs the package {PACKAGES[runtime]} ({error}); pip install it, or pass "
        "--runtime tf to run the bundled encoder on TensorFlow.")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model file: its name and shape (None for a dimension the file leaves open)."""

    name: str
    shape: tuple[int | None, ...]


class _LiteRTSession:
    """A ``.tflite`` file in LiteRT's interpreter, one interpreter per batch size (resizing reallocates)."""

    def __init__(self, path: str, threads: int):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise missing_runtime(Runtime.LITERT, e) from None
        self._make = lambda: Interpreter(model_path=path, num_threads=threads)
        probe = self._make()
        self.inputs = [TensorInfo(d["name"], _open_dims(d["shape_signature"])) for d in probe.get_input_details()]
        self.outputs = [TensorInfo(d["name"], _open_dims(d["shape_signature"])) for d in probe.get_output_details()]
        self._by_size: dict[int, Any] = {}

    def run(self, input_name: str, output_name: str, x: np.ndarray) -> np.ndarray:
        interpreter = self._by_size.get(x.shape[0])
        if interpreter is None:
            if len(self._by_size) >= 4:  # A full chunk and a few tail sizes; each holds its activations.
                self._by_size.pop(next(iter(self._by_size)))
            interpreter = self._make()
            (index,) = [d["index"] for d in interpreter.get_input_details() if d["name"] == input_name]
            interpreter.resize_tensor_input(index, list(x.shape))
            interpreter.allocate_tensors()
            self._by_size[x.shape[0]] = interpreter
        (inp,) = [d["index"] for d in interpreter.get_input_details() if d["name"] == input_name]
        (out,) = [d["index"] for d in interpreter.get_output_details() if d["name"] == output_name]
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)


class _OnnxSession:
    """An ``.onnx`` file in an ONNX Runtime CPU session."""

    def __init__(self, path: str, threads: int):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise missing_runtime(Runtime.ONNX, e) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own types (InvalidGraph, Fail, ...) for a bad file.
            raise EncoderError(f"ONNX Runtime cannot load {path!r}: {type(e).__name__}: {e}") from e
        self.inputs = [TensorInfo(i.name, _open_dims(i.shape)) for i in self._session.get_inputs()]
        self.outputs = [TensorInfo(o.name, _open_dims(o.shape)) for o in self._session.get_outputs()]

    def run(self, input_name: str, output_name: str, x: np.ndarray) -> np.ndarray:
        return self._session.run([output_name], {input_name: x})[0]


def _open_dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    # LiteRT marks an open dimension -1, ONNX with a symbolic name or None.
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _pick(infos: list[TensorInfo], name: str | None, what: str, key: str, where: str) -> TensorInfo:
    names = [i.name for i in infos]
    if name is not None:
        for info in infos:
            if info.name == name:
                return info
        raise EncoderError(f"{where} has no {what} {name!r} (its {what}s: {names}); fix model_io.{key}.")
    if what == "input" and len(infos) != 1:
        raise EncoderError(f"{where} has {len(infos)} inputs {names}; set model_io.{key} to the image input.")
    return infos[0]


def _declared_input(io: ModelIO, size: int) -> tuple[int | None, ...]:
    return (None, size, size, 3) if io.layout is Layout.NHWC else (None, 3, size, size)


def _declared_rank(io: ModelIO) -> int:
    return {OutputKind.POOLED: 2, OutputKind.SPATIAL: 4, OutputKind.TOKENS: 3}[io.output]


def _declared_output_text(io: ModelIO) -> str:
    d = "D" if io.dim is None else str(io.dim)
    if io.output is OutputKind.POOLED:
        return f"[N, {d}]"
    if io.output is OutputKind.TOKENS:
        return f"[N, {'1 + ' if io.cls_token else ''}h * w, {d}]"
    return f"[N, h, w, {d}]" if io.layout is Layout.NHWC else f"[N, {d}, h, w]"


class ModelFileEncoder(Encoder):
    """An ``Encoder`` over a ``.tflite`` or ``.onnx`` file, its input and output as ``ModelIO`` declares.

    Images go to the runtime ``chunk`` at a time (default ``CHUNK``, see there). With several sessions (one
    single-threaded session per core, ``load_model_file``), each session takes the batch's next chunk on a
    thread of its own as it frees up: the runtimes release the GIL, and whole images in parallel avoid the
    per-operator synchronisation of one session on several threads. Each session has a lock, as neither
    LiteRT's interpreter nor a chunk loop may be shared between threads.

    Attributes:
        chunk: Images per runtime call (the benchmark varies it).
    """

    def __init__(self, sessions: Sequence[Any], *, io: ModelIO, name: str, content_hash: str,
                 preprocess: PreprocessSpec, runtime: Runtime, reference_deviation: float, where: str):
        self._sessions = list(sessions)
        self._locks = [threading.Lock() for _ in self._sessions]
        self._pool = (concurrent.futures.ThreadPoolExecutor(len(self._sessions), thread_name_prefix="vmem-encoder")
                      if len(self._sessions) > 1 else None)
        self._io = io
        self._where = where
        self.chunk = CHUNK
        self._input = _pick(self._sessions[0].inputs, io.input_name, "input", "input_name", where)
        self._output = _pick(self._sessions[0].outputs, io.output_name, "output", "output_name", where)
        self._check_input(preprocess.image_size)
        self._check_output_rank(self._output.shape)
        size = preprocess.image_size
        # A probe run: open dimensions of the file are only known once it has run.
        probe = self._features(np.zeros((1, size, size, 3), np.float32))
        dim = probe.shape[-1]
        if io.dim is not None and dim != io.dim:
            raise EncoderError(
                f"{where}: output {self._output.name!r} has D={dim} but the config declares model_io.dim="
                f"{io.dim}; fix model_io.dim (or model_io.output_name).")
        self._identity = EncoderIdentity(name=name, content_hash=content_hash, dim=int(dim), preprocess=preprocess,
                                         runtime=runtime, reference_deviation=float(reference_deviation))

    @property
    def identity(self) -> EncoderIdentity:
        return self._identity

    @property
    def model_io(self) -> ModelIO:
        """The declared input layout and output this encoder runs with."""
        return self._io

    def _check_input(self, size: int) -> None:
        declared = _declared_input(self._io, size)
        actual = self._input.shape
        if len(actual) != 4 or any(a is not None and d is not None and a != d for d, a in zip(declared, actual)):
            raise EncoderError(
                f"{self._where}: input {self._input.name!r} has shape {_shape_text(actual)} but the config declares "
                f"{_shape_text(declared)} (model_io.layout={self._io.layout.value!r}, preprocess.image_size={size}); "
                "fix model_io.layout or preprocess.image_size to match the file.")

    def _check_output_rank(self, actual: tuple[int | None, ...]) -> None:
        if len(actual) not in (0, _declared_rank(self._io)):  # 0: the file does not say; the probe checks.
            raise EncoderError(
                f"{self._where}: output {self._output.name!r} has shape {_shape_text(actual)} but the config declares "
                f"model_io.output={self._io.output.value!r}, {_declared_output_text(self._io)}; fix model_io.output "
                "(pooled [N, D], spatial [N, h, w, D], tokens [N, T, D]) or model_io.output_name.")

    def _images(self, images: Images) -> Images:
        """Checks a batch like ``_check_batch``, but keeps a sequence of images a list: the session threads stack
        their own chunks (a 64-image batch is ~38 MB to copy, which would otherwise wait on the caller)."""
        if isinstance(images, np.ndarray):
            return self._check_batch(images)
        checked = [self._check_batch(np.asarray(x)[None])[0] for x in images]  # Shape and dtype as for an array.
        for x in checked:
            if x.shape != checked[0].shape:
                raise EncoderError(f"{self.identity.name}: embed() got images of shapes {checked[0].shape} and "
                                   f"{x.shape} in one batch; preprocess them with encoders.preprocess first.")
        return checked

    def _chunk_input(self, images: Images) -> np.ndarray:
        """One runtime call's input: the chunk stacked (if a list) and in the file's layout."""
        x = np.stack(images) if isinstance(images, list) else np.ascontiguousarray(images)
        return x if self._io.layout is Layout.NHWC else np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _raw(self, images: Images) -> np.ndarray:
        starts = range(0, len(images), self.chunk)
        parts: list[Any] = [None] * len(starts)
        taken = iter(range(len(starts)))
        take = threading.Lock()

        def run(i: int) -> None:
            # Each session takes the next chunk as it frees up, so one slowed thread does not hold the batch.
            with self._locks[i]:
                while True:
                    with take:
                        j = next(taken, None)
                    if j is None:
                        return
                    chunk = self._chunk_input(images[starts[j]:starts[j] + self.chunk])
                    parts[j] = self._sessions[i].run(self._input.name, self._output.name, chunk)

        k = min(len(self._sessions), len(starts))
        if k > 1:
            for _ in self._pool.map(run, range(k)):  # Re-raises a session's error.
                pass
        else:
            run(0)
        out = np.concatenate(parts).astype(np.float32, copy=False)
        self._check_output_rank(out.shape)
        if out.shape[0] != len(images):
            raise EncoderError(f"{self._where}: output {self._output.name!r} has {out.shape[0]} rows for "
                               f"{len(images)} images; export the model with a batch dimension first.")
        return out

    def _features(self, images: Images) -> np.ndarray:
        """The declared output as ``[N, D]`` (pooled) or ``[N, h, w, D]`` (spatial, tokens)."""
        out = self._raw(images)
        if self._io.output is OutputKind.POOLED:
            return out
        if self._io.output is OutputKind.SPATIAL:
            return out if self._io.layout is Layout.NHWC else out.transpose(0, 2, 3, 1)
        return self._token_grid(out)

    def _token_grid(self, tokens: np.ndarray) -> np.ndarray:
        patches = tokens[:, 1:] if self._io.cls_token else tokens
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1] or side == 0:
            raise EncoderError(
                f"{self._where}: output {self._output.name!r} has {tokens.shape[1]} tokens, "
                f"{patches.shape[1]} after model_io.cls_token={self._io.cls_token}, not a square grid; fix "
                "model_io.cls_token (a CLS token first?).")
        return patches.reshape(patches.shape[0], side, side, patches.shape[2])

    def embed(self, images: Images) -> np.ndarray:
        """See ``Encoder.embed``; a spatial map or patch tokens are averaged, a CLS token taken as it is."""
        images = self._images(images)
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._io.output is OutputKind.TOKENS and self._io.cls_token:
            return np.ascontiguousarray(self._raw(images)[:, 0])
        features = self._features(images)
        return features if features.ndim == 2 else features.mean(axis=(1, 2), dtype=np.float32)

    def feature_map(self, images: Images) -> np.ndarray:
        """The spatial feature map, or the patch tokens on their grid, of preprocessed images.

        Args:
            images: float32 ``[N, H, W, 3]`` (or a sequence of ``[H, W, 3]``) as for ``embed``.

        Returns:
            float32 ``[N, h, w, D]`` (not normalised).

        Raises:
            EncoderError: the model's declared output is ``pooled``, which has no map.
        """
        if self._io.output is OutputKind.POOLED:
            raise EncoderError(
                f"{self._where} declares output 'pooled' [N, D], which has no feature map; declare "
                "model_io.output='spatial' or 'tokens' (and model_io.output_name) to use feature_map.")
        images = self._images(images)
        if len(images) == 0:
            return np.zeros((0, 0, 0, self.dim), np.float32)
        return self._features(images)


def load_model_file(path: str, *, runtime: Runtime, io: ModelIO, name: str, content_hash: str,
                    preprocess: PreprocessSpec, reference_deviation: float = 0.0, where: str | None = None,
                    replicas: bool = REPLICAS) -> ModelFileEncoder:
    """Opens a local model file with ``runtime`` as a ``ModelFileEncoder``.

    Args:
        path: Local ``.tflite`` (``Runtime.LITERT``) or ``.onnx`` (``Runtime.ONNX``) file.
        runtime: The runtime that runs it.
        io: Its declared input layout and output.
        name: Encoder name for the identity.
        content_hash: ``"sha256:<hex>"`` identity of the model (the file's, or the weights it came from).
        preprocess: Input size and normalisation the file expects.
        reference_deviation: See ``EncoderIdentity``.
        where: How messages name the model (default: the path).
        replicas: One single-threaded session per core, run in parallel (see ``ModelFileEncoder``); False:
            one session on every core.

    Raises:
        EncoderError: a missing runtime package or file, or a file whose input/output differ from ``io``.
    """
    where = where or f"model file {path!r}"
    if not os.path.isfile(path):
        raise EncoderError(f"{where} does not exist; check the path.")
    sessions = {Runtime.LITERT: _LiteRTSession, Runtime.LITERT_INT8: _LiteRTSession, Runtime.ONNX: _OnnxSession}
    if runtime not in sessions:
        raise EncoderError(f"{where}: runtime {runtime.value!r} does not run model files; use litert or onnx.")
    cores = runtime_threads()
    try:
        opened = [sessions[runtime](path, 1) for _ in range(cores)] if replicas else [sessions[runtime](path, cores)]
    except (ValueError, RuntimeError) as e:
        if isinstance(e, EncoderError):
            raise
        raise EncoderError(f"{runtime.value} cannot load {where}: {e}") from e
    return ModelFileEncoder(opened, io=io, name=name, content_hash=content_hash, preprocess=preprocess,
                            runtime=runtime, reference_deviation=reference_deviation, where=where)
