"""label-noise over class counts: does rank voting's robustness at 60 % noise appear as the classes grow?

The paper finds RankVoting almost unchanged with up to ~60 % of a 1,000-class memory's labels randomised;
on the bundled 10-class datasets we lose 3-6 points at 60 %. With uniform noise over C classes a wrong
label lands on any one wrong class with probability p / C, so ten classes concentrate the noise votes and a
thousand dilute them. This study tests that on labelled synthetic embeddings (`evaluation.synthetic_data`)
with C classes at equal entries per class, everything else equal: for each C, a memory of C x per_class
entries and ``queries`` held-out queries (draw 1 of the same classes) are generated into a workspace of
their own (`synthetic_jobs.workspace`) and go through its jobs (``vmem build --embeddings``, ``vmem
evaluate --embeddings``), and the clean memory's neighbour lists are re-voted at each noise level by the
label-noise experiment's own `label_noise.sweep`.

    vmem experiment label-noise-classes --work-dir /tmp/lnc --output docs/paper/synthetic/label-noise-classes \\
        --classes 10,100,1000 --per-class 100 --queries 2000 --seed 0
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from evaluation import synthetic_data
from evaluation.experiments import synthetic_jobs
from evaluation.experiments.common import pct, plot_lines, read_neighbors, write_report
from evaluation.experiments.label_noise import LEVELS, NAME as LABEL_NOISE, sweep

NAME = "label-noise-classes"
REPORT_KS = (1, 5, 10, 20, 50, 100)
# Largest drop, in points, from the clean memory to 60 % noise that still counts as "almost unchanged".
ROBUST_POINTS = 2.0


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """What the study generates and runs (every field is a flag of the command line).

    Attributes:
      classes: Class counts compared.
      per_class: Memory entries per class (equal for every class count).
      queries: Held-out queries per class count (spread evenly over the classes, at least one per class).
      dim: Embedding dimension.
      seed: Seeds the data and the noise.
      k_max: Neighbours retrieved and voted over.
      levels: Noise levels in percent.
    """
    classes: tuple[int, ...] = (10, 100, 1000)
    per_class: int = 100
    queries: int = 2000
    dim: int = 256
    seed: int = 0
    k_max: int = 100
    levels: tuple[int, ...] = LEVELS

    def __post_init__(self):
        if not self.classes or min(self.classes) < 2:
            raise ValueError(f"--classes needs class counts >= 2, got {self.classes}")
        for name in ("per_class", "queries", "dim", "k_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if 0 not in self.levels or any(not 0 <= p <= 100 for p in self.levels):
            raise ValueError(f"--levels must include 0 and lie in 0..100, got {self.levels}")
        if self.k_max > min(self.classes) * self.per_class:
            raise ValueError(f"--k-max {self.k_max} exceeds the smallest memory "
                             f"({min(self.classes)} x {self.per_class}); lower --k-max or raise --per-class")

    def command(self) -> str:
        levels = "" if self.levels == LEVELS else " --levels " + ",".join(map(str, self.levels))
        return (f"vmem experiment {NAME} --classes {','.join(map(str, self.classes))} "
                f"--per-class {self.per_class} --queries {self.queries} --dim {self.dim} --seed {self.seed} "
                f"--k-max {self.k_max}{levels}")


def run_class_count(work: str, setup: StudySetup, classes: int, *, log: Callable[[str], None],
                    runner_flags: Sequence[str] = ()) -> dict:
    """Generates, builds, evaluates and re-votes one class count (workspace ``WORK/classes-C``); returns its
    tables and seconds."""
    memory_spec = synthetic_data.LabelledSpec(classes=classes, per_class=setup.per_class, dim=setup.dim,
                                              seed=setup.seed)
    query_spec = dataclasses.replace(memory_spec, per_class=max(1, setup.queries // classes), draw=1)
    ws, generated = synthetic_jobs.workspace(work, f"classes-{classes}", memory=memory_spec, queries=query_spec,
                                             k_max=setup.k_max, seed=setup.seed, runner_flags=runner_flags)
    seconds = {"generate": generated}
    log(f"C={classes}: {memory_spec.rows:,} memory entries, {query_spec.rows:,} queries generated in "
        f"{seconds['generate']:.1f} s")
    shards = synthetic_jobs.shards_for(memory_spec.rows)
    start = time.perf_counter()
    memory = ws.build("memory", ws.split_spec("train"), shards=shards)
    seconds["build"] = time.perf_counter() - start
    log(f"C={classes}: built in {seconds['build']:.1f} s ({shards} shards)")
    start = time.perf_counter()
    _, eval_dir = ws.evaluate(memory, ws.split_spec("test"), "test", k_max=setup.k_max)
    seconds["evaluate"] = time.perf_counter() - start
    log(f"C={classes}: evaluated in {seconds['evaluate']:.1f} s")
    start = time.perf_counter()
    labels = np.concatenate([b.labels for b in synthetic_data.iter_blocks(memory_spec)])
    ids = synthetic_data.row_keys(memory_spec, 0, memory_spec.rows)
    names = memory_spec.class_name(np.arange(classes))  # Zero-padded: sorted, as the build stores them.
    result = sweep(read_neighbors(eval_dir), ids=ids.tolist(), labels=memory_spec.class_name(labels),
                   classes=names.tolist(), levels=setup.levels, k_max=setup.k_max,
                   rng=lambda percent: np.random.default_rng([setup.seed, zlib.crc32(LABEL_NOISE.encode()),
                                                              classes, percent]))
    seconds["revote"] = time.perf_counter() - start
    log(f"C={classes}: {len(setup.levels)} noise levels re-voted in {seconds['revote']:.1f} s")
    return {"tables": result.tables, "changed": result.changed, "seconds": seconds,
            "memory_entries": memory_spec.rows, "queries": query_spec.rows}


def robust_k(tables: dict[int, dict[str, dict[int, float]]], rule: str, *, level: int = 60,
             points: float = ROBUST_POINTS) -> int | None:
    """The smallest k at which ``rule`` at ``level`` % noise is within ``points`` of the clean memory's best."""
    clean_best = max(tables[0][rule].values())
    for k in sorted(tables[level][rule]):
        if 100 * (clean_best - tables[level][rule][k]) <= points:
            return k
    return None


