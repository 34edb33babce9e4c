"""A served copy of the tiny real memory (tests/conftest.py)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture()
def served_memory(tiny_memory, tmp_path) -> str:
    """A private copy of the module's tiny memory: tests that publish versions change only their own."""
    path = str(tmp_path / "served")
    shutil.copytree(tiny_memory, path)
    return path
