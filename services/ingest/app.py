"""The ingest service: OpenAI-compatible HTTP front of scls (docs/design.md §4).

It validates and tokenises a request, applies backpressure (a bounded pending pool answers
429 with ``Retry-After``), writes the request with one MULTI, then waits on the request's
event stream for its final entry and answers with the text the workers committed.

Nothing here reads the environment: :func:`create_app` takes a :class:`Settings`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.ingest.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    AssistantMessage,
    CancelResponse,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationParams,
    ModelCard,
    ModelList,
    RequestStatusResponse,
    SclsInfo,
    Usage,
)
from services.ingest.streaming import ChunkFormat, Finished, StopHoldback, stream_chunks
from services.ingest.waiter import EventWaiter
from shared.core.keys import Keys
from shared.core.records import RequestParams, RequestRecord, new_request_id, now
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import CancelOutcome, cancel_call, cancel_outcome, lua_source, submit_call
from shared.modeling.registry import ModelInfo, TextCodec, load_codec, model_info
from shared.obs.logging import bound, get_logger
from shared.obs.prometheus import CONTENT_TYPE_LATEST, IngestMetrics, exposition
from shared.policy.presets import is_continuous
from shared.settings import Settings


def _log() -> structlog.stdlib.BoundLogger:
    # Fetched per use: get_logger binds at call time, and a module-level logger would keep
    # the structlog configuration of import time, before the CLI configures logging.
    return get_logger("services.ingest")


#: Seconds a client is told to wait after a 429.
RETRY_AFTER_S = 1
#: XREAD blocks at most this long per call, so a vanished client is noticed in time.
_WAIT_CHUNK_S = 1.0
_REDIS_POOL_SIZE = 64  # connections for request writes and reads (not for waiting)
#: Bound on a health-check PING.
_PING_TIMEOUT_S = 2.0
#: Request ids as ``new_request_id`` makes them (and test ids); anything else is unknown. This
#: also keeps a crafted id such as ``x:events`` from naming another key.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: Prefixes of the ids in completion responses, accepted by ``GET /v1/requests/{id}``.
_ID_PREFIXES = ("chatcmpl-", "cmpl-")

B = TypeVar("B", bound=BaseModel)


# --- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.code = code


class ClientDisconnected(Exception):
    """The HTTP client went away while its request was being served (which goes on)."""


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    body = {"error": {"message": message, "type": _error_type(status), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message (``"max_tokens: Input should be ..."``) and the first bad field."""
    parts = []
    for err in errors[:3]:
        where = _loc(err.get("loc", ()))
        parts.append(f"{where}: {_error_text(err)}" if where else _error_text(err))
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more errors")
    first = _loc(errors[0].get("loc", ())) if errors else ""
    return "; ".join(parts), first or None


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    # FastAPI prefixes locations with where the value came from ("body", "path"): drop it.
    parts = list(loc)
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def _error_text(err: dict[str, Any]) -> str:
    # pydantic words our own ValueErrors as "Value error, <text>": keep only the text.
    if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return str(err.get("msg", "invalid value"))


