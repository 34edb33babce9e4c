"""The HTTP API and the page of ``vmem serve`` (FastAPI on uvicorn).

FastAPI because the request and response bodies are typed models (serving/schemas.py) it validates and
publishes as an OpenAPI schema (``/openapi.json``), on Starlette, the standard ASGI toolkit, served by
uvicorn. Routes:

* ``GET /``: the page (``static/``; no external assets, so it works offline);
* ``GET /healthz``: ``{"status": "ok", "version": N}``;
* ``GET /v1/info``: what ``vmem info --json`` prints for the served version, plus the server's own settings;
* ``POST /v1/classify``: an image (multipart field ``image``, or the raw bytes with an ``image/*`` type) or an
  embedding (JSON ``{"embedding": [...]}``), options as ``vmem classify`` takes them in the query string
  (``rule``, ``k``, ``tau``, ``alpha``, ``abstain_below``, ``filter``, ``crowding``, ``rerank_below``,
  ``rerank_top_n``; ``return_embedding=true`` adds the query's embedding for ``/v1/revote``);
* ``POST /v1/revote``: the decision on the same neighbours before and after a person's entry-weight changes
  (serving/edits.py);
* ``POST /v1/apply``, ``POST /v1/undo``: publish those changes as the next version / restore the weights a
  change replaced; only with the write token (``Authorization: Bearer TOKEN``), compared in constant time;
* ``GET /v1/thumbnail?id=ID``: a 128 px PNG of an entry's own source image (an id, never a path).

Errors are JSON (`schemas.ErrorResponse`): 400 a bad option (named), 401/403 writes without the token or
disabled, 404 an unknown id, 409 another writer published first, 413 a body or image over the limits, 422 an
image the decoder refuses (with its reason), 500 anything else. Every request is logged as one JSON line
(logger ``visual_memory.serve.access``) with its request id, also returned as ``X-Request-ID``.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import importlib.resources
import io
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from memory import storage
from memory.decide.voting import VotingRule
from memory.live import live_counts
from memory.store.versions import ConcurrentUpdateError
from serving import edits, schemas
from serving.live import LiveMemory, ServedVersion
from serving.settings import ServeSettings

__all__ = ["ApiError", "create_app"]

_LOG = logging.getLogger("visual_memory.serve")
_ACCESS = logging.getLogger("visual_memory.serve.access")
_THUMB_PX = 128
# Room for the multipart framing around an image of max_upload_bytes.
_FRAMING_BYTES = 64 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATIC = ("index.html", "page.js", "page.css")
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8"}
# The page's own script and style only; thumbnails from this origin, the dropped image as a blob: URL.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


class ApiError(Exception):
    """An error answered as JSON: HTTP ``status``, machine-readable ``error``, ``reason`` in words."""

    def __init__(self, status: int, error: str, reason: str, option: str | None = None):
        super().__init__(reason)
        self.status, self.error, self.reason, self.option = status, error, reason, option


def _error_response(request: Request, status: int, error: str, reason: str, option: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    body = schemas.ErrorResponse(error=error, reason=reason, option=option,
                                 request_id=getattr(request.state, "request_id", ""))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@functools.lru_cache(maxsize=len(_STATIC))
def _static(name: str) -> bytes:
    return importlib.resources.files("serving").joinpath("static", name).read_bytes()


@functools.lru_cache(maxsize=4096)
def _thumbnail_png(uri: str) -> bytes:
    """A small PNG of the image at ``uri`` (a source uri the memory recorded)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    from encoders.preprocess import decode_image  # pylint: disable=g-import-not-at-top
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    img = Image.fromarray(decode_image(storage.read_bytes(path)), "RGB")
    img.thumbnail((_THUMB_PX, _THUMB_PX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, with or without Content-Length."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the request body is over {limit} bytes; send a smaller image "
                                             "(the server's --max-upload-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_of_multipart(headers: Headers, body: bytes) -> bytes:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=8).parse()
    except Exception as e:  # pylint: disable=broad-except  # Any framing error is the client's.
        raise ApiError(400, "bad_request", f"the multipart body cannot be parsed: {e}", option="image") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "bad_request", "the multipart body has no file field 'image'; send the image as "
                                           "-F image=@photo.jpg", option="image")
    return await upload.read()


def _check_token(settings: ServeSettings, request: Request) -> None:
    if settings.write_token is None:
        raise ApiError(403, "writes_disabled", "this server takes no write actions: start it with "
                                               "--write-token-file FILE (or VMEM_WRITE_TOKEN) to enable them")
    sent = request.headers.get("authorization", "")
    token = sent[len("Bearer "):] if sent.startswith("Bearer ") else ""
    if not hmac.compare_digest(token.encode("utf-8"), settings.write_token.encode("utf-8")):
        raise ApiError(401, "bad_token", "a write action needs the server's write token as "
                                         "'Authorization: Bearer TOKEN'")


def _changes(changes: list[schemas.WeightChange]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in changes:
        if c.id in out:
            raise ApiError(400, "bad_option", f"entry {c.id!r} is changed twice; send one weight per entry",
                           option="changes")
        out[c.id] = c.weight
    return out


def create_app(settings: ServeSettings, *, live: LiveMemory | None = None) -> FastAPI:
    """The application serving ``settings.memory``.

    Args:
      settings: The server's settings.
      live: An already opened memory (tests); by default it is opened when the app starts (once per worker).
    """
    state: dict[str, Any] = {"live": live}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if state["live"] is None:
            state["live"] = await run_in_threadpool(LiveMemory, settings.memory, verify=settings.verify,
                                                    refresh_interval_s=settings.refresh_interval_s)
        current = state["live"]
        current.start()
        _LOG.info("serving version %d of %s", current.current.version, current.root)
        try:
            yield
        finally:
            current.stop()

    app = FastAPI(title="visual-memory", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classify images by their nearest neighbours in a visual memory, see the neighbours "
                              "behind each decision, and change their weights.")

    def served() -> ServedVersion:
        return state["live"].current

    # ------------------------------------------------------------------ errors, limits, logs

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error_response(request, e.status, e.error, e.reason, e.option)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        option = next((str(err["loc"][-1]) for err in errors if err.get("loc")), None)
        reason = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                           for err in errors[:5])
        return _error_response(request, 400, "bad_option", reason, option)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error_response(request, e.status_code, "http", str(e.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        _LOG.exception("request %s failed", getattr(request.state, "request_id", ""))
        return _error_response(request, 500, "internal", f"{type(e).__name__}: {e}")

    @app.middleware("http")
    async def request_log(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        start = time.perf_counter()
        length = request.headers.get("content-length", "")
        if request.method == "POST" and length.isdigit() and int(length) > settings.max_upload_bytes + _FRAMING_BYTES:
            response = _error_response(request, 413, "too_large", f"the request body has {length} bytes, over the "
                                       f"limit of {settings.max_upload_bytes}; send a smaller image")
        else:
            response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        _ACCESS.info(json.dumps({
            "request_id": request_id, "method": request.method, "path": request.url.path,
            "status": response.status_code, "ms": round(1000 * (time.perf_counter() - start), 2),
            "version": served().version if state["live"] is not None else None}, sort_keys=True))
        return response

    # ------------------------------------------------------------------ the page

    def static(name: str) -> Response:
        suffix = name[name.rindex("."):]
        return Response(_static(name), media_type=_CONTENT_TYPES[suffix], headers=_PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    def page():
        return static("index.html")

    @app.get("/static/page.js", include_in_schema=False)
    def page_js():
        return static("page.js")

    @app.get("/static/page.css", include_in_schema=False)
    def page_css():
        return static("page.css")

    # ------------------------------------------------------------------ read

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "version": served().version}

    @app.get("/v1/info")
    def info() -> dict:
        current = served()
        manifest = current.memory.manifest
        return {**manifest.to_dict(), "live": live_counts(state["live"].root, manifest).to_dict(),
                "serving": {"version": current.version, "write_enabled": settings.write_token is not None,
                            "max_upload_bytes": settings.max_upload_bytes, "rules": [r.value for r in VotingRule],
                            "image_queries": current.encoder is not None,
                            "rerank": None if settings.rerank is None else settings.rerank.kind + ":" +
                            settings.rerank.name}}

    @app.get("/v1/thumbnail", responses={404: {"model": schemas.ErrorResponse}},
             response_class=Response)
    def thumbnail(entry_id: str = Query(alias="id", min_length=1, max_length=4096)):
        current = served()
        try:
            uri = str(current.memory.get_uris([entry_id])[0])
        except KeyError:
            raise ApiError(404, "unknown_id", f"no live entry {entry_id!r} in version {current.version}",
                           option="id") from None
        if not uri:
            raise ApiError(404, "no_source", f"entry {entry_id!r} has no source uri recorded")
        try:
            png = _thumbnail_png(uri)
        except (OSError, ValueError) as e:
            raise ApiError(404, "source_unreadable", f"the source of entry {entry_id!r} cannot be read: {e}") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300",
                                                              "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------ classify

    def query_options(rule: str = Query(VotingRule.RANK.value, description="voting rule"),
                      k: int = Query(10, description="neighbours that vote (>= 1)"),
                      tau: float | None = Query(None, description="softmax temperature (> 0)"),
                      alpha: float | None = Query(None, description="rank-voting offset (> 0)"),
                      abstain_below: float | None = Query(None, description="abstain below this confidence"),
                      filter: str | None = Query(None, max_length=4096,  # pylint: disable=redefined-builtin
                                                 description="as vmem classify --filter"),
                      crowding: str | None = Query(None, max_length=256, description="as vmem classify --crowding"),
                      rerank_below: float | None = Query(None, description="re-rank gate (needs --rerank)"),
                      rerank_top_n: int = Query(10, description="neighbours a re-ranker is shown")
                      ) -> edits.QueryOptions:
        reranker = None
        below = settings.rerank_below if rerank_below is None else rerank_below
        if settings.rerank is not None and below is not None:
            if "reranker" not in state:  # Built once, on first use: a client, a second encoder.
                state["reranker"] = settings.rerank.build()
            reranker = state["reranker"]
        try:
            return edits.parse_query_options(rule=rule, k=k, tau=tau, alpha=alpha, abstain_below=abstain_below,
                                             filter_spec=filter, crowding_spec=crowding, rerank=reranker,
                                             rerank_below=below if reranker is not None else rerank_below,
                                             rerank_top_n=rerank_top_n)
        except edits.BadOption as e:
            raise ApiError(400, "bad_option", f"{e.option}: {e}", option=e.option) from None

    def classify_now(current: ServedVersion, query: np.ndarray | bytes, options: edits.QueryOptions,
                     return_embedding: bool) -> schemas.ClassifyResponse:
        memory, o = current.memory, options.classify
        kwargs = dict(rule=o.rule, k=o.k, params=o.params, abstain_below=o.abstain_below, filters=options.filters,
                      crowding=options.crowding, rerank=o.rerank, rerank_below=o.rerank_below,
                      rerank_top_n=o.rerank_top_n)
        if isinstance(query, bytes):
            if current.encoder is None:
                raise ApiError(400, "no_encoder", "this memory records no encoder, so it cannot embed images; "
                                                  "send the query's embedding as JSON {\"embedding\": [...]}",
                               option="image")
            try:
                vector = memory.embed_images([query], encoder=current.encoder)
            except ValueError as e:  # The decoder's reason (encoders.preprocess.ImageDecodeError), named.
                raise ApiError(413 if "too_large: " in str(e) else 422, "bad_image", str(e), option="image") from None
            # A re-ranker is shown the image itself; the vote alone needs only the embedding.
            prediction = memory.classify([query] if o.rerank is not None else vector, encoder=current.encoder,
                                         **kwargs)[0]
        else:
            vector = query
            prediction = memory.classify(vector, **kwargs)[0]
        return schemas.prediction_out(prediction, version=current.version, entry_weights=current.entry_weights,
                                      embedding=vector[0] if return_embedding else None)

    def embedding_of(current: ServedVersion, values: list[float]) -> np.ndarray:
        if len(values) != current.memory.dim:
            raise ApiError(400, "bad_option", f"embedding: got {len(values)} numbers, this memory's embeddings have "
                                              f"{current.memory.dim} (its encoder "
                                              f"{current.memory.manifest.encoder.get('name')!r})", option="embedding")
        return np.asarray([values], dtype=np.float32)

    _classify_body = {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": schemas.EmbeddingQuery.model_json_schema()}}, "required": True}

    @app.post("/v1/classify", response_model=schemas.ClassifyResponse, openapi_extra={"requestBody": _classify_body},
              responses={s: {"model": schemas.ErrorResponse} for s in (400, 413, 422)})
    async def classify(request: Request, return_embedding: bool = Query(False),
                       options: edits.QueryOptions = Depends(query_options)):
        body = await _read_body(request, settings.max_upload_bytes + _FRAMING_BYTES)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        current = served()
        if kind == "application/json":
            try:
                query: np.ndarray | bytes = embedding_of(
                    current, schemas.EmbeddingQuery.model_validate_json(body).embedding)
            except ValueError as e:  # pydantic's ValidationError is a ValueError.
                raise ApiError(400, "bad_option", f"embedding: {e}", option="embedding") from None
        elif kind == "multipart/form-data":
            query = await _image_of_multipart(request.headers, body)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            query = body
        else:
            raise ApiError(400, "bad_request", f"Content-Type {kind or 'missing'!r}: send an image as multipart field "
                                               "'image' or as image/* bytes, or JSON {\"embedding\": [...]}")
        if isinstance(query, bytes) and len(query) > settings.max_upload_bytes:
            raise ApiError(413, "too_large", f"the image has {len(query)} bytes, over the limit of "
                                             f"{settings.max_upload_bytes}", option="image")
        try:
            return await run_in_threadpool(classify_now, current, query, options, return_embedding)
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None

    @app.post("/v1/revote", response_model=schemas.RevoteResponse,
              responses={s: {"model": schemas.ErrorResponse} for s in (400, 404)})
    def revote(body: schemas.RevoteRequest, options: edits.QueryOptions = Depends(query_options)):
        current = served()
        vector = embedding_of(current, body.embedding)
        try:
            before, after = edits.revote(current.memory, vector[0], options, _changes(body.changes))
        except KeyError as e:
            raise ApiError(404, "unknown_id", str(e.args[0]), option="changes") from None
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        changed = {**current.entry_weights, **_changes(body.changes)}
        return schemas.RevoteResponse(
            version=current.version,
            before=schemas.prediction_out(before, version=current.version, entry_weights=current.entry_weights),
            after=schemas.prediction_out(after, version=current.version, entry_weights=changed))

    # ------------------------------------------------------------------ write

    def published(manifest) -> schemas.ApplyResponse:
        state["live"].refresh()  # This worker answers from the new version at once; others within their interval.
        return schemas.ApplyResponse(version=manifest.version, parent=manifest.parent,
                                     summary=str(manifest.change.get("summary", "")))

    write_errors = {s: {"model": schemas.ErrorResponse} for s in (400, 401, 403, 404, 409)}

    @app.post("/v1/apply", response_model=schemas.ApplyResponse, responses=write_errors)
    def apply(body: schemas.ApplyRequest, request: Request):
        _check_token(settings, request)
        try:
            manifest = edits.apply_changes(state["live"].root, _changes(body.changes), note=body.note,
                                           seen_version=body.version, verify=settings.verify)
        except KeyError as e:
            raise ApiError(404, "unknown_id", str(e.args[0]), option="changes") from None
        except ConcurrentUpdateError as e:
            raise ApiError(409, "conflict", f"{e}; nothing was published: apply again") from None
        _LOG.info("published version %d: %s", manifest.version, manifest.change.get("summary"))
        return published(manifest)

    @app.post("/v1/undo", response_model=schemas.ApplyResponse, responses=write_errors)
    def undo(body: schemas.UndoRequest, request: Request):
        _check_token(settings, request)
        try:
            manifest = edits.undo_changes(state["live"].root, body.version, note=body.note, verify=settings.verify)
        except ConcurrentUpdateError as e:
            raise ApiError(409, "conflict", str(e)) from None
        except ValueError as e:  # ManifestError (a purged version) is a ValueError too.
            raise ApiError(400, "bad_option", str(e), option="version") from None
        _LOG.info("published version %d: %s", manifest.version, manifest.change.get("summary"))
        return published(manifest)

    return app
