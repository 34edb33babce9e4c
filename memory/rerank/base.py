"""Re-ranking a low-margin vote by a second opinion: the request, the cost gate, strict parsing, the cache.

The paper's largest gain comes from showing a VLM the query and its labelled neighbours and letting it pick
the label. A call costs money and seconds, so only queries the vote is unsure about are sent (the **cost
gate**: vote margin below ``below``), and the answer is trusted only when it is exactly one of the candidate
labels (**strict parsing**). Anything else -- an answer outside the candidates, an empty answer, a timeout,
an HTTP error after the retries -- falls back to the vote, and the outcome records why; no query is dropped.

A re-ranker is anything with ``name`` and ``rerank(request) -> RerankOutcome``: `memory.rerank.gemini.GeminiReranker`
(a Gemini model through the google-genai client) and `memory.rerank.second_opinion.EncoderReranker` (a second
image encoder re-scoring the candidates, offline), both registered by kind in `memory.rerank`. Both are used by
``VisualMemory.classify(rerank=...)`` and by the evaluate job's re-rank stage (pipelines/stages/rerank.py),
which is why this module is pure Python. Every outcome says why it ended as it did (`RerankReason`); the
job writes one `RerankRecord` per query and sums their `RerankTally` into the report's re-rank section.

**No call twice.** A `ResponseCache` keeps each answered request under a key derived from the re-ranker,
the query and the exact candidates (`RerankRequest.key`); the job consults it before every call, so a
bundle that a runner retries after a crash re-uses the answers its first attempt paid for.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import threading
import time
import unicodedata
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from memory import storage
from memory.decide.confidence import VoteConfidence, vote_confidence
from memory.decide.voting import VotingParams, VotingRule
from memory.enums import parse_enum


class RerankReason(enum.StrEnum):
    """Why a query's re-rank outcome is what it is (the report counts them; only ANSWERED re-ranks).

    String-valued: records, the report and ``Prediction.rerank_reason`` carry the value (``"answered"``).
    """
    ANSWERED = "answered"  # The re-ranker picked one of the candidate labels.
    NOT_GATED = "margin_above_gate"  # The vote was sure enough: no call was made.
    SINGLE_LABEL = "single_candidate_label"  # Every candidate has one label: nothing to choose, no call.
    INVALID_ANSWER = "invalid_answer"  # The answer was not exactly one candidate label.
    TIMEOUT = "timeout"
    ERROR = "error"  # HTTP / client error after the retries.
    NO_IMAGE = "missing_image"  # The query's or every candidate's image could not be read.
    DRY_RUN = "dry_run"  # Would have been sent; a dry run makes no call.

    @classmethod
    def parse(cls, value: str | RerankReason) -> RerankReason:
        """``value`` as a member; raises ValueError naming the bad value and the allowed ones."""
        return parse_enum(cls, value, "re-rank reason")

    @property
    def is_fallback(self) -> bool:
        """The query was sent but the vote stands: an invalid answer, a timeout, an error, no image."""
        return self in (RerankReason.INVALID_ANSWER, RerankReason.TIMEOUT, RerankReason.ERROR, RerankReason.NO_IMAGE)

    @property
    def sent(self) -> bool:
        """The query went to the re-ranker (or its cache): not left out by the gate, a single label or a dry run."""
        return self not in (RerankReason.NOT_GATED, RerankReason.SINGLE_LABEL, RerankReason.DRY_RUN)


# Part of every cache key: bump it when the prompt or what is shown changes, so cached answers to the old
# prompt are not reused.
PROMPT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One neighbour shown to the re-ranker: its class name, source uri and cosine distance to the query."""
    label: str
    uri: str
    distance: float


