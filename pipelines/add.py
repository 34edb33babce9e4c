"""The add job: publish new entries (images or precomputed embeddings) as delta shards of a new version.

Local (in-process runner)::

    vmem add --memory out/fmnist-memory --images data/new-images

Precomputed embeddings (a memory built with ``vmem build --embeddings``; the same ``--encoder-id``)::

    vmem add --memory out/laion-memory --embeddings 'clip:data/new-emb,label_column=label' --encoder-id NAME

Local with two worker processes::

    vmem add --memory out/fmnist-memory --images data/new-images \\
        --direct_running_mode=multi_processing --direct_num_workers=2

Dataflow (ship the code with setup.py, as for ``vmem build``)::

    vmem add --memory gs://BUCKET/memories/in1k --images gs://BUCKET/new-classes \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

The graph (images; precomputed embeddings replace the first four steps by ReadEmbeddings ─► RejectKnownIds
on blocks)::

    ReadImages ─► RejectKnownIds ─► DecodeImages ─► EmbedImages ─► ToBlocks ─► WriteDeltaShards ─► PublishAdd
        │              │                 │              │                            │           (last, once)
        └──────────────┴─────────────────┴──────────────┴────────────────────────────┴── failures ─►
                                                                                 dead_letter/add-vNNNNNN/

The launcher reads the memory's latest version n once. Images are decoded with the memory's preprocessing
and embedded with the memory's own encoder (``manifest.build_config["encoder"]``); a worker that ran a
different encoder (name, content hash or dim) fails the job before anything is written. Precomputed
embeddings can only be added to a memory built from precomputed embeddings of the same ``--encoder-id`` and
dim (checked at launch, before anything is read). Ids already live in version n, ids forgotten but still
physically present (until ``vmem reindex``) and ids given twice in this add become dead letters (reasons
``duplicate_id`` / ``forgotten_id``), never a failed job.

Bounded memory per worker, as in the build (pipelines/stages/write.py): entries travel as `EntryBlock`s; known ids
are rejected by an id-hash bucketed join (for blocks only ids and uris are joined); rows are spilled to
files per delta shard (``deltas/v{n+1:06d}-<job id>/.spill/``) and the GroupByKey moves only (delta shard,
spill file) references, so one worker holds one delta shard. There are ``max(1, ceil(entries /
--delta-shard-size))`` brute-force delta shards, an entry going to ``shard_for_id(id, count)``.

Atomic under retries: every attempt at a delta shard writes its own directory
``deltas/v{n+1:06d}-<job id>/delta-IIIII-of-CCCCC-<attempt>``; one final step publishes version n+1 naming
the attempts that count, with the memory's class names extended append-only (old label indices never
change), then deletes the other attempts and the spill files. A retried publish step that finds its own
version n+1 succeeds; if someone else published meanwhile, the job fails with ConcurrentUpdateError and
nothing is published: re-run it. Added entries are searched exactly (brute force) at once by
``VisualMemory``, ``vmem classify`` and ``vmem evaluate``.

Anything that is not an add flag is passed to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import re
import secrets
import sys
import time
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from encoders.base import EncoderSpec
from encoders.bundled import resolve_preprocess
from memory import storage
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.manifest import Manifest, ManifestError, ShardInfo
from memory.store.mutations import DELTAS_DIR, DuplicateIdError, extended_class_names, read_forgotten
from memory.store.shard import ShardData, write_shard
from memory.store.sharding import shard_for_id
from memory.store.versions import ConcurrentUpdateError, latest_version, publish_version, read_version
from vmem.args import UsageError
from pipelines.build import is_precomputed, precomputed_identity, read_precomputed
from pipelines.runner import with_default_runner
from pipelines.stages.embed import (DecodeImages, EmbedImages, EncoderMismatchError, check_same_identity,
                             memory_encoder_spec)
from pipelines.io.readers import FAILED_TAG, ImageSource, ReadImages, dead_letter, parse_image_spec
from pipelines.records import EntryBlock, Stage
from pipelines.stages.write import (DEAD_LETTER_DIR, SPILL_ROWS, EntriesToBlocks, SpillBlocks, block_class_names,
                             count_rows, dedupe_block, read_spills)

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
DEFAULT_DELTA_SHARD_SIZE = 50_000
# Stored ids per id-hash bucket when new records are checked against the memory's ids (RejectKnownIds): one
# bucket's ids, a few tens of MB, is all a worker holds.
IDS_PER_BUCKET = 1_000_000

# Every attempt at a delta shard writes its own directory: delta-IIIII-of-CCCCC-<attempt>.
_ATTEMPT_RE = re.compile(r"^delta-\d{5}-of-\d{5}-[0-9a-f]{8}$")
SPILL_DIR = ".spill"

__all__ = ["AddError", "AddPlan", "DEFAULT_DELTA_SHARD_SIZE", "PublishAdd", "RejectKnownIds", "RejectKnownIdsInBlocks",
           "WriteDeltaShards", "build_arg_parser", "check_precomputed_identity", "launch", "main", "plan_add",
           "publish_add_version", "remove_add_leftovers", "run"]


class AddError(RuntimeError):
    """The add cannot publish a meaningful version (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class AddPlan:
    """What the launcher decided once, before the graph runs (plain picklable values).

    Attributes:
      root: Memory root.
      base_version: The version n read at launch; the add publishes n + 1 or fails.
      job_id: Random token making this add's file paths unique (two racing adds never share a path).
      encoder: The memory's own EncoderSpec (None for a memory built from precomputed embeddings).
      encoder_identity: The memory's recorded encoder identity (what the workers must reproduce).
      class_names: Class names of version n (new names are appended after them).
    """
    root: str
    base_version: int
    job_id: str
    encoder: Optional[EncoderSpec]
    encoder_identity: dict
    class_names: tuple[str, ...]

    @property
    def new_version(self) -> int:
        return self.base_version + 1

    @property
    def version_tag(self) -> str:
        """Directory of this add's delta shards under ``deltas/``."""
        return f"v{self.new_version:06d}-{self.job_id}"

    @property
    def delta_dir(self) -> str:
        """This add's directory, relative to the root: delta shard attempts and spill files."""
        return f"{DELTAS_DIR}/{self.version_tag}"

    @property
    def spill_dir(self) -> str:
        return storage.join(self.root, self.delta_dir, SPILL_DIR)

    @property
    def dead_letter_dir(self) -> str:
        return storage.join(self.root, DEAD_LETTER_DIR, f"add-v{self.new_version:06d}")


def plan_add(root: str, *, job_id: str | None = None, images: bool = True) -> AddPlan:
    """Reads the memory's latest version once and fixes everything the graph needs.

    ``images``: the add embeds images, so the memory's encoder spec is needed (unless the memory holds
    precomputed embeddings, which the launcher then refuses).
    """
    root = root.rstrip("/") or root
    n = latest_version(root)
    manifest = read_version(root, n)
    embeds = images and not is_precomputed(manifest.encoder)
    return AddPlan(root=root, base_version=n, job_id=job_id or secrets.token_hex(4),
                   encoder=memory_encoder_spec(manifest) if embeds else None,
                   encoder_identity=dict(manifest.encoder), class_names=tuple(manifest.class_names))


def check_precomputed_identity(plan: AddPlan, encoder_id: str | None, source, *, memory_dim: int) -> dict:
    """Refuses precomputed embeddings the memory cannot hold meaningfully; returns their encoder identity.

    The memory must have been built from precomputed embeddings of the encoder named ``encoder_id``, and the
    source's dim (its first file's header: nothing else is read) must be the memory's.

    Raises:
      AddError: naming both encoders (or dims) and the fix.
    """
    from pipelines.io.embedding_sources import embedding_dim  # pylint: disable=g-import-not-at-top

    memory_name = plan.encoder_identity.get("name")
    if not is_precomputed(plan.encoder_identity):
        raise AddError(
            f"{plan.root} was built from images with encoder {memory_name!r} (content hash "
            f"{plan.encoder_identity.get('content_hash')}); precomputed embeddings"
            + (f" of {encoder_id!r}" if encoder_id else "") + " cannot be shown to come from it. Add the images "
            "with --images instead (they are embedded with the memory's own encoder), or build a new memory with "
            "`vmem build --embeddings`. Nothing was published.")
    if not encoder_id:
        raise AddError(f"--embeddings needs --encoder-id: {plan.root} holds embeddings of encoder {memory_name!r}; "
                       f"pass --encoder-id {memory_name} if the new embeddings come from that encoder. Nothing was "
                       "published.")
    if encoder_id != memory_name:
        raise AddError(
            f"--encoder-id {encoder_id!r} differs from the encoder {memory_name!r} that {plan.root} was built "
            "with; distances between embeddings of different encoders are meaningless. Pass --encoder-id "
            f"{memory_name} if these embeddings come from that encoder, or build a new memory from them with "
            "`vmem build --embeddings`. Nothing was published.")
    dim = embedding_dim(source)
    if dim != memory_dim:
        raise AddError(f"--embeddings {source.location}: embeddings of dim {dim}, but {plan.root} holds dim "
                       f"{memory_dim} ({memory_name!r}); add embeddings of the memory's encoder. Nothing was "
                       "published.")
    identity = precomputed_identity(encoder_id, dim, source.to_dict().get("location", ""))
    check_worker_identity(plan.encoder_identity, json.dumps(identity, sort_keys=True))  # Name, hash and dim.
    return identity


def check_worker_identity(memory_identity: dict, worker_identity_json: str) -> None:
    """Refuses entries embedded by an encoder other than the memory's."""
    try:
        check_same_identity(memory_identity, json.loads(worker_identity_json), what="the new images",
                            fix="Restore the memory's encoder files or build a new memory. Nothing was published.")
    except EncoderMismatchError as e:
        raise AddError(str(e)) from None


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
    """A shard's path -> (bucket, its ids hashing there): each worker reads the one shard it was given."""

    def __init__(self, root: str, buckets: int):
        self._root = root
        self._buckets = buckets

    def process(self, shard_path: str):
        from memory.store import shard as shard_io  # pylint: disable=g-import-not-at-top
        shard_dir = storage.join(self._root, shard_path)
        read_ids = getattr(shard_io, "read_shard_ids", None)
        ids = read_ids(shard_dir) if read_ids else shard_io.read_shard_data(shard_dir).ids
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
                yield dead_letter(record.id, record.uri, "forgotten_id", _forgotten_detail(self._version), Stage.READ)
            elif _member(stored, record.id):
                yield dead_letter(record.id, record.uri, "duplicate_id",
                              f"id is already live in version {self._version} of {self._root}; forget it first to "
                              "replace it, or add the image under another id", Stage.READ)
            else:
                yield record


def _known_ids_by_bucket(p, root: str, version: int, shard_paths: list[str], buckets: int):
    """(stored ids, forgotten ids) of a version as (bucket, sorted id array) PCollections; one shard per worker."""
    stored = (p
              | "StoredShards" >> beam.Create(shard_paths)
              | "SpreadShards" >> beam.Reshuffle()
              | "StoredIdsByBucket" >> beam.ParDo(_StoredIdsFn(root, buckets)))
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
    """

    def __init__(self, root: str, version: int, *, buckets: int | None = None):
        super().__init__()
        self._root = root
        self._version = version
        manifest = read_version(root, version)  # Launcher: the manifest only, no shard file.
        self._shard_paths = [s.path for s in manifest.all_shards if s.count]
        self._buckets = buckets or id_buckets(manifest.physical_total)

    def expand(self, records):
        buckets = self._buckets
        new = records | "KeyNewByIdBucket" >> beam.Map(lambda r: (shard_for_id(r.id, buckets), r))
        stored, forgotten = _known_ids_by_bucket(records.pipeline, self._root, self._version, self._shard_paths,
                                                 buckets)
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
                yield dead_letter(str(rows.ids[i]), str(rows.uris[i]), "forgotten_id", _forgotten_detail(self._version),
                              Stage.READ)
            for i in np.flatnonzero(live).tolist():
                yield dead_letter(str(rows.ids[i]), str(rows.uris[i]), "duplicate_id",
                              f"id is already live in version {self._version} of {self._root}; forget it first to "
                              "replace it, or add the entry under another id", Stage.READ)
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
    """

    def __init__(self, root: str, version: int, *, buckets: int | None = None, new_rows: int | None = None):
        super().__init__()
        self._root = root
        self._version = version
        manifest = read_version(root, version)  # Launcher: the manifest only, no shard file.
        self._shard_paths = [s.path for s in manifest.all_shards if s.count]
        self._buckets = buckets or max(id_buckets(manifest.physical_total), id_buckets(new_rows or 0))

    def expand(self, blocks):
        buckets = self._buckets
        new = blocks | "KeyNewRowsByIdBucket" >> beam.FlatMap(_rows_by_bucket, buckets)
        stored, forgotten = _known_ids_by_bucket(blocks.pipeline, self._root, self._version, self._shard_paths,
                                                 buckets)
        results = ({"new": new, "stored": stored, "forgotten": forgotten}
                   | "CoGroupByIdBucket" >> beam.CoGroupByKey()
                   | "CheckIds" >> beam.ParDo(_RejectRowsInBucketFn(self._root, self._version)).with_outputs(
                       FAILED_TAG, _RejectRowsInBucketFn.KEPT, main="rejected"))
        return results.rejected, results[FAILED_TAG], results[_RejectRowsInBucketFn.KEPT]


def _delta_assign(block: EntryBlock, count: int, identities, *, memory_identity: dict) -> np.ndarray:
    """Delta shard of each row: ``shard_for_id(id, count)``. Refuses another encoder before a byte is spilled."""
    for identity in identities:
        check_worker_identity(memory_identity, identity)
    return np.fromiter((shard_for_id(i, count) for i in block.ids.tolist()), np.int64, len(block))


def _rejected_by_delta_shard(ids: np.ndarray, count: int):
    of = np.fromiter((shard_for_id(i, count) for i in ids.tolist()), np.int64, len(ids))
    for shard in np.unique(of).tolist():
        yield int(shard), ids[of == shard]


def delta_shard_path(plan: AddPlan, index: int, count: int) -> tuple[str, str]:
    """(name, root-relative path of a fresh attempt) of delta shard ``index`` of ``count``."""
    leaf = f"delta-{index:05d}-of-{count:05d}"
    return f"{DELTAS_DIR}-{plan.version_tag}-{leaf}", f"{plan.delta_dir}/{leaf}-{secrets.token_hex(4)}"


class _WriteDeltaShardFn(beam.DoFn):
    """(delta shard, {spill paths, rejected ids}) -> (index, ShardInfo) after writing one attempt directory."""

    def __init__(self, plan: AddPlan):
        self._plan = plan
        self._written = Metrics.counter(_NAMESPACE, "entries_added")

    def process(self, element, class_names, count, identities):
        for identity in identities:
            # Checked before writing, so a wrong encoder leaves no delta shard behind.
            check_worker_identity(self._plan.encoder_identity, identity)
        index, grouped = element
        paths = sorted(grouped["spills"])
        if not paths:
            return  # Every row hashing here was rejected: no delta shard.
        block = read_spills(paths)
        rejected = [r for r in grouped["rejected"]]
        if rejected:
            block = block.take(np.flatnonzero(~np.isin(block.ids, np.concatenate(rejected))))
        kept, dups = dedupe_block(block)  # Ids given twice in this add: the first by uri is kept.
        for d, k in dups:
            yield dead_letter(str(block.ids[d]), str(block.uris[d]), "duplicate_id",
                          f"id given twice in this add; kept {block.uris[k]}", Stage.EMBED)
        del block
        if not len(kept):
            return
        class_index = {name: i for i, name in enumerate(class_names)}
        labels = np.fromiter((class_index[label] for label in kept.labels.tolist()), np.int32, len(kept))
        data = ShardData(ids=kept.ids, labels=labels, uris=kept.uris, embeddings=kept.embeddings)
        del kept
        name, rel = delta_shard_path(self._plan, index, count)
        # One directory per attempt: a retried or zombie attempt never overwrites the files of another; the
        # publish step names the attempt that counts.
        info = write_shard(storage.join(self._plan.root, rel), data, name=name, root_relative_path=rel,
                           index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE))
        self._written.inc(info.count)
        _LOG.info("wrote delta shard %s: %d entries", rel, info.count)
        yield index, info


