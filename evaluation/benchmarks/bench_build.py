"""Build cost side by side: ``vmem build --embeddings clip:...`` against autofaiss on the same files.

    python -m evaluation.synthetic_data --out DATA --classes 1000 --per-class 1000 --dim 256 --seed 0
    python -m evaluation.synthetic_data --out QUERIES --classes 1000 --per-class 2 --dim 256 --seed 0 --draw 1
    python -m evaluation.benchmarks.bench_build --data DATA --queries QUERIES --work-dir /tmp/bench-build \\
        [--runs 3] [--autofaiss-python /path/af-venv/bin/python] [--json OUT.json]

Each run builds once with each system, alternating (ours, autofaiss, ours, ...), each in a child process
measured from outside: wall time, CPU % (user + system time of the child and everything it waited for,
over wall time), peak RSS (the largest single process, as GNU time reports it, and the largest sum over
the child's process tree, sampled every 0.1 s) and bytes per entry (the memory directory; autofaiss's
index file). After the last run each built index is searched with one thread over the query set, its
search knob swept from cheap to expensive (the memory: leaves probed and re-rank depth; autofaiss's
index: efSearch or nprobe), and its best queries per second at recall@10 >= each target is reported,
against exact ground truth over the data's rows.

``vmem build`` runs with its defaults (hash sharding, one index template trained for the whole memory,
shards of at most 500,000 entries). autofaiss runs its ``build_index`` with its defaults under an index
memory budget (``--autofaiss-memory``, default 4G: it picks HNSW32 for 1M x 256); it needs numpy < 2 and
is never a dependency of this project, so it runs in a virtualenv of its own (see
`evaluation/benchmarks/autofaiss_peer.py`) and is skipped when ``--autofaiss-python`` cannot import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np

from evaluation.benchmarks import machine, synthetic
from evaluation.benchmarks.bench_search import LEAF_FRACTIONS, REORDERS
from evaluation.benchmarks.timing import best_seconds
from evaluation.benchmarks.scale_data import dir_bytes, exact_topk_files, memory_vectors

K = 10
TARGETS = (0.95, 0.99)
_PLATEAU = 0.0005
_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autofaiss_peer.py")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class RunFigures:
    """One measured build."""
    system: str
    wall_s: float
    cpu_pct: float
    peak_rss_gib: float  # Largest single process (GNU time's "Maximum resident set size").
    peak_tree_rss_gib: float  # Largest sampled sum over the process tree.
    bytes_per_entry: float


@dataclasses.dataclass(frozen=True)
class Trial:
    params: str
    recall: float
    qps: float


# ------------------------------------------------------------------------------------ process measurement

def _children_of() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class _TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self._pid, self._every_s = pid, every_s
        self._stop_event = threading.Event()
        self.peak = 0

    def run(self):
        while not self._stop_event.is_set():
            tree, todo, children = [], [self._pid], _children_of()
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += children.get(pid, [])
            self.peak = max(self.peak, sum(_rss(p) for p in tree))
            self._stop_event.wait(self._every_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def measure(cmd: Sequence[str], *, log_path: str) -> tuple[float, float, float, float]:
    """Runs ``cmd`` to completion: (wall s, CPU %, peak single-process RSS GiB, peak tree RSS GiB).

    Raises:
      RuntimeError: the command failed (its log named).
    """
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        # wait4: this child's own usage, with that of every descendant it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    tree_peak = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with status {proc.returncode}; see {log_path}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, 100.0 * cpu / wall, usage.ru_maxrss * 1024 / 2**30, tree_peak / 2**30


# ------------------------------------------------------------------------------------------ the two builds

def ours_command(data: str, output: str) -> list[str]:
    """``vmem build`` with its defaults over a clip-retrieval folder whose metadata has a ``label`` column."""
    return [sys.executable, "-m", "vmem", "build", "--embeddings", f"clip:{data},label_column=label",
            "--encoder-id", "synthetic-bench", "--output", output, "--overwrite"]


def autofaiss_command(python: str, data: str, index_path: str, budget: str) -> list[str]:
    """autofaiss's ``build_index`` on the folder's ``img_emb/`` through `autofaiss_peer` in its own Python."""
    return [python, _PEER, "build", os.path.join(data, "img_emb"), index_path, index_path + ".json", budget]


def autofaiss_available(python: str | None) -> bool:
    """Whether ``python`` (a path, or None) imports autofaiss and faiss."""
    if not python:
        return False
    try:
        return subprocess.run([python, "-c", "import autofaiss, faiss"], capture_output=True,
                              timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ------------------------------------------------------------------------------------------------ searches

def load_queries(queries_dir: str) -> np.ndarray:
    """A clip-retrieval folder's rows, in file order, as the memory stores them (float32 unit rows)."""
    return memory_vectors(np.concatenate([np.load(p) for p in data_files(queries_dir)]))


