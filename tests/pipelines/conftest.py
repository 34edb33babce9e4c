"""Fixtures for the pipelines/ tests."""

from tests.gcs_emulator import gcs_bucket  # noqa: F401  (re-exported pytest fixture)
