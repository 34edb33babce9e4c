"""``vmem``: the visual-memory command line.

    vmem prepare-data (fashion-mnist|mnist) --out DIR [--per-class N] [--test-per-class M] [--offset-per-class K]
    vmem build (--images SPEC | --embeddings SPEC --encoder-id NAME) --output MEMORY [--shards N]
               [--sharding hash|partition] [--embedding-dtype float32|bfloat16|int8] [--config FILE] [Beam flags...]
    vmem info MEMORY [--json] [--verify]
    vmem evaluate --memory MEMORY (--images SPEC | --embeddings SPEC --encoder-id NAME) --output DIR [--k-max 100]
                  [--route-probes P] [Beam flags...]
    vmem vote --neighbors FILE --output DIR [--k-max K]
    vmem classify --memory MEMORY IMAGE... [--rule rank] [--k 10] [--explain] [--html FILE]
    vmem serve --memory MEMORY [--host 127.0.0.1] [--port 8080] [--workers N] [--write-token-file FILE]
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

Every command is a module ``vmem/<command>.py`` with ``main(argv) -> int``, listed once in `COMMANDS` and
imported only when it runs, so ``vmem --help`` and ``vmem info`` answer without importing TensorFlow or
Beam. Every command runs through `vmem.args.run_command`: exit status 0 on success, 1 on a runtime failure,
2 on a bad flag (the message names it); ``vmem reindex`` adds 10, nothing to do.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Optional, Sequence

from vmem.args import EXIT_OK, EXIT_USAGE


class Command(NamedTuple):
    """One ``vmem`` subcommand: the module whose ``main(argv) -> int`` runs it, and its one-line help."""
    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "prepare-data": Command("vmem.prepare_data", "write a bundled dataset as ImageFolders of PNG files"),
    "build": Command("vmem.build", "build a visual memory from images or precomputed embeddings (Beam job)"),
    "info": Command("vmem.info", "describe a built memory"),
    "evaluate": Command("vmem.evaluate", "classify a held-out split against a memory; accuracy per voting rule "
                                         "and k (Beam job)"),
    "classify": Command("vmem.classify", "classify images, optionally explaining each decision by its neighbours"),
    "serve": Command("vmem.serve", "classify over HTTP, with a page where a person excludes or down-weights a "
                                   "neighbour and applies it as a new version"),
    "add": Command("vmem.add", "add labelled images or embeddings (new classes too) as delta shards of a new "
                               "version (Beam job)"),
    "prune": Command("vmem.prune", "reliability counts by leave-one-out self-query; hard (forget v >= T) or soft "
                                   "(1.75/(1+v)) (Beam job)"),
    "history": Command("vmem.history", "list a memory's versions and what changed in each"),
    "reindex": Command("vmem.reindex", "fold delta shards in and drop forgotten rows; rebuild only changed shards "
                                       "(Beam job)"),
    "forget": Command("vmem.forget", "remove entries from a memory at once (exact unlearning; physically gone "
                                     "after reindex)"),
    "vote": Command("vmem.vote", "recompute accuracy per voting rule and k from stored neighbour lists"),
    "calibrate": Command("vmem.calibrate", "fit vote confidence -> P(right) on a held-out evaluation and store it "
                                           "in the memory"),
    "export": Command("vmem.export", "write a memory's embeddings, labels and uris as a clip-retrieval folder"),
    "tune": Command("vmem.tune", "find the cheapest search setting whose votes agree with exact search; record it "
                                 "as the default"),
    "metadata": Command("vmem.metadata", "attach per-entry metadata columns (a table, or near-duplicate groups) "
                                         "for filters and crowding"),
    "experiment": Command("vmem.experiment", "reproduce one of the paper's findings on a bundled dataset (k-sweep, "
                                             "label-noise, ...)"),
}


def usage() -> str:
    """``vmem --help``: every command and its one-line help."""
    lines = ["usage: vmem COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<13} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Run 'vmem COMMAND --help' for a command's options.",
              "Exit status: 0 ok, 1 runtime failure, 2 bad flag (vmem reindex: 10 nothing to do)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``vmem COMMAND [options]``; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vmem: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}.\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    return importlib.import_module(COMMANDS[name].module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
