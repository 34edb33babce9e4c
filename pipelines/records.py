"""Small typed records that flow between pipeline stages (never ad-hoc dicts)."""

from __future__ import annotations

import json
import typing

import numpy as np


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
    """What travels beside an image through RunInference (the key of the keyed model handler)."""
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


class EntryBlock(typing.NamedTuple):
    """A block of memory entries travelling as one element (row i of every array is entry i).

    Web-scale jobs move blocks of a few thousand rows instead of one element per entry: per-element overhead
    in Beam's Python SDK dominates at 1e8-1e9 entries, and a block pickles as a handful of numpy buffers.

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
