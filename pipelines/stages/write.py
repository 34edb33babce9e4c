"""Write a memory: ``WriteMemoryShards`` (one ScaNN partition per shard), ``WriteDeadLetters`` and
``WriteManifest`` (last, atomically). Thin adapters over ``memory.store.shard`` and ``memory.store.manifest``.

Bounded memory per worker: entries travel as `EntryBlock`s and are *spilled* to files under
``OUTPUT/.build-tmp/`` (one file per shard per ~64k rows per bundle) instead of being grouped in the runner:
the GroupByKey only moves (shard, spill file) references, and the worker that builds a shard reads that
shard's spill files, holding one shard (sized by ``BuildConfig.target_shard_size``) plus ScaNN's copy.
What a worker holds, at most: a block (``BLOCK_ROWS`` rows) and each shard's unwritten rows of the bundle
(``SPILL_ROWS`` rows per shard) while spilling; while writing a shard, its ``rows x dim`` float32 once
(`read_shard_spills` fills them in id order, one spill file at a time) plus ScaNN's copy and codes.

Atomic under retries: every attempt at a shard writes its own directory ``shards/<name>-<attempt>``; the
manifest, written once at the end, names the attempt that counts, and the directories of other attempts
and the spill files are deleted after it is written. A retried or zombie attempt never mixes its files into
the published shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import re
import secrets
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from memory import storage
from memory.index.shard_index import IndexConfig
from memory.regions.layout import GRID_KEY
from memory.store.purge import DEAD_LETTER_DIR  # One name for the folder the clean-up sweeps too.
from memory.store.manifest import FORMAT_VERSION, BuildCounts, Manifest, Metric, RouterRef, ShardInfo
from memory.store.versions import write_manifest
from memory.store.shard import ShardData, write_shard
from memory.index.template import local_template
from memory.store.sharding import shard_for_id, shard_name
from pipelines.io.readers import FAILED_TAG, failed_record
from pipelines.records import EmbeddedImage, EntryBlock, Stage
from pipelines.stages.progress import Progress

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
SHARDS_DIR = "shards"
SPILL_DIR = ".build-tmp"
# Rows per spill file: large enough that a billion entries make ~1e4-1e5 files, small enough to buffer.
SPILL_ROWS = 65_536
BLOCK_ROWS = 4_096
_ATTEMPT_RE = re.compile(r"^shard-\d{5}-of-\d{5}(-[0-9a-f]{8})?$")


def shard_paths(output: str, index: int, num_shards: int) -> tuple[str, str, str]:
    """(name, path relative to the memory root, absolute path) of shard ``index``."""
    name = shard_name(index, num_shards)
    rel = f"{SHARDS_DIR}/{name}"
    return name, rel, storage.join(output, rel)


def entries_to_block(entries: list[EmbeddedImage]) -> EntryBlock:
    """Stacks per-entry records into one EntryBlock (labels stay class names)."""
    return EntryBlock(ids=np.array([e.id for e in entries], dtype=str),
                      labels=np.array([e.label for e in entries], dtype=str),
                      uris=np.array([e.uri for e in entries], dtype=str),
                      embeddings=np.stack([np.asarray(e.embedding, np.float32) for e in entries]))


class EntriesToBlocks(beam.PTransform):
    """EmbeddedImage -> EntryBlock of up to ``block_size`` rows (what the write stages consume)."""

    def __init__(self, block_size: int = BLOCK_ROWS):
        super().__init__()
        self._block_size = block_size

    def expand(self, entries):
        return (entries
                | "Batch" >> beam.BatchElements(min_batch_size=min(256, self._block_size),
                                                max_batch_size=self._block_size)
                | "Stack" >> beam.Map(entries_to_block))


def block_class_names(blocks):
    """PCollection of EntryBlock -> singleton PCollection of the sorted distinct class names."""
    return (blocks
            | "BlockLabels" >> beam.FlatMap(lambda b: np.unique(b.labels).tolist())
            | "DistinctLabels" >> beam.Distinct()
            | "CollectLabels" >> beam.combiners.ToList()
            | "SortLabels" >> beam.Map(sorted))


def count_rows(blocks, label: str = "CountRows"):
    """PCollection of EntryBlock -> singleton PCollection of the total row count."""
    return blocks | label >> (beam.Map(len) | beam.CombineGlobally(sum))


def shards_for_count(count: int, target_shard_size: int) -> int:
    """Shards for ``count`` entries at ``target_shard_size`` entries per shard (at least 1)."""
    return max(1, math.ceil(count / target_shard_size))


def concat_blocks(blocks: list[EntryBlock], dim: int | None = None) -> EntryBlock:
    blocks = [b for b in blocks if len(b)]
    if not blocks:
        return EntryBlock(np.zeros(0, "<U1"), np.zeros(0, "<U1"), np.zeros(0, "<U1"),
                          np.zeros((0, dim or 0), np.float32))
    if len(blocks) == 1:
        return blocks[0]
    return EntryBlock(*(np.concatenate([getattr(b, f) for b in blocks]) for f in EntryBlock._fields))


def dedupe_rows(ids: np.ndarray, uris: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """Rows to keep, the first of each id by uri (deterministic), and [(duplicate row, kept row)].

    The rows come back ascending; None when every id is distinct (keep them all). Duplicate ids would make
    "forget id" ambiguous, so the extra copies become dead letters.
    """
    if len(ids) < 2:
        return None, []
    order = np.lexsort((uris, ids))
    ids = ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    if first.all():
        return None, []
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    dups = [(int(order[i]), int(order[run_start[i]])) for i in np.flatnonzero(~first)]
    return np.sort(order[first]), dups


def dedupe_block(block: EntryBlock) -> tuple[EntryBlock, list[tuple[int, int]]]:
    """Keeps the first row of each id by uri (`dedupe_rows`); returns (kept rows, [(duplicate row, kept row)])."""
    rows, dups = dedupe_rows(block.ids, block.uris)
    return (block, dups) if rows is None else (block.take(rows), dups)


def _spill_bytes(block: EntryBlock) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **block._asdict())
    return buf.getvalue()


def read_spill(path: str, fields: tuple[str, ...] = EntryBlock._fields) -> tuple[np.ndarray, ...]:
    """A spill file's arrays (``fields``; all of them, an EntryBlock's fields in order, by default)."""
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
        if fields == EntryBlock._fields:
            return EntryBlock(*(z[f] for f in fields))
        return tuple(z[f] for f in fields)


class SpillBlocks(beam.DoFn):
    """EntryBlock -> (shard, spill path) after writing the block's rows of each shard to spill files.

    Rows are buffered per shard across the bundle and written once a shard has ``spill_rows`` of them (and at
    the end of the bundle), so spill files stay large. ``assign(block, side) -> int [n]`` picks the shards.
    """

    def __init__(self, spill_dir: str, assign, spill_rows: int = SPILL_ROWS, total: int | None = None):
        self._spill_dir = spill_dir
        self._assign = assign
        self._spill_rows = spill_rows
        self._total = total  # Entries of the whole job, when known: the progress lines' ETA.
        self._spilled_rows = Metrics.counter(_NAMESPACE, "entries_spilled")

    def _progress(self) -> Progress:
        # Made on first use, once per worker: subclasses (the re-index's) have setups of their own.
        if getattr(self, "_progress_lines", None) is None:
            self._progress_lines = Progress("read and spilled", total=self._total)
        return self._progress_lines

    def start_bundle(self):
        self._buffers: dict[int, list[EntryBlock]] = {}
        self._buffered: dict[int, int] = {}

    def _flush(self, shard: int):
        block = concat_blocks(self._buffers.pop(shard))
        self._buffered.pop(shard)
        path = storage.join(self._spill_dir, f"shard-{shard:05d}", f"{secrets.token_hex(8)}.npz")
        storage.write_bytes(path, _spill_bytes(block))
        self._spilled_rows.inc(len(block))
        return shard, path

    def process(self, block, *side):
        if not len(block):
            return
        self._progress().add(len(block))
        shards = np.asarray(self._assign(block, *side), dtype=np.int64)
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for rows in np.split(order, bounds):
            shard = int(shards[rows[0]])
            self._buffers.setdefault(shard, []).append(block.take(rows))
            self._buffered[shard] = self._buffered.get(shard, 0) + len(rows)
            if self._buffered[shard] >= self._spill_rows:
                yield self._flush(shard)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow  # pylint: disable=g-import-not-at-top
        from apache_beam.utils.timestamp import MIN_TIMESTAMP  # pylint: disable=g-import-not-at-top
        from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top

        for shard in sorted(self._buffers):
            yield WindowedValue(self._flush(shard), MIN_TIMESTAMP, [GlobalWindow()])
        self._progress().flush()


def _hash_assign(block: EntryBlock, num_shards: int) -> np.ndarray:
    return np.fromiter((shard_for_id(i, num_shards) for i in block.ids.tolist()), np.int64, len(block))


def _router_assign(block: EntryBlock, router) -> np.ndarray:
    return router[0][0].assign(block.embeddings)  # AsList of the one (Router, RouterRef).


def _failed_rows(ids: np.ndarray, uris: np.ndarray, dups) -> list:
    return [failed_record(str(ids[d]), str(uris[d]), "duplicate_id", f"id already used by {uris[k]}", Stage.EMBED)
            for d, k in dups]


def _class_indices(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """int32 index of each label in the sorted ``class_names``."""
    names = np.asarray(class_names, dtype=str)
    index = np.searchsorted(names, labels) if len(names) else np.zeros(len(labels), np.int64)
    found = index < len(names)
    found[found] = names[index[found]] == labels[found]
    if not found.all():
        raise BuildError(f"label {str(labels[~found][0])!r} is not among the build's {len(names)} class names")
    return index.astype(np.int32)


def read_spills(paths, dim: int | None = None) -> EntryBlock:
    """One shard's spill files (from `SpillBlocks`) as one block; ``dim`` shapes an empty result."""
    return concat_blocks([read_spill(p) for p in sorted(paths)], dim)


