"""The build job's configuration schema (configs as code, big_vision style).

A setup is a Python file in this package (or anywhere, passed as ``--config path/to/file.py``) whose
``get_config(variant: str = "")`` returns a :class:`BuildConfig`. Runner flags (``--runner``, ``--project``,
...) never live here: they stay Beam ``PipelineOptions``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Any

from encoders.base import EncoderSpec
from memory.index.shard_index import IndexConfig
from memory.regions.layout import GRID_KEY, check_grid
from memory.search.routing import RouterConfig
from memory.store.manifest import INDEX_CONFIG_KEY
from memory.store.sharding import Sharding, parse_sharding


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what a built memory contains.

    Attributes:
        encoder: Which frozen encoder embeds the images (default: the bundled EfficientNet-Lite0).
        index: How each shard is indexed (exact brute force below ``index.tree_ah_min_size``, ScaNN
            tree+AH+reorder above it, unless forced).
        num_shards: Number of ScaNN partitions; None -> ceil(entries / target_shard_size), with the entry
            count read from the source's metadata at launch (precomputed embeddings) or counted by the job.
        target_shard_size: Entries per shard when num_shards is None. One worker holds one shard (plus
            ScaNN's copy of it) while building it: 500k x 1280-d float32 is 2.6 GB, 500k x 256-d 0.5 GB.
        sharding: How entries are assigned to shards: ``hash`` (a stable hash of the id; every query searches
            every shard) or ``partition`` (a router trained on the data gives each shard one region of the
            embedding space, and a query searches only the shards its nearest centroids route it to; for
            large tree+AH memories, see memory/search/routing.py).
        router: How a ``partition`` build trains its router (ignored for ``hash``).
        min_batch_size: Lower bound of the encoder's dynamic batch size (Beam's BatchElements).
        max_batch_size: Upper bound of the encoder's dynamic batch size.
        progress_every: Log a progress line every this many embedded images (per worker).
        regions: G to store each image also as G x G region embeddings (its encoder feature map pooled per
            cell, memory.regions), or None for one global embedding per image.
    """

    encoder: EncoderSpec = dataclasses.field(default_factory=EncoderSpec)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    num_shards: int | None = None
    target_shard_size: int = 500_000
    sharding: Sharding = Sharding.HASH
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    min_batch_size: int = 16
    max_batch_size: int = 64
    progress_every: int = 200
    regions: int | None = None

    def __post_init__(self) -> None:
        if self.regions is not None:
            object.__setattr__(self, "regions", check_grid(self.regions))
        # Accept the string form (configs, JSON, --sharding) but store the enum.
        object.__setattr__(self, "sharding", parse_sharding(self.sharding))
        if self.num_shards is not None and (not isinstance(self.num_shards, int) or self.num_shards < 1):
            raise ValueError(f"num_shards must be None (automatic) or an int >= 1, got {self.num_shards!r}; "
                             "pass e.g. --shards 4.")
        if not isinstance(self.target_shard_size, int) or self.target_shard_size < 1:
            raise ValueError(f"target_shard_size must be an int >= 1, got {self.target_shard_size!r}")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError(
                f"need 1 <= min_batch_size <= max_batch_size, got {self.min_batch_size} and "
                f"{self.max_batch_size}; fix them in the config.")

    def replace(self, **changes: Any) -> "BuildConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.to_dict(),
            INDEX_CONFIG_KEY: self.index.to_dict(),
            "num_shards": self.num_shards,
            "target_shard_size": self.target_shard_size,
            "sharding": self.sharding.value,
            "router": self.router.to_dict(),
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
            "progress_every": self.progress_every,
            # Only region builds record a grid: a global build's build config stays as it was.
            **({GRID_KEY: self.regions} if self.regions is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        d = dict(d)
        return cls(
            encoder=EncoderSpec.from_dict(d.pop("encoder")) if "encoder" in d else EncoderSpec(),
            index=IndexConfig.from_dict(d.pop(INDEX_CONFIG_KEY)) if INDEX_CONFIG_KEY in d else IndexConfig(),
            router=RouterConfig.from_dict(d.pop("router")) if "router" in d else RouterConfig(),
            **d)


def load_config(ref: str | None) -> BuildConfig:
    """Loads a config from ``path/to/file.py[:variant]`` or a module name ``configs.x[:variant]``.

    ``None`` gives the defaults (:mod:`configs.default`).
    """
    if not ref:
        ref = "configs.default"
    name, _, variant = ref.partition(":")
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--config {ref!r}: no such file {name!r}.")
        spec = importlib.util.spec_from_file_location("_vmem_user_config", name)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ValueError(
                f"--config {ref!r}: cannot import module {name!r} ({e}); pass a .py file path or a module "
                "such as configs.default or configs.fashion_mnist:quick.") from e
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {ref!r}: {name} defines no get_config(variant='') function.")
    config = module.get_config(variant) if variant else module.get_config()
    if not isinstance(config, BuildConfig):
        raise TypeError(f"--config {ref!r}: get_config() returned {type(config).__name__}, expected BuildConfig.")
    return config
