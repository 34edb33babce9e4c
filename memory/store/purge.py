"""Deleting what no version needs: old history (`purge_history`) and files that failed writers left.

`purge_history` deletes old versions that still show what the latest version has forgotten, and the files
only they referenced. `remove_leftovers` deletes files that no version references at all: a writer killed
between writing its files and publishing, or one that lost a race before it cleaned up. Which files are
leftovers, and when it is safe to delete them, is documented there.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import NamedTuple

from memory import storage
from memory.store.manifest import Manifest, ManifestError
from memory.store.mutations import DELTAS_DIR, TOMBSTONES_DIR, WEIGHTS_DIR, read_forgotten
from memory.store.references import referenced_paths
from memory.store.versions import (MAX_REBASES, ConcurrentUpdateError, checked_deletion_paths,
                                   list_versions, publish_version, read_base_version, read_version, version_path)

# Leftovers are deleted only when they are this much older than the newest version (see remove_leftovers).
DEFAULT_LEFTOVER_GRACE_S = 3600.0
DEAD_LETTER_DIR = "dead_letter"
# tombstones/v000007-1a2b3c4d.npy, weights/v000007-....npz, deltas/v000007-<job>: made for version 7.
_VERSIONED_RE = re.compile(r"^v(\d{6,})-[A-Za-z0-9._-]+$")
_ADD_DEAD_LETTER_RE = re.compile(r"^add-v(\d{6,})$")
_DEAD_LETTER_FILE_RE = re.compile(r"^failed-([0-9a-f]+)-")

__all__ = ["DEFAULT_LEFTOVER_GRACE_S", "Leftover", "find_leftovers", "purge_history", "purge_history_once",
           "purge_requested_since_reindex", "remove_leftovers"]


class Leftover(NamedTuple):
    """A path no retained version references: ``rel`` (root-relative), ``why`` it is one."""
    rel: str
    why: str


def purge_requested_since_reindex(root: str) -> bool:
    """True if a forget since the latest re-index (or build) asked for old history to be purged."""
    for record in reversed(list_versions(root)):
        change = read_version(root, record).change
        if change.get("kind") in ("reindex", "build") or not change:
            return False
        if change.get("purge_requested"):
            return True
    return False


def purge_history(root: str, *, expected_version: int | None = None) -> list[int]:
    """Purges old history (`purge_history_once`); when another writer publishes first, recomputes on the new
    latest version and retries (at most versions.MAX_REBASES times) unless ``expected_version`` pins it."""
    for attempt in range(MAX_REBASES + 1):
        try:
            return purge_history_once(root, expected_version=expected_version)
        except ConcurrentUpdateError:
            if expected_version is not None or attempt == MAX_REBASES:
                raise
    raise AssertionError("unreachable")


def purge_history_once(root: str, *, expected_version: int | None = None) -> list[int]:
    """Deletes old versions that can still show what the latest version no longer shows, and their files.

    Semantics, with L the latest version: an older version v is *kept* iff every shard, delta shard, weights,
    router and metadata file it references is also referenced by L and its tombstones include all of L's tombstones.
    Then v's live entries are a subset of L's, so it reveals nothing L has forgotten. Every other older
    version is *purged*: a new version L+1 (a copy of L, change kind "purge" listing the purged versions and
    deleted paths) is published first, then the purged version files are deleted, then every file or shard
    directory referenced by a purged version and by no remaining version, except tombstone files whose ids the
    latest version's tombstones all list (no information beyond L's; the leftover sweep removes them later).

    Embeddings of entries forgotten but not yet re-indexed live in shards that L itself references, so they
    stay on disk (hidden by tombstones) until a re-index writes new shards without them; purging after the
    re-index deletes the old shard directories. Readers that pinned a purged version fail to reopen it.

    Returns:
      The purged version numbers (ascending; [] when nothing needed purging, and then nothing is published).
    """
    _finish_interrupted_purges(root)
    versions = list_versions(root)
    if len(versions) < 2:
        return []
    base, latest = read_base_version(root, expected_version)
    gone = set(read_forgotten(root, latest).tolist())
    # A version's calibration file reveals nothing the latest version hides: it does not decide what is kept,
    # but one only purged versions reference is deleted with them.
    keep_paths = referenced_paths(latest, tombstones=False, calibration=False)
    kept, purged, purged_paths, hidden_tombstones = [latest], [], set(), set()
    for n in versions[:-1]:
        m = read_version(root, n)
        forgotten = set(read_forgotten(root, m).tolist())
        if referenced_paths(m, tombstones=False, calibration=False) <= keep_paths and gone <= forgotten:
            kept.append(m)
        else:
            purged.append(n)
            purged_paths |= referenced_paths(m)
            if m.forgotten is not None and forgotten <= gone:
                hidden_tombstones.add(m.forgotten.path)
    if not purged:
        return []
    still = set().union(*(referenced_paths(m) for m in kept))
    # A purged version's tombstone file that lists only ids the latest version's tombstones list too reveals
    # nothing the latest does not: it is left for the leftover sweep (remove_leftovers, after its grace period),
    # so a job still reading that version on its workers (an evaluation started before the purge) can finish.
    # Tombstones the latest no longer lists (a re-index dropped those rows) go now, with the shards.
    delete = sorted(purged_paths - still - hidden_tombstones)
    # Checked before the record is published: a bad path is never recorded, and nothing is deleted.
    full_paths = checked_deletion_paths(root, delete, what=f"the paths versions {purged} reference")
    publish_version(root, dataclasses.replace(latest, change={
        "kind": "purge", "summary": f"purged {len(purged)} old version(s) and {len(delete)} unreferenced path(s)",
        "purged_versions": purged, "deleted_paths": delete}), expected_parent=base)
    for n in purged:
        storage.remove_tree(version_path(root, n))
    for rel, path in zip(delete, full_paths):
        storage.remove_tree(path)
        _remove_empty_parents(root, rel)
    return purged


def _finish_interrupted_purges(root: str) -> list[str]:
    """Completes the deletions of earlier purges that were killed after publishing their record.

    A purge publishes the list of what it will delete before deleting anything, so a purge killed halfway
    leaves a record naming the leftovers. Those paths are unreferenced by every remaining version (paths are
    never reused), and they may still hold forgotten embeddings: delete whatever of them still exists.
    Returns the relative paths deleted now.
    """
    versions = [read_version(root, n) for n in list_versions(root)]
    referenced = set().union(*(referenced_paths(m) for m in versions)) if versions else set()
    purges = [m for m in versions if m.change.get("kind") == "purge"]
    # Every listed path of every record is checked before anything is deleted.
    checked = {}
    for m in purges:
        numbers = m.change.get("purged_versions", [])
        bad = [n for n in numbers if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if bad:
            raise ManifestError(f"refusing to purge: version {m.version}'s change.purged_versions lists {bad!r}, not "
                                f"version numbers; nothing was deleted")
        rels = m.change.get("deleted_paths", [])
        checked[m.version] = checked_deletion_paths(root, rels, what=f"version {m.version}'s change.deleted_paths")
    finished = []
    for m in purges:
        for n in m.change.get("purged_versions", []):
            if storage.exists(version_path(root, n)):
                storage.remove_tree(version_path(root, n))
        for rel, path in zip(m.change.get("deleted_paths", []), checked[m.version]):
            if rel not in referenced and storage.exists(path):
                storage.remove_tree(path)
                _remove_empty_parents(root, rel)
                finished.append(rel)
    return finished


def _remove_empty_parents(root: str, rel: str) -> None:
    """Locally, drop directories a deletion left empty (deltas/<tag>/); GCS has no directories."""
    if storage.is_gcs(root):
        return
    import os  # pylint: disable=g-import-not-at-top
    parent = posixpath.dirname(rel)
    while parent:
        path = storage.join(root, *parent.split("/"))
        try:
            os.rmdir(path)
        except OSError:
            return
        parent = posixpath.dirname(parent)


def _version_of(name: str) -> int | None:
    m = _VERSIONED_RE.match(name)
    return int(m.group(1)) if m else None


def find_leftovers(root: str, *, grace_s: float = DEFAULT_LEFTOVER_GRACE_S) -> list[Leftover]:
    """Files under tombstones/, weights/, deltas/ and dead_letter/ that no writer can still publish.

    A path is a leftover iff all of these hold:

    * no existing version references it (tombstone, weights or delta shard path of any version; for a
      dead-letter file: no existing add version records the job that wrote it);
    * its name says it was made for a version number <= the latest (``vNNNNNN-...``; dead letters:
      ``add-vNNNNNN/``), so its writer either published or lost that version -- a writer still
      computing a later version names its files after that later one;
    * it was last modified at least ``grace_s`` seconds before the latest version file was written. A writer
      that lost a race re-bases at once (versions.publish_rebasing) and may still publish files it wrote
      earlier; the grace period covers it, as Delta Lake's VACUUM retention does: never run a clean-up with a
      grace period shorter than the longest gap between a writer's first file and its publish.
    * for dead letters, additionally: every add published since that version records its job (older adds
      did not, and their dead letters are kept).

    Args:
      root: Memory root.
      grace_s: The grace period in seconds (>= 0).

    Returns:
      The leftovers, sorted by path.
    """
    if not grace_s >= 0:
        raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
    versions = list_versions(root)
    if not versions:
        return []
    latest = versions[-1]
    cutoff = storage.modified_time(version_path(root, latest)) - grace_s
    manifests = [read_version(root, n) for n in versions]
    referenced = set().union(*(referenced_paths(m) for m in manifests))
    found = []

    def old(rel: str) -> bool:
        try:
            return storage.modified_time(storage.join(root, rel)) < cutoff
        except FileNotFoundError:  # Deleted meanwhile.
            return False

    for directory in (TOMBSTONES_DIR, WEIGHTS_DIR, DELTAS_DIR):
        try:
            names = storage.list_dir(storage.join(root, directory))
        except FileNotFoundError:
            continue
        for name in names:
            rel = f"{directory}/{name}"
            made_for = _version_of(posixpath.splitext(name)[0] if directory != DELTAS_DIR else name)
            used = rel in referenced or any(p.startswith(rel + "/") for p in referenced)
            if made_for is not None and made_for <= latest and not used and old(rel):
                found.append(Leftover(rel, f"made for version {made_for}, referenced by no version"))
    found += _dead_letter_leftovers(root, manifests, latest, old)
    return sorted(found)


def _dead_letter_leftovers(root: str, manifests: list[Manifest], latest: int, old) -> list[Leftover]:
    """Dead-letter files of add jobs that published nothing (see find_leftovers)."""
    try:
        dirs = storage.list_dir(storage.join(root, DEAD_LETTER_DIR))
    except FileNotFoundError:
        return []
    first = manifests[0].version
    jobs = {m.change.get("job") for m in manifests if m.change.get("kind") == "add"}
    found = []
    for d in dirs:
        match = _ADD_DEAD_LETTER_RE.match(d)
        if not match or not first <= int(match.group(1)) <= latest:
            continue
        n = int(match.group(1))
        if any(m.change.get("kind") == "add" and "job" not in m.change for m in manifests if m.version >= n):
            continue
        for name in storage.list_dir(storage.join(root, DEAD_LETTER_DIR, d)):
            job = _DEAD_LETTER_FILE_RE.match(name)
            rel = f"{DEAD_LETTER_DIR}/{d}/{name}"
            if job and job.group(1) not in jobs and old(rel):
                found.append(Leftover(rel, f"dead letters of add job {job.group(1)}, which published no version"))
    return found


def remove_leftovers(root: str, *, grace_s: float = DEFAULT_LEFTOVER_GRACE_S) -> list[Leftover]:
    """Deletes `find_leftovers`' paths (every path checked first: one bad path deletes nothing); returns them."""
    found = find_leftovers(root, grace_s=grace_s)
    paths = checked_deletion_paths(root, [f.rel for f in found], what="the leftovers of failed writers")
    for f, path in zip(found, paths):
        storage.remove_tree(path)
        _remove_empty_parents(root, f.rel)
    return found
