"""The re-index job's last step: publish version n+1 from the plan and the rebuilt shards, then clean up.

`assemble_manifest` checks the books and builds the new version (no delta shards, no tombstones, the entry
weights and metadata minus forgotten ids); `publish` publishes it once (a retried step recognises its own
version), purges the history when a forget asked for it and `remove_orphans` deletes what crashed or
superseded runs left behind (and memory.store.purge.remove_leftovers what other failed writers left).
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np

from memory import storage
from memory.store import compaction
from memory.store.after_publish import after_publish
from memory.store.integrity import with_file_records
from memory.store.manifest import Manifest, ManifestError, ShardInfo, WeightsRef, sha256_checksum
from memory.store.metadata import metadata_without
from memory.store.mutations import WEIGHTS_DIR, in_sorted, read_entry_weights, read_forgotten
from memory.store.purge import purge_history, remove_leftovers
from memory.store.versions import versioned_file_name
from memory.store.versions import (ConcurrentUpdateError, WriteConflictError, checked_deletion_paths, latest_version,
                                   list_versions, publish_version, read_version)
from pipelines.reindex.plan import ReindexError, ReindexJob, published_by
from pipelines.stages.write import SPILL_DIR

_LOG = logging.getLogger("visual_memory")

__all__ = ["assemble_manifest", "conflict_error", "publish", "remove_orphans"]


def _weights_without(root: str, manifest: Manifest, forgotten: np.ndarray, new_version: int) -> WeightsRef | None:
    """The entry weights minus forgotten ids: the same ref if none was weighted, else a new weights file."""
    ref = manifest.entry_weights
    loaded = read_entry_weights(root, manifest)
    if ref is None or loaded is None:
        return None
    ids, weights = loaded
    keep = ~in_sorted(forgotten, ids)
    if keep.all():
        return ref
    if not keep.any():
        return None
    buf = io.BytesIO()
    np.savez(buf, ids=ids[keep], weights=weights[keep].astype(np.float32))
    blob = buf.getvalue()
    rel = versioned_file_name(WEIGHTS_DIR, new_version, ".npz")
    storage.write_bytes(storage.join(root, rel), blob)
    return dataclasses.replace(ref, path=rel, count=int(keep.sum()), checksum=sha256_checksum(blob))


def _reused(job: ReindexJob, info: ShardInfo) -> ShardInfo:
    """A reused shard's entry; one written before per-file checksums were recorded gets them now, once its files
    match its whole-shard checksum (unless the job runs unverified)."""
    return with_file_records(storage.join(job.root, info.path), info) if job.verify else info


def assemble_manifest(job: ReindexJob, plan: compaction.ReindexPlan, rebuilt: dict[int, ShardInfo]) -> Manifest:
    """The new version's content (version/parent are set by publish_version), after checking the books.

    Raises:
      ReindexError: a rebuilt shard is missing, or the new version would not hold exactly the live entries.
    """
    m = job.manifest
    missing = sorted(set(plan.rebuilt) - set(rebuilt))
    if missing:
        raise ReindexError(f"rebuilt shard(s) {missing} were not written; nothing was published")
    shards = tuple(_reused(job, t.reused) if t.reused is not None else rebuilt[t.index] for t in plan.targets)
    stored = sum(s.count for s in shards)
    if stored != m.total:
        raise ReindexError(f"bookkeeping mismatch: version {m.version} has {m.total} live entries but the re-indexed "
                           f"shards hold {stored}; nothing was published")
    forgotten = read_forgotten(job.root, m)
    weights = _weights_without(job.root, m, forgotten, job.new_version)
    metadata = metadata_without(job.root, m, forgotten, job.new_version)
    reused = [t.name for t in plan.targets if t.reused is not None]
    rebuilt_names = [t.name for t in plan.targets if t.reused is None]
    change = {"kind": "reindex", "job": job.job_token,
              "summary": (f"re-indexed into {plan.num_shards} shards: rebuilt {len(rebuilt_names)}, reused "
                          f"{len(reused)}; dropped {plan.forgotten_rows} forgotten rows, folded {plan.delta_rows} "
                          "delta rows"),
              "rebuilt": rebuilt_names, "reused": reused, "dropped_forgotten": plan.forgotten_rows,
              "folded_delta": plan.delta_rows, "num_shards": plan.num_shards,
              "reasons": {t.name: list(t.reasons) for t in plan.targets if t.reused is None}}
    if job.purge:
        change["purge_requested"] = True
    build_config = dict(m.build_config)
    if "num_shards" in build_config:
        build_config["num_shards"] = plan.num_shards
    return dataclasses.replace(m, shards=shards, delta_shards=(), forgotten=None, entry_weights=weights,
                               metadata=metadata, build_config=build_config, change=change)


def remove_orphans(root: str) -> list[str]:
    """Deletes ``shards/rNNNNNN-*`` directories of crashed or losing re-index runs (compaction.orphan_reindex_dirs)."""
    try:
        children = storage.list_dir(storage.join(root, compaction.REINDEX_SHARDS_DIR))
    except FileNotFoundError:
        return []
    versions = list_versions(root) or [latest_version(root)]
    referenced = {s.path for n in versions for s in read_version(root, n).all_shards}
    orphans = compaction.orphan_reindex_dirs(children, referenced_paths=referenced, latest=versions[-1])
    paths = checked_deletion_paths(root, orphans, what="the orphan re-index directories under shards/")
    for rel, path in zip(orphans, paths):
        storage.remove_tree(path)
        _LOG.info("reindex: removed orphan directory %s (a crashed or superseded re-index)", rel)
    # A published re-index killed right after its publish may have left its spill files in its (referenced)
    # directory; every writer of those directories has finished, so they are safe to delete.
    prefix = compaction.REINDEX_SHARDS_DIR + "/"
    published_dirs = {p.split("/")[1] for p in referenced if p.startswith(prefix) and p.count("/") >= 2}
    for name in sorted(set(children) & published_dirs):
        spill = storage.join(root, compaction.REINDEX_SHARDS_DIR, name, SPILL_DIR)
        if storage.exists(spill):
            storage.remove_tree(spill)
    return orphans


def conflict_error(job: ReindexJob) -> ConcurrentUpdateError:
    """The error of a re-index that lost its publish: a re-index never re-bases (it rewrote every shard from
    version n, so any change published since conflicts with it); names the first version published since."""
    for n in list_versions(job.root):
        if n > job.version:
            try:
                winner = read_version(job.root, n)
            except ManifestError:  # Purged meanwhile: try the next.
                continue
            return WriteConflictError.of(job.root, what=f"re-index of version {job.version}", base=job.version,
                                         winner=winner, clash="a re-index rewrites the shards from its base version "
                                                              "and never re-bases")
    return ConcurrentUpdateError.stale(job.root, job.new_version, job.version, latest_version(job.root))


def publish(job: ReindexJob, plan: compaction.ReindexPlan, rebuilt: dict[int, ShardInfo]) -> Manifest:
    """Publishes version n+1 (once; a retried step recognises its own version), then purges and cleans up.

    Raises:
      WriteConflictError: another writer published version n+1 first (`conflict_error`); nothing of this run
        is live.
      AfterPublishError: version n+1 is published; a step after it (spill files, purge, orphans, leftovers)
        failed.
    """
    published = published_by(job.root, job.new_version, job.job_token)
    if published is None:
        try:
            published = publish_version(job.root, assemble_manifest(job, plan, rebuilt), expected_parent=job.version)
        except ConcurrentUpdateError:
            raise conflict_error(job) from None
        _LOG.info("reindex: published version %d of %s", published.version, job.root)
    # Readers get the new version from here on: a failure below is reported as one after the publish.
    finish = "Fix what it names, then re-run `vmem reindex`: it finishes this clean-up."
    with after_publish(root=job.root, version=published.version, step="removing the job's spill files", fix=finish):
        storage.remove_tree(job.spill_dir)
    if job.purge:
        with after_publish(root=job.root, version=published.version,
                           step="purging the history (a forget asked for --purge-history)", fix=finish):
            purged = purge_history(job.root)
        _LOG.info("reindex: purged versions %s (a forget requested --purge-history)", purged)
    with after_publish(root=job.root, version=published.version,
                       step="removing orphan directories of crashed re-index runs", fix=finish):
        remove_orphans(job.root)
    # Files of writers killed before publishing, or that failed before cleaning up (purge.find_leftovers:
    # unreferenced, made for a published version number, and older than the grace period).
    with after_publish(root=job.root, version=published.version,
                       step="removing files that failed writers left", fix=finish):
        for leftover in remove_leftovers(job.root):
            _LOG.info("reindex: removed %s (%s)", leftover.rel, leftover.why)
    return published
