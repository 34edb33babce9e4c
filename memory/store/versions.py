"""Immutable, exclusively-published versions of a memory: the history of a living memory.

On disk (local directory or ``gs://``)::

  MEMORY/versions/v000001.json   the build (a full Manifest with version=1, parent=None, change.kind=build)
  MEMORY/versions/v000002.json   e.g. a forget: version=2, parent=1, change={"kind": "forget", ...}
  MEMORY/manifest.json           a copy of the latest version, for tools that do not know versions

Rules:

* A version file is never modified or overwritten. Publishing version n+1 creates
  ``versions/v{n+1:06d}.json`` *exclusively* -- locally a fully written, fsynced temp file is hard-linked
  to the final name (``os.link`` fails if it exists); on GCS a single upload with ``if_generation_match=0``
  (fails with 412 if the object exists) -- so of two publishers based on the same parent exactly one wins
  and the other gets :class:`ConcurrentUpdateError`.
* Every file a version references (shards, delta shards, tombstone and weights files) must be completely
  written before it is published, and must never be overwritten afterwards: new data goes to new paths.
* Readers resolve the latest version by listing ``versions/`` (largest n); ``manifest.json`` is only
  consulted for a memory built before versions existed (read as version 1). Temp files (``.tmp-*``) are
  never versions, so a crash at any point leaves the previous latest version intact and readable.
* A writer that loses the race for version n+1 re-bases (`publish_rebasing`), as Delta Lake does for blind
  appends: it re-reads the new latest version L, checks that its change does not conflict with what was
  published since its base (different ids; no re-index of the shards it relied on), recomputes its manifest on
  L and tries to publish L+1, at most `MAX_REBASES` times. A true conflict raises `WriteConflictError` naming
  the winning version and the clash; nothing of the losing change is published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
from typing import Any, Callable, Iterator, TypeVar

from memory import storage
from memory.store.manifest import (MANIFEST_NAME, Manifest, ManifestError, manifest_path, read_manifest_file,
                             utc_now_iso)

VERSIONS_DIR = "versions"
_VERSION_RE = re.compile(r"^v(\d{6,})\.json$")
_JSON = "application/json"
# How many times a writer that lost the race for the next version re-bases on the new latest and retries
# before it gives up (each loss means another writer published meanwhile, so the memory made progress).
MAX_REBASES = 10
# A reader that finds its version purged under it re-reads the new latest at most this many times.
REREAD_ATTEMPTS = 5
T = TypeVar("T")

__all__ = ["ConcurrentUpdateError", "MAX_REBASES", "REREAD_ATTEMPTS", "VERSIONS_DIR", "VersionPurgedError",
           "WriteConflictError", "checked_deletion_paths", "history", "is_purged", "latest_version", "list_versions",
           "publish_rebasing", "publish_version", "read_base_version", "read_manifest", "read_through_purges",
           "read_version", "reads_of_version", "version_name", "versioned_file_name", "write_manifest"]


class ConcurrentUpdateError(RuntimeError):
    """Another writer published the version this change wanted to publish; nothing of this change is live."""

    @classmethod
    def stale(cls, root: str, n: int, expected_parent: int | None, latest: int | None) -> ConcurrentUpdateError:
        """The error for version ``n`` of ``root``, computed from ``expected_parent`` while ``latest`` is live."""
        based = "an empty root" if expected_parent is None else f"version {expected_parent}"
        return cls(
            f"cannot publish version {n} ({version_name(n)}) of {root}: it was computed from {based}, but the "
            f"memory's latest version is now {latest} (another writer published meanwhile). Nothing of this "
            "change was published; re-run it against the latest version.")


class WriteConflictError(ConcurrentUpdateError):
    """A version published since this change's base conflicts with it (same ids, or a re-index rewrote the
    shards it relied on): re-basing cannot save it, and nothing of this change was published."""

    @classmethod
    def of(cls, root: str, *, what: str, base: int, winner: Manifest, clash: str) -> WriteConflictError:
        """The one-line error: ``what`` (computed on version ``base``) conflicts with ``winner`` because ``clash``."""
        kind = winner.change.get("kind", "unknown")
        return cls(f"{what} of {root} conflicts with version {winner.version} ({kind}), published after its base "
                   f"version {base}: {clash}. Nothing of this change was published; re-run it against the latest "
                   "version if it is still wanted.")


class VersionPurgedError(ManifestError):
    """The version a reader uses was purged (`vmem forget --purge-history`, a re-index's purge) and its files
    deleted while the reader still needed them: re-open the memory for its latest version."""

    @classmethod
    def of(cls, root: str, n: int, cause: BaseException) -> VersionPurgedError:
        """The error for version ``n`` of ``root``; ``cause`` is the failed read (its first line is quoted: a job's
        error carries the runner's traceback after it)."""
        lines = str(cause).strip().splitlines()
        return cls(f"version {n} of {root} was purged (by `vmem forget --purge-history` or a re-index) while it "
                   f"was in use, and its files were deleted ({lines[0] if lines else type(cause).__name__}); re-open the memory for its latest version, "
                   "or open a version that `vmem history` lists")


def is_purged(root: str, n: int) -> bool:
    """Whether version ``n`` of ``root`` existed but is gone (a memory without versions/ has only version 1)."""
    versions = list_versions(root)
    return bool(versions) and n not in versions


def read_through_purges(root: str, read: Callable[[Manifest], T], *, version: int | None = None) -> T:
    """``read(manifest)`` of the latest version (or the pinned ``version``), re-run on the new latest when a purge
    removes the version under it.

    A purge (`vmem forget --purge-history`, a re-index's) publishes a newer version, then deletes the old version
    files, then their data files: a reader that listed a version just before finds its files missing (any file:
    entry tables, indexes, tombstones, weights, router, metadata). When ``read`` fails and its version is no
    longer listed, an unpinned read starts again on the new latest (at most `REREAD_ATTEMPTS` times); a pinned one
    raises VersionPurgedError. Any other failure is ``read``'s own and is re-raised.
    """
    pinned = None if version is None else read_version(root, version)  # A purged one: "no version N; ...".
    for attempt in range(REREAD_ATTEMPTS):
        n = latest_version(root) if version is None else version
        try:
            return read(read_version(root, n) if pinned is None else pinned)
        except Exception as e:  # pylint: disable=broad-except  # Re-raised unless its version was purged.
            if not is_purged(root, n):
                raise
            if version is not None or attempt == REREAD_ATTEMPTS - 1:
                raise VersionPurgedError.of(root, n, e) from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def reads_of_version(root: str, n: int) -> Iterator[None]:
    """Reads of version ``n``'s files after it was opened: a file missing because a purge removed ``n`` raises
    VersionPurgedError (naming the file, and re-opening as the fix) instead of FileNotFoundError or a
    ManifestError."""
    try:
        yield
    except VersionPurgedError:
        raise
    except (FileNotFoundError, ManifestError) as e:
        if is_purged(root, n):
            raise VersionPurgedError.of(root, n, e) from None
        raise


def version_name(n: int) -> str:
    """``v000003.json`` for n = 3."""
    return f"v{n:06d}.json"


def version_path(root: str, n: int) -> str:
    return storage.join(root, VERSIONS_DIR, version_name(n))


def list_versions(root: str) -> list[int]:
    """Version numbers present under ``root/versions/``, ascending ([] for a memory without versions)."""
    try:
        names = storage.list_dir(storage.join(root, VERSIONS_DIR))
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_VERSION_RE.match, names) if m)