def _register_error_handlers(app: FastAPI) -> None:
    """Answer every error, including FastAPI's own, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        log = _log()
        level = log.warning if exc.status >= 500 else log.info
        level("error response", status=exc.status, error=exc.message, path=request.url.path)
        return error_response(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        _log().info("client disconnected; the request goes on", request_id=str(exc))
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        _log().error("redis error", error=str(exc), path=request.url.path)
        return error_response(503, f"the request store (Redis) is unavailable: {exc}")


async def parse_body(request: Request, model: type[B]) -> B:
    """The request's JSON body validated as ``model``, or a 400 :class:`APIError`.

    Parsed by hand rather than by FastAPI so that a missing or wrong Content-Type still
    works (as with OpenAI) and every failure gets its own clear message.
    """
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()))
        raise APIError(400, message, param=param) from None


# --- the service ----------------------------------------------------------------------------


@dataclass
class Ingest:
    """What the endpoints share: settings, tokenizer, model facts and the Redis client."""

    settings: Settings
    codec: TextCodec
    info: ModelInfo
    keys: Keys
    started_at: int
    client: aioredis.Redis | None = None
    waiter: EventWaiter | None = None  # one connection waits for every request's final event
    submit_script: Any = None  # lua/submit.lua on ``client`` (an exact pending-pool bound)
    cancel_script: Any = None  # lua/cancel.lua on ``client``
    background: set[asyncio.Task[None]] = field(default_factory=set)  # fire-and-forget work
    metrics: IngestMetrics = field(default_factory=IngestMetrics)  # this app's own registry

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client; it exists while the app's lifespan runs."""
        if self.client is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        return self.client

    @property
    def served_names(self) -> frozenset[str]:
        """Names a request's ``model`` may give: the canonical one and the configured one."""
        return frozenset({self.info.name, self.settings.model})

    def check_model(self, requested: str | None) -> None:
        """404 unless ``requested`` is absent or names the served model."""
        if requested is None or requested in self.served_names:
            return
        raise APIError(
            404,
            f"model {requested!r} is not served here: this server serves {self.info.name!r}",
            param="model",
        )

    def check_supported(self, body: GenerationParams) -> None:
        """400 for OpenAI options the server does not implement."""
        if body.n not in (None, 1):
            raise APIError(400, f"n: only n=1 is supported, got {body.n}", param="n")

    def check_token_ids(self, ids: list[int]) -> None:
        """400 if a token id given by the client is outside the model's vocabulary."""
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )

    def build_params(
        self, body: GenerationParams, max_tokens: int | None, prompt_len: int, prompt_param: str
    ) -> RequestParams:
        """Generation parameters with defaults applied and the length limits checked."""
        limit, max_gen = self.info.context_limit, self.settings.max_gen_length
        if max_tokens is None:
            max_tokens = self._default_max_tokens(prompt_param, prompt_len)
        if max_tokens > max_gen:
            raise APIError(
                400,
                f"max_tokens: Input should be less than or equal to {max_gen} "
                "(the server's max_gen_length)",
                param="max_tokens",
            )
        if prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"this model's context limit is {limit} tokens, but the request needs "
                f"{prompt_len + max_tokens}: {prompt_len} prompt tokens + {max_tokens} "
                "max_tokens; shorten the prompt or lower max_tokens",
                param=prompt_param,
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        self._check_policy_supports(temperature, body.stop_strings)
        seed = body.seed
        if temperature > 0 and seed is None:
            # Stored with the request so every slice, on any worker, draws the same stream.
            seed = secrets.randbits(63)
        return RequestParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=seed,
            stop=body.stop_strings,
            ignore_eos=bool(body.ignore_eos),
        )

    def _check_policy_supports(self, temperature: float, stop: tuple[str, ...]) -> None:
        # The ILS baseline runs transformers' continuous batching, which decodes greedily
        # with no stop strings here: refuse rather than silently ignore what was asked.
        if not is_continuous(self.settings.policy):
            return
        if temperature > 0:
            raise APIError(400, "temperature: the ils policy (continuous-batching baseline) "
                           "decodes greedily; send temperature 0", param="temperature")
        if stop:
            raise APIError(400, "stop: the ils policy does not support stop strings",
                           param="stop")

    def _default_max_tokens(self, prompt_param: str, prompt_len: int) -> int:
        # Completions default to OpenAI's 16; chat (like OpenAI) to whatever room is left.
        if prompt_param == "prompt":
            return DEFAULT_COMPLETION_MAX_TOKENS
        return max(1, min(self.settings.max_gen_length, self.info.context_limit - prompt_len))

    async def submit(self, prompt_ids: list[int], params: RequestParams) -> RequestRecord:
        """Write a new pending request, or answer 429 when the pending pool is full.

        The check and the write are one Lua script, so the bound is exact under any
        number of concurrent submissions.
        """
        record = RequestRecord(
            id=new_request_id(), prompt_ids=prompt_ids, params=params, arrival=now(),
            model=self.info.name,
        )
        if self.submit_script is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        keys, args = submit_call(self.keys, record, self.settings.max_pending)
        written, pending = await self.submit_script(keys=keys, args=args)
        if not written:
            raise APIError(
                429,
                f"the server is at capacity ({pending} requests pending, limit "
                f"{self.settings.max_pending}): retry after {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return record

    async def wait_final(self, request_id: str, request: Request) -> dict[str, str] | None:
        """Block until the request's final event; None when ``request_timeout_s`` passes.

        The shared :class:`EventWaiter` watches the stream (from its start, so a final entry
        written before we started waiting is seen too); this checks every second whether
        the client went away, raising :class:`ClientDisconnected` if so.
        """
        if self.waiter is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        key = self.keys.events(request_id)
        while (remaining := deadline - loop.time()) > 0:
            final = await self.waiter.wait(key, min(remaining, _WAIT_CHUNK_S))
            if final is not None:
                return final
            if await request.is_disconnected():
                raise ClientDisconnected(request_id)
        return None

    async def finished_record(self, request_id: str) -> RequestRecord:
        """The record of a request that has ended: finished, or cancelled (its text is then
        what it generated before, ``finish_reason`` "cancelled"); an error response if it
        failed."""
        raw = await self.redis.hgetall(self.keys.request(request_id))
        if not raw:
            raise APIError(500, f"request {request_id} ended but its record has expired",
                           headers={"X-Request-Id": request_id})
        record = RequestRecord.from_hash(raw)
        if record.status is RequestStatus.CANCELLED:
            text = await run_in_threadpool(self.codec.decode, record.generated_ids)
            return replace(record, text=text)
        if record.status is not RequestStatus.FINISHED:
            raise _failure(record)
        return record

    async def cancel(
        self, request_id: str, reason: str = "cancelled by the client"
    ) -> tuple[CancelOutcome, str]:
        """Withdraw a request (``lua/cancel.lua``)."""
        if self.cancel_script is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        keys, args = cancel_call(self.keys, request_id, reason, self.settings.result_ttl_s)
        return cancel_outcome(await self.cancel_script(keys=keys, args=args))

    def cancel_in_background(self, request_id: str, reason: str) -> None:
        """Cancel from code that may not await any more (a stream's body being torn down
        after its client left): a task of its own, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(self._cancel_logged(request_id, reason))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _cancel_logged(self, request_id: str, reason: str) -> None:
        with bound(request_id=request_id):
            try:
                outcome, status = await self.cancel(request_id, reason)
            except (RedisError, RuntimeError) as exc:
                _log().warning("cancel failed", reason=reason, error=str(exc))
                return
            _log().info("request cancel", outcome=outcome.value, status=status, reason=reason)

    async def get_record(self, request_id: str) -> RequestRecord | None:
        """The request's record, or None if unknown or expired."""
        raw = await self.redis.hgetall(self.keys.request(request_id))
        return RequestRecord.from_hash(raw) if raw else None


def _failure(record: RequestRecord) -> APIError:
    """The error answered for a request that failed or was cancelled."""
    reason = record.finish_reason.value if record.finish_reason else record.status.value
    # never_fits: the request was valid but no instance can hold it; 503 says "not here, not
    # now" without blaming the client. Every other failure is the server's: 500.
    status = 503 if record.finish_reason is FinishReason.NEVER_FITS else 500
    detail = record.error or reason
    return APIError(
        status,
        f"request {record.id} {record.status.value} ({reason}): {detail}",
        headers={"X-Request-Id": record.id},
    )


def _timings(record: RequestRecord) -> dict[str, float | None]:
    """Queue time, time to first slice and end-to-end latency, in seconds (None if unknown)."""

    def since_arrival(ts: float | None) -> float | None:
        return None if ts is None else round(ts - record.arrival, 6)

    return {
        "queue_time_s": since_arrival(record.first_claimed_at),
        "ttft_s": since_arrival(record.first_slice_at),
        "e2e_s": since_arrival(record.finished_at),
    }


def _usage(record: RequestRecord) -> Usage:
    prompt, completion = len(record.prompt_ids), len(record.generated_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def _scls_info(record: RequestRecord) -> SclsInfo:
    return SclsInfo(request_id=record.id, slices=record.slices, **_timings(record))


def _finish_reason(record: RequestRecord) -> str | None:
    return record.finish_reason.value if record.finish_reason else None


# --- endpoints ------------------------------------------------------------------------------

router = APIRouter()


def _ingest(request: Request) -> Ingest:
    ingest: Ingest = request.app.state.ingest
    return ingest


async def _accept(
    request: Request,
    body: GenerationParams,
    encode: Callable[[], list[int]],
    max_tokens: int | None,
    prompt_param: str,
) -> RequestRecord:
    """Tokenise, check and submit one request (both endpoints, streaming or not)."""
    ingest = _ingest(request)
    ingest.check_model(body.model)
    ingest.check_supported(body)
    # Tokenising a long prompt is CPU work: keep it off the event loop.
    prompt_ids = await run_in_threadpool(encode)
    if not prompt_ids:
        raise APIError(400, f"{prompt_param}: must not be empty", param=prompt_param)
    params = ingest.build_params(body, max_tokens, len(prompt_ids), prompt_param)
    record = await ingest.submit(prompt_ids, params)
    with bound(request_id=record.id):
        _log().info("request accepted", path=request.url.path, prompt_tokens=len(prompt_ids),
                    max_tokens=params.max_tokens, temperature=params.temperature,
                    stream=bool(body.stream))
    return record


async def _finished(ingest: Ingest, record: RequestRecord) -> RequestRecord:
    """The ended request's record (finished or cancelled; an :class:`APIError` if it
    failed), logged and counted."""
    with bound(request_id=record.id):
        done = await ingest.finished_record(record.id)
        _log().info("request finished", finish_reason=_finish_reason(done),
                    completion_tokens=len(done.generated_ids), slices=done.slices,
                    **_timings(done))
    ingest.metrics.observe_finished(_timings(done), len(done.prompt_ids),
                                    len(done.generated_ids))
    return done


async def _serve(request: Request, response: Response, record: RequestRecord) -> RequestRecord:
    """Wait for an accepted request to end and read it back (non-streaming)."""
    ingest = _ingest(request)
    response.headers["X-Request-Id"] = record.id
    with bound(request_id=record.id):
        final = await ingest.wait_final(record.id, request)
    if final is None:
        raise _timeout(record.id, ingest.settings.request_timeout_s)
    return await _finished(ingest, record)


def _stream(request: Request, record: RequestRecord, body: GenerationParams,
            chat: bool) -> StreamingResponse:
    """Server-sent events of an accepted request (``stream: true``), see
    :mod:`services.ingest.streaming`."""
    ingest = _ingest(request)
    timeout_s = ingest.settings.request_timeout_s
    fmt = ChunkFormat(
        chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{record.id}",
        created=int(record.arrival), model=ingest.info.name,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )

    async def finish() -> Finished:
        done = await _finished(ingest, record)
        return Finished(done.text, _finish_reason(done), _usage(done).model_dump(),
                        _scls_info(done).model_dump())

    async def events() -> AsyncIterator[str]:
        if ingest.waiter is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        key = ingest.keys.events(record.id)
        # Subscribed here, in the body, so that a client gone before the body starts
        # leaves no watch behind; the stream is read from its start either way.
        queue = await ingest.waiter.subscribe(key)
        ended = False
        try:
            async for event in stream_chunks(
                queue, fmt, StopHoldback(record.params.stop), finish, timeout_s,
                _error_event, lambda: _timeout(record.id, timeout_s),
            ):
                yield event
            ended = True
        finally:
            ingest.waiter.unsubscribe(key, queue)
            if not ended:  # the client went away mid-stream: stop spending slices on it
                ingest.cancel_in_background(record.id, "the streaming client disconnected")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"X-Request-Id": record.id, "Cache-Control": "no-cache"})


