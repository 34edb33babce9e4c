"""The query job of ``vmem evaluate``: embed a held-out split, search every shard, merge top-K, write neighbours.

Local::

    vmem evaluate --memory out/fmnist-memory --images data/fashion-mnist/test --output out/fmnist-eval

Dataflow::

    vmem evaluate --memory gs://BUCKET/memories/in1k --images gs://BUCKET/imagenet/val \\
        --output gs://BUCKET/evals/in1k --k-max 100 \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

Queries are embedded with the memory's own encoder (from its manifest); a different encoder is refused.
Query batches meet the shards by ``--search-join`` (pipelines.stages.search_shards.SearchMemory): shuffled
to the shards they route to (each shard loaded once, by the one worker that searches every batch grouped
under it), or, for a memory whose vectors take at most 256 MiB, searched where they were embedded by
workers that each load the whole memory; either way every shard's partial top-K merges exactly per query
(ties by id, as ``VisualMemory.search``). The neighbour lists are written as JSONL (``neighbors-*.jsonl``,
`pipelines.records.NeighborRecord`); the last step checks the books (the queries' encoder is the memory's;
every record read was answered or failed) and writes ``evaluation-summary.json``. ``vmem evaluate`` then
votes the neighbour files with every rule at every k, the path ``vmem vote`` takes, and writes report.json,
report.md and accuracy_vs_k.png (evaluation.vote_report); no worker ever holds every query's neighbours.

Python: ``run(argv)`` parses the flags into `evaluate_memory(*, memory, source, output, ...)`, which checks
them, builds the graph (`evaluate_pipeline(p, *, ...)`) and runs it; experiments and benchmarks call
`evaluate_memory`. `evaluation.vote_report.write_evaluation_report(output)` writes the report after it ran.

Pruned memories: a soft-pruned version (``vmem prune --mode soft``) carries entry weights; every
neighbour then carries its weight (``neighbor_entry_weights`` in the JSONL), ``accuracy`` / ``best`` in
the report are the weighted vote and ``accuracy_unpruned`` / ``best_unpruned`` the same neighbours voted
without weights. A hard prune publishes a forget; compare it by evaluating the version before it::

    vmem evaluate --memory M --images TEST --output out/eval-before --version N   # N = version pruned from
    vmem evaluate --memory M --images TEST --output out/eval-after                # the latest
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import apache_beam as beam

from encoders.base import Runtime, add_runtime_flag, parse_runtime
from memory import storage
from memory.decide.voting import VotingParams, VotingRule
from memory.regions.layout import EntryKind, region_grid
from memory.search.filters import Crowding, QueryFilter
from memory.search.routing import check_route_ratio
from memory.search.setting import default_setting
from memory.store.integrity import NO_VERIFY_HELP
from memory.store.manifest import Manifest
from memory.store.versions import VersionPurgedError, list_versions, read_manifest
from pipelines import rerank_args
from pipelines.rerank_args import RerankOptions, selection_report
from pipelines.build import is_precomputed, precomputed_identity, read_precomputed
from pipelines.io.readers import CountAll, ImageSource, ReadImages, parse_image_spec
from pipelines.records import EmbeddedImage, EvaluationSummary, NeighborRecord
from pipelines.runner import BeamOptions, FlagError, resolve_pipeline_options
from pipelines.stages import rerank as rerank_stage
from pipelines.stages.embed import DecodeImages, EmbedImages, check_same_identity, memory_encoder_spec
# The search stages live in pipelines.stages.search_shards; these names stay importable from here (tests).
from pipelines.stages.search_shards import (BatchNeighbors, MergeNeighbors, QueryBatch, QueryNeighbors,  # noqa: F401
                                            SearchJoin, SearchMemory, SearchShards)
from pipelines.stages.write import WriteDeadLetters

if TYPE_CHECKING:
    from encoders.base import EncoderSpec
    from pipelines.io.embedding_sources import EmbeddingSource

_LOG = logging.getLogger("visual_memory")
# An unpinned evaluation whose version a purge removed while it ran is run again this many times at most.
_PURGED_RERUNS = 5
NEIGHBORS_PREFIX = "neighbors"

__all__ = ["EvaluationError", "RerankOptions", "WriteNeighbors", "build_arg_parser", "check_query_counts",
           "check_query_identity", "evaluate_memory", "evaluate_pipeline", "run", "selection_report", "to_record"]


class EvaluationError(RuntimeError):
    """The evaluation cannot give a meaningful answer (the message says why and what to do)."""


def check_query_identity(memory_identity: dict, query_identity: dict) -> None:
    """Refuses queries embedded by a different encoder."""
    check_same_identity(memory_identity, query_identity, what="queries",
                        fix="Evaluate with the memory's own encoder files (leave --config unset), or rebuild the "
                            "memory with the new encoder.")


def to_record(query_id: str, q: QueryNeighbors, class_index: dict[str, int]) -> NeighborRecord:
    """One query's merged neighbours as the JSONL record (real neighbours only; the padding is dropped)."""
    n = q.neighbors
    keep = n.labels[0] >= 0
    return NeighborRecord(
        query_id=query_id, true_label=class_index.get(q.label, -1),
        neighbor_ids=n.ids[0][keep].astype(str).tolist(), neighbor_labels=n.labels[0][keep].astype(int).tolist(),
        neighbor_distances=n.distances[0][keep].tolist(),
        neighbor_weights=None if n.weights is None else n.weights[0][keep].tolist())


