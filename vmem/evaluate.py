"""``vmem evaluate``: classify a held-out split against a memory; accuracy per voting rule and k.

    vmem evaluate --memory out/fmnist-memory --images data/fashion-mnist/test --output out/fmnist-eval \\
        --k-max 100 --pixel-baseline 10
    vmem evaluate --memory gs://BUCKET/memories/in1k --images gs://BUCKET/imagenet/val \\
        --output gs://BUCKET/evals/in1k --runner=DataflowRunner ...      (every flag: pipelines/evaluate.py)

Runs the Beam job (pipelines/evaluate.py: embed, search, merge, ``neighbors-*.jsonl`` and
``evaluation-summary.json``), then votes its neighbour files with every rule at every k, as ``vmem vote``
does, and writes report.json, report.md and accuracy_vs_k.png into ``--output``
(evaluation.vote_report.write_evaluation_report). The Markdown table is printed.

Exit status: 0 reported; 1 the job or the report failed (a different encoder, a memory that cannot answer
these queries, a bookkeeping mismatch: nothing is reported); 2 a bad flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from vmem.args import run_command

__all__ = ["main"]


def _run(argv: Sequence[str]) -> int:
    from evaluation.report import markdown_table, rerank_markdown  # pylint: disable=g-import-not-at-top
    from evaluation.vote_report import write_evaluation_report  # pylint: disable=g-import-not-at-top
    from pipelines import evaluate  # pylint: disable=g-import-not-at-top
    args, _ = evaluate.build_arg_parser().parse_known_args(argv)
    start = time.monotonic()
    evaluate.run(argv)
    report = write_evaluation_report(args.output)
    elapsed = time.monotonic() - start
    print(markdown_table(report, baselines=report.get("baselines") or {}), end="")
    rerank = (report.get("extra") or {}).get("rerank")
    if rerank and "queries" in rerank:
        print("\n" + rerank_markdown(rerank), end="")
    print(f"{report['queries']} queries ({report['failed']} failed) in {elapsed:.1f}s "
          f"({report['queries'] / max(elapsed, 1e-9):.1f} queries/s end to end); report in {args.output}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem evaluate``; returns the exit status."""
    return run_command("vmem evaluate", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
