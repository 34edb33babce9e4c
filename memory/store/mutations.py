"""A living memory: add entries, forget them exactly, weight them (soft pruning), purge old history.

Every mutation reads one version, writes its new files at fresh paths, and publishes the next version
exclusively (memory.store.versions.publish_version). A mutation that loses that race to another writer
re-bases on the new latest version and publishes after it (versions.publish_rebasing), unless the winner's
change conflicts with it (the same ids; a re-index under an add; two changes of the entry weights): then it
fails with WriteConflictError, publishes nothing and deletes the files it wrote. A mutation pinned to
``expected_version`` never re-bases. No index is rebuilt here:

* **forget** writes a new cumulative tombstone file (``tombstones/vNNNNNN-<token>.npy``: every forgotten id
  still physically present in a main or delta shard) and publishes. Searches skip tombstoned rows exactly
  (memory.visual_memory, memory.search.shard_search). The embeddings stay in the shard files until a re-index
  rewrites those shards without them and `purge_history` deletes the old files.
* **add** writes brute-force *delta shards* (``deltas/<version_tag>/delta-00000-of-0000N/``, the same
  layout as a shard) and publishes them next to the main shards; a re-index later folds them in.
* **entry weights** (soft pruning) are a ``weights/vNNNNNN-<token>.npz`` file of (ids, weights).

Ids are the unit of identity: an id is *live* when it is in some main or delta shard of the version and not
in its tombstones. A forgotten id cannot be re-added until a re-index removed it physically (tombstones are
by id, so they would hide the new entry too).
"""

from __future__ import annotations

import dataclasses
import io
import re
import secrets
from typing import Any, Iterable, Sequence

import numpy as np

from memory import storage
from memory.index.shard_index import IndexConfig, IndexKind
from memory.regions.layout import region_grid, whole_image_ids
from memory.store.manifest import (ForgottenSet, Manifest, ManifestError, ShardInfo, WeightsRef, read_checked_file,
                             sha256_checksum)
from memory.store.shard import ShardData, write_shard
from memory.store.references import referenced_paths
from memory.vectors import l2_normalize
from memory.store.versions import (WriteConflictError, latest_version, list_versions, publish_rebasing,
                                   read_base_version, read_version, versioned_file_name)

TOMBSTONES_DIR = "tombstones"
WEIGHTS_DIR = "weights"
DELTAS_DIR = "deltas"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Ids listed in an error message: enough to act on, bounded for a 1M-id mistake.
_MAX_LISTED = 50

__all__ = ["DuplicateIdError", "add_entries_local", "add_manifest", "check_unique_live", "clear_entry_weights",
           "extended_class_names", "forget", "in_sorted", "live_ids", "publish_add", "publish_entry_weights",
           "read_entry_weights", "read_forgotten", "rebase_add", "row_weights", "str_array",
           "write_delta_shard"]


class DuplicateIdError(ValueError):
    """Entries to add carry ids that are already in the memory (live, or forgotten but not yet re-indexed)."""


def str_array(values: Iterable[Any]) -> np.ndarray:
    """The values as a 1-D unicode array (ids, labels, uris, metadata values); ``<U1`` when empty."""
    arr = np.asarray([str(v) for v in values], dtype=str)
    return arr if arr.size else np.zeros((0,), dtype="<U1")


def _listed(values: np.ndarray | Sequence[str]) -> str:
    values = [str(v) for v in values]
    more = f" ... and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
    return f"{values[:_MAX_LISTED]}{more}"


def _read_npy(root: str, rel: str) -> tuple[np.ndarray, bytes]:
    data = storage.read_bytes(storage.join(root, rel))
    try:
        return np.load(io.BytesIO(data), allow_pickle=False), data
    except ValueError as e:
        raise ManifestError(f"cannot read {storage.join(root, rel)}: {e}") from None


def read_forgotten(root: str, manifest: Manifest) -> np.ndarray:
    """The sorted unicode array of the version's tombstoned ids (empty when nothing is forgotten).

    Raises:
      ManifestError: the tombstone file is missing, corrupt (checksum) or disagrees with the manifest.
    """
    ref = manifest.forgotten
    if ref is None:
        return np.zeros((0,), dtype="<U1")
    try:
        ids, blob = _read_npy(root, ref.path)
    except FileNotFoundError:
        raise ManifestError(f"version {manifest.version}: tombstone file {storage.join(root, ref.path)} missing") from None
    if sha256_checksum(blob) != ref.checksum or ids.shape != (ref.count,) or (ids.size and ids.dtype.kind != "U"):
        raise ManifestError(f"version {manifest.version}: tombstone file {storage.join(root, ref.path)} does not "
                            f"match the manifest (checksum or count {ref.count}); the file was modified")
    return ids.astype(str) if ids.size else np.zeros((0,), dtype="<U1")


