"""The query-and-vote job: embed a held-out split, search every shard, merge top-K, vote, report.

Local::

    vmem evaluate --memory out/fmnist-memory --images data/fashion-mnist/test --output out/fmnist-eval

Dataflow::

    vmem evaluate --memory gs://BUCKET/memories/in1k --images gs://BUCKET/imagenet/val \\
        --output gs://BUCKET/evals/in1k --k-max 100 \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

Queries are embedded with the memory's own encoder (from its manifest); a different encoder is refused.
Query batches fan out to the shards (grouped by shard, so each shard is loaded once, by the one worker that
searches every batch routed to it, and released afterwards), each shard returns a partial top-K for the
batch's queries it searched, a batch's partials merge exactly per query in one combine keyed by the batch
(ties by id, as ``VisualMemory.search``; pipelines.stages.search_shards), and the neighbour lists are
written as JSONL before voting, so ``vmem vote`` can re-vote without re-searching. Voting runs per batch of
merged queries where they were merged; only the per-rule, per-k counts of correct answers are summed into the
one report worker, so no worker ever holds every query's neighbours.

Pruned memories: a soft-pruned version (``vmem prune --mode soft``) carries entry weights; every
neighbour then carries its weight (``neighbor_entry_weights`` in the JSONL), ``accuracy`` / ``best`` in
the report are the weighted vote and ``accuracy_unpruned`` / ``best_unpruned`` the same neighbours voted
without weights. A hard prune publishes a forget; compare it by evaluating the version before it::

    vmem evaluate --memory M --images TEST --output out/eval-before --version N   # N = version pruned from
    vmem evaluate --memory M --images TEST --output out/eval-after                # the latest
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np

from encoders.bundled import resolve_preprocess
from evaluation.metrics import CorrectCounts
from memory import storage
from memory.store.manifest import Manifest
from memory.store.versions import read_manifest
from memory.search.routing import check_route_ratio
from memory.search.setting import default_setting
from memory.decide.voting import VotingParams, VotingRule
from pipelines.build import is_precomputed, precomputed_identity, read_precomputed
from pipelines.runner import with_default_runner
from pipelines.stages.embed import DecodeImages, EmbedImages, check_same_identity, memory_encoder_spec
from pipelines.stages import rerank as rerank_stage
from pipelines import rerank_args
from pipelines.io.readers import ReadImages, parse_image_spec
from pipelines.records import EmbeddedImage
# The search stages live in pipelines.stages.search_shards; these names stay importable from here (prune, tests).
from pipelines.stages.search_shards import (BatchNeighbors, MergeNeighbors, QueryBatch, QueryNeighbors,  # noqa: F401
                                     SearchShards)
from pipelines.stages.write import WriteDeadLetters

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
NEIGHBORS_PREFIX = "neighbors"


class EvaluationError(RuntimeError):
    """The evaluation cannot give a meaningful answer (the message says why and what to do)."""


def check_query_identity(memory_identity: dict, query_identity: dict) -> None:
    """Refuses queries embedded by a different encoder."""
    check_same_identity(memory_identity, query_identity, what="queries",
                        fix="Evaluate with the memory's own encoder files (leave --config unset), or rebuild the "
                            "memory with the new encoder.")


def to_record(query_id: str, q: QueryNeighbors, class_index: dict[str, int]):
    from evaluation.neighbors_io import NeighborRecord
    n = q.neighbors
    keep = n.labels[0] >= 0
    return NeighborRecord(
        query_id=query_id, true_label=class_index.get(q.label, -1),
        neighbor_ids=n.ids[0][keep].astype(str).tolist(), neighbor_labels=n.labels[0][keep].astype(int).tolist(),
        neighbor_distances=n.distances[0][keep].tolist(),
        neighbor_weights=None if n.weights is None else n.weights[0][keep].tolist())


def neighbor_arrays(batch: Sequence[tuple[str, QueryNeighbors]], class_index: dict[str, int], k_max: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """What `evaluation.neighbors_io.to_arrays` makes of the batch's `to_record`s, without the records.

    (labels int64 [n, k_max], distances float64 [n, k_max], true int64 [n], entry weights float64 or None):
    each query's real neighbours first, padded with label -1, distance inf and weight 0.
    """
    n = len(batch)
    weighted = [q.neighbors.weights is not None for _, q in batch]
    if any(weighted) and not all(weighted):
        raise ValueError(f"query {batch[weighted.index(False)][0]!r} has no entry weights but others of its batch "
                         "do; one memory version's neighbours are either all weighted or all not")
    labels = np.full((n, k_max), -1, dtype=np.int64)
    distances = np.full((n, k_max), np.inf, dtype=np.float64)
    weights = np.zeros((n, k_max)) if n and all(weighted) else None
    for i, (_, q) in enumerate(batch):
        nb = q.neighbors
        keep = np.flatnonzero(nb.labels[0] >= 0)[:k_max]
        labels[i, :keep.size] = nb.labels[0][keep]
        distances[i, :keep.size] = nb.distances[0][keep]
        if weights is not None:
            weights[i, :keep.size] = nb.weights[0][keep]
    true = np.fromiter((class_index.get(q.label, -1) for _, q in batch), dtype=np.int64, count=n)
    return labels, distances, true, weights


class WriteNeighbors(beam.PTransform):
    """(query id, QueryNeighbors) -> JSONL neighbour lists (``vmem vote`` input); returns file names."""

    def __init__(self, output: str, class_names: Sequence[str]):
        super().__init__()
        self._prefix = storage.join(output, NEIGHBORS_PREFIX)
        self._class_index = {c: i for i, c in enumerate(class_names)}

    def expand(self, merged):
        class_index = self._class_index
        return (merged
                | "ToRecord" >> beam.MapTuple(lambda qid, q: json.dumps(to_record(qid, q, class_index).to_json()))
                | "WriteJsonl" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))


class VoteTally(NamedTuple):
    """Votes of a set of queries, reduced to what the report needs (summable, a few KB whatever the count).

    Attributes:
      counts: Correct predictions per rule and k (weighted votes on a soft-pruned memory).
      unpruned: On a soft-pruned memory, the same neighbours voted without entry weights; else None.
      unknown_labels: Query class names the memory does not know (their queries count as wrong).
    """
    counts: CorrectCounts
    unpruned: CorrectCounts | None
    unknown_labels: frozenset[str]


def vote_batch(batch: Sequence[tuple[str, QueryNeighbors]], class_index: dict[str, int], k_max: int,
               params: VotingParams) -> VoteTally:
    """Votes one batch of merged neighbour lists with every rule at every k (pure numpy, no Beam)."""
    from memory.decide.voting import predict_all_k

    labels, distances, true, entry_weights = neighbor_arrays(batch, class_index, k_max)
    counts = CorrectCounts.of(predict_all_k(labels, distances, k_max=k_max, params=params,
                                            entry_weights=entry_weights), true)
    unpruned = None
    if entry_weights is not None:
        unpruned = CorrectCounts.of(predict_all_k(labels, distances, k_max=k_max, params=params), true)
    unknown = frozenset(q.label for _, q in batch if q.label not in class_index)
    return VoteTally(counts, unpruned, unknown)


def sum_tallies(tallies: Sequence[VoteTally]) -> VoteTally:
    """Adds the tallies of disjoint query sets."""
    unpruned = [t.unpruned for t in tallies]
    if any(u is None for u in unpruned) and not all(u is None for u in unpruned):
        raise ValueError("cannot add weighted and unweighted vote tallies (queries of one memory version "
                         "are either all weighted or all not)")
    return VoteTally(CorrectCounts.sum(t.counts for t in tallies),
                     None if unpruned[0] is None else CorrectCounts.sum(unpruned),
                     frozenset().union(*(t.unknown_labels for t in tallies)))


class _SumTalliesFn(beam.CombineFn):
    """Sums VoteTally values; None when there were no queries at all."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, tally):
        return self.merge_accumulators([acc, tally])

    def merge_accumulators(self, accumulators):
        present = [a for a in accumulators if a is not None]
        return sum_tallies(present) if present else None

    def extract_output(self, acc):
        return acc


