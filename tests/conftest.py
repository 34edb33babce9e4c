"""Shared fixtures: a tiny real SavedModel encoder, small real Fashion-MNIST ImageFolders, bad files."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Never let a test probe real Google credentials or GCS.
os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "test")

import numpy as np
import pytest

from evaluation.datasets import FASHION_MNIST_DIR, prepare_fashion_mnist
from tests.gcs_emulator import gcs_bucket  # noqa: F401  (re-exported pytest fixture)


def save_tiny_encoder(path: str) -> None:
    """A deterministic 48-d 'encoder': 4x4 average-pooled RGB. Real SavedModel, real loader path."""
    import tensorflow as tf

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, x):
            pooled = tf.image.resize(x, (4, 4), method="area")
            return {"embedding": tf.reshape(pooled, (-1, 48)) + 0.01}

    module = Tiny()
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})


def resaved_encoder_config(tmp_path, encoder_dir: str, *, num_shards: int) -> tuple[str, str]:
    """A private copy of a SavedModel encoder and a config file using it: (config path, encoder copy dir).

    Re-saving the copy afterwards (``save_tiny_encoder``) keeps the spec but changes the content hash, which
    is how tests simulate an encoder whose files changed after a memory was built.
    """
    import shutil
    enc = str(tmp_path / "enc")
    shutil.copytree(encoder_dir, enc)
    config = tmp_path / "cfg.py"
    config.write_text(
        "from configs.build import BuildConfig\n"
        "from encoders.base import EncoderKind, EncoderSpec, PreprocessSpec, ResizeMode\n"
        "def get_config(variant=''):\n"
        f"    return BuildConfig(encoder=EncoderSpec(kind=EncoderKind.SAVED_MODEL, uri={enc!r}, name='tiny',\n"
        "        preprocess=PreprocessSpec(image_size=16, resize=ResizeMode.RESIZE_SQUARE)), "
        f"num_shards={num_shards})\n")
    return str(config), enc


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_encoder") / "saved_model")
    save_tiny_encoder(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder_config_file(tiny_encoder_dir, tmp_path_factory) -> str:
    """A user config file (configs as code) selecting the tiny SavedModel with 16 px inputs."""
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(
        "from configs.build import BuildConfig\n"
        "from encoders.base import EncoderKind, EncoderSpec, PreprocessSpec, ResizeMode\n"
        "def get_config(variant=''):\n"
        f"    enc = EncoderSpec(kind=EncoderKind.SAVED_MODEL, uri={tiny_encoder_dir!r}, name='tiny',\n"
        "                      preprocess=PreprocessSpec(image_size=16, resize=ResizeMode.RESIZE_SQUARE,\n"
        "                                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))\n"
        "    return BuildConfig(encoder=enc, num_shards=3, min_batch_size=4, max_batch_size=32)\n")
    return str(path)


def require_fashion_mnist() -> None:
    """Fails the test, with the install command, when the Fashion-MNIST files are missing."""
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: run `make install` (installs Debian's dataset-fashion-mnist).")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> str:
    """200 real Fashion-MNIST training images (20 per class) and 50 test images as ImageFolders."""
    require_fashion_mnist()
    root = str(tmp_path_factory.mktemp("fmnist"))
    prepare_fashion_mnist(root, per_class=20, test_per_class=5)
    return root


BAD_FILES = {
    "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10,  # PNG signature, broken body.
    "empty.jpg": b"",
    "notes.txt": b"this is not an image\n",
}


@pytest.fixture()
def mixed_folder(fmnist_small, tmp_path) -> tuple[str, int]:
    """A copy of 30 real images plus corrupt, empty and non-image files; returns (root, n_valid)."""
    import shutil
    src = os.path.join(fmnist_small, "train")
    root = tmp_path / "mixed"
    n_valid = 0
    for cls in sorted(os.listdir(src))[:3]:
        os.makedirs(root / cls)
        for name in sorted(os.listdir(os.path.join(src, cls)))[:10]:
            shutil.copy(os.path.join(src, cls, name), root / cls / name)
            n_valid += 1
    for name, data in BAD_FILES.items():
        (root / "bag" / name).write_bytes(data)
    (root / "loose.png").write_bytes(b"")  # Not inside a class directory.
    return str(root), n_valid


def brute_force_topk(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine distance (1 - dot) over unit vectors; ties by index."""
    d = 1.0 - queries.astype(np.float64) @ db.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(db.shape[0]), d.shape), d), axis=-1)[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


@pytest.fixture(scope="module")
def tiny_memory(fmnist_small, tiny_encoder_config_file, tmp_path_factory) -> str:
    """A memory built by the build job from fmnist_small/train with the tiny real encoder.

    Module-scoped: every test module gets its own copy, so modules that publish new versions (prune, add)
    never change another module's memory.
    """
    from pipelines import build
    out = str(tmp_path_factory.mktemp("tiny_memory") / "mem")
    build.run(["--images", os.path.join(fmnist_small, "train"), "--output", out,
               "--config", tiny_encoder_config_file])
    return out
