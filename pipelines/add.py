"""The add job: embed new images with a memory's own encoder and publish them as delta shards (a new version).

Local (in-process runner)::

    vmem add --memory out/fmnist-memory --images data/new-images

Local with two worker processes::

    vmem add --memory out/fmnist-memory --images data/new-images \\
        --direct_running_mode=multi_processing --direct_num_workers=2

Dataflow (ship the code with setup.py, as for ``vmem build``)::

    vmem add --memory gs://BUCKET/memories/in1k --images gs://BUCKET/new-classes \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

The graph::

    ReadImages ─► RejectKnownIds ─► DecodeImages ─► EmbedImages ─► WriteDeltaShards ─► PublishAdd (last, once)
        │              │                 │              │               │
        └──────────────┴─────────────────┴──────────────┴───────────────┴── failures ─► dead_letter/add-vNNNNNN/

The launcher reads the memory's latest version n once. Images are decoded with the memory's preprocessing
and embedded with the memory's own encoder (``manifest.build_config["encoder"]``); a worker that ran a
different encoder (name, content hash or dim) fails the job before anything is published. Ids already live
in version n, ids forgotten but still physically present (until ``vmem reindex``) and ids given twice in
this add become dead letters (reasons ``duplicate_id`` / ``forgotten_id``), never a failed job. Entries are
grouped by a stable hash of their id into ``max(1, ceil(entries / --delta-shard-size))`` brute-force delta
shards under ``deltas/v{n+1:06d}-<job id>/``, and one final step publishes version n+1 with the memory's
class names extended append-only (old label indices never change). If someone else published meanwhile,
the job fails with ConcurrentUpdateError and nothing is published: re-run it. Added entries are searched
exactly (brute force) at once by ``VisualMemory``, ``vmem classify`` and ``vmem evaluate``.

Anything that is not an add flag is passed to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import secrets
import sys
import time
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from encoders.base import EncoderSpec, resolve_preprocess
from memory import storage
from memory.manifest import ManifestError, ShardInfo
from memory.mutations import DuplicateIdError, extended_class_names, publish_add, read_forgotten, write_delta_shard
from memory.sharding import shard_for_id
from memory.versions import ConcurrentUpdateError, latest_version, read_version
from pipelines.runner import with_default_runner
from pipelines.embed import (DecodeImages, EmbedImages, EncoderMismatchError, check_same_identity,
                             memory_encoder_spec)
from pipelines.readers import FAILED_TAG, ImageSource, ReadImages, _failed, parse_image_spec
from pipelines.records import ImageRecord, Stage
from pipelines.write import DEAD_LETTER_DIR, entries_to_shard_data, split_duplicate_ids

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
DEFAULT_DELTA_SHARD_SIZE = 50_000
# Stored ids per id-hash bucket when new records are checked against the memory's ids (RejectKnownIds): one
# bucket's ids, a few tens of MB, is all a worker holds.
IDS_PER_BUCKET = 1_000_000

__all__ = ["AddError", "AddPlan", "DEFAULT_DELTA_SHARD_SIZE", "PublishAdd", "RejectKnownIds", "WriteDeltaShards",
           "build_arg_parser", "launch", "main", "plan_add", "run"]


class AddError(RuntimeError):
    """The add cannot publish a meaningful version (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class AddPlan:
    """What the launcher decided once, before the graph runs (plain picklable values).

    Attributes:
      root: Memory root.
      base_version: The version n read at launch; the add publishes n + 1 or fails.
      job_id: Random token making this add's file paths unique (two racing adds never share a path).
      encoder: The memory's own EncoderSpec.
      encoder_identity: The memory's recorded encoder identity (what the workers must reproduce).
      class_names: Class names of version n (new names are appended after them).
    """
    root: str
    base_version: int
    job_id: str
    encoder: EncoderSpec
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
    def dead_letter_dir(self) -> str:
        return storage.join(self.root, DEAD_LETTER_DIR, f"add-v{self.new_version:06d}")


def plan_add(root: str, *, job_id: str | None = None) -> AddPlan:
    """Reads the memory's latest version once and fixes everything the graph needs."""
    root = root.rstrip("/") or root
    n = latest_version(root)
    manifest = read_version(root, n)
    return AddPlan(root=root, base_version=n, job_id=job_id or secrets.token_hex(4),
                   encoder=memory_encoder_spec(manifest), encoder_identity=dict(manifest.encoder),
                   class_names=tuple(manifest.class_names))


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
        from memory import shard as shard_io  # pylint: disable=g-import-not-at-top
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


def _member(sorted_ids: np.ndarray, entry_id: str) -> bool:
    if not sorted_ids.size:
        return False
    pos = int(np.searchsorted(sorted_ids, entry_id))
    return pos < sorted_ids.size and sorted_ids[pos] == entry_id


class _RejectInBucketFn(beam.DoFn):
    """(bucket, {new records, stored ids, forgotten ids} of that bucket) -> new records / FailedRecords."""

    def __init__(self, root: str, version: int):
        self._root = root
        self._version = version

    def process(self, element):
        _, grouped = element
        stored = [c for c in grouped["stored"]]
        forgotten = [c for c in grouped["forgotten"]]
        # Tombstones list forgotten ids still stored, so "live" is stored minus forgotten.
        stored = np.sort(np.concatenate(stored)) if stored else np.zeros((0,), "<U1")
        forgotten = np.sort(np.concatenate(forgotten)) if forgotten else np.zeros((0,), "<U1")
        for record in grouped["new"]:
            if _member(forgotten, record.id):
                yield _failed(record.id, record.uri, "forgotten_id",
                              f"id was forgotten but is still physically present in version {self._version} until "
                              "`vmem reindex`; re-index first, or add the image under another id", Stage.READ)
            elif _member(stored, record.id):
                yield _failed(record.id, record.uri, "duplicate_id",
                              f"id is already live in version {self._version} of {self._root}; forget it first to "
                              "replace it, or add the image under another id", Stage.READ)
            else:
                yield record


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
        p, buckets = records.pipeline, self._buckets
        new = records | "KeyNewByIdBucket" >> beam.Map(lambda r: (shard_for_id(r.id, buckets), r))
        stored = (p
                  | "StoredShards" >> beam.Create(self._shard_paths)
                  | "SpreadShards" >> beam.Reshuffle()
                  | "StoredIdsByBucket" >> beam.ParDo(_StoredIdsFn(self._root, buckets)))
        forgotten = (p
                     | "Version" >> beam.Create([self._version])
                     | "ForgottenIdsByBucket" >> beam.ParDo(_TombstonesFn(self._root, buckets)))
        results = ({"new": new, "stored": stored, "forgotten": forgotten}
                   | "CoGroupByIdBucket" >> beam.CoGroupByKey()
                   | "CheckIds" >> beam.ParDo(_RejectInBucketFn(self._root, self._version)).with_outputs(
                       FAILED_TAG, main="records"))
        return results.records, results[FAILED_TAG]


class _WriteDeltaShardFn(beam.DoFn):
    def __init__(self, plan: AddPlan):
        self._plan = plan
        self._written = Metrics.counter(_NAMESPACE, "entries_added")

    def process(self, element, class_names, count, identities):
        for identity in identities:
            # Checked before writing, so a wrong encoder leaves no delta shard behind.
            check_worker_identity(self._plan.encoder_identity, identity)
        index, entries = element
        class_index = {name: i for i, name in enumerate(class_names)}
        kept, duplicates = split_duplicate_ids(entries)  # Ids given twice in this add.
        for entry, first in duplicates:
            yield _failed(entry.id, entry.uri, "duplicate_id", f"id given twice in this add; kept {first.uri}",
                          Stage.EMBED)
        data = entries_to_shard_data(kept, class_index)
        info = write_delta_shard(self._plan.root, data, version_tag=self._plan.version_tag, index=index, count=count)
        self._written.inc(info.count)
        _LOG.info("wrote delta shard %s: %d entries", info.name, info.count)
        yield info


class WriteDeltaShards(beam.PTransform):
    """EmbeddedImage -> ShardInfo of each written delta shard (plus FailedRecords for repeated ids).

    The number of delta shards is ``max(1, ceil(entries / target_size))``; an entry goes to
    ``shard_for_id(id, count)`` so that one worker writes one delta shard and a retried bundle rewrites the same
    bytes. Labels map through ``class_names`` (a side input: old names, then new ones).
    """

    def __init__(self, plan: AddPlan, *, target_size: int, class_names, identities):
        super().__init__()
        self._plan = plan
        self._target = target_size
        self._class_names = class_names
        self._identities = identities

    def expand(self, entries):
        target = self._target
        count = (entries
                 | "CountEntries" >> beam.combiners.Count.Globally()
                 | "DeltaShardCount" >> beam.Map(lambda n: max(1, math.ceil(n / target))))
        results = (
            entries
            | "KeyByDeltaShard" >> beam.Map(lambda e, c: (shard_for_id(e.id, c), e),
                                            c=beam.pvalue.AsSingleton(count))
            | "GroupByDeltaShard" >> beam.GroupByKey()
            | "WriteDeltaShard" >> beam.ParDo(
                _WriteDeltaShardFn(self._plan), class_names=beam.pvalue.AsSingleton(self._class_names),
                count=beam.pvalue.AsSingleton(count), identities=beam.pvalue.AsList(self._identities),
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


class _PublishAddFn(beam.DoFn):
    def __init__(self, plan: AddPlan):
        self._plan = plan

    def process(self, unused, infos, identities, class_names, records_read, failed, dead_letter_files):
        plan = self._plan
        for identity in identities:
            check_worker_identity(plan.encoder_identity, identity)
        counts = check_counts(infos=infos, records_read=records_read, failed=failed,
                              dead_letter_dir=plan.dead_letter_dir)
        infos = sorted((i for i in infos if i.count), key=lambda i: i.name)
        # ConcurrentUpdateError propagates: the job fails with its message and nothing is published.
        manifest = publish_add(plan.root, delta_infos=infos, new_class_names=class_names,
                               expected_version=plan.base_version, counts=counts._asdict())
        _LOG.info("published version %d of %s: added %d entries in %d delta shard(s), new classes %s; %d failed "
                  "(%s)", manifest.version, plan.root, counts.added, len(infos), manifest.change["new_classes"],
                  counts.failed, sorted(dead_letter_files))
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
    parser.add_argument("--images", required=True,
                        help="new labelled images: ImageFolder DIR (DIR/<class>/<image>; ids are paths relative to "
                             "DIR), tfrecord:PATTERN or manifest:FILE.csv|.jsonl; local or gs://")
    parser.add_argument("--delta-shard-size", type=int, default=DEFAULT_DELTA_SHARD_SIZE,
                        help=f"target entries per delta shard (default {DEFAULT_DELTA_SHARD_SIZE}); delta shards are "
                             "searched by brute force until `vmem reindex` folds them in")
    parser.add_argument("--min-batch-size", type=int, default=None, help="RunInference batch bounds (default: the "
                                                                          "memory's build config)")
    parser.add_argument("--max-batch-size", type=int, default=None)
    return parser


def add_pipeline(p: beam.Pipeline, *, plan: AddPlan, source: ImageSource, target_size: int, min_batch_size: int,
                 max_batch_size: int, progress_every: int) -> None:
    """Adds the add graph to ``p``."""
    preprocess = resolve_preprocess(plan.encoder)
    read, read_failures = p | "ReadImages" >> ReadImages(source)
    records, id_failures = read | "RejectKnownIds" >> RejectKnownIds(plan.root, plan.base_version)
    images, decode_failures = records | "DecodeImages" >> DecodeImages(preprocess)
    entries, embed_failures, identities = images | "EmbedImages" >> EmbedImages(
        plan.encoder, min_batch_size=min_batch_size, max_batch_size=max_batch_size, progress_every=progress_every)
    old = plan.class_names
    class_names = (entries
                   | "Labels" >> beam.Map(lambda e: e.label)
                   | "DistinctLabels" >> beam.Distinct()
                   | "CollectLabels" >> beam.combiners.ToList()
                   | "ExtendClassNames" >> beam.Map(lambda labels: list(extended_class_names(old, labels))))
    infos, write_failures = entries | "WriteDeltaShards" >> WriteDeltaShards(
        plan, target_size=target_size, class_names=class_names, identities=identities)
    failures = ((read_failures, id_failures, decode_failures, embed_failures, write_failures)
                | "AllFailures" >> beam.Flatten())
    dead_letter_files = (failures
                         | "DeadLetterJson" >> beam.Map(lambda f: f.to_json())
                         | "WriteDeadLetters" >> beam.io.WriteToText(
                             storage.join(plan.dead_letter_dir, f"failed-{plan.job_id}"), file_name_suffix=".jsonl"))
    records_read = ((read, read_failures) | "AllRead" >> beam.Flatten()
                    | "CountRead" >> beam.combiners.Count.Globally())
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


_USER_ERRORS = (ConcurrentUpdateError, DuplicateIdError, AddError, EncoderMismatchError, ManifestError)


def launch(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
           ) -> tuple[beam.runners.runner.PipelineResult, AddPlan]:
    """Like :func:`run`, also returning the :class:`AddPlan` (base version, job id, paths) it ran."""
    args, beam_args = build_arg_parser().parse_known_args(argv)
    if args.delta_shard_size < 1:
        raise ValueError(f"--delta-shard-size must be >= 1, got {args.delta_shard_size}.")
    source = parse_image_spec(args.images)
    plan = plan_add(args.memory)
    build_config = read_version(plan.root, plan.base_version).build_config
    min_batch = args.min_batch_size or int(build_config.get("min_batch_size", 16))
    max_batch = max(min_batch, args.max_batch_size or int(build_config.get("max_batch_size", 64)))
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    add_pipeline(p, plan=plan, source=source, target_size=args.delta_shard_size, min_batch_size=min_batch,
                 max_batch_size=max_batch, progress_every=int(build_config.get("progress_every", 200)))
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
      AddError: no entry could be added, or the workers ran a different encoder.
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
          f"({c.get('read', 0) / max(elapsed, 1e-9):.1f} images/s)")
    print(f"failed records (with reasons): {plan.dead_letter_dir}/" if c.get("failed") else
          f"no failed records (dead letters: {plan.dead_letter_dir}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
