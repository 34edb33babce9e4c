"""Memory size vs build cost, disk bytes and search speed: 10k to 10M entries built by the real build job.

    python -m evaluation.benchmarks.bench_scale [--sizes 10000,100000,1000000,10000000] \
        [--work-dir /tmp/vmem-scale] [--plot FILE.png] [--sharding partition] [--shards S] [--threads 1]

For each size n (default all four), on 256-d unit vectors with neighbourhood structure
(`synthetic.iter_structured_blocks`: 2,000 Gaussian centres, noise 0.9x their spread, as bench_search):

1. **Data** (cached per size and seed under ``--work-dir``; a rerun skips it): clip-retrieval's on-disk
   layout, the input of ``vmem build --embeddings``: ``data-.../img_emb/img_emb_<i>.npy`` (float16
   [rows, 256], ``--rows-per-file`` rows each) and row-aligned ``metadata/metadata_<i>.parquet`` (``key``
   zero-padded row number, ``label`` = ``class-<centre mod --num-classes>``, ``image_path`` a gs:// uri),
   streamed to disk block by block (one 65,536-row block in memory at a time). Plus ``queries.npy``
   (1,000 held-out queries from the same mixture, not in the memory) and ``gt_ids.npy``: the exact top-10
   over the memory's vectors as the build stores them (float16 -> float32, L2-normalised), computed file by
   file with blocked float32 matmuls (~300 MB of scores at a time, whatever n is).
2. **Build** in a subprocess, timed, with the peak RSS of the build (``os.wait4`` ru_maxrss of the build
   process, and the sampled RSS sum over its process tree; the larger is reported and named):
   ``vmem build --embeddings SPEC --encoder-id synthetic-structured-256 --output DIR --overwrite``
   (`embeddings_spec` is the one place that spells SPEC).
3. **Disk**: bytes per entry over every file under the memory directory, split into stored vectors
   (ScaNN's dataset file), the rest of the ScaNN index (tree, AH codes), entries (ids, labels, uris),
   router and manifests (`file_kind`).
4. **Search** through `VisualMemory.open` (``--threads`` shards at once, default 1): RSS after opening, a
   sweep over ``with_search_params`` (route probes x re-rank depth x leaves fraction, cheap to expensive;
   brute-force shards only have the route probes), the fastest setting with recall@10 >= 0.95 against the
   exact ids (best of ``--repeats`` timings of the 1,000-query batch), then that setting's single-query
   latency over every query (p50 / p99).
5. **Open**: `VisualMemory.open` with its default check of every shard file against the manifest and with
   ``verify=False``, best of ``--open-repeats`` alternating opens each (`open_timing.time_open`), and the
   ratio.

Prints one markdown table (plus the disk breakdown), writes ``<work-dir>/scale_results.json`` and a plot
of latency vs memory size to ``<work-dir>/scale_latency.png`` (and ``--plot``). The 1M and 10M sizes need
a quiet machine: generating 10M takes ~5 GB of disk for the data (float16) plus the memory itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from evaluation.benchmarks import synthetic
from evaluation.benchmarks.open_timing import time_open
from evaluation.benchmarks.scale_data import DIM, ENCODER_ID, K, DataSpec, ensure_dataset
from evaluation.benchmarks.timing import best_seconds

DEFAULT_SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
BEAM_MARK = "vmem build (Beam)"
# Sweep grids, cheap to expensive. Leaves fractions are walked upwards per (probes, reorder) until the
# target recall is met: recall rises with leaves probed, so the first hit is that pair's fastest setting.
ROUTE_PROBES = (1, 2, 4, 8, 16)
REORDERS = (20, 50, 100, 200)
LEAVES_FRACTIONS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# --------------------------------------------------------------------------------------------- build


def embeddings_spec(data_dir: str) -> str:
    """The ``vmem build --embeddings`` spec of a generated directory: the ONE place that spells it.

    Grammar: pipelines/io/embedding_sources.py (``clip:DIR,label_column=COL``; ids default to ``key`` and uris
    to ``image_path``, which is what `write_clip_dataset` writes).
    """
    return f"clip:{data_dir},label_column=label"


def beam_build_command(data_dir: str, output: str, *, sharding: str, shards: int | None) -> list[str]:
    cmd = [os.path.join(os.path.dirname(sys.executable), "vmem"), "build", "--embeddings", embeddings_spec(data_dir),
           "--encoder-id", ENCODER_ID, "--output", output, "--sharding", sharding, "--overwrite"]
    return cmd + (["--shards", str(shards)] if shards is not None else [])


def _tree_rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS over ``root_pid`` and its descendants (from /proc; 0 once they are gone)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += _rss_bytes(pid)
        todo.extend(children.get(pid, ()))
    return total


def _rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """One timed build.

    Attributes:
      builder: BEAM_MARK (what built the memory).
      command: The command line run.
      seconds: Wall-clock seconds of the build process.
      maxrss_bytes: ru_maxrss of the build process from os.wait4 (its largest single process, waited-for
        descendants included).
      tree_rss_bytes: Peak of the RSS summed over the build's process tree, sampled every 0.2 s.
    """
    builder: str
    command: list
    seconds: float
    maxrss_bytes: int
    tree_rss_bytes: int

    @property
    def peak_rss_bytes(self) -> int:
        return max(self.maxrss_bytes, self.tree_rss_bytes)

    @property
    def peak_rss_source(self) -> str:
        return ("os.wait4 ru_maxrss (largest process)" if self.maxrss_bytes >= self.tree_rss_bytes
                else "sampled /proc RSS sum over the process tree")


def run_build(cmd: list[str], *, builder: str, log_path: str) -> BuildRecord:
    """Runs one build command, timing it and measuring its peak RSS; raises naming the log on failure."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1"))
    peak = [0]
    with open(log_path, "w") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"build failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
                           f"log {log_path}, last lines:\n{tail}")
    # Linux reports ru_maxrss in KiB.
    return BuildRecord(builder=builder, command=list(cmd), seconds=seconds, maxrss_bytes=usage.ru_maxrss * 1024,
                       tree_rss_bytes=peak[0])


