"""The add job's flags and graph: `add_pipeline` (the graph), `add_to_memory` (the typed entry point that runs
it), `launch` and `run` (Beam's ``run(argv)``: flags parsed into `add_to_memory`).

The graph (images; precomputed embeddings replace the first four steps by ReadEmbeddings ─► RejectKnownIds
on blocks)::

    ReadImages ─► RejectKnownIds ─► DecodeImages ─► EmbedImages ─► ToBlocks ─► WriteDeltaShards ─► PublishAdd
        │              │                 │              │                            │           (last, once)
        └──────────────┴─────────────────┴──────────────┴────────────────────────────┴── failures ─►
                                                                                 dead_letter/add-vNNNNNN/
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import TYPE_CHECKING, Optional, Sequence

import apache_beam as beam

from encoders.bundled import resolve_preprocess
from memory import storage
from memory.store.after_publish import after_publish
from memory.store.integrity import NO_VERIFY_HELP
from memory.store.manifest import ManifestError, ShardInfo
from memory.store.mutations import DuplicateIdError, extended_class_names
from memory.store.versions import ConcurrentUpdateError, read_version
from pipelines.add.delta_shards import WriteDeltaShards
from pipelines.add.known_ids import RejectKnownIds, RejectKnownIdsInBlocks
from pipelines.add.plan import (DEFAULT_DELTA_SHARD_SIZE, AddError, AddPlan, abandon_add, check_counts,
                                check_precomputed_identity, check_worker_identity, plan_add, publish_add_version,
                                remove_add_leftovers)
from pipelines.build import is_precomputed, read_precomputed
from pipelines.io.readers import CountAll, ImageSource, ReadImages, parse_image_spec
from pipelines.runner import BeamOptions, FlagError, after_publish_error, resolve_pipeline_options, runner_error
from pipelines.stages.embed import DecodeImages, EmbedImages, EncoderMismatchError
from pipelines.stages.write import EntriesToBlocks, block_class_names, count_rows

if TYPE_CHECKING:
    from pipelines.io.embedding_sources import EmbeddingSource

_LOG = logging.getLogger("visual_memory")
ADD_DESCRIPTION = ("The add job: publish new entries (images or precomputed embeddings) as delta shards of a new "
                   "version.")

__all__ = ["PublishAdd", "add_pipeline", "add_to_memory", "build_arg_parser", "launch", "run"]


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
                                  dead_letter_dir=plan.dead_letter_dir, regions=plan.regions)
            # A lost race re-bases; a true conflict (WriteConflictError) propagates: the job fails with its
            # message, nothing is published and this add's files are deleted.
            manifest = publish_add_version(plan, delta_infos=infos, new_class_names=class_names,
                                           counts=counts._asdict())
        except (AddError, ConcurrentUpdateError, ManifestError) as e:
            abandon_add(plan, dead_letters=isinstance(e, ConcurrentUpdateError))
            raise
        with after_publish(root=plan.root, version=manifest.version, step="removing this add's spill files and "
                           "abandoned delta shard attempts", fix="The added entries are live; the leftovers are "
                           "referenced by no version and never read."):
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
    parser = argparse.ArgumentParser(prog="vmem add", description=ADD_DESCRIPTION,
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
    parser.add_argument("--min-batch-size", type=int, default=None, help="encoder batch bounds (default: the "
                                                                          "memory's build config)")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    return parser


def add_pipeline(p: beam.Pipeline, *, plan: AddPlan, source, target_size: int, min_batch_size: int = 16,
                 max_batch_size: int = 64, progress_every: int = 200, identity: dict | None = None,
                 entry_count: int | None = None, verify: bool = True) -> None:
    """Adds the add graph to ``p``.

    Args:
      source: An ImageSource (images are decoded and embedded with the memory's encoder) or an EmbeddingSource
        (precomputed; ``identity`` is their encoder identity, checked by `check_precomputed_identity`).
      entry_count: Rows the EmbeddingSource holds, when known at launch (sizes the id-bucket join).
      verify: Check the memory's shard files read (their ids) against the manifest (memory.store.integrity).
    """
    old = plan.class_names
    if isinstance(source, ImageSource):
        preprocess = resolve_preprocess(plan.encoder)
        read, read_failures = p | "ReadImages" >> ReadImages(source)
        records, id_failures = read | "RejectKnownIds" >> RejectKnownIds(plan.root, plan.base_version, verify=verify)
        images, decode_failures = records | "DecodeImages" >> DecodeImages(preprocess)
        entries, embed_failures, identities = images | "EmbedImages" >> EmbedImages(
            plan.encoder, min_batch_size=min_batch_size, max_batch_size=max_batch_size, progress_every=progress_every,
            regions=plan.regions)
        blocks = entries | "ToBlocks" >> EntriesToBlocks()
        failure_sets = [read_failures, id_failures, decode_failures, embed_failures]
        records_read = (read, read_failures) | "CountRead" >> CountAll()
        rejected = None
        kept_rows = count_rows(blocks, "CountEntries")
        labels = block_class_names(blocks)
    else:
        blocks, read_failures, identities, records_read = read_precomputed(p, source, identity)
        rejected, id_failures, kept = blocks | "RejectKnownIds" >> RejectKnownIdsInBlocks(
            plan.root, plan.base_version, new_rows=entry_count, verify=verify)
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


_USER_ERRORS = (ConcurrentUpdateError, DuplicateIdError, AddError, EncoderMismatchError, ManifestError)


def add_to_memory(*, memory: str, source: ImageSource | EmbeddingSource, encoder_id: str | None = None,
                  delta_shard_size: int = DEFAULT_DELTA_SHARD_SIZE, min_batch_size: int | None = None,
                  max_batch_size: int | None = None, verify: bool = True, pipeline_options: BeamOptions = None,
                  test_pipeline: Optional[beam.Pipeline] = None
                  ) -> tuple[beam.runners.runner.PipelineResult, AddPlan]:
    """Adds ``source``'s entries to ``memory`` as a new version: checks the arguments, builds the graph, runs it.

    Args:
      memory: An existing memory (local or gs://); gets a new version.
      source: An ImageSource (`parse_image_spec`; embedded with the memory's own encoder) or, for a memory
        built from precomputed embeddings, an EmbeddingSource of embeddings of ``encoder_id``.
      encoder_id: With an EmbeddingSource: the encoder that computed the embeddings; must be the memory's.
      delta_shard_size: Target entries per delta shard.
      min_batch_size: Encoder batch bounds (None: the memory's build config).
      max_batch_size: See ``min_batch_size``.
      verify: Check the memory's shard files read against the manifest (``--no-verify``: False).
      pipeline_options: Runner settings: Beam flags or a PipelineOptions (`pipelines.runner.BeamOptions`;
        default: one in-process worker).
      test_pipeline: Build the graph on this pipeline instead of one made from ``pipeline_options``.

    Returns:
      The pipeline result and the :class:`AddPlan` (base version, job id, paths) it ran.

    Raises:
      FlagError: a bad value or combination (before the memory is read).
      ConcurrentUpdateError: another writer published after launch; nothing was published, re-run.
      AddError: no entry could be added, the workers ran a different encoder, or precomputed embeddings of
        another encoder (or dim) than the memory's.
      AfterPublishError: the new version is published, then removing this add's leftovers failed.
    """
    if delta_shard_size < 1:
        raise FlagError(f"--delta-shard-size must be >= 1, got {delta_shard_size}.")
    images = isinstance(source, ImageSource)
    if images and encoder_id:
        raise FlagError("--encoder-id applies to --embeddings only; images are embedded with the memory's own "
                        "encoder")
    options = resolve_pipeline_options(pipeline_options)
    plan = plan_add(memory, images=images)
    manifest = read_version(plan.root, plan.base_version)
    build_config = manifest.build_config
    identity = entry_count = None
    if not images:
        from pipelines.io.embedding_sources import count_entries  # pylint: disable=g-import-not-at-top
        identity = check_precomputed_identity(plan, encoder_id, source, memory_dim=manifest.dim)
        entry_count = count_entries(source)
    elif is_precomputed(plan.encoder_identity):
        name = plan.encoder_identity.get("name")
        raise AddError(f"{plan.root} was built from precomputed embeddings of encoder {name!r}, which this job "
                       f"cannot run on images: add embeddings of that encoder with --embeddings SPEC "
                       f"--encoder-id {name}. Nothing was published.")
    min_batch = min_batch_size or int(build_config.get("min_batch_size", 16))
    max_batch = max(min_batch, max_batch_size or int(build_config.get("max_batch_size", 64)))
    p = test_pipeline or beam.Pipeline(options=options)
    add_pipeline(p, plan=plan, source=source, target_size=delta_shard_size, min_batch_size=min_batch,
                 max_batch_size=max_batch, progress_every=int(build_config.get("progress_every", 200)),
                 identity=identity, entry_count=entry_count, verify=verify)
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # Runners wrap DoFn errors in their own types; surface ours unchanged.
        after = after_publish_error(e)
        if after is not None:
            raise after from e
        cause = runner_error(e, _USER_ERRORS)
        if cause is not None and cause is not e:
            raise type(cause)(str(cause)) from e
        raise
    return result, plan


def launch(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
           ) -> tuple[beam.runners.runner.PipelineResult, AddPlan]:
    """Parses ``argv`` (add flags + Beam flags) and runs `add_to_memory` with them; returns what it returns."""
    args, beam_args = build_arg_parser().parse_known_args(argv)
    if args.embeddings is not None:
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        source = parse_embeddings_spec(args.embeddings)
    else:
        source = parse_image_spec(args.images)
    return add_to_memory(memory=args.memory, source=source, encoder_id=args.encoder_id,
                         delta_shard_size=args.delta_shard_size, min_batch_size=args.min_batch_size,
                         max_batch_size=args.max_batch_size, verify=args.verify, pipeline_options=beam_args,
                         test_pipeline=test_pipeline)


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses ``argv`` (add flags + Beam flags), builds the add graph and runs it to completion (`launch`).

    Raises:
      ConcurrentUpdateError: another writer published after launch; nothing was published, re-run.
      AddError: no entry could be added, the workers ran a different encoder, or precomputed embeddings of
        another encoder (or dim) than the memory's.
    """
    return launch(argv, test_pipeline)[0]