class _DedupeFn(beam.DoFn):
    """(id-hash bucket, spill paths) -> that bucket's rows without duplicate ids, as blocks (+ failures).

    Every copy of an id is in the same bucket, so deduplicating per bucket is global; a bucket holds about
    one shard of rows. Its spill files are deleted once its blocks are emitted.
    """

    def process(self, element):
        _, paths = element
        full = read_spills(paths)
        block, dups = dedupe_block(full)
        yield from _failed_rows(full.ids, full.uris, dups)
        del full
        for start in range(0, len(block), BLOCK_ROWS):
            yield block.take(np.arange(start, min(start + BLOCK_ROWS, len(block))))


def read_shard_spills(paths, class_names: list[str]) -> tuple[ShardData, list]:
    """One shard's spill files as its ShardData, rows deduplicated and in id order, and the failures of
    the dropped copies of an id.

    Two passes keep one copy of the rows in memory (the shard's ``rows x dim`` float32 plus one spill file):
    the ids, labels and uris of every file first, which decide the kept rows and their order, then each
    file's embeddings, copied straight to their sorted rows.
    """
    paths = sorted(paths)
    meta = [read_spill(p, ("ids", "labels", "uris")) for p in paths]
    sizes = [len(m[0]) for m in meta]
    ids, labels, uris = (np.concatenate([m[f] for m in meta]) for f in range(3))
    del meta
    rows, dups = dedupe_rows(ids, uris)
    failures = _failed_rows(ids, uris, dups)
    rows = np.arange(len(ids)) if rows is None else rows
    order = rows[np.argsort(ids[rows], kind="stable")]  # write_shard then sorts nothing.
    label_index = _class_indices(labels[order], class_names)
    target = np.full(len(ids), -1, dtype=np.int64)
    target[order] = np.arange(len(order))
    embeddings = None
    start = 0
    for path, size in zip(paths, sizes):
        (part,) = read_spill(path, ("embeddings",))
        if embeddings is None:
            embeddings = np.empty((len(order), part.shape[1]), dtype=np.float32)
        to = target[start:start + size]
        keep = to >= 0
        embeddings[to[keep]] = part[keep]
        start += size
    if embeddings is None:
        embeddings = np.zeros((0, 0), np.float32)
    return ShardData(ids=ids[order], labels=label_index, uris=uris[order],
                     embeddings=embeddings), failures