class VoteNeighbors(beam.PTransform):
    """(query id, merged QueryNeighbors) -> one VoteTally for all queries.

    Each batch of queries is voted where it was merged; only the per-rule, per-k correct counts travel
    to the single report worker, so the job's memory does not grow with the number of queries.
    """

    def __init__(self, class_names: Sequence[str], k_max: int, params: VotingParams, *, batch_size: int = 1024):
        super().__init__()
        self._class_index = {c: i for i, c in enumerate(class_names)}
        self._k_max = k_max
        self._params = params
        self._batch_size = batch_size

    def expand(self, merged):
        class_index, k_max, params = self._class_index, self._k_max, self._params
        return (merged
                | "BatchForVote" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
                | "VoteBatch" >> beam.Map(lambda batch: vote_batch(batch, class_index, k_max, params))
                | "SumTallies" >> beam.CombineGlobally(_SumTalliesFn()))


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


class _ReportFn(beam.DoFn):
    def __init__(self, output: str, root: str, manifest: Manifest, params: VotingParams,
                 extra: dict, pixel_baseline_k: int | None):
        self._output = output
        self._root = root
        self._manifest = manifest
        self._params = params
        self._extra = extra
        self._pixel_k = pixel_baseline_k

    def process(self, unused, tally, identities, failed, records_read, distinct_queries, neighbor_files, pixel_queries,
                rerank=None):
        from evaluation import report as report_lib

        for identity in identities:
            check_query_identity(self._manifest.encoder, json.loads(identity))
        check_query_counts(read=records_read, queries=distinct_queries, failed=failed,
                           dead_letter_dir=storage.join(self._output, "dead_letter"))
        if tally is None or tally.counts.queries == 0:
            raise EvaluationError(f"no query could be embedded ({failed} failed); see the reasons in "
                                  f"{storage.join(self._output, 'dead_letter')}/.")
        baselines = {}
        if self._pixel_k:
            # Only here are the queries' uris gathered (the raw-pixel baseline loads every image anyway).
            refs = sorted(pixel_queries)
            from evaluation.baselines import memory_pixel_baseline
            baselines = memory_pixel_baseline(self._root, self._manifest, [uri for _, uri, _ in refs],
                                       np.array([label for _, _, label in refs], dtype=np.int64), k=self._pixel_k)
        weights_ref = self._manifest.entry_weights
        weights_info = None if weights_ref is None else {
            "kind": weights_ref.kind, "count": weights_ref.count, "params": dict(weights_ref.params)}
        report = report_lib.build_report(
            tally.counts.table(), queries=tally.counts.queries, failed=failed, extra=dict(
                self._extra, neighbor_files=sorted(neighbor_files), memory_entries=self._manifest.total,
                memory_version=self._manifest.version, entry_weights=weights_info,
                query_classes_unknown_to_memory=sorted(tally.unknown_labels), softmax_tau=self._params.softmax_tau,
                rank_alpha=self._params.rank_alpha, rank_convention="weight 1/(alpha + i), i 0-based",
                tie_rule="first class to reach the top score wins",
                **({} if rerank is None else {"rerank": dict(self._extra["rerank"], **rerank)})),
            unpruned_table=None if tally.unpruned is None else tally.unpruned.table())
        with tempfile.TemporaryDirectory() as tmp:
            report_lib.write_report(tmp, report, baselines=baselines)
            if storage.is_gcs(self._output):
                storage.upload_dir(tmp, self._output)
            else:
                for name in os.listdir(tmp):
                    storage.write_bytes(storage.join(self._output, name), storage.read_bytes(os.path.join(tmp, name)))
        yield report


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
    parser.add_argument("--k-max", type=int, default=100, help="neighbours retrieved and voted over (default 100)")
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
    parser.add_argument("--version", type=int, default=None, metavar="N",
                        help="evaluate this pinned version of the memory (default: the latest); e.g. the version "
                             "before a hard prune, to compare")
    parser.add_argument("--config", default=None,
                        help="optional config whose encoder must equal the memory's (refused otherwise)")
    parser.add_argument("--pixel-baseline", type=int, default=None, metavar="K",
                        help="also score raw-pixel kNN (1-NN and rank@K) over the memory's source images")
    rerank_args.add_selection_args(parser, per_query_file=True)
    rerank_args.add_rerank_args(parser)
    return parser


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses flags, builds the evaluation graph and runs it to completion."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from configs.build import load_config

    args, beam_args = build_arg_parser().parse_known_args(argv)
    if args.k_max < 1:
        raise ValueError(f"--k-max must be >= 1, got {args.k_max}.")
    if args.search_threads is not None and args.search_threads < 1:
        raise ValueError(f"--search-threads must be >= 1, got {args.search_threads}.")
    if args.route_probes is not None and args.route_probes < 1:
        raise ValueError(f"--route-probes must be >= 1, got {args.route_probes}.")
    params = VotingParams(softmax_tau=args.tau, rank_alpha=args.alpha)
    root = args.memory.rstrip("/")
    manifest = read_manifest(root, version=args.version)
    if args.route_ratio is not None:
        if args.route_probes is not None:
            raise ValueError(f"--route-probes {args.route_probes} and --route-ratio {args.route_ratio} are two "
                             "routing rules; pass one.")
        check_route_ratio(args.route_ratio)
    for flag, value in (("--route-probes", args.route_probes), ("--route-ratio", args.route_ratio)):
        if value is not None and manifest.router is None:
            raise EvaluationError(f"{flag} {value}: memory {root} is hash-sharded (every query searches every "
                                  f"shard); drop {flag} or build with --sharding partition.")
    if is_precomputed(manifest.encoder) or args.embeddings is not None:
        return _run_precomputed(args, beam_args, root, manifest, params, test_pipeline)
    if args.encoder_id:
        raise EvaluationError("--encoder-id applies to --embeddings only; image queries are embedded with the "
                              "memory's own encoder.")
    encoder = memory_encoder_spec(manifest)
    if args.config:
        requested = load_config(args.config).encoder
        if requested.to_dict() != encoder.to_dict():
            raise EvaluationError(
                f"--config {args.config!r} selects encoder {requested.to_dict()} but memory {root} was built with "
                f"{encoder.to_dict()}; queries must use the memory's encoder. Drop --config.")
    source = parse_image_spec(args.images)
    preprocess = resolve_preprocess(encoder)
    storage.makedirs(args.output)

    p = test_pipeline or beam.Pipeline(options=PipelineOptions(
        with_default_runner(beam_args)))
    records, read_failures = p | "ReadQueries" >> ReadImages(source)
    images, decode_failures = records | "DecodeQueries" >> DecodeImages(preprocess)
    queries, embed_failures, identities = images | "EmbedQueries" >> EmbedImages(
        # Batches start at min_batch_size and grow; at 8 most batches of a 1,000-query run stayed at 8-9 images,
        # and the bundled encoder embeds 96 images/s at batch 8 against 107-114 at 32-64 (2 cores).
        encoder, min_batch_size=32, max_batch_size=64, progress_every=500)
    records_read = ((records, read_failures) | "AllRead" >> beam.Flatten()
                    | "CountRead" >> beam.combiners.Count.Globally())
    return _search_vote_report(p, args, root, manifest, params, queries=queries, identities=identities,
                               failure_sets=(read_failures, decode_failures, embed_failures),
                               records_read=records_read, source_info={"images": source.to_dict()})


