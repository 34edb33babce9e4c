"""The pruning job: reliability counts by leave-one-out self-query, then hard or soft pruning.

Local::

    vmem prune --memory out/fmnist-memory --mode soft
    vmem prune --memory out/fmnist-memory --mode hard --threshold 64
    vmem prune --memory out/fmnist-memory --mode soft --counts-only      # counts and summary only

Dataflow::

    vmem prune --memory gs://BUCKET/memories/in1k --mode hard --threshold 128 --k 100 \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

Geirhos et al. 2024, "Memory pruning": every live entry of the latest version n queries the memory with its
own *stored* embedding (nothing is re-embedded), with k + 1 neighbours so that k remain once the entry
itself is dropped (by id: exact duplicates do count each other). Each neighbour whose label differs from
the query's scores one hit; v(j) is entry j's number of hits (0 if never hit). The search is the
evaluation job's own (``SearchMemory`` over main + delta shards, forgotten rows skipped, merged exactly), and
the counts are a ``CombinePerKey(sum)``.

Outputs: ``MEMORY/pruning/v{n:06d}-counts/bucket-BBBBB-of-NNNNN.npz`` (ids, v, k, version of the entries whose
id hashes to bucket B; ``read_bucket_counts`` reads them all back) and ``v{n:06d}-summary.json`` (the v histogram
and what was published). No worker holds every entry's count: the (id, v) pairs are grouped into N id-hash
buckets (``--count-buckets``, default one per million entries); each bucket writes its file and reduces itself
to its v histogram and the ids it selects, and only those reach the final step, which publishes version n + 1
(unless --counts-only):

* ``--mode hard --threshold T``: ``memory.store.mutations.forget`` of exactly the entries with v >= T (nothing is
  published when there are none). Compare with ``vmem evaluate --version n`` (before) vs the latest.
* ``--mode soft``: ``memory.store.mutations.publish_entry_weights`` with gamma = 1.75 / (1 + v) for the entries
  with v >= 1 (all others weigh 1). ``vmem evaluate`` then reports the weighted vote as ``accuracy`` and the
  unweighted one as ``accuracy_unpruned``.

The publish is exclusive on version n: if the memory moved on meanwhile, the job fails and publishes
nothing (re-run it). A retried final step that finds its own change already published as n + 1 accepts it.

Python: ``run(argv)`` parses the flags into `prune_memory(*, memory, mode, ...)`, which checks them, builds
the graph (`prune_pipeline(p, *, ...)`) and runs it; experiments call `prune_memory`. ``vmem prune``
(vmem/prune.py) runs the job and prints the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from typing import Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from memory.decide import pruning

from memory import storage
from memory.store.after_publish import after_publish
from memory.store.integrity import NO_VERIFY_HELP
from memory.store.manifest import Manifest
from memory.store.versions import read_manifest
from memory.regions.layout import EntryKind, is_region_id, region_grid
from memory.search.filters import QueryFilter
from memory.search.shard_search import load_forgotten, searchable_shards
from memory.store.sharding import shard_for_id
from pipelines.runner import BeamOptions, FlagError, after_publish_error, resolve_pipeline_options
from pipelines.stages.search_shards import QueryNeighbors, SearchMemory
from pipelines.records import EmbeddedImage

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"

__all__ = ["BucketCounts", "CountMislabelledHits", "DecidePerBucket", "PruneOutcome", "ReadMemoryEntries",
           "build_arg_parser", "check_args", "check_prune_options", "counts_dir", "prune_memory", "prune_pipeline",
           "read_bucket_counts", "run", "summary_of_value_counts"]
# Entries per id-hash bucket of counts by default: a bucket's ids and counts are a few tens of MB.
ENTRIES_PER_COUNT_BUCKET = 1_000_000


class PruneOutcome(NamedTuple):
    """What the final step did (also stored in the summary JSON under ``outcome``)."""
    mode: str
    base_version: int
    published_version: Optional[int]
    entries: int
    pruned: int           # hard: entries forgotten
    down_weighted: int    # soft: entries with gamma < 1
    counts_path: str


class _ReadShardEntriesFn(beam.DoFn):
    """shard index -> EmbeddedImage for each live row of that shard (its stored embedding)."""

    def __init__(self, root: str, manifest: Manifest, verify: bool = True):
        self._root = root
        self._manifest = manifest
        self._verify = verify
        self._read = Metrics.counter(_NAMESPACE, "prune_entries_read")

    def process(self, shard_index: int) -> Iterable[EmbeddedImage]:
        from memory.store.shard import read_shard_data
        info = searchable_shards(self._manifest)[shard_index]
        data = read_shard_data(storage.join(self._root, info.path), info, verify=self._verify)
        ids = data.ids.astype(str)
        live = ~np.isin(ids, load_forgotten(self._root, self._manifest))
        names = self._manifest.class_names
        for row in np.flatnonzero(live):
            yield EmbeddedImage(str(ids[row]), str(data.uris[row]), names[int(data.labels[row])],
                                np.asarray(data.embeddings[row], dtype=np.float32))
        self._read.inc(int(live.sum()))


class ReadMemoryEntries(beam.PTransform):
    """The live entries of one version (main and delta shards, forgotten excluded) as EmbeddedImage; ``verify``:
    check the shard files read against the manifest (memory.store.integrity)."""

    def __init__(self, root: str, manifest: Manifest, *, verify: bool = True):
        super().__init__()
        self._root = root
        self._manifest = manifest
        self._verify = verify

    def expand(self, pbegin):
        shards = [i for i, s in enumerate(searchable_shards(self._manifest)) if s.count > 0]
        return (pbegin
                | "ShardIndices" >> beam.Create(shards)
                # One shard per worker; the reads then fan out in parallel.
                | "Spread" >> beam.Reshuffle()
                | "ReadShard" >> beam.ParDo(_ReadShardEntriesFn(self._root, self._manifest, self._verify)))


class _MislabelledHitsFn(beam.DoFn):
    """A batch of (query id, QueryNeighbors with k + 1 neighbours) -> (neighbour id, 1) per differing label."""

    def __init__(self, class_names: Sequence[str], k: int):
        self._class_index = {c: i for i, c in enumerate(class_names)}
        self._k = k
        self._queries = Metrics.counter(_NAMESPACE, "prune_queries")
        self._hits = Metrics.counter(_NAMESPACE, "prune_mislabelled_hits")
        self._self_missing = Metrics.counter(_NAMESPACE, "prune_self_not_among_neighbors")

    def process(self, batch: Sequence[tuple[str, QueryNeighbors]]):
        self_ids = np.asarray([qid for qid, _ in batch], dtype=str)
        query_labels = np.asarray([self._class_index[q.label] for _, q in batch], dtype=np.int64)
        ids = np.concatenate([q.neighbors.ids.astype(str) for _, q in batch])
        labels = np.concatenate([q.neighbors.labels for _, q in batch])
        kept_ids, kept_labels, found = pruning.leave_one_out(ids, labels, self_ids=self_ids, k=self._k)
        hits = pruning.mislabelled_hits(query_labels, kept_ids, kept_labels)
        self._queries.inc(len(batch))
        self._hits.inc(int(hits.size))
        # Only with more than k exact duplicates sorting before it by id (still exact leave-one-out).
        self._self_missing.inc(int((~found).sum()))
        for neighbor_id in hits.tolist():
            yield neighbor_id, 1


class CountMislabelledHits(beam.PTransform):
    """Merged self-query neighbours + the live entries -> (entry id, v) for every live entry."""

    def __init__(self, class_names: Sequence[str], *, k: int, batch_size: int = 1024):
        super().__init__()
        self._class_names = tuple(class_names)
        self._k = k
        self._batch_size = batch_size

    def expand(self, pcolls):
        merged, entries = pcolls
        hits = (merged
                | "BatchMerged" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
                | "MislabelledHits" >> beam.ParDo(_MislabelledHitsFn(self._class_names, self._k)))
        # Every live entry contributes a 0, so entries that are never hit get v = 0.
        zeros = entries | "ZeroPerEntry" >> beam.Map(lambda e: (e.id, 0))
        return ((hits, zeros)
                | "AllHits" >> beam.Flatten()
                | "SumPerEntry" >> beam.CombinePerKey(sum))


counts_dir = pruning.counts_dir
read_bucket_counts = pruning.read_all_counts  # Every bucket file of one run, sorted by id (inspection, tests).


def summary_of_value_counts(values: np.ndarray, entries: np.ndarray,
                            thresholds: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)) -> dict:
    """``pruning.counts_summary(v)`` computed from the distinct v values and how many entries have each.

    The buckets' histograms add up, so the summary of every entry needs no array of every entry's v.
    """
    values = np.asarray(values, dtype=np.int64)
    entries = np.asarray(entries, dtype=np.int64)
    order = np.argsort(values)
    values, entries = values[order], entries[order]
    n = int(entries.sum())
    top = int(values[entries > 0].max()) if n else 0
    bins = [(0, 0)]
    lo = 1
    while lo <= top:
        bins.append((lo, 2 * lo - 1))
        lo *= 2
    total = int((values * entries).sum())
    cum = np.cumsum(entries)

    def nth(i: int) -> int:  # The i-th smallest v (0-based).
        return int(values[np.searchsorted(cum, i, side="right")])

    median = 0.0 if not n else (float(nth(n // 2)) if n % 2 else (nth(n // 2 - 1) + nth(n // 2)) / 2.0)
    return {
        "entries": n,
        "hit": int(entries[values >= 1].sum()),
        "mean": total / n if n else 0.0,
        "median": median,
        "max": top,
        "histogram": [{"v_min": a, "v_max": b, "entries": int(entries[(values >= a) & (values <= b)].sum())}
                      for a, b in bins],
        "at_or_above": {str(t): int(entries[values >= t].sum()) for t in thresholds},
        "total_mislabelled_hits": total,
    }


class BucketCounts(NamedTuple):
    """One id-hash bucket of the counts, reduced to what the final step needs (small but for ``selected``).

    Attributes:
      bucket: Bucket index.
      entries: Entries counted in it.
      values / value_entries: Distinct v values and how many of its entries have each (its v histogram).
      selected_ids / selected_v: The entries this bucket's decision selects (hard: v >= T; soft: v >= 1;
        none for --counts-only), sorted by id, with their v.
    """
    bucket: int
    entries: int
    values: np.ndarray
    value_entries: np.ndarray
    selected_ids: np.ndarray
    selected_v: np.ndarray


class _DecideBucketFn(beam.DoFn):
    """(bucket, [(id, v)]) -> BucketCounts after writing the bucket's counts file."""

    def __init__(self, root: str, version: int, k: int, mode: Optional[pruning.PruningMode],
                 threshold: Optional[int], counts_only: bool, buckets: int):
        self._root, self._version, self._k = root, version, k
        self._mode, self._threshold, self._counts_only, self._buckets = mode, threshold, counts_only, buckets

    def process(self, element):
        bucket, pairs = element
        pairs = list(pairs)
        ids = np.asarray([i for i, _ in pairs], dtype=str) if pairs else np.zeros((0,), "<U1")
        v = np.asarray([c for _, c in pairs], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        ids, v = ids[order], v[order]
        if ids.size > 1 and (ids[1:] == ids[:-1]).any():  # An id always hashes to one bucket: unique globally.
            dup = ids[1:][ids[1:] == ids[:-1]]
            raise RuntimeError(f"ids counted twice in version {self._version}: {dup[:10].tolist()}; the counts "
                               "are inconsistent, nothing was published")
        import io
        buf = io.BytesIO()
        np.savez(buf, ids=ids, v=v, k=np.int64(self._k), version=np.int64(self._version))
        storage.write_bytes(pruning.bucket_counts_path(self._root, self._version, bucket, self._buckets),
                            buf.getvalue())
        if self._counts_only:
            keep = np.zeros(ids.shape, dtype=bool)
        elif self._mode is pruning.PruningMode.HARD:
            keep = np.isin(ids, pruning.hard_prune_ids(ids, v, self._threshold))
        else:
            keep = v >= 1
        values, value_entries = np.unique(v, return_counts=True)
        yield BucketCounts(int(bucket), int(ids.size), values, value_entries.astype(np.int64), ids[keep], v[keep])


class DecidePerBucket(beam.PTransform):
    """(entry id, v) -> one BucketCounts per non-empty id-hash bucket (``shard_for_id(id, buckets)``)."""

    def __init__(self, root: str, version: int, *, k: int, mode: Optional[pruning.PruningMode],
                 threshold: Optional[int], counts_only: bool, buckets: int):
        super().__init__()
        self._fn = _DecideBucketFn(root, version, k, mode, threshold, counts_only, buckets)
        self._buckets = buckets

    def expand(self, counts):
        buckets = self._buckets
        return (counts
                | "KeyByIdBucket" >> beam.Map(lambda kv: (shard_for_id(kv[0], buckets), kv))
                | "GroupByIdBucket" >> beam.GroupByKey()
                | "DecideBucket" >> beam.ParDo(self._fn))


def _already_published(root: str, base: int, mode: pruning.PruningMode, prune_ids: np.ndarray,
                       params: dict) -> Optional[Manifest]:
    """Version base + 1 if it is exactly this job's change (a retried final step), else None."""
    from memory.store.mutations import read_forgotten
    from memory.store.versions import latest_version, read_version
    if latest_version(root) != base + 1:
        return None
    m = read_version(root, base + 1)
    if m.parent != base:
        return None
    if mode is pruning.PruningMode.HARD:
        before = read_forgotten(root, read_version(root, base))
        if m.change.get("kind") == "forget" and np.array_equal(np.union1d(before, prune_ids),
                                                                read_forgotten(root, m)):
            return m
        return None
    ref = m.entry_weights
    return m if ref is not None and dict(ref.params) == params else None


class _PublishFn(beam.DoFn):
    """Once: sums the buckets' histograms into the summary, then publishes the hard or soft prune on version n.

    It receives each bucket's histogram and selected entries only, never every entry's count. (A soft prune
    still gathers every entry with v >= 1 here: the version's single weights file lists them.)
    """

    def __init__(self, root: str, manifest: Manifest, mode: Optional[pruning.PruningMode], k: int,
                 threshold: Optional[int], counts_only: bool, buckets: int, verify: bool = True):
        self._root = root
        self._manifest = manifest
        self._verify = verify  # The publish reads the shards' ids again.
        self._mode = mode
        self._k = k
        self._threshold = threshold
        self._counts_only = counts_only
        self._buckets = buckets

    def process(self, unused, bucket_counts: Sequence[BucketCounts], entries_read: int):
        from memory.store import mutations
        from memory.store.versions import ConcurrentUpdateError
        n = self._manifest.version
        counted = sum(b.entries for b in bucket_counts)
        if counted != entries_read or len({b.bucket for b in bucket_counts}) != len(bucket_counts):
            raise RuntimeError(f"counted {counted} entries in {len(bucket_counts)} bucket results but read "
                               f"{entries_read} live entries of version {n}; the counts are incomplete")
        path = counts_dir(self._root, n)
        values = np.concatenate([b.values for b in bucket_counts]) if bucket_counts else np.zeros(0, np.int64)
        entries = np.concatenate([b.value_entries for b in bucket_counts]) if bucket_counts else np.zeros(0, np.int64)
        summary = summary_of_value_counts(values, entries)
        published, pruned, down = None, 0, 0
        if not self._counts_only:
            sel_ids = (np.concatenate([b.selected_ids.astype(str) for b in bucket_counts]) if bucket_counts
                       else np.zeros((0,), "<U1"))
            sel_v = np.concatenate([b.selected_v for b in bucket_counts]) if bucket_counts else np.zeros(0, np.int64)
            order = np.argsort(sel_ids, kind="stable")
            selected, sel_v = sel_ids[order], sel_v[order]
            if self._mode is pruning.PruningMode.HARD:
                params = None
            else:
                gamma = pruning.soft_weights(sel_v)
                params = {"rule": pruning.SOFT_RULE, "k": self._k, "counts": path, "computed_on_version": n}
            if selected.size:
                try:
                    if self._mode is pruning.PruningMode.HARD:
                        m = mutations.forget(self._root, ids=selected.tolist(), expected_version=n,
                                             verify=self._verify)
                    else:
                        m = mutations.publish_entry_weights(self._root, ids=selected.tolist(), weights=gamma,
                                                            params=params, expected_version=n, verify=self._verify)
                except ConcurrentUpdateError:
                    m = _already_published(self._root, n, self._mode, selected, params)
                    if m is None:
                        raise
                published = m.version
                pruned = int(selected.size) if self._mode is pruning.PruningMode.HARD else 0
                down = int((gamma < 1).sum()) if self._mode is pruning.PruningMode.SOFT else 0
        outcome = PruneOutcome(mode="counts-only" if self._counts_only else self._mode.value, base_version=n,
                               published_version=published, entries=int(counted), pruned=pruned,
                               down_weighted=down, counts_path=path)
        summary = dict(summary, k=self._k, threshold=self._threshold, count_buckets=self._buckets,
                       outcome=outcome._asdict())
        after = contextlib.nullcontext() if published is None else after_publish(
            root=self._root, version=published, step="writing the prune summary",
            fix=f"The prune is live (`vmem history` shows it); its counts are in {path}.")
        with after:
            pruning.write_summary(self._root, n, summary)
        _LOG.info("prune of version %d: %s", n, outcome)
        yield outcome


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmem prune", description=__doc__.split("\n")[0],
                                     epilog="Other flags are Beam pipeline options (--runner, --project, ...).")
    parser.add_argument("--memory", required=True, help="a built memory (local or gs://); its latest version is "
                                                        "pruned")
    parser.add_argument("--mode", choices=[m.value for m in pruning.PruningMode], default=None,
                        help="hard: forget entries with v >= --threshold; soft: weights 1.75/(1+v) for v >= 1")
    parser.add_argument("--threshold", type=int, default=None, metavar="T",
                        help=f"hard pruning: forget entries with v >= T (paper: {pruning.PAPER_THRESHOLD} for "
                             "1.28M entries at k=100; scale with memory size)")
    parser.add_argument("--k", type=int, default=pruning.PAPER_K,
                        help=f"neighbours per self-query after leaving the entry out (default {pruning.PAPER_K})")
    parser.add_argument("--counts-only", action="store_true",
                        help="write the counts and summary, publish nothing")
    parser.add_argument("--query-batch", type=int, default=256, help="self-queries per shard search call")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    parser.add_argument("--count-buckets", type=int, default=None, metavar="N",
                        help="id-hash buckets the counts are decided and written in (default: one per "
                             f"{ENTRIES_PER_COUNT_BUCKET:,} entries); no worker holds more than one bucket's counts")
    return parser