class _WriteShardFn(beam.DoFn):
    def __init__(self, output: str, index_config: IndexConfig, total: int | None = None):
        self._output = output
        self._index_config = index_config
        self._total = total
        self._written = Metrics.counter(_NAMESPACE, "entries_written")

    def setup(self):
        self._progress = Progress("shards written", total=self._total, every_s=0.0)

    def process(self, element, class_names, num_shards, template=None):
        index, paths = element
        start = time.perf_counter()
        data, failures = read_shard_spills(paths, class_names)
        yield from failures
        name, _, _ = shard_paths(self._output, index, num_shards)
        # One directory per attempt: a retried or zombie attempt never overwrites the files of another.
        rel = f"{SHARDS_DIR}/{name}-{secrets.token_hex(4)}"
        # write_shard drops its rows once ScaNN holds its own copy: no reference is kept here meanwhile.
        held = [data]
        del data
        with contextlib.ExitStack() as stack:
            # The memory-wide index template (TrainIndexTemplate), when this hash build has one.
            template_dir = stack.enter_context(local_template(self._output, template)) if template else None
            info = write_shard(storage.join(self._output, rel), held.pop(), index_config=self._index_config,
                               name=name, root_relative_path=rel, template_dir=template_dir)
        self._written.inc(info.count)
        seconds = time.perf_counter() - start
        _LOG.info("wrote %s: %d entries, index %s, in %.1f s (%.0f entries/s)", name, info.count, info.index_kind,
                  seconds, info.count / max(seconds, 1e-9))
        self._progress.add(info.count)
        yield (index, info)