def run(work: str, out: str, setup: StudySetup, *, log: Callable[[str], None] = print,
        runner_flags: Sequence[str] = ()) -> dict:
    """Runs every class count and writes ``report.json``, ``report.md`` and two figures into ``out``.

    Args:
      work: The work directory (one workspace per class count under it).
      out: Where the report goes.
      setup: What to generate and run.
      log: Progress lines.
      runner_flags: Beam flags every job runs with.
    """
    per_classes, seconds = {}, {}
    for classes in setup.classes:
        start = time.perf_counter()
        per_classes[classes] = run_class_count(work, setup, classes, log=log, runner_flags=runner_flags)
        seconds[f"classes_{classes}"] = time.perf_counter() - start
        log(f"C={classes}: done in {seconds[f'classes_{classes}']:.1f} s")
    rules = list(per_classes[setup.classes[0]]["tables"][0])
    ks = [k for k in REPORT_KS if k <= setup.k_max]
    results = {"robust_points": ROBUST_POINTS, "by_classes": {}}
    for c, r in per_classes.items():
        t = r["tables"]
        results["by_classes"][str(c)] = {
            "memory_entries": r["memory_entries"], "queries": r["queries"],
            "seconds": {k: round(v, 2) for k, v in r["seconds"].items()},
            "labels_changed_fraction": {str(p): r["changed"][p] for p in setup.levels},
            "accuracy": {rule: {str(p): {str(k): t[p][rule][k] for k in ks} for p in setup.levels} for rule in rules},
            "best": {rule: {str(p): _best(t[p][rule]) for p in setup.levels} for rule in rules},
            "robust_k_at_60": ({rule: robust_k(t, rule) for rule in rules} if 60 in setup.levels else None)}
    os.makedirs(out, exist_ok=True)
    series = {f"C={c} rank (best k)": (list(setup.levels), [100 * _best(r["tables"][p]["rank"])["accuracy"]
                                                             for p in setup.levels]) for c, r in per_classes.items()}
    series.update({f"C={c} plurality (best k)": (list(setup.levels),
                                                 [100 * _best(r["tables"][p]["plurality"])["accuracy"]
                                                  for p in setup.levels]) for c, r in per_classes.items()})
    plot_lines(os.path.join(out, "accuracy_vs_noise.png"), series, xlabel="memory labels randomised (%)",
               ylabel="top-1 accuracy at best k (%)", title=f"synthetic, {setup.per_class} per class: label noise",
               styles={s: ":" for s in series if "plurality" in s})
    if 60 in setup.levels:
        drop = {f"C={c} {rule}": (ks, [100 * (r["tables"][60][rule][k] - r["tables"][0][rule][k]) for k in ks])
                for c, r in per_classes.items() for rule in ("rank", "plurality")}
        plot_lines(os.path.join(out, "drop_at_60_vs_k.png"), drop, xlabel="k", logx=True,
                   ylabel="accuracy change 0 -> 60 % noise (points)", title="change at 60 % noise, by k",
                   styles={s: ":" for s in drop if "plurality" in s})
    write_report(out, name=NAME, setup=setup, results=results, markdown=_markdown(per_classes, setup, rules, ks),
                 seconds={**seconds, "total": sum(seconds.values())}, command=setup.command())
    return results


