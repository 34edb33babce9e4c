"""Default build: the bundled EfficientNet-Lite0 encoder, shards of up to 500k entries, automatic index choice."""

from configs.build import BuildConfig


def get_config(variant: str = "") -> BuildConfig:
    del variant  # One setup only.
    return BuildConfig()
