"""``vmem forget``: remove entries from a visual memory's answers, exactly and at once.

Examples::

    vmem forget --memory out/fmnist-memory --ids ids_to_forget.txt
    vmem forget --memory out/fmnist-memory --label Sandal
    vmem forget --memory gs://BUCKET/memories/in1k --source-prefix gs://BUCKET/imagenet/train/n01440764/ \\
        --purge-history

Publishes a new version whose tombstones hide the selected entries: from then on every search, vote and
explanation (``VisualMemory``, ``vmem classify``, ``vmem evaluate``) returns exactly what a memory built
without them would. No index is rebuilt, so this takes milliseconds to seconds, not a build.

What is physically deleted, and when: forgetting hides entries; their embeddings stay inside the shard
files (and older versions still show them) until ``vmem reindex`` rewrites the affected shards without them.
``--purge-history`` additionally deletes, right away, every older version that can still show a forgotten
entry (and files only those versions used; a tombstone file listing only ids the latest tombstones list too
is left for the hour-old leftover sweep of the next re-index, so jobs still reading it finish), and records that the next re-index must purge again, which is
when the old shard files holding the embeddings are deleted.

The ids file holds one id per line (blank lines ignored). Exit status: 0 on success; 1 when nothing can be
forgotten as asked (an unknown id, label or prefix, a missing or empty ids file, not a memory, another
writer publishing first), and when ``--purge-history`` fails after the forget was published (the message
names the published version first, then what failed); 2 on a bad flag. The message names the bad value.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from memory.store.integrity import NO_VERIFY_HELP
from vmem.args import RaisingArgumentParser, run_command

__all__ = ["build_parser", "main", "read_ids_file"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem forget`` argument parser."""
    parser = RaisingArgumentParser(
        prog="vmem forget",
        description="Forget entries of a visual memory (exact: searches behave as if they were never added).",
        epilog="Embeddings are physically deleted only after `vmem reindex` rewrote their shards (and the "
               "history was purged); until then they are hidden by tombstones.")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", metavar="FILE", help="file with one entry id per line (local or gs://)")
    which.add_argument("--label", metavar="NAME", help="forget every live entry of this class")
    which.add_argument("--source-prefix", metavar="URI", help="forget every live entry whose source uri starts "
                                                              "with URI")
    parser.add_argument("--expected-version", type=int, default=None,
                        help="refuse unless the memory is still at this version (default: the latest)")
    parser.add_argument("--purge-history", action="store_true",
                        help="also delete older versions that still show forgotten entries now, and have the "
                             "next `vmem reindex` purge the old shard files that hold their embeddings")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def read_ids_file(path: str) -> list[str]:
    """Ids from a text file, one per line; surrounding whitespace and blank lines are ignored.

    Raises:
      FileNotFoundError: naming the file, when it does not exist.
      ValueError: naming the file, when it is not UTF-8 text or holds no id.
    """
    from memory import storage
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--ids file {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--ids file {path!r} is not UTF-8 text ({e})") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"--ids file {path!r} holds no id (expected one id per line)")
    return ids


def _run(argv: Sequence[str]) -> int:
    from memory.store.mutations import forget
    from memory.store.purge import purge_history
    args = build_parser().parse_args(argv)
    root = args.memory.rstrip("/") or args.memory
    ids = read_ids_file(args.ids) if args.ids else None
    start = time.perf_counter()
    manifest = forget(root, ids=ids, label=args.label, source_prefix=args.source_prefix,
                      expected_version=args.expected_version, request_purge=args.purge_history, verify=args.verify)
    forget_s = time.perf_counter() - start
    change = manifest.change
    purged = []
    if args.purge_history:
        from memory.store.after_publish import after_publish  # pylint: disable=g-import-not-at-top
        with after_publish(root=root, version=manifest.version, step="purging the history (--purge-history)",
                           fix="The forgotten entries are hidden from every reader of the latest version; fix what "
                               "it names, then run `vmem reindex`, which finishes the purge this forget asked for."):
            purged = purge_history(root)
    elapsed = time.perf_counter() - start
    result = {"memory": root, "version": manifest.version, "parent": manifest.parent,
              "forgotten": change["forgotten"], "forgotten_total": change["forgotten_total"],
              "selection": change["selection"], "live_entries": manifest.total,
              "forget_seconds": round(forget_s, 4), "seconds": round(elapsed, 4), "purged_versions": purged}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    what = ", ".join(f"{k} {v!r}" if k != "ids" else f"{v} listed id(s)" for k, v in change["selection"].items())
    print(f"forgot {change['forgotten']} entries ({what}) in {root}: "
          f"version {manifest.version} (parent {manifest.parent}); {manifest.total} live entries, "
          f"{change['forgotten_total']} hidden by tombstones; {forget_s * 1000:.1f} ms")
    if args.purge_history:
        print(f"purged versions: {purged or 'none'}; the forgotten embeddings remain in the current shard files "
              "until `vmem reindex` (which then purges them)")
    else:
        print("their embeddings remain in the shard files until `vmem reindex`; older versions still show them "
              "(use --purge-history to delete those)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem forget``; returns the exit status."""
    return run_command("vmem forget", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
