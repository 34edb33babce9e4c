"""The files a version references: what a purge keeps, and what the leftover sweeps may delete.

Every path a manifest names (shards, delta shards, entry weights, router, metadata, tombstones, and the
calibration's out-of-memory entry similarities), root-relative, read from the manifest as stored.
"""

from __future__ import annotations

from memory.store.manifest import Manifest

__all__ = ["referenced_paths"]


def referenced_paths(m: Manifest, *, tombstones: bool = True, calibration: bool = True) -> set[str]:
    """Root-relative files and directories version ``m`` references (``tombstones=False``: but its tombstone
    file; ``calibration=False``: but its calibration's entry-similarity file)."""
    paths = {s.path for s in m.all_shards}
    if m.entry_weights is not None:
        paths.add(m.entry_weights.path)
    if m.router is not None:
        paths.add(m.router.path)
    if m.metadata is not None:
        paths.add(m.metadata.path)
    if tombstones and m.forgotten is not None:
        paths.add(m.forgotten.path)
    # The out-of-memory test's entry similarities (memory.decide.out_of_memory.EntrySimilarityRef), read as the
    # manifest stores them: the store does not interpret a calibration beyond the files it names.
    entries = ((m.calibration or {}).get("out_of_memory") or {}).get("entries") if calibration else None
    if isinstance(entries, dict) and isinstance(entries.get("path"), str):
        paths.add(entries["path"])
    return paths