class WriteNeighbors(beam.PTransform):
    """(query id, QueryNeighbors) -> JSONL neighbour lists (``vmem vote`` input); returns file names."""

    def __init__(self, output: str, class_names: Sequence[str]):
        super().__init__()
        self._prefix = storage.join(output, NEIGHBORS_PREFIX)
        self._class_index = {c: i for i, c in enumerate(class_names)}

    def expand(self, merged):
        class_index = self._class_index
        return (merged
                | "ToRecord" >> beam.MapTuple(lambda qid, q: to_record(qid, q, class_index).to_json_line())
                | "WriteJsonl" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))


class UnknownLabels(beam.PTransform):
    """(query id, QueryNeighbors) -> the query class names the memory does not know, each once."""

    def __init__(self, class_names: Sequence[str]):
        super().__init__()
        self._known = frozenset(class_names)

    def expand(self, merged):
        known = self._known
        return (merged
                | "QueryLabels" >> beam.FlatMapTuple(lambda _, q: [] if q.label in known else [q.label])
                | "DistinctLabels" >> beam.Distinct())


def check_query_counts(*, read: int, queries: int, failed: int, dead_letter_dir: str) -> None:
    """Refuses to report unless every record read was either answered as a query or failed.

    ``queries`` counts distinct query ids: a query lost on the way, or two images sharing one id (which the
    neighbour files and any re-vote could not tell apart), would otherwise shift the accuracy silently.

    Raises:
      EvaluationError: naming the three counts, when read != queries + failed.
    """
    if read != queries + failed:
        raise EvaluationError(
            f"bookkeeping mismatch: read {read} record(s) but answered {queries} queries + {failed} failed = "
            f"{queries + failed}; no report was written. Query ids must be unique (two images with one id "
            f"count as one query); see the failures in {dead_letter_dir}/.")


class _SummaryFn(beam.DoFn):
    """Once, after every neighbour file is written: checks the books and writes the EvaluationSummary."""

    def __init__(self, output: str, manifest: Manifest, summary: EvaluationSummary):
        self._output = output
        self._manifest = manifest
        self._summary = summary  # Launch-time fields; the counts are filled in here.

    def process(self, unused, identities, failed, records_read, distinct_queries, neighbor_files, unknown_labels,
                pixel_queries, rerank=None):
        dead_letter_dir = storage.join(self._output, "dead_letter")
        for identity in identities:
            check_query_identity(self._manifest.encoder, json.loads(identity))
        check_query_counts(read=records_read, queries=distinct_queries, failed=failed, dead_letter_dir=dead_letter_dir)
        if distinct_queries == 0:
            raise EvaluationError(f"no query could be embedded ({failed} failed); see the reasons in "
                                  f"{dead_letter_dir}/.")
        summary = dataclasses.replace(
            self._summary, queries=distinct_queries, failed=failed, records_read=records_read,
            neighbor_files=tuple(sorted(neighbor_files)), unknown_labels=tuple(sorted(unknown_labels)),
            rerank=rerank, pixel_queries=tuple(sorted(pixel_queries)))
        storage.write_text(storage.join(self._output, EvaluationSummary.FILE_NAME), summary.to_json())
        yield summary