# --------------------------------------------------------------------------------------------- disk




def file_kind(rel_path: str) -> str:
    """Which part of a memory a file (path relative to the memory root) belongs to.

    ``vectors``: the stored embeddings, i.e. ScaNN's dataset file (``scann/dataset.npy``,
    ``bfloat16_dataset.npy``, ``int8_dataset.npy``; the shard's only copy) or a format-1 ``embeddings.npy``;
    ``scann``: the rest of the serialised searcher (tree, AH codebooks and codes, config); ``entries``: ids,
    labels and uris (``entries.parquet``, or format-1 ``ids/labels/uris.npy``); ``router``: a partition
    build's centroids; ``manifest+other``: manifests, versions and anything else.
    """
    parts = rel_path.replace(os.sep, "/").split("/")
    name = parts[-1]
    if parts[0] == "router":
        return "router"
    if name == "embeddings.npy" or ("scann" in parts[:-1] and name.endswith("dataset.npy")
                                    and not name.startswith("hashed")):
        return "vectors"
    if "scann" in parts[:-1]:
        return "scann"
    if name in ("entries.parquet", "ids.npy", "labels.npy", "uris.npy"):
        return "entries"
    return "manifest+other"


BYTE_KINDS = ("vectors", "scann", "entries", "router", "manifest+other")


def bytes_by_kind(memory_dir: str) -> dict[str, int]:
    out = dict.fromkeys(BYTE_KINDS, 0)
    for d, _, files in os.walk(memory_dir):
        for f in files:
            path = os.path.join(d, f)
            out[file_kind(os.path.relpath(path, memory_dir))] += os.path.getsize(path)
    return out


# --------------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class Trial:
    """One search setting measured on the query batch."""
    settings: str
    route_probes: int | None
    reorder: int | None
    leaves_fraction: float | None
    recall: float
    batch_s: float


def _found_rows(ids: np.ndarray) -> np.ndarray:
    # Padding ("") only appears when k exceeds the memory size; -1 never matches a ground-truth row.
    return np.where(ids == "", "-1", ids).astype(np.int64)