def _run_precomputed(args, beam_args, root: str, manifest: Manifest, params: VotingParams, test_pipeline):
    """Queries from precomputed embeddings, for a memory built from precomputed embeddings of the same encoder."""
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
    from pipelines.io.embedding_sources import embedding_dim, parse_embeddings_spec

    name = manifest.encoder.get("name")
    if args.embeddings is None:
        raise EvaluationError(
            f"memory {root} was built from precomputed embeddings of encoder {name!r}, which this job cannot run "
            f"on images; evaluate with --embeddings SPEC --encoder-id {name} (queries embedded by that encoder).")
    if not is_precomputed(manifest.encoder):
        raise EvaluationError(
            f"memory {root} was built from images with encoder {name!r}; precomputed query embeddings cannot be "
            "shown to come from it. Evaluate with --images (embedded by the memory's own encoder).")
    if args.encoder_id != name:
        raise EvaluationError(
            f"--encoder-id {args.encoder_id!r}: memory {root} holds embeddings of encoder {name!r}; queries must come "
            f"from the same encoder (pass --encoder-id {name} if they do).")
    source = parse_embeddings_spec(args.embeddings)
    dim = embedding_dim(source)
    if dim != manifest.dim:
        raise EvaluationError(f"--embeddings {source.location}: dim {dim}, memory {root} has dim {manifest.dim}.")
    storage.makedirs(args.output)
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    blocks, read_failures, identities, records_read = read_precomputed(
        p, source, precomputed_identity(args.encoder_id, dim, source.to_dict().get("location", "")))
    queries = blocks | "QueryRows" >> beam.FlatMap(
        lambda b: [EmbeddedImage(str(b.ids[i]), str(b.uris[i]), str(b.labels[i]), b.embeddings[i])
                   for i in range(len(b))])
    return _search_vote_report(p, args, root, manifest, params, queries=queries, identities=identities,
                               failure_sets=(read_failures,), records_read=records_read,
                               source_info={"embeddings": source.to_dict()})