def _source_info(source) -> dict:
    return {"images" if isinstance(source, ImageSource) else "embeddings": source.to_dict()}


def evaluate_pipeline(p: beam.Pipeline, *, root: str, manifest: Manifest, source, output: str,
                      encoder_id: str | None = None, version: int | None = None, k_max: int = 100,
                      params: VotingParams = VotingParams(), query_batch: int = 256, search_threads: int | None = None,
                      route_probes: int | None = None, route_ratio: float | None = None,
                      default_filter: QueryFilter | None = None, query_filters: Mapping[str, dict] | None = None,
                      crowding: Crowding | None = None, rerank: RerankOptions | None = None,
                      pixel_baseline: int | None = None, extra: Mapping[str, Any] | None = None,
                      verify: bool = True, runtime: Runtime | None = None,
                      search_join: SearchJoin | str = SearchJoin.AUTO) -> None:
    """Adds the evaluation graph to ``p``: queries -> search -> merge -> neighbour files + EvaluationSummary.

    Args:
      root: The memory's root.
      manifest: The version searched, read once at launch (`memory.store.manifest.read_manifest`).
      source: An ImageSource (embedded with the memory's own encoder) or, for a memory built from
        precomputed embeddings, an EmbeddingSource of embeddings of ``encoder_id``.
      output: Directory of the neighbour files, dead letters, re-rank records and the summary.
      encoder_id: With an EmbeddingSource: the encoder that computed the embeddings.
      version: The version the caller pinned (None: the latest), recorded in the report.
      k_max: Neighbours retrieved per query; capped, with a logged warning, at the version's live entries.
      params: Voting parameters of the report (and of the re-rank stage's vote).
      query_batch: Queries per shard search call.
      search_threads: Threads a worker searches a shard's batches on (None: its cores, at most 4).
      route_probes: Partition-routed memories: router centroids each query searches (None: the tuned
        setting's, else the memory's).
      route_ratio: Partition-routed memories: distance-ratio routing instead of probes.
      default_filter: Only entries it admits may vote, for every query.
      query_filters: ``{query id: filter dict}`` overriding ``default_filter`` for those queries.
      crowding: At most C voters per group.
      rerank: The re-rank stage's settings, or None.
      pixel_baseline: K of the raw-pixel kNN baseline the report adds (the summary then lists every query's uri).
      extra: What the report records about the filters, crowding and re-ranking (`selection_report`).
      verify: Workers check every shard file they load against the manifest (memory.store.integrity); False
        accepts the risk of searching altered files.
      search_join: How query batches meet the shards (pipelines.stages.search_shards.SearchJoin).

    Raises:
      EvaluationError: the memory cannot answer these queries: routing options on a hash-sharded memory, an
        image source for a memory of precomputed embeddings or the other way round, another encoder or dim.
    """
    if region_grid(manifest) is not None:
        # A region memory is evaluated as its global answer: only its global entries vote (memory.regions; region
        # classify is `memory.regions.classify`).
        default_filter = dataclasses.replace(default_filter or QueryFilter(), entries=EntryKind.IMAGE)
        if query_filters:
            query_filters = {q: dict(f, entries=EntryKind.IMAGE.value) for q, f in query_filters.items()}
    if k_max > max(manifest.total, 1):
        # Every shard search, merge and report row is sized by k_max; past the live entries they would hold
        # only padding, and every vote there is the vote of every entry.
        _LOG.warning("--k-max %d exceeds the %d live entries of memory %s (version %d); retrieving and voting "
                     "k = 1..%d", k_max, manifest.total, root, manifest.version, max(manifest.total, 1))
        k_max = max(manifest.total, 1)
    for name, value in (("route probes", route_probes), ("route ratio", route_ratio)):
        if value is not None and manifest.router is None:
            flag = "--" + name.replace(" ", "-")
            raise EvaluationError(f"{flag} {value}: memory {root} is hash-sharded (every query searches every "
                                  f"shard); drop {flag} or build with --sharding partition.")
    if isinstance(source, ImageSource):
        if is_precomputed(manifest.encoder):
            _refuse_images(root, manifest)
        encoder = memory_encoder_spec(manifest).with_runtime(runtime)
        from encoders.bundled import resolve_preprocess  # pylint: disable=g-import-not-at-top
        records, read_failures = p | "ReadQueries" >> ReadImages(source)
        images, decode_failures = records | "DecodeQueries" >> DecodeImages(resolve_preprocess(encoder))
        queries, embed_failures, identities = images | "EmbedQueries" >> EmbedImages(
            # Batches start at min_batch_size and grow; at 8 most batches of a 1,000-query run stayed at 8-9 images,
            # and the bundled encoder embeds 96 images/s at batch 8 against 107-114 at 32-64 (2 cores).
            encoder, min_batch_size=32, max_batch_size=64, progress_every=500)
        records_read = (records, read_failures) | "CountRead" >> CountAll()
        failure_sets = (read_failures, decode_failures, embed_failures)
    else:
        identity = _precomputed_query_identity(root, manifest, source, encoder_id)
        blocks, read_failures, identities, records_read = read_precomputed(p, source, identity)
        queries = blocks | "QueryRows" >> beam.FlatMap(
            lambda b: [EmbeddedImage(str(b.ids[i]), str(b.uris[i]), str(b.labels[i]), b.embeddings[i])
                       for i in range(len(b))])
        failure_sets = (read_failures,)

    setting = default_setting(manifest)  # `vmem tune`'s, unless route_probes/route_ratio override its routing.
    if route_probes is None and route_ratio is None and setting is not None:
        route_probes, route_ratio = setting.route_probes, setting.route_ratio
    search = SearchMemory(root, manifest, k=k_max, join=search_join, batch_size=query_batch, route_probes=route_probes,
                          route_ratio=route_ratio, default_filter=default_filter, query_filters=query_filters,
                          crowding=crowding, with_uris=rerank is not None, setting=setting,
                          search_threads=search_threads, verify=verify)
    merged = queries | "SearchMemory" >> search
    neighbor_files = merged | "WriteNeighbors" >> WriteNeighbors(output, manifest.class_names)
    failures = failure_sets | "AllFailures" >> beam.Flatten()
    _ = failures | "WriteDeadLetters" >> WriteDeadLetters(output)
    failed = failures | "CountFailed" >> beam.combiners.Count.Globally()
    report_extra = {"command": "vmem evaluate", "memory": root, "version_pinned": version, **_source_info(source),
                    "encoder": manifest.encoder.get("name"), "k_max": k_max, "search_join": search.join.value}
    if manifest.router is not None:
        if route_ratio is not None:
            report_extra["route_ratio"] = route_ratio
        else:
            report_extra["route_probes"] = route_probes or manifest.router.probes
    if setting is not None:
        report_extra["search_setting"] = setting.to_dict()
    report_extra.update(extra or {})
    side = {}  # The re-rank summary, when re-ranking.
    if rerank is not None:
        _, rerank_summary = merged | "Rerank" >> rerank_stage.RerankStage(
            rerank.spec, output, manifest.class_names, rule=rerank.rule, k=rerank.k, params=params,
            below=rerank.below, top_n=rerank.top_n, dry_run=rerank.dry_run)
        side["rerank"] = beam.pvalue.AsSingleton(rerank_summary)
    distinct_queries = (merged | "QueryIds" >> beam.Keys() | "DistinctQueryIds" >> beam.Distinct()
                        | "CountQueries" >> beam.combiners.Count.Globally())
    unknown_labels = merged | "UnknownLabels" >> UnknownLabels(manifest.class_names)
    class_index = {c: i for i, c in enumerate(manifest.class_names)}
    pixel = bool(pixel_baseline)
    # Only then are the queries' uris gathered (the raw-pixel baseline loads every image anyway).
    pixel_queries = merged | "PixelBaselineQueries" >> beam.FlatMapTuple(
        lambda qid, q: [(qid, q.uri, class_index.get(q.label, -1))] if pixel else [])
    weights = manifest.entry_weights
    summary = EvaluationSummary(
        extra=report_extra, memory=root, memory_version=manifest.version, memory_entries=manifest.total,
        entry_weights=None if weights is None else {"kind": weights.kind, "count": weights.count,
                                                    "params": dict(weights.params)},
        k_max=k_max, softmax_tau=params.softmax_tau, rank_alpha=params.rank_alpha, queries=0, failed=0,
        records_read=0, neighbor_files=(), unknown_labels=(), pixel_baseline=pixel_baseline or None)
    _ = (p
         | "Once" >> beam.Create([None])
         | "Report" >> beam.ParDo(
             _SummaryFn(output, manifest, summary), identities=beam.pvalue.AsList(identities),
             failed=beam.pvalue.AsSingleton(failed), records_read=beam.pvalue.AsSingleton(records_read),
             distinct_queries=beam.pvalue.AsSingleton(distinct_queries),
             neighbor_files=beam.pvalue.AsList(neighbor_files), unknown_labels=beam.pvalue.AsList(unknown_labels),
             pixel_queries=beam.pvalue.AsList(pixel_queries), **side))


