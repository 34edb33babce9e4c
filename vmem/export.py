"""``vmem export``: write a memory's live entries (id, label, uri, embedding) as a clip-retrieval folder.

    vmem export --memory out/fmnist-memory --output out/fmnist-emb
    vmem build --embeddings 'clip:out/fmnist-emb,label_column=label' --encoder-id NAME --output out/copy

The folder (``img_emb/*.npy`` + ``metadata/*.parquet``) is the layout ``--embeddings clip:`` reads, so a
memory can be rebuilt, sharded differently or queried elsewhere without running the encoder again.

Exit status: 0 exported; 1 not a memory, or the folder cannot be written; 2 a bad flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from memory.store.integrity import NO_VERIFY_HELP
from vmem.args import RaisingArgumentParser, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> RaisingArgumentParser:
    """The ``vmem export`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem export", description="Write a memory's live entries (id, label, "
                                   "uri, embedding) as a clip-retrieval folder, the layout --embeddings clip: reads.")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    parser.add_argument("--output", required=True, help="destination folder (local or gs://)")
    parser.add_argument("--version", type=int, default=None, help="version to export (default: the latest)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    return parser


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from memory.store.export import export_embeddings  # pylint: disable=g-import-not-at-top
    start = time.monotonic()
    rows = export_embeddings(args.memory, args.output, version=args.version, verify=args.verify)
    print(f"exported {rows} entries to {args.output} (img_emb/ + metadata/) in {time.monotonic() - start:.1f}s; "
          f"build from them with --embeddings 'clip:{args.output},label_column=label'")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem export``; returns the exit status."""
    return run_command("vmem export", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
