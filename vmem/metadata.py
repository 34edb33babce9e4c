"""``vmem metadata``: attach per-entry metadata columns to a memory as a new version.

    vmem metadata --memory out/fmnist-memory --table sources.csv --id-column id
    vmem metadata --memory out/fmnist-memory --near-duplicates 0.02 --column near_dup

A table (.parquet, .csv or .jsonl) adds its columns by entry id; ``--near-duplicates D`` computes one group
per entry with the memory's own search (entries within cosine distance D, joined transitively). The columns
are what ``--filter meta:COLUMN=...`` and ``--crowding C:meta:COLUMN`` select on (``vmem classify``,
``vmem evaluate``).

Exit status: 0 published; 1 not a memory, an unreadable table or ids the memory does not hold; 2 a bad flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from memory.store.integrity import NO_VERIFY_HELP
from vmem.args import RaisingArgumentParser, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> RaisingArgumentParser:
    """The ``vmem metadata`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem metadata", description="Attach per-entry metadata columns to a "
                                   "memory as a new version: what --filter meta:COLUMN=... and --crowding C:meta:"
                                   "COLUMN select on.")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", help="a .parquet, .csv or .jsonl file with an id column and one column per field")
    source.add_argument("--near-duplicates", type=float, metavar="MAX_DISTANCE",
                        help="compute a near-duplicate group per entry with the memory's own search (entries within "
                             "this cosine distance, joined transitively) as column --column")
    parser.add_argument("--id-column", default="id", help="the table's entry-id column (default id)")
    parser.add_argument("--column", default="near_dup", help="column name for --near-duplicates (default near_dup)")
    parser.add_argument("--k", type=int, default=10, help="--near-duplicates: neighbours looked at per entry")
    parser.add_argument("--replace", action="store_true", help="drop the existing table instead of merging into it")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    return parser


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from memory.search.duplicates import near_duplicate_groups  # pylint: disable=g-import-not-at-top
    from memory.store.metadata import publish_metadata, read_table_file  # pylint: disable=g-import-not-at-top
    start = time.monotonic()
    if args.table:
        ids, columns = read_table_file(args.table, id_column=args.id_column)
    else:
        import numpy as np  # pylint: disable=g-import-not-at-top

        from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
        ids, groups = near_duplicate_groups(VisualMemory.open(args.memory, verify=args.verify), args.near_duplicates, k=args.k)
        columns = {args.column: groups}
        sizes = np.unique(groups, return_counts=True)[1]
        print(f"near-duplicate groups at distance <= {args.near_duplicates:g}: {sizes.size} groups over {ids.size} "
              f"entries; {int((sizes > 1).sum())} groups of 2+ hold {int(sizes[sizes > 1].sum())} entries; largest "
              f"{int(sizes.max()) if sizes.size else 0}")
    m = publish_metadata(args.memory, ids, columns, replace=args.replace, verify=args.verify)
    print(f"published version {m.version}: metadata columns {list(m.metadata.columns)} for {m.metadata.count} "
          f"entries ({time.monotonic() - start:.1f}s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem metadata``; returns the exit status."""
    return run_command("vmem metadata", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
