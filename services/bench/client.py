"""The benchmark's load generator: send a workload to the REST endpoint at its arrival
times from one asyncio HTTP client and record how each request ended.

Requests use ``/v1/completions`` with the prompt as token ids (a trace has lengths, not
text), ``max_tokens`` = the forced output length and ``ignore_eos: true`` (the request
extension vLLM's benchmark uses), greedy decoding. The scheduler sees ``max_tokens`` only
as an upper bound; the output length is forced by the worker, never announced.

With ``stream`` the requests stream (as vLLM's benchmark does): TTFT is the client's own
time to the first chunk with text and TPOT the time after it per further output token;
without it, TTFT is the server's time from arrival to the first slice's commit (the
``scls`` block). Both read the server's queue time, slices and
arrival-to-finish time from the ``scls`` block (on the last chunk when streaming).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from shared.bench.workload import WorkItem
from shared.obs.metrics import RequestOutcome


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send."""

    base_url: str
    model: str
    vocab_size: int
    seed: int = 0
    avoid_ids: tuple[int, ...] = ()  # e.g. EOS ids: kept out of prompts
    timeout_s: float = 3600.0
    api_key: str | None = None
    stream: bool = False  # stream the responses; TTFT measured by the client


def request_body(item: WorkItem, config: ClientConfig) -> dict[str, object]:
    """The JSON body of one workload item."""
    from shared.bench.workload import prompt_token_ids

    return {
        "model": config.model,
        "prompt": prompt_token_ids(item, config.vocab_size, config.seed, config.avoid_ids),
        "max_tokens": item.output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        **({"stream": True, "stream_options": {"include_usage": True}} if config.stream
           else {}),
    }


def _error_text(resp: httpx.Response) -> str:
    try:
        message = resp.json().get("error", {}).get("message", "")
    except ValueError:
        message = resp.text[:200]
    return f"HTTP {resp.status_code}: {message}"


async def send_one(
    client: httpx.AsyncClient, item: WorkItem, body: dict[str, object], t0: float
) -> RequestOutcome:
    """POST one request; a failure is an outcome with its reason, never an exception."""
    sent = time.perf_counter()
    base = {"index": item.index, "sent_s": sent - t0, "prompt_tokens": item.prompt_tokens}
    try:
        if body.get("stream"):
            return await _send_streaming(client, body, sent, base)
        resp = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as exc:
        return RequestOutcome(ok=False, error=f"{type(exc).__name__}: {exc}", **base)
    elapsed = time.perf_counter() - sent
    if resp.status_code != 200:
        return RequestOutcome(ok=False, e2e_s=elapsed, error=_error_text(resp), **base)
    data = resp.json()
    info = data.get("scls") or {}
    return _answered(info, elapsed, info.get("ttft_s"), data["usage"],
                     data["choices"][0].get("finish_reason"), base)


def _answered(info: dict[str, Any], elapsed: float, ttft_s: float | None,
              usage: dict[str, Any], finish_reason: str | None,
              base: dict[str, Any], tpot_s: float | None = None) -> RequestOutcome:
    """A completed request's outcome; ``info`` is the response's ``scls`` block."""
    return RequestOutcome(
        tpot_s=tpot_s,
        ok=True,
        e2e_s=elapsed,
        ttft_s=ttft_s,
        queue_time_s=info.get("queue_time_s"),
        server_e2e_s=info.get("e2e_s"),
        output_tokens=int(usage["completion_tokens"]),
        slices=int(info.get("slices", 0)),
        finish_reason=finish_reason,
        **base,
    )


async def _send_streaming(
    client: httpx.AsyncClient, body: dict[str, object], sent: float, base: dict[str, Any]
) -> RequestOutcome:
    """One streamed request: TTFT at the first chunk with text, the rest from the last
    chunks (finish reason and ``scls`` block, then usage)."""
    first_text: float | None = None
    last: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return RequestOutcome(ok=False, e2e_s=time.perf_counter() - sent,
                                  error=_error_text(resp), **base)
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                return RequestOutcome(ok=False, e2e_s=time.perf_counter() - sent,
                                      error=f"stream: {chunk['error'].get('message', '')}",
                                      **base)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and first_text is None:
                    first_text = time.perf_counter()
                if choice.get("finish_reason") is not None:
                    last = {**chunk, "finish_reason": choice["finish_reason"]}
    elapsed = time.perf_counter() - sent
    if not last or not usage:
        return RequestOutcome(ok=False, e2e_s=elapsed, error="stream ended without an end",
                              **base)
    ttft = (first_text - sent) if first_text is not None else elapsed
    tokens = int(usage.get("completion_tokens", 0))
    # vLLM's TPOT: the time after the first token spread over the tokens after it.
    tpot = (elapsed - ttft) / (tokens - 1) if tokens > 1 else None
    return _answered(last.get("scls") or {}, elapsed, ttft, usage, last["finish_reason"], base,
                     tpot)


async def run_workload(
    items: Sequence[WorkItem],
    config: ClientConfig,
    on_sent: Callable[[], None] = lambda: None,
    on_done: Callable[[RequestOutcome], None] = lambda _o: None,
) -> tuple[list[RequestOutcome], float]:
    """Send every item at its arrival offset; returns outcomes (workload order) and the
    duration from the first send to the last response (vLLM's benchmark duration)."""
    bodies = [request_body(item, config) for item in items]  # built before the clock starts
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    # Idle connections are dropped after 2 s, before the server's keep-alive timeout can
    # close one just as a request is sent on it (an httpx ReadError at low rates).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=config.base_url, timeout=config.timeout_s,
                                 limits=limits, headers=headers) as client:
        t0 = time.perf_counter()

        async def timed(item: WorkItem, body: dict[str, object]) -> RequestOutcome:
            delay = item.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            on_sent()
            outcome = await send_one(client, item, body, t0)
            on_done(outcome)
            return outcome

        outcomes = await asyncio.gather(*(timed(i, b) for i, b in zip(items, bodies,
                                                                      strict=True)))
        ends = [o.sent_s + (o.e2e_s or 0.0) for o in outcomes]
        first = min((o.sent_s for o in outcomes), default=0.0)
        return list(outcomes), (max(ends) - first if ends else 0.0)
