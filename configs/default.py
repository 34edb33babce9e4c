"""Default build: the bundled EfficientNet-Lite0 encoder, 4 shards, automatic index choice."""

from configs.build import BuildConfig


def get_config(variant: str = "") -> BuildConfig:
    del variant  # One setup only.
    return BuildConfig()