class WriteMemoryShards(beam.PTransform):
    """EntryBlock -> (shard index, ShardInfo) after writing each shard's entry table and ScaNN searcher.

    Rows go to shard ``shard_for_id(id, num_shards)`` (a stable hash) or, given a ``router`` (a PCollection
    holding one (Router, RouterRef) from `TrainRouter`), to the shard owning their nearest centroid. Rows are
    spilled to files (see the module docstring) so one worker builds one shard from its files. Copies of an
    id are dropped (the first by uri is kept) and reported: with a router, rows are first spilled by id hash
    and deduplicated per bucket, since two copies of an id with different embeddings could route apart.
    Returns ``(infos, failures)``. ``num_shards``: a singleton PCollection (known at launch, or counted).
    """

    def __init__(self, output: str, *, num_shards, index_config: IndexConfig, class_names, router=None,
                 spill_rows: int = SPILL_ROWS, template=None, total: int | None = None):
        super().__init__()
        self._total = total  # Entries the source holds, when known at launch: progress lines get an ETA.
        self._output = output
        self._num_shards = num_shards
        self._index_config = index_config
        self._class_names = class_names  # PCollection with one sorted list, used as a side input.
        self._router = router
        self._template = template  # One {"path", "id"} or {} from TrainIndexTemplate, or None.
        self._spill_rows = spill_rows

    def expand(self, blocks):
        spill = storage.join(self._output, SPILL_DIR)
        n = beam.pvalue.AsSingleton(self._num_shards)
        failures = []
        if self._router is not None:
            bucketed = (blocks
                        | "SpillByIdHash" >> beam.ParDo(SpillBlocks(storage.join(spill, "dedupe"), _hash_assign,
                                                                 self._spill_rows), n)
                        | "GroupByIdHash" >> beam.GroupByKey()
                        | "Dedupe" >> beam.ParDo(_DedupeFn()).with_outputs(FAILED_TAG, main="blocks"))
            failures.append(bucketed[FAILED_TAG])
            spilled = bucketed.blocks | "SpillByRoute" >> beam.ParDo(
                SpillBlocks(storage.join(spill, "routed"), _router_assign, self._spill_rows),
                beam.pvalue.AsList(self._router))
        else:
            spilled = blocks | "SpillByShard" >> beam.ParDo(
                SpillBlocks(storage.join(spill, "hashed"), _hash_assign, self._spill_rows, self._total), n)
        results = (
            spilled
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(
                _WriteShardFn(self._output, self._index_config, self._total),
                class_names=beam.pvalue.AsSingleton(self._class_names), num_shards=n,
                **({} if self._template is None else {"template": beam.pvalue.AsSingleton(self._template)})
            ).with_outputs(FAILED_TAG, main="infos"))
        failures.append(results[FAILED_TAG])
        return results.infos, (tuple(failures) | "ShardFailures" >> beam.Flatten())


