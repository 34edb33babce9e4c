"""A fake Gemini ``generateContent`` endpoint on 127.0.0.1, so the google-genai client is tested offline.

The client is pointed here with ``http_options.base_url`` (``GeminiReranker(base_url=fake.url)``); every request
is recorded (method, path, headers, parsed JSON body) and answered by the next scripted behaviour:

* `answer(text)`: 200 with a GenerateContentResponse whose ``candidates[0].content.parts[0].text`` is ``text``;
* `status(code, retry_after=None, retry_delay=None)`: that HTTP status with a google-style error body
  (``{"error": {"code", "message", "status"}}``), a ``Retry-After`` header and/or a ``google.rpc.RetryInfo``;
* `hang(seconds)`: no answer for ``seconds`` (longer than the client's timeout), then an answer nobody reads.

When the script is used up the fake answers ``default`` (404 "no scripted behaviour left" unless told
otherwise), which is not retried, so a test that expected fewer calls sees the extra one. Anything that is not a
``POST .../models/M:generateContent`` (an https ``CONNECT`` tunnel, another path) is recorded and refused.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import re
import threading
import urllib.parse
from typing import Any, Callable, Optional

from tests.fake_http import local_server, read_body

_GENERATE = re.compile(r"^/(?P<version>v1[a-z0-9]*)/(?:projects/[^/]+/locations/[^/]+/publishers/google/)?"
                       r"models/(?P<model>[^/:]+):generateContent$")


@dataclasses.dataclass(frozen=True)
class Behaviour:
    kind: str                   # "answer" | "status" | "hang"
    text: str = ""
    code: int = 200
    retry_after: Optional[str] = None
    retry_delay: Optional[str] = None
    seconds: float = 0.0
    finish_reason: str = "STOP"


def answer(text: str, finish_reason: str = "STOP") -> Behaviour:
    return Behaviour("answer", text=text, finish_reason=finish_reason)


def status(code: int, retry_after: float | str | None = None, retry_delay: str | None = None) -> Behaviour:
    """An HTTP error; ``retry_after`` becomes the Retry-After header, ``retry_delay`` (e.g. "3s") a RetryInfo."""
    return Behaviour("status", code=code, retry_after=None if retry_after is None else str(retry_after),
                     retry_delay=retry_delay)


def hang(seconds: float) -> Behaviour:
    return Behaviour("hang", seconds=seconds)


_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                 504: "DEADLINE_EXCEEDED"}


def _b64decode(data: str) -> bytes:
    """Standard or URL-safe base64 (the client sends URL-safe), padded or not; strict about the alphabet."""
    data = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as the fake saw it; ``headers`` has lower-case names."""
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Optional[Any]

    @property
    def model(self) -> Optional[str]:
        m = _GENERATE.match(self.path)
        return m["model"] if m else None

    def parts(self) -> list[dict]:
        body = self.body if isinstance(self.body, dict) else {}
        return [p for c in body.get("contents") or [] for p in c.get("parts") or []]

    def images(self) -> list[tuple[bytes, str]]:
        """The inline images in prompt order: (decoded bytes, mime type)."""
        return [value for kind, value in self.prompt() if kind == "image"]

    def texts(self) -> list[str]:
        return [p["text"] for p in self.parts() if "text" in p]

    def prompt(self) -> list[tuple[str, Any]]:
        """The parts in order as ("text", str) / ("image", (bytes, mime)) pairs."""
        out: list[tuple[str, Any]] = []
        for p in self.parts():
            inline = p.get("inlineData") or p.get("inline_data")
            if inline:
                out.append(("image", (_b64decode(inline["data"]), inline.get("mimeType") or inline.get("mime_type"))))
            elif "text" in p:
                out.append(("text", p["text"]))
        return out

    @property
    def generation_config(self) -> dict:
        body = self.body if isinstance(self.body, dict) else {}
        return body.get("generationConfig") or body.get("generation_config") or {}


class FakeGenai:
    """The fake endpoint on a free port of 127.0.0.1, served from a daemon thread; a context manager."""

    def __init__(self, *behaviours: Behaviour, default: Behaviour | None = None,
                 respond: Optional[Callable[["Request"], Behaviour]] = None):
        """``behaviours`` answer the first requests in order; then ``respond(request)`` (when given) or
        ``default`` answers every further one."""
        self.requests: list[Request] = []
        self.default = default or Behaviour("status", code=404, text="fake genai: no scripted behaviour left")
        self.respond = respond
        self._script = list(behaviours)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server, self._thread = local_server(self._handle, name="fake-genai")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def __enter__(self) -> "FakeGenai":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # Ends any hang at once.
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def generate_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.model is not None]

    def unexpected_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method != "POST" or r.model is None]

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        body = read_body(handler)
        request = Request(handler.command, url.path if handler.command != "CONNECT" else handler.path, url.query,
                          {k.lower(): v for k, v in handler.headers.items()}, body)
        with self._lock:
            self.requests.append(request)
            expected = request.method == "POST" and request.model is not None
            fallback = self.respond(request) if expected and self.respond is not None else self.default
            behaviour = (self._script.pop(0) if self._script else fallback) if expected else \
                Behaviour("status", code=403, text=f"fake genai: refused {request.method} {request.path}")
        if behaviour.kind == "hang":
            self._stop.wait(behaviour.seconds)
            behaviour = answer("too late")
        headers = {}
        if behaviour.kind == "answer":
            code, payload = 200, {
                "candidates": [{"content": {"role": "model", "parts": [{"text": behaviour.text}]},
                                "finishReason": behaviour.finish_reason, "index": 0}],
                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1, "totalTokenCount": 11},
                "modelVersion": request.model or ""}
        else:
            code = behaviour.code
            error: dict[str, Any] = {"code": code, "message": behaviour.text or f"fake genai: HTTP {code}",
                                     "status": _STATUS_NAMES.get(code, "UNKNOWN")}
            if behaviour.retry_delay:
                error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                     "retryDelay": behaviour.retry_delay}]
            payload = {"error": error}
            if behaviour.retry_after is not None:
                headers["Retry-After"] = behaviour.retry_after
        data = json.dumps(payload).encode()
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json; charset=UTF-8")
            handler.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # The client gave up (a timeout): nobody reads this answer.
            pass
