"""The ingest service: OpenAI-compatible HTTP front of scls (docs/design.md §4).

It validates and tokenises a request, applies backpressure (a bounded pending pool answers
429 with ``Retry-After``), writes the request with one MULTI, then waits on the request's
event stream for its final entry and answers with the text the workers committed.

This module builds the app (:func:`create_app`: lifespan, middleware); the endpoints are
:mod:`services.ingest.routes` and :mod:`services.ingest.aux_routes` (readiness, vLLM's
tokenize/detokenize/version/model), request checks and errors
:mod:`services.ingest.validation`, submitting, waiting and streaming
:mod:`services.ingest.completion`, readiness :mod:`services.ingest.readiness`. Nothing here
reads the environment: :func:`create_app` takes a :class:`Settings`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.ingest import aux_routes
from services.ingest.completion import Ingest
from services.ingest.openapi import document_request_bodies
from services.ingest.readiness import RETRY_AFTER_S
from services.ingest.routes import require_api_key, router
from services.ingest.validation import error_response, register_error_handlers
from shared.core.async_store import AsyncStore
from shared.core.keys import Keys
from shared.core.readiness import Readiness
from shared.core.waiter import EventWaiter, Unready
from shared.modeling.codec import chat_template_source
from shared.modeling.registry import ModelInfo, TextCodec, load_codec, model_info
from shared.obs.logging import get_logger
from shared.obs.prometheus import IngestMetrics
from shared.settings import Settings

_REDIS_POOL_SIZE = 64  # connections for request writes and reads (not for waiting)


# --- middleware -----------------------------------------------------------------------------


def _endpoint(scope: Scope) -> str:
    """The matched route's template (a bounded label value), or ``unmatched``."""
    route = scope.get("route")  # set by routing, once the request has been served
    return str(getattr(route, "path", None) or "unmatched")


class RequestCounter:
    """ASGI middleware counting every answered HTTP request by route and status code.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
    the app in a task group of its own, which here kept the lifespan from shutting down.
    """

    def __init__(self, app: ASGIApp, metrics: IngestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, noting the status of the response it gets."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.observe_request(_endpoint(scope), status)


def _unready_handler(keys: Keys) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The handler answering a wait ended by lost readiness (:class:`Unready`): 503 in
    OpenAI's shape, naming the request, which stays pending."""
    events_head = keys.request("")

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        key = exc.key if isinstance(exc, Unready) else ""
        rid = key.removeprefix(events_head).removesuffix(":events")
        get_logger("services.ingest").warning("wait ended: deployment not ready",
                                              request_id=rid, error=str(exc))
        return error_response(
            503, f"request {rid}: {exc}; poll GET /v1/requests/{rid} for its result",
            headers={"Retry-After": str(RETRY_AFTER_S), "X-Request-Id": rid}, code="not_ready")

    return handle


# --- factory -------------------------------------------------------------------------------


def create_app(
    settings: Settings, codec: TextCodec | None = None, info: ModelInfo | None = None
) -> FastAPI:
    """The ingest ASGI app for ``settings``.

    ``codec`` and ``info`` default to the configured model's tokenizer and facts; tests pass
    their own. The Redis client (``settings.redis_url``, which must be set: the CLI starts the
    embedded server first) is opened and closed by the app's lifespan.
    """
    if not settings.redis_url:
        raise ValueError("settings.redis_url must be set to create the ingest app")
    if codec is None:
        template = (chat_template_source(settings.chat_template)
                    if settings.chat_template else None)
        codec = load_codec(settings.model, settings.cache_dir, template)
    if info is None:
        info = model_info(settings.model, settings.cache_dir, settings.device)
    ingest = Ingest(settings=settings, codec=codec, info=info, keys=Keys(settings.key_prefix),
                    started_at=int(time.time()))
    redis_url = settings.redis_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Created here, not in the factory, so the client belongs to the serving event loop.
        # Requests hold a connection of the store's pool only briefly: waiting for results
        # goes through the one EventWaiter connection.
        ingest.async_store = AsyncStore.open(redis_url, ingest.keys, _REDIS_POOL_SIZE)
        readiness = app.state.readiness = Readiness.open(redis_url, ingest.keys)
        ingest.waiter = EventWaiter(redis_url, health=readiness.unready_reason,
                                    grace_s=settings.unready_grace_s)
        await ingest.waiter.start()
        try:
            yield
        finally:
            if ingest.background:  # cancels of streams whose clients just left
                await asyncio.wait(ingest.background, timeout=5.0)
            await ingest.waiter.stop()
            ingest.waiter = None
            await ingest.async_store.aclose()
            ingest.async_store = None
            await readiness.aclose()
            app.state.readiness = None

    app = FastAPI(title="scls ingest", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible front of the SCLS serving system")
    app.state.ingest = ingest
    app.state.readiness = None  # set while the lifespan runs
    register_error_handlers(app)
    app.add_exception_handler(Unready, _unready_handler(ingest.keys))
    app.add_middleware(RequestCounter, metrics=ingest.metrics)
    app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(aux_routes.router, dependencies=[Depends(require_api_key)])
    document_request_bodies(app)
    return app
