"""Small typed records that flow between pipeline stages (never ad-hoc dicts), and the records the evaluate job
writes for its readers: `NeighborRecord` (one line of ``neighbors-*.jsonl``) and `EvaluationSummary`.

No Beam import: ``vmem vote`` and ``vmem calibrate`` read these files without starting Beam.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

import numpy as np
import orjson

# Blocks of entries are a memory/ type (memory.store.export writes them too); the jobs import them from here.
from memory.store.blocks import EntryBlock  # noqa: F401  (re-exported)


class ImageRecord(typing.NamedTuple):
    """One source image as read: its stable id, where it came from, its class name and encoded bytes."""
    id: str
    uri: str
    label: str
    data: bytes


class DecodedImage(typing.NamedTuple):
    """An image decoded and preprocessed to the encoder's input (float32 [S,S,3])."""
    id: str
    uri: str
    label: str
    pixels: np.ndarray


class EntryMeta(typing.NamedTuple):
    """What travels beside an image through the embed stage (the key of the keyed model handler)."""
    id: str
    uri: str
    label: str


class EmbeddedImage(typing.NamedTuple):
    """A memory entry: unit-length embedding with id, class name and source uri."""
    id: str
    uri: str
    label: str
    embedding: np.ndarray


class Stage:
    """Names of the stages that can reject a record (the dead-letter ``stage`` field)."""
    READ = "read"
    DECODE = "decode"
    EMBED = "embed"


class FailedRecord(typing.NamedTuple):
    """A record the job could not use, with the reason; written to the dead-letter output."""
    id: str
    uri: str
    stage: str
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps(self._asdict(), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "FailedRecord":
        return cls(**json.loads(line))




# The neighbour-list JSONL schema (one object per query); evaluation.neighbors_io also reads the paper's.
NEIGHBOR_FIELDS = ("query_id", "true_label", "neighbor_ids", "neighbor_labels", "neighbor_distances")
NEIGHBOR_WEIGHTS_FIELD = "neighbor_entry_weights"


@dataclasses.dataclass(frozen=True)
class NeighborRecord:
    """The retrieved neighbours of one query: one line of the evaluate job's ``neighbors-*.jsonl``.

    Attributes:
        query_id: Identifier of the query image.
        true_label: Ground-truth label index of the query in the memory's class names (-1: a class the
            memory does not know).
        neighbor_ids: Memory entry ids, nearest first.
        neighbor_labels: Labels of the neighbours.
        neighbor_distances: Cosine distances ``1 - cos``, non-decreasing.
        neighbor_weights: Optional per-neighbour entry weights (e.g. soft-pruning
            gamma); stored as ``neighbor_entry_weights`` on disk.
    """

    query_id: str
    true_label: int
    neighbor_ids: list[str]
    neighbor_labels: list[int]
    neighbor_distances: list[float]
    neighbor_weights: list[float] | None = None

    def __post_init__(self):
        n = len(self.neighbor_ids)
        lengths = {
            "neighbor_ids": n,
            "neighbor_labels": len(self.neighbor_labels),
            "neighbor_distances": len(self.neighbor_distances),
        }
        if self.neighbor_weights is not None:
            lengths["neighbor_weights"] = len(self.neighbor_weights)
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"query {self.query_id!r}: neighbour lists differ in length: "
                f"{lengths}")

    def to_json(self) -> dict[str, Any]:
        """Returns the record in the JSONL schema."""
        out = {
            "query_id": self.query_id,
            "true_label": self.true_label,
            "neighbor_ids": list(self.neighbor_ids),
            "neighbor_labels": list(self.neighbor_labels),
            "neighbor_distances": list(self.neighbor_distances),
        }
        if self.neighbor_weights is not None:
            out[NEIGHBOR_WEIGHTS_FIELD] = list(self.neighbor_weights)
        return out

    def to_json_line(self) -> str:
        """The record as one line of JSON (no newline), as the evaluate job and `write_records` write it.

        orjson: ~9x faster than the json module on 100-neighbour records (the evaluate job writes one per
        query), and parsed back to the same values.

        Raises:
            ValueError: a distance or weight is NaN or infinite (not JSON; padding never goes to disk).
        """
        for field, values in (("neighbor_distances", self.neighbor_distances),
                              (NEIGHBOR_WEIGHTS_FIELD, self.neighbor_weights or ())):
            if not all(map(math.isfinite, values)):
                bad = next(v for v in values if not math.isfinite(v))
                raise ValueError(f"query {self.query_id!r}: {field} holds {bad!r}; NaN and infinities are not JSON")
        return orjson.dumps(self.to_json()).decode()


@dataclasses.dataclass(frozen=True)
class EvaluationSummary:
    """What the evaluate job counted and wrote besides its neighbour lists: ``OUTPUT/evaluation-summary.json``.

    Written once, by the job's last step, after every check passed (the queries' encoder is the memory's, every
    record read was answered or failed). ``vmem evaluate`` then votes the listed neighbour files and writes the
    report from them and this summary (`evaluation.vote_report.write_evaluation_report`).

    Attributes:
      extra: What the report records about the run, in report order: command, memory, pinned version, query
        source, encoder, k_max, routing, search setting, filters, crowding and re-ranking.
      memory: The memory's root.
      memory_version: The version searched.
      memory_entries: Its live entries.
      entry_weights: ``{"kind", "count", "params"}`` of a soft-pruned version's entry weights, else None.
      k_max: Neighbours retrieved (and voted over) per query.
      softmax_tau: Softmax voting temperature.
      rank_alpha: Rank voting offset.
      queries: Distinct query ids answered.
      failed: Records that failed (see ``dead_letter/``).
      records_read: Records read from the query source.
      neighbor_files: The neighbour files this run wrote, sorted.
      unknown_labels: Query class names the memory does not know, sorted (their queries count as wrong).
      rerank: The re-rank stage's summary (memory.rerank.base.RerankTally.to_dict), or None without re-ranking.
      pixel_baseline: K of the raw-pixel kNN baseline, or None.
      pixel_queries: With a pixel baseline, ``(query id, uri, label index)`` of every query, sorted; else ().
    """
    extra: dict[str, Any]
    memory: str
    memory_version: int
    memory_entries: int
    entry_weights: dict[str, Any] | None
    k_max: int
    softmax_tau: float
    rank_alpha: float
    queries: int
    failed: int
    records_read: int
    neighbor_files: tuple[str, ...]
    unknown_labels: tuple[str, ...]
    rerank: dict[str, Any] | None = None
    pixel_baseline: int | None = None
    pixel_queries: tuple[tuple[str, str, int], ...] = ()

    FILE_NAME: typing.ClassVar[str] = "evaluation-summary.json"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EvaluationSummary":
        d = json.loads(text)
        return cls(**dict(d, neighbor_files=tuple(d["neighbor_files"]), unknown_labels=tuple(d["unknown_labels"]),
                          pixel_queries=tuple((str(q), str(u), int(c)) for q, u, c in d["pixel_queries"])))
