"""The local HTTP server both fake Google APIs run on (tests/fake_dataflow.py, tests/fake_genai.py)."""

from __future__ import annotations

import http.server
import threading
from typing import Callable


def local_server(handle: Callable[[http.server.BaseHTTPRequestHandler], None], *, name: str,
                 request_timeout_s: float = 10.0) -> tuple[http.server.ThreadingHTTPServer, threading.Thread]:
    """A threading HTTP server on 127.0.0.1 (a free port) passing every request (GET, POST, PUT, DELETE and
    CONNECT, i.e. https tunnels) to ``handle``, and the daemon thread that will serve it (not started)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = request_timeout_s  # A stuck client never holds the server thread forever.

        def log_message(self, fmt, *args):  # Quiet: the test prints what it needs.
            pass

        def _any(self):
            handle(self)

        do_GET = do_POST = do_PUT = do_DELETE = do_CONNECT = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server, threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=name,
                                    daemon=True)


def read_body(handler: http.server.BaseHTTPRequestHandler):
    """A request's body: parsed JSON, the raw text when it is not JSON, None when empty."""
    import json  # pylint: disable=g-import-not-at-top
    length = int(handler.headers.get("Content-Length") or 0)
    raw = handler.rfile.read(length) if length else b""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")