class WriteDeltaShards(beam.PTransform):
    """EntryBlock -> ((index, ShardInfo) of each written delta shard, FailedRecords for ids repeated in the add).

    There are ``count`` delta shards (a singleton PCollection: ``max(1, ceil(entries / target))``); a row goes
    to ``shard_for_id(id, count)``. Rows are spilled to files per delta shard (`pipelines.stages.write.SpillBlocks`)
    and one worker writes one delta shard from its spill files, dropping the rows whose id is in
    ``rejected`` (arrays of ids; may be empty). Labels map through ``class_names`` (a singleton: old names,
    then new ones).
    """

    def __init__(self, plan: AddPlan, *, count, class_names, identities, rejected=None, spill_rows: int = SPILL_ROWS):
        super().__init__()
        self._plan = plan
        self._count = count
        self._class_names = class_names
        self._identities = identities
        self._rejected = rejected
        self._spill_rows = spill_rows

    def expand(self, blocks):
        plan = self._plan
        count = beam.pvalue.AsSingleton(self._count)
        assign = functools.partial(_delta_assign, memory_identity=plan.encoder_identity)
        spilled = blocks | "SpillByDeltaShard" >> beam.ParDo(
            SpillBlocks(plan.spill_dir, assign, self._spill_rows), count, beam.pvalue.AsList(self._identities))
        rejected = (self._rejected if self._rejected is not None
                    else blocks.pipeline | "NoRejectedIds" >> beam.Create([]))
        rejected = rejected | "RejectedByDeltaShard" >> beam.FlatMap(_rejected_by_delta_shard, count)
        results = (
            {"spills": spilled, "rejected": rejected}
            | "GroupByDeltaShard" >> beam.CoGroupByKey()
            | "WriteDeltaShard" >> beam.ParDo(
                _WriteDeltaShardFn(plan), class_names=beam.pvalue.AsSingleton(self._class_names),
                count=count, identities=beam.pvalue.AsList(self._identities),
            ).with_outputs(FAILED_TAG, main="infos"))
        return results.infos, results[FAILED_TAG]


