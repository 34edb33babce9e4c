"""Fashion-MNIST memories with the bundled encoder.

Variants:
  (none)   4 shards, exact search (the memories are small enough for brute force to be fastest).
  quick    1 shard, small batches: for smoke tests.
  tree_ah  forces ScaNN tree+AH+reorder on every shard, to exercise the approximate path on real data.
"""

from configs.build import BuildConfig
from memory.index.shard_index import IndexConfig, IndexKind


def get_config(variant: str = "") -> BuildConfig:
    config = BuildConfig(num_shards=4)
    if variant == "quick":
        return config.replace(num_shards=1, min_batch_size=8, max_batch_size=32)
    if variant == "tree_ah":
        return config.replace(index=IndexConfig(kind=IndexKind.TREE_AH))
    if variant:
        raise ValueError(f"configs.fashion_mnist has no variant {variant!r}; use '', 'quick' or 'tree_ah'.")
    return config
