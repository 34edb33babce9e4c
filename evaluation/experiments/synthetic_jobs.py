"""Generated data in an experiment workspace: what the studies on synthetic labelled embeddings share.

`workspace` writes an `evaluation.synthetic_data` memory pool and queries as a
`evaluation.experiments.workspace.Workspace`'s embedding folders and adopts them (`Workspace.adopt`), so every
memory of a study is built and searched by the workspace's jobs -- ``vmem build --embeddings`` and ``vmem
evaluate --embeddings`` with the runner flags -- as in every other experiment, under the encoder id
``synthetic-labelled-<dim>`` (memory and queries must agree on the dimension). A study is run by ``vmem
experiment NAME`` (`evaluation.experiments.registry.STUDIES`); `int_flags` and `ints` spell its flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence
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


def shards_for(rows: int) -> int:
    """Shards of a memory of ``rows`` entries: ceil(rows / `SHARD_ROWS`) brute-force shards, exact at every size."""
    return max(1, math.ceil(rows / SHARD_ROWS))


def generate(data_dir: str, spec: synthetic_data.LabelledSpec) -> float:
    """Writes ``spec`` to ``data_dir`` unless the same spec is already there; returns the seconds spent."""
    try:
        with open(os.path.join(data_dir, synthetic_data.DATASET_JSON), encoding="utf-8") as f:
            if json.load(f) == spec.to_dict():
                return 0.0
    except FileNotFoundError:
        pass
    return synthetic_data.write_dataset(data_dir, spec)


def workspace(work_dir: str, name: str, *, memory: synthetic_data.LabelledSpec,
              queries: synthetic_data.LabelledSpec, k_max: int, seed: int, runner_flags: Sequence[str] = ()):
    """A workspace ``WORK_DIR/NAME`` whose memory pool and queries are generated (kept when already there).

    Args:
      work_dir, name: Where (the workspace's ``--work-dir`` and data name).
      memory, queries: The generated memory pool and queries (same dimension).
      k_max, seed: The workspace setup's.
      runner_flags: Beam flags every job runs with.

    Returns:
      ``(Workspace, seconds spent generating)``.
    """
    # pylint: disable=g-import-not-at-top
    from evaluation.experiments.data import ExperimentData, Split
    from evaluation.experiments.workspace import Setup, Workspace
    # pylint: enable=g-import-not-at-top
    if memory.dim != queries.dim:
        raise ValueError(f"memory and queries must have one dimension, got {memory.dim} and {queries.dim}")
    root = os.path.abspath(os.path.join(work_dir, name))
    dirs = {split: os.path.join(root, "embeddings", split.value) for split in (Split.TRAIN, Split.TEST)}
    seconds = generate(dirs[Split.TRAIN], memory) + generate(dirs[Split.TEST], queries)
    data = ExperimentData(memory=clip_spec(dirs[Split.TRAIN]), queries=clip_spec(dirs[Split.TEST]),
                          encoder_id=encoder_id(memory.dim))
    ws = Workspace(work_dir, Setup(dataset=name, k_max=min(k_max, memory.rows), seed=seed, data=data,
                                   runner_flags=tuple(runner_flags)))
    ws.adopt({Split.TRAIN.value: memory.rows, Split.TEST.value: queries.rows}, encoder_id=encoder_id(memory.dim))
    return ws, seconds


def ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (an argparse type)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def int_flags(parser: argparse.ArgumentParser, setup_type: type, *, skip: Sequence[str] = ()) -> None:
    """One ``--field-name`` flag per field of a study's setup dataclass (ints, or tuples of ints), default its own."""
    defaults = setup_type()
    group = parser.add_argument_group(f"the study's setup ({setup_type.__name__})")
    for f in dataclasses.fields(setup_type):
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=value,
                           type=ints if isinstance(value, tuple) else int,
                           help=f"default {','.join(map(str, value)) if isinstance(value, tuple) else value}")


def setup_values(args: argparse.Namespace, setup_type: type) -> dict[str, Any]:
    """The parsed values of a setup's flags, by field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(setup_type) if hasattr(args, f.name)}