def sweep(memory, queries: np.ndarray, gt_ids: np.ndarray, *, target: float, repeats: int) -> list[Trial]:
    """Every tried setting; those reaching ``target`` are re-timed best of ``repeats``."""
    routed = memory.router is not None
    tree = any(s.index_kind == "tree_ah" for s in memory.manifest.all_shards)
    trials = []
    for probes in ROUTE_PROBES if routed else (None,):
        for reorder in REORDERS if tree else (None,):
            for fraction in LEAVES_FRACTIONS if tree else (None,):
                view = memory.with_search_params(route_probes=probes, reorder=reorder, leaves_fraction=fraction)
                start = time.perf_counter()
                found = view.search(queries, K).ids
                secs = time.perf_counter() - start
                recall = synthetic.recall_at_k(_found_rows(found), gt_ids)
                if recall >= target and repeats > 1:
                    secs = min(secs, best_seconds(lambda view=view: view.search(queries, K), repeats=repeats - 1)[0])
                parts = ([f"route {probes}"] if routed else []) + (
                    [f"leaves {fraction:g}", f"reorder {reorder}/shard"] if tree else ["brute force"])
                trials.append(Trial(settings=", ".join(parts), route_probes=probes, reorder=reorder,
                                    leaves_fraction=fraction, recall=recall, batch_s=secs))
                if recall >= target:
                    break  # More leaves only cost time at this (probes, reorder).
    return trials


def select_fastest(trials: Sequence[Trial], target: float) -> Trial | None:
    passing = [t for t in trials if t.recall >= target]
    return min(passing, key=lambda t: t.batch_s) if passing else None


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds, dtype=np.float64), q) * 1e3)