class WriteDeadLetters(beam.PTransform):
    """FailedRecord -> JSON lines under ``OUTPUT/dead_letter/``; returns the written file names."""

    def __init__(self, output: str):
        super().__init__()
        self._prefix = storage.join(output, DEAD_LETTER_DIR, "failed")

    def expand(self, failures):
        return (failures
                | "ToJson" >> beam.Map(lambda f: f.to_json())
                | "WriteJsonl" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))


class BuildError(RuntimeError):
    """The build produced no usable memory (with the reason and where to look)."""


def assemble_manifest(*, output: str, infos: list[tuple[int, ShardInfo]], num_shards: int, index_config: IndexConfig,
                      identities: list[str], class_names: list[str], records_read: int, failed: int,
                      build_config: dict, dead_letter_files: list[str], router: RouterRef | None = None
                      ) -> Manifest:
    """Checks what the workers produced and writes empty shards for hash buckets that got no entry."""
    if not identities:
        raise BuildError(
            f"no image could be embedded ({failed} failed of {records_read} read); see the reasons in "
            f"{storage.join(output, DEAD_LETTER_DIR)}/.")
    if len(set(identities)) != 1:
        raise BuildError(f"workers ran different encoders: {sorted(set(identities))}; pin one encoder uri.")
    encoder = json.loads(identities[0])
    by_index = dict(infos)
    if len(by_index) != len(infos):
        raise BuildError(f"two attempts of one shard were both committed: {sorted(i for i, _ in infos)}")
    shards = []
    for i in range(num_shards):
        if i not in by_index:
            name, rel, path = shard_paths(output, i, num_shards)
            by_index[i] = write_shard(path, ShardData.empty(int(encoder["dim"])), index_config=index_config,
                                      name=name, root_relative_path=rel)
        shards.append(by_index[i])
    # A region build (memory.regions) stores 1 + G*G entries per embedded image; the counts count images.
    grid = build_config.get(GRID_KEY)
    embedded = sum(s.count for s in shards) // (1 + grid * grid if grid else 1)
    if records_read != embedded + failed:
        raise BuildError(f"bookkeeping mismatch: read {records_read} != embedded {embedded} + failed {failed}.")
    return Manifest(
        format_version=FORMAT_VERSION, encoder=encoder, dim=int(encoder["dim"]), metric=Metric.COSINE,
        class_names=tuple(class_names), shards=tuple(shards),
        build_config=dict(build_config, dead_letter_files=sorted(dead_letter_files)),
        counts=BuildCounts(read=records_read, embedded=embedded, failed=failed),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), router=router)


def remove_build_leftovers(output: str, manifest: Manifest) -> list[str]:
    """Deletes the spill files and the shard directories of attempts the manifest does not name.

    Only build-made names (``shards/shard-IIIII-of-NNNNN[-attempt]``) are touched. Returns what was deleted
    (root-relative).
    """
    referenced = {s.path for s in manifest.shards}
    removed = []
    shards_dir = storage.join(output, SHARDS_DIR)
    children = storage.list_dir(shards_dir) if storage.exists(shards_dir) else []
    for child in children:
        rel = f"{SHARDS_DIR}/{child}"
        if _ATTEMPT_RE.match(child) and rel not in referenced:
            storage.remove_tree(storage.join(output, rel))
            removed.append(rel)
    storage.remove_tree(storage.join(output, SPILL_DIR))
    return removed


