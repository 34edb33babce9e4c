"""``vmem``: the visual-memory command line.

    vmem prepare-data (fashion-mnist|mnist) --out DIR [--per-class N] [--test-per-class M] [--offset-per-class K]
    vmem build (--images SPEC | --embeddings SPEC --encoder-id NAME) --output MEMORY [--shards N]
               [--sharding hash|partition] [--embedding-dtype float32|bfloat16|int8] [--config FILE] [Beam flags...]
    vmem info MEMORY [--json] [--verify]
    vmem evaluate --memory MEMORY (--images SPEC | --embeddings SPEC --encoder-id NAME) --output DIR [--k-max 100]
                  [--route-probes P] [Beam flags...]
    vmem vote --neighbors FILE --output DIR [--k-max K]
    vmem classify --memory MEMORY IMAGE... [--rule rank] [--k 10] [--explain] [--html FILE]
    vmem add --memory MEMORY (--images SPEC | --embeddings SPEC --encoder-id NAME) [--delta-shard-size N] [Beam flags...]
    vmem prune --memory MEMORY (--mode hard --threshold T | --mode soft) [--k 100] [--counts-only] [Beam flags...]
    vmem history MEMORY [--json]
    vmem reindex --memory MEMORY [--if-needed] [--target-shard-size N] [Beam flags...]
    vmem forget --memory MEMORY (--ids FILE | --label NAME | --source-prefix URI) [--purge-history]
    vmem calibrate --evaluation EVAL_DIR [--rule rank] [--k 10] [--method isotonic|platt] [--score share]
    vmem export --memory MEMORY --output DIR
    vmem tune --memory MEMORY --queries (DIR | clip:DIR) [--rule rank] [--k 10] [--min-agreement 0.999] [--no-publish]
    vmem metadata --memory MEMORY (--table FILE [--id-column id] | --near-duplicates MAX_DISTANCE) [--replace]
    vmem experiment NAME --dataset fashion-mnist|mnist --output DIR [--work-dir W]   (NAME: see --help)

Heavy imports (TensorFlow, Beam) happen inside the command that needs them, so ``vmem info`` and
``vmem --help`` answer quickly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from vmem.args import EXIT_USAGE, UsageError

COMMANDS = {
    "prepare-data": "write a bundled dataset as ImageFolders of PNG files",
    "build": "build a visual memory from images or precomputed embeddings (Beam job)",
    "info": "describe a built memory",
    "evaluate": "classify a held-out split against a memory; accuracy per voting rule and k (Beam job)",
    "classify": "classify images, optionally explaining each decision by its neighbours",
    "add": "add labelled images or embeddings (new classes too) as delta shards of a new version (Beam job)",
    "prune": "reliability counts by leave-one-out self-query; hard (forget v >= T) or soft (1.75/(1+v)) (Beam job)",
    "history": "list a memory's versions and what changed in each",
    "reindex": "fold delta shards in and drop forgotten rows; rebuild only changed shards (Beam job)",
    "forget": "remove entries from a memory at once (exact unlearning; physically gone after reindex)",
    "vote": "recompute accuracy per voting rule and k from stored neighbour lists",
    "calibrate": "fit vote confidence -> P(right) on a held-out evaluation and store it in the memory",
    "export": "write a memory's embeddings, labels and uris as a clip-retrieval folder",
    "tune": "find the cheapest search setting whose votes agree with exact search; record it as the default",
    "metadata": "attach per-entry metadata columns (a table, or near-duplicate groups) for filters and crowding",
    "experiment": "reproduce one of the paper's findings on a bundled dataset (k-sweep, label-noise, ...)",
}


def _usage() -> str:
    lines = ["usage: vmem COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "Run 'vmem COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("visual_memory").setLevel(logging.INFO)


def cmd_prepare_data(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vmem prepare-data",
                                     description="Write a bundled dataset as DIR/train and DIR/test ImageFolders.")
    parser.add_argument("dataset", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--out", required=True, help="destination directory")
    parser.add_argument("--per-class", type=int, default=None,
                        help="training images per class (default: all; fashion-mnist has 6000, mnist about 5000)")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="test images per class (default: same as --per-class, all if unset; 0: no test split)")
    parser.add_argument("--offset-per-class", type=int, default=0,
                        help="skip the first K training images of every class before taking --per-class, e.g. to "
                             "write a calibration split disjoint from one prepared with --per-class <= K (default 0)")
    args = parser.parse_args(argv)
    from evaluation.datasets import prepare_dataset
    start = time.monotonic()
    splits = prepare_dataset(args.dataset, args.out, per_class=args.per_class, test_per_class=args.test_per_class,
                             offset_per_class=args.offset_per_class)
    for name, split in splits.items():
        print(f"{name}: {split.count} images in {len(split.per_class)} classes -> {split.root}")
    print(f"done in {time.monotonic() - start:.1f}s")
    return 0


def cmd_build(argv: Sequence[str]) -> int:
    from pipelines import build
    if any(a in ("-h", "--help") for a in argv):
        build.build_arg_parser().print_help()
        return 0
    args, _ = build.build_arg_parser().parse_known_args(argv)
    start = time.monotonic()
    build.run(argv)
    elapsed = time.monotonic() - start
    from memory.store.versions import read_manifest
    manifest = read_manifest(args.output)
    c = manifest.counts
    print(f"built {args.output}: {c.embedded} entries in {len(manifest.shards)} shards, {len(manifest.class_names)} "
          f"classes; read {c.read}, failed {c.failed}; {elapsed:.1f}s ({c.read / max(elapsed, 1e-9):.1f} entries/s)")
    if c.failed:
        print(f"failed records (with reasons): {args.output.rstrip('/')}/dead_letter/")
    return 0


def describe(manifest) -> str:
    enc = manifest.encoder
    lines = [
        f"entries      {manifest.counts.embedded}",
        f"classes      {len(manifest.class_names)}: {', '.join(manifest.class_names[:20])}"
        + (" ..." if len(manifest.class_names) > 20 else ""),
        f"encoder      {enc['name']} ({enc['content_hash'][:23]}...), dim {manifest.dim}, metric {manifest.metric.value}",
        f"built        {manifest.created_at}; read {manifest.counts.read}, failed {manifest.counts.failed}",
        f"storage      format {manifest.format_version}, embeddings stored as "
        f"{manifest.embedding_dtype.value} (inside each shard's index)",
        f"shards       {len(manifest.shards)}" + (
            "" if manifest.router is None else
            f", partition-routed: {manifest.router.count} router centroids, {manifest.router.probes} probes per query")
        + (", hash shards from one index template (searched as one index)"
           if manifest.router is None and manifest.build_config.get("index_template") else ""),
    ]
    if manifest.calibration is not None:
        from memory.decide.confidence import memory_calibration
        cal = memory_calibration(manifest)
        stale = (cal.fitted_on_version is not None and cal.fitted_on_version != manifest.version
                 and manifest.change.get("kind") != "calibrate")
        lines.append(f"calibration  {cal.describe()}" + (
            "; the memory changed since (re-run vmem calibrate)" if stale else ""))
    if manifest.search_defaults:
        from memory.search.setting import SearchSetting
        tuned = manifest.search_defaults.get("tuned") or {}
        lines.append(f"search       {SearchSetting.from_dict(manifest.search_defaults).describe()} (vmem tune: votes "
                     f"agree with exact search on {100 * tuned.get('agreement', 0):.2f}% of {tuned.get('queries')} "
                     f"queries, version {tuned.get('fitted_on_version')})")
    if manifest.metadata is not None:
        lines.append(f"metadata     columns {', '.join(manifest.metadata.columns)} for {manifest.metadata.count} entries "
                     "(--filter meta:COLUMN=v, --crowding C:meta:COLUMN)")
    for s in manifest.shards:
        lines.append(f"  {s.name}  {s.count:>9} entries  {s.index_kind:<11} {s.checksum[:19]}...")
    return "\n".join(lines)


def cmd_info(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vmem info", description="Describe a built memory.")
    parser.add_argument("memory", help="memory directory (local or gs://)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--verify", action="store_true", help="also check every shard's checksum")
    args = parser.parse_args(argv)
    from memory.store.versions import read_manifest
    manifest = read_manifest(args.memory)
    if args.verify:
        from memory.visual_memory import VisualMemory
        VisualMemory.open(args.memory, verify=True)
    print(manifest.to_json() if args.json else describe(manifest))
    if args.verify:
        print("verify       all shard checksums match")
    return 0


def cmd_evaluate(argv: Sequence[str]) -> int:
    from pipelines import evaluate
    if any(a in ("-h", "--help") for a in argv):
        evaluate.build_arg_parser().print_help()
        return 0
    args, _ = evaluate.build_arg_parser().parse_known_args(argv)
    start = time.monotonic()
    evaluate.run(argv)
    elapsed = time.monotonic() - start
    from evaluation.report import markdown_table, rerank_markdown
    from memory import storage
    report = json.loads(storage.read_text(storage.join(args.output, "report.json")))
    print(markdown_table(report, baselines=report.get("baselines") or {}), end="")
    rerank = (report.get("extra") or {}).get("rerank")
    if rerank and "queries" in rerank:
        print("\n" + rerank_markdown(rerank), end="")
    print(f"{report['queries']} queries ({report['failed']} failed) in {elapsed:.1f}s "
          f"({report['queries'] / max(elapsed, 1e-9):.1f} queries/s end to end); report in {args.output}/")
    return 0


def cmd_classify(argv: Sequence[str]) -> int:
    from vmem.classify import main as classify_main
    return classify_main(list(argv))


def cmd_history(argv: Sequence[str]) -> int:
    from vmem.history import main as history_main
    return history_main(list(argv))


def cmd_forget(argv: Sequence[str]) -> int:
    from vmem.forget import main as forget_main
    return forget_main(list(argv))


def cmd_add(argv: Sequence[str]) -> int:
    from pipelines.add import main as add_main
    return add_main(list(argv))


def cmd_prune(argv: Sequence[str]) -> int:
    from pipelines.prune import main as prune_main
    return prune_main(list(argv))


def cmd_reindex(argv: Sequence[str]) -> int:
    from pipelines.reindex import main as reindex_main
    return reindex_main(list(argv))  # Its own exit codes: 0 published, 10 nothing to do, 1 failure, 2 usage.


def cmd_vote(argv: Sequence[str]) -> int:
    from vmem.vote import main as vote_main
    return vote_main(list(argv))


def cmd_calibrate(argv: Sequence[str]) -> int:
    from vmem.calibrate import main as calibrate_main
    return calibrate_main(list(argv))


def cmd_export(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vmem export", description="Write a memory's live entries (id, label, "
                                     "uri, embedding) as a clip-retrieval folder, the layout --embeddings clip: reads.")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    parser.add_argument("--output", required=True, help="destination folder (local or gs://)")
    parser.add_argument("--version", type=int, default=None, help="version to export (default: the latest)")
    args = parser.parse_args(argv)
    from memory.store.export import export_embeddings
    start = time.monotonic()
    rows = export_embeddings(args.memory, args.output, version=args.version)
    print(f"exported {rows} entries to {args.output} (img_emb/ + metadata/) in {time.monotonic() - start:.1f}s; "
          f"build from them with --embeddings 'clip:{args.output},label_column=label'")
    return 0


def cmd_metadata(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vmem metadata", description="Attach per-entry metadata columns to a "
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
    args = parser.parse_args(argv)
    from memory.search.duplicates import near_duplicate_groups
    from memory.store.metadata import publish_metadata, read_table_file
    start = time.monotonic()
    if args.table:
        ids, columns = read_table_file(args.table, id_column=args.id_column)
    else:
        from memory.visual_memory import VisualMemory
        ids, groups = near_duplicate_groups(VisualMemory.open(args.memory), args.near_duplicates, k=args.k)
        columns = {args.column: groups}
        import numpy as np
        sizes = np.unique(groups, return_counts=True)[1]
        print(f"near-duplicate groups at distance <= {args.near_duplicates:g}: {sizes.size} groups over {ids.size} "
              f"entries; {int((sizes > 1).sum())} groups of 2+ hold {int(sizes[sizes > 1].sum())} entries; largest "
              f"{int(sizes.max()) if sizes.size else 0}")
    m = publish_metadata(args.memory, ids, columns, replace=args.replace)
    print(f"published version {m.version}: metadata columns {list(m.metadata.columns)} for {m.metadata.count} "
          f"entries ({time.monotonic() - start:.1f}s)")
    return 0


def cmd_tune(argv: Sequence[str]) -> int:
    from vmem.tune import main as tune_main
    return tune_main(list(argv))


def cmd_experiment(argv: Sequence[str]) -> int:
    from evaluation.experiments.cli import main as experiment_main
    return experiment_main(list(argv))


_HANDLERS = {"prepare-data": cmd_prepare_data, "build": cmd_build, "info": cmd_info, "evaluate": cmd_evaluate,
             "vote": cmd_vote, "classify": cmd_classify, "history": cmd_history, "forget": cmd_forget,
             "reindex": cmd_reindex, "add": cmd_add, "prune": cmd_prune, "calibrate": cmd_calibrate,
             "export": cmd_export, "metadata": cmd_metadata, "tune": cmd_tune,
             "experiment": cmd_experiment}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _HANDLERS:
        print(f"vmem: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}.\n\n{_usage()}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    _setup_logging()
    try:
        return _HANDLERS[command](rest)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        if os.environ.get("VMEM_DEBUG"):
            raise
        print(f"vmem {command}: error: {e}\n(set VMEM_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