# --------------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class SizeResult:
    """Everything measured at one memory size (JSON-serialisable through `to_dict`)."""
    n: int
    builder: str
    build_s: float
    build_peak_rss_bytes: int
    build_peak_rss_source: str
    bytes_total: int
    bytes_by_kind: dict
    num_shards: int
    shard_kinds: list
    load_rss_bytes: int
    load_rss_delta_bytes: int
    target_recall: float
    reached: bool
    settings: str
    recall: float
    qps: float
    batch_ms_per_query: float
    p50_ms: float
    p99_ms: float
    data_s: float = 0.0
    open_verified_s: float = 0.0
    open_unverified_s: float = 0.0
    trials: list = dataclasses.field(default_factory=list)

    @property
    def open_ratio(self) -> float:
        """Open time with the shard-file check over open time without it."""
        return self.open_verified_s / self.open_unverified_s if self.open_unverified_s else float("nan")

    @property
    def bytes_per_entry(self) -> float:
        return self.bytes_total / self.n

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bytes_per_entry"] = self.bytes_per_entry
        return d


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def format_table(results: Sequence[SizeResult]) -> str:
    """The headline markdown table, one row per size."""
    target = results[0].target_recall if results else 0.95
    lines = [f"| size | build s | build peak RSS GB | bytes/entry | QPS@R>={target:g} | recall@{K} | p50 ms | "
             "p99 ms | load RSS GB | shards | settings | built by |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        qps = f"{r.qps:,.0f}" if r.reached else f"MISS ({r.qps:,.0f})"
        lines.append(f"| {r.n:,} | {r.build_s:,.1f} | {_gb(r.build_peak_rss_bytes)} | {r.bytes_per_entry:,.0f} | "
                     f"{qps} | {r.recall:.3f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {_gb(r.load_rss_bytes)} | "
                     f"{r.num_shards} {'/'.join(r.shard_kinds)} | {r.settings} | {r.builder} |")
    return "\n".join(lines)


def format_bytes_table(results: Sequence[SizeResult]) -> str:
    """Bytes per entry on disk, split by file kind."""
    lines = ["| size | total | " + " | ".join(BYTE_KINDS) + " |", "|---:|" + "---:|" * (len(BYTE_KINDS) + 1)]
    for r in results:
        cells = " | ".join(f"{r.bytes_by_kind[k] / r.n:,.1f}" for k in BYTE_KINDS)
        lines.append(f"| {r.n:,} | {r.bytes_per_entry:,.1f} | {cells} |")
    return "\n".join(lines)


def format_open_table(results: Sequence[SizeResult]) -> str:
    """`VisualMemory.open` seconds with the shard-file check (the default) and without it, and their ratio."""
    lines = ["| size | open s, verified | open s, verify=False | ratio |", "|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.n:,} | {r.open_verified_s:.2f} | {r.open_unverified_s:.2f} | {r.open_ratio:.3f} |")
    return "\n".join(lines)


def write_plot(results: Sequence[SizeResult], paths: Sequence[str]) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    ns = [r.n for r in results]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(ns, [r.p50_ms for r in results], "o-", label="single query p50")
    ax.plot(ns, [r.p99_ms for r in results], "s--", label="single query p99")
    ax.plot(ns, [r.batch_ms_per_query for r in results], "^-", label="query batch, ms per query")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory entries")
    ax.set_ylabel("ms")
    target = results[0].target_recall
    ax.set_title(f"search latency at recall@{K} >= {target:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def measure_size(spec: DataSpec, args: argparse.Namespace, builder: str, *, log) -> SizeResult:
    data_dir, data_s = ensure_dataset(args.work_dir, spec, log=log)
    shards_tag = "" if args.shards is None else f"-{args.shards}shards"
    memory_dir = os.path.join(args.work_dir, f"memory-n{spec.n}-seed{spec.seed}-{args.sharding}{shards_tag}")
    record_path = memory_dir + ".build.json"
    record = None
    if args.reuse_build and os.path.exists(record_path) and os.path.exists(os.path.join(memory_dir, "manifest.json")):
        with open(record_path) as f:
            record = BuildRecord(**json.load(f))
        if record.builder != builder:
            record = None
        else:
            log(f"n={spec.n:,}: reusing the build at {memory_dir} ({record.seconds:.1f} s when built)")
    if record is None:
        cmd = beam_build_command(data_dir, memory_dir, sharding=args.sharding, shards=args.shards)
        log(f"n={spec.n:,}: building with {builder}: {' '.join(cmd)}")
        record = run_build(cmd, builder=builder, log_path=memory_dir + ".build.log")
        with open(record_path, "w") as f:
            json.dump(dataclasses.asdict(record), f, indent=1)
        log(f"n={spec.n:,}: built in {record.seconds:.1f} s, peak RSS {_gb(record.peak_rss_bytes)} GB "
            f"({record.peak_rss_source}; ru_maxrss {_gb(record.maxrss_bytes)}, tree {_gb(record.tree_rss_bytes)})")
    kinds = bytes_by_kind(memory_dir)

    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    queries = np.load(os.path.join(data_dir, "queries.npy"))
    gt_ids = np.load(os.path.join(data_dir, "gt_ids.npy"))
    gc.collect()
    rss_before = _rss_bytes()
    memory = VisualMemory.open(memory_dir, search_threads=args.threads)
    rss_after = _rss_bytes()
    if len(memory) != spec.n:
        raise RuntimeError(f"memory at {memory_dir} holds {len(memory)} entries, expected {spec.n}")
    memory.search(queries[:10], K)  # Warm-up (first-call allocations, thread pool).
    trials = sweep(memory, queries, gt_ids, target=args.target_recall, repeats=args.repeats)
    best = select_fastest(trials, args.target_recall)
    reached = best is not None
    if best is None:
        best = max(trials, key=lambda t: (t.recall, -t.batch_s))
        log(f"n={spec.n:,}: no setting reached recall@{K} >= {args.target_recall}; reporting the best recall")
    view = memory.with_search_params(route_probes=best.route_probes, reorder=best.reorder,
                                     leaves_fraction=best.leaves_fraction)
    single = []
    for i in range(queries.shape[0]):
        start = time.perf_counter()
        view.search(queries[i:i + 1], K)
        single.append(time.perf_counter() - start)
    shard_kinds = sorted({s.index_kind for s in memory.manifest.all_shards})
    result = SizeResult(
        n=spec.n, builder=builder, build_s=record.seconds, build_peak_rss_bytes=record.peak_rss_bytes,
        build_peak_rss_source=record.peak_rss_source, bytes_total=sum(kinds.values()), bytes_by_kind=kinds,
        num_shards=len(memory.manifest.shards), shard_kinds=shard_kinds, load_rss_bytes=rss_after,
        load_rss_delta_bytes=rss_after - rss_before, target_recall=args.target_recall, reached=reached,
        settings=best.settings, recall=best.recall, qps=queries.shape[0] / best.batch_s,
        batch_ms_per_query=best.batch_s / queries.shape[0] * 1e3, p50_ms=percentile_ms(single, 50),
        p99_ms=percentile_ms(single, 99), data_s=data_s, trials=[dataclasses.asdict(t) for t in trials])
    log(f"n={spec.n:,}: {len(trials)} settings tried; {result.settings}: {result.qps:,.0f} QPS, recall "
        f"{result.recall:.3f}, p50 {result.p50_ms:.2f} ms, RSS after open {_gb(rss_after)} GB "
        f"(+{_gb(rss_after - rss_before)})")
    del memory, view
    gc.collect()
    opened = time_open(memory_dir, repeats=args.open_repeats, search_threads=args.threads)
    log(f"n={spec.n:,}: {opened.line()}")
    return dataclasses.replace(result, open_verified_s=opened.verified_s, open_unverified_s=opened.unverified_s)


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, e.g. 10000,100000; got {text!r}") from None
    if not sizes or any(n <= K for n in sizes):
        raise ValueError(f"--sizes must list integers > {K}, got {text!r}")
    return sizes


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help="comma-separated memory sizes (default 10k,100k,1M,10M)")
    parser.add_argument("--work-dir", default="/tmp/vmem-scale", help="data cache, memories and results")
    parser.add_argument("--plot", default=None, help="also write the latency plot here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries")
    parser.add_argument("--centres", type=int, default=2000, help="mixture centres of the structured data")
    parser.add_argument("--noise-ratio", type=float, default=0.9)
    parser.add_argument("--num-classes", type=int, default=1000, help="label = class-<centre mod this>")
    parser.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per img_emb_<i>.npy")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="img_emb dtype")
    parser.add_argument("--sharding", choices=["hash", "partition"], default="partition",
                        help="vmem build --sharding (partition: the setting for large memories)")
    parser.add_argument("--shards", type=int, default=None, help="vmem build --shards (default: the build's)")
    parser.add_argument("--threads", type=int, default=1, help="VisualMemory search threads (shards at once)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of a setting reaching the target")
    parser.add_argument("--open-repeats", type=int, default=3,
                        help="opens with and without the shard-file check, each (best of them is reported)")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--reuse-build", action="store_true",
                        help="search an existing memory of the same size/settings instead of rebuilding")
    return parser