def _error_event(exc: Exception) -> dict[str, Any]:
    """The ``{"error": ...}`` event that ends a stream whose request did not finish."""
    status, message = (exc.status, exc.message) if isinstance(exc, APIError) else (500, str(exc))
    _log().warning("stream ended with an error", status=status, error=message)
    return {"error": {"message": message, "type": _error_type(status), "param": None,
                      "code": getattr(exc, "code", None)}}


def _timeout(request_id: str, timeout_s: float) -> APIError:
    return APIError(
        504,
        f"request {request_id} did not finish within {timeout_s:g} s; it is still being "
        f"served: poll GET /v1/requests/{request_id} for its result",
        headers={"X-Request-Id": request_id},
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 429, 500, 503, 504)
}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(request: Request, response: Response) -> Any:
    """OpenAI text completion: one prompt, one choice (``stream: true``: server-sent
    events, a chunk per slice)."""
    body = await parse_body(request, CompletionRequest)
    ingest = _ingest(request)
    prompt = body.prompt

    def encode() -> list[int]:
        if isinstance(prompt, str):
            return ingest.codec.encode(prompt)
        ingest.check_token_ids(prompt)
        return list(prompt)

    accepted = await _accept(request, body, encode, body.max_tokens, "prompt")
    if body.stream:
        return _stream(request, accepted, body, chat=False)
    record = await _serve(request, response, accepted)
    return CompletionResponse(
        id=f"cmpl-{record.id}",
        created=int(record.arrival),
        model=ingest.info.name,
        choices=[CompletionChoice(text=record.text, finish_reason=_finish_reason(record))],
        usage=_usage(record),
        scls=_scls_info(record),
    )


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(request: Request, response: Response) -> Any:
    """OpenAI chat completion: messages through the model's chat template (``stream:
    true``: server-sent events, a chunk per slice)."""
    body = await parse_body(request, ChatCompletionRequest)
    ingest = _ingest(request)
    messages = body.as_dicts()

    def encode() -> list[int]:
        try:
            return ingest.codec.encode_chat(messages)
        except Exception as exc:  # a template may reject a conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template rejected them: {exc}",
                           param="messages") from None

    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    accepted = await _accept(request, body, encode, max_tokens, "messages")
    if body.stream:
        return _stream(request, accepted, body, chat=True)
    record = await _serve(request, response, accepted)
    return ChatCompletionResponse(
        id=f"chatcmpl-{record.id}",
        created=int(record.arrival),
        model=ingest.info.name,
        choices=[ChatChoice(message=AssistantMessage(content=record.text),
                            finish_reason=_finish_reason(record))],
        usage=_usage(record),
        scls=_scls_info(record),
    )