def checked_deletion_paths(root: str, rels, *, what: str) -> list[str]:
    """Full paths of the root-relative paths a purge (or clean-up) is about to delete, all checked first.

    The lists come from version files (``change.deleted_paths``) and plans, which anyone with write access to
    the memory can edit: a path must be a plain relative path (no leading ``/``, no ``..`` / ``.`` / empty
    segment, no ``scheme://``) below the memory root, not the root itself, not its history (``versions/``,
    ``manifest.json``), and, locally, must not resolve outside the root through a symbolic link. Every path is
    checked before the caller deletes any, so one bad entry deletes nothing.

    Args:
      root: Memory root, local or ``gs://``.
      rels: Root-relative paths (``/``-separated).
      what: Where the list comes from, for the message (e.g. "version 7's change.deleted_paths").

    Returns:
      ``storage.join(root, rel)`` for each path, in order.

    Raises:
      ManifestError: naming the first bad path, the memory and the rule it breaks; nothing was deleted.
    """
    out = []
    base = None if storage.is_gcs(root) else os.path.realpath(root)
    for rel in rels:
        problem = None
        parts = rel.split("/") if isinstance(rel, str) else []
        if not isinstance(rel, str) or not rel:
            problem = "is not a non-empty path"
        elif rel.startswith("/") or "\\" in rel or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
            problem = "is absolute (deleted paths are relative to the memory root)"
        elif any(p in ("", ".", "..") for p in parts):
            problem = "has an empty, '.' or '..' segment"
        elif parts[0] == VERSIONS_DIR or rel == MANIFEST_NAME:
            problem = "is the memory's version history, never deleted as data"
        elif base is not None:
            real = os.path.realpath(os.path.join(base, *parts))
            if not real.startswith(base + os.sep):
                problem = f"resolves to {real}, outside the memory root {base}"
        if problem:
            raise ManifestError(f"refusing to delete {rel!r} listed in {what} of {root}: it {problem}; nothing was "
                                "deleted. Fix or remove that entry (the version file was edited or is corrupt).")
        out.append(storage.join(root, rel))
    return out


