"""``vmem history``: the versions of a living memory, oldest first.

Examples::

    vmem history out/fmnist-memory
    vmem history gs://BUCKET/memories/in1k --json

One row per existing version: version, parent, change kind (build, add, forget, prune, reindex, purge),
UTC time, live entries after the change, and its summary. Versions deleted by a purge are absent; the
purge's own row lists them (``--json`` shows every change's full details). Nothing here imports Beam.

Exit status: 0 on success, 2 when MEMORY is not a visual memory (the message names the path).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vmem.args import EXIT_USAGE, RaisingArgumentParser, UsageError

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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem history``; returns the exit status (0 ok, 2 usage or input error)."""
    from memory.store.manifest import ManifestError
    from memory.store.versions import history
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if any(a in ("-h", "--help") for a in argv):
            build_parser().print_help()
            return 0
        args = build_parser().parse_args(argv)
        records = history(args.memory.rstrip("/") or args.memory)
    except (UsageError, ManifestError, FileNotFoundError) as e:
        print(f"vmem history: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(records, indent=2, sort_keys=True))
    else:
        print(format_table(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
