"""A fake Dataflow API, reached as an HTTP proxy, so DataflowRunner submissions are checked offline.

Beam's Dataflow client switches to its REST transport for an endpoint containing "sandbox"; with
``--dataflow_endpoint=http://dataflow-sandbox.test`` and ``http_proxy``/``HTTP_PROXY`` pointing here, every
Dataflow call arrives as an absolute-URI request (``POST http://dataflow-sandbox.test/v1b3/projects/P/
locations/R/jobs?...``). The server records each request (method, path, query, JSON body) and answers:

* CreateJob (``POST .../jobs``): the job with an id, ``currentState`` JOB_STATE_PENDING and the request's
  ``clientRequestId`` (a different one means "another job of that name runs" to Beam);
* GetJob (``GET .../jobs/ID``): ``currentState`` JOB_STATE_DONE, so ``wait_until_finish`` ends at the first poll;
* ListJobMessages / GetJobMetrics: empty lists;
* anything else, including ``CONNECT`` (an https tunnel: something tried to reach a real Google endpoint):
  recorded and refused, so a test sees it instead of it reaching the network.

Only the job submission is faked: nothing runs, so nothing the job would write exists afterwards.
"""

from __future__ import annotations

import dataclasses
import http.server
import itertools
import json
import re
import threading
import urllib.parse
from typing import Any, Optional

from tests.fake_http import local_server, read_body

FAKE_HOST = "dataflow-sandbox.test"
ENDPOINT = f"http://{FAKE_HOST}"

_JOBS = re.compile(r"^/v1b3/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/jobs(?:/(?P<job>[^/:]+))?"
                   r"(?:/(?P<sub>messages|metrics))?$")


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as the fake service saw it."""
    method: str
    host: str
    path: str
    query: str
    body: Optional[Any]  # Parsed JSON, or the raw text when the body is not JSON; None when empty.

    @property
    def is_create_job(self) -> bool:
        m = _JOBS.match(self.path)
        return self.method == "POST" and m is not None and m["job"] is None


class FakeDataflow:
    """The fake service on 127.0.0.1 (a free port), served from a daemon thread.

    Use as a context manager; ``proxy_url`` is what ``HTTP_PROXY`` should be, ``requests`` what was received.
    """

    def __init__(self, *, request_timeout_s: float = 10.0):
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[str, dict] = {}
        self._server, self._thread = local_server(self._handle, name="fake-dataflow",
                                                  request_timeout_s=request_timeout_s)

    @property
    def proxy_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeDataflow":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def create_job_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.is_create_job]

    def unexpected_requests(self) -> list[Request]:
        """Requests the fake refused: not a Dataflow jobs call on the fake host (e.g. an https tunnel)."""
        with self._lock:
            return [r for r in self.requests if r.host != FAKE_HOST or _JOBS.match(r.path) is None]

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.command == "CONNECT":
            host, path, query = handler.path, "", ""
        else:
            url = urllib.parse.urlsplit(handler.path)  # Absolute URI: the client talks to us as a proxy.
            host, path, query = url.hostname or handler.headers.get("Host", ""), url.path, url.query
        body = read_body(handler)
        request = Request(handler.command, host, path, query, body)
        with self._lock:
            self.requests.append(request)
            status, answer = self._answer(request)
        payload = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(payload)

    def _answer(self, r: Request) -> tuple[int, dict]:
        m = _JOBS.match(r.path) if r.host == FAKE_HOST else None
        if m is None:
            return 403, {"error": {"code": 403, "status": "PERMISSION_DENIED",
                                   "message": f"fake Dataflow: refused {r.method} {r.host}{r.path}"}}
        project, region, job_id, sub = m["project"], m["region"], m["job"], m["sub"]
        if r.method == "POST" and job_id is None:
            job = dict(r.body or {})
            job_id = f"fake-{next(self._ids):04d}"
            self._jobs[job_id] = {"id": job_id, "projectId": project, "location": region, "name": job.get("name"),
                                  "clientRequestId": job.get("clientRequestId", ""),
                                  "currentState": "JOB_STATE_PENDING"}
            return 200, self._jobs[job_id]
        if job_id not in self._jobs:
            return 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": f"no job {job_id!r}"}}
        if r.method == "GET" and sub is None:
            return 200, dict(self._jobs[job_id], currentState="JOB_STATE_DONE")
        if r.method == "GET" and sub == "messages":
            return 200, {"jobMessages": []}
        if r.method == "GET" and sub == "metrics":
            return 200, {"metrics": []}
        return 405, {"error": {"code": 405, "status": "UNIMPLEMENTED", "message": f"{r.method} {r.path}"}}
