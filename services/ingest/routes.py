"""The ingest's HTTP routes: completions, chat completions, request status and cancel,
models, health and metrics; and the API-key dependency every route has."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from services.ingest.completion import (
    Shape,
    TokenStrings,
    accept,
    assistant_message,
    best_of,
    finish_reason,
    ingest_of,
    scls_info,
    serve,
    stream,
    timings,
    total_usage,
)
from services.ingest.schemas import (
    CancelResponse,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestStatusResponse,
)
from services.ingest.structured import shows_tools
from services.ingest.validation import APIError, parse_body
from shared.core.states import RequestStatus
from shared.core.store import CancelOutcome
from shared.obs.logging import bound, get_logger
from shared.obs.prometheus import CONTENT_TYPE_LATEST, exposition

#: Bound on a health-check PING.
_PING_TIMEOUT_S = 2.0
#: Request ids as ``new_request_id`` makes them (and test ids); anything else is unknown. This
#: also keeps a crafted id such as ``x:events`` from naming another key.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: Prefixes of the ids in completion responses, accepted by ``GET /v1/requests/{id}``.
_ID_PREFIXES = ("chatcmpl-", "cmpl-")

router = APIRouter()


def _log() -> structlog.stdlib.BoundLogger:
    return get_logger("services.ingest")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 429, 500, 503, 504)
}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(request: Request, response: Response) -> Any:
    """OpenAI text completion: one prompt or a batch, ``n`` choices each (``best_of``: the
    best ``n`` of that many); ``stream: true``: server-sent events as tokens come."""
    body = await parse_body(request, CompletionRequest)
    ingest = ingest_of(request)
    prompts = body.prompts

    def encoder(prompt: str | list[int]) -> Callable[[], list[int]]:
        def encode() -> list[int]:
            if isinstance(prompt, str):
                return ingest.codec.encode(prompt)
            ingest.check_token_ids(prompt)
            return list(prompt)
        return encode

    n = body.choices
    copies = max(n, body.best_of or 1)
    ranked = copies > n  # best_of: rank by summed logprob, which every request then needs
    logprobs = body.logprobs if body.logprobs is not None or not ranked else 0
    constraint = (await run_in_threadpool(ingest.constraint_of, body)  # compiles: CPU work
                  if ingest.asks_for_grammar(body) else None)
    accepted = await accept(request, body, [encoder(p) for p in prompts], body.max_tokens,
                            "prompt", logprobs, copies, constraint)
    echo = tuple(p if isinstance(p, str) else ingest.codec.decode(p) for p in prompts) \
        if body.echo else ()
    shape = Shape(chat=False, copies=copies, logprobs=body.logprobs is not None, echo=echo)
    if body.stream:
        return stream(request, accepted, body, shape)
    records = await serve(request, response, accepted)
    chosen = best_of(records, copies, n) if ranked else records
    strings = TokenStrings(ingest.codec)
    choices = [
        CompletionChoice(index=i, text=(echo[i // n] if echo else "") + r.text,
                         finish_reason=finish_reason(r), logprobs=shape.logprobs_of(strings, r))
        for i, r in enumerate(chosen)
    ]
    return CompletionResponse(
        id=f"cmpl-{chosen[0].id}",
        created=int(chosen[0].arrival),
        model=ingest.info.name,
        choices=choices,
        usage=total_usage(records, copies),
        scls=scls_info(chosen[0], chosen + [r for r in records if r not in chosen]),
    )


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(request: Request, response: Response) -> Any:
    """OpenAI chat completion: messages through the model's chat template, ``n`` choices
    (``stream: true``: server-sent events as tokens come)."""
    body = await parse_body(request, ChatCompletionRequest)
    ingest = ingest_of(request)
    codec = ingest.codec
    messages = body.as_dicts(structured_calls=codec.renders_tools)
    tools = body.tools if codec.renders_tools and shows_tools(body.tools, body.tool_choice) \
        else None

    def encode() -> list[int]:
        try:
            return codec.encode_chat(messages, tools=tools)
        except Exception as exc:  # a template may reject a conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template rejected them: {exc}",
                           param="messages") from None

    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    n = body.choices
    constraint = (await run_in_threadpool(ingest.constraint_of, body)  # compiles: CPU work
                  if ingest.asks_for_grammar(body) else None)
    accepted = await accept(request, body, [encode], max_tokens, "messages", logprobs, n,
                            constraint)
    shape = Shape(chat=True, copies=n, logprobs=logprobs is not None,
                  tools=constraint.tools if constraint else None)
    if body.stream:
        return stream(request, accepted, body, shape)
    records = await serve(request, response, accepted)
    strings = TokenStrings(ingest.codec)
    return ChatCompletionResponse(
        id=f"chatcmpl-{records[0].id}",
        created=int(records[0].arrival),
        model=ingest.info.name,
        choices=[ChatChoice(index=i, message=message, finish_reason=reason,
                            logprobs=shape.logprobs_of(strings, r))
                 for i, r in enumerate(records)
                 for message, reason in [assistant_message(r, shape.tools)]],
        usage=total_usage(records, n),
        scls=scls_info(records[0], records),
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
    record = await ingest_of(request).get_record(rid) if rid else None
    if record is None:
        raise _unknown(request_id)
    finished = record.status is RequestStatus.FINISHED
    return RequestStatusResponse(
        id=record.id,
        model=record.model,
        status=record.status.value,
        finish_reason=finish_reason(record),
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
        **timings(record),
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
    outcome, status = await ingest_of(request).cancel(rid)
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
    ingest = ingest_of(request)
    card = ModelCard(id=ingest.info.name, created=ingest.started_at,
                     max_model_len=ingest.info.context_limit)
    return ModelList(data=[card])


@router.get("/healthz", responses={503: {"description": "Redis does not answer"}})
async def healthz(request: Request) -> Any:
    """200 while Redis answers PING, 503 otherwise."""
    try:
        await asyncio.wait_for(ingest_of(request).store.ping(), timeout=_PING_TIMEOUT_S)
    except (TimeoutError, RedisError, OSError) as exc:
        return JSONResponse({"status": "unavailable", "error": f"redis: {exc!r}"},
                            status_code=503)
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this ingest process (open even when an API key is set)."""
    ingest = ingest_of(request)
    try:
        pending = await asyncio.wait_for(ingest.store.pending_count(), timeout=_PING_TIMEOUT_S)
    except (TimeoutError, RedisError, OSError):
        pending = float("nan")  # unknown, and the scrape still answers
    ingest.metrics.pending.set(pending)
    return Response(exposition(ingest.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
    api_key = ingest_of(request).settings.api_key
    v1 = request.scope["path"].startswith("/v1/")
    if api_key and v1 and not _has_api_key(request, api_key):
        raise APIError(
            401, "missing or invalid API key: send the header 'Authorization: Bearer <key>' "
            "with the key the server was given (SCLS_API_KEY)",
            headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key",
        )