def _refuse_images(root: str, manifest: Manifest) -> None:
    name = manifest.encoder.get("name")
    raise EvaluationError(
        f"memory {root} was built from precomputed embeddings of encoder {name!r}, which this job cannot run "
        f"on images; evaluate with --embeddings SPEC --encoder-id {name} (queries embedded by that encoder).")


def _precomputed_query_identity(root: str, manifest: Manifest, source, encoder_id: str | None) -> dict:
    """The identity of precomputed query embeddings, after refusing any the memory cannot be compared with."""
    from pipelines.io.embedding_sources import embedding_dim  # pylint: disable=g-import-not-at-top
    name = manifest.encoder.get("name")
    if not is_precomputed(manifest.encoder):
        raise EvaluationError(
            f"memory {root} was built from images with encoder {name!r}; precomputed query embeddings cannot be "
            "shown to come from it. Evaluate with --images (embedded by the memory's own encoder).")
    if encoder_id != name:
        raise EvaluationError(
            f"--encoder-id {encoder_id!r}: memory {root} holds embeddings of encoder {name!r}; queries must come "
            f"from the same encoder (pass --encoder-id {name} if they do).")
    dim = embedding_dim(source)
    if dim != manifest.dim:
        raise EvaluationError(f"--embeddings {source.location}: dim {dim}, memory {root} has dim {manifest.dim}.")
    return precomputed_identity(encoder_id, dim, source.to_dict().get("location", ""))


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmem evaluate", description=__doc__.split("\n")[0],
                                     epilog="Other flags are Beam pipeline options (--runner, --project, ...).")
    parser.add_argument("--memory", required=True, help="a built memory (local or gs://)")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--images", help="held-out images: ImageFolder DIR, tfrecord:PATTERN, manifest:FILE or "
                                          "webdataset:PATTERN (labels are class names)")
    queries.add_argument("--embeddings",
                         help="held-out precomputed embeddings (clip:DIR,label_column=... or tfrecord:PATTERN; see "
                              "vmem build --embeddings), for a memory built from embeddings of --encoder-id")
    parser.add_argument("--encoder-id", default=None,
                        help="with --embeddings: the encoder that computed them; must be the memory's")
    parser.add_argument("--output", required=True, help="directory for neighbours JSONL and the report")
    parser.add_argument("--k-max", type=int, default=100,
                        help="neighbours retrieved and voted over (default 100); capped, with a warning, at the "
                             "memory's live entries: past them every vote is the vote of every entry")
    parser.add_argument("--tau", type=float, default=0.07, help="SoftmaxVoting temperature (default 0.07)")
    parser.add_argument("--alpha", type=float, default=2.0, help="RankVoting offset: weight 1/(alpha+i) (default 2)")
    parser.add_argument("--query-batch", type=int, default=256, help="queries per shard search call")
    parser.add_argument("--search-threads", type=int, default=None, metavar="T",
                        help="threads each worker searches a shard's query batches on (default: its cores, at most "
                             "4); 1 on runners that already run one bundle per core")
    parser.add_argument("--route-probes", type=int, default=None, metavar="P",
                        help="partition-routed memories: nearest router centroids whose shards each query searches "
                             "(default: the memory's, set at build); more probes -> higher recall, more shards")
    parser.add_argument("--route-ratio", type=float, default=None, metavar="R",
                        help="partition-routed memories: distance-ratio routing instead of probes: each query searches "
                             "every main shard whose nearest centroid is at most R times as far as its nearest "
                             "centroid (R >= 1; measured at 1M: 1.1-1.3 reach probes 8's coverage at 1.02-1.15 shards per "
                             "query, probes 8 3.45)")
    parser.add_argument("--search-join", choices=[j.value for j in SearchJoin], default=SearchJoin.AUTO.value,
                        help="broadcast: each worker loads the whole memory and searches queries where they are "
                             "embedded; shuffle: queries are grouped by shard and each worker loads the shards it "
                             "owns; auto (default): broadcast when the memory's vectors take at most 256 MiB")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    parser.add_argument("--version", type=int, default=None, metavar="N",
                        help="evaluate this pinned version of the memory (default: the latest); e.g. the version "
                             "before a hard prune, to compare")
    parser.add_argument("--config", default=None,
                        help="optional config whose encoder must equal the memory's (refused otherwise)")
    parser.add_argument("--pixel-baseline", type=int, default=None, metavar="K",
                        help="also score raw-pixel kNN (1-NN and rank@K) over the memory's source images")
    add_runtime_flag(parser)
    rerank_args.add_selection_args(parser, per_query_file=True)
    rerank_args.add_rerank_args(parser)
    return parser


