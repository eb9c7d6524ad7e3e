"""Completion glue of the ingest: submit a request, wait for it to end, stream its slices.

:class:`Ingest` holds what the endpoints share (its store is the async face of the request
store, :class:`~shared.core.async_store.AsyncStore`); :func:`accept` tokenises, checks and
submits a request, :func:`serve` waits for its final event and reads it back, and
:func:`stream` answers it as server-sent events (:mod:`services.ingest.streaming`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from services.ingest.readiness import reject_when_unready
from services.ingest.schemas import GenerationParams, SclsInfo, Usage
from services.ingest.streaming import ChunkFormat, Finished, StopHoldback, stream_chunks
from services.ingest.validation import APIError, ClientDisconnected, RequestChecks, error_type
from shared.core.async_store import AsyncStore
from shared.core.keys import Keys
from shared.core.records import RequestParams, RequestRecord, new_request_id, now
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import CancelOutcome
from shared.core.waiter import EventWaiter
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


def scls_info(record: RequestRecord) -> SclsInfo:
    return SclsInfo(request_id=record.id, slices=record.slices, **timings(record))


def finish_reason(record: RequestRecord) -> str | None:
    return record.finish_reason.value if record.finish_reason else None


def ingest_of(request: Request) -> Ingest:
    """The app's :class:`Ingest`."""
    ingest: Ingest = request.app.state.ingest
    return ingest


async def accept(
    request: Request,
    body: GenerationParams,
    encode: Callable[[], list[int]],
    max_tokens: int | None,
    prompt_param: str,
) -> RequestRecord:
    """Tokenise, check and submit one request (both endpoints, streaming or not)."""
    ingest = ingest_of(request)
    ingest.check_model(body.model)
    ingest.check_supported(body)
    # Tokenising a long prompt is CPU work: keep it off the event loop.
    prompt_ids = await run_in_threadpool(encode)
    if not prompt_ids:
        raise APIError(400, f"{prompt_param}: must not be empty", param=prompt_param)
    params = ingest.build_params(body, max_tokens, len(prompt_ids), prompt_param)
    await reject_when_unready(request)  # 503 while no scheduler/worker could serve it
    record = await ingest.submit(prompt_ids, params)
    with bound(request_id=record.id):
        _log().info("request accepted", path=request.url.path, prompt_tokens=len(prompt_ids),
                    max_tokens=params.max_tokens, temperature=params.temperature,
                    stream=bool(body.stream))
    return record


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


async def serve(request: Request, response: Response, record: RequestRecord) -> RequestRecord:
    """Wait for an accepted request to end and read it back (non-streaming)."""
    ingest = ingest_of(request)
    response.headers["X-Request-Id"] = record.id
    with bound(request_id=record.id):
        final = await ingest.wait_final(record.id, request)
    if final is None:
        raise _timeout(record.id, ingest.settings.request_timeout_s)
    return await finished(ingest, record)


def stream(request: Request, record: RequestRecord, body: GenerationParams,
            chat: bool) -> StreamingResponse:
    """Server-sent events of an accepted request (``stream: true``), see
    :mod:`services.ingest.streaming`."""
    ingest = ingest_of(request)
    timeout_s = ingest.settings.request_timeout_s
    fmt = ChunkFormat(
        chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{record.id}",
        created=int(record.arrival), model=ingest.info.name,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )

    async def finish() -> Finished:
        done = await finished(ingest, record)
        return Finished(done.text, finish_reason(done), usage(done).model_dump(),
                        scls_info(done).model_dump())

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
                error_event, lambda: _timeout(record.id, timeout_s),
            ):
                yield event
            ended = True
        finally:
            ingest.waiter.unsubscribe(key, queue)
            if not ended:  # the client went away mid-stream: stop spending slices on it
                ingest.cancel_in_background(record.id, "the streaming client disconnected")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"X-Request-Id": record.id, "Cache-Control": "no-cache"})


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
