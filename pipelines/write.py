"""Write a memory: ``WriteMemoryShards`` (one ScaNN partition per shard), ``WriteDeadLetters`` and
``WriteManifest`` (last, atomically). Thin adapters over ``memory.shard`` and ``memory.manifest``."""

from __future__ import annotations

import datetime
import json
import logging

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from memory import storage
from memory.index import IndexConfig
from memory.manifest import FORMAT_VERSION, BuildCounts, Manifest, Metric, RouterRef, ShardInfo, write_manifest
from memory.routing import RouterConfig, router_sample_key, train_router, write_router
from memory.shard import ShardData, write_shard
from memory.sharding import shard_for_id, shard_name
from pipelines.readers import FAILED_TAG, _failed
from pipelines.records import EmbeddedImage, Stage

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
SHARDS_DIR = "shards"
DEAD_LETTER_DIR = "dead_letter"


def shard_paths(output: str, index: int, num_shards: int) -> tuple[str, str, str]:
    """(name, path relative to the memory root, absolute path) of shard ``index``."""
    name = shard_name(index, num_shards)
    rel = f"{SHARDS_DIR}/{name}"
    return name, rel, storage.join(output, rel)


def entries_to_shard_data(entries: list[EmbeddedImage], class_index: dict[str, int], dim: int | None = None
                          ) -> ShardData:
    """Stacks entries into the column arrays of a shard (rows in any order; write_shard sorts by id)."""
    if not entries:
        return ShardData(ids=np.array([], dtype=str), labels=np.zeros(0, np.int32), uris=np.array([], dtype=str),
                         embeddings=np.zeros((0, dim or 0), np.float32))
    return ShardData(
        ids=np.array([e.id for e in entries], dtype=str),
        labels=np.array([class_index[e.label] for e in entries], dtype=np.int32),
        uris=np.array([e.uri for e in entries], dtype=str),
        embeddings=np.stack([e.embedding for e in entries]).astype(np.float32))


def split_duplicate_ids(entries) -> tuple[list[EmbeddedImage], list[tuple[EmbeddedImage, EmbeddedImage]]]:
    """Keeps the first entry of each id (by uri, deterministic); returns (kept, [(duplicate, kept one)]).

    Duplicate ids would make "forget id" ambiguous, so the extra copies become dead letters.
    """
    unique: dict[str, EmbeddedImage] = {}
    duplicates = []
    for entry in sorted(entries, key=lambda e: (e.id, e.uri)):
        if entry.id in unique:
            duplicates.append((entry, unique[entry.id]))
        else:
            unique[entry.id] = entry
    return list(unique.values()), duplicates


class DedupeIds(beam.PTransform):
    """EmbeddedImage -> (entries with unique ids, failures for the extra copies).

    Hash sharding sends every copy of an id to the same shard, where `_WriteShardFn` drops the extras; a
    router assigns by embedding, so copies of one id with different images could land in different shards.
    Partition-routed builds therefore group by id first (keeping the first copy by uri, as the shards do).
    """

    def expand(self, entries):
        def split(id_and_entries):
            _, group = id_and_entries
            kept, duplicates = split_duplicate_ids(group)
            yield from kept
            for entry, first in duplicates:
                yield _failed(entry.id, entry.uri, "duplicate_id", f"id already used by {first.uri}", Stage.EMBED)

        results = (entries
                   | "KeyById" >> beam.Map(lambda e: (e.id, e))
                   | "GroupById" >> beam.GroupByKey()
                   | "KeepFirst" >> beam.FlatMap(split).with_outputs(FAILED_TAG, main="unique"))
        return results.unique, results[FAILED_TAG]


class _WriteShardFn(beam.DoFn):
    def __init__(self, output: str, num_shards: int, index_config: IndexConfig):
        self._output = output
        self._num_shards = num_shards
        self._index_config = index_config
        self._written = Metrics.counter(_NAMESPACE, "entries_written")

    def process(self, element, class_names):
        index, entries = element
        class_index = {name: i for i, name in enumerate(class_names)}
        kept, duplicates = split_duplicate_ids(entries)
        for entry, first in duplicates:
            yield _failed(entry.id, entry.uri, "duplicate_id", f"id already used by {first.uri}", Stage.EMBED)
        name, rel, path = shard_paths(self._output, index, self._num_shards)
        data = entries_to_shard_data(kept, class_index)
        info = write_shard(path, data, index_config=self._index_config, name=name, root_relative_path=rel)
        self._written.inc(info.count)
        _LOG.info("wrote %s: %d entries, index %s", name, info.count, info.index_kind)
        yield (index, info)


def _train_and_write_router(sample: list, *, output: str, num_shards: int, config: RouterConfig):
    """Router sample [(key, embedding)] -> (Router, RouterRef) after writing the router file."""
    ordered = sorted(sample, key=lambda kv: kv[0])  # Same order on every runner: a deterministic router.
    embeddings = np.stack([np.asarray(e, np.float32) for _, e in ordered]) if ordered else np.zeros((0, 1), np.float32)
    # EmbedImages already yields unit embeddings, as train_router expects.
    router = train_router(embeddings, num_shards=num_shards, config=config)
    ref = write_router(output, router)
    _LOG.info("router: %d centroids trained on %d entries, shard shares %s", ref.count, len(ordered),
              np.bincount(router.assign(embeddings), minlength=num_shards).tolist())
    return router, ref


