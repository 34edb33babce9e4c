"""``make paper``: every experiment on both bundled datasets, and one summary to diff between runs.

    python -m evaluation.experiments.paper --output out/paper [--work-dir out/paper-work] [--docs docs/paper]

Runs ``vmem experiment all`` for Fashion-MNIST and MNIST with the default setup (1,000 training images per
class in the memory pool, 100 more per class for calibration, 100 test images per class as queries),
then writes ``OUTPUT/summary.md`` and ``OUTPUT/summary.json`` (the headline number of every experiment on
both datasets) and ``OUTPUT/report.html`` (the summary, then every experiment's report and plots, in one
self-contained page). ``--docs DIR`` also copies each experiment's plots and report.md into ``DIR/<dataset>/``,
where docs/paper.md shows them.

Other flags are Beam pipeline options, passed to every job (``--direct_running_mode=multi_processing
--direct_num_workers=2``, Dataflow's flags), as ``vmem experiment`` passes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence

from evaluation.experiments.registry import EXPERIMENTS, run_experiments
from evaluation.experiments.workspace import HOLD_OUT, Setup, Workspace
from evaluation.html_report import REPORT_HTML, Section, png_paths, write_html
from pipelines.runner import FlagError, resolve_pipeline_options

DATASETS = tuple(HOLD_OUT)


def headline(name: str, r: dict) -> str:
    """The one-line result of an experiment, as docs/paper.md quotes it."""
    if name == "k-sweep":
        b = r["best"]
        return (", ".join(f"{rule} {100 * v['accuracy']:.2f} (k={v['k']})" for rule, v in b.items())
                + f"; least degrading to k=100: {r['least_degrading_rule']}")
    if name == "label-noise":
        acc = r["best"]["rank"]
        return ("rank best-k accuracy at 0/30/60/80% noise: "
                + "/".join(f"{100 * acc[str(p)]['accuracy']:.2f}" for p in (0, 30, 60, 80) if str(p) in acc)
                + (f"; re-vote vs rebuilt memory: largest accuracy difference "
                   f"{100 * r['verification']['max_accuracy_difference']:.2f} points "
                   f"({r['verification']['near_tie_swaps']} near-tie swaps), {r['verification']['speedup']:.0f}x faster"
                   if r.get("verification") else ""))
    if name == "memory-size":
        f = r["power_law"].get("rank", {})
        return (f"rank error slope {f['slope']:.3f} per decade [{f['slope_low']:.3f}, {f['slope_high']:.3f}] "
                f"(paper {r['paper_slope']})" if "slope" in f else f"no fit: {f.get('error')}")
    if name == "new-classes":
        k = r["k"]
        return (f"old classes rank@{k} {100 * r['old_before']['rank'][f'k{k}']:.2f} -> "
                f"{100 * r['old_after']['rank'][f'k{k}']:.2f}, new classes {100 * r['new_after']['rank'][f'k{k}']:.2f}; "
                f"inexact lists {r['neighbour_lists_not_exact']}; add {r['add_seconds']:.1f} s")
    if name == "unlearning":
        c, i = r["class"], r["random_ids"]
        return (f"forget class {1000 * c['forget_seconds']:.0f} ms, 10% ids {1000 * i['forget_seconds']:.0f} ms; lists "
                f"differing from rebuilt {c['neighbour_lists_differing_from_rebuilt']}/"
                f"{i['neighbour_lists_differing_from_rebuilt']}; forgotten class predicted "
                f"{c['forgotten_class_predictions']} times")
    if name == "pruning":
        k = r["k"]
        return "; ".join(f"{p}%: rank@{k} none/hard/soft " + "/".join(
            f"{100 * v[m]['rank'][f'k{k}']:.2f}" for m in ("none", "hard", "soft"))
            for p, v in r["per_level"].items())
    if name == "abstain":
        return (f"ECE {r['ece_in_memory']['raw_share']:.3f} -> {r['ece_in_memory']['calibrated']:.3f}; AUROC "
                + ", ".join(f"{s} {v:.3f}" for s, v in r["auroc_in_vs_out"].items()))
    return ""


def write_paper_html(output: str, summary_md: str, datasets: Sequence[str], names: Sequence[str], *,
                     command: str) -> str:
    """``OUTPUT/report.html``: the summary, then each experiment's report.md and plots from ``OUTPUT/DATASET/NAME``.

    Returns:
      The page's path.
    """
    sections = [Section("Summary", markdown=summary_md.split("\n", 1)[1])]  # The page has the title.
    for dataset in datasets:
        for n in names:
            directory = os.path.join(output, dataset, n)
            with open(os.path.join(directory, "report.md"), encoding="utf-8") as f:
                body = f.read()
            if body.startswith("# "):  # "# Experiment: NAME" repeats the section title.
                body = body.split("\n", 1)[1]
            sections.append(Section(f"{dataset}: {n}", markdown=body, figures=png_paths(directory)))
    return write_html(os.path.join(output, REPORT_HTML), "Paper experiments", sections, command=command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.experiments.paper", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="out/paper", help="reports (default out/paper)")
    parser.add_argument("--work-dir", default="out/paper-work", help="embeddings and memories (default out/paper-work)")
    parser.add_argument("--docs", default=None, help="also copy plots and report.md files into DIR/<dataset>/")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"default {','.join(DATASETS)}")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="default: all")
    d = Setup()
    for name in ("train_per_class", "calib_per_class", "test_per_class"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                            help=f"default {getattr(d, name)} (see evaluation.experiments.workspace.Setup)")
    args, runner_flags = parser.parse_known_args(argv)
    try:  # The other flags are Beam options for every job (as vmem experiment passes them).
        resolve_pipeline_options(runner_flags)
    except FlagError as e:
        print(e, file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    names = [n for n in args.experiments.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"unknown experiment {unknown[0]!r}; allowed: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    start = time.monotonic()
    summary = {"seconds": {}, "results": {}}
    for dataset in [d for d in args.datasets.split(",") if d]:
        t = time.monotonic()
        ws = Workspace(args.work_dir, Setup(dataset=dataset, train_per_class=args.train_per_class,
                                            calib_per_class=args.calib_per_class, test_per_class=args.test_per_class,
                                            runner_flags=tuple(runner_flags)))
        stamp = ws.prepare()
        results = run_experiments(names, ws, os.path.join(args.output, dataset), nested=True)
        summary["seconds"][dataset] = {"total": round(time.monotonic() - t, 1),
                                       "embed_images": stamp.get("embed_seconds"),
                                       **{k: round(v, 1) for k, v in ws.seconds.items()}}
        summary["results"][dataset] = {"setup": ws.setup.embedding_key(), "counts": stamp["counts"],
                                       "headlines": {n: headline(n, r) for n, r in results.items()}}
        if args.docs:
            for n in names:
                src, dst = os.path.join(args.output, dataset, n), os.path.join(args.docs, dataset, n)
                os.makedirs(dst, exist_ok=True)
                for f in os.listdir(src):
                    if f.endswith((".png", ".md", ".json")):
                        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    summary["seconds"]["all"] = round(time.monotonic() - start, 1)
    with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    lines = ["# Paper experiments: summary", "", f"Total {summary['seconds']['all']:.0f} s.", ""]
    for dataset, d in summary["results"].items():
        lines += [f"## {dataset} ({d['counts']})", ""]
        lines += [f"- **{n}**: {h}" for n, h in d["headlines"].items()]
        lines += [""]
    with open(os.path.join(args.output, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    write_paper_html(args.output, "\n".join(lines), list(summary["results"]), names,
                     command=shlex.join(["python", "-m", "evaluation.experiments.paper",
                                         *(sys.argv[1:] if argv is None else argv)]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
