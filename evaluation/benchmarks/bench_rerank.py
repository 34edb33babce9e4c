"""Second-opinion re-ranking and crowding, measured on the demo memory with the real evaluate job.

    python -m evaluation.benchmarks.bench_rerank --memory out/fmnist-memory --images data/fashion-mnist/test \\
        --output out/bench-rerank

1. **Re-ranking.** ``vmem evaluate --rerank encoder:efficientnet-lite1 --rerank-below 1.01`` sends every
   query's rank@10 vote to the offline re-ranker (EfficientNet-Lite1 re-scores its top-N neighbours), once per
   ``--weights`` value, next to the same evaluation without re-ranking (same process: the cost is the
   difference in wall time). Every query's record (rerank-*.jsonl: margin, vote, answer) gives the
   accuracy-versus-fraction-re-ranked curve: ``--rerank-below t`` sends exactly the queries with margin < t,
   and a query's answer does not depend on which others are sent, so the curve at t is the vote for margins
   >= t and the answer below. One point of it is checked by a real run with that gate (``--check-fraction``).
2. **Crowding.** Near-duplicate groups at each ``--near-duplicate-distances`` value are attached to a copy of
   the memory (``vmem metadata --near-duplicates D``), and the test split is evaluated with at most C votes
   per group (``--crowding C:meta:near_dup_D``); the table shows rank@10 and the best rank accuracy against
   the uncrowded memory.

Writes report.json, report.md and rerank_curve.png to --output, and prints the tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from memory.rerank.base import RerankRecord
from memory.search.filters import Crowding

if TYPE_CHECKING:
    from pipelines.evaluate import RerankOptions

RULE, K = "rank", 10


def _evaluate(memory: str, images: str, out: str, *, rerank: RerankOptions | None = None,
              crowding: Crowding | None = None) -> tuple[dict, float]:
    """``vmem evaluate --k-max 20`` (the job, then the report), optionally re-ranking or crowding."""
    from evaluation.vote_report import write_evaluation_report  # pylint: disable=g-import-not-at-top
    from pipelines.evaluate import evaluate_memory  # pylint: disable=g-import-not-at-top
    from pipelines.io.readers import parse_image_spec  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    evaluate_memory(memory=memory, source=parse_image_spec(images), output=out, k_max=20, rerank=rerank,
                    crowding=crowding)
    report = write_evaluation_report(out)
    return report, time.perf_counter() - start


def _rerank(args, *, weight: float, below: float) -> RerankOptions:
    """``--rerank encoder:ENCODER --rerank-below BELOW --rerank-top-n N --rerank-weight W`` (rank@10 vote)."""
    from memory.decide.voting import VotingRule  # pylint: disable=g-import-not-at-top
    from memory.rerank import RerankFlags, RerankSpec  # pylint: disable=g-import-not-at-top
    from pipelines.evaluate import RerankOptions  # pylint: disable=g-import-not-at-top
    spec = RerankSpec.from_flags("encoder", args.encoder, RerankFlags(weight=weight))
    return RerankOptions(spec=spec, rule=VotingRule(RULE), k=K, below=below, top_n=args.top_n)


def rerank_rows(out: str) -> list[RerankRecord]:
    """Every query's record from the job's ``rerank-*.jsonl`` under ``out``."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "rerank-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            rows += [RerankRecord.from_dict(json.loads(line)) for line in f if line.strip()]
    return rows