class AddCounts(NamedTuple):
    read: int
    added: int
    failed: int


def check_counts(*, infos: Sequence[ShardInfo], records_read: int, failed: int, dead_letter_dir: str) -> AddCounts:
    """read == added + failed, and something to add; raises AddError otherwise (nothing is published)."""
    added = sum(info.count for info in infos)
    if records_read != added + failed:
        raise AddError(f"bookkeeping mismatch: read {records_read} != added {added} + failed {failed}; nothing "
                       "was published.")
    if not added:
        raise AddError(f"nothing to add: all {records_read} record(s) failed or were rejected; see the reasons in "
                       f"{dead_letter_dir}/. Nothing was published.")
    return AddCounts(read=records_read, added=added, failed=failed)


def _add_manifest(plan: AddPlan, base: Manifest, delta_infos: Sequence[ShardInfo], new_class_names: Sequence[str],
                  counts: dict) -> Manifest:
    class_names = extended_class_names(base.class_names, new_class_names)
    new_classes = list(class_names[len(base.class_names):])
    added = sum(info.count for info in delta_infos)
    change = {"kind": "add", "summary": f"added {added} entries in {len(delta_infos)} delta shard(s)"
                                        + (f", new classes {new_classes}" if new_classes else ""),
              "added": added, "new_classes": new_classes, "counts": dict(counts)}
    return dataclasses.replace(base, class_names=class_names, change=change,
                               delta_shards=tuple(base.delta_shards) + tuple(delta_infos))