@dataclasses.dataclass(frozen=True)
class RerankRequest:
    """What a re-ranker sees for one query.

    Attributes:
      query_id: The query's id (evaluation) or its position (classify).
      query_uri: Where the query image is ("" when only ``query_image`` is known).
      candidates: The top-N neighbours, nearest first.
      vote_label: The vote's class name: the answer whenever the re-ranker gives none.
      margin: The vote's margin (memory.decide.confidence), the cost gate's input.
      query_image: Encoded query image bytes, when the caller already holds them (classify of bytes).
    """
    query_id: str
    query_uri: str
    candidates: tuple[Candidate, ...]
    vote_label: str
    margin: float
    query_image: bytes | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The distinct candidate labels in order of first appearance: the only admissible answers."""
        return tuple(dict.fromkeys(c.label for c in self.candidates))

    def key(self, reranker: str) -> str:
        """Cache key: re-ranker name (with its settings) + query (id, uri, image bytes) + candidates (uris and
        labels). Stable across processes."""
        image = "" if self.query_image is None else hashlib.sha256(self.query_image).hexdigest()
        blob = json.dumps([PROMPT_VERSION, reranker, self.query_id, self.query_uri, image,
                           [(c.label, c.uri) for c in self.candidates]], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class RerankOutcome:
    """The result for one query.

    Attributes:
      label: The final class name: the re-ranker's answer when ``reason`` is ANSWERED, else the vote's.
      reason: Why (a `RerankReason`; its string value is accepted).
      calls: Remote calls (or second-opinion scorings) made for this query, retries included; 0 from cache.
      detail: Human-readable detail for fallbacks (the invalid answer, the error message).
      cached: The outcome came from the `ResponseCache` (no call made now).
    """
    label: str
    reason: RerankReason
    calls: int = 0
    detail: str = ""
    cached: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", RerankReason.parse(self.reason))

    @property
    def reranked(self) -> bool:
        return self.reason is RerankReason.ANSWERED

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), reason=self.reason.value)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankOutcome:
        return cls(label=str(d["label"]), reason=RerankReason.parse(str(d["reason"])), calls=int(d.get("calls", 0)),
                   detail=str(d.get("detail", "")), cached=bool(d.get("cached", False)))


class Reranker(Protocol):
    """A second opinion over a query's candidates."""
    name: str

    def rerank(self, request: RerankRequest) -> RerankOutcome:
        """Never raises for a per-query problem: returns a fallback outcome (label = vote) with its reason."""
        ...


def check_rerank_below(below: Any) -> float | None:
    """The cost gate ``below`` (None: send no query), checked where it enters (`VisualMemory.classify`, the
    ``--rerank-below`` flag); `gate` and `vote_and_gate` take it as checked.

    Raises:
      ValueError: naming the value, unless it is None or a number >= 0 (NaN is refused).
    """
    # NaN compares False with every margin: the gate would silently send no query (``not below >= 0``).
    if below is not None and (not isinstance(below, (int, float, np.floating)) or isinstance(below, bool)
                              or not below >= 0):
        raise ValueError(f"rerank_below must be a number >= 0 (a vote margin in [0, 1], e.g. 0.3), got {below!r}")
    return below


def gate(margins: np.ndarray, below: float | None) -> np.ndarray:
    """bool [nq]: the queries worth a call, those whose vote margin is strictly below ``below``.

    ``below=None`` sends none; ``below > 1`` sends every query (margins are in [0, 1]). ``below`` is taken as
    checked (`check_rerank_below`).
    """
    margins = np.asarray(margins, dtype=np.float64)
    if below is None:
        return np.zeros(margins.shape, dtype=bool)
    return margins < float(below)


def check_top_n(top_n: Any) -> int:
    """The neighbours shown per query, checked where it enters; `make_request` takes it as checked.

    Raises:
      ValueError: naming the value, unless it is an int in [2, 64].
    """
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or not 2 <= top_n <= 64:
        raise ValueError(f"rerank top_n must be an int in [2, 64] (neighbours shown per query), got {top_n!r}")
    return int(top_n)


def make_request(query_id: str, query_uri: str, labels: Sequence[str], uris: Sequence[str],
                 distances: Sequence[float], *, vote_label: str, margin: float, top_n: int,
                 query_image: bytes | None = None) -> RerankRequest:
    """A request from one query's neighbour list (class names, uris, distances; padding "" is skipped), showing
    its first ``top_n`` (checked, `check_top_n`) candidates."""
    cands = tuple(Candidate(str(lab), str(uri), float(d))
                  for lab, uri, d in zip(labels, uris, distances) if str(lab))[:int(top_n)]
    return RerankRequest(str(query_id), str(query_uri), cands, str(vote_label), float(margin), query_image)


