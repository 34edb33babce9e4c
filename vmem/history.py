"""``vmem history``: the versions of a living memory, oldest first.

Examples::

    vmem history out/fmnist-memory
    vmem history gs://BUCKET/memories/in1k --json

One row per existing version: version, parent, change kind (build, add, forget, prune, reindex, purge),
UTC time, live entries after the change, and its summary. Versions deleted by a purge are absent; the
purge's own row lists them (``--json`` shows every change's full details). Nothing here imports Beam.

Exit status: 0 on success, 1 when MEMORY is not a visual memory (the message names the path), 2 on a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vmem.args import RaisingArgumentParser, run_command

__all__ = ["build_parser", "format_table", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem history`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem history", description="List the versions of a visual memory, oldest first.")
    parser.add_argument("memory", help="memory directory (local or gs://)")
    parser.add_argument("--json", action="store_true", help="print the records (with full change details) as JSON")
    return parser


def format_table(records: Sequence[dict]) -> str:
    """Fixed-width text table of memory.store.versions.history records."""
    header = ("version", "parent", "kind", "time", "entries", "summary")
    rows = [(str(r["version"]), "-" if r["parent"] is None else str(r["parent"]), str(r["kind"]),
             str(r["at"] or ""), str(r["entries"]), str(r["summary"])) for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(  # noqa: E731
        (c.rjust(w) if i in (0, 1, 4) else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(header)] + [fmt(r) for r in rows]) + "\n"


def _run(argv: Sequence[str]) -> int:
    from memory.store.versions import history  # pylint: disable=g-import-not-at-top
    args = build_parser().parse_args(argv)
    records = history(args.memory.rstrip("/") or args.memory)
    if args.json:
        print(json.dumps(records, indent=2, sort_keys=True))
    else:
        print(format_table(records), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem history``; returns the exit status."""
    return run_command("vmem history", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