def _published_next(plan: AddPlan) -> Manifest | None:
    """Version n+1 if it exists and is readable, else None."""
    try:
        return read_version(plan.root, plan.new_version)
    except Exception:  # pylint: disable=broad-except  # Missing or unreadable: not ours.
        return None


def publish_add_version(plan: AddPlan, *, delta_infos: Sequence[ShardInfo], new_class_names: Sequence[str],
                        counts: dict) -> Manifest:
    """Publishes the delta shards (attempts named by ``delta_infos``) as version n+1; idempotent under retries.

    The ids were checked by the job (`RejectKnownIds` against version n, one delta shard per id hash), so no
    id of the memory is read here. A retried publish step (its bundle failed after the version was created,
    say) finds version n+1 already there: if it is this add's (same parent, shards, classes and counts; only
    the change's timestamp may differ) that is success; anything else is another writer's and the
    ConcurrentUpdateError is raised (re-run the add).
    """
    ours = _add_manifest(plan, read_version(plan.root, plan.base_version), delta_infos, new_class_names, counts)
    try:
        return publish_version(plan.root, ours, expected_parent=plan.base_version)
    except ConcurrentUpdateError:
        existing = _published_next(plan)
        if existing is None or existing.parent != plan.base_version:
            raise
        mine = dataclasses.replace(ours, version=existing.version, parent=existing.parent,
                                   change={**ours.change, "at": existing.change.get("at")})
        if existing != mine:
            raise
        _LOG.info("version %d of %s was already published by an earlier attempt of this step", existing.version,
                  plan.root)
        return existing