def main(argv: Sequence[str] | None = None) -> list[SizeResult]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        parser.error(str(e))
    if not 0.0 < args.target_recall <= 1.0:
        parser.error(f"--target-recall must be in (0, 1], got {args.target_recall}")
    for flag, value in (("--queries", args.queries), ("--rows-per-file", args.rows_per_file),
                        ("--threads", args.threads), ("--repeats", args.repeats), ("--centres", args.centres),
                        ("--open-repeats", args.open_repeats),
                        ("--num-classes", args.num_classes)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    builder = BEAM_MARK

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    os.makedirs(args.work_dir, exist_ok=True)
    log(f"builder: {builder}")
    results = []
    t_total = time.perf_counter()
    for n in sizes:
        spec = DataSpec(n=n, seed=args.seed, centres=args.centres, noise_ratio=args.noise_ratio,
                        num_classes=args.num_classes, rows_per_file=args.rows_per_file, dtype=args.dtype,
                        queries=args.queries)
        results.append(measure_size(spec, args, builder, log=log))
    threads = f"search threads {args.threads}, sharding {args.sharding}, shards {args.shards or 'build default'}"
    print(f"\nbench_scale: {DIM}-d structured unit vectors ({args.centres} centres, noise {args.noise_ratio:g}), "
          f"{args.queries} held-out queries, k={K}; {threads}; QPS = best of {args.repeats} batch timings; "
          f"p50/p99 = single-query calls; build peak RSS = max(os.wait4 ru_maxrss, sampled process-tree RSS sum), "
          f"sizes where the tree sum was larger: {[r.n for r in results if 'tree' in r.build_peak_rss_source]}\n")
    print(format_table(results))
    print("\nbytes per entry on disk, by file kind:\n")
    print(format_bytes_table(results))
    print(f"\nopen time with and without the shard-file check (best of {args.open_repeats} alternating opens "
          "each, one process):\n")
    print(format_open_table(results))
    out_json = os.path.join(args.work_dir, "scale_results.json")
    with open(out_json, "w") as f:
        json.dump({"args": vars(args), "builder": builder, "results": [r.to_dict() for r in results]}, f, indent=1)
    plots = [os.path.join(args.work_dir, "scale_latency.png")] + ([args.plot] if args.plot else [])
    write_plot(results, plots)
    print(f"\nresults: {out_json}; plot: {', '.join(plots)}; total wall time {time.perf_counter() - t_total:.0f} s")
    return results


if __name__ == "__main__":
    main()
