"""Experiments at a million entries on synthetic labelled embeddings: memory-size, label-noise, unlearning.

Data: `evaluation.synthetic_data` (``classes`` classes; a memory of n entries is the generator's first n
rows, n / classes per class; ``queries`` held-out queries of the same classes, draw 1), generated into one
workspace (`evaluation.experiments.synthetic_jobs.workspace`: the largest memory's rows are its memory pool);
every memory is built and searched by the workspace's jobs (brute-force shards, exact search at every size).
Three parts, each printing progress and its wall time:

* **memory-size**: sizes on a geometric grid from ``min_entries`` to ``max_entries``; the error of each rule
  at k = 10 (fixed in advance) is fitted as ``log10(error) = a + slope * log10(entries)`` over all sizes and
  over each decade alone (how the slope bends), with bootstrap intervals over the queries
  (`evaluation.stats.fit_power_law`, as the memory-size experiment).
* **label-noise** at the largest size: the label-noise experiment's `label_noise.sweep` over its neighbour
  lists.
* **unlearning** of a seeded 10 % of ids at the largest size: `memory.store.mutations.forget` on the built
  memory, then its neighbour lists against those of a memory rebuilt from the kept rows alone.

    vmem experiment synthetic-scale --work-dir /tmp/vmem-syn-scale --output docs/paper/synthetic/scale \\
        --classes 100 --min-entries 100 --max-entries 1000000 --queries 1000 --seed 0
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from evaluation import synthetic_data
from evaluation.experiments import synthetic_jobs
from evaluation.experiments.common import compare_neighbor_lists, max_table_difference, pct, plot_lines, \
    read_neighbors, revote, rule_summary, table_from_report, write_report
from evaluation.experiments.label_noise import LEVELS, NAME as LABEL_NOISE, sweep
from evaluation.experiments.memory_size import PAPER_SLOPE
from evaluation.stats import fit_power_law, geometric_sizes

NAME = "synthetic-scale"
PARTS = ("memory-size", "label-noise", "unlearning")
FORGET_FRACTION = 0.10


@dataclasses.dataclass(frozen=True)
class ScaleSetup:
    """What the experiments generate and run (every field is a flag of the command line).

    Attributes:
      classes: Classes of the data; every size is a multiple of it (entries per class = size / classes).
      min_entries, max_entries: Smallest and largest memory.
      per_decade: Sizes per decade of the geometric grid.
      queries: Held-out queries (spread evenly over the classes).
      dim: Embedding dimension.
      seed: Seeds the data, the noise and the forgotten ids.
      k_max: Neighbours retrieved (capped at the memory's size).
      bootstrap: Bootstrap replicates of every slope interval.
      parts: Which of `PARTS` to run (label-noise and unlearning use the largest memory).
    """
    classes: int = 100
    min_entries: int = 100
    max_entries: int = 1_000_000
    per_decade: int = 2
    queries: int = 1000
    dim: int = 256
    seed: int = 0
    k_max: int = 100
    bootstrap: int = 1000
    parts: tuple[str, ...] = PARTS

    def __post_init__(self):
        for name in ("classes", "per_decade", "queries", "dim", "k_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.classes <= self.min_entries <= self.max_entries:
            raise ValueError(f"need --classes <= --min-entries <= --max-entries, got {self.classes}, "
                             f"{self.min_entries}, {self.max_entries}")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValueError(f"--parts: unknown {unknown or 'empty list'}; allowed: {', '.join(PARTS)}")

    def sizes(self) -> list[int]:
        """The memory sizes: the geometric grid rounded to whole entries per class."""
        per_class = [max(1, round(n / self.classes)) for n in
                     geometric_sizes(self.min_entries, self.max_entries, per_decade=self.per_decade)]
        return sorted({p * self.classes for p in per_class})

    def data(self, entries: int, *, draw: int = 0) -> synthetic_data.LabelledSpec:
        return synthetic_data.LabelledSpec(classes=self.classes, per_class=entries // self.classes, dim=self.dim,
                                           seed=self.seed, draw=draw)

    def command(self) -> str:
        flags = [f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name != "parts"]
        return " ".join([f"vmem experiment {NAME}", *flags, "--parts", ",".join(self.parts)])


class _Timer:
    def __init__(self, log: Callable[[str], None]):
        self.log, self.seconds = log, {}

    def add(self, key: str, seconds: float) -> float:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        return seconds


def _build(ws, name: str, spec: str, entries: int, timer: _Timer) -> str:
    shards = synthetic_jobs.shards_for(entries)
    start = time.perf_counter()
    root = ws.build(name, spec, shards=shards)
    seconds = timer.add("build", time.perf_counter() - start)
    timer.log(f"n={entries:,}: built in {seconds:.1f} s ({shards} brute-force shards)")
    return root


def _memory(ws, setup: ScaleSetup, entries: int, timer: _Timer) -> str:
    """Builds the memory of the first ``entries`` rows (generated unless they are the workspace's memory pool);
    returns its root."""
    if entries == setup.data(setup.max_entries).rows:  # The workspace's memory pool.
        spec = ws.split_spec("train")
    else:
        data_dir = ws.path("tables", f"memory-{entries}")
        timer.add("generate", synthetic_jobs.generate(data_dir, setup.data(entries)))
        spec = synthetic_jobs.clip_spec(data_dir)
    return _build(ws, f"size-{entries}", spec, entries, timer)


def _evaluate(ws, setup: ScaleSetup, memory: str, name: str, entries: int, timer: _Timer):
    start = time.perf_counter()
    report, eval_dir = ws.evaluate(memory, ws.split_spec("test"), name, k_max=min(setup.k_max, entries))
    seconds = timer.add("evaluate", time.perf_counter() - start)
    timer.log(f"{name}: evaluated in {seconds:.1f} s")
    return report, eval_dir


def memory_size(ws, setup: ScaleSetup, timer: _Timer) -> tuple[dict, str]:
    """The memory-size part; returns (results, the largest memory's evaluation dir)."""
    k = min(10, setup.k_max)
    points, eval_dir = [], None
    for entries in setup.sizes():
        start = time.perf_counter()
        memory = _memory(ws, setup, entries, timer)
        report, eval_dir = _evaluate(ws, setup, memory, f"size-{entries}", entries, timer)
        voted = revote(read_neighbors(eval_dir), k_max=setup.k_max)
        if voted.table != table_from_report(report, k_max=setup.k_max):
            raise RuntimeError(f"re-vote of {eval_dir} disagrees with its report")
        points.append((entries, voted))
        timer.log(f"n={entries:,}: rank error@{k} {100 * (1 - voted.table['rank'][k]):.2f} %, "
                  f"{time.perf_counter() - start:.1f} s")
        if entries != setup.max_entries:
            shutil.rmtree(memory)  # Only the largest memory is used again; the rest would fill the disk.
    entries = [e for e, _ in points]
    rules = list(points[0][1].table)
    errors, fits, decades = {}, {}, {}
    for rule in rules:
        correct = np.stack([v.correct(rule, k) for _, v in points])
        errors[rule] = (1.0 - correct.mean(axis=1)).tolist()
        fits[rule] = _fit(entries, errors[rule], correct, setup)
        decades[rule] = {}
        for low in range(math.floor(math.log10(entries[0])), math.ceil(math.log10(entries[-1]))):
            rows = [i for i, e in enumerate(entries) if 10 ** low <= e <= 10 ** (low + 1)]
            if len(rows) >= 3:
                decades[rule][f"{10 ** low}-{10 ** (low + 1)}"] = _fit(
                    [entries[i] for i in rows], [errors[rule][i] for i in rows], correct[rows], setup)
    best = {rule: [rule_summary(v.table, k=k)[rule]["best"] for _, v in points] for rule in rules}
    return ({"entries": entries, "k": k, f"error_k{k}": errors, "error_best_k": {r: [1 - a for a in best[r]]
                                                                                 for r in rules},
             "power_law": fits, "power_law_by_decade": decades, "paper_slope": PAPER_SLOPE,
             "queries": int(points[0][1].true.size)}, eval_dir)


def _fit(entries, errors, correct, setup: ScaleSetup) -> dict:
    try:
        return fit_power_law(entries, errors, per_query_correct=correct, bootstrap=setup.bootstrap,
                             seed=setup.seed)._asdict()
    except ValueError as e:  # e.g. fewer than 3 sizes with a non-zero error
        return {"error": str(e)}


def label_noise_at(setup: ScaleSetup, eval_dir: str, timer: _Timer) -> dict:
    """The label-noise part over the largest memory's neighbour lists."""
    spec = setup.data(setup.max_entries)
    start = time.perf_counter()
    labels = np.concatenate([b.labels for b in synthetic_data.iter_blocks(spec)])
    result = sweep(read_neighbors(eval_dir), ids=synthetic_data.row_keys(spec, 0, spec.rows).tolist(),
                   labels=spec.class_name(labels), classes=spec.class_name(np.arange(setup.classes)).tolist(),
                   levels=LEVELS, k_max=min(setup.k_max, spec.rows),
                   rng=lambda percent: np.random.default_rng([setup.seed, zlib.crc32(LABEL_NOISE.encode()), percent]))
    seconds = timer.add("label_noise", time.perf_counter() - start)
    timer.log(f"label-noise at n={spec.rows:,}: {len(LEVELS)} levels in {seconds:.1f} s")
    k = min(10, setup.k_max)
    summaries = {p: rule_summary(t, k=k) for p, t in result.tables.items()}
    return {"entries": spec.rows, "levels_percent": list(LEVELS),
            "labels_changed_fraction": {str(p): result.changed[p] for p in LEVELS},
            "best": {r: {str(p): {"accuracy": summaries[p][r]["best"], "k": summaries[p][r]["best_k"]}
                         for p in LEVELS} for r in summaries[0]},
            "k": k, f"accuracy_k{k}": {r: {str(p): summaries[p][r][f"k{k}"] for p in LEVELS} for r in summaries[0]}}


def unlearning_at(ws, setup: ScaleSetup, eval_dir: str, timer: _Timer) -> dict:
    """Forgets a seeded 10 % of the largest memory's ids; compares with a memory rebuilt without them."""
    from memory.store.mutations import forget  # pylint: disable=g-import-not-at-top
    spec = setup.data(setup.max_entries)
    memory = ws.path("memories", f"size-{spec.rows}")
    rng = np.random.default_rng([setup.seed, zlib.crc32(b"unlearning")])
    chosen = np.sort(rng.choice(spec.rows, size=int(round(FORGET_FRACTION * spec.rows)), replace=False))
    ids = synthetic_data.row_keys(spec, 0, spec.rows)
    start = time.perf_counter()
    manifest = forget(memory, ids=ids[chosen].tolist())
    forget_s = timer.add("forget", time.perf_counter() - start)
    timer.log(f"forgot {manifest.change['forgotten']:,} ids in {forget_s:.2f} s")
    _, forgot_dir = _evaluate(ws, setup, memory, "after-forget", spec.rows, timer)
    keep = np.ones(spec.rows, dtype=bool)
    keep[chosen] = False
    kept_dir = ws.path("tables", "kept")
    start = time.perf_counter()
    _write_kept(spec, keep, kept_dir)
    timer.add("generate", time.perf_counter() - start)
    timer.log(f"rebuilding from {int(keep.sum()):,} kept rows")
    rebuilt = _build(ws, "rebuilt", synthetic_jobs.clip_spec(kept_dir), int(keep.sum()), timer)
    _, rebuilt_dir = _evaluate(ws, setup, rebuilt, "rebuilt", spec.rows, timer)
    forgot, again = read_neighbors(forgot_dir), read_neighbors(rebuilt_dir)
    gone = set(ids[chosen].tolist())
    lists = compare_neighbor_lists(forgot, again)
    k_max = min(setup.k_max, spec.rows)
    v_forgot, v_again = revote(forgot, k_max=k_max), revote(again, k_max=k_max)
    return {"entries": spec.rows, "forgotten": int(manifest.change["forgotten"]), "forget_seconds": forget_s,
            "live_entries": int(manifest.total),
            "forgotten_ids_among_neighbours": sum(i in gone for r in forgot for i in r.neighbor_ids),
            "neighbour_lists_differing_from_rebuilt": lists.other_differences, "near_tie_swaps": lists.near_tie_swaps,
            "largest_distance_difference": lists.max_distance_gap,
            "max_accuracy_difference": max_table_difference(v_forgot.table, v_again.table),
            "accuracy_tables_equal": v_forgot.table == v_again.table}


def _write_kept(spec: synthetic_data.LabelledSpec, keep: np.ndarray, out: str) -> None:
    """The kept rows of ``spec`` as a clip folder, streamed block by block (same ids, labels and vectors)."""
    structure = synthetic_data.centres(spec)

    def chunks():
        written = 0
        for block in synthetic_data.iter_blocks(spec, structure=structure):
            rows = np.flatnonzero(keep[block.start:block.start + block.labels.shape[0]])
            columns = synthetic_data.metadata_columns(spec, structure, block)
            yield written, {name: values[rows] for name, values in columns.items()}, block.vectors[rows]
            written += rows.size

    synthetic_data.write_clip_layout(out, chunks(), rows=int(keep.sum()), dim=spec.dim, rows_per_file=spec.rows_per_file,
                                     dtype=spec.dtype, info={**spec.to_dict(), "kept_rows": int(keep.sum())})


def run(work: str, out: str, setup: ScaleSetup, *, log: Callable[[str], None] = print,
        runner_flags: Sequence[str] = ()) -> dict:
    """Runs the chosen parts and writes ``report.json``, ``report.md`` and the figure into ``out``.

    Args:
      work: The work directory (the workspace is ``WORK/synthetic-scale``).
      out: Where the report goes.
      setup: What to generate and run.
      log: Progress lines.
      runner_flags: Beam flags every job runs with.
    """
    timer = _Timer(log)
    queries = synthetic_data.LabelledSpec(classes=setup.classes, per_class=max(1, setup.queries // setup.classes),
                                          dim=setup.dim, seed=setup.seed, draw=1)
    ws, generated = synthetic_jobs.workspace(work, NAME, memory=setup.data(setup.max_entries), queries=queries,
                                             k_max=setup.k_max, seed=setup.seed, runner_flags=runner_flags)
    timer.add("generate", generated)
    results, wall = {}, {}
    start = time.perf_counter()
    if "memory-size" in setup.parts:
        results["memory_size"], eval_dir = memory_size(ws, setup, timer)
    else:
        memory = _memory(ws, setup, setup.max_entries, timer)
        _, eval_dir = _evaluate(ws, setup, memory, f"size-{setup.max_entries}", setup.max_entries, timer)
    wall["memory_size"] = time.perf_counter() - start
    log(f"memory-size: {wall['memory_size']:.1f} s")
    if "label-noise" in setup.parts:
        start = time.perf_counter()
        results["label_noise"] = label_noise_at(setup, eval_dir, timer)
        wall["label_noise"] = time.perf_counter() - start
    if "unlearning" in setup.parts:
        start = time.perf_counter()
        results["unlearning"] = unlearning_at(ws, setup, eval_dir, timer)
        wall["unlearning"] = time.perf_counter() - start
        log(f"unlearning: {wall['unlearning']:.1f} s")
    results["wall_seconds"] = {k: round(v, 1) for k, v in wall.items()}
    os.makedirs(out, exist_ok=True)
    if "memory_size" in results:
        ms = results["memory_size"]
        series = {f"{r} (k={ms['k']})": (ms["entries"], [100 * e for e in ms[f"error_k{ms['k']}"][r]])
                  for r in ms[f"error_k{ms['k']}"]}
        plot_lines(os.path.join(out, "error_vs_memory_size.png"), series, xlabel="memory entries",
                   ylabel="top-1 error (%)", logx=True, logy=True,
                   title=f"synthetic, {setup.classes} classes: error vs memory size ({ms['queries']} queries)")
    write_report(out, name=NAME, setup=setup, results=results, markdown=_markdown(results),
                 seconds=timer.seconds, command=setup.command())
    return results


def _markdown(results: dict) -> str:
    lines = []
    if "memory_size" in results:
        ms = results["memory_size"]
        k, errors = ms["k"], ms[f"error_k{ms['k']}"]
        rules = list(errors)
        lines += ["| entries | " + " | ".join(f"{r} err@{k}" for r in rules) + " |", "|---:|" + "---:|" * len(rules)]
        lines += [f"| {e:,} | " + " | ".join(pct(errors[r][i]) for r in rules) + " |"
                  for i, e in enumerate(ms["entries"])]
        lines += ["", "| rule | range | slope (log10 error per decade) | 95% bootstrap interval | r2 |",
                  "|---|---|---:|---|---:|"]
        for r in rules:
            for span, f in [("all", ms["power_law"][r]), *ms["power_law_by_decade"][r].items()]:
                lines.append(f"| {r} | {span} | {f['slope']:.3f} | [{f['slope_low']:.3f}, {f['slope_high']:.3f}] | "
                             f"{f['r2']:.3f} |" if "slope" in f else f"| {r} | {span} | — | {f['error']} | |")
    if "label_noise" in results:
        ln = results["label_noise"]
        lines += ["", f"Label noise at {ln['entries']:,} entries, best-k accuracy (k):", "",
                  "| rule | " + " | ".join(f"{p} %" for p in ln["levels_percent"]) + " |",
                  "|---|" + "---:|" * len(ln["levels_percent"])]
        lines += [f"| {r} | " + " | ".join(f"{pct(b[str(p)]['accuracy'])} ({b[str(p)]['k']})"
                                           for p in ln["levels_percent"]) + " |" for r, b in ln["best"].items()]
    if "unlearning" in results:
        u = results["unlearning"]
        lines += ["", f"Unlearning at {u['entries']:,} entries: forgot {u['forgotten']:,} ids in "
                      f"{u['forget_seconds']:.2f} s; neighbour lists differing from the rebuilt memory: "
                      f"{u['neighbour_lists_differing_from_rebuilt']} (near-tie swaps {u['near_tie_swaps']}); "
                      f"forgotten ids among neighbours: {u['forgotten_ids_among_neighbours']}; accuracy tables "
                      f"equal: {u['accuracy_tables_equal']}."]
    lines += ["", "Wall seconds: " + ", ".join(f"{k} {v}" for k, v in results["wall_seconds"].items())]
    return "\n".join(lines)


SETUP = ScaleSetup  # The dataclass of the study's flags (evaluation.experiments.registry.STUDIES).


def add_flags(parser) -> None:
    """The study's flags (``vmem experiment synthetic-scale``): one per `ScaleSetup` field."""
    synthetic_jobs.int_flags(parser, ScaleSetup, skip=("parts",))
    parser.add_argument("--parts", type=lambda text: tuple(text.split(",")), default=PARTS,
                        help=f"comma-separated, of {', '.join(PARTS)} (default all)")
