"""The typed bodies of the HTTP API: what FastAPI validates and what the OpenAPI schema shows."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from memory.decide.explain import Prediction

__all__ = ["ApplyRequest", "ApplyResponse", "ClassifyResponse", "EmbeddingQuery", "ErrorResponse", "NeighborOut",
           "RevoteRequest", "RevoteResponse", "UndoRequest", "WeightChange", "prediction_out"]

# A note is one line a person typed; bounded so a version's change record stays small.
MAX_NOTE_CHARS = 500
# Changes per apply or re-vote: a page's worth of neighbours, with room; bounds the recorded change.
MAX_CHANGES = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(_Strict):
    """Every error: a machine-readable kind, the reason in words, the option at fault (if one is)."""
    error: str
    reason: str
    option: str | None = None
    request_id: str = ""


class EmbeddingQuery(_Strict):
    """``POST /v1/classify`` with ``Content-Type: application/json``: a query embedded by the memory's encoder."""
    embedding: list[float] = Field(description="the query's embedding (the memory's dim); scaled to unit length")

    @field_validator("embedding")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not v or not all(math.isfinite(x) for x in v):
            raise ValueError("embedding must be a non-empty list of finite numbers")
        return v


class WeightChange(_Strict):
    """A person's change of one entry's vote: weight 0 excludes it from the vote, a weight below its current one
    down-weights it; 1.0 is an entry without a weight."""
    id: str = Field(min_length=1, max_length=4096)
    weight: float = Field(ge=0.0, le=1e6)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be a finite number >= 0")
        return v


class RevoteRequest(_Strict):
    """``POST /v1/revote``: the query's embedding (from a classify answer) and the changes to try."""
    embedding: list[float]
    changes: list[WeightChange] = Field(default_factory=list, max_length=MAX_CHANGES)

    _finite = field_validator("embedding")(EmbeddingQuery._finite.__func__)  # pylint: disable=protected-access


class ApplyRequest(_Strict):
    """``POST /v1/apply``: publish the changes as the next version's entry weights, with the person's note."""
    changes: list[WeightChange] = Field(min_length=1, max_length=MAX_CHANGES)
    note: str = Field(default="", max_length=MAX_NOTE_CHARS)
    version: int | None = Field(default=None, ge=1, description="the version the person looked at (informative)")

    @field_validator("note")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("note must be one line of printable text")
        return v.strip()


class UndoRequest(_Strict):
    """``POST /v1/undo``: restore the entry weights a version applied from the page replaced."""
    version: int = Field(ge=1)
    note: str = Field(default="", max_length=MAX_NOTE_CHARS)

    _one_line = field_validator("note")(ApplyRequest._one_line.__func__)  # pylint: disable=protected-access


class ApplyResponse(_Strict):
    version: int
    parent: int
    summary: str


class NeighborOut(_Strict):
    """One voting neighbour: rank, id, label, similarity (1 - cosine distance), the weight it voted with (the
    rule's weight times its entry weight), its entry weight, and where its thumbnail is served."""
    rank: int
    id: str
    label: int
    label_name: str
    similarity: float
    distance: float
    weight: float
    entry_weight: float
    thumbnail_url: str


class ClassifyResponse(_Strict):
    """A decision and the neighbours behind it (``memory.decide.explain.Prediction``)."""
    version: int
    label: int
    label_name: str | None
    vote_label_name: str | None
    confidence: float | None
    calibrated: bool
    abstained: bool
    abstain_reason: str | None
    reason: str
    rule: str
    k: int
    scores: dict[str, float]
    neighbors: list[NeighborOut]
    rerank_reason: str = ""
    embedding: list[float] | None = None


class RevoteResponse(_Strict):
    """The decision before (the version's weights) and after (with the changes), on the same neighbours."""
    version: int
    before: ClassifyResponse
    after: ClassifyResponse


def _thumbnail_url(entry_id: str) -> str:
    from urllib.parse import quote  # pylint: disable=g-import-not-at-top
    return "/v1/thumbnail?id=" + quote(entry_id, safe="")


def prediction_out(p: Prediction, *, version: int, entry_weights: dict[str, float],
                   embedding: Any = None) -> ClassifyResponse:
    """The response body of one `Prediction` of ``version`` (its entry weights ``{id: weight}``)."""
    return ClassifyResponse(
        version=version, label=p.label, label_name=p.label_name, vote_label_name=p.vote_label_name,
        confidence=p.confidence, calibrated=p.calibrated, abstained=p.abstained,
        abstain_reason=None if p.abstain_reason is None else p.abstain_reason.value, reason=p.reason,
        rule=p.rule.value, k=p.k, scores=dict(p.scores), rerank_reason=str(p.rerank_reason or ""),
        neighbors=[NeighborOut(rank=i, id=n.id, label=n.label, label_name=n.label_name,
                               similarity=1.0 - float(n.distance), distance=float(n.distance), weight=float(n.weight),
                               entry_weight=float(entry_weights.get(n.id, 1.0)), thumbnail_url=_thumbnail_url(n.id))
                   for i, n in enumerate(p.neighbors)],
        embedding=None if embedding is None else [float(x) for x in embedding])
