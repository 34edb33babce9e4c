"""What a memory serves at one version: live entries, delta shards, forgotten and pruned counts (pure Python).

A manifest's ``counts`` are the build's record counts; after ``add``, ``forget`` or ``prune`` they no longer
describe what a reader gets. :func:`live_counts` does: the entries a reader of that version searches (stored
rows minus tombstones), where they sit (main shards from the last build or re-index, delta shards added
since), how many are hidden by tombstones (and how many of those a hard prune forgot), and how many carry a
soft-pruning weight. ``vmem info`` prints it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from memory import storage
from memory.decide.pruning import PruningMode, summary_path
from memory.store.manifest import Manifest
from memory.store.versions import change_of, list_versions, read_version

__all__ = ["LiveCounts", "live_counts"]

# Change kinds that start from rows without tombstones: the walk for hard prunes stops there.
_FRESH_KINDS = ("build", "reindex")


@dataclasses.dataclass(frozen=True)
class LiveCounts:
    """The live state of one version of a memory.

    Attributes:
      version: The version described.
      parent: The version it was derived from (None for a build).
      change: What produced it (``change.kind``: build, add, forget, prune, reindex, ...).
      live_entries: Entries a reader of this version searches (stored rows minus tombstoned ones).
      stored_rows: Rows in its shard files (main and delta), tombstoned ones included.
      shards: Main shards (from the build or the last re-index).
      shard_rows: Rows in the main shards.
      delta_shards: Delta shards added since the last re-index.
      delta_rows: Rows in the delta shards.
      forgotten: Tombstoned rows: forgotten (by ``forget`` or a hard prune) and still in the shard files until
        the next re-index drops them.
      hard_pruned: Of ``forgotten``, those a hard prune (``vmem prune --mode hard``) forgot since the last build
        or re-index, counted over the versions still in the history; None when not counted (no root given).
      soft_pruned: Entries that vote with a soft-pruning weight (``vmem prune --mode soft``).
      built_entries: Entries the build embedded (the manifest's build counts, unchanged by later versions).
    """
    version: int
    parent: int | None
    change: str
    live_entries: int
    stored_rows: int
    shards: int
    shard_rows: int
    delta_shards: int
    delta_rows: int
    forgotten: int
    hard_pruned: int | None
    soft_pruned: int
    built_entries: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hard_pruned(root: str, manifest: Manifest) -> int:
    """Rows forgotten by hard prunes on the way from the last build or re-index to ``manifest``."""
    existing = set(list_versions(root))
    total, m = 0, manifest
    while change_of(m).get("kind") not in _FRESH_KINDS and m.parent is not None and m.parent in existing:
        change = change_of(m)
        # A hard prune publishes a forget on its base version and records that version in its summary.
        summary = summary_path(root, m.parent)
        if change.get("kind") == "forget" and storage.exists(summary):
            outcome = json.loads(storage.read_text(summary)).get("outcome", {})
            if outcome.get("mode") == PruningMode.HARD.value and outcome.get("published_version") == m.version:
                total += int(change.get("forgotten", 0))
        m = read_version(root, m.parent)
    return total


def live_counts(root: str | None, manifest: Manifest) -> LiveCounts:
    """The live state of ``manifest``, a version of the memory at ``root``.

    Args:
      root: Memory root (local or ``gs://``), whose history and prune summaries say how many of the forgotten
        rows a hard prune forgot; None describes the manifest alone (``hard_pruned`` None).
      manifest: The version to describe (e.g. ``memory.store.versions.read_manifest(root)``).
    """
    weights = manifest.entry_weights
    return LiveCounts(
        version=manifest.version, parent=manifest.parent, change=str(change_of(manifest).get("kind")),
        live_entries=manifest.total, stored_rows=manifest.physical_total,
        shards=len(manifest.shards), shard_rows=sum(s.count for s in manifest.shards),
        delta_shards=len(manifest.delta_shards), delta_rows=sum(s.count for s in manifest.delta_shards),
        forgotten=manifest.forgotten.count if manifest.forgotten else 0,
        hard_pruned=None if root is None else _hard_pruned(root, manifest) if manifest.forgotten else 0,
        # Soft pruning is the one producer of entry weights (memory.store.manifest.WEIGHTS_KINDS).
        soft_pruned=weights.count if weights is not None else 0,
        built_entries=manifest.counts.embedded)