def _bare_id(request_id: str) -> str | None:
    """A request id without the ``cmpl-``/``chatcmpl-`` prefix; None if malformed."""
    rid = next((request_id[len(p):] for p in _ID_PREFIXES if request_id.startswith(p)),
               request_id)
    return rid if _REQUEST_ID.match(rid) else None


def _unknown(request_id: str) -> APIError:
    return APIError(404, f"request {request_id!r} is unknown or has expired",
                    param="request_id")


@router.get("/v1/requests/{request_id}", response_model=RequestStatusResponse,
            responses={404: {"model": ErrorResponse}})
async def get_request(request_id: str, request: Request) -> RequestStatusResponse:
    """Where a request is and, once finished, its text (also after a 504)."""
    rid = _bare_id(request_id)
    record = await _ingest(request).get_record(rid) if rid else None
    if record is None:
        raise _unknown(request_id)
    finished = record.status is RequestStatus.FINISHED
    return RequestStatusResponse(
        id=record.id,
        model=record.model,
        status=record.status.value,
        finish_reason=_finish_reason(record),
        error=record.error or None,
        prompt_tokens=len(record.prompt_ids),
        completion_tokens=len(record.generated_ids),
        slices=record.slices,
        fence=record.fence,
        batch=record.batch or None,
        retries=record.retries,
        text=record.text if finished else None,
        arrival=record.arrival,
        first_claimed_at=record.first_claimed_at,
        first_slice_at=record.first_slice_at,
        finished_at=record.finished_at,
        **_timings(record),
    )


