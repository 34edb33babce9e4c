"""EntryBlock: rows of memory entries as one value, what the jobs move and what `memory.store.export` writes."""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np

__all__ = ["EntryBlock"]


class EntryBlock(typing.NamedTuple):
    """A block of memory entries travelling as one element (row i of every array is entry i).

    Web-scale jobs move blocks of a few thousand rows instead of one element per entry: per-element overhead
    in Beam's Python SDK dominates at 1e8-1e9 entries, and a block pickles as a handful of numpy buffers.
    `memory.store.export` reads and writes whole clip-retrieval folders as blocks too.

    Attributes:
      ids: unicode [n] entry ids.
      labels: unicode [n] class names.
      uris: unicode [n] source URIs (absolute).
      embeddings: float32 [n, d] unit rows.
    """
    ids: np.ndarray
    labels: np.ndarray
    uris: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, rows: np.ndarray | Sequence[int]) -> EntryBlock:
        """The given rows (a boolean mask or indices), in that order."""
        rows = np.asarray(rows)
        return EntryBlock(*(getattr(self, f)[rows] for f in EntryBlock._fields))

    def with_labels(self, labels: np.ndarray | Sequence[str]) -> EntryBlock:
        """The same rows under other class names (e.g. randomised labels): no re-embedding."""
        labels = np.asarray(labels, dtype=str)
        if labels.shape != self.ids.shape:
            raise ValueError(f"labels shape {labels.shape} != {self.ids.shape}: one label per row")
        # Not _replace: it checks len(), which here counts rows, not fields.
        return EntryBlock(self.ids, labels, self.uris, self.embeddings)