def remove_add_leftovers(plan: AddPlan, manifest: Manifest) -> list[str]:
    """Deletes this add's spill files and the delta shard attempts ``manifest`` does not name.

    Only add-made names (``deltas/<tag>/delta-IIIII-of-CCCCC-<attempt>``) of this add's directory are touched.
    Returns what was deleted (root-relative).
    """
    referenced = {s.path for s in manifest.delta_shards}
    directory = storage.join(plan.root, plan.delta_dir)
    children = storage.list_dir(directory) if storage.exists(directory) else []
    removed = []
    for child in children:
        rel = f"{plan.delta_dir}/{child}"
        if _ATTEMPT_RE.match(child) and rel not in referenced:
            storage.remove_tree(storage.join(plan.root, rel))
            removed.append(rel)
    storage.remove_tree(plan.spill_dir)
    return removed


def _abandon(plan: AddPlan) -> None:
    """Best effort after a failed publish: this add's directory, unless version n+1 names it (then it stays)."""
    published = _published_next(plan)
    if published is not None and any(s.path.startswith(plan.delta_dir + "/") for s in published.delta_shards):
        return
    try:
        storage.remove_tree(storage.join(plan.root, plan.delta_dir))
    except Exception:  # pylint: disable=broad-except  # Never hide the publish error behind a cleanup error.
        _LOG.warning("could not delete %s of the failed add", plan.delta_dir, exc_info=True)