def _has_legacy_manifest(root: str) -> bool:
    return storage.exists(manifest_path(root))


def latest_version(root: str) -> int:
    """The latest published version of the memory at ``root``.

    Raises:
      ManifestError: "not a visual memory" when there is neither a version nor a manifest.json.
    """
    versions = list_versions(root)
    if versions:
        return versions[-1]
    if _has_legacy_manifest(root):
        return 1
    raise ManifestError(f"not a visual memory: {manifest_path(root)} missing; build one with `vmem build ...` "
                        "(or memory.build.build_memory_local)")


def read_version(root: str, n: int) -> Manifest:
    """Reads and validates version ``n``.

    A memory built before versions existed (only manifest.json) has exactly one version, 1.

    Raises:
      ManifestError: naming the version and the available ones, when it does not exist (e.g. purged).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ManifestError(f"version must be an int >= 1, got {n!r}")
    versions = list_versions(root)
    if not versions:
        if n == 1:
            return read_manifest_file(manifest_path(root))
        if not _has_legacy_manifest(root):
            latest_version(root)  # Raises "not a visual memory".
        raise ManifestError(f"{root} has no version {n}; available: [1] (a memory built before versions)")
    if n not in versions:
        raise ManifestError(f"{root} has no version {n}; available: {_ranges(versions)} "
                            "(older versions may have been removed by `vmem forget --purge-history`)")
    manifest = read_manifest_file(version_path(root, n))
    if manifest.version != n:
        raise ManifestError(f"{version_path(root, n)} says it is version {manifest.version}, not {n}")
    return manifest


def read_manifest(root: str, *, version: int | None = None) -> Manifest:
    """Reads and validates the latest version of a memory (or the pinned ``version``).

    The latest version is the highest ``versions/vNNNNNN.json``; a memory built before versions existed has
    only ``manifest.json``, read as version 1.

    Raises:
      ManifestError: if there is no memory (with how to build one), no such version, or it is malformed.
    """
    return read_version(root, latest_version(root) if version is None else version)


def read_base_version(root: str, expected_version: int | None) -> tuple[int, Manifest]:
    """(n, version n) to compute a change on: the latest version, which must be ``expected_version`` if given.

    Raises:
      ConcurrentUpdateError: the latest version is not ``expected_version``; raised before the caller writes
        any file, since publishing on top of it would be refused anyway.
    """
    latest = latest_version(root)
    base = latest if expected_version is None else expected_version
    if base != latest:
        raise ConcurrentUpdateError.stale(root, base + 1, base, latest)
    return base, read_version(root, base)


def versioned_file_name(directory: str, version: int, suffix: str) -> str:
    """A new relative path ``DIRECTORY/vNNNNNN-TOKEN.SUFFIX`` for a file that version ``version`` references.

    The random token keeps two racing writers of the same version from overwriting each other's file (the
    loser's file is simply never referenced), so a published file is never overwritten.
    """
    return f"{directory}/v{version:06d}-{secrets.token_hex(4)}{suffix}"


def _ranges(versions: list[int]) -> str:
    if len(versions) <= 6:
        return str(versions)
    return f"[{versions[0]}, {versions[1]}, ..., {versions[-1]}] ({len(versions)} versions)"


def _check_compatible(parent: Manifest, child: Manifest) -> None:
    """Invariants between consecutive versions: same encoder/metric/dim, append-only class names."""
    if (child.encoder, child.dim, child.metric) != (parent.encoder, parent.dim, parent.metric):
        raise ManifestError(
            f"version {child.version} changes the encoder/dim/metric of version {parent.version} "
            f"({parent.encoder.get('name')!r}, {parent.dim}) -> ({child.encoder.get('name')!r}, {child.dim}); "
            "a memory keeps one encoder for life: build a new memory instead")
    old = tuple(parent.class_names)
    if tuple(child.class_names[:len(old)]) != old:
        raise ManifestError(
            f"version {child.version} reorders or drops class names of version {parent.version}; class names "
            "are append-only so stored label indices never change (use memory.store.mutations.extended_class_names)")


def publish_version(root: str, manifest: Manifest, *, expected_parent: int | None) -> Manifest:
    """Publishes ``manifest`` as version ``expected_parent + 1`` (1 when expected_parent is None).

    Call it last, after every file the manifest references is completely written (at paths no earlier
    version uses). Its ``version`` and ``parent`` are set here; ``change["at"]`` defaults to now.

    Args:
      root: Memory root, local or ``gs://``.
      manifest: The new version's content.
      expected_parent: The version this change was computed from (None: a new memory).

    Returns:
      The published manifest (with version, parent and change filled in).

    Raises:
      ConcurrentUpdateError: another writer already published that version (or the memory is no longer at
        ``expected_parent``); this change was not published and must be re-run against the latest version.
      ManifestError: the manifest is invalid, or breaks an invariant with its parent (encoder, class order).
    """
    if expected_parent is not None and (isinstance(expected_parent, bool) or not isinstance(expected_parent, int)
                                        or expected_parent < 1):
        raise ValueError(f"expected_parent must be None or an int >= 1, got {expected_parent!r}")
    n = 1 if expected_parent is None else expected_parent + 1
    change = dict(manifest.change)
    if change:
        change.setdefault("at", utc_now_iso())
    manifest = dataclasses.replace(manifest, version=n, parent=expected_parent, change=change)
    manifest.validate()
    versions = list_versions(root)
    current = versions[-1] if versions else (1 if _has_legacy_manifest(root) else None)
    if current != expected_parent:
        raise ConcurrentUpdateError.stale(root, n, expected_parent, current)
    if expected_parent is not None:
        parent = read_version(root, expected_parent)
        _check_compatible(parent, manifest)
        if not versions:
            # A memory built before versions: materialise its manifest.json as v000001 first, since
            # manifest.json is about to be replaced by the copy of version 2.
            storage.create_exclusive(version_path(root, 1), parent.to_json().encode("utf-8"),
                                     content_type=_JSON)
    if not storage.create_exclusive(version_path(root, n), manifest.to_json().encode("utf-8"), content_type=_JSON):
        raise ConcurrentUpdateError.stale(root, n, expected_parent, max(list_versions(root), default=None))
    _refresh_manifest_copy(root, n, manifest)
    return manifest


def publish_rebasing(root: str, manifest: Manifest, *, base: int,
                     rebase: Callable[[Manifest], Manifest] | None) -> Manifest:
    """Publishes ``manifest`` (computed on version ``base``); if another writer wins, re-bases and retries.

    Args:
      root: Memory root.
      manifest: The change computed on version ``base``.
      base: The version it was computed on.
      rebase: Given the new latest version L, returns this change recomputed on L, or raises
        `WriteConflictError` when the versions published since ``base`` conflict with it. None: never
        re-base (the caller pinned ``base``, e.g. ``--expected-version``).

    Returns:
      The published manifest (its parent is the version it was finally computed on).

    Raises:
      WriteConflictError: a true conflict (from ``rebase``).
      ConcurrentUpdateError: ``rebase`` is None and another writer won, or it lost `MAX_REBASES` re-bases in a
        row.
    """
    for attempt in range(MAX_REBASES + 1):
        try:
            return publish_version(root, manifest, expected_parent=base)
        except WriteConflictError:
            raise
        except ConcurrentUpdateError as lost:
            if rebase is None:
                raise
            if attempt == MAX_REBASES:
                raise ConcurrentUpdateError(f"{lost} (gave up after re-basing {MAX_REBASES} times: other writers "
                                            "keep publishing)") from None
        base, latest = _read_latest(root)
        manifest = rebase(latest)
    raise AssertionError("unreachable")


def _read_latest(root: str) -> tuple[int, Manifest]:
    """(n, version n) of the latest version; re-lists when a purge removed it between listing and reading."""
    for _ in range(MAX_REBASES):
        n = latest_version(root)
        try:
            return n, read_version(root, n)
        except ManifestError:
            if latest_version(root) == n:
                raise
    n = latest_version(root)
    return n, read_version(root, n)


def write_manifest(root: str, manifest: Manifest) -> None:
    """Publishes a freshly built memory as version 1; call it last, after every shard is written.

    Creates ``<root>/versions/v000001.json`` exclusively (see `publish_version`) and then
    ``<root>/manifest.json``. A root that already holds versions is refused with ConcurrentUpdateError:
    a rebuild must start from an empty root (``vmem build --overwrite`` deletes it first).
    """
    manifest.validate()
    publish_version(root, dataclasses.replace(manifest, version=1, parent=None), expected_parent=None)


def _refresh_manifest_copy(root: str, n: int, manifest: Manifest) -> None:
    """Best effort: manifest.json mirrors the latest version (readers never trust it over versions/)."""
    storage.write_text(manifest_path(root), manifest.to_json())
    latest = max(list_versions(root), default=n)
    if latest != n:  # A faster writer published after us: mirror theirs instead of ours.
        storage.write_text(manifest_path(root), read_version(root, latest).to_json())


def change_of(manifest: Manifest) -> dict[str, Any]:
    """The manifest's change, with a build change derived for manifests written before versions existed."""
    if manifest.change:
        return dict(manifest.change)
    return {"kind": "build", "at": manifest.created_at,
            "summary": f"built {manifest.physical_total} entries in {len(manifest.shards)} shards"}


def history(root: str) -> list[dict[str, Any]]:
    """One record per existing version, oldest first.

    Returns:
      ``[{"version", "parent", "kind", "at", "summary", "entries" (live entries), "change" (full)}, ...]``.
      Versions removed by purge_history are absent; the purge version's change lists them.
    """
    versions = list_versions(root) or [latest_version(root)]
    out = []
    for n in versions:
        m = read_version(root, n)
        change = change_of(m)
        out.append({"version": n, "parent": m.parent, "kind": change.get("kind"), "at": change.get("at"),
                    "summary": change.get("summary", ""), "entries": m.total, "change": change})
    return out