def check_prune_options(*, mode: Optional[pruning.PruningMode], threshold: Optional[int], k: int,
                        counts_only: bool, count_buckets: Optional[int]) -> None:
    """Refuses a bad pruning request before the memory is read; FlagError naming the flag and the fix."""
    if k < 1:
        raise FlagError(f"--k must be >= 1, got {k}.")
    if count_buckets is not None and count_buckets < 1:
        raise FlagError(f"--count-buckets must be >= 1, got {count_buckets}.")
    if mode is None:
        if not counts_only:
            raise FlagError("choose --mode hard --threshold T or --mode soft (or --counts-only to only count).")
        return
    if mode is pruning.PruningMode.HARD and (threshold is None or threshold < 1):
        raise FlagError(f"--mode hard needs --threshold T >= 1 (entries with v >= T are forgotten), got "
                         f"{threshold!r}; see the v histogram from --counts-only to pick T.")
    if mode is pruning.PruningMode.SOFT and threshold is not None:
        raise FlagError("--threshold applies to --mode hard only; soft pruning weights every entry with v >= 1.")


def check_args(args: argparse.Namespace) -> Optional[pruning.PruningMode]:
    """The pruning mode the flags ask for (None: --counts-only) after `check_prune_options`."""
    mode = None if args.mode is None else pruning.PruningMode.parse(args.mode)
    check_prune_options(mode=mode, threshold=args.threshold, k=args.k, counts_only=args.counts_only,
                        count_buckets=args.count_buckets)
    return mode


