"""``vmem build``: build a visual memory from images or precomputed embeddings (the Beam job of pipelines/build.py).

    vmem build --images data/fashion-mnist/train --output out/fmnist-memory --shards 4 --overwrite
    vmem build --embeddings 'clip:DIR,label_column=label' --encoder-id NAME --output MEMORY
    vmem build --images gs://BUCKET/imagenet/train --output gs://BUCKET/memories/in1k --shards 64 \\
        --runner=DataflowRunner ...                 (every flag and the Dataflow command: pipelines/build.py)

Runs the job, then prints what was built (entries, shards, classes, failed records, entries/s).

Exit status: 0 built; 1 the build failed (an unreadable source, an existing memory without --overwrite, a
failed job); 2 a bad flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from vmem.args import run_command

__all__ = ["main"]


def _run(argv: Sequence[str]) -> int:
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from pipelines import build  # pylint: disable=g-import-not-at-top
    args, _ = build.build_arg_parser().parse_known_args(argv)
    start = time.monotonic()
    build.run(argv)
    elapsed = time.monotonic() - start
    manifest = read_manifest(args.output)
    c = manifest.counts
    print(f"built {args.output}: {c.embedded} entries in {len(manifest.shards)} shards, {len(manifest.class_names)} "
          f"classes; read {c.read}, failed {c.failed}; {elapsed:.1f}s ({c.read / max(elapsed, 1e-9):.1f} entries/s)")
    if c.failed:
        print(f"failed records (with reasons): {args.output.rstrip('/')}/dead_letter/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem build``; returns the exit status."""
    return run_command("vmem build", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
