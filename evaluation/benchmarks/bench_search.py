"""Search speed at matched recall: exact numpy vs ScaNN vs the sharded memory vs faiss, side by side.

    python -m evaluation.benchmarks.bench_search [--n 1000000] [--dim 256] [--queries 1000] [--shards 4] \
        [--datasets structured,gaussian] [--real-embeddings FILE.npy|MEMORY[,...]] [--leaves-factors 0.5,1] \
        [--threads 1,2] [--target-recalls 0.95,0.98,0.99,0.999] [--memory-sharding hash,partition] \
        [--avq default|none|X] [--soar-lambda default|none|X]

For each dataset one table, all methods measured in this one process on the same query batch:

1. ``exact numpy``: blocked float32 matmul + top-k selection over unit vectors (the baseline; BLAS threads
   as configured, 2 on the reference machine).
2. ``scann``: one unsharded `memory.index.shard_index.ShardIndex` (TREE_AH) over all n vectors, built once per
   ``--leaves-factors`` entry (factor * sqrt(n) leaves).
3. ``memory``: the same data in ``--shards`` shards (ids hashed by `memory.store.sharding.shard_for_id`), built
   with `memory.build.build_memory_local` into a temp dir and queried through
   `memory.visual_memory.VisualMemory.search`, with the unsharded index's AH settings and training sample.
   As `vmem build` does for a hash memory of tree+AH shards, one index template (the first
   ``--leaves-factors`` tree of the unsharded index: factor * sqrt(n) leaves) is trained on an id-hashed
   sample and every shard is built from it, so the opened memory searches the four shards as one ScaNN index
   (`memory.index.template`); build time includes the template, writing the shard files and opening the
   memory (which concatenates the shards' per-row files once).
   ``memory routed``: the same, built with ``sharding="partition"``: a router (memory.search.routing, shipped
   defaults: up to 1,024 centroids trained on 50,000 id-hashed entries) gives each shard one region, and
   each query searches only the shards its routing rule picks (swept, ROUTES: the shards owning its 1 or 16
   nearest centroids, and distance-ratio routing at ratios 1.1, 1.2, 1.3; see `memory.search.routing.Router.route`).
   Build time includes training the router.
4. ``faiss ivfpq-fs``: IVF + 4-bit PQ fast-scan + exact float re-ranking (``IVF{nlist},PQ{m}x4fs,RFlat``),
   one index per ``--leaves-factors`` entry like ScaNN;
   ``faiss hnsw``: HNSW32 (only up to ``--hnsw-max-n`` points; its build on 1M x 256 takes too long here).

Each approximate method sweeps its search-time knob (leaves probed and re-rank depth, nprobe and k_factor,
efSearch) from cheap to expensive until it reaches the highest of ``--target-recalls``; every sweep row is
printed, then a frontier table per thread count: each method's fastest setting at each recall level. QPS is
the best of ``--repeats`` timings of the whole query batch. A final "targets" block per dataset gives the
project targets' verdicts at every level and thread count (hash and routed memories >= 1.1x faiss IVF-PQ + refine;
sharded memories within 20% of one index; ScaNN >= 50x exact numpy at the lowest level).

Thread policy (printed): ``--threads T1,T2`` (default 1 and all cores) search threads for every index method,
every setting timed at each: the unsharded
ScaNN index splits the query batch into T chunks searched at once (``ShardIndex.search`` ->
``search_batched``; ScaNN releases the GIL), the memory splits the batch into T query chunks, each routed,
searched and merged on its own thread (``VisualMemory.with_search_params(threads=T)``), faiss gets
``omp_set_num_threads(T)``. numpy's matmul uses
every BLAS thread, so the baseline gets at least as many cores as the indexes: ratios are conservative.

Sweeps tune the built indexes in place through ``ShardIndex.with_search_params`` and
``VisualMemory.with_search_params`` (same searchers, other leaves-to-search / re-rank depth) instead of
rebuilding per setting. The memory's own search code path is used unchanged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from evaluation.benchmarks import synthetic
from evaluation.benchmarks.search_data import DATASETS, Dataset, exact_topk, make_dataset
from evaluation.benchmarks.timing import best_seconds
from evaluation.benchmarks.search_report import (K, Method, ResultRow, format_frontier, format_table,
                                                 format_targets, mark_best)

# Searched fractions of the partitions (ScaNN leaves, faiss IVF lists), cheap to expensive. Going to 1.0
# lets the sweep reach high recall even on unclustered data, where partitions barely prune.
LEAF_FRACTIONS = (0.002, 0.003, 0.004, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.35, 0.6, 1.0)
# Candidates re-scored exactly (unsharded ScaNN reorder, faiss k_factor * k).
REORDERS = (50, 60, 75, 90, 100, 125, 150, 200, 300, 400, 1000, 2000)
# Per-shard re-rank depth of the sharded memory: each shard holds ~1/S of a query's true neighbours, so
# it needs a shallower re-rank than one big index; S shards x depth is the total exact work.
SHARD_REORDERS = (15, 20, 25, 30, 50, 75, 100, 150, 200, 300, 500)
# Routing rules swept on the routed memory: router probes, and distance-ratio routing (Router.route);
# probes 16 is the wide rule for data where routing is hard.
ROUTES = ({"route_probes": 1}, {"route_ratio": 1.1}, {"route_ratio": 1.2}, {"route_ratio": 1.3},
          {"route_probes": 16})
HNSW_EF = (16, 32, 64, 128, 256, 512, 1024)
TARGET_RECALLS = (0.95, 0.98, 0.99, 0.999)
_PLATEAU = 0.0005
_EXTRA_LEVEL_MAX_S = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Parsed options shared by every dataset."""
    n: int
    dim: int
    queries: int
    shards: int
    seed: int
    repeats: int
    target_recalls: tuple[float, ...]
    threads: tuple[int, ...]
    build_threads: int
    leaves_factors: tuple[float, ...]
    training_sample: int
    hnsw_max_n: int
    centres: int
    noise_ratio: float
    memory_shardings: tuple[str, ...] = ("hash", "partition")
    avq: float | None = None
    soar_lambda: float | None = None