def _rerank_options(args: argparse.Namespace, spec: rerank_args.RerankSpec | None) -> RerankOptions | None:
    if spec is None:
        return None
    try:
        rule = VotingRule.parse(args.rerank_rule)
    except ValueError as e:
        raise FlagError(f"--rerank-rule: {e}") from None
    return RerankOptions(spec=spec, rule=rule, k=args.rerank_k, below=args.rerank_below, top_n=args.rerank_top_n,
                         dry_run=args.rerank_dry_run)


def _check_options(*, source, encoder_id: str | None, k_max: int, search_threads: int | None,
                   route_probes: int | None, route_ratio: float | None, rerank: RerankOptions | None) -> None:
    for flag, value in (("--k-max", k_max), ("--search-threads", search_threads), ("--route-probes", route_probes)):
        if value is not None and value < 1:
            raise FlagError(f"{flag} must be >= 1, got {value}.")
    if route_ratio is not None:
        if route_probes is not None:
            raise FlagError(f"--route-probes {route_probes} and --route-ratio {route_ratio} are two routing rules; "
                            "pass one.")
        try:
            check_route_ratio(route_ratio)
        except ValueError as e:
            raise FlagError(f"--route-ratio: {e}") from None
    if isinstance(source, ImageSource) and encoder_id:
        raise FlagError("--encoder-id applies to --embeddings only; image queries are embedded with the memory's "
                        "own encoder.")
    if rerank is not None:
        for flag, value in (("--rerank-top-n", rerank.top_n), ("--rerank-k", rerank.k)):
            if not 1 <= value <= k_max:
                raise FlagError(f"{flag} {value} must be in [1, --k-max {k_max}]: the job retrieves k-max "
                                f"neighbours; raise --k-max or lower {flag}.")


