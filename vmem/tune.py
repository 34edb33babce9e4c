"""``vmem tune``: find the cheapest search setting whose votes agree with exact search, and record it.

    vmem tune --memory out/fmnist-tree --queries data/fashion-mnist/test            # images: CLASS/IMAGE files
    vmem tune --memory M --queries clip:EMB_DIR,label_column=label --min-agreement 0.999 --no-publish

Queries are a labelled held-out split: an ImageFolder (embedded with the memory's own encoder) or a
clip-retrieval folder of precomputed embeddings (``vmem export`` writes one). Every setting of the grid
(memory.search.tuning.candidate_settings) is timed and compared with exact (brute-force) search; the fastest whose
votes agree on >= --min-agreement of the queries and whose accuracy is within --max-accuracy-drop points is
published as the memory's default search setting (a new version, change kind ``tune``), which
``VisualMemory.open`` and ``vmem evaluate`` then use. The table also shows the fastest setting reaching
recall@k >= --min-recall, for comparison. Nothing here imports Beam.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from memory.store.integrity import NO_VERIFY_HELP
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "load_queries", "main"]

_CHUNK = 256


def build_parser() -> RaisingArgumentParser:
    p = RaisingArgumentParser(prog="vmem tune", description=__doc__.split("\n")[0])
    p.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    p.add_argument("--queries", required=True,
                   help="held-out labelled split: an ImageFolder DIR (CLASS/IMAGE) or clip:DIR[,label_column=label]")
    p.add_argument("--rule", default="rank", help="the vote whose decisions must agree (default rank)")
    p.add_argument("--k", type=int, default=10, help="k of that vote (default 10)")
    p.add_argument("--min-agreement", type=float, default=0.999, help="share of votes equal to exact search's")
    p.add_argument("--max-accuracy-drop", type=float, default=0.1, help="accuracy points it may lose (default 0.1)")
    p.add_argument("--min-recall", type=float, default=0.95, help="recall@k of the comparison setting")
    p.add_argument("--max-queries", type=int, default=2000, help="queries used, evenly spread (default 2000)")
    p.add_argument("--no-publish", action="store_true", help="measure and print only")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    p.add_argument("--report", default=None, metavar="FILE.json", help="also write every trial as JSON")
    return p


def load_queries(memory, spec: str, max_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n, dim], label indices [n]; -1 for classes the memory lacks) of at most max_queries."""
    if spec.startswith("clip:"):
        from memory.store.export import read_clip_folder  # pylint: disable=g-import-not-at-top
        location, _, opts = spec[len("clip:"):].partition(",")
        column = opts.partition("=")[2] if opts.startswith("label_column=") else "label"
        block = read_clip_folder(location, label_column=column)
        take = np.linspace(0, len(block) - 1, min(max_queries, len(block))).round().astype(int)
        names, emb = block.labels[take].tolist(), block.embeddings[take]
    else:
        from memory.storage import list_image_folder  # pylint: disable=g-import-not-at-top
        try:
            paths, names = list_image_folder(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--queries: {e} (or pass clip:DIR)") from None
        take = np.linspace(0, len(paths) - 1, min(max_queries, len(paths))).round().astype(int)
        paths, names = [paths[i] for i in take], [names[i] for i in take]
        parts, start = [], time.monotonic()
        for s in range(0, len(paths), _CHUNK):
            parts.append(memory.embed_images(paths[s:s + _CHUNK]))
            print(f"embedded {min(s + _CHUNK, len(paths))}/{len(paths)} queries "
                  f"({(s + len(parts[-1])) / max(time.monotonic() - start, 1e-9):.1f} img/s)", file=sys.stderr)
        emb = np.concatenate(parts)
    index = {c: i for i, c in enumerate(memory.class_names)}
    return np.asarray(emb, np.float32), np.asarray([index.get(n, -1) for n in names], dtype=np.int64)


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("min_agreement", "min_recall"):
        if not 0.0 < getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    from evaluation.report import tune_markdown  # pylint: disable=g-import-not-at-top
    from memory.store.manifest import ManifestError  # pylint: disable=g-import-not-at-top
    from memory.search.tuning import publish_search_defaults, tune  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    try:
        memory = VisualMemory.open(args.memory, search_defaults=False, verify=args.verify)
    except ManifestError as e:
        raise ManifestError(f"--memory {args.memory!r}: {e}") from None
    from memory.search.tuning import candidate_settings  # pylint: disable=g-import-not-at-top
    if not candidate_settings(memory, args.k):
        print(f"{args.memory}: every shard is brute force and the memory is not routed: search is already exact, "
              "nothing to tune")
        return 0
    queries, labels = load_queries(memory, args.queries, args.max_queries)
    start = time.monotonic()
    result = tune(memory, queries, labels, rule=args.rule, k=args.k, min_agreement=args.min_agreement,
                  max_accuracy_drop=args.max_accuracy_drop, min_recall=args.min_recall)
    result["seconds"] = time.monotonic() - start
    print(tune_markdown(result))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    if result["chosen"] is None:
        print("no setting met the criteria: nothing published (the build's setting stays the default)")
    elif not args.no_publish:
        m = publish_search_defaults(args.memory, result, expected_version=memory.version)
        print(f"published version {m.version}: {m.change['summary']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem tune``; returns the exit status (0 ok, 1 runtime failure, 2 bad flag)."""
    return run_command("vmem tune", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