def _search_vote_report(p, args, root: str, manifest: Manifest, params: VotingParams, *, queries, identities,
                        failure_sets, records_read, source_info: dict):
    """The shared back half: search every (routed) shard, merge, write neighbours, vote and report."""
    default_filter, crowding = rerank_args.selection_from_args(args)
    query_filters = rerank_args.load_query_filters(args.filters) if args.filters else None
    spec = rerank_args.rerank_spec_from_args(args)
    for flag, value in (("--rerank-top-n", args.rerank_top_n), ("--rerank-k", args.rerank_k)):
        if spec is not None and not 1 <= value <= args.k_max:
            raise EvaluationError(f"{flag} {value} must be in [1, --k-max {args.k_max}]: the job retrieves k-max "
                                  f"neighbours; raise --k-max or lower {flag}.")
    setting = default_setting(manifest)  # `vmem tune`'s, unless --route-probes/--route-ratio override its routing.
    route_probes, route_ratio = args.route_probes, args.route_ratio
    if route_probes is None and route_ratio is None and setting is not None:
        route_probes, route_ratio = setting.route_probes, setting.route_ratio
    merged = (queries
              | "SearchShards" >> SearchShards(root, manifest, k=args.k_max, batch_size=args.query_batch,
                                                route_probes=route_probes, route_ratio=route_ratio,
                                                default_filter=default_filter,
                                                query_filters=query_filters, crowding=crowding,
                                                with_uris=spec is not None, setting=setting,
                                                search_threads=args.search_threads)
              | "MergeNeighbors" >> MergeNeighbors(args.k_max, crowding))
    neighbor_files = merged | "WriteNeighbors" >> WriteNeighbors(args.output, manifest.class_names)
    failures = tuple(failure_sets) | "AllFailures" >> beam.Flatten()
    _ = failures | "WriteDeadLetters" >> WriteDeadLetters(args.output)
    failed = failures | "CountFailed" >> beam.combiners.Count.Globally()
    extra = {"command": "vmem evaluate", "memory": root, "version_pinned": args.version, **source_info,
             "encoder": manifest.encoder.get("name"), "k_max": args.k_max}
    if manifest.router is not None:
        if route_ratio is not None:
            extra["route_ratio"] = route_ratio
        else:
            extra["route_probes"] = route_probes or manifest.router.probes
    if setting is not None:
        extra["search_setting"] = setting.to_dict()
    extra.update(rerank_args.report_extra(args, default_filter, query_filters, crowding, spec))
    side = {}  # The re-rank summary, when re-ranking.
    if spec is not None:
        _, summary = merged | "Rerank" >> rerank_stage.RerankStage(
            spec, args.output, manifest.class_names, rule=VotingRule.parse(args.rerank_rule), k=args.rerank_k,
            params=params, below=args.rerank_below, top_n=args.rerank_top_n, dry_run=args.rerank_dry_run)
        side["rerank"] = beam.pvalue.AsSingleton(summary)
    tally = merged | "Vote" >> VoteNeighbors(manifest.class_names, args.k_max, params)
    distinct_queries = (merged | "QueryIds" >> beam.Keys() | "DistinctQueryIds" >> beam.Distinct()
                        | "CountQueries" >> beam.combiners.Count.Globally())
    class_index = {c: i for i, c in enumerate(manifest.class_names)}
    pixel = bool(args.pixel_baseline)
    pixel_queries = merged | "PixelBaselineQueries" >> beam.FlatMapTuple(
        lambda qid, q: [(qid, q.uri, class_index.get(q.label, -1))] if pixel else [])
    _ = (p
         | "Once" >> beam.Create([None])
         | "Report" >> beam.ParDo(
             _ReportFn(args.output, root, manifest, params, extra, args.pixel_baseline),
             tally=beam.pvalue.AsSingleton(tally), identities=beam.pvalue.AsList(identities),
             failed=beam.pvalue.AsSingleton(failed), records_read=beam.pvalue.AsSingleton(records_read),
             distinct_queries=beam.pvalue.AsSingleton(distinct_queries),
             neighbor_files=beam.pvalue.AsList(neighbor_files),
             pixel_queries=beam.pvalue.AsList(pixel_queries), **side))
    result = p.run()
    result.wait_until_finish()
    return result
