"""Completion glue of the ingest: submit requests, wait for them to end, stream them.

:class:`Ingest` holds what the endpoints share (its store is the async face of the request
store, :class:`~shared.core.async_store.AsyncStore`). One HTTP request becomes one request
per choice (``n``, ``best_of``, batched prompts; docs/openai.md): :func:`accept` tokenises,
checks and submits them together, :func:`serve` waits for their final events and reads them
back, :func:`stream` answers them as server-sent events (:mod:`services.ingest.streaming`);
:func:`best_of`, :func:`total_usage` and the logprobs formatters build the response.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import structlog
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from services.ingest.readiness import reject_when_unready
from services.ingest.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    GenerationParams,
    SclsInfo,
    ToolCall,
    ToolCallFunction,
    TopLogprob,
    Usage,
)
from services.ingest.streaming import (
    ChoiceStream,
    ChunkFormat,
    Finished,
    StopHoldback,
    TokenText,
    stream_chunks,
    tool_stream,
)
from services.ingest.structured import Constraint, StructuredOutputs, ToolFormat
from services.ingest.tool_parsers import tool_call_parser
from services.ingest.validation import APIError, ClientDisconnected, RequestChecks, error_type
from shared.core.async_store import AsyncStore
from shared.core.keys import Keys
from shared.core.records import (
    RequestParams,
    RequestRecord,
    TokenLogprob,
    new_request_id,
    now,
)
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import CancelOutcome
from shared.core.waiter import EventWaiter
from shared.grammar.spec import GrammarError
from shared.modeling.registry import TextCodec
from shared.obs.logging import bound, get_logger
from shared.obs.prometheus import IngestMetrics

#: Seconds a client is told to wait after a 429.
RETRY_AFTER_S = 1
#: XREAD blocks at most this long per call, so a vanished client is noticed in time.
_WAIT_CHUNK_S = 1.0


def _log() -> structlog.stdlib.BoundLogger:
    return get_logger("services.ingest")


@dataclass
class Ingest(RequestChecks):
    """What the endpoints share: settings, model facts and checks (:class:`RequestChecks`),
    the tokenizer, and the request store while the app's lifespan runs."""

    codec: TextCodec
    keys: Keys
    started_at: int
    async_store: AsyncStore | None = None
    waiter: EventWaiter | None = None  # one connection waits for every request's final event
    background: set[asyncio.Task[None]] = field(default_factory=set)  # fire-and-forget work
    metrics: IngestMetrics = field(default_factory=IngestMetrics)  # this app's own registry
    structured: StructuredOutputs | None = None  # built on the first grammar

    @staticmethod
    def asks_for_grammar(body: GenerationParams) -> bool:
        """Whether ``body`` has any field :meth:`constraint_of` reads (most do not: they
        skip the thread hop of compiling)."""
        chat = isinstance(body, ChatCompletionRequest)
        return (body.response_format is not None or body.structured_outputs is not None
                or (chat and (body.tools is not None or body.tool_choice is not None)))

    def constraint_of(self, body: GenerationParams) -> Constraint | None:
        """The grammar ``body`` asks its output to match (None: free text), parsed and
        compiled; a 400 naming the field otherwise (docs/structured-outputs.md)."""
        if self.structured is None:
            self.structured = StructuredOutputs(
                self.codec, self.info, self.settings.grammar_max_bytes,
                self.settings.grammar_cache_size, tool_call_parser(self.settings.tool_call_parser))
        chat = isinstance(body, ChatCompletionRequest)
        try:
            if not chat:
                return self.structured.constraint(body.response_format, body.structured_outputs)
            return self.structured.constraint(
                body.response_format, body.structured_outputs, body.tools, body.tool_choice,
                True, body.parallel_tool_calls)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.field) from None

    @property
    def store(self) -> AsyncStore:
        """The request store; it exists while the app's lifespan runs."""
        if self.async_store is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        return self.async_store

    async def submit(self, prompt_ids: list[int], params: RequestParams) -> RequestRecord:
        """Write a new pending request, or answer 429 when the pending pool is full.

        The check and the write are one Lua script, so the bound is exact under any
        number of concurrent submissions.
        """
        record = RequestRecord(
            id=new_request_id(), prompt_ids=prompt_ids, params=params, arrival=now(),
            model=self.info.name,
        )
        written, pending = await self.store.submit(record, self.settings.max_pending)
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
        record = await self.store.get_request(request_id)
        if record is None:
            raise APIError(500, f"request {request_id} ended but its record has expired",
                           headers={"X-Request-Id": request_id})
        if record.status is RequestStatus.CANCELLED:
            text = await run_in_threadpool(self.codec.decode, record.generated_ids)
            return replace(record, text=text)
        if record.status is not RequestStatus.FINISHED:
            raise failure(record)
        return record

    async def cancel(
        self, request_id: str, reason: str = "cancelled by the client"
    ) -> tuple[CancelOutcome, str]:
        """Withdraw a request (``lua/cancel.lua``)."""
        return await self.store.cancel(request_id, reason, self.settings.result_ttl_s)

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
        return await self.store.get_request(request_id)