def _best(by_k: dict[int, float]) -> dict[str, float]:
    k = max(by_k, key=lambda k: (by_k[k], -k))  # Smallest k on ties.
    return {"accuracy": by_k[k], "k": k}


def _markdown(per_classes: dict, setup: StudySetup, rules: Sequence[str], ks: Sequence[int]) -> str:
    shown = [p for p in (0, 20, 40, 60, 80) if p in setup.levels]
    lines = ["Best-k accuracy (k) by noise level:", "",
             "| classes | rule | " + " | ".join(f"{p} %" for p in shown) + " | change 0 -> 60 % |",
             "|---:|---|" + "---:|" * (len(shown) + 1)]
    for c, r in per_classes.items():
        for rule in rules:
            best = {p: _best(r["tables"][p][rule]) for p in shown}
            change = (f"{100 * (best[60]['accuracy'] - best[0]['accuracy']):+.2f}" if 60 in best else "-")
            lines.append(f"| {c} | {rule} | " + " | ".join(f"{pct(best[p]['accuracy'])} ({best[p]['k']})"
                                                         for p in shown) + f" | {change} |")
    if 60 in setup.levels:
        lines += ["", "Accuracy at 60 % noise minus the clean memory's, at the same k (points):", "",
                  "| classes | rule | " + " | ".join(f"k={k}" for k in ks) + f" | smallest k within {ROBUST_POINTS:g} "
                  "points of the clean best |", "|---:|---|" + "---:|" * (len(ks) + 1)]
        for c, r in per_classes.items():
            t = r["tables"]
            for rule in rules:
                lines.append(f"| {c} | {rule} | " + " | ".join(f"{100 * (t[60][rule][k] - t[0][rule][k]):+.2f}"
                                                             for k in ks) + f" | {robust_k(t, rule) or '-'} |")
    lines += ["", "Wall seconds (generate / build / evaluate / re-vote): " + "; ".join(
        f"C={c}: " + " / ".join(f"{r['seconds'][s]:.1f}" for s in ("generate", "build", "evaluate", "revote"))
        for c, r in per_classes.items())]
    return "\n".join(lines)


SETUP = StudySetup  # The dataclass of the study's flags (evaluation.experiments.registry.STUDIES).


def add_flags(parser) -> None:
    """The study's flags (``vmem experiment label-noise-classes``): one per `StudySetup` field."""
    synthetic_jobs.int_flags(parser, StudySetup)
