"""A third kind of re-ranker for tests, written as `memory.rerank` asks a re-ranker module to be.

``last:NAME`` answers the last distinct candidate label it is offered (often not the vote's). `KIND` is its
registration; `registered` adds it to `memory.rerank.RERANKERS` for one test.
"""

from __future__ import annotations

from typing import Any

import pytest

from memory import rerank as registry
from memory.rerank import RerankerKind, RerankFlags
from memory.rerank.base import RerankOutcome, RerankReason, RerankRequest

KIND = RerankerKind("last", __name__, usage="last:NAME", example="last:x",
                    help="last:NAME (answers the last candidate label)")


class LastLabelReranker:
    """Answers the last distinct candidate label; counts one call per query."""

    def __init__(self, name: str, *, rate_limit: float | None = None):
        self.name = f"last:{name}"
        self.rate_limit = rate_limit

    def rerank(self, request: RerankRequest) -> RerankOutcome:
        return RerankOutcome(request.labels[-1], RerankReason.ANSWERED, calls=1)


def make_reranker(name: str, **options: Any) -> LastLabelReranker:
    return LastLabelReranker(name, **options)


def spec_options(flags: RerankFlags) -> dict[str, Any]:
    return {"rate_limit": flags.rate_limit}


def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers `KIND` until the test ends (on a copy of the registry)."""
    monkeypatch.setattr(registry, "RERANKERS", dict(registry.RERANKERS))
    registry.register(KIND)
