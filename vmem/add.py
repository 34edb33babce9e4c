"""``vmem add``: add labelled images or embeddings (new classes too) as delta shards of a new version (the Beam
job of pipelines/add/).

    vmem add --memory out/fmnist-memory --images data/new-images
    vmem add --memory out/laion-memory --embeddings 'clip:data/new-emb,label_column=label' --encoder-id NAME
    vmem add --memory gs://BUCKET/memories/in1k --images gs://BUCKET/new-classes --runner=DataflowRunner ...

Runs the job, then prints what was added (entries, delta shards, the new version, new classes, failed
records).

Exit status: 0 published; 1 nothing could be added (every record failed or was already in the memory),
another encoder, another writer published meanwhile (nothing was published: re-run), not a memory; 2 a
bad flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from vmem.args import run_command

__all__ = ["main"]


def _run(argv: Sequence[str]) -> int:
    from pipelines import add  # pylint: disable=g-import-not-at-top
    add.build_arg_parser().parse_known_args(argv)  # --help, and a bad flag before the memory is read.
    start = time.monotonic()
    _, plan = add.launch(argv)
    manifest = add.published_add(plan)  # n+1, or later when the add re-based after losing a race.
    if manifest is None:
        raise RuntimeError(f"the add job {plan.job_id} finished but no version of {plan.root} records it; "
                           "see the job's log")
    elapsed = time.monotonic() - start
    change = manifest.change
    c = change.get("counts", {})
    deltas = [s for s in manifest.delta_shards if s.path.startswith(f"deltas/{plan.version_tag}/")]
    new = change.get("new_classes") or []
    print(f"added {change['added']} entries to {plan.root} in {len(deltas)} delta shard(s): version "
          f"{manifest.version} (parent {manifest.parent}); {manifest.total} live entries, "
          f"{len(manifest.class_names)} classes")
    print(f"new classes  {len(new)}: {', '.join(new) if new else '(none)'}")
    print(f"read {c.get('read')}, added {c.get('added')}, failed {c.get('failed')}; {elapsed:.1f}s "
          f"({c.get('read', 0) / max(elapsed, 1e-9):.1f} entries/s)")
    print(f"failed records (with reasons): {plan.dead_letter_dir}/" if c.get("failed") else
          f"no failed records (dead letters: {plan.dead_letter_dir}/)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem add``; returns the exit status."""
    return run_command("vmem add", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