def failure(record: RequestRecord) -> APIError:
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


def timings(record: RequestRecord) -> dict[str, float | None]:
    """Queue time, time to first slice and end-to-end latency, in seconds (None if unknown)."""

    def since_arrival(ts: float | None) -> float | None:
        return None if ts is None else round(ts - record.arrival, 6)

    return {
        "queue_time_s": since_arrival(record.first_claimed_at),
        "ttft_s": since_arrival(record.first_slice_at),
        "e2e_s": since_arrival(record.finished_at),
    }


def usage(record: RequestRecord) -> Usage:
    prompt, completion = len(record.prompt_ids), len(record.generated_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def scls_info(record: RequestRecord, others: list[RequestRecord] | None = None) -> SclsInfo:
    """The response's ``scls`` block: ``record``'s, listing every request run when
    ``others`` (all of them, ``record`` included) holds several."""
    ids = [r.id for r in others] if others and len(others) > 1 else None
    return SclsInfo(request_id=record.id, slices=record.slices, request_ids=ids,
                    **timings(record))


def finish_reason(record: RequestRecord) -> str | None:
    return record.finish_reason.value if record.finish_reason else None


def ingest_of(request: Request) -> Ingest:
    """The app's :class:`Ingest`."""
    ingest: Ingest = request.app.state.ingest
    return ingest


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a prompt when the client gave ``seed``: the first
    choice uses it as given (so ``n=1`` is unchanged), choice i > 0 the first 63 bits of
    SHA-256 of ``"<seed>:<i>"`` (distinct per choice, the same on every run)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def choice_params(params: RequestParams, given_seed: int | None, index: int) -> RequestParams:
    """Choice ``index``'s parameters: its own seed, so n samples differ (greedy choices are
    identical, as with OpenAI)."""
    if index == 0:
        return params
    if given_seed is not None:
        return replace(params, seed=choice_seed(given_seed, index))
    return replace(params, seed=secrets.randbits(63) if params.temperature > 0 else None)


async def accept(
    request: Request,
    body: GenerationParams,
    encoders: list[Callable[[], list[int]]],
    max_tokens: int | None,
    prompt_param: str,
    logprobs: int | None = None,
    copies: int = 1,
    constraint: Constraint | None = None,
) -> list[RequestRecord]:
    """Tokenise, check and submit the requests of one HTTP request (both endpoints,
    streaming or not): ``copies`` requests per prompt (``n``, or ``best_of``), in choice
    order (prompt p's copy i at ``p * copies + i``); ``constraint``: the grammar their
    output must match (:meth:`Ingest.constraint_of`). All or none: if one is refused
    (429), those already submitted are cancelled."""
    ingest = ingest_of(request)
    ingest.check_model(body.model)
    ingest.check_supported(body, logprobs, len(encoders))
    planned: list[tuple[list[int], RequestParams]] = []
    for encode in encoders:
        # Tokenising a long prompt is CPU work: keep it off the event loop.
        prompt_ids = await run_in_threadpool(encode)
        if not prompt_ids:
            raise APIError(400, f"{prompt_param}: must not be empty", param=prompt_param)
        params = ingest.build_params(body, max_tokens, len(prompt_ids), prompt_param, logprobs,
                                     constraint.spec.key if constraint and constraint.spec else "")
        planned += [(prompt_ids, choice_params(params, body.seed, i)) for i in range(copies)]
    await reject_when_unready(request)  # 503 while no scheduler/worker could serve it
    records: list[RequestRecord] = []
    try:
        for prompt_ids, params in planned:
            records.append(await ingest.submit(prompt_ids, params))
    except Exception:
        for record in records:  # all or none: the client gets an error, not these
            ingest.cancel_in_background(record.id, "another request of its batch was refused")
        raise
    for record in records:
        with bound(request_id=record.id):
            _log().info("request accepted", path=request.url.path,
                        prompt_tokens=len(record.prompt_ids), max_tokens=record.params.max_tokens,
                        temperature=record.params.temperature, stream=bool(body.stream),
                        choices=len(records))
    return records


async def finished(ingest: Ingest, record: RequestRecord) -> RequestRecord:
    """The ended request's record (finished or cancelled; an :class:`APIError` if it
    failed), logged and counted."""
    with bound(request_id=record.id):
        done = await ingest.finished_record(record.id)
        _log().info("request finished", finish_reason=finish_reason(done),
                    completion_tokens=len(done.generated_ids), slices=done.slices,
                    **timings(done))
    ingest.metrics.observe_finished(timings(done), len(done.prompt_ids),
                                    len(done.generated_ids))
    return done


async def serve(
    request: Request, response: Response, records: list[RequestRecord]
) -> list[RequestRecord]:
    """Wait for accepted requests to end, together, and read them back (non-streaming)."""
    ingest = ingest_of(request)
    response.headers["X-Request-Id"] = records[0].id

    async def wait(record: RequestRecord) -> dict[str, str] | None:
        with bound(request_id=record.id):
            return await ingest.wait_final(record.id, request)

    finals = await asyncio.gather(*(wait(r) for r in records), return_exceptions=True)
    for record, final in zip(records, finals, strict=True):
        if isinstance(final, BaseException):
            raise final
        if final is None:
            raise _timeout(record.id, ingest.settings.request_timeout_s)
    return [await finished(ingest, record) for record in records]


def total_usage(records: list[RequestRecord], copies: int) -> Usage:
    """Usage of the requests of one HTTP request: every generated token, and each prompt's
    tokens once (its ``copies`` requests share the prompt, as OpenAI counts ``n``)."""
    prompt = sum(len(r.prompt_ids) for r in records[::copies])
    completion = sum(len(r.generated_ids) for r in records)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def summed_logprob(record: RequestRecord) -> float:
    """The log-probability of the whole completion (``best_of``'s ranking)."""
    return sum(lp.logprob for lp in record.logprobs)


def best_of(records: list[RequestRecord], copies: int, n: int) -> list[RequestRecord]:
    """Per prompt, the ``n`` of its ``copies`` requests with the highest summed logprob,
    best first (ties keep submission order)."""
    out: list[RequestRecord] = []
    for start in range(0, len(records), copies):
        group = records[start:start + copies]
        out += sorted(group, key=summed_logprob, reverse=True)[:n]
    return out


class TokenStrings:
    """Each token's text, decoded alone with the codec (a token that is part of a
    multi-byte character reads U+FFFD), cached per id."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """The token's text."""
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.codec.decode([token_id])
        return text


def completion_logprobs(strings: TokenStrings, record: RequestRecord) -> CompletionLogprobs:
    """OpenAI's legacy ``logprobs`` of a text completion: per generated token its text, its
    logprob, ``{text: logprob}`` of the chosen token and the k alternatives (vLLM's shape),
    and its offset in the choice's text."""
    return completion_block(strings, record.generated_ids, record.logprobs)


def completion_block(strings: TokenStrings, ids: Sequence[int],
                     logprobs: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """:func:`completion_logprobs` of some tokens, the first at ``offset`` in the text."""
    tokens = [strings(t) for t in ids[:len(logprobs)]]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = [{**{strings(t): v for t, v in lp.top}, tok: lp.logprob}
            for tok, lp in zip(tokens, logprobs, strict=False)]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs],
                              top_logprobs=tops, text_offset=offsets)


