"""Fixtures for the pipelines/ tests."""

import os

import pytest

from tests.gcs_emulator import gcs_bucket  # noqa: F401  (re-exported pytest fixture)


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