@router.post("/v1/requests/{request_id}/cancel", response_model=CancelResponse,
             responses={202: {"model": CancelResponse}, 404: {"model": ErrorResponse},
                        409: {"model": ErrorResponse}})
async def cancel_request(request_id: str, request: Request, response: Response) -> Any:
    """Withdraw a request. Pending: it ends now (200). Running: it ends when its current
    slice commits, keeping that slice's tokens (202). Its waiting client gets what was
    generated with ``finish_reason`` "cancelled"; a stream ends the same way."""
    rid = _bare_id(request_id)
    if rid is None:
        raise _unknown(request_id)
    outcome, status = await _ingest(request).cancel(rid)
    if outcome is CancelOutcome.UNKNOWN:
        raise _unknown(request_id)
    if outcome is CancelOutcome.ENDED:
        raise APIError(409, f"request {rid} has already ended ({status}): nothing to cancel",
                       param="request_id")
    with bound(request_id=rid):
        _log().info("request cancel", outcome=outcome.value)
    if outcome is CancelOutcome.MARKED:
        response.status_code = 202
        return CancelResponse(id=rid, status="cancelling",
                              message="running: it ends when its current slice commits")
    return CancelResponse(id=rid, status="cancelled", message="it was pending: ended now")


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The one served model, in OpenAI's list shape."""
    ingest = _ingest(request)
    card = ModelCard(id=ingest.info.name, created=ingest.started_at,
                     max_model_len=ingest.info.context_limit)
    return ModelList(data=[card])


