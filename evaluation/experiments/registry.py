"""Every paper experiment by name, and running several on one workspace (``vmem experiment``, ``make paper``)."""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Sequence

__all__ = ["EXPERIMENTS", "run_experiments"]

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
    """
    results = {}
    for name in names:
        if name not in EXPERIMENTS:
            raise KeyError(f"unknown experiment {name!r}; allowed: {', '.join(EXPERIMENTS)}")
        module = importlib.import_module(f"evaluation.experiments.{EXPERIMENTS[name]}")
        out = os.path.join(output, name) if nested else output
        start = time.monotonic()
        results[name] = module.run(ws, out)
        print(f"{ws.setup.dataset} {name}: {time.monotonic() - start:.1f}s -> {out}/report.md", flush=True)
    return results
