"""Throughput of ``memory.decide.voting.predict_all_k`` for 10 vs 1000 classes.

For each rule, one ``predict_all_k`` call computes the prediction at every
k = 1..k_max. Both class counts are measured side by side in the same run
(best of ``--repeats``) so that their ratio shows whether the cost depends on
the number of classes (it should not: no [queries, classes] table is built).

Command::

        python -m evaluation.benchmarks.bench_voting --queries 10000 --k-max 100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from evaluation.benchmarks.timing import best_seconds
from memory.decide import voting

CLASS_COUNTS = (10, 1000)


def synthetic_neighbors(*, queries: int, k_max: int, num_classes: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and nearest-first cosine distances, seeded."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=(queries, k_max))
    distances = np.sort(rng.uniform(0.0, 1.0, size=(queries, k_max)), axis=1)
    return labels, distances


def run(*, queries: int, k_max: int, repeats: int, seed: int = 0
        ) -> dict[str, dict[int, float]]:
    """Returns ``{rule: {num_classes: queries per second}}``."""
    inputs = {c: synthetic_neighbors(queries=queries, k_max=k_max,
                                     num_classes=c, seed=seed)
              for c in CLASS_COUNTS}
    results: dict[str, dict[int, float]] = {}
    for rule in voting.VotingRule:
        results[rule.value] = {}
        # Interleave class counts within a rule so drift hits both equally.
        for c in CLASS_COUNTS:
            labels, distances = inputs[c]
            seconds, _ = best_seconds(
                lambda: voting.predict_all_k(labels, distances, rules=(rule,),
                                             k_max=k_max), repeats=repeats)
            results[rule.value][c] = queries / seconds
    return results


def format_table(results: dict[str, dict[int, float]], *, queries: int,
                 k_max: int) -> str:
    """Markdown table of queries/s and the 1000-class / 10-class ratio."""
    lo, hi = CLASS_COUNTS
    lines = [
        f"predict_all_k: {queries} queries, k = 1..{k_max} in one call, "
        f"best of repeats",
        "",
        f"| rule | {lo} classes (q/s) | {hi} classes (q/s) | "
        f"ratio {hi}/{lo} |",
        "|---|---:|---:|---:|",
    ]
    for rule, by_c in results.items():
        lines.append(f"| {rule} | {by_c[lo]:,.0f} | {by_c[hi]:,.0f} | "
                     f"{by_c[hi] / by_c[lo]:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_voting")
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--k-max", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for flag, value in (("--queries", args.queries), ("--k-max", args.k_max),
                        ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    results = run(queries=args.queries, k_max=args.k_max,
                  repeats=args.repeats)
    print(format_table(results, queries=args.queries, k_max=args.k_max))
    return 0


if __name__ == "__main__":
    sys.exit(main())