class GatedVote(NamedTuple):
    """The one vote of a batch of queries and the re-rank requests its cost gate lets through.

    Attributes:
      vote: Each query's vote and confidence scores (memory.decide.confidence.VoteConfidence); the gate reads
        its ``margin``.
      vote_labels: unicode [nq]: the vote's class name of each query ("" for a query without neighbours).
      requests: Per query, its `RerankRequest` when its margin is below the gate, else None.
    """
    vote: VoteConfidence
    vote_labels: np.ndarray
    requests: list[RerankRequest | None]


def vote_and_gate(labels: np.ndarray, distances: np.ndarray, entry_weights: np.ndarray | None, *,
                  class_names: Sequence[str], rule: VotingRule, k: int, params: VotingParams,
                  below: float | None, top_n: int, query_ids: Sequence[str], query_uris: Sequence[str],
                  neighbor_uris: Sequence[Sequence[str]],
                  query_image: Callable[[int], bytes | None] | None = None) -> GatedVote:
    """Votes each query once, gates it on that vote's margin, and builds the request of each query sent.

    `VisualMemory.classify` and the evaluate job's re-rank stage both run this, so both send exactly the same
    queries with the same candidates. Inputs are taken as checked where they entered (k >= 1,
    `check_rerank_below`, `check_top_n`).

    Args:
      labels, distances: ``[nq, K]`` neighbours, nearest first (-1 / inf padding); the first ``k`` vote, the
        first ``top_n`` non-padding ones are shown to the re-ranker.
      entry_weights: ``[nq, K]`` soft-pruning weights multiplied into the votes, or None.
      class_names: The memory's class names (``labels`` index into them).
      rule, k, params: The vote.
      below: The cost gate: queries whose margin is strictly below it are sent; None sends none.
      top_n: Candidates per request.
      query_ids, query_uris: Each query's id and image uri ("" when the re-ranker is shown bytes instead).
      neighbor_uris: ``[nq, K]`` source uri of each neighbour.
      query_image: Encoded image bytes of query q, asked only for queries sent (None: no bytes).
    """
    kk = min(int(k), labels.shape[1])
    vc = vote_confidence(labels[:, :kk], distances[:, :kk], rule=rule, k=kk, params=params,
                         entry_weights=None if entry_weights is None else entry_weights[:, :kk])
    names = np.asarray(tuple(class_names) + ("",), dtype=str)  # -1 (padding, no vote) indexes "".
    vote_labels = names[vc.labels]
    send = gate(vc.margin, below)
    requests = [make_request(query_ids[q], query_uris[q], names[labels[q]], neighbor_uris[q], distances[q],
                             vote_label=vote_labels[q], margin=float(vc.margin[q]), top_n=top_n,
                             query_image=None if query_image is None else query_image(q))
                if send[q] else None for q in range(labels.shape[0])]
    return GatedVote(vc, vote_labels, requests)


def prompt_text(request: RerankRequest) -> tuple[str, str]:
    """(instructions before the images, question after them) for a VLM.

    The images follow in this order: the query, then candidate 1..N, each introduced by a text line
    ``Example i: label "NAME"`` (see `prompt_parts`).
    """
    head = ("You classify an image by comparing it with labelled example images from a reference memory. "
            f"The first image is the query. Then {len(request.candidates)} labelled examples follow, the most "
            "similar first.")
    tail = ("Which label does the query image belong to? Answer with exactly one of these labels and nothing "
            "else: " + ", ".join(json.dumps(label) for label in request.labels))
    return head, tail


def shown(request: RerankRequest, candidate_images: Sequence[bytes | None]) -> RerankRequest:
    """The request restricted to the candidates whose image could be read: what the prompt shows and the
    answer is parsed against (a label without an example image is not offered)."""
    keep = tuple(c for c, image in zip(request.candidates, candidate_images) if image is not None)
    return dataclasses.replace(request, candidates=keep)


