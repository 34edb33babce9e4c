"""Tables and target verdicts of `evaluation.benchmarks.bench_search` (pure formatting, no search)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

K = 10
# Targets (from the project issues) checked on the structured dataset.
TARGET_SPEEDUP = 50.0  # ScaNN vs exact numpy, at the lowest target recall.
TARGET_SHARDED_SLOWDOWN = 0.20  # A sharded memory vs one unsharded index.
TARGET_VS_FAISS = 1.10  # The memory's default (partition-routed) search vs faiss IVF-PQ + refine.


class Method(enum.Enum):
    """The search methods compared."""
    EXACT = "exact numpy"
    SCANN = "scann"
    MEMORY = "memory"
    MEMORY_ROUTED = "memory routed"
    FAISS_IVFPQ_FS = "faiss ivfpq-fs"
    FAISS_HNSW = "faiss hnsw"


@dataclasses.dataclass(frozen=True)
class ResultRow:
    """One measured configuration at one thread count.

    Attributes:
      dataset: Dataset name.
      method: Which method.
      params: Build and search parameters, human readable.
      build_s: Seconds to build the index (shared by every sweep row of one method; 0 for exact).
      threads: Search threads the row was timed with (exact numpy: the BLAS threads, all cores).
      qps: Queries per second (best of repeats over the whole batch).
      recall: recall@K against exact ground truth (the same at every thread count).
      speedup: qps / the exact numpy method's qps on the same dataset.
      best_at: The target recalls at which this row is its method's fastest setting at its thread count
        (empty for the others; exact numpy is best at every target).
    """
    dataset: str
    method: Method
    params: str
    build_s: float
    threads: int
    qps: float
    recall: float
    speedup: float
    best_at: tuple[float, ...] = ()

    @property
    def selected(self) -> bool:
        """Whether the row is a headline (fastest at some target)."""
        return bool(self.best_at)


def mark_best(rows: Sequence[ResultRow], targets: Sequence[float]) -> list[ResultRow]:
    """Sets ``best_at`` over rows of one method (any number of builds): per thread count and target, the
    fastest row reaching the target recall."""
    best: dict[int, list[float]] = {id(r): [] for r in rows}
    for threads in sorted({r.threads for r in rows}):
        mine = [r for r in rows if r.threads == threads]
        for target in targets:
            passing = [r for r in mine if r.recall >= target]
            if passing:
                best[id(max(passing, key=lambda r: r.qps))].append(target)
    return [dataclasses.replace(r, best_at=tuple(best[id(r)])) for r in rows]


def headline(rows: Sequence[ResultRow], method: Method, target: float, threads: int | None = None
             ) -> ResultRow | None:
    """The fastest row of a method reaching ``target`` (at ``threads``; exact numpy at any), or None."""
    return next((r for r in rows if r.method is method and target in r.best_at
                 and (threads is None or r.method is Method.EXACT or r.threads == threads)), None)


def format_table(rows: Sequence[ResultRow], *, title: str) -> str:
    """Every sweep row as a Markdown table; a row's 'best at' lists the targets it is the headline of."""
    lines = [title, "",
             f"| method | threads | params | build s | QPS | recall@{K} | vs exact numpy | best at |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        best = ",".join(f"{t:g}" for t in r.best_at)
        lines.append(f"| {r.method.value} | {r.threads} | {r.params} | {r.build_s:.1f} | {r.qps:,.0f} | "
                     f"{r.recall:.4f} | {r.speedup:.1f}x | {best} |")
    return "\n".join(lines)


def _search_params(row: ResultRow) -> str:
    # The sweep part of params ("<build>; <search>"): the build is printed once per method above.
    return row.params.rsplit("; ", 1)[-1]


def format_frontier(rows: Sequence[ResultRow], *, targets: Sequence[float], threads: Sequence[int],
                    title: str) -> str:
    """One table per thread count: each method's fastest QPS at every target recall (with its setting)."""
    out = [title]
    methods = [m for m in Method if any(r.method is m for r in rows)]
    for t in threads:
        out += ["", f"{t} search thread{'s' if t > 1 else ''}:", "",
                "| method | " + " | ".join(f"recall >= {x:g}" for x in targets) + " |",
                "|---|" + "---:|" * len(targets)]
        for m in methods:
            cells = []
            for x in targets:
                h = headline(rows, m, x, t)
                cells.append("not reached" if h is None else f"{h.qps:,.0f} ({_search_params(h)}; {h.recall:.4f})")
            out.append(f"| {m.value} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def format_targets(rows: Sequence[ResultRow], *, targets: Sequence[float], threads: Sequence[int],
                   dataset: str = "structured", floor_us: float | None = None, shards: int | None = None) -> str:
    """The PASS/MISS block of the project targets on one dataset's rows: the ScaNN line, then a table with one
    row per (threads, target recall)."""
    rows = [r for r in rows if r.dataset == dataset]
    lines = [f"targets ({dataset}, recall@{K}):"]
    low = min(targets)
    scann_low = headline(rows, Method.SCANN, low, min(threads))
    if scann_low is None:
        lines.append(f"  scann >= {TARGET_SPEEDUP:.0f}x exact numpy at {low:g}: ScaNN never reached it: MISS")
    else:
        lines.append(f"  scann >= {TARGET_SPEEDUP:.0f}x exact numpy at {low:g} ({min(threads)} thread): "
                     f"{scann_low.speedup:.1f}x ({scann_low.qps:,.0f} QPS): "
                     f"{_verdict(scann_low.speedup >= TARGET_SPEEDUP)}")
    methods = {r.method for r in rows}
    # Against faiss: the hash memory (the default sharding) and the partition-routed one, where measured.
    vs_faiss = [(m, name) for m, name in ((Method.MEMORY, "hash memory"), (Method.MEMORY_ROUTED, "memory routed"))
                if m in methods and Method.FAISS_IVFPQ_FS in methods]
    sharded = [(m, what) for m, what in ((Method.MEMORY, "hash-sharded"), (Method.MEMORY_ROUTED, "partition-routed"))
               if m in methods and Method.SCANN in methods]
    columns = [f"{name} / faiss IVF-PQ+refine (>= {TARGET_VS_FAISS:.1f}x)" for _, name in vs_faiss] + [
        f"{what} memory vs one index (<= {TARGET_SHARDED_SLOWDOWN:.0%} slower)" for _, what in sharded]
    if columns:
        lines += ["", "| recall@10 | threads | " + " | ".join(columns) + " |", "|---:|---:|" + "---|" * len(columns)]
    for t in threads:
        for x in targets:
            cells = []
            faiss = headline(rows, Method.FAISS_IVFPQ_FS, x, t)
            for method, _ in vs_faiss:
                mine = headline(rows, method, x, t)
                if mine is None:
                    cells.append("memory never reached it: MISS")
                elif faiss is None:
                    cells.append(f"{mine.qps:,.0f} QPS, faiss never reached it: PASS")
                else:
                    ratio = mine.qps / faiss.qps
                    cells.append(f"{ratio:.2f}x ({mine.qps:,.0f} vs {faiss.qps:,.0f}): "
                                 f"{_verdict(ratio >= TARGET_VS_FAISS)}")
            one = headline(rows, Method.SCANN, x, t)
            for method, _ in sharded:
                memory = headline(rows, method, x, t)
                if one is None or memory is None:
                    cells.append("a method never reached it: MISS")
                else:
                    slower = 1.0 - memory.qps / one.qps
                    cells.append(f"{slower:+.1%} ({memory.qps:,.0f} vs {one.qps:,.0f}): "
                                 f"{_verdict(slower <= TARGET_SHARDED_SLOWDOWN)}")
            if cells:
                lines.append(f"| {x:g} | {t} | " + " | ".join(cells) + " |")
    if floor_us is not None and scann_low is not None and shards:
        lines.append(f"  ScaNN fixed cost per query and searcher: {floor_us:.0f} us (10,000-point index); "
                     f"{shards} shards searched one after another pay >= {shards * floor_us:.0f} us/query "
                     f"against {1e6 / scann_low.qps:.0f} us/query for the whole unsharded search at {low:g} "
                     "(shards with their own indexes; hash shards built from one index template are searched as one "
                     "index and pay it once)")
    return "\n".join(lines)