def prune_pipeline(p: beam.Pipeline, *, root: str, manifest: Manifest, mode: Optional[pruning.PruningMode],
                   k: int = pruning.PAPER_K, threshold: Optional[int] = None, counts_only: bool = False,
                   query_batch: int = 256, count_buckets: Optional[int] = None, verify: bool = True) -> None:
    """Adds the pruning graph to ``p``: self-query every live entry of ``manifest``, count, decide, publish.

    Args:
      root: The memory's root.
      manifest: The version pruned (n), read once at launch; version n + 1 is published (unless counts_only).
      mode: Hard or soft pruning (None with ``counts_only``).
      k: Neighbours per self-query after leaving the entry out.
      threshold: Hard pruning: entries with v >= threshold are forgotten.
      counts_only: Write the counts and the summary, publish nothing.
      query_batch: Self-queries per shard search call.
      count_buckets: Id-hash buckets of the counts (None: one per ENTRIES_PER_COUNT_BUCKET entries).
      verify: Check every shard file read or searched against the manifest (memory.store.integrity).
    """
    entries = p | "ReadMemoryEntries" >> ReadMemoryEntries(root, manifest, verify=verify)
    images_only = None
    if region_grid(manifest) is not None:
        # A region memory is pruned by image: its global entries query its global entries, and a hard prune's
        # forget of an image id removes its region entries too (memory.regions.layout.whole_image_ids).
        images_only = QueryFilter(entries=EntryKind.IMAGE)
        entries = entries | "GlobalEntries" >> beam.Filter(lambda e: not is_region_id(np.asarray([e.id]))[0])
    merged = entries | "SearchMemory" >> SearchMemory(root, manifest, k=k + 1, batch_size=query_batch, verify=verify,
                                                      default_filter=images_only)
    counts = (merged, entries) | "CountMislabelledHits" >> CountMislabelledHits(manifest.class_names, k=k)
    buckets = count_buckets or max(1, math.ceil(manifest.total / ENTRIES_PER_COUNT_BUCKET))
    decided = counts | "DecidePerBucket" >> DecidePerBucket(
        root, manifest.version, k=k, mode=mode, threshold=threshold, counts_only=counts_only, buckets=buckets)
    entries_read = entries | "CountEntries" >> beam.combiners.Count.Globally()
    _ = (p
         | "Once" >> beam.Create([None])
         | "SummariseAndPublish" >> beam.ParDo(
             _PublishFn(root, manifest, mode, k, threshold, counts_only, buckets, verify),
             bucket_counts=beam.pvalue.AsList(decided), entries_read=beam.pvalue.AsSingleton(entries_read)))