def evaluate_memory(*, memory: str, source: ImageSource | EmbeddingSource, output: str,
                    encoder_id: str | None = None, version: int | None = None, k_max: int = 100,
                    params: VotingParams = VotingParams(), query_batch: int = 256, search_threads: int | None = None,
                    route_probes: int | None = None, route_ratio: float | None = None,
                    default_filter: QueryFilter | None = None, filters_file: str | None = None,
                    crowding: Crowding | None = None, rerank: RerankOptions | None = None,
                    pixel_baseline: int | None = None, query_encoder: EncoderSpec | None = None,
                    verify: bool = True, runtime: Runtime | None = None, search_join: SearchJoin | str = SearchJoin.AUTO,
                    pipeline_options: BeamOptions = None, test_pipeline: Optional[beam.Pipeline] = None) -> beam.runners.runner.PipelineResult:
    """Evaluates ``source``'s queries against ``memory``: checks the arguments, builds the graph, runs it.

    Writes the neighbour files and ``evaluation-summary.json`` into ``output``; the report is
    `evaluation.vote_report.write_evaluation_report`'s (``vmem evaluate`` runs both).

    Args:
      memory: A built memory (local or gs://).
      source: Held-out queries: an ImageSource (`parse_image_spec`; embedded with the memory's own encoder) or,
        for a memory built from precomputed embeddings, an EmbeddingSource of embeddings of ``encoder_id``.
      output: Directory of the neighbour files, dead letters, re-rank records and the summary.
      encoder_id: With an EmbeddingSource: the encoder that computed the embeddings; must be the memory's.
      version: Evaluate this pinned version (None: the latest).
      k_max: Neighbours retrieved per query; capped, with a logged warning, at the version's live entries.
      params: Voting parameters of the report (and of the re-rank stage's vote).
      query_batch: Queries per shard search call.
      search_threads: Threads a worker searches a shard's batches on (None: its cores, at most 4).
      route_probes: Partition-routed memories: router centroids each query searches.
      route_ratio: Partition-routed memories: distance-ratio routing instead of probes.
      default_filter: Only entries it admits may vote, for every query.
      filters_file: Per-query filters, a JSONL file (`rerank_args.load_query_filters`).
      crowding: At most C voters per group.
      rerank: The re-rank stage's settings, or None.
      pixel_baseline: K of the raw-pixel kNN baseline the report adds.
      query_encoder: With an ImageSource: the encoder the caller means the queries to be embedded with
        (``--config``'s); refused unless it is the memory's.
      verify: Check every shard file the workers load against the manifest (``--no-verify``: False).
      runtime: With an ImageSource: what runs the memory's encoder (``--runtime``); None: the runtime the build
        recorded. Refused where its embeddings may differ from the memory's beyond the tolerance.
      search_join: How query batches meet the shards (``--search-join``; pipelines.stages.search_shards.SearchJoin).
      pipeline_options: Runner settings: Beam flags or a PipelineOptions (`pipelines.runner.BeamOptions`;
        default: one in-process worker).
      test_pipeline: Build the graph on this pipeline instead of one made from ``pipeline_options``.

    Raises:
      FlagError: a bad value or combination (before anything is read).
      EvaluationError: the memory cannot answer these queries, or the books do not balance.
      VersionPurgedError: a purge removed the pinned ``version`` (or, unpinned, each latest version in turn)
        while the job read it.
    """
    _check_options(source=source, encoder_id=encoder_id, k_max=k_max, search_threads=search_threads,
                   route_probes=route_probes, route_ratio=route_ratio, rerank=rerank)
    options = resolve_pipeline_options(pipeline_options)
    query_filters = rerank_args.load_query_filters(filters_file) if filters_file else None
    root = memory.rstrip("/")
    # A purge (`vmem forget --purge-history`, a re-index's) may delete the latest version's files while the job
    # reads them, once a newer version is published: an unpinned evaluation then runs again on the new latest.
    attempts = 1 if version is not None or test_pipeline is not None else _PURGED_RERUNS + 1
    for attempt in range(attempts):
        try:
            return _evaluate_once(root, source=source, output=output, encoder_id=encoder_id, version=version,
                                  k_max=k_max, params=params, query_batch=query_batch, search_threads=search_threads,
                                  route_probes=route_probes, route_ratio=route_ratio, default_filter=default_filter,
                                  query_filters=query_filters, filters_file=filters_file, crowding=crowding,
                                  rerank=rerank, pixel_baseline=pixel_baseline, query_encoder=query_encoder,
                                  verify=verify, runtime=runtime, search_join=search_join, options=options,
                                  test_pipeline=test_pipeline)
        except _VersionPurged as purged:
            if attempt == attempts - 1:
                raise VersionPurgedError.of(root, purged.version, purged.error) from None
            _LOG.warning("evaluate: version %d of %s was purged while it was evaluated; evaluating the latest "
                         "version", purged.version, root)
    raise AssertionError("unreachable")