@dataclasses.dataclass(frozen=True)
class _Trial:
    params: str
    threads: int
    qps: float
    recall: float


# A sweep setting: (params, search(threads) -> found row indices [nq, K], or the memory's ids of them).
Setting = tuple[str, Callable[[int], np.ndarray]]


def _sweep(levels: Sequence[Sequence[Setting]], data: Dataset, settings: Settings) -> list[_Trial]:
    """Measures knob settings grouped in levels of increasing cost (e.g. leaves probed), at every thread count.

    Within a level the settings are ordered by cost too (e.g. re-rank depth) and the level stops at the
    first one reaching the highest target recall or gaining less than _PLATEAU recall over the previous one
    (a deeper re-rank cannot find what the probed partitions do not hold). The sweep stops one level after
    the first level that reached the highest target (right there when that level already took over
    _EXTRA_LEVEL_MAX_S per batch): beyond that every setting only probes more, so it cannot be the fastest
    at any target. Recall does not depend on the thread count; each setting is timed at each of
    ``settings.threads``.
    """
    top = max(settings.target_recalls)
    trials: list[_Trial] = []
    reached_at = None
    for li, level in enumerate(levels):
        previous, secs, recall = -1.0, 0.0, 0.0
        for params, search in level:
            recall = None
            for threads in settings.threads:
                secs, found = best_seconds(lambda search=search, threads=threads: search(threads),
                                           repeats=settings.repeats)
                if recall is None:
                    recall = synthetic.recall_at_k(_as_rows(found), data.true_ids)
                trials.append(_Trial(params, threads, data.queries.shape[0] / secs, recall))
            if recall >= top or recall - previous < _PLATEAU:
                break
            previous = recall
        if reached_at is None and recall >= top:
            reached_at = li
            if secs > _EXTRA_LEVEL_MAX_S:
                break  # Near-exhaustive probing (unclustered data): the next level cannot be faster.
        elif reached_at is not None:
            break
    return trials


def _rows(data: Dataset, method: Method, trials: list[_Trial], *, build_s: float, exact_qps: float,
          build_params: str) -> list[ResultRow]:
    return [ResultRow(dataset=data.name, method=method, params=f"{build_params}; {t.params}", build_s=build_s,
                      threads=t.threads, qps=t.qps, recall=t.recall, speedup=t.qps / exact_qps)
            for t in trials]


def _leaf_counts(num_leaves: int) -> list[int]:
    counts = sorted({max(1, min(num_leaves, math.ceil(f * num_leaves))) for f in LEAF_FRACTIONS})
    return counts


def _num_leaves(n: int, factor: float) -> int:
    return max(1, min(n, round(factor * math.sqrt(n))))


