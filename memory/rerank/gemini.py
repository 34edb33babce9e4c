"""A Gemini model as the re-ranker: the query and its labelled neighbours inline, one label back.

`GeminiReranker` implements `memory.rerank.base.Reranker` through the google-genai client (imported lazily, on the
first call), either the Gemini Developer API (an API key) or Vertex AI (``vertexai=True`` with a project and a
location). Images are sent inline as thumbnails (longest side at most ``thumbnail_px``) in the order of
`memory.rerank.base.prompt_parts`; the answer is accepted only through `memory.rerank.base.parse_answer`.

Retries are ours, not the client's (its retry is off: one attempt per call): HTTP 408, 429 and >= 500, timeouts
and dropped connections are retried up to ``max_retries`` times, waiting ``backoff_s * 2**attempt`` or what the
server asks for (a ``Retry-After`` header or a ``google.rpc.RetryInfo`` delay), whichever is longer, through the
injected ``sleep``. Other errors are not retried. No per-query problem raises: each ends in an outcome that keeps
the vote's label and says why. The object pickles without its client, so it can travel inside a Beam DoFn.
"""

from __future__ import annotations

import email.utils
import io
import os
import re
import threading
import time
from typing import Any, Callable

from memory.rerank import RerankFlags
from memory.rerank.base import (RateLimiter, RerankOutcome, RerankReason, RerankRequest, env_api_key, parse_answer,
                                prompt_parts, read_image_bytes, shown)

DEVELOPER_API_VERSION = "v1beta"  # Pinned: enum response schemas and thinking config are documented there.
MAX_DELAY_S = 300.0               # The longest wait between two attempts, whatever the server asks.
ANSWER_CHARS = 200                # How much of an invalid answer the outcome keeps.
ERROR_CHARS = 500


def image_mime(data: bytes) -> str:
    """The mime type of a thumbnail made by `thumbnail` (PNG or JPEG)."""
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


def thumbnail(data: bytes | None, max_px: int) -> bytes | None:
    """PNG/JPEG bytes with the longest side <= ``max_px``; None when ``data`` is not a decodable image.

    A PNG or JPEG already small enough is sent as it is; anything else is scaled down (never up) and encoded
    as PNG when it has transparency or a palette, else as JPEG (quality 90).
    """
    if not data:
        return None
    from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format in ("PNG", "JPEG") and max(im.size) <= max_px:
                im.load()  # Decodable, not merely a valid header.
                return data
            if im.format == "JPEG":
                im.draft("RGB", (max_px, max_px))  # Decode big JPEGs at a reduced scale.
            im = ImageOps.exif_transpose(im)
            im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
                im.convert("RGBA").save(out, format="PNG")
            else:
                im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB").save(
                    out, format="JPEG", quality=90)
            return out.getvalue()
    except Exception:  # pylint: disable=broad-except  # Undecodable, truncated, a decompression bomb...
        return None


def _exception_types(*names: str) -> tuple[type, ...]:
    """Exception classes by "module.Name" (httpx2 is the client's default backend), those importable."""
    import importlib  # pylint: disable=g-import-not-at-top
    found = []
    for dotted in names:
        module_name, _, name = dotted.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


_TIMEOUTS = ("httpx.TimeoutException", "httpx2.TimeoutException", "requests.exceptions.Timeout")
_DROPPED = ("httpx.NetworkError", "httpx.RemoteProtocolError", "httpx2.NetworkError", "httpx2.RemoteProtocolError",
            "requests.exceptions.ConnectionError", "google.auth.exceptions.TransportError")


