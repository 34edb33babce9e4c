"""The real jobs on generated data: ``vmem build --embeddings`` and ``vmem evaluate --embeddings`` over
`evaluation.synthetic_data` folders, timed, for the studies that run on synthetic labelled embeddings.

Every memory is built by `pipelines.build.build_memory` and searched by `pipelines.evaluate.evaluate_memory`
(the functions behind ``vmem build`` / ``vmem evaluate``) from ``clip:DIR,label_column=label``, with the
encoder id ``synthetic-labelled-<dim>`` so that memory and queries must agree on the dimension.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from evaluation import synthetic_data

ENCODER_ID = "synthetic-labelled"
# Entries per shard, under ScaNN's tree threshold (50,000): every shard is brute force, so every search is
# exact and two memories of the same rows return the same neighbours (what unlearning's check needs).
SHARD_ROWS = 40_000


def clip_spec(data_dir: str) -> str:
    """The ``--embeddings`` spec of a generated folder."""
    return f"clip:{data_dir},label_column=label"


def encoder_id(dim: int) -> str:
    return f"{ENCODER_ID}-{dim}"


def generate(data_dir: str, spec: synthetic_data.LabelledSpec) -> float:
    """Writes ``spec`` to ``data_dir`` unless the same spec is already there; returns the seconds spent."""
    try:
        with open(os.path.join(data_dir, synthetic_data.DATASET_JSON), encoding="utf-8") as f:
            if json.load(f) == spec.to_dict():
                return 0.0
    except FileNotFoundError:
        pass
    return synthetic_data.write_dataset(data_dir, spec)


def build(data_dir: str, output: str, *, dim: int, rows: int) -> tuple[int, float]:
    """``vmem build --embeddings clip:DATA_DIR`` into ``output`` (replaced); returns (shards, seconds).

    The memory gets ceil(rows / `SHARD_ROWS`) brute-force shards: exact search at every size.
    """
    from configs.build import load_config  # pylint: disable=g-import-not-at-top
    from pipelines.build import build_memory  # pylint: disable=g-import-not-at-top
    from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
    config = load_config(None).replace(num_shards=max(1, math.ceil(rows / SHARD_ROWS)))
    start = time.perf_counter()
    build_memory(source=parse_embeddings_spec(clip_spec(data_dir)), output=output, config=config,
                 encoder_id=encoder_id(dim), overwrite=True)
    return config.num_shards, time.perf_counter() - start


def evaluate(memory: str, queries_dir: str, output: str, *, dim: int, k_max: int) -> tuple[dict[str, Any], float]:
    """``vmem evaluate --embeddings clip:QUERIES_DIR`` into ``output``; returns (report.json, seconds)."""
    from evaluation.vote_report import write_evaluation_report  # pylint: disable=g-import-not-at-top
    from pipelines.evaluate import evaluate_memory  # pylint: disable=g-import-not-at-top
    from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
    shutil.rmtree(output, ignore_errors=True)  # Stale neighbour shards of an earlier run would be read too.
    start = time.perf_counter()
    evaluate_memory(memory=memory, source=parse_embeddings_spec(clip_spec(queries_dir)), output=output,
                    encoder_id=encoder_id(dim), k_max=k_max)
    report = write_evaluation_report(output)
    return report, time.perf_counter() - start


def study_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A study's command line: ``--work`` and ``--out``; the study adds its setup's flags."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--work", required=True, help="Scratch directory for the data, memories and evaluations.")
    p.add_argument("--out", required=True, help="Where report.json, report.md and the figures go.")
    return p


def run_study(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, make_setup: Callable[..., Any],
              run: Callable[..., Any], name: str) -> int:
    """Parses ``argv``, builds the setup from every flag but --work/--out (its ValueError is a flag error, exit 2),
    runs the study with progress on stderr and prints its wall time; returns 0."""
    args = vars(parser.parse_args(argv))
    work, out = args.pop("work"), args.pop("out")
    try:
        setup = make_setup(**args)
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    run(work, out, setup, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{name}: report in {out} after {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