def _without_runtime(spec: EncoderSpec) -> dict:
    return {k: v for k, v in spec.to_dict().items() if k != "runtime"}


class _VersionPurged(Exception):
    """The evaluated version was purged while the job ran (``error`` is what the job raised)."""

    def __init__(self, version: int, error: Exception):
        super().__init__(version)
        self.version, self.error = version, error


def _evaluate_once(root: str, *, source, output, encoder_id, version, k_max, params, query_batch, search_threads,
                   route_probes, route_ratio, default_filter, query_filters, filters_file, crowding, rerank,
                   pixel_baseline, query_encoder, verify, runtime, search_join, options, test_pipeline
                   ) -> beam.runners.runner.PipelineResult:
    """One run of `evaluate_memory`'s job; raises _VersionPurged when its version vanished under it."""
    manifest = read_manifest(root, version=version)
    if isinstance(source, ImageSource) and query_encoder is not None and not is_precomputed(manifest.encoder):
        encoder = memory_encoder_spec(manifest)
        # What runs the encoder is --runtime's choice, not the config's.
        if _without_runtime(query_encoder) != _without_runtime(encoder):
            raise EvaluationError(
                f"--config selects encoder {query_encoder.to_dict()} but memory {root} was built with "
                f"{encoder.to_dict()}; queries must use the memory's encoder. Drop --config.")
    p = test_pipeline or beam.Pipeline(options=options)
    evaluate_pipeline(p, root=root, manifest=manifest, source=source, output=output, encoder_id=encoder_id,
                      version=version, k_max=k_max, params=params, query_batch=query_batch,
                      search_threads=search_threads, route_probes=route_probes, route_ratio=route_ratio,
                      default_filter=default_filter, query_filters=query_filters, crowding=crowding, rerank=rerank,
                      pixel_baseline=pixel_baseline, verify=verify, runtime=runtime, search_join=search_join,
                      extra=selection_report(default_filter=default_filter, query_filters=query_filters,
                                             filters_file=filters_file, crowding=crowding, rerank=rerank))
    storage.makedirs(output)
    # An earlier run's summary would list its neighbour files; only this run's may be read after it.
    storage.remove_tree(storage.join(output, EvaluationSummary.FILE_NAME))
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # pylint: disable=broad-except  # Re-raised unless the version was purged.
        if manifest.version in list_versions(root) or not list_versions(root):
            raise
        raise _VersionPurged(manifest.version, e) from e
    return result


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses ``argv`` (evaluate flags + Beam flags) and runs `evaluate_memory` with them.

    Raises:
      FlagError: a bad flag value or combination (before anything is read).
      EvaluationError: the memory cannot answer these queries, or the books do not balance.
    """
    from configs.build import load_config  # pylint: disable=g-import-not-at-top

    args, beam_args = build_arg_parser().parse_known_args(argv)
    try:
        params = VotingParams(softmax_tau=args.tau, rank_alpha=args.alpha)
        default_filter, crowding = rerank_args.selection_from_args(args)
        spec = rerank_args.rerank_spec_from_args(args)
    except ValueError as e:
        raise FlagError(str(e)) from None
    query_encoder = None
    if args.embeddings is not None:
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        source = parse_embeddings_spec(args.embeddings)
    else:
        source = parse_image_spec(args.images)
        if args.config:
            query_encoder = load_config(args.config).encoder
    return evaluate_memory(memory=args.memory, source=source, output=args.output, encoder_id=args.encoder_id,
                           version=args.version, k_max=args.k_max, params=params, query_batch=args.query_batch,
                           search_threads=args.search_threads, route_probes=args.route_probes,
                           route_ratio=args.route_ratio, default_filter=default_filter, filters_file=args.filters,
                           crowding=crowding, rerank=_rerank_options(args, spec), pixel_baseline=args.pixel_baseline,
                           query_encoder=query_encoder, verify=args.verify,
                           runtime=None if args.runtime is None else parse_runtime(args.runtime),
                           search_join=args.search_join, pipeline_options=beam_args,
                           test_pipeline=test_pipeline)
