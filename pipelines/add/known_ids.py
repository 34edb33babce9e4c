"""RejectKnownIds: new entries whose id the memory already holds (or forgot) become dead letters.

A bounded join: the new records (or blocks' id columns) and the version's stored and forgotten ids are keyed
by an id-hash bucket (``shard_for_id(id, buckets)``) and co-grouped, so a worker holds one bucket's ids, never
all of them, and nothing of the memory is pickled into the graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from memory import storage
from memory.store.manifest import ShardInfo
from memory.store.mutations import read_forgotten
from memory.store.sharding import shard_for_id
from memory.store.versions import read_version
from pipelines.io.readers import FAILED_TAG, failed_record
from pipelines.records import EntryBlock, Stage

# Stored ids per id-hash bucket when new records are checked against the memory's ids (RejectKnownIds): one
# bucket's ids, a few tens of MB, is all a worker holds.
IDS_PER_BUCKET = 1_000_000

__all__ = ["IDS_PER_BUCKET", "RejectKnownIds", "RejectKnownIdsInBlocks", "id_buckets"]


def id_buckets(stored_ids: int) -> int:
    """Id-hash buckets for RejectKnownIds: one per IDS_PER_BUCKET stored ids, at least 1."""
    return max(1, math.ceil(int(stored_ids) / IDS_PER_BUCKET))


def _bucketed(ids: np.ndarray, buckets: int):
    """(bucket, sorted ids of that bucket) for each non-empty id-hash bucket of ``ids``."""
    ids = np.asarray(ids, dtype=str)
    of = np.fromiter((shard_for_id(i, buckets) for i in ids.tolist()), np.int64, ids.size)
    for b in np.unique(of).tolist():
        yield int(b), np.sort(ids[of == b])


class _StoredIdsFn(beam.DoFn):
    """A shard's ShardInfo -> (bucket, its ids hashing there): each worker reads the one shard it was given,
    checking the file against the manifest unless ``verify`` is False."""

    def __init__(self, root: str, buckets: int, verify: bool = True):
        self._root = root
        self._buckets = buckets
        self._verify = verify

    def process(self, info: ShardInfo):
        from memory.store import shard as shard_io  # pylint: disable=g-import-not-at-top
        ids = shard_io.read_shard_ids(storage.join(self._root, info.path), info, verify=self._verify)
        yield from _bucketed(ids, self._buckets)


class _TombstonesFn(beam.DoFn):
    """The version -> (bucket, its forgotten ids hashing there), from the one tombstone file."""

    def __init__(self, root: str, buckets: int):
        self._root = root
        self._buckets = buckets

    def process(self, version: int):
        yield from _bucketed(read_forgotten(self._root, read_version(self._root, version)), self._buckets)


def _sorted_ids(chunks) -> np.ndarray:
    """One bucket's id chunks (from every shard or tombstone file) as one sorted array."""
    chunks = list(chunks)
    return np.sort(np.concatenate(chunks)) if chunks else np.zeros((0,), "<U1")


def _forgotten_detail(version: int) -> str:
    return (f"id was forgotten but is still physically present in version {version} until `vmem reindex`; "
            "re-index first, or add the entry under another id")


def _member(sorted_ids: np.ndarray, entry_id: str) -> bool:
    if not sorted_ids.size:
        return False
    pos = int(np.searchsorted(sorted_ids, entry_id))
    return pos < sorted_ids.size and sorted_ids[pos] == entry_id


class _BucketJoinFn(beam.DoFn):
    """Base of the per-bucket joins of new ids against the version's stored and forgotten ids."""

    def __init__(self, root: str, version: int):
        self._root = root
        self._version = version

    @staticmethod
    def known_ids(grouped) -> tuple[np.ndarray, np.ndarray]:
        """(stored, forgotten) sorted ids of the bucket; tombstones list forgotten ids still stored, so "live"
        is stored minus forgotten."""
        return _sorted_ids(grouped["stored"]), _sorted_ids(grouped["forgotten"])


class _RejectInBucketFn(_BucketJoinFn):
    """(bucket, {new records, stored ids, forgotten ids} of that bucket) -> new records / FailedRecords."""

    def process(self, element):
        _, grouped = element
        stored, forgotten = self.known_ids(grouped)
        for record in grouped["new"]:
            if _member(forgotten, record.id):
                yield failed_record(record.id, record.uri, "forgotten_id", _forgotten_detail(self._version), Stage.READ)
            elif _member(stored, record.id):
                yield failed_record(record.id, record.uri, "duplicate_id",
                                    f"id is already live in version {self._version} of {self._root}; forget it first "
                                    "to replace it, or add the image under another id", Stage.READ)
            else:
                yield record


def _known_ids_by_bucket(p, root: str, version: int, shards: list[ShardInfo], buckets: int, verify: bool):
    """(stored ids, forgotten ids) of a version as (bucket, sorted id array) PCollections; one shard per worker."""
    stored = (p
              | "StoredShards" >> beam.Create(shards)
              | "SpreadShards" >> beam.Reshuffle()
              | "StoredIdsByBucket" >> beam.ParDo(_StoredIdsFn(root, buckets, verify)))
    forgotten = (p
                 | "Version" >> beam.Create([version])
                 | "ForgottenIdsByBucket" >> beam.ParDo(_TombstonesFn(root, buckets)))
    return stored, forgotten