class _PublishAddFn(beam.DoFn):
    def __init__(self, plan: AddPlan):
        self._plan = plan

    def process(self, unused, infos, identities, class_names, records_read, failed, dead_letter_files):
        plan = self._plan
        try:
            for identity in identities:
                check_worker_identity(plan.encoder_identity, identity)
            by_index: dict[int, ShardInfo] = {}
            for index, info in infos:
                if index in by_index:
                    raise AddError(f"two attempts of delta shard {index} were both committed: {by_index[index].path} "
                                   f"and {info.path}; nothing was published, re-run the add.")
                by_index[index] = info
            infos = [by_index[i] for i in sorted(by_index) if by_index[i].count]
            counts = check_counts(infos=infos, records_read=records_read, failed=failed,
                                  dead_letter_dir=plan.dead_letter_dir)
            # A real ConcurrentUpdateError propagates: the job fails with its message and nothing is published.
            manifest = publish_add_version(plan, delta_infos=infos, new_class_names=class_names,
                                           counts=counts._asdict())
        except (AddError, ConcurrentUpdateError):
            _abandon(plan)
            raise
        removed = remove_add_leftovers(plan, manifest)
        _LOG.info("published version %d of %s: added %d entries in %d delta shard(s), new classes %s; %d failed "
                  "(%s); %d abandoned delta shard attempt(s) removed", manifest.version, plan.root, counts.added,
                  len(infos), manifest.change["new_classes"], counts.failed, sorted(dead_letter_files), len(removed))
        yield manifest


