"""Reads PyTorch's *legacy* (pre-1.6, non-zip) checkpoint format without torch.

The bundled encoder's weights ship as a ``.pth`` file written by ``torch.save``
with ``_use_new_zipfile_serialization=False``. Users should not need a
multi-gigabyte torch install to use them, so this module decodes that format
directly. The file is a concatenation of pickles followed by raw storages:

1. the magic number ``0x1950a86a20f9469cfc6c``;
2. the protocol version (``1001``);
3. ``sys_info`` (endianness and C type sizes of the writing machine);
4. the object itself (typically an ``OrderedDict`` state dict) whose tensors
   are pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size,
   stride, ...)`` and whose storages are *persistent ids*
   ``('storage', storage_type, key, location, numel, view_metadata)``;
5. a pickle with the list of storage keys in the order they follow;
6. for every key: an int64 little-endian element count, then the raw data.

Unpickling is restricted to an allow-list of globals, so a hostile file cannot
run code the way ``torch.load`` on an untrusted pickle can.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of one element (always little-endian
# on disk for the files we accept; see _check_sys_info).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    # numpy has no bfloat16: read the raw 16 bits, widened to float32 later.
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}


class TorchLegacyFormatError(ValueError):
    """The file is not a torch legacy checkpoint this reader understands."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class referenced from the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage referenced by persistent id; its bytes come after the pickles."""

    key: str
    storage_type: _StorageType
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor view on a storage, materialised once all storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
    # requires_grad / backward_hooks / metadata are meaningless for inference.
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused_args):
    # nn.Parameter wraps a tensor; the wrapper carries nothing we need.
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Unpickler that maps torch globals to local stand-ins and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchLegacyFormatError(
            f"Refusing to unpickle global {module}.{name}: only tensors and state "
            "dicts are supported by this reader (load the file with torch instead)."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchLegacyFormatError(f"Unsupported persistent id {pid!r}.")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchLegacyFormatError(f"Unknown storage type {storage_type!r}.")
        if view_metadata is not None:
            # Storage views were removed from torch long ago (pre-1.0 files only).
            raise TorchLegacyFormatError(
                f"Storage {key!r} is a storage view, which this reader does not support."
            )
        return _StorageRef(str(key), storage_type, int(numel))


def _load_pickle(f: BinaryIO) -> Any:
    return _Unpickler(f).load()


def _check_header(f: BinaryIO, path: str) -> None:
    head = f.read(4)
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        raise TorchLegacyFormatError(
            f"{path} is a zip-format torch checkpoint (torch >= 1.6 default), not the "
            "legacy format. Re-save it with torch.save(obj, path, "
            "_use_new_zipfile_serialization=False) to read it without torch."
        )
    try:
        magic = _load_pickle(f)
    except (pickle.UnpicklingError, EOFError, TorchLegacyFormatError) as e:
        raise TorchLegacyFormatError(f"{path} is not a torch legacy checkpoint: {e}") from e
    if magic != MAGIC_NUMBER:
        raise TorchLegacyFormatError(
            f"{path} is not a torch legacy checkpoint: magic number {magic!r} != "
            f"{MAGIC_NUMBER:#x}."
        )
    version = _load_pickle(f)
    if version != PROTOCOL_VERSION:
        raise TorchLegacyFormatError(
            f"{path}: unsupported torch legacy protocol version {version!r} "
            f"(expected {PROTOCOL_VERSION})."
        )
    sys_info = _load_pickle(f)
    if not sys_info.get("little_endian", True):
        raise TorchLegacyFormatError(f"{path} was written on a big-endian machine.")


def _materialise(ref: _TensorRef, buffers: dict[str, np.ndarray]) -> np.ndarray:
    buf = buffers[ref.storage.key]
    if not ref.size:
        return np.array(buf[ref.offset])  # 0-d array, not a numpy scalar
    # Bounds check before as_strided: a corrupt stride/offset must not read
    # outside the storage (as_strided does no checking of its own).
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride) if n > 0)
    if min(ref.size) > 0 and (ref.offset < 0 or last >= buf.size or min(ref.stride) < 0):
        raise TorchLegacyFormatError(
            f"Tensor view (offset={ref.offset}, size={ref.size}, stride={ref.stride}) "
            f"exceeds storage {ref.storage.key!r} of {buf.size} elements."
        )
    view = np.lib.stride_tricks.as_strided(
        buf[ref.offset :] if buf.size else buf,
        shape=ref.size,
        strides=tuple(s * buf.itemsize for s in ref.stride),
        writeable=False,
    )
    # Copy so each array owns contiguous memory and the file buffer can be freed.
    out = np.ascontiguousarray(view)
    if ref.storage.storage_type.name == "BFloat16Storage":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _replace_refs(obj: Any, buffers: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, _TensorRef):
        return _materialise(obj, buffers)
    if isinstance(obj, dict):
        return {k: _replace_refs(v, buffers) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_refs(v, buffers) for v in obj)
    return obj


def load_legacy(path: str | os.PathLike) -> Any:
    """Loads a torch legacy checkpoint, returning numpy arrays for tensors.

    Args:
        path: Local path of a file written by ``torch.save(...,
            _use_new_zipfile_serialization=False)``.

    Returns:
        The pickled object with every tensor replaced by a contiguous
        ``np.ndarray`` (dicts become plain dicts, preserving key order).

    Raises:
        TorchLegacyFormatError: The file is zip-format, truncated, or uses
            features this reader does not support.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        _check_header(f, path)
        obj = _load_pickle(f)
        keys = _load_pickle(f)

        # Collect the storage refs reachable from obj to know each key's dtype.
        storages: dict[str, _StorageRef] = {}

        def collect(o: Any) -> None:
            if isinstance(o, _TensorRef):
                storages[o.storage.key] = o.storage
            elif isinstance(o, dict):
                for v in o.values():
                    collect(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    collect(v)

        collect(obj)
        buffers: dict[str, np.ndarray] = {}
        for key in keys:
            key = str(key)
            if key not in storages:
                raise TorchLegacyFormatError(f"{path}: storage key {key!r} is not referenced.")
            dtype = storages[key].storage_type.dtype
            header = f.read(8)
            if len(header) != 8:
                raise TorchLegacyFormatError(f"{path} is truncated before storage {key!r}.")
            (numel,) = struct.unpack("<q", header)
            data = f.read(numel * dtype.itemsize)
            if len(data) != numel * dtype.itemsize:
                raise TorchLegacyFormatError(f"{path} is truncated inside storage {key!r}.")
            buffers[key] = np.frombuffer(data, dtype=dtype)
        missing = set(storages) - set(buffers)
        if missing:
            raise TorchLegacyFormatError(f"{path}: storages {sorted(missing)} are missing.")
    return _replace_refs(obj, buffers)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a legacy-format state dict as ``{name: np.ndarray}``.

    Args:
        path: Local path of the ``.pth`` file.

    Returns:
        Parameter and buffer arrays keyed by their torch names, in file order.

    Raises:
        TorchLegacyFormatError: The file is not a legacy checkpoint holding a
            dict of tensors.
    """
    obj = load_legacy(path)
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise TorchLegacyFormatError(
            f"{os.fspath(path)} does not hold a state dict of tensors (got {type(obj).__name__})."
        )
    return obj