def prompt_parts(request: RerankRequest, query_image: bytes, candidate_images: Sequence[bytes | None]
                 ) -> list[tuple[str, Any]]:
    """The prompt as ordered ``("text", str)`` / ``("image", bytes)`` parts (client-neutral).

    Candidates whose image is None (unreadable) are left out, with their label (see `shown`): the text
    counts and lists only what is shown.
    """
    visible = shown(request, candidate_images)
    head, tail = prompt_text(visible)
    parts: list[tuple[str, Any]] = [("text", head), ("text", "Query image:"), ("image", query_image)]
    images = [image for image in candidate_images if image is not None]
    for i, (cand, image) in enumerate(zip(visible.candidates, images), start=1):
        parts += [("text", f"Example {i}: label {json.dumps(cand.label)}"), ("image", image)]
    parts.append(("text", tail))
    return parts


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip().strip("`").strip()
    text = re.sub(r"^(label|answer)\s*[:=]\s*", "", text, flags=re.IGNORECASE)
    text = text.strip().rstrip(".").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text.casefold()


def parse_answer(text: str | None, labels: Sequence[str]) -> str | None:
    """The candidate label the answer names, or None.

    Strict: after trimming whitespace, quotes, backticks, a trailing period and a leading ``label:`` /
    ``answer:``, the answer must equal exactly one candidate label (case-insensitively). An answer that
    merely mentions a label ("probably a shirt or a coat") is not accepted.
    """
    if not text:
        return None
    got = _norm(text)
    hits = [label for label in labels if _norm(label) == got]
    return hits[0] if len(hits) == 1 else None


class ResponseCache:
    """Answered outcomes by `RerankRequest.key`, one small JSON file per key under ``directory``.

    Files are written whole (storage.write_bytes writes a temporary file and renames it, or uploads one GCS
    object), so a crash leaves either the answer or nothing. Only outcomes worth keeping are stored: answers
    and invalid answers (the model was paid for); timeouts and errors are tried again on the next attempt.
    """

    def __init__(self, directory: str):
        self.directory = directory.rstrip("/")
        self._lock = threading.Lock()
        self._memo: dict[str, RerankOutcome] = {}

    def _path(self, key: str) -> str:
        return storage.join(self.directory, key[:2], f"{key}.json")

    def get(self, key: str) -> RerankOutcome | None:
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        try:
            raw = storage.read_bytes(self._path(key))
        except FileNotFoundError:
            return None
        try:
            outcome = dataclasses.replace(RerankOutcome.from_dict(json.loads(raw)), calls=0, cached=True)
        except (ValueError, KeyError, TypeError):  # A damaged file: ask again (and overwrite it).
            return None
        with self._lock:
            self._memo[key] = outcome
        return outcome

    def put(self, key: str, outcome: RerankOutcome) -> None:
        if outcome.reason not in (RerankReason.ANSWERED, RerankReason.INVALID_ANSWER):
            return
        storage.write_bytes(self._path(key), json.dumps(outcome.to_dict()).encode())
        with self._lock:
            self._memo[key] = dataclasses.replace(outcome, calls=0, cached=True)


def rerank_cached(reranker: Reranker, request: RerankRequest, cache: ResponseCache | None) -> RerankOutcome:
    """`reranker.rerank(request)` unless ``cache`` already holds its answer; stores worthwhile answers."""
    if len(request.labels) < 2:
        return RerankOutcome(request.vote_label, RerankReason.SINGLE_LABEL)
    key = request.key(reranker.name)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    outcome = reranker.rerank(request)
    if not outcome.reranked and outcome.label != request.vote_label:
        raise AssertionError(f"{reranker.name}: a fallback outcome must keep the vote's label, got {outcome}")
    if outcome.reranked and outcome.label not in request.labels:
        raise AssertionError(f"{reranker.name}: answered {outcome.label!r}, not a candidate label {request.labels}")
    if cache is not None:
        cache.put(key, outcome)
    return outcome