class PublishAdd(beam.PTransform):
    """Publishes version n+1 once, after every delta shard and dead letter is written (side inputs order it)."""

    def __init__(self, plan: AddPlan, *, identities, class_names, records_read, failed, dead_letter_files):
        super().__init__()
        self._plan = plan
        self._side = dict(identities=identities, class_names=class_names, records_read=records_read,
                          failed=failed, dead_letter_files=dead_letter_files)

    def expand(self, infos):
        s = self._side
        return (infos.pipeline
                | "Once" >> beam.Create([None])
                | "Publish" >> beam.ParDo(
                    _PublishAddFn(self._plan), infos=beam.pvalue.AsList(infos),
                    identities=beam.pvalue.AsList(s["identities"]),
                    class_names=beam.pvalue.AsSingleton(s["class_names"]),
                    records_read=beam.pvalue.AsSingleton(s["records_read"]),
                    failed=beam.pvalue.AsSingleton(s["failed"]),
                    dead_letter_files=beam.pvalue.AsList(s["dead_letter_files"])))


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmem add", description=__doc__.split("\n")[0],
                                     epilog="Other flags are Beam pipeline options (--runner, --project, ...).")
    parser.add_argument("--memory", required=True, help="an existing memory (local or gs://); gets a new version")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images",
                        help="new labelled images: ImageFolder DIR (DIR/<class>/<image>; ids are paths relative to "
                             "DIR), tfrecord:PATTERN or manifest:FILE.csv|.jsonl; local or gs://")
    source.add_argument("--embeddings",
                        help="precomputed embeddings instead of images, for a memory built from precomputed "
                             "embeddings: clip:DIR[,label_column=COL] or tfrecord:PATTERN (as `vmem build "
                             "--embeddings`); needs --encoder-id")
    parser.add_argument("--encoder-id", default=None,
                        help="with --embeddings: name of the encoder that computed them; must be the memory's")
    parser.add_argument("--delta-shard-size", type=int, default=DEFAULT_DELTA_SHARD_SIZE,
                        help=f"target entries per delta shard (default {DEFAULT_DELTA_SHARD_SIZE}); delta shards are "
                             "searched by brute force until `vmem reindex` folds them in")
    parser.add_argument("--min-batch-size", type=int, default=None, help="RunInference batch bounds (default: the "
                                                                          "memory's build config)")
    parser.add_argument("--max-batch-size", type=int, default=None)
    return parser


def add_pipeline(p: beam.Pipeline, *, plan: AddPlan, source, target_size: int, min_batch_size: int = 16,
                 max_batch_size: int = 64, progress_every: int = 200, identity: dict | None = None,
                 entry_count: int | None = None) -> None:
    """Adds the add graph to ``p``.

    Args:
      source: An ImageSource (images are decoded and embedded with the memory's encoder) or an EmbeddingSource
        (precomputed; ``identity`` is their encoder identity, checked by `check_precomputed_identity`).
      entry_count: Rows the EmbeddingSource holds, when known at launch (sizes the id-bucket join).
    """
    old = plan.class_names
    if isinstance(source, ImageSource):
        preprocess = resolve_preprocess(plan.encoder)
        read, read_failures = p | "ReadImages" >> ReadImages(source)
        records, id_failures = read | "RejectKnownIds" >> RejectKnownIds(plan.root, plan.base_version)
        images, decode_failures = records | "DecodeImages" >> DecodeImages(preprocess)
        entries, embed_failures, identities = images | "EmbedImages" >> EmbedImages(
            plan.encoder, min_batch_size=min_batch_size, max_batch_size=max_batch_size, progress_every=progress_every)
        blocks = entries | "ToBlocks" >> EntriesToBlocks()
        failure_sets = [read_failures, id_failures, decode_failures, embed_failures]
        records_read = ((read, read_failures) | "AllRead" >> beam.Flatten()
                        | "CountRead" >> beam.combiners.Count.Globally())
        rejected = None
        kept_rows = count_rows(blocks, "CountEntries")
        labels = block_class_names(blocks)
    else:
        blocks, read_failures, identities, records_read = read_precomputed(p, source, identity)
        rejected, id_failures, kept = blocks | "RejectKnownIds" >> RejectKnownIdsInBlocks(
            plan.root, plan.base_version, new_rows=entry_count)
        failure_sets = [read_failures, id_failures]
        kept_rows = kept | "CountKept" >> (beam.Map(lambda k: k[0]) | beam.CombineGlobally(sum))
        labels = (kept
                  | "KeptLabels" >> beam.FlatMap(lambda k: k[1])
                  | "DistinctLabels" >> beam.Distinct()
                  | "CollectLabels" >> beam.combiners.ToList())
    class_names = labels | "ExtendClassNames" >> beam.Map(lambda names: list(extended_class_names(old, names)))
    count = kept_rows | "DeltaShardCount" >> beam.Map(lambda n: max(1, math.ceil(n / target_size)))
    infos, write_failures = blocks | "WriteDeltaShards" >> WriteDeltaShards(
        plan, count=count, class_names=class_names, identities=identities, rejected=rejected)
    failures = tuple(failure_sets) + (write_failures,) | "AllFailures" >> beam.Flatten()
    dead_letter_files = (failures
                         | "DeadLetterJson" >> beam.Map(lambda f: f.to_json())
                         | "WriteDeadLetters" >> beam.io.WriteToText(
                             storage.join(plan.dead_letter_dir, f"failed-{plan.job_id}"), file_name_suffix=".jsonl"))
    failed = failures | "CountFailed" >> beam.combiners.Count.Globally()
    _ = infos | "PublishAdd" >> PublishAdd(plan, identities=identities, class_names=class_names,
                                           records_read=records_read, failed=failed,
                                           dead_letter_files=dead_letter_files)


