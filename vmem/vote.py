"""``vmem vote``: accuracy of every voting rule at every k from neighbour lists.

Reads per-query neighbour lists (our JSONL or the paper's published JSON,
see ``evaluation.neighbors_io``), votes them with every rule at every k
(``evaluation.vote_report.count_votes``, the path ``vmem evaluate`` takes)
and writes report.json, report.md and accuracy_vs_k.png to ``--output``.
Records that carry ``neighbor_entry_weights`` (soft pruning) are voted with
those weights. The Markdown table is printed to stdout.

The files are read as a stream, a chunk of records at a time: memory does not
grow with their length (only by 8 bytes per query, to refuse a query id that
occurs twice). ``--k-max`` beyond the longest neighbour list is capped there,
with a note: every vote past a list is the vote of the whole list.

Example::

        vmem vote --neighbors out/neighbors-*.jsonl.gz --output out/report \\
                --k-max 100 --rules rank,softmax --tau 0.07 --alpha 2.0 \\
                --baseline "linear probe=0.863"

Exit status: 0 on success; 1 when the neighbour files are missing, malformed
or hold no query; 2 on a bad flag (the message names the bad value and the
allowed values).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from evaluation import neighbors_io
from evaluation import report as report_lib
from evaluation.vote_report import NoRecordsError, count_votes
from memory.decide import voting
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem vote`` argument parser."""
    allowed = ",".join(r.value for r in voting.VotingRule)
    parser = RaisingArgumentParser(
        prog="vmem vote",
        description="Top-1 accuracy of kNN voting rules for k = 1..k_max.")
    parser.add_argument(
        "--neighbors", nargs="+", required=True, metavar="FILE",
        help="neighbour-list files: JSONL in our schema or the paper's JSON "
        "records (JSON Lines or array), optionally .gz")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory for report.json, report.md and "
                        "accuracy_vs_k.png")
    parser.add_argument(
        "--k-max", type=int, default=None, metavar="K",
        help="largest k (>= 1); default and cap: the longest neighbour list (beyond it every vote is the "
        "vote of the whole list; a larger value is capped with a note)")
    parser.add_argument(
        "--rules", default=allowed,
        help=f"comma-separated voting rules (allowed: {allowed}; default all)")
    defaults = voting.VotingParams()
    parser.add_argument("--tau", type=float, default=defaults.softmax_tau,
                        help="softmax temperature (> 0)")
    parser.add_argument("--alpha", type=float, default=defaults.rank_alpha,
                        help="rank-voting offset: weight 1/(alpha + i) with 0-based i (> 0)")
    parser.add_argument(
        "--baseline", action="append", default=[], metavar="NAME=ACCURACY",
        help="reference accuracy in [0, 1] drawn as a dashed line, e.g. "
        "'linear probe=0.863'; repeatable")
    return parser


def _parse_rules(text: str) -> list[voting.VotingRule]:
    names = [n for n in (s.strip() for s in text.split(",")) if n]
    if not names:
        allowed = ", ".join(r.value for r in voting.VotingRule)
        raise UsageError(f"--rules is empty; allowed: {allowed}")
    try:
        rules = [voting.VotingRule.parse(n) for n in names]
    except ValueError as e:
        raise UsageError(f"--rules: {e}") from None
    return list(dict.fromkeys(rules))  # Drop repeats, keep order.


def _parse_baselines(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or not (0.0 <= number <= 1.0):
            raise UsageError(
                f"--baseline {item!r} must be NAME=ACCURACY with ACCURACY in "
                f"[0, 1], e.g. 'linear probe=0.863'")
        out[name] = number
    return out


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.k_max is not None and args.k_max < 1:
        raise UsageError(f"--k-max must be >= 1, got {args.k_max}")
    rules = _parse_rules(args.rules)
    try:
        params = voting.VotingParams(softmax_tau=args.tau,
                                     rank_alpha=args.alpha)
    except ValueError as e:
        flag = "--tau" if "softmax_tau" in str(e) else "--alpha"
        raise UsageError(f"{flag}: {e}") from None
    baselines = _parse_baselines(args.baseline)

    records = neighbors_io.iter_neighbor_files(args.neighbors)
    try:
        votes = count_votes(records, k_max=args.k_max, rules=rules, params=params)
    except (neighbors_io.NeighborFormatError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read neighbours: {e}") from None
    except NoRecordsError:
        raise ValueError(f"no queries in --neighbors {' '.join(args.neighbors)}") from None
    k_max = votes.counts.k_max
    if args.k_max is not None and args.k_max > k_max:
        print(f"vmem vote: note: --k-max {args.k_max} exceeds the longest neighbour list ({k_max}); voting "
              f"k = 1..{k_max} (beyond a list every vote is the vote of the whole list)", file=sys.stderr)
    entry_weights = votes.weighted
    report = report_lib.build_report(
        votes.counts.table(), queries=votes.counts.queries, failed=0,
        extra={
            "command": "vmem vote",
            "neighbors": list(args.neighbors),
            "softmax_tau": params.softmax_tau,
            "rank_alpha": params.rank_alpha,
            "rank_convention": "weight 1/(alpha + i), i 0-based",
            "tie_rule": "first class to reach the top score wins",
            "entry_weights": entry_weights,
        })
    report_lib.write_report(args.output, report, baselines=baselines)
    print(report_lib.markdown_table(report, baselines=baselines), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem vote``; returns the process exit status.

    Args:
        argv: Arguments after ``vote`` (default ``sys.argv[1:]``).
    """
    return run_command("vmem vote", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
