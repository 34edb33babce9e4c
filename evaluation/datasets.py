"""Bundled datasets: Debian's ``dataset-fashion-mnist`` turned into ImageFolders of real PNG files.

The build job then reads real files through the same reader a user's data goes through. Pure numpy +
Pillow; no Beam, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import struct

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Official label order of Fashion-MNIST (index = label id in the idx files).
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
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


def select_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` examples of every class, in file order (deterministic)."""
    if per_class is None:
        return np.arange(labels.shape[0])
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}.")
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


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


def prepare_fashion_mnist(out_dir: str, *, per_class: int | None = None, test_per_class: int | None = None,
                          source_dir: str = FASHION_MNIST_DIR) -> dict[str, PreparedSplit]:
    """Writes ``out_dir/train`` and ``out_dir/test`` ImageFolders from the Debian Fashion-MNIST package.

    Args:
        out_dir: Destination directory (local).
        per_class: Images per class taken from the 60k training split (first N in file order); None = all.
        test_per_class: Images per class from the 10k test split; None = same as ``per_class``.
        source_dir: Where the ``*-idx*-ubyte.gz`` files are.

    Returns:
        {"train": PreparedSplit, "test": PreparedSplit}.
    """
    if test_per_class is None:
        test_per_class = per_class
    result = {}
    for split, n, prefix in (("train", per_class, "train"), ("test", test_per_class, "test")):
        images, labels = load_fashion_mnist(split, source_dir=source_dir)
        indices = select_per_class(labels, n)
        result[split] = write_image_folder(os.path.join(out_dir, split), images, labels, indices,
                                           class_names=FASHION_MNIST_CLASSES, prefix=prefix)
    return result