def _cause(error: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``error``'s cause/context chain (runners wrap DoFn errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


_USER_ERRORS = (ConcurrentUpdateError, DuplicateIdError, AddError, EncoderMismatchError, ManifestError,
                UsageError)


def launch(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
           ) -> tuple[beam.runners.runner.PipelineResult, AddPlan]:
    """Like :func:`run`, also returning the :class:`AddPlan` (base version, job id, paths) it ran."""
    args, beam_args = build_arg_parser().parse_known_args(argv)
    if args.delta_shard_size < 1:
        raise ValueError(f"--delta-shard-size must be >= 1, got {args.delta_shard_size}.")
    plan = plan_add(args.memory, images=args.images is not None)
    manifest = read_version(plan.root, plan.base_version)
    build_config = manifest.build_config
    identity = entry_count = None
    if args.embeddings is not None:
        from pipelines.io.embedding_sources import (  # pylint: disable=g-import-not-at-top
            count_entries, parse_embeddings_spec)
        source = parse_embeddings_spec(args.embeddings)
        identity = check_precomputed_identity(plan, args.encoder_id, source, memory_dim=manifest.dim)
        entry_count = count_entries(source)
    else:
        if args.encoder_id:
            raise UsageError("--encoder-id applies to --embeddings only; images are embedded with the memory's own "
                             "encoder")
        if is_precomputed(plan.encoder_identity):
            name = plan.encoder_identity.get("name")
            raise AddError(f"{plan.root} was built from precomputed embeddings of encoder {name!r}, which this job "
                           f"cannot run on images: add embeddings of that encoder with --embeddings SPEC "
                           f"--encoder-id {name}. Nothing was published.")
        source = parse_image_spec(args.images)
    min_batch = args.min_batch_size or int(build_config.get("min_batch_size", 16))
    max_batch = max(min_batch, args.max_batch_size or int(build_config.get("max_batch_size", 64)))
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    add_pipeline(p, plan=plan, source=source, target_size=args.delta_shard_size, min_batch_size=min_batch,
                 max_batch_size=max_batch, progress_every=int(build_config.get("progress_every", 200)),
                 identity=identity, entry_count=entry_count)
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # Runners wrap DoFn errors in their own types; surface ours unchanged.
        cause = _cause(e, _USER_ERRORS)
        if cause is not None and cause is not e:
            raise type(cause)(str(cause)) from e
        raise
    return result, plan


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses ``argv`` (add flags + Beam flags), builds the add graph and runs it to completion.

    Raises:
      ConcurrentUpdateError: another writer published after launch; nothing was published, re-run.
      AddError: no entry could be added, the workers ran a different encoder, or precomputed embeddings of
        another encoder (or dim) than the memory's.
    """
    return launch(argv, test_pipeline)[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``vmem add``: runs the job and prints what was added; returns the exit status (0 ok, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_arg_parser().print_help()
        return 0
    start = time.monotonic()
    try:
        _, plan = launch(argv)
        manifest = read_version(plan.root, plan.new_version)
    except (*_USER_ERRORS, ValueError, FileNotFoundError) as e:
        print(f"vmem add: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - start
    change = manifest.change
    c = change.get("counts", {})
    deltas = [s for s in manifest.delta_shards if s.path.startswith(f"deltas/{plan.version_tag}/")]
    new = change.get("new_classes") or []
    print(f"added {change['added']} entries to {plan.root} in {len(deltas)} delta shard(s): version "
          f"{manifest.version} (parent {manifest.parent}); {manifest.total} live entries, "
          f"{len(manifest.class_names)} classes")
    print(f"new classes  {len(new)}: {', '.join(new) if new else '(none)'}")
    print(f"read {c.get('read')}, added {c.get('added')}, failed {c.get('failed')}; {elapsed:.1f}s "
          f"({c.get('read', 0) / max(elapsed, 1e-9):.1f} entries/s)")
    print(f"failed records (with reasons): {plan.dead_letter_dir}/" if c.get("failed") else
          f"no failed records (dead letters: {plan.dead_letter_dir}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