class RateLimiter:
    """At most ``per_second`` calls per second from this process (a token bucket of ``burst`` calls).

    ``per_second=None`` does not limit. Thread-safe; `acquire` sleeps until a token is free. A Beam job runs
    one limiter per re-ranker instance on each worker, so the job's rate is up to this times the workers
    (``--rerank-rate`` is per worker process).
    """

    def __init__(self, per_second: float | None, burst: int = 1, *, clock=time.monotonic, sleep=time.sleep):
        if per_second is not None and (isinstance(per_second, bool) or not per_second > 0):
            raise ValueError(f"rate limit must be > 0 calls per second or None, got {per_second!r}")
        self.per_second = per_second
        self.burst = max(1, int(burst))
        self._tokens = float(self.burst)
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Takes one token; returns the seconds slept."""
        if self.per_second is None:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
            self._last = now
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.per_second
            self._tokens -= 1
        if wait:
            self._sleep(wait)
        return wait


def read_image_bytes(uri: str) -> bytes | None:
    """The bytes of a recorded source uri (local path, ``file://`` or ``gs://``), None when unreadable."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not path:
        return None
    try:
        return storage.read_bytes(path)
    except Exception:  # pylint: disable=broad-except  # Any unreadable source (OS, GCS 403/404) -> no image.
        return None


@dataclasses.dataclass(frozen=True)
class RerankTally:
    """Counts over a set of queries, summable with ``+``; `to_dict` is the report's re-rank section.

    Attributes:
      queries: Queries counted.
      vote_correct: Queries whose vote was the true label.
      reranked_correct: Queries whose final label (after re-ranking) was the true label.
      calls: Remote calls (or second-opinion scorings) made, retries included.
      cached: Outcomes served from the response cache.
      sent: Queries that went to the re-ranker or its cache (`RerankReason.sent`).
      would_send: Queries a dry run would have sent.
      reranked: Queries the re-ranker answered.
      changed: Queries whose final label differs from the vote's.
      changed_to_right: Changed, and now the true label.
      changed_to_wrong: Changed, and the vote had been the true label.
      reasons: Queries per `RerankReason` (only reasons that occurred).
    """
    queries: int = 0
    vote_correct: int = 0
    reranked_correct: int = 0
    calls: int = 0
    cached: int = 0
    sent: int = 0
    would_send: int = 0
    reranked: int = 0
    changed: int = 0
    changed_to_right: int = 0
    changed_to_wrong: int = 0
    reasons: Mapping[RerankReason, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, outcome: RerankOutcome, vote_label: str, true_label: str) -> RerankTally:
        """One query's tally: its outcome, the vote's label and the true label."""
        vote_ok, final_ok, changed = vote_label == true_label, outcome.label == true_label, outcome.label != vote_label
        return cls(queries=1, vote_correct=int(vote_ok), reranked_correct=int(final_ok), calls=int(outcome.calls),
                   cached=int(outcome.cached), sent=int(outcome.reason.sent),
                   would_send=int(outcome.reason is RerankReason.DRY_RUN), reranked=int(outcome.reranked),
                   changed=int(changed), changed_to_right=int(changed and final_ok),
                   changed_to_wrong=int(changed and vote_ok), reasons={outcome.reason: 1})

    def __add__(self, other: RerankTally) -> RerankTally:
        """The tally of two disjoint query sets."""
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name)
                  for f in dataclasses.fields(self) if f.name != "reasons"}
        reasons = dict(self.reasons)
        for reason, n in other.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return RerankTally(**counts, reasons=dict(sorted(reasons.items())))

    @property
    def accuracy_vote(self) -> float:
        """Top-1 accuracy of the vote, in percent."""
        return 100.0 * self.vote_correct / self.queries if self.queries else 0.0

    @property
    def accuracy_reranked(self) -> float:
        """Top-1 accuracy after re-ranking, in percent."""
        return 100.0 * self.reranked_correct / self.queries if self.queries else 0.0

    @property
    def fraction_sent(self) -> float:
        return self.sent / self.queries if self.queries else 0.0

    @property
    def fraction_reranked(self) -> float:
        return self.reranked / self.queries if self.queries else 0.0

    @property
    def fallbacks(self) -> int:
        """Queries sent whose vote stands (`RerankReason.is_fallback`)."""
        return int(sum(n for reason, n in self.reasons.items() if reason.is_fallback))

    def to_dict(self) -> dict[str, Any]:
        """The report's re-rank section: every count but the two correct counts, which become the accuracies
        (percent), then the fractions sent and re-ranked and the fallbacks."""
        return {"queries": self.queries, "calls": self.calls, "cached": self.cached, "sent": self.sent,
                "would_send": self.would_send, "reranked": self.reranked, "changed": self.changed,
                "changed_to_right": self.changed_to_right, "changed_to_wrong": self.changed_to_wrong,
                "reasons": {reason.value: n for reason, n in sorted(self.reasons.items())},
                "accuracy_vote": self.accuracy_vote, "accuracy_reranked": self.accuracy_reranked,
                "fraction_sent": self.fraction_sent, "fraction_reranked": self.fraction_reranked,
                "fallbacks": self.fallbacks}