class TrainRouter(beam.PTransform):
    """EmbeddedImage -> one (Router, RouterRef): a partition-routed memory's router, trained and written.

    The training sample is the ``config.training_sample_size`` entries with the smallest
    `memory.routing.router_sample_key` (a digest of the id), so the local build and every runner train on
    the same entries.
    """

    def __init__(self, output: str, *, num_shards: int, config: RouterConfig):
        super().__init__()
        self._output = output
        self._num_shards = num_shards
        self._config = config

    def expand(self, entries):
        return (entries
                | "SampleKey" >> beam.Map(lambda e: (router_sample_key(e.id), e.embedding))
                | "Sample" >> beam.combiners.Top.Smallest(self._config.training_sample_size, key=lambda kv: kv[0])
                | "Train" >> beam.Map(_train_and_write_router, output=self._output, num_shards=self._num_shards,
                                      config=self._config))


class WriteMemoryShards(beam.PTransform):
    """EmbeddedImage -> (shard index, ShardInfo) after writing each shard's arrays and ScaNN searcher.

    Entries go to shard ``shard_for_id(id) % num_shards`` (a stable hash) or, given a ``router`` (a
    PCollection holding one (Router, RouterRef) from `TrainRouter`), to the shard owning their nearest
    centroid; grouped so that one worker builds one shard. Returns ``(infos, failures)`` (failures:
    duplicate ids).
    """

    def __init__(self, output: str, *, num_shards: int, index_config: IndexConfig, class_names, router=None):
        super().__init__()
        self._output = output
        self._num_shards = num_shards
        self._index_config = index_config
        self._class_names = class_names  # PCollection with one sorted list, used as a side input.
        self._router = router

    def expand(self, entries):
        n = self._num_shards
        if self._router is None:
            keyed = entries | "KeyByShard" >> beam.Map(lambda e: (shard_for_id(e.id, n), e))
        else:
            keyed = entries | "KeyByRoutedShard" >> beam.Map(
                lambda e, r: (int(r[0].assign(e.embedding)[0]), e),
                r=beam.pvalue.AsSingleton(self._router))
        results = (
            keyed
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(
                _WriteShardFn(self._output, n, self._index_config),
                class_names=beam.pvalue.AsSingleton(self._class_names)).with_outputs(FAILED_TAG, main="infos"))
        return results.infos, results[FAILED_TAG]


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
    shards = []
    for i in range(num_shards):
        if i not in by_index:
            name, rel, path = shard_paths(output, i, num_shards)
            by_index[i] = write_shard(path, entries_to_shard_data([], {}, encoder["dim"]),
                                      index_config=index_config, name=name, root_relative_path=rel)
        shards.append(by_index[i])
    embedded = sum(s.count for s in shards)
    if records_read != embedded + failed:
        raise BuildError(f"bookkeeping mismatch: read {records_read} != embedded {embedded} + failed {failed}.")
    return Manifest(
        format_version=FORMAT_VERSION, encoder=encoder, dim=int(encoder["dim"]), metric=Metric.COSINE,
        class_names=tuple(class_names), shards=tuple(shards),
        build_config=dict(build_config, dead_letter_files=sorted(dead_letter_files)),
        counts=BuildCounts(read=records_read, embedded=embedded, failed=failed),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), router=router)


class _WriteManifestFn(beam.DoFn):
    def __init__(self, output: str, num_shards: int, index_config: IndexConfig, build_config: dict):
        self._output = output
        self._num_shards = num_shards
        self._index_config = index_config
        self._build_config = build_config

    def process(self, unused, infos, identities, class_names, records_read, failed, dead_letter_files, router):
        if len(router) > 1:
            raise BuildError(f"{len(router)} routers were trained for one build; expected one")
        manifest = assemble_manifest(
            output=self._output, infos=infos, num_shards=self._num_shards, index_config=self._index_config,
            identities=identities, class_names=class_names, records_read=records_read, failed=failed,
            build_config=self._build_config, dead_letter_files=dead_letter_files,
            router=router[0][1] if router else None)
        write_manifest(self._output, manifest)
        _LOG.info("memory written to %s: %d entries in %d shards, %d failed", self._output,
                  manifest.counts.embedded, len(manifest.shards), manifest.counts.failed)
        yield manifest


class WriteManifest(beam.PTransform):
    """Writes ``manifest.json`` once every shard and dead letter is written (side inputs enforce the order)."""

    def __init__(self, output: str, *, num_shards: int, index_config: IndexConfig, build_config: dict,
                 identities, class_names, records_read, failed, dead_letter_files, router=None):
        super().__init__()
        self._fn = _WriteManifestFn(output, num_shards, index_config, build_config)
        self._side = dict(identities=identities, class_names=class_names, records_read=records_read,
                          failed=failed, dead_letter_files=dead_letter_files, router=router)

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
                                          else infos.pipeline | "NoRouter" >> beam.Create([]))))
