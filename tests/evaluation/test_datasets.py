"""The bundled dataset reader and ImageFolder writer (real Debian Fashion-MNIST files)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import (FASHION_MNIST_CLASSES, DatasetMissingError, load_fashion_mnist,
                                 prepare_fashion_mnist, read_idx, select_per_class)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "short.gz"))


def test_select_per_class_takes_first_n_of_each_class():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2])
    np.testing.assert_array_equal(select_per_class(labels, 2), [0, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(select_per_class(labels, None), np.arange(8))
    with pytest.raises(ValueError, match=">= 1"):
        select_per_class(labels, 0)


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", source_dir=str(tmp_path))


def test_prepare_writes_real_pngs_matching_the_idx_pixels(fmnist_small):
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    root = os.path.join(fmnist_small, "test")
    assert sorted(os.listdir(root)) == sorted(FASHION_MNIST_CLASSES)
    assert all(len(os.listdir(os.path.join(root, c))) == 5 for c in FASHION_MNIST_CLASSES)
    first = select_per_class(labels, 5)[0]
    path = os.path.join(root, FASHION_MNIST_CLASSES[labels[first]], f"test-{first:05d}.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), images[first])


def test_prepare_is_idempotent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    a = prepare_fashion_mnist(str(tmp_path / "out"), per_class=2, source_dir=str(src))
    b = prepare_fashion_mnist(str(tmp_path / "out"), per_class=2, source_dir=str(src))
    assert a["train"].count == b["train"].count == 20 and a["test"].count == 10
