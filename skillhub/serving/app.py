"""The OpenAI-compatible app (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health`` and ``/metrics``.

The HTTP layer checks what it can without the model (the API key, the concurrency limit, the
body's size and shape) and hands the request to the :class:`~skillhub.serving.engine.Engine`,
whose thread owns the model. It waits for the engine's first event (the packs, or why not) before
answering, so a bad model id or an overlong prompt is a 4xx even for a stream, and a stream's
headers already say which packs answer. Every error is OpenAI's error JSON; nothing a client
sends stops the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from skillhub import __version__
from skillhub.errors import NotFoundError, SkillhubError
from skillhub.registry.front import Registry
from skillhub.routing.generate import Generator
from skillhub.serving.auth import Authorizer
from skillhub.serving.browser import browser_routes
from skillhub.serving.catalog import Catalog
from skillhub.serving.engine import Decided, Engine, Event, Failed, Finished, Job, Text
from skillhub.serving.metrics import CONTENT_TYPE, ServerMetrics
from skillhub.serving.protocol import (
    BadRequest,
    chunk,
    completion,
    error_body,
    new_id,
    parse_request,
    routing_headers,
    routing_info,
    usage,
)

CLIENT_GONE = 499  # nginx's status for a client that closed the connection first


@dataclass(frozen=True)
class Limits:
    """What one request, and the server, may use.

    Args:
        max_batch: Most requests generated together.
        max_tokens: Most tokens per answer (also a request's default ``max_tokens``).
        max_concurrent: Requests in flight (waiting or generating); beyond it, 429.
        max_body_bytes: Largest request body; beyond it, 413.
        request_timeout: Seconds a request may take from arrival to its last token; beyond it, 504.
        cache_sets: Pack sets whose patched weights stay computed beside the base for switching back
            (memory: base + cache_sets x the parameters a set changes; a switch to a set not kept
            decodes its packs again).
    """

    max_batch: int = 8
    max_tokens: int = 256
    max_concurrent: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0
    cache_sets: int = 2


def _error(exc: BadRequest) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, code=exc.code, param=exc.param), status_code=exc.status)


def _sse(document: dict[str, Any]) -> str:
    return f"data: {json.dumps(document)}\n\n"


async def _read_body(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise BadRequest(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise BadRequest(413, f"the request body is larger than this server's limit of {limit} bytes",
                                 code="request_too_large")
    except ClientDisconnect:
        raise BadRequest(CLIENT_GONE, "the client closed the connection", code="client_gone") from None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:
        raise BadRequest(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


class _Exchange:
    """One request's bookkeeping: its events, and its metrics recorded once when it ends."""

    def __init__(self, metrics: ServerMetrics, endpoint: str) -> None:
        self.metrics, self.endpoint = metrics, endpoint
        self.started = time.monotonic()
        self.model = "unknown"
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._open = True
        metrics.active += 1
        metrics.in_flight.inc()

    def deliver(self, event: Event) -> None:  # from the engine's thread
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits
            pass

    async def next(self, job: Job, request: Request | None, grace: float = 5.0) -> Event:
        """The job's next event; ``request`` given, a client that went away ends the wait."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.gone = True
                    raise BadRequest(CLIENT_GONE, "the client closed the connection", code="client_gone") from None
                if time.monotonic() > job.deadline + grace:  # the engine enforces the deadline; this is a backstop
                    job.gone = True
                    raise BadRequest(504, "the request took longer than the server's request timeout",
                                     code="timeout") from None

    def close(self, status: int) -> None:
        if self._open:
            self._open = False
            self.metrics.active -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(self.endpoint, self.model, str(status)).inc()
            self.metrics.latency.labels(self.endpoint, self.model).observe(time.monotonic() - self.started)


def _common(app: FastAPI, api_key: str | None) -> Authorizer:
    """What the server and the browser alone share: OpenAI-style errors for every failure (a page
    asked without the key goes to ``/login``), and the key's check."""
    authorize = Authorizer(api_key)
    app.include_router(authorize.routes())

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        if exc.status == 401 and not request.url.path.startswith(("/v1/", "/api/", "/metrics")):
            return RedirectResponse("/login", status_code=303)
        return _error(exc)

    @app.exception_handler(SkillhubError)
    async def refused(_request: Request, exc: SkillhubError) -> JSONResponse:  # a page or /api/ asked for what is not
        return _error(BadRequest(404 if isinstance(exc, NotFoundError) else 400, str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(BadRequest(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                                 else "invalid_request"))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(BadRequest(500, "internal server error: see the server's log", code="internal_error"))

    return authorize


def create_browser_app(registry: Registry, *, api_key: str | None = None) -> FastAPI:
    """The registry browser alone (``skillhub ui``): pages and ``/api/``, no model loaded, no playground."""
    app = FastAPI(title="skillhub registry browser", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.include_router(browser_routes(registry, authorize=_common(app, api_key), playground=False))
    return app


def create_app(registry: Registry, *, base: str | None = None, base_location: str | None = None,
               limits: Limits = Limits(), api_key: str | None = None, device: str | None = None,
               allow_stale: bool = False) -> FastAPI:
    """The server as an ASGI app, to run with uvicorn (``skillhub serve``) or mount in another app.

    The base model is loaded when the app starts (its lifespan), and the engine's thread stops,
    after the queued requests, when it shuts down.

    Args:
        registry: The registry whose packs it serves (read live: changes need no restart).
        base: Registered base name (needed when there are several).
        base_location: Where the base weights are (default: recorded at add).
        limits: See :class:`Limits`.
        api_key: Required as ``Authorization: Bearer KEY`` on ``/v1`` and ``/metrics`` when set.
        device: Where the model runs (default: the CPU).
        allow_stale: Route ``auto`` with a stale router among the classes it knows.
    """
    metrics = ServerMetrics()
    catalog = Catalog(registry, base=base, allow_stale=allow_stale)
    engines: list[Engine] = []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        generator = await run_in_threadpool(lambda: Generator(
            registry, base=base, base_location=base_location, max_new_tokens=limits.max_tokens,
            allow_stale=allow_stale, cache_sets=limits.cache_sets, device=device))
        engine = Engine(generator, max_batch=limits.max_batch, observe=metrics.observe)
        engine.start()
        engines.append(engine)
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="skillhub", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics, app.state.catalog = metrics, catalog

    authorize = _common(app, api_key)
    app.include_router(browser_routes(registry, authorize=authorize, playground=True))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engines else "starting", "waiting": engines[0].waiting if engines else 0}

    @app.get("/metrics")
    async def metrics_page(request: Request) -> Response:
        authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": await run_in_threadpool(catalog.models)}

    @app.get("/v1/models/{model_id}")
    async def one_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        for model in await run_in_threadpool(catalog.models):
            if model["id"] == model_id:
                return model
        raise BadRequest(404, f"no model {model_id!r} on this server: see /v1/models", code="model_not_found",
                         param="model")

    async def complete(request: Request, chat: bool) -> Response:
        exchange = _Exchange(metrics, "chat" if chat else "completions")
        status, streaming = 200, False
        try:
            authorize(request)
            if metrics.active > limits.max_concurrent:
                raise BadRequest(429, f"the server is answering {limits.max_concurrent} requests already: retry later",
                                 code="too_many_requests")
            document = await _read_body(request, limits.max_body_bytes)
            asked, stream, include_usage = parse_request(document, chat=chat, max_tokens=limits.max_tokens)
            job = Job(asked, exchange.deliver, deadline=exchange.started + limits.request_timeout)
            engines[0].submit(job)
            decided = await exchange.next(job, request)
            if isinstance(decided, Failed):
                raise BadRequest(decided.status, decided.message, code=decided.code,
                                 param="model" if decided.status == 404 else None)
            exchange.model = asked.model
            metrics.prompt_tokens.labels(asked.model).inc(decided.prompt_tokens)
            headers = routing_headers(decided)
            if stream:
                streaming = True
                return StreamingResponse(_stream(exchange, job, decided, chat, include_usage),
                                         media_type="text/event-stream", headers=headers)
            event = await exchange.next(job, request)
            while isinstance(event, Text):
                event = await exchange.next(job, request)
            if isinstance(event, Failed):
                raise BadRequest(event.status, event.message, code=event.code)
            return JSONResponse(completion(chat=chat, id_=new_id(chat), model=asked.model, text=event.text,
                                           reason=event.reason, decided=decided,
                                           completion_tokens=event.completion_tokens), headers=headers)
        except BadRequest as exc:
            status = exc.status
            return _error(exc)
        finally:
            if not streaming:
                exchange.close(status)

    async def _stream(exchange: _Exchange, job: Job, decided: Decided, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        id_, created, status = new_id(chat), int(time.time()), CLIENT_GONE
        model = job.request.model
        try:
            yield _sse(chunk(chat=chat, id_=id_, model=model, created=created, first=True,
                             extra={"skillhub": routing_info(decided)}))
            first_text = True
            while True:
                event = await exchange.next(job, None)
                if isinstance(event, Text):
                    if first_text:
                        metrics.first_token.labels(model).observe(time.monotonic() - exchange.started)
                        first_text = False
                    yield _sse(chunk(chat=chat, id_=id_, model=model, created=created, text=event.text))
                    continue
                if isinstance(event, Finished):
                    yield _sse(chunk(chat=chat, id_=id_, model=model, created=created, reason=event.reason))
                    if include_usage:
                        yield _sse({"id": id_, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "created": created, "model": model, "choices": [],
                                    "usage": usage(decided.prompt_tokens, event.completion_tokens)})
                    status = 200
                else:  # a stream that started cannot change its status: the error is its last event
                    yield _sse(error_body(event.status, event.message, code=event.code))
                    status = event.status
                yield "data: [DONE]\n\n"
                return
        finally:
            if status == CLIENT_GONE:
                job.gone = True
            exchange.close(status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app
