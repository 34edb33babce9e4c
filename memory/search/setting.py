"""A memory's search setting: how many tree+AH leaves a query probes, the re-rank depth, the router's probes.

`vmem tune` (memory.search.tuning) picks one and records it in the manifest (``search_defaults``);
`VisualMemory.open` and the evaluate job's shard search read it back here and search with it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from memory.search.routing import check_route_ratio

if TYPE_CHECKING:
    from memory.index.shard_index import ShardIndex
    from memory.store.manifest import Manifest

_KNOBS = ("leaves_fraction", "reorder", "route_probes", "route_ratio")
_MEASURED = ("qps", "recall", "agreement", "accuracy")  # A Trial dict's measurements (not settings).


@dataclasses.dataclass(frozen=True)
class SearchSetting:
    """A memory's search knobs (None = keep the memory's own)."""
    leaves_fraction: float | None = None
    reorder: int | None = None
    route_probes: int | None = None
    route_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSetting:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)} - {"tuned", *_MEASURED}
        if unknown:
            raise ValueError(f"unknown search setting field(s) {sorted(unknown)}")
        return cls(**{k: d[k] for k in _KNOBS if d.get(k) is not None})

    def search_params(self) -> dict[str, Any]:
        """This setting as keyword arguments of `VisualMemory.with_search_params` (None keeps the memory's own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        parts = []
        if self.leaves_fraction is not None:
            parts.append(f"leaves {self.leaves_fraction:.4g}")
        if self.reorder is not None:
            parts.append(f"reorder {self.reorder}")
        if self.route_probes is not None:
            parts.append(f"route probes {self.route_probes}")
        if self.route_ratio is not None:
            parts.append(f"route ratio {self.route_ratio:g}")
        return ", ".join(parts) or "the memory's own"


def check_search_params(*, leaves_fraction: float | None, route_probes: int | None, route_ratio: float | None,
                        routed: bool) -> tuple[int | None, float | None]:
    """Checks the knobs of `VisualMemory.with_search_params` for a memory (``routed``: partition-routed or not).

    Returns:
      (route_probes as an int, route_ratio as a float), each None when not given.

    Raises:
      ValueError: naming the bad knob and the fix.
    """
    if leaves_fraction is not None and not 0.0 < leaves_fraction <= 1.0:
        raise ValueError(f"leaves_fraction must be in (0, 1], got {leaves_fraction}")
    if route_probes is not None and route_ratio is not None:
        raise ValueError(f"pass route_probes ({route_probes!r}) or route_ratio ({route_ratio!r}), not both: "
                         "they are two routing rules")
    for name, value in (("route_probes", route_probes), ("route_ratio", route_ratio)):
        if value is not None and not routed:
            raise ValueError(f"{name} applies to partition-routed memories only; this memory is hash-sharded "
                             "(every query visits every shard). Build with --sharding partition to route.")
    if route_ratio is not None:
        route_ratio = check_route_ratio(route_ratio)
    if route_probes is not None:
        if isinstance(route_probes, bool) or not isinstance(route_probes, (int, np.integer)) or route_probes < 1:
            raise ValueError(f"route_probes must be an int >= 1, got {route_probes!r}")
        route_probes = int(route_probes)
    return route_probes, route_ratio


def resolve_search_threads(threads: int | None, shards: int) -> int:
    """Threads a memory of ``shards`` searchable shards searches with: ``threads``, or for None one per CPU, at
    most one per shard.

    Raises:
      ValueError: naming ``threads``, unless it is None or an int >= 1.
    """
    if threads is None:
        return max(1, min(os.cpu_count() or 1, shards))
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"search_threads must be None or an int >= 1, got {threads!r}")
    return int(threads)


def tuned_index(index: ShardIndex, leaves_fraction: float | None, reorder: int | None) -> ShardIndex:
    """The shard's index probing ``leaves_fraction`` of its leaves (tree+AH only) and re-ranking ``reorder``."""
    leaves = None
    if leaves_fraction is not None and index.num_leaves_to_search is not None:
        leaves = max(1, math.ceil(leaves_fraction * index.config.resolve_leaves(len(index))[0]))
    return index.with_search_params(leaves_to_search=leaves, reorder=reorder)


def default_setting(manifest: Manifest) -> SearchSetting | None:
    """The manifest's tuned default search setting (`vmem tune`), or None."""
    return None if not manifest.search_defaults else SearchSetting.from_dict(manifest.search_defaults)