class RejectKnownIds(beam.PTransform):
    """ImageRecord -> (records with new ids, FailedRecords for ids the memory already holds).

    A bounded join: new records and the memory's stored ids (each shard read by one worker) and tombstones
    are keyed by an id-hash bucket (``shard_for_id(id, buckets)``) and co-grouped, so a worker holds one
    bucket's stored ids, never all of them (nor are they pickled into the graph).

    Args:
      root: Memory root.
      version: The version the add is based on.
      buckets: Id-hash buckets; None -> ``id_buckets(stored rows of the version)``.
      verify: Check each shard's id file against the manifest as it is read (memory.store.integrity).
    """

    def __init__(self, root: str, version: int, *, buckets: int | None = None, verify: bool = True):
        super().__init__()
        self._root = root
        self._version = version
        self._verify = verify
        manifest = read_version(root, version)  # Launcher: the manifest only, no shard file.
        self._shards = [s for s in manifest.all_shards if s.count]
        self._buckets = buckets or id_buckets(manifest.physical_total)

    def expand(self, records):
        buckets = self._buckets
        new = records | "KeyNewByIdBucket" >> beam.Map(lambda r: (shard_for_id(r.id, buckets), r))
        stored, forgotten = _known_ids_by_bucket(records.pipeline, self._root, self._version, self._shards,
                                                 buckets, self._verify)
        results = ({"new": new, "stored": stored, "forgotten": forgotten}
                   | "CoGroupByIdBucket" >> beam.CoGroupByKey()
                   | "CheckIds" >> beam.ParDo(_RejectInBucketFn(self._root, self._version)).with_outputs(
                       FAILED_TAG, main="records"))
        return results.records, results[FAILED_TAG]


def _members(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool [n]: which of ``ids`` occur in ``sorted_ids`` (binary search)."""
    if not sorted_ids.size or not ids.size:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return sorted_ids[pos] == ids


class _RowsOfBucket(NamedTuple):
    """The id, uri and label columns of a block's rows that hash to one id bucket (no embeddings)."""
    ids: np.ndarray
    uris: np.ndarray
    labels: np.ndarray


def _rows_by_bucket(block: EntryBlock, buckets: int):
    of = np.fromiter((shard_for_id(i, buckets) for i in block.ids.tolist()), np.int64, len(block))
    for b in np.unique(of).tolist():
        rows = of == b
        yield int(b), _RowsOfBucket(block.ids[rows], block.uris[rows], block.labels[rows])


class _RejectRowsInBucketFn(_BucketJoinFn):
    """(bucket, {new rows, stored ids, forgotten ids}) -> rejected ids, FailedRecords, (kept rows, their labels)."""

    KEPT = "kept"

    def process(self, element):
        _, grouped = element
        stored, forgotten = self.known_ids(grouped)
        for rows in grouped["new"]:
            gone = _members(forgotten, rows.ids)
            live = _members(stored, rows.ids) & ~gone  # Tombstones list forgotten ids that are still stored.
            for i in np.flatnonzero(gone).tolist():
                yield failed_record(str(rows.ids[i]), str(rows.uris[i]), "forgotten_id",
                                    _forgotten_detail(self._version), Stage.READ)
            for i in np.flatnonzero(live).tolist():
                yield failed_record(str(rows.ids[i]), str(rows.uris[i]), "duplicate_id",
                                    f"id is already live in version {self._version} of {self._root}; forget it first "
                                    "to replace it, or add the entry under another id", Stage.READ)
            rejected = gone | live
            if rejected.any():
                yield np.unique(rows.ids[rejected])
            kept = ~rejected
            yield beam.pvalue.TaggedOutput(self.KEPT, (int(kept.sum()), np.unique(rows.labels[kept]).tolist()))


class RejectKnownIdsInBlocks(beam.PTransform):
    """EntryBlock -> (rejected ids, FailedRecords, kept rows), the block form of :class:`RejectKnownIds`.

    Only the id, uri and label columns of the new rows enter the bucketed join (never their embeddings): a
    worker holds one bucket's stored ids and new ids. The blocks themselves are not filtered here; the delta
    shard writer drops the rows whose id is in ``rejected`` (arrays of ids; every copy of such an id got a
    FailedRecord). ``kept`` holds (rows kept, their distinct labels) per bucket and block, for the delta shard
    count and the class names.

    Args:
      root: Memory root.
      version: The version the add is based on.
      buckets: Id-hash buckets; None -> enough for the stored rows and for ``new_rows`` (when known).
      new_rows: Rows the source holds, when known at launch.
      verify: As :class:`RejectKnownIds`.
    """

    def __init__(self, root: str, version: int, *, buckets: int | None = None, new_rows: int | None = None,
                 verify: bool = True):
        super().__init__()
        self._root = root
        self._version = version
        self._verify = verify
        manifest = read_version(root, version)  # Launcher: the manifest only, no shard file.
        self._shards = [s for s in manifest.all_shards if s.count]
        self._buckets = buckets or max(id_buckets(manifest.physical_total), id_buckets(new_rows or 0))

    def expand(self, blocks):
        buckets = self._buckets
        new = blocks | "KeyNewRowsByIdBucket" >> beam.FlatMap(_rows_by_bucket, buckets)
        stored, forgotten = _known_ids_by_bucket(blocks.pipeline, self._root, self._version, self._shards,
                                                 buckets, self._verify)
        results = ({"new": new, "stored": stored, "forgotten": forgotten}
                   | "CoGroupByIdBucket" >> beam.CoGroupByKey()
                   | "CheckIds" >> beam.ParDo(_RejectRowsInBucketFn(self._root, self._version)).with_outputs(
                       FAILED_TAG, _RejectRowsInBucketFn.KEPT, main="rejected"))
        return results.rejected, results[FAILED_TAG], results[_RejectRowsInBucketFn.KEPT]