def summarize(outcomes: Sequence[RerankOutcome], vote_labels: Sequence[str], true_labels: Sequence[str]
              ) -> RerankTally:
    """The tally of every query (outcome, the vote's label, the true label)."""
    if not len(outcomes) == len(vote_labels) == len(true_labels):
        raise ValueError(f"{len(outcomes)} outcomes, {len(vote_labels)} votes, {len(true_labels)} true labels: "
                         "one per query")
    total = RerankTally()
    for o, v, t in zip(outcomes, vote_labels, true_labels):
        total = total + RerankTally.of(o, v, t)
    return total


@dataclasses.dataclass(frozen=True)
class RerankRecord:
    """One query's line in the evaluate job's ``rerank-*.jsonl``.

    Attributes:
      query_id: The query's id.
      true_label: Its true class name.
      vote_label: The vote's class name.
      margin: The vote's margin (the cost gate's input).
      label: The final class name.
      reason: Why (`RerankOutcome.reason`).
      calls: Calls made for this query (0 from the cache).
      cached: The outcome came from the response cache.
      detail: A fallback's detail.
    """
    query_id: str
    true_label: str
    vote_label: str
    margin: float
    label: str
    reason: RerankReason
    calls: int = 0
    cached: bool = False
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", RerankReason.parse(self.reason))

    @classmethod
    def of(cls, query_id: str, true_label: str, vote_label: str, margin: float, outcome: RerankOutcome
           ) -> RerankRecord:
        """The record of one query's outcome."""
        return cls(query_id, true_label, vote_label, margin, outcome.label, outcome.reason, outcome.calls,
                   outcome.cached, outcome.detail)

    @property
    def outcome(self) -> RerankOutcome:
        return RerankOutcome(self.label, self.reason, self.calls, self.detail, self.cached)

    def tally(self) -> RerankTally:
        """This query's `RerankTally`."""
        return RerankTally.of(self.outcome, self.vote_label, self.true_label)

    def to_dict(self) -> dict[str, Any]:
        """The JSON line's object (reason as its string value)."""
        return dict(dataclasses.asdict(self), reason=self.reason.value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RerankRecord:
        """Inverse of `to_dict`; raises KeyError naming a missing field."""
        return cls(query_id=str(d["query_id"]), true_label=str(d["true_label"]), vote_label=str(d["vote_label"]),
                   margin=float(d["margin"]), label=str(d["label"]), reason=RerankReason.parse(d["reason"]),
                   calls=int(d.get("calls", 0)), cached=bool(d.get("cached", False)), detail=str(d.get("detail", "")))


def env_api_key() -> str | None:
    """The Gemini API key as the google-genai client reads it (GOOGLE_API_KEY, then GEMINI_API_KEY)."""
    return os.environ.get("GOOGLE_API_KEY") or os.environ.get("GEMINI_API_KEY")