def prune_memory(*, memory: str, mode: Optional[pruning.PruningMode], threshold: Optional[int] = None,
                 k: int = pruning.PAPER_K, counts_only: bool = False, query_batch: int = 256,
                 count_buckets: Optional[int] = None, verify: bool = True, pipeline_options: BeamOptions = None,
                 test_pipeline: Optional[beam.Pipeline] = None) -> beam.runners.runner.PipelineResult:
    """Prunes the latest version of ``memory``: checks the arguments, builds the graph, runs it to completion.

    The summary (``pruning.summary_path(root, n)``) says what was published.

    Args:
      memory: A built memory (local or gs://); its latest version n is pruned.
      mode: Hard (forget entries with v >= ``threshold``) or soft (weights 1.75/(1+v) for v >= 1); None
        only with ``counts_only``.
      threshold: Hard pruning: entries with v >= threshold are forgotten.
      k: Neighbours per self-query after leaving the entry out.
      counts_only: Write the counts and the summary, publish nothing.
      query_batch: Self-queries per shard search call.
      count_buckets: Id-hash buckets of the counts (None: one per ENTRIES_PER_COUNT_BUCKET entries).
      verify: Check every shard file read or searched against the manifest (``--no-verify``: False).
      pipeline_options: Runner settings: Beam flags or a PipelineOptions (`pipelines.runner.BeamOptions`;
        default: one in-process worker).
      test_pipeline: Build the graph on this pipeline instead of one made from ``pipeline_options``.

    Raises:
      FlagError: a bad value or combination (`check_prune_options`).
      ConcurrentUpdateError: the memory moved on meanwhile; nothing was published.
      AfterPublishError: the prune's version is published, then writing its summary failed.
    """
    check_prune_options(mode=mode, threshold=threshold, k=k, counts_only=counts_only, count_buckets=count_buckets)
    options = resolve_pipeline_options(pipeline_options)
    root = memory.rstrip("/")
    manifest = read_manifest(root)  # Version n, read once: everything below is computed on it.
    p = test_pipeline or beam.Pipeline(options=options)
    prune_pipeline(p, root=root, manifest=manifest, mode=mode, k=k, threshold=threshold, counts_only=counts_only,
                   query_batch=query_batch, count_buckets=count_buckets, verify=verify)
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # pylint: disable=broad-except  # Runners wrap worker errors in their own types.
        after = after_publish_error(e)
        if after is None:
            raise
        raise after from e
    return result


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
        ) -> beam.runners.runner.PipelineResult:
    """Parses ``argv`` (prune flags + Beam flags) and runs `prune_memory` with them.

    Raises:
      FlagError: a bad flag value or combination.
      ConcurrentUpdateError: the memory moved on meanwhile; nothing was published.
    """
    args, beam_args = build_arg_parser().parse_known_args(argv)
    return prune_memory(memory=args.memory, mode=check_args(args), threshold=args.threshold, k=args.k,
                        counts_only=args.counts_only, query_batch=args.query_batch, count_buckets=args.count_buckets,
                        verify=args.verify, pipeline_options=beam_args, test_pipeline=test_pipeline)