def publish_build(output: str, manifest: Manifest) -> Manifest:
    """Publishes the built memory as version 1; idempotent when a retried bundle publishes it again.

    A retry of the manifest step (its bundle failed after the upload, say) finds version 1 already there:
    if it is this build (same shards, router, classes and counts; only created_at may differ) that is
    success, anything else is a real conflict and is raised.
    """
    from memory.store.versions import ConcurrentUpdateError, read_version  # pylint: disable=g-import-not-at-top

    try:
        write_manifest(output, manifest)
        return manifest
    except ConcurrentUpdateError:
        try:
            existing = read_version(output, 1)
        except Exception:  # pylint: disable=broad-except  # Unreadable: not ours; report the conflict.
            raise ConcurrentUpdateError(f"{output} already holds a memory; it is not this build's") from None
        ours = dataclasses.replace(manifest, version=existing.version, parent=existing.parent,
                                   created_at=existing.created_at, change=existing.change)
        if existing != ours:
            raise
        _LOG.info("manifest of %s was already published by an earlier attempt of this step", output)
        return existing


class _WriteManifestFn(beam.DoFn):
    def __init__(self, output: str, index_config: IndexConfig, build_config: dict):
        self._output = output
        self._index_config = index_config
        self._build_config = build_config

    def process(self, unused, infos, identities, class_names, records_read, failed, dead_letter_files, router,
                num_shards, template=()):
        if len(router) > 1:
            raise BuildError(f"{len(router)} routers were trained for one build; expected one")
        build_config = dict(self._build_config, num_shards=num_shards)
        if template and template[0]:
            build_config["index_template"] = template[0]
        manifest = assemble_manifest(
            output=self._output, infos=infos, num_shards=num_shards, index_config=self._index_config,
            identities=identities, class_names=class_names, records_read=records_read, failed=failed,
            build_config=build_config, dead_letter_files=dead_letter_files,
            router=router[0][1] if router else None)
        manifest = publish_build(self._output, manifest)
        removed = remove_build_leftovers(self._output, manifest)
        _LOG.info("memory written to %s: %d entries in %d shards, %d failed (%d abandoned shard attempts removed)",
                  self._output, manifest.counts.embedded, len(manifest.shards), manifest.counts.failed,
                  len(removed))
        yield manifest


class WriteManifest(beam.PTransform):
    """Writes ``manifest.json`` once every shard and dead letter is written (side inputs enforce the order)."""

    def __init__(self, output: str, *, num_shards, index_config: IndexConfig, build_config: dict,
                 identities, class_names, records_read, failed, dead_letter_files, router=None, template=None):
        super().__init__()
        self._fn = _WriteManifestFn(output, index_config, build_config)
        self._side = dict(identities=identities, class_names=class_names, records_read=records_read,
                          failed=failed, dead_letter_files=dead_letter_files, router=router,
                          num_shards=num_shards)
        self._template = template

    def expand(self, infos):
        s = self._side
        return (
            infos.pipeline
            | "Once" >> beam.Create([None])
            | "Write" >> beam.ParDo(
                self._fn,
                infos=beam.pvalue.AsList(infos),
                identities=beam.pvalue.AsList(s["identities"]),
                class_names=beam.pvalue.AsSingleton(s["class_names"]),
                records_read=beam.pvalue.AsSingleton(s["records_read"]),
                failed=beam.pvalue.AsSingleton(s["failed"]),
                dead_letter_files=beam.pvalue.AsList(s["dead_letter_files"]),
                router=beam.pvalue.AsList(s["router"] if s["router"] is not None
                                          else infos.pipeline | "NoRouter" >> beam.Create([])),
                num_shards=beam.pvalue.AsSingleton(s["num_shards"]),
                **({} if self._template is None else {"template": beam.pvalue.AsList(self._template)})))