def curve(rows: Sequence[RerankRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gates t, fraction of queries with margin < t, accuracy with --rerank-below t), t over every margin."""
    margin = np.asarray([r.margin for r in rows])
    vote_ok = np.asarray([r.vote_label == r.true_label for r in rows])
    final_ok = np.asarray([r.label == r.true_label for r in rows])
    gates = np.concatenate([[0.0], np.unique(margin), [1.01]])
    gates = np.unique(gates)
    frac = np.asarray([(margin < t).mean() for t in gates])
    acc = np.asarray([100.0 * np.where(margin < t, final_ok, vote_ok).mean() for t in gates])
    return gates, frac, acc


def _gate_for_fraction(rows: Sequence[RerankRecord], fraction: float) -> float:
    gates, frac, _ = curve(rows)
    return float(gates[int(np.searchsorted(frac, fraction))])


def run(args) -> dict[str, Any]:
    os.makedirs(args.output, exist_ok=True)
    base, base_s = _evaluate(args.memory, args.images, os.path.join(args.output, "eval-plain"))
    plain = 100.0 * base["accuracy"][RULE][str(K)]
    results: dict[str, Any] = {"plain": {"accuracy_rank10": plain, "seconds": base_s, "queries": base["queries"]},
                               "rerank": {}, "crowding": {}}
    series = {}
    for w in args.weights if args.part in ("all", "rerank") else ():
        out = os.path.join(args.output, f"eval-rerank-w{w:g}")
        rep, secs = _evaluate(args.memory, args.images, out, rerank=_rerank(args, weight=w, below=1.01))
        rows = rerank_rows(out)
        gates, frac, acc = curve(rows)
        summary = rep["extra"]["rerank"]
        best = int(np.argmax(acc))
        results["rerank"][f"{w:g}"] = {
            "summary": summary, "seconds": secs, "extra_seconds": secs - base_s,
            "ms_per_reranked_query": 1000.0 * (secs - base_s) / max(summary["reranked"], 1),
            "curve": {"gate": gates.tolist(), "fraction": frac.tolist(), "accuracy": acc.tolist()},
            "best": {"gate": float(gates[best]), "fraction": float(frac[best]), "accuracy": float(acc[best])},
            "at_fraction": {f"{f:g}": float(acc[int(np.searchsorted(frac, f))]) for f in (0.1, 0.2, 0.3, 0.5, 1.0)}}
        series[f"{args.encoder}, weight {w:g}"] = (100 * frac, acc)
        print(f"weight {w:g}: rank@10 {summary['accuracy_vote']:.2f} -> {summary['accuracy_reranked']:.2f} "
              f"re-ranking all {summary['reranked']} queries (changed {summary['changed']}: "
              f"{summary['changed_to_right']} to right, {summary['changed_to_wrong']} to wrong); best gate "
              f"{gates[best]:.3f} ({100 * frac[best]:.1f}% sent) -> {acc[best]:.2f}; +{secs - base_s:.1f}s")
    results["best_rank_plain"] = 100 * max(base["accuracy"][RULE].values())
    if args.part in ("all", "rerank"):
        _check(args, results, base_s, series, plain)
    if args.part in ("all", "crowding"):
        _crowding(args, results, plain)
    return results


def _check(args, results: dict, base_s: float, series: dict, plain: float) -> None:
    from evaluation.experiments.common import plot_lines  # pylint: disable=g-import-not-at-top
    # One point of the curve, run for real with its gate (a different output: no shared answer cache).
    w0 = args.weights[0]
    rows0 = rerank_rows(os.path.join(args.output, f"eval-rerank-w{w0:g}"))
    gate = _gate_for_fraction(rows0, args.check_fraction)
    check, check_s = _evaluate(args.memory, args.images, os.path.join(args.output, "eval-rerank-check"),
                               rerank=_rerank(args, weight=w0, below=gate))
    gates, frac, acc = curve(rows0)
    predicted = float(acc[int(np.searchsorted(gates, gate))])
    got = check["extra"]["rerank"]
    results["check"] = {"weight": w0, "gate": gate, "predicted_accuracy": predicted,
                        "measured_accuracy": got["accuracy_reranked"], "sent": got["sent"], "seconds": check_s,
                        "ms_per_reranked_query": 1000.0 * (check_s - base_s) / max(got["reranked"], 1)}
    print(f"check: --rerank-below {gate:.4f} sends {got['sent']} queries: accuracy {got['accuracy_reranked']:.2f} "
          f"(curve says {predicted:.2f})")
    plot_lines(os.path.join(args.output, "rerank_curve.png"), series, xlabel="queries re-ranked (%, lowest margin "
               "first)", ylabel="top-1 accuracy (%)", title=f"Second-opinion re-ranking on the demo ({RULE}@{K})",
               references=[(f"vote alone ({plain:.2f})", plain)])


def _crowding(args, results: dict, plain: float) -> None:
    from memory.search.duplicates import near_duplicate_groups  # pylint: disable=g-import-not-at-top
    from memory.store.metadata import publish_metadata, read_metadata  # pylint: disable=g-import-not-at-top
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    copy = os.path.join(args.output, "memory-copy")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(args.memory, copy)
    for d in args.near_duplicate_distances:
        column = f"near_dup_{d:g}"
        # What `vmem metadata --near-duplicates D --column C` publishes (its default k, 10).
        ids, groups = near_duplicate_groups(VisualMemory.open(copy), d, k=10)
        publish_metadata(copy, ids, {column: groups})
        groups = read_metadata(copy, read_manifest(copy)).columns[column]
        sizes = np.unique(groups, return_counts=True)[1]
        for c in args.crowding:
            rep, secs = _evaluate(copy, args.images, os.path.join(args.output, f"eval-crowd-{c}-{d:g}"),
                                  crowding=Crowding.parse(f"{c}:meta:{column}"))
            best_rank = max(rep["accuracy"][RULE].values())
            results["crowding"][f"{c}:{column}"] = {"accuracy_rank10": 100 * rep["accuracy"][RULE][str(K)],
                                                    "best_rank": 100 * best_rank, "seconds": secs,
                                                    "groups": int((sizes > 1).sum()),
                                                    "grouped_entries": int(sizes[sizes > 1].sum())}
            print(f"crowding {c} per {column}: rank@10 {100 * rep['accuracy'][RULE][str(K)]:.2f} "
                  f"(plain {plain:.2f}), best rank {100 * best_rank:.2f} ({secs:.1f}s)")


def markdown(results: dict, args) -> str:
    lines = [f"Demo memory `{args.memory}`, {results['plain']['queries']} test queries; vote: {RULE}@{K} = "
             f"{results['plain']['accuracy_rank10']:.2f}; {os.cpu_count()} cores, {platform.python_version()}."]
    if results["rerank"]:
        lines += ["", "| re-ranker | all re-ranked | changed (right / wrong) | best gate (sent) | at 10% / 20% / 30% sent "
                  "| extra time | per re-ranked query |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w, r in results["rerank"].items():
        s, b, a = r["summary"], r["best"], r["at_fraction"]
        lines.append(f"| {args.encoder}, weight {w} | {s['accuracy_reranked']:.2f} | {s['changed']} "
                     f"({s['changed_to_right']} / {s['changed_to_wrong']}) | {b['accuracy']:.2f} at "
                     f"{b['gate']:.3f} ({100 * b['fraction']:.1f}%) | {a['0.1']:.2f} / {a['0.2']:.2f} / "
                     f"{a['0.3']:.2f} | {r['extra_seconds']:.1f} s | {r['ms_per_reranked_query']:.0f} ms |")
    c = results.get("check")
    if c:
        lines += ["", f"Check: a real run with `--rerank-below {c['gate']:.4f}` sent {c['sent']} queries and scored "
                  f"{c['measured_accuracy']:.2f}; the curve predicts {c['predicted_accuracy']:.2f}."]
    lines += ["", "| crowding | near-duplicate groups of 2+ (entries) | rank@10 | best rank |", "|---|---:|---:|---:|",
              f"| none | | {results['plain']['accuracy_rank10']:.2f} | {results['best_rank_plain']:.2f} |"]
    for name, r in results["crowding"].items():
        lines.append(f"| at most {name.replace(':', ' per ', 1)} | {r['groups']} ({r['grouped_entries']}) "
                     f"| {r['accuracy_rank10']:.2f} | {r['best_rank']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", default="out/fmnist-memory")
    parser.add_argument("--images", default="data/fashion-mnist/test")
    parser.add_argument("--output", default="out/bench-rerank")
    parser.add_argument("--encoder", default="efficientnet-lite1")
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0])
    parser.add_argument("--check-fraction", type=float, default=0.2)
    parser.add_argument("--near-duplicate-distances", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.02, 0.05])
    parser.add_argument("--crowding", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--part", choices=("all", "rerank", "crowding"), default="all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    results = run(args)
    results["seconds_total"] = time.perf_counter() - start
    md = markdown(results, args)
    with open(os.path.join(args.output, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"command": "python -m evaluation.benchmarks.bench_rerank " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv),
                   "cores": os.cpu_count(), "results": results}, f, indent=2)
    with open(os.path.join(args.output, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