def read_entry_weights(root: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """(sorted ids, float32 weights) of the version's soft-pruning weights, or None."""
    ref = manifest.entry_weights
    if ref is None:
        return None
    blob = read_checked_file(root, manifest, ref.path, ref.checksum, "weights file")
    path = storage.join(root, ref.path)
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        ids, weights = z["ids"].astype(str), z["weights"].astype(np.float32)
    if ids.shape != (ref.count,) or weights.shape != (ref.count,):
        raise ManifestError(f"version {manifest.version}: weights file {path} holds {ids.shape[0]} ids, manifest "
                            f"says {ref.count}")
    return ids, weights


def row_weights(entry_weights: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """float32 [len(ids)] weight of each id under `read_entry_weights`'s (sorted ids, weights); 1.0 if unlisted."""
    w_ids, w = entry_weights
    ids = np.asarray(ids, dtype=str)
    out = np.ones(ids.shape, dtype=np.float32)
    if w_ids.size and ids.size:
        pos = np.clip(np.searchsorted(w_ids, ids), 0, w_ids.size - 1)
        hit = w_ids[pos] == ids
        out[hit] = np.asarray(w, dtype=np.float32)[pos[hit]]
    return out


def _column(root: str, info: ShardInfo, name: str, verify: bool = True) -> np.ndarray:
    """One per-row column ("ids", "labels" or "uris") of a shard, without reading its embeddings; the file read
    is checked against the manifest unless ``verify`` is False (memory.store.integrity)."""
    from memory.store.shard import read_shard_entries, read_shard_ids  # pylint: disable=g-import-not-at-top  # Cycle.

    shard_dir = storage.join(root, info.path)
    arr = (read_shard_ids(shard_dir, info, verify=verify) if name == "ids"
           else getattr(read_shard_entries(shard_dir, info, verify=verify), name))
    if arr.shape[:1] != (info.count,):
        raise ManifestError(f"shard {info.name}: {name} holds {arr.shape[0]} rows, manifest says {info.count}")
    return arr


def _columns(root: str, infos: Sequence[ShardInfo], names: Sequence[str], verify: bool = True
             ) -> dict[str, np.ndarray]:
    """Concatenated per-row columns of the shards ``infos`` (e.g. a manifest's ``all_shards``: physical rows,
    forgotten included)."""
    out = {}
    for name in names:
        parts = [_column(root, info, name, verify) for info in infos if info.count]
        empty = np.zeros((0,), dtype=np.int32 if name == "labels" else "<U1")
        out[name] = np.concatenate(parts) if parts else empty
    return out


def in_sorted(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """bool mask of ``queries``' shape: which queries occur in the ascending ``sorted_values``.

    A binary search per query: np.isin sorts both arrays, far slower for a few queries against many ids.
    """
    if not sorted_values.size or not queries.size:
        return np.zeros(queries.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_values, queries), sorted_values.size - 1)
    return sorted_values[pos] == queries


def _present(root: str, manifest: Manifest, queries: np.ndarray, verify: bool = True) -> np.ndarray:
    """bool mask: which query ids are stored in some main or delta shard (rows are sorted by id per shard)."""
    found = np.zeros(queries.shape, dtype=bool)
    for info in manifest.all_shards:
        if info.count:
            found |= in_sorted(_column(root, info, "ids", verify), queries)
    return found


def live_ids(root: str, *, version: int | None = None, verify: bool = True) -> np.ndarray:
    """Sorted ids of the live entries of a version (default: the latest); ``verify``: check the id files read
    against the manifest (memory.store.integrity)."""
    m = read_version(root, latest_version(root) if version is None else version)
    ids = _columns(root, m.all_shards, ["ids"], verify)["ids"]
    return np.sort(ids[~np.isin(ids, read_forgotten(root, m))])


def check_unique_live(root: str, version: int, ids: np.ndarray, *, what: str, verify: bool = True) -> None:
    """Refuses per-entry values (weights, metadata) for duplicate ids or ids not live in ``version`` (``verify``:
    as `live_ids`).

    Raises:
      ValueError: listing the duplicates. KeyError: listing the ids that are not live.
    """
    uniq, n_of = np.unique(ids, return_counts=True)
    if (n_of > 1).any():
        raise ValueError(f"duplicate ids in {what}: {_listed(uniq[n_of > 1])}")
    unknown = ids[~np.isin(ids, live_ids(root, version=version, verify=verify))]
    if unknown.size:
        raise KeyError(f"{unknown.size} id(s) not live in version {version}: {_listed(unknown)}; nothing was "
                       "published")


def forget(root: str, *, ids: Iterable[str] | None = None, label: str | None = None,
           source_prefix: str | None = None, expected_version: int | None = None,
           request_purge: bool = False, verify: bool = True) -> Manifest:
    """Forgets entries exactly: from the published version on, no search returns them.

    The selections given (any of ids, label, source_prefix) are united. Only a tombstone file and a version
    file are written; no index is rebuilt.

    Args:
      root: Memory root, local or ``gs://``.
      ids: Entry ids; every one must be live.
      label: A class name; all its live entries are forgotten.
      source_prefix: All live entries whose source uri starts with this string.
      expected_version: The version the caller looked at (default: the latest now).
      request_purge: Record in the change that the next re-index must also purge old versions and files.
      verify: Check the shard files read (ids, labels, uris) against the manifest (memory.store.integrity);
        False accepts the risk of selecting from altered files.

    Returns:
      The published manifest; ``change`` holds ``forgotten`` (this call) and ``forgotten_total``.

    Raises:
      KeyError: listing unknown or already-forgotten ids, or naming an unknown label / a selection that
        matches no live entry. Nothing is published.
      ConcurrentUpdateError: the memory moved past ``expected_version``, or a concurrent writer won while
        ``expected_version`` was given (without it the forget re-bases on the winner's version).
      WriteConflictError: a concurrent writer forgot one of the same ids first.
      ValueError: no selection given.
    """
    if ids is None and label is None and source_prefix is None:
        raise ValueError("forget needs a selection: ids=[...], label='name' and/or source_prefix='gs://...'")
    base, m = read_base_version(root, expected_version)
    gone = read_forgotten(root, m)
    selected, selection = [], {}
    if ids is not None:
        req = np.unique(str_array(ids))
        if not req.size:
            raise ValueError("forget(ids=...) got an empty id list; pass at least one id")
        # A region memory forgets whole images: an image id stands for its global and all its region entries.
        req = whole_image_ids(req, region_grid(m))
        forgotten_already = in_sorted(gone, req)
        unknown = req[forgotten_already | ~_present(root, m, req, verify)]
        if unknown.size:
            already = unknown[in_sorted(gone, unknown)]
            note = f" ({len(already)} of them already forgotten: {_listed(already)})" if already.size else ""
            raise KeyError(f"{len(unknown)} unknown id(s), not live in version {base} of {root}: "
                           f"{_listed(unknown)}{note}; nothing was forgotten")
        selected.append(req)
        selection["ids"] = int(req.size)
    names = ["ids"] + (["labels"] if label is not None else []) + (["uris"] if source_prefix is not None else [])
    cols = _columns(root, m.all_shards, names, verify) if len(names) > 1 else {}
    phys = cols.get("ids")
    if label is not None:
        if label not in m.class_names:
            raise KeyError(f"unknown label {label!r}; this memory's classes: {_listed(m.class_names)}; nothing was "
                           "forgotten")
        rows = cols["labels"] == m.class_names.index(label)
        rows[rows] = ~in_sorted(gone, phys[rows])
        if not rows.any():
            raise KeyError(f"label {label!r} has no live entries in version {base}; nothing was forgotten")
        selected.append(phys[rows])
        selection["label"] = label
    if source_prefix is not None:
        if not source_prefix:
            raise ValueError("source_prefix must be a non-empty string (an empty prefix would forget everything)")
        rows = np.char.startswith(cols["uris"], source_prefix)
        rows[rows] = ~in_sorted(gone, phys[rows])
        if not rows.any():
            raise KeyError(f"no live entry's source uri starts with {source_prefix!r} in version {base}; nothing "
                           "was forgotten")
        selected.append(phys[rows])
        selection["source_prefix"] = source_prefix
    new = np.unique(np.concatenate(selected))
    what = ", ".join(f"{k}={v!r}" if k != "ids" else f"{v} id(s)" for k, v in selection.items())
    written: list[str] = []

    def on(n: int, latest: Manifest, gone_now: np.ndarray) -> Manifest:
        """The forget of ``new`` computed on version ``n`` (its tombstones ``gone_now``): a new tombstone file."""
        tombstones = np.union1d(gone_now, new).astype(str)
        rel = versioned_file_name(TOMBSTONES_DIR, n + 1, ".npy")
        buf = io.BytesIO()
        np.save(buf, tombstones, allow_pickle=False)
        blob = buf.getvalue()
        storage.write_bytes(storage.join(root, rel), blob)
        written.append(rel)
        change = {"kind": "forget", "summary": f"forgot {new.size} entries ({what})", "forgotten": int(new.size),
                  "forgotten_total": int(tombstones.size), "selection": selection}
        if request_purge:
            change["purge_requested"] = True
        return dataclasses.replace(latest, forgotten=ForgottenSet(path=rel, count=int(tombstones.size),
                                                                  checksum=sha256_checksum(blob)), change=change)

    def rebase(latest: Manifest) -> Manifest:
        # The ids this forget selected on its base must all still be live: a winner that forgot one of them
        # is a true conflict (an add or a re-index never removes a live id).
        gone_now = read_forgotten(root, latest)
        clash = new[in_sorted(gone_now, new) | ~_present(root, latest, new)]
        if clash.size:
            raise WriteConflictError.of(root, what=f"forget of {new.size} entries ({what})", base=base, winner=latest,
                                        clash=f"{clash.size} of the same id(s) are no longer live: {_listed(clash)}")
        _remove_files(root, written)
        return on(latest.version, latest, gone_now)

    try:
        return publish_rebasing(root, on(base, m, gone), base=base,
                                rebase=rebase if expected_version is None else None)
    except BaseException:
        _remove_unpublished(root, written[-1:], since=base)  # Earlier ones were removed by `rebase`.
        raise


def _remove_files(root: str, rels: Sequence[str]) -> None:
    """Best effort: deletes files of this writer that no version references (never hides the real error)."""
    for rel in rels:
        try:
            storage.remove_tree(storage.join(root, rel))
        except Exception:  # pylint: disable=broad-except
            pass


def _remove_unpublished(root: str, rels: Sequence[str], *, since: int) -> None:
    """After a failed writer: deletes its files unless a version after ``since`` references them (a publish
    that succeeded before a later step failed)."""
    try:
        referenced = set().union(*(referenced_paths(read_version(root, n)) for n in list_versions(root) if n > since))
    except Exception:  # pylint: disable=broad-except  # Unsure what is referenced: keep the files.
        return
    _remove_files(root, [rel for rel in rels
                         if rel not in referenced and not any(p.startswith(rel + "/") for p in referenced)])


def extended_class_names(old: Sequence[str], new_labels: Iterable[str]) -> tuple[str, ...]:
    """Class names after adding entries labelled ``new_labels``: ``old`` then unseen names, sorted.

    Append-only, so every stored label index keeps its meaning.
    """
    old = tuple(old)
    known = set(old)
    return old + tuple(sorted({str(x) for x in new_labels} - known))


def write_delta_shard(root: str, data: ShardData, *, version_tag: str, index: int, count: int) -> ShardInfo:
    """Writes one delta shard (brute-force ScaNN index) to ``deltas/<version_tag>/delta-IIIII-of-CCCCC``.

    Args:
      root: Memory root.
      data: Entries; labels are indices into the class names the add will publish (extended_class_names).
      version_tag: A directory name unique to this add (e.g. ``v000007-<job id>``): never reuse a tag of a
        published version, whose files must not change.
      index: This delta shard's index in [0, count).
      count: Number of delta shards this add writes.

    Returns:
      The ShardInfo to pass to publish_add.
    """
    if not isinstance(version_tag, str) or not _TAG_RE.match(version_tag):
        raise ValueError(f"version_tag {version_tag!r} must be a non-empty name of letters, digits, '.', '_', '-'")
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        raise ValueError(f"delta shard index {index!r} out of range for count {count!r} (allowed 0..count-1)")
    leaf = f"delta-{index:05d}-of-{count:05d}"
    rel = f"{DELTAS_DIR}/{version_tag}/{leaf}"
    return write_shard(storage.join(root, rel), data, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       name=f"{DELTAS_DIR}-{version_tag}-{leaf}", root_relative_path=rel)


def add_manifest(base: Manifest, *, delta_infos: Sequence[ShardInfo], new_class_names: Sequence[str],
                 counts: dict, job: str | None = None) -> Manifest:
    """The add's next version computed on ``base``: its delta shards appended, unseen class names appended.

    Args:
      base: The version the add is published on.
      delta_infos: The add's delta shards (written by write_delta_shard).
      new_class_names: Labels of the added entries (names).
      counts: The add's record counts, stored in the change.
      job: The add job's id, stored in the change (a retried publish step recognises its version by it).
    """
    class_names = extended_class_names(base.class_names, new_class_names)
    new_classes = list(class_names[len(base.class_names):])
    added = sum(info.count for info in delta_infos)
    change = {"kind": "add", "summary": f"added {added} entries in {len(delta_infos)} delta shard(s)"
                                        + (f", new classes {new_classes}" if new_classes else ""),
              "added": added, "new_classes": new_classes, "counts": dict(counts)}
    if job is not None:
        change["job"] = job
    return dataclasses.replace(base, class_names=class_names, change=change,
                               delta_shards=tuple(base.delta_shards) + tuple(delta_infos))


def rebase_add(root: str, base: Manifest, latest: Manifest, *, delta_infos: Sequence[ShardInfo],
               new_class_names: Sequence[str], counts: dict, job: str | None = None) -> Manifest:
    """An add computed on ``base`` recomputed on the newer ``latest`` (`add_manifest`), unless they conflict.

    Not a conflict: versions that forgot, weighted or purged, or added other ids. A conflict: an add of one of
    the same ids; a re-index (its shards replaced those the add's ids were checked against); new class names
    on both sides (the delta shards' label indices assume the base's class list).

    Raises:
      WriteConflictError: naming the winning version and the clash.
      ManifestError: a delta shard of this add was deleted while it waited (nothing is published).
    """
    infos = tuple(delta_infos)
    ours = _columns(root, infos, ["ids"])["ids"]
    what = f"add of {ours.size} entries"

    def conflict(clash: str) -> WriteConflictError:
        return WriteConflictError.of(root, what=what, base=base.version, winner=latest, clash=clash)

    n_old = len(base.delta_shards)
    if tuple(latest.shards) != tuple(base.shards) or tuple(latest.delta_shards[:n_old]) != tuple(base.delta_shards):
        raise conflict("a re-index replaced the shards this add's ids were checked against")
    before = extended_class_names(base.class_names, new_class_names)
    if extended_class_names(latest.class_names, new_class_names)[:len(before)] != before:
        raise conflict(f"both added new class names ({list(latest.class_names[len(base.class_names):])} and "
                       f"{list(before[len(base.class_names):])}), and this add's delta shards number its labels "
                       "after the base's class list")
    clash = np.intersect1d(ours, _columns(root, latest.delta_shards[n_old:], ["ids"])["ids"])
    if clash.size:
        raise conflict(f"{clash.size} of the same id(s) were added by both: {_listed(clash)}")
    missing = [info.path for info in infos if not storage.exists(storage.join(root, info.path))]
    if missing:
        raise ManifestError(f"{what} of {root}: its delta shard(s) {missing} were deleted while it re-based (a "
                            "clean-up ran with too short a grace period); nothing was published, re-run the add")
    return add_manifest(latest, delta_infos=infos, new_class_names=new_class_names, counts=counts, job=job)


def publish_add(root: str, *, delta_infos: Sequence[ShardInfo], new_class_names: Sequence[str],
                expected_version: int | None, counts: dict | None = None, verify: bool = True) -> Manifest:
    """Publishes delta shards written by write_delta_shard as the next version.

    If another writer publishes first, the add re-bases on the new latest version (`rebase_add`) and retries,
    up to versions.MAX_REBASES times.

    Args:
      root: Memory root.
      delta_infos: The new delta shards (all fully written).
      new_class_names: Labels of the added entries (names; known ones are fine, unseen ones are appended).
      expected_version: The version the add was computed from (its class names were used for the labels;
        default: the latest now).
      counts: The add job's record counts (e.g. read / embedded / failed), stored in the change.
      verify: Check the shard files read (the memory's ids, the delta shards' ids and labels) against the
        manifest (memory.store.integrity).

    Returns:
      The published manifest.

    Raises:
      DuplicateIdError: listing ids already in the memory (live, forgotten-but-present, or twice in the add).
      ManifestError: a delta shard's files disagree with its ShardInfo or hold labels beyond the class names.
      WriteConflictError: a version published meanwhile conflicts with this add (see `rebase_add`).
    """
    base = latest_version(root) if expected_version is None else expected_version
    m = read_version(root, base)
    class_names = extended_class_names(m.class_names, new_class_names)
    infos = tuple(delta_infos)
    for info in infos:
        if not isinstance(info, ShardInfo):
            raise TypeError(f"delta_infos must be ShardInfo (from write_delta_shard), got {info!r}")
        if not info.count:
            continue
        labels = _column(root, info, "labels", verify)
        if labels.size and int(labels.max()) >= len(class_names):
            raise ManifestError(f"delta shard {info.name}: label {int(labels.max())} outside the {len(class_names)} "
                                "class names; map labels with extended_class_names(old, new_labels)")
    new_ids = _columns(root, infos, ["ids"], verify)["ids"]
    uniq, n_of = np.unique(new_ids, return_counts=True)
    if (n_of > 1).any():
        raise DuplicateIdError(f"ids added twice in this add: {_listed(uniq[n_of > 1])}; nothing was published")
    phys = _columns(root, m.all_shards, ["ids"], verify)["ids"]
    gone = read_forgotten(root, m)
    clash = new_ids[np.isin(new_ids, phys)]
    if clash.size:
        forgotten = clash[np.isin(clash, gone)]
        live = np.setdiff1d(clash, forgotten)
        parts = []
        if live.size:
            parts.append(f"{live.size} id(s) already live in version {base}: {_listed(live)} (forget them first "
                         "to replace them)")
        if forgotten.size:
            parts.append(f"{forgotten.size} forgotten id(s) still physically present until `vmem reindex`: "
                         f"{_listed(forgotten)} (re-index first, or add them under new ids)")
        raise DuplicateIdError("; ".join(parts) + "; nothing was published")
    counts = dict(counts or {})
    return publish_rebasing(root, add_manifest(m, delta_infos=infos, new_class_names=new_class_names, counts=counts),
                            base=base, rebase=lambda latest: rebase_add(root, m, latest, delta_infos=infos,
                                                                        new_class_names=new_class_names,
                                                                        counts=counts))


def add_entries_local(root: str, *, ids: Sequence[str], labels: Sequence[str], uris: Sequence[str],
                      embeddings: np.ndarray, expected_version: int | None = None) -> Manifest:
    """Adds entries without Beam (notebooks, tests): one delta shard, then publish_add.

    Args:
      root: Memory root.
      ids: New unique ids.
      labels: Class name of each entry (new names become new classes).
      uris: Source uri of each entry.
      embeddings: [n, dim] embeddings of the memory's encoder (L2-normalised here).
      expected_version: See publish_add (default: the latest now).
    """
    base, m = read_base_version(root, expected_version)
    ids_arr, label_arr, uris_arr = str_array(ids), str_array(labels), str_array(uris)
    emb = np.asarray(embeddings)
    n = ids_arr.shape[0]
    if n == 0:
        raise ValueError("add_entries_local needs at least one entry")
    if emb.ndim != 2 or emb.shape != (n, m.dim) or label_arr.shape != (n,) or uris_arr.shape != (n,):
        raise ValueError(f"inconsistent inputs: {n} ids, {label_arr.shape[0]} labels, {uris_arr.shape[0]} uris, "
                         f"embeddings {emb.shape}; expected n of each and [n, {m.dim}] embeddings")
    class_names = extended_class_names(m.class_names, label_arr.tolist())
    index_of = {c: i for i, c in enumerate(class_names)}
    data = ShardData(ids=ids_arr, labels=np.asarray([index_of[x] for x in label_arr.tolist()], np.int32),
                     uris=uris_arr, embeddings=l2_normalize(emb))
    tag = f"v{base + 1:06d}-{secrets.token_hex(4)}"
    info = write_delta_shard(root, data, version_tag=tag, index=0, count=1)
    try:
        return publish_add(root, delta_infos=[info], new_class_names=label_arr.tolist(), expected_version=base,
                           counts={"added": n})
    except BaseException:
        _remove_unpublished(root, [f"{DELTAS_DIR}/{tag}"], since=base)
        raise


def publish_entry_weights(root: str, *, ids: Sequence[str], weights: np.ndarray, params: dict,
                          expected_version: int | None = None, kind: str = "soft_pruning",
                          note: str = "", verify: bool = True) -> Manifest:
    """Publishes per-entry voting weights (soft pruning) as the next version; replaces any previous weights.

    Args:
      root: Memory root.
      ids: Live entry ids (entries not listed weigh 1.0).
      weights: float [len(ids)] finite, >= 0 (e.g. gamma = 1.75 / (1 + v)).
      params: JSON-serialisable parameters that produced the weights.
      expected_version: The version the weights were computed on (default: the latest now).
      kind: WeightsRef.kind.
      note: A person's note on the change, recorded in it and shown by ``vmem history``.
      verify: Check the shard id files read against the manifest (memory.store.integrity).

    Raises:
      KeyError: listing ids that are not live. ValueError: bad weights. ConcurrentUpdateError.
    """
    base, m = read_base_version(root, expected_version)
    ids_arr = str_array(ids)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != ids_arr.shape:
        raise ValueError(f"weights shape {w.shape} != ids shape {ids_arr.shape}; one weight per id")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    check_unique_live(root, base, ids_arr, what="weights", verify=verify)
    order = np.argsort(ids_arr, kind="stable")
    buf = io.BytesIO()
    np.savez(buf, ids=ids_arr[order], weights=w[order].astype(np.float32))
    blob = buf.getvalue()
    rel = versioned_file_name(WEIGHTS_DIR, base + 1, ".npz")
    storage.write_bytes(storage.join(root, rel), blob)
    ref = WeightsRef(path=rel, count=int(ids_arr.size), checksum=sha256_checksum(blob), kind=kind, params=dict(params))
    down = int((w < 1).sum())
    change = {"kind": "prune", "summary": f"entry weights ({kind}) for {ids_arr.size} entries, {down} below 1",
              "weighted": int(ids_arr.size), "weights_below_1": down, "params": dict(params)}
    if note:
        change.update(note=note, summary=f"{change['summary']}; note: {note}")

    def rebase(latest: Manifest) -> Manifest:
        _check_weights_rebase(root, m, latest, what=f"entry weights for {ids_arr.size} entries")
        gone = ids_arr[in_sorted(read_forgotten(root, latest), ids_arr) | ~_present(root, latest, ids_arr)]
        if gone.size:
            raise WriteConflictError.of(root, what=f"entry weights for {ids_arr.size} entries", base=base,
                                        winner=latest, clash=f"{gone.size} weighted id(s) were forgotten: "
                                                             f"{_listed(gone)}")
        if not storage.exists(storage.join(root, rel)):
            raise ManifestError(f"{storage.join(root, rel)} was deleted while the weights re-based (a clean-up with "
                                "too short a grace period); nothing was published, publish them again")
        return dataclasses.replace(latest, entry_weights=ref, change=change)

    try:
        return publish_rebasing(root, dataclasses.replace(m, entry_weights=ref, change=change), base=base,
                                rebase=rebase if expected_version is None else None)
    except BaseException:
        _remove_unpublished(root, [rel], since=base)
        raise


def _check_weights_rebase(root: str, base: Manifest, latest: Manifest, *, what: str) -> None:
    """Two changes of the entry weights, or a re-index (which rewrites them), conflict with each other."""
    if latest.entry_weights != base.entry_weights:
        raise WriteConflictError.of(root, what=what, base=base.version, winner=latest,
                                    clash="it changed the entry weights too")


def clear_entry_weights(root: str, *, expected_version: int | None = None) -> Manifest:
    """Publishes the next version without entry weights (every entry weighs 1.0 again)."""
    base, m = read_base_version(root, expected_version)
    if m.entry_weights is None:
        raise ValueError(f"version {base} of {root} has no entry weights to clear")
    change = {"kind": "prune", "summary": "cleared entry weights", "weighted": 0}

    def rebase(latest: Manifest) -> Manifest:
        _check_weights_rebase(root, m, latest, what="clearing the entry weights")
        return dataclasses.replace(latest, entry_weights=None, change=change)

    return publish_rebasing(root, dataclasses.replace(m, entry_weights=None, change=change), base=base,
                            rebase=rebase if expected_version is None else None)