def chat_logprobs(strings: TokenStrings, record: RequestRecord) -> ChatLogprobs:
    """Chat's ``logprobs.content``: per generated token its text, logprob, UTF-8 bytes and
    its ``top_logprobs`` alternatives."""
    return chat_block(strings, record.generated_ids, record.logprobs)


def chat_block(strings: TokenStrings, ids: Sequence[int],
               logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    """:func:`chat_logprobs` of some tokens."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = strings(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = [
        ChatTokenLogprob(**top(t, lp.logprob).model_dump(),
                         top_logprobs=[top(a, v) for a, v in lp.top])
        for t, lp in zip(ids, logprobs, strict=False)
    ]
    return ChatLogprobs(content=content)


@dataclass
class StreamedLogprobs:
    """A streamed choice's ``logprobs`` blocks, chunk by chunk, in the non-streamed shapes
    (:data:`services.ingest.streaming.LogprobsBlock`): joined, they are the non-streamed
    block (completions' ``text_offset`` runs on from chunk to chunk)."""

    strings: TokenStrings
    chat: bool
    offset: int = 0  # completions: the text offset of the next token

    def __call__(self, ids: list[int], logprobs: list[TokenLogprob]) -> dict[str, Any]:
        """The block of the next tokens, ``ids`` with their ``logprobs``."""
        if self.chat:
            return chat_block(self.strings, ids, logprobs).model_dump()
        block = completion_block(self.strings, ids, logprobs, self.offset)
        self.offset += sum(len(token) for token in block.tokens)
        return block.model_dump()


@dataclass(frozen=True)
class Shape:
    """How the choices of one HTTP request are answered."""

    chat: bool
    copies: int  # requests per prompt
    logprobs: bool  # the client asked for logprobs (best_of alone asks internally)
    echo: tuple[str, ...] = ()  # per prompt: text prepended to its choices (completions)
    tools: ToolFormat | None = None  # tools: a forced call, or calls parsed ("auto")

    def logprobs_of(self, strings: TokenStrings, record: RequestRecord) -> Any:
        """The choice's ``logprobs`` block, or None when the client did not ask."""
        if not self.logprobs:
            return None
        return (chat_logprobs if self.chat else completion_logprobs)(strings, record)

    def streamed_logprobs(self, strings: TokenStrings) -> StreamedLogprobs | None:
        """A streamed choice's logprobs blocks, or None when the client did not ask."""
        return StreamedLogprobs(strings, self.chat) if self.logprobs else None

    def echoed(self, index: int) -> str:
        """Text choice ``index`` starts with (its prompt, with ``echo``)."""
        return self.echo[index // self.copies] if self.echo else ""


def tool_call_id(request_id: str, index: int = 0) -> str:
    """The id of a request's tool call ``index`` (its request id names it)."""
    return f"call_{request_id}" if index == 0 else f"call_{request_id}_{index}"


def assistant_message(record: RequestRecord, tools: ToolFormat | None
                      ) -> tuple[AssistantMessage, str | None]:
    """A chat choice's message and finish reason: the text, or, with tools, OpenAI's
    ``tool_calls`` for the calls the output made (a forced call cut by ``max_tokens`` stays
    text, finish reason ``length``) beside the content before them."""
    reason = finish_reason(record)
    if tools is None:
        return AssistantMessage(content=record.text), reason
    answer = tools.answer(record.text, reason)
    if not answer.calls:
        return AssistantMessage(content=answer.content), answer.finish_reason
    message = AssistantMessage(content=answer.content, tool_calls=[
        ToolCall(id=tool_call_id(record.id, i),
                 function=ToolCallFunction(name=name, arguments=arguments))
        for i, (name, arguments) in enumerate(answer.calls)])
    return message, answer.finish_reason


def stream(request: Request, records: list[RequestRecord], body: GenerationParams,
           shape: Shape) -> StreamingResponse:
    """Server-sent events of accepted requests (``stream: true``), see
    :mod:`services.ingest.streaming`; choice ``i`` is ``records[i]``."""
    ingest = ingest_of(request)
    timeout_s = ingest.settings.request_timeout_s
    first = records[0]
    fmt = ChunkFormat(
        chat=shape.chat, id=f"{'chatcmpl' if shape.chat else 'cmpl'}-{first.id}",
        created=int(first.arrival), model=ingest.info.name,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        continuous_usage=bool(body.stream_options
                              and body.stream_options.continuous_usage_stats),
    )
    strings = TokenStrings(ingest.codec)
    ended: dict[str, RequestRecord] = {}

    def finisher(record: RequestRecord) -> Callable[[], Awaitable[Finished]]:
        async def finish() -> Finished:
            done = ended[record.id] = await finished(ingest, record)
            return Finished(done.text, finish_reason(done), usage(done).model_dump(),
                            scls_info(done).model_dump(), done.generated_ids,
                            list(done.logprobs))
        return finish

    def total() -> dict[str, int]:
        return total_usage([ended[r.id] for r in records], shape.copies).model_dump()

    async def events() -> AsyncIterator[str]:
        if ingest.waiter is None:
            raise RuntimeError("the ingest app is not started: run it with its lifespan")
        # Subscribed here, in the body, so that a client gone before the body starts
        # leaves no watch behind; the streams are read from their start either way.
        keys = [ingest.keys.events(r.id) for r in records]
        choices = [
            ChoiceStream(
                index=i, events=await ingest.waiter.subscribe(key),
                holdback=StopHoldback(r.params.stop),
                text=TokenText(ingest.codec.decode, per_token=shape.logprobs),
                finish=finisher(r), timeout_error=partial(_timeout, r.id, timeout_s),
                echo=shape.echoed(i), prompt_tokens=len(r.prompt_ids),
                logprobs=shape.streamed_logprobs(strings),
                tool_call=tool_stream(shape.tools, partial(tool_call_id, r.id)),
            )
            for i, (r, key) in enumerate(zip(records, keys, strict=True))
        ]
        ended = False
        try:
            # aclosing: a client that leaves closes the chunks too, which stops their pumps.
            async with aclosing(stream_chunks(choices, fmt, total, timeout_s,
                                              error_event)) as chunks:
                async for event in chunks:
                    yield event
            ended = True  # an error event ends it too: a timed-out request goes on
        finally:
            for key, choice in zip(keys, choices, strict=True):
                ingest.waiter.unsubscribe(key, choice.events)
            for record, choice in zip(records, choices, strict=True):
                if not ended and not choice.done:  # the client went away mid-stream:
                    # stop spending slices on it
                    ingest.cancel_in_background(record.id,
                                                "the streaming client disconnected")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"X-Request-Id": first.id, "Cache-Control": "no-cache"})


def error_event(exc: Exception) -> dict[str, Any]:
    """The ``{"error": ...}`` event that ends a stream whose request did not finish."""
    status, message = (exc.status, exc.message) if isinstance(exc, APIError) else (500, str(exc))
    _log().warning("stream ended with an error", status=status, error=message)
    return {"error": {"message": message, "type": error_type(status), "param": None,
                      "code": getattr(exc, "code", None)}}


def _timeout(request_id: str, timeout_s: float) -> APIError:
    return APIError(
        504,
        f"request {request_id} did not finish within {timeout_s:g} s; it is still being "
        f"served: poll GET /v1/requests/{request_id} for its result",
        headers={"X-Request-Id": request_id},
    )