# --------------------------------------------------------------------------------------------- methods


def _scann_config(n: int, s: Settings, factor: float):
    from memory.index.shard_index import IndexConfig, IndexKind  # pylint: disable=g-import-not-at-top
    leaves = _num_leaves(n, factor)
    # AH codebooks get faiss PQ's default 25 k-means iterations (ScaNN's own default is 10), so both
    # quantizers are trained alike.
    return IndexConfig(kind=IndexKind.TREE_AH, num_leaves=leaves, num_leaves_to_search=max(1, leaves // 50),
                       reorder=100, dims_per_block=2, anisotropic_quantization_threshold=0.2,
                       training_sample_size=min(n, s.training_sample), ah_training_iterations=25,
                       avq=s.avq, soar_lambda=s.soar_lambda)


def _config_str(cfg) -> str:
    return (f"leaves={cfg.num_leaves} train={cfg.training_sample_size} dpb={cfg.dims_per_block} "
            f"aq={cfg.anisotropic_quantization_threshold} it={cfg.ah_training_iterations} avq={cfg.avq} "
            f"soar={cfg.soar_lambda} dtype={cfg.embedding_dtype.value}")


def run_exact(data: Dataset, s: Settings) -> ResultRow:
    secs, found = best_seconds(lambda: exact_topk(data.base, data.queries, K), repeats=s.repeats)
    qps = data.queries.shape[0] / secs
    return ResultRow(dataset=data.name, method=Method.EXACT, params="block=65536 (matmul + partition)",
                     build_s=0.0, threads=os.cpu_count() or 1, qps=qps,
                     recall=synthetic.recall_at_k(found, data.true_ids), speedup=1.0,
                     best_at=tuple(s.target_recalls))


def run_scann(data: Dataset, s: Settings, exact_qps: float) -> list[ResultRow]:
    """One unsharded ScaNN index per partition count in ``--leaves-factors``, each swept."""
    from memory.index.shard_index import ShardIndex  # pylint: disable=g-import-not-at-top
    n = data.base.shape[0]
    rows = []
    for factor in s.leaves_factors:
        cfg = _scann_config(n, s, factor)
        start = time.perf_counter()
        index = ShardIndex.build(data.base, cfg)
        build_s = time.perf_counter() - start
        levels = []
        for leaves in _leaf_counts(cfg.num_leaves):
            level = []
            for reorder in REORDERS:
                tuned = index.with_search_params(leaves_to_search=leaves, reorder=reorder)
                level.append((f"search {leaves} leaves, reorder {reorder}",
                              lambda threads, tuned=tuned: _split_search(tuned, data.queries, threads)))
            levels.append(level)
        rows += _rows(data, Method.SCANN, _sweep(levels, data, s), build_s=build_s, exact_qps=exact_qps,
                      build_params=_config_str(cfg))
        del index
    return rows


def run_memory(data: Dataset, s: Settings, exact_qps: float, workdir: str, *, sharding: str = "hash"
               ) -> list[ResultRow]:
    """The sharded memory, built and opened through the public memory API, searched via VisualMemory.

    Each shard gets what ``vmem build`` gives it by default: round(sqrt(shard size)) leaves
    (`IndexConfig.resolve_leaves`), with the unsharded index's AH settings and training sample.
    ``sharding="partition"`` builds the routed memory with the shipped RouterConfig defaults and sweeps the
    routing rules (ROUTES) too.
    """
    from memory.build import build_memory_local  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    n = data.base.shape[0]
    shard_n = math.ceil(n / s.shards)
    # A routed shard gets the build's default round(sqrt(shard size)) leaves. A hash memory's index template
    # (memory.index.template), whose shards then search as one index over all n, gets the first unsharded
    # index's tree (--leaves-factors[0] * sqrt(n) leaves), so the two rows compare the sharding's cost on one
    # tree. (The template's default, round(sqrt(n)) = 1,000 leaves at 1M, reached 0.999 at a third of the
    # speed of 500 leaves here: measured in one run.) Each routed shard trains on the full sample: 4 shards
    # trained on 25k points each lost ~0.05 recall@10 at equal probing versus the unsharded index's 100k.
    leaves = _num_leaves(shard_n, 1.0) if sharding == "partition" else _num_leaves(n, s.leaves_factors[0])
    cfg = dataclasses.replace(_scann_config(n, s, s.leaves_factors[0]),
                              num_leaves=None if sharding == "partition" else leaves,
                              training_sample_size=min(shard_n, s.training_sample))
    # Zero-padded decimal ids: sort order (the shard row order) is numeric order, and ids parse back to rows.
    width = max(1, len(str(n - 1)))
    ids = [f"{i:0{width}d}" for i in range(n)]
    root = os.path.join(workdir, f"memory-{data.name}-{sharding}")
    start = time.perf_counter()
    build_memory_local(root, ids=ids, labels=["x"] * n, uris=[""] * n, embeddings=data.base,
                       num_shards=s.shards, index_config=cfg, sharding=sharding,
                       encoder_identity={"name": "synthetic", "content_hash": "none", "dim": data.base.shape[1],
                                         "preprocess": {}})
    memory = VisualMemory.open(root, search_threads=1)
    build_s = time.perf_counter() - start
    # One view per thread count, made once: tuned views below share its search pool.
    by_threads = {t: memory.with_search_params(threads=t) for t in s.threads}
    counts = [info.count for info in memory.manifest.shards]
    routed = memory.router is not None
    # Hash shards built from one template search as one index: re-rank depths of one index, not per shard.
    merged = len(memory.searched_as) == 1 and len(memory.searched_as[0]) > 1
    reorders, per = (REORDERS, "") if merged else (SHARD_REORDERS, "/shard")
    trials = []
    for route in ROUTES if routed else ({},):
        views = {t: m.with_search_params(**route) for t, m in by_threads.items()}
        view = views[s.threads[0]]
        route_desc = ""
        if route:
            shards_per_query = view.router.route(data.queries, view.route_probes, ratio=view.route_ratio).sum(axis=1)
            route_desc = f"route {_route_str(route)} ({shards_per_query.mean():.2f} shards/query), "
        levels = []
        for frac_leaves in _leaf_counts(leaves):
            fraction = frac_leaves / leaves
            level = []
            for reorder in reorders:
                # Same fraction of every shard's own leaves (shards differ slightly in size and leaf count).
                tuned = {t: v.with_search_params(leaves_fraction=fraction, reorder=reorder) for t, v in views.items()}
                level.append((f"{route_desc}search {frac_leaves}/{leaves} leaves{per}, "
                              f"reorder {reorder}{per}",
                              lambda threads, tuned=tuned: tuned[threads].search(data.queries, K).ids))
            levels.append(level)
        trials += _sweep(levels, data, s)
    build_params = f"{s.shards} shards of {min(counts)}-{max(counts)}, per shard {_config_str(cfg)}"
    if merged:
        build_params = (f"{s.shards} hash shards of {min(counts)}-{max(counts)} from one index template "
                        f"({leaves} leaves), searched as one index, {_config_str(cfg)}")
    if routed:
        build_params = f"{sharding}: {memory.router.centroids.shape[0]} router centroids, {build_params}"
    return _rows(data, Method.MEMORY_ROUTED if routed else Method.MEMORY, trials, build_s=build_s,
                 exact_qps=exact_qps, build_params=build_params)


def _route_str(route: dict) -> str:
    return f"probes {route['route_probes']}" if "route_probes" in route else f"ratio {route['route_ratio']:g}"


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    # One pool per thread count for the whole run, like the memory's search pool: a pool started inside each
    # timed call would charge thread start-up to the one-index rows only.
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="bench-search")