def data_files(data_dir: str) -> list[str]:
    """A clip-retrieval folder's ``img_emb_<i>.npy`` files in part order (row order of the whole set)."""
    return sorted(glob.glob(os.path.join(data_dir, "img_emb", "img_emb_*.npy")),
                  key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))


def _row_of_ids(ids: np.ndarray) -> np.ndarray:
    """The synthetic data's entry ids (``d<draw>-<row>``) as row numbers; padding ("") as -1."""
    rows = np.char.rpartition(ids.astype(str), "-")[..., 2]
    return np.where(rows == "", "-1", rows).astype(np.int64)


def sweep_memory(root: str, queries: np.ndarray, true_ids: np.ndarray, *, repeats: int) -> list[Trial]:
    """The memory's frontier: leaves probed (fractions, cheap to expensive) x re-rank depth, one thread."""
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    memory = VisualMemory.open(root, search_threads=1)
    top, trials, reached = max(TARGETS), [], None
    for level, fraction in enumerate(LEAF_FRACTIONS):
        previous, recall = -1.0, 0.0
        for reorder in REORDERS:
            view = memory.with_search_params(leaves_fraction=fraction, reorder=reorder)
            secs, result = best_seconds(lambda view=view: view.search(queries, K), repeats=repeats)
            recall = synthetic.recall_at_k(_row_of_ids(result.ids), true_ids)
            trials.append(Trial(f"leaves {fraction:g}, reorder {reorder}", recall, queries.shape[0] / secs))
            if recall >= top or recall - previous < _PLATEAU:
                break
            previous = recall
        if reached is None and recall >= top:
            reached = level
        elif reached is not None:
            break  # One level past the first to reach the top target: only slower beyond.
    return trials