@router.get("/healthz", responses={503: {"description": "Redis does not answer"}})
async def healthz(request: Request) -> Any:
    """200 while Redis answers PING, 503 otherwise."""
    try:
        await asyncio.wait_for(_ingest(request).redis.ping(), timeout=_PING_TIMEOUT_S)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        return JSONResponse({"status": "unavailable", "error": f"redis: {exc!r}"},
                            status_code=503)
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this ingest process (open even when an API key is set)."""
    ingest = _ingest(request)
    try:
        pending = await asyncio.wait_for(ingest.redis.zcard(ingest.keys.pending),
                                         timeout=_PING_TIMEOUT_S)
    except (RedisError, OSError, asyncio.TimeoutError):
        pending = float("nan")  # unknown, and the scrape still answers
    ingest.metrics.pending.set(pending)
    return Response(exposition(ingest.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- middleware -----------------------------------------------------------------------------

def _endpoint(scope: Scope) -> str:
    """The matched route's template (a bounded label value), or ``unmatched``."""
    route = scope.get("route")  # set by routing, once the request has been served
    return str(getattr(route, "path", None) or "unmatched")


def _has_api_key(request: Request, api_key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), api_key.encode()
    )


async def require_api_key(request: Request) -> None:
    """401 on /v1/* unless ``Authorization: Bearer <settings.api_key>`` (when one is set).

    A dependency of every route, so it runs after routing (the request is counted under
    its route) and before the endpoint reads the body; /healthz and /metrics stay open.
    """
    api_key = _ingest(request).settings.api_key
    v1 = request.scope["path"].startswith("/v1/")
    if api_key and v1 and not _has_api_key(request, api_key):
        raise APIError(
            401, "missing or invalid API key: send the header 'Authorization: Bearer <key>' "
            "with the key the server was given (SCLS_API_KEY)",
            headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key",
        )


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


# --- factory --------------------------------------------------------------------------------


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
        codec = load_codec(settings.model, settings.cache_dir)
    if info is None:
        info = model_info(settings.model, settings.cache_dir, settings.device)
    ingest = Ingest(settings=settings, codec=codec, info=info, keys=Keys(settings.key_prefix),
                    started_at=int(time.time()))
    redis_url = settings.redis_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Created here, not in the factory, so the client belongs to the serving event loop.
        # A blocking pool: a burst of requests queues for a connection for up to 10 s
        # instead of failing with "Too many connections" (redis-py's plain pool raises at
        # its default cap of 100). Requests hold a connection only briefly: waiting for
        # results goes through the one EventWaiter connection.
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=_REDIS_POOL_SIZE, timeout=10, decode_responses=True,
            health_check_interval=30)
        ingest.client = aioredis.Redis.from_pool(pool)
        ingest.submit_script = ingest.client.register_script(lua_source("submit"))
        ingest.cancel_script = ingest.client.register_script(lua_source("cancel"))
        ingest.waiter = EventWaiter(redis_url)
        await ingest.waiter.start()
        try:
            yield
        finally:
            if ingest.background:  # cancels of streams whose clients just left
                await asyncio.wait(ingest.background, timeout=5.0)
            await ingest.waiter.stop()
            ingest.waiter = None
            await ingest.client.aclose()
            ingest.client = None
            ingest.submit_script = ingest.cancel_script = None

    app = FastAPI(title="scls ingest", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible front of the SCLS serving system")
    app.state.ingest = ingest
    _register_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=ingest.metrics)
    app.include_router(router, dependencies=[Depends(require_api_key)])
    return app
