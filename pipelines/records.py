"""Small typed records that flow between pipeline stages (never ad-hoc dicts)."""

from __future__ import annotations

import json
import typing

import numpy as np

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