def sweep_autofaiss(python: str, index_path: str, queries: np.ndarray, true_ids: np.ndarray, *, repeats: int,
                    work: str) -> tuple[str, list[Trial]]:
    """autofaiss's index swept by `autofaiss_peer` in its own Python: (index type, trials)."""
    q_path, t_path = os.path.join(work, "queries.npy"), os.path.join(work, "true_ids.npy")
    np.save(q_path, queries)
    np.save(t_path, true_ids)
    out = subprocess.run([python, _PEER, "search", index_path, q_path, t_path, "1", str(repeats), str(max(TARGETS))],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["index"], [Trial(t["params"], t["recall"], t["qps"]) for t in result["trials"]]


def best_qps(trials: Sequence[Trial], target: float) -> Trial | None:
    """The fastest trial with recall@10 >= ``target``, or None when none reaches it."""
    ok = [t for t in trials if t.recall >= target]
    return max(ok, key=lambda t: t.qps) if ok else None


# ------------------------------------------------------------------------------------------------- report

def _summary(runs: Sequence[RunFigures]) -> str:
    def span(values, fmt):
        return f"{fmt.format(min(values))}-{fmt.format(max(values))} (median {fmt.format(statistics.median(values))})"
    return (f"wall {span([r.wall_s for r in runs], '{:.1f}')} s, CPU {span([r.cpu_pct for r in runs], '{:.0f}')} %, "
            f"peak RSS {span([r.peak_rss_gib for r in runs], '{:.2f}')} GiB (process tree "
            f"{span([r.peak_tree_rss_gib for r in runs], '{:.2f}')}), {runs[-1].bytes_per_entry:,.0f} bytes/entry")


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark (flags in the module docstring); returns the figures it printed."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.benchmarks.bench_build",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="clip-retrieval folder (evaluation.synthetic_data --out)")
    parser.add_argument("--queries", required=True, help="clip-retrieval folder of held-out queries (--draw 1)")
    parser.add_argument("--work-dir", required=True, help="where the memories, indexes and logs go")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timings per search setting; the best counts")
    parser.add_argument("--autofaiss-python", default=os.environ.get("AUTOFAISS_PYTHON"),
                        help="a Python that imports autofaiss and faiss (its own virtualenv; see "
                             "evaluation/benchmarks/autofaiss_peer.py); without it only vmem build runs")
    parser.add_argument("--autofaiss-memory", default="4G", help="autofaiss max_index_memory_usage")
    parser.add_argument("--no-search", action="store_true", help="builds only, no recall/QPS sweep")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    os.makedirs(args.work_dir, exist_ok=True)
    peer = args.autofaiss_python if autofaiss_available(args.autofaiss_python) else None
    print(machine.describe(), flush=True)
    if peer is None:
        print(f"autofaiss: not importable with --autofaiss-python {args.autofaiss_python!r}; vmem build only",
              flush=True)
    entries = sum(np.load(p, mmap_mode="r").shape[0] for p in data_files(args.data))
    memory_dir = os.path.join(args.work_dir, "memory")
    index_path = os.path.join(args.work_dir, "autofaiss", "knn.index")
    runs: dict[str, list[RunFigures]] = {"vmem build": [], "autofaiss": []}
    for i in range(args.runs):
        systems = [("vmem build", ours_command(args.data, memory_dir))]
        if peer is not None:
            shutil.rmtree(os.path.dirname(index_path), ignore_errors=True)
            os.makedirs(os.path.dirname(index_path))
            systems.append(("autofaiss", autofaiss_command(peer, args.data, index_path, args.autofaiss_memory)))
        for system, cmd in systems:
            log = os.path.join(args.work_dir, f"{system.replace(' ', '-')}-{i + 1}.log")
            wall, cpu, rss, tree = measure(cmd, log_path=log)
            size = dir_bytes(memory_dir) if system == "vmem build" else os.path.getsize(index_path)
            fig = RunFigures(system, wall, cpu, rss, tree, size / entries)
            runs[system].append(fig)
            print(f"run {i + 1} {system}: {wall:.1f} s, {cpu:.0f} % CPU, peak RSS {rss:.2f} GiB (tree {tree:.2f}), "
                  f"{fig.bytes_per_entry:,.0f} bytes/entry", flush=True)
    report: dict = {"machine": machine.describe(), "entries": entries, "runs": {
        k: [dataclasses.asdict(r) for r in v] for k, v in runs.items() if v}}
    for system, figs in runs.items():
        if figs:
            print(f"{system}: {_summary(figs)}", flush=True)
    if peer is not None:
        ratio = statistics.median(r.wall_s for r in runs["vmem build"]) / statistics.median(
            r.wall_s for r in runs["autofaiss"])
        lighter = max(r.peak_rss_gib for r in runs["vmem build"]) <= min(r.peak_rss_gib for r in runs["autofaiss"])
        report["wall_ratio"] = ratio
        print(f"vmem build / autofaiss median wall time: {ratio:.2f}x (target <= 0.9); peak RSS "
              f"{'within' if lighter else 'above'} autofaiss's (every run's)", flush=True)
    if not args.no_search:
        queries = load_queries(args.queries)
        true_ids, _ = exact_topk_files(data_files(args.data), queries, K)
        frontiers = {"vmem build": sweep_memory(memory_dir, queries, true_ids, repeats=args.repeats)}
        if peer is not None:
            with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
                kind, frontiers["autofaiss"] = sweep_autofaiss(peer, index_path, queries, true_ids,
                                                               repeats=args.repeats, work=work)
            print(f"autofaiss chose {kind}", flush=True)
        report["frontier"] = {}
        for system, trials in frontiers.items():
            for t in trials:
                print(f"  {system}: {t.params}: recall@10 {t.recall:.4f}, {t.qps:,.0f} QPS", flush=True)
            best = {str(target): best_qps(trials, target) for target in TARGETS}
            report["frontier"][system] = {k: (None if v is None else dataclasses.asdict(v)) for k, v in best.items()}
            print(f"{system} best QPS (1 thread, {queries.shape[0]} queries): " + "; ".join(
                f"recall@10 >= {k}: " + ("not reached" if v is None else f"{v.qps:,.0f} ({v.params}, {v.recall:.4f})")
                for k, v in best.items()), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
