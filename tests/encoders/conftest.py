"""Shared fixtures for encoder tests: one bundled-model export per session."""

from __future__ import annotations

import importlib.util
import os

import pytest

# Keep TF's C++ start-up chatter out of test output; must precede the TF import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@pytest.fixture(scope="session")
def bundled_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private VMEM_CACHE_DIR so tests never touch (or depend on) ~/.cache."""
    path = str(tmp_path_factory.mktemp("vmem-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMEM_CACHE_DIR", path)
        yield path


@pytest.fixture(scope="session")
def bundled_encoder(bundled_cache_dir):
    """The bundled EfficientNet-Lite0 encoder on TF, the reference of every runtime, exported once."""
    from encoders import EncoderSpec, load_encoder
    from encoders.base import Runtime

    return load_encoder(EncoderSpec(runtime=Runtime.TF))


@pytest.fixture(scope="session")
def foolbox_data_dir() -> str:
    """foolbox's sample-image directory, found without importing foolbox.

    Importing foolbox pulls in eagerpy and friends, which are not installed.
    """
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("foolbox is not installed; it provides the labelled ImageNet samples.")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")