def _split_search(index, queries: np.ndarray, threads: int) -> np.ndarray:
    """One index searched by ``threads`` threads, each on a contiguous chunk of the query batch."""
    if threads == 1:
        return index.search(queries, K)[0]
    chunks = np.array_split(queries, threads)
    return np.concatenate([found for found, _ in _pool(threads).map(lambda c: index.search(c, K), chunks)])


def _as_rows(found: np.ndarray) -> np.ndarray:
    """Row indices of a search's answer: the memory answers with its string ids (zero-padded row numbers
    here), parsed back outside the timed call (2.4 ms per 1,000 queries: a cost of this comparison, not of
    the memory, whose own id lookup stays timed)."""
    if found.dtype.kind != "U":
        return found
    # Padding ("") only appears when k > memory size; map it to -1 so it never counts as found.
    return np.where(found == "", "-1", found).astype(np.int64)


def run_faiss_ivfpq(data: Dataset, s: Settings, exact_qps: float) -> list[ResultRow]:
    """One IVF-PQ fast-scan index per partition count in ``--leaves-factors``, each swept."""
    import faiss  # pylint: disable=g-import-not-at-top
    n, d = data.base.shape
    rows = []
    for factor in s.leaves_factors:
        nlist = _num_leaves(n, factor)
        # 4-bit PQ over 2-dim sub-vectors: the same code size as ScaNN AH with dims_per_block=2 (lut16).
        m = max(1, d // 2)
        factory = f"IVF{nlist},PQ{m}x4fs,RFlat"
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        train = data.base[:min(n, s.training_sample)]  # Base rows are iid (real data is shuffled at load).
        faiss.omp_set_num_threads(s.build_threads)
        start = time.perf_counter()
        index.train(train)
        index.add(data.base)
        build_s = time.perf_counter() - start
        ivf = faiss.extract_index_ivf(index)
        refine = faiss.downcast_index(index)
        levels = []
        for nprobe in _leaf_counts(nlist):
            level = []
            for reorder in REORDERS:
                k_factor = max(1, reorder // K)

                def search(threads, nprobe=nprobe, k_factor=k_factor, ivf=ivf, refine=refine):
                    faiss.omp_set_num_threads(threads)
                    ivf.nprobe = nprobe
                    refine.k_factor = k_factor
                    return refine.search(data.queries, K)[1]

                level.append((f"nprobe {nprobe}, k_factor {k_factor}", search))
            levels.append(level)
        rows += _rows(data, Method.FAISS_IVFPQ_FS, _sweep(levels, data, s), build_s=build_s, exact_qps=exact_qps,
                      build_params=f"{factory} train={train.shape[0]}")
        del index, ivf, refine
    return rows


def run_faiss_hnsw(data: Dataset, s: Settings, exact_qps: float) -> list[ResultRow]:
    import faiss  # pylint: disable=g-import-not-at-top
    n, d = data.base.shape
    index = faiss.index_factory(d, "HNSW32", faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(s.build_threads)
    start = time.perf_counter()
    index.add(data.base)
    build_s = time.perf_counter() - start
    levels = []
    for ef in HNSW_EF:
        def search(threads, ef=ef):
            faiss.omp_set_num_threads(threads)
            index.hnsw.efSearch = ef
            return index.search(data.queries, K)[1]
        levels.append([(f"efSearch {ef}", search)])
    trials = _sweep(levels, data, s)
    return _rows(data, Method.FAISS_HNSW, trials, build_s=build_s, exact_qps=exact_qps,
                 build_params=f"HNSW32 efConstruction={index.hnsw.efConstruction}")


def per_query_floor_us(dim: int, *, seed: int = 0, repeats: int = 3) -> float:
    """Microseconds per query of a tiny ScaNN tree+AH index (10,000 points, 10 leaves, 1 probed, re-rank 10).

    Its real work is a few microseconds, so this is ScaNN's fixed cost per query and searcher, which a
    memory searched in one process pays once per shard (the reason sharding in one process has a floor).
    """
    from memory.index.shard_index import IndexConfig, IndexKind, ShardIndex  # pylint: disable=g-import-not-at-top
    base = synthetic.gaussian_unit_vectors(10_000, dim, seed=seed)
    queries = synthetic.gaussian_unit_vectors(1_000, dim, seed=seed + 1)
    index = ShardIndex.build(base, IndexConfig(kind=IndexKind.TREE_AH, num_leaves=10, num_leaves_to_search=1,
                                               reorder=10))
    secs, _ = best_seconds(lambda: index.search(queries, K), repeats=repeats)
    return secs / queries.shape[0] * 1e6


# --------------------------------------------------------------------------------------------- main


def run_dataset(data: Dataset, s: Settings, workdir: str, *, log: Callable[[str], None]) -> list[ResultRow]:
    """Runs every method on one dataset; returns all rows (exact first)."""
    import faiss  # pylint: disable=g-import-not-at-top,unused-import
    exact = run_exact(data, s)
    log(f"  exact numpy: {exact.qps:,.1f} QPS")
    rows = [exact]
    memories = [(Method.MEMORY if sharding == "hash" else Method.MEMORY_ROUTED,
                 lambda sharding=sharding: run_memory(data, s, exact.qps, workdir, sharding=sharding))
                for sharding in s.memory_shardings]
    for method, fn in ((Method.SCANN, lambda: run_scann(data, s, exact.qps)),
                       *memories,
                       (Method.FAISS_IVFPQ_FS, lambda: run_faiss_ivfpq(data, s, exact.qps)),
                       (Method.FAISS_HNSW, lambda: run_faiss_hnsw(data, s, exact.qps))):
        if method is Method.FAISS_HNSW and data.base.shape[0] > s.hnsw_max_n:
            log(f"  {method.value}: SKIPPED: n={data.base.shape[0]:,} > --hnsw-max-n={s.hnsw_max_n:,} (building "
                "HNSW32 on 1M x 256 with 2 cores takes well over this benchmark's 15-minute budget; pass "
                "--hnsw-max-n to include it)")
            continue
        start = time.perf_counter()
        new = mark_best(fn(), s.target_recalls)  # Over all of the method's builds, per thread count.
        best = ", ".join(
            f"{t:g}: " + "/".join(f"{r.qps:,.0f}" for r in sorted((r for r in new if t in r.best_at),
                                                                   key=lambda r: r.threads)) or "-"
            for t in s.target_recalls)
        log(f"  {method.value}: {time.perf_counter() - start:.0f} s incl. build {new[0].build_s:.0f} s; fastest QPS "
            f"at {best} (threads {'/'.join(map(str, s.threads))})")
        rows.extend(new)
    return rows


def _threads_note(s: Settings) -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (KeyError, TypeError):
        blas = "BLAS"
    env = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if v in os.environ}
    blas = f"{blas}, " + (f"threads set by {env}" if env else f"default threads = all {os.cpu_count()} cores")
    threads = ", ".join(str(t) for t in s.threads)
    return (f"threads: numpy BLAS {blas}; search threads {threads} for every index, each setting timed at each "
            f"(ScaNN: query chunks; memory: query chunks of >= 64 per thread, else shards at once, numpy's BLAS held "
            f"at one thread meanwhile; faiss: omp_set_num_threads), faiss build {s.build_threads}; ScaNN training: "
            "its default pool")


def _parse_list(parser: argparse.ArgumentParser, flag: str, value: str, kind: type, ok: Callable[[float], bool]
                ) -> list:
    try:
        items = [kind(v) for v in value.split(",") if v]
    except ValueError:
        items = []
    if not items or not all(ok(v) for v in items):
        parser.error(f"{flag} must be a comma-separated list of valid {kind.__name__}s, got {value!r}")
    return items


def _parse_optional(parser: argparse.ArgumentParser, flag: str, value: str, default: float | None) -> float | None:
    if value == "default":
        return default
    if value == "none":
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        parser.error(f"{flag} must be a number > 0, 'none' or 'default', got {value!r}")
    return number


def _default_config():
    from memory.index.shard_index import IndexConfig  # pylint: disable=g-import-not-at-top
    return IndexConfig()


def main(argv: Sequence[str] | None = None) -> list[ResultRow]:
    """Runs the benchmark, prints one table per dataset plus the targets block, returns every row."""
    parser = argparse.ArgumentParser(prog="bench_search", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="base vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (one batch)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)} ('real' is added by --real-embeddings)")
    parser.add_argument("--real-embeddings", default=None,
                        help="real vectors: .npy [n, d] files and/or built memories (their stored embeddings), "
                             "comma-separated and concatenated; --queries rows are held out at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timings per setting; the best is reported")
    parser.add_argument("--target-recalls", default=",".join(f"{t:g}" for t in TARGET_RECALLS),
                        help="comma-separated recall@10 levels; each method's fastest setting at each is reported "
                             "and the sweeps run until the highest is reached")
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                        help="comma-separated search thread counts for every index method (ScaNN, the memory, "
                             "faiss); every setting is timed at each (default: 1 and all cores)")
    parser.add_argument("--avq", default="default",
                        help="ScaNN tree AVQ for the one index and the memories: a number, 'none', or 'default' "
                             "(memory.index.shard_index.IndexConfig's default)")
    parser.add_argument("--soar-lambda", default="default",
                        help="ScaNN SOAR spilling lambda: a number, 'none', or 'default' (IndexConfig's default)")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1,
                        help="faiss build threads (ScaNN training picks its own)")
    parser.add_argument("--leaves-factors", default="0.5,1",
                        help="comma-separated; partitions = factor * sqrt(n); ScaNN and faiss build one index per "
                             "factor and report the fastest at the target (default 0.5,1)")
    parser.add_argument("--training-sample", type=int, default=100_000,
                        help="points used to train partitions and quantizers (ScaNN and faiss)")
    parser.add_argument("--hnsw-max-n", type=int, default=200_000, help="skip faiss HNSW above this n")
    parser.add_argument("--memory-sharding", default="hash,partition",
                        help="comma-separated memories to build: hash (ids hashed to shards) and/or partition "
                             "(router-assigned shards, queries routed); default both")
    parser.add_argument("--centres", type=int, default=2000, help="structured data: mixture centres")
    parser.add_argument("--noise-ratio", type=float, default=0.9, help="structured data: noise / centre spread")
    args = parser.parse_args(argv)
    for flag, value, low in (("--n", args.n, K + 1), ("--dim", args.dim, 1), ("--queries", args.queries, 1),
                             ("--shards", args.shards, 1), ("--repeats", args.repeats, 1),
                             ("--build-threads", args.build_threads, 1),
                             ("--training-sample", args.training_sample, 16)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    targets = _parse_list(parser, "--target-recalls", args.target_recalls, float, lambda t: 0.0 < t <= 1.0)
    threads = _parse_list(parser, "--threads", args.threads, int, lambda t: t >= 1)
    avq, soar = (_parse_optional(parser, flag, value, default) for flag, value, default in
                 (("--avq", args.avq, _default_config().avq),
                  ("--soar-lambda", args.soar_lambda, _default_config().soar_lambda)))
    try:
        factors = tuple(float(f) for f in args.leaves_factors.split(",") if f)
    except ValueError:
        parser.error(f"--leaves-factors must be comma-separated numbers, got {args.leaves_factors!r}")
    if not factors or any(f <= 0 for f in factors):
        parser.error(f"--leaves-factors must be positive numbers, got {args.leaves_factors!r}")
    names = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; allowed: {list(DATASETS)} (real data: --real-embeddings PATH)")
    if args.real_embeddings:
        names.append("real")
    shardings = tuple(m for m in args.memory_sharding.split(",") if m)
    if any(m not in ("hash", "partition") for m in shardings):
        parser.error(f"--memory-sharding must list hash and/or partition, got {args.memory_sharding!r}")
    s = Settings(n=args.n, dim=args.dim, queries=args.queries, shards=args.shards, seed=args.seed,
                 repeats=args.repeats, target_recalls=tuple(sorted(set(targets))),
                 threads=tuple(dict.fromkeys(threads)), avq=avq, soar_lambda=soar,
                 build_threads=args.build_threads, leaves_factors=factors,
                 training_sample=args.training_sample,
                 hnsw_max_n=args.hnsw_max_n, centres=args.centres, noise_ratio=args.noise_ratio,
                 memory_shardings=shardings)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from evaluation.benchmarks.machine import describe as describe_machine  # pylint: disable=g-import-not-at-top
    print(describe_machine(), flush=True)
    from memory.index.scann_cpu import describe as describe_scann, import_scann  # pylint: disable=g-import-not-at-top
    import_scann()  # Imports TF (~10 s): before any timing, so not a build cost.
    print(describe_scann(), flush=True)
    all_rows: list[ResultRow] = []
    t_total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vmem-bench-search-") as workdir:
        for name in names:
            start = time.perf_counter()
            data = make_dataset(name, s, real_path=args.real_embeddings)
            log(f"{name}: {data.base.shape[0]:,} x {data.base.shape[1]} base, {data.queries.shape[0]} queries, "
                f"data + ground truth {time.perf_counter() - start:.0f} s")
            rows = run_dataset(data, s, workdir, log=log)
            all_rows.extend(rows)
            n, d = data.base.shape
            title = f"{name}: n={n:,} d={d} queries={data.queries.shape[0]} k={K}, best of {s.repeats}"
            print(format_table(rows, title=f"\n{title}; every sweep row ('best at': the target recalls where it "
                                           "is its method's fastest at its thread count)"), flush=True)
            print(format_frontier(rows, targets=s.target_recalls, threads=s.threads,
                                  title=f"\n{title}: fastest setting of each method at each recall@{K} level"))
            del data
    print()
    print(_threads_note(s))
    for name in names:
        print(format_targets(all_rows, targets=s.target_recalls, threads=s.threads, dataset=name,
                             floor_us=per_query_floor_us(s.dim) if name == "structured" else None,
                             shards=s.shards))
    print(f"total wall time {time.perf_counter() - t_total:.0f} s")
    return all_rows


if __name__ == "__main__":
    main()