def _server_delay(error: Any) -> float | None:
    """Seconds the server asked to wait: a Retry-After header (seconds or a date) or a RetryInfo retryDelay."""
    delays = []
    headers = getattr(getattr(error, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if value:
        try:
            delays.append(float(value))
        except ValueError:
            try:
                delays.append(email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    details = getattr(error, "details", None)
    details = details.get("error", details) if isinstance(details, dict) else {}
    for d in details.get("details") or () if isinstance(details, dict) else ():
        m = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(d.get("retryDelay", ""))) if isinstance(d, dict) else None
        if m:
            delays.append(float(m.group(1)))
    return max(delays) if delays else None


def _empty_answer(response: Any) -> str:
    bits = []
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        bits.append(f"block_reason={getattr(feedback.block_reason, 'value', feedback.block_reason)}")
    candidates = getattr(response, "candidates", None) or []
    if candidates and getattr(candidates[0], "finish_reason", None):
        bits.append(f"finish_reason={getattr(candidates[0].finish_reason, 'value', candidates[0].finish_reason)}")
    return "empty answer" + (f" ({', '.join(bits)})" if bits else "")


class GeminiReranker:
    """Asks a Gemini model which candidate label the query image has. See the module docstring.

    ``max_output_tokens`` (default 32) bounds the answer; on thinking models it also bounds the thinking, so
    the default ``thinking_budget=0`` turns thinking off (Gemini 2.5 Flash / Flash-Lite). For a model that
    cannot stop thinking (e.g. Gemini 2.5 Pro) pass ``thinking_budget=None`` (or a budget) and a larger
    ``max_output_tokens``, else the answers come back empty (INVALID_ANSWER, "finish_reason=MAX_TOKENS").
    ``enum_schema`` asks for a ``text/x.enum`` answer restricted to the candidate labels.
    """

    def __init__(self, model: str, *, api_key: str | None = None, vertexai: bool = False,
                 project: str | None = None, location: str | None = None, base_url: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0,
                 rate_limit: float | None = None, thumbnail_px: int = 224, sleep: Callable[[float], Any] = time.sleep,
                 max_output_tokens: int | None = 32, thinking_budget: int | None = 0, enum_schema: bool = True):
        if not isinstance(model, str) or not model.strip() or re.search(r"\s", model.strip()):
            raise ValueError(f"model must be a Gemini model name such as 'gemini-2.5-flash', got {model!r}")
        self.model = model.strip()
        self.name = f"gemini:{self.model}"
        self.vertexai = bool(vertexai)
        if self.vertexai:
            if api_key:
                raise ValueError("pass either api_key (Gemini Developer API) or vertexai=True with project and "
                                 "location (Vertex AI, application-default credentials), not both")
            project = project or os.environ.get("GOOGLE_CLOUD_PROJECT")
            location = location or os.environ.get("GOOGLE_CLOUD_LOCATION")
            if not project or not location:
                raise ValueError(f"Vertex AI needs a project and a location, got project={project!r} "
                                 f"location={location!r}: pass project=/location= (e.g. location='us-central1') "
                                 "or set GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION")
            self.api_key = None
        else:
            if project or location:
                raise ValueError(f"project={project!r} / location={location!r} are for Vertex AI: pass "
                                 "vertexai=True, or drop them and use an API key")
            self.api_key = api_key or env_api_key()
            if not self.api_key:
                raise ValueError("no Gemini API key: pass api_key=... or set GOOGLE_API_KEY (or GEMINI_API_KEY); "
                                 "for Vertex AI pass vertexai=True with project and location")
        self.project, self.location, self.base_url = project, location, base_url
        for what, value, ok in (("timeout_s", timeout_s, "> 0"), ("backoff_s", backoff_s, ">= 0")):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not (value > 0 if ok == "> 0" else value >= 0)):
                raise ValueError(f"{what} must be a number {ok} (seconds), got {value!r}")
        for what, value, low in (("max_retries", max_retries, 0), ("thumbnail_px", thumbnail_px, 16),
                                 ("max_output_tokens", 32 if max_output_tokens is None else max_output_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
        self.timeout_s, self.backoff_s = float(timeout_s), float(backoff_s)
        self.max_retries, self.thumbnail_px = max_retries, thumbnail_px
        self.max_output_tokens, self.thinking_budget, self.enum_schema = max_output_tokens, thinking_budget, enum_schema
        self.rate_limit, self._sleep = rate_limit, sleep
        self._limiter: RateLimiter | None = RateLimiter(rate_limit, sleep=sleep)  # Validates rate_limit.
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # Never shows the key.
        where = f"vertex {self.project}/{self.location}" if self.vertexai else "developer api"
        return f"GeminiReranker({self.model!r}, {where}, base_url={self.base_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_client=None, _limiter=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def client(self) -> Any:
        """The google-genai client, created on first use, with its own retries off."""
        with self._lock:
            if self._client is None:
                from google import genai  # pylint: disable=g-import-not-at-top
                from google.genai import types  # pylint: disable=g-import-not-at-top
                options = types.HttpOptions(
                    base_url=self.base_url, timeout=max(1, int(round(self.timeout_s * 1000))),
                    api_version=None if self.vertexai else DEVELOPER_API_VERSION,
                    retry_options=types.HttpRetryOptions(attempts=1))
                if self.vertexai:
                    self._client = genai.Client(vertexai=True, project=self.project, location=self.location,
                                                http_options=options)
                else:
                    self._client = genai.Client(vertexai=False, api_key=self.api_key, http_options=options)
            if self._limiter is None:
                self._limiter = RateLimiter(self.rate_limit, sleep=self._sleep)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _contents_and_config(self, request: RerankRequest, query: bytes, cands: list[bytes | None]):
        from google.genai import types  # pylint: disable=g-import-not-at-top
        parts = [types.Part.from_text(text=value) if kind == "text" else
                 types.Part.from_bytes(data=value, mime_type=image_mime(value))
                 for kind, value in prompt_parts(request, query, cands)]
        config = types.GenerateContentConfig(
            temperature=0.0, candidate_count=1, max_output_tokens=self.max_output_tokens,
            thinking_config=(None if self.thinking_budget is None
                             else types.ThinkingConfig(thinking_budget=self.thinking_budget)),
            response_mime_type="text/x.enum" if self.enum_schema else None,
            response_schema=(types.Schema(type=types.Type.STRING, enum=list(shown(request, cands).labels))
                             if self.enum_schema else None))
        return [types.Content(role="user", parts=parts)], config

    def _classify(self, e: Exception) -> tuple[RerankReason, bool, float | None, str]:
        """(reason, retryable, the server's delay, message) for an exception of one attempt."""
        from google.genai import errors  # pylint: disable=g-import-not-at-top
        if isinstance(e, errors.APIError):
            code = int(e.code or 0)
            retry = code in (408, 429) or code >= 500
            return (RerankReason.TIMEOUT if code in (408, 504) else RerankReason.ERROR, retry,
                    _server_delay(e) if retry else None, f"HTTP {code} {e.status or ''}: {e.message or e.details}")
        if isinstance(e, (TimeoutError, *_exception_types(*_TIMEOUTS))):
            return RerankReason.TIMEOUT, True, None, f"no answer within {self.timeout_s:g} s ({type(e).__name__}: {e})"
        if isinstance(e, (ConnectionError, *_exception_types(*_DROPPED))):
            return RerankReason.ERROR, True, None, f"{type(e).__name__}: {e}"
        return RerankReason.ERROR, False, None, f"{type(e).__name__}: {e}"

    def rerank(self, request: RerankRequest) -> RerankOutcome:
        vote, labels = request.vote_label, request.labels
        if len(labels) < 2:
            return RerankOutcome(vote, RerankReason.SINGLE_LABEL)
        raw = request.query_image if request.query_image is not None else read_image_bytes(request.query_uri)
        query = thumbnail(raw, self.thumbnail_px)
        if query is None:
            return RerankOutcome(vote, RerankReason.NO_IMAGE,
                                 detail=f"query image unreadable: {request.query_uri or '<bytes>'}")
        cands = [thumbnail(read_image_bytes(c.uri), self.thumbnail_px) for c in request.candidates]
        if all(c is None for c in cands):
            return RerankOutcome(vote, RerankReason.NO_IMAGE,
                                 detail=f"none of the {len(cands)} candidate images is readable")
        labels = shown(request, cands).labels  # Only labels with an example image on show are offered.
        if len(labels) < 2:
            return RerankOutcome(vote, RerankReason.SINGLE_LABEL,
                                 detail="one label left among the readable candidate images")
        try:
            client = self.client()
            contents, config = self._contents_and_config(request, query, cands)
        except Exception as e:  # pylint: disable=broad-except
            return RerankOutcome(vote, RerankReason.ERROR,
                                 detail=f"cannot set up the Gemini call: {type(e).__name__}: {e}"[:ERROR_CHARS])
        for attempt in range(self.max_retries + 1):
            self._limiter.acquire()
            calls = attempt + 1  # Every attempt is a call.
            try:
                response = client.models.generate_content(model=self.model, contents=contents, config=config)
            except Exception as e:  # pylint: disable=broad-except
                reason, retryable, server_delay, message = self._classify(e)
                if not retryable or attempt == self.max_retries:
                    tries = f" (after {calls} attempts)" if calls > 1 else ""
                    return RerankOutcome(vote, reason, calls, message[:ERROR_CHARS] + tries)
                self._sleep(min(MAX_DELAY_S, max(self.backoff_s * 2 ** attempt, server_delay or 0.0)))
                continue
            text = getattr(response, "text", None)
            label = parse_answer(text, labels)
            if label is None:
                return RerankOutcome(vote, RerankReason.INVALID_ANSWER, calls,
                                     (text or _empty_answer(response))[:ANSWER_CHARS])
            return RerankOutcome(label, RerankReason.ANSWERED, calls)
        raise AssertionError("unreachable: the last attempt returns")


def make_reranker(name: str, **options: Any) -> GeminiReranker:
    """The re-ranker of ``--rerank gemini:MODEL`` (registered in `memory.rerank`)."""
    return GeminiReranker(name, **options)


def spec_options(flags: RerankFlags) -> dict[str, Any]:
    """`GeminiReranker` options from the shared re-rank flags; the API key is read from the environment
    (GOOGLE_API_KEY, then GEMINI_API_KEY) unless Vertex AI is used.

    Raises:
      ValueError: no API key, no Vertex AI and not a dry run.
    """
    options: dict[str, Any] = dict(vertexai=flags.gemini_vertex, project=flags.gemini_project,
                                   location=flags.gemini_location, base_url=flags.gemini_base_url,
                                   timeout_s=flags.gemini_timeout_s, max_retries=flags.gemini_retries,
                                   rate_limit=flags.rate_limit)
    if not flags.gemini_vertex and not flags.dry_run and not env_api_key():
        raise ValueError("--rerank gemini:... needs an API key in GOOGLE_API_KEY or GEMINI_API_KEY, or "
                         "--gemini-vertex --gemini-project P --gemini-location L")
    if not flags.gemini_vertex:
        options["api_key"] = env_api_key()
    return options
