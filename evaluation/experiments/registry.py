"""Every paper experiment by name, what each needs of the data, and running several on one workspace."""

from __future__ import annotations

import enum
import importlib
import os
import time
from collections.abc import Sequence

__all__ = ["EXPERIMENTS", "NEEDS", "STUDIES", "Need", "check_needs", "run_experiments", "study_module"]

# Name -> module under evaluation.experiments, in the order `all` (and `make paper`) runs them.
EXPERIMENTS = {
    "k-sweep": "k_sweep",
    "label-noise": "label_noise",
    "memory-size": "memory_size",
    "new-classes": "new_classes",
    "unlearning": "unlearning",
    "pruning": "pruning",
    "abstain": "abstain",
}


# Name -> module: studies on generated labelled embeddings (evaluation.synthetic_data). Each makes its own data
# (a workspace per generated dataset, evaluation.experiments.synthetic_jobs), so it takes no data flags and is not
# part of `all`; its module has `NAME`, `SETUP` (the dataclass of its flags), `add_flags(parser)` and
# `run(work, out, setup, *, log, runner_flags)`.
STUDIES = {
    "label-noise-classes": "label_noise_classes",
    "synthetic-scale": "synthetic_scale",
}


def study_module(name: str):
    """The module of study ``name`` (a key of `STUDIES`); KeyError names the allowed ones."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; allowed: {', '.join(STUDIES)}")
    return importlib.import_module(f"evaluation.experiments.{STUDIES[name]}")


class Need(enum.Enum):
    """What an experiment needs that experiment data may not have, by the flag that gives it."""
    HOLD_OUT = "--hold-out"
    CALIBRATION = "--calibration"


# Experiments missing here need only a memory pool and queries.
NEEDS = {
    "new-classes": (Need.HOLD_OUT,),   # The classes added to a memory built without them.
    "unlearning": (Need.HOLD_OUT,),    # Its first class is the one forgotten.
    "abstain": (Need.HOLD_OUT, Need.CALIBRATION),  # Out-of-memory queries; a split to calibrate on.
}
_WHY = {Need.HOLD_OUT: "--hold-out CLASS[,CLASS...] (classes of --memory-data held out of its memory)",
        Need.CALIBRATION: "--calibration SPEC (labelled queries of the memory's classes, never in a memory)"}


def check_needs(names: Sequence[str], setup) -> None:
    """Refuses experiments whose needs the setup's data does not meet, before anything runs.

    Args:
      names: Keys of `EXPERIMENTS`.
      setup: The `evaluation.experiments.workspace.Setup` they would run with.

    Raises:
      ValueError: naming the experiment and the flag that gives what it needs.
    """
    has = {Need.HOLD_OUT: bool(setup.hold_out),
           Need.CALIBRATION: setup.data is None or setup.data.calibration is not None}
    for name in names:
        for need in NEEDS.get(name, ()):
            if not has[need]:
                raise ValueError(f"{name} needs {need.value}: pass {_WHY[need]}")


def run_experiments(names: Sequence[str], ws, output: str, *, nested: bool) -> dict[str, dict]:
    """Runs the named experiments on one workspace; ``nested`` puts each in ``output/NAME``.

    Args:
      names: Keys of `EXPERIMENTS`.
      ws: The `evaluation.experiments.workspace.Workspace` they share (embeddings, memories).
      output: Where each writes report.json, report.md and its plots.
      nested: One sub-directory per experiment.

    Returns:
      ``{name: results}`` (each experiment's results, also in its report.json).

    Raises:
      KeyError: naming an unknown experiment.
      ValueError: an experiment needs what the data lacks (`check_needs`), before any runs.
    """
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise KeyError(f"unknown experiment {unknown[0]!r}; allowed: {', '.join(EXPERIMENTS)}")
    check_needs(names, ws.setup)
    ws.prepare()  # Caps k_max at the memory pool of data given by specs before any experiment reads it.
    results = {}
    for name in names:
        module = importlib.import_module(f"evaluation.experiments.{EXPERIMENTS[name]}")
        out = os.path.join(output, name) if nested else output
        start = time.monotonic()
        results[name] = module.run(ws, out)
        print(f"{ws.setup.dataset} {name}: {time.monotonic() - start:.1f}s -> {out}/report.md", flush=True)
    return results
