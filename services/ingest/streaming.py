"""Server-sent events for ``stream: true``: each slice's text as it is committed.

A worker commits a slice's text delta into the request's event stream (``kind=slice``) and
the last one with ``kind=final``; the ingest forwards them as OpenAI stream chunks
(``text_completion`` or ``chat.completion.chunk``), then ``data: [DONE]``. SLS and ILS
requests run in one go, so they stream as one chunk; SCLS requests stream once per slice.

Stop strings: the worker ends a request at a stop string and the final text is cut before
it, but a stop string can begin in one slice and end in the next. Text that could be the
beginning of a stop string is therefore held back until the next delta shows it is not
(:class:`StopHoldback`), so the streamed text always equals the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass
class StopHoldback:
    """Releases streamed text, holding back any tail that may start a stop string."""

    stops: tuple[str, ...]
    received: str = ""
    sent: int = 0  # characters of ``received`` released so far

    def feed(self, delta: str) -> str:
        """Take the next delta; return the text now safe to send."""
        self.received += delta
        safe = len(self.received) - self._held_tail()
        # A whole stop string is never sent either: the final text ends before it.
        for stop in self.stops:
            at = self.received.find(stop, self.sent)
            if at >= 0:
                safe = min(safe, at)
        return self._release(safe)

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the request's answer) not sent yet."""
        if not final_text.startswith(self.received[: self.sent]):
            return ""  # cannot happen with the worker's stop handling; never resend text
        out = final_text[self.sent :]
        self.received, self.sent = final_text, len(final_text)
        return out

    def _held_tail(self) -> int:
        """Length of the longest tail of ``received`` that is a proper prefix of a stop."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.received)), longest, -1):
                if self.received.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.received[self.sent : upto]
        self.sent = upto
        return out


@dataclass
class ChunkFormat:
    """The envelope of one endpoint's stream chunks."""

    chat: bool
    id: str
    created: int
    model: str
    include_usage: bool = False
    _started: bool = field(default=False, init=False)

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        """A chunk carrying ``text`` (chat: the first one also says the role)."""
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
            if not self._started:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": finish_reason}
        self._started = True
        return self._envelope([choice])

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices, usage."""
        return {**self._envelope([]), "usage": usage}

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return out


@dataclass
class Finished:
    """What the stream's end needs from the request's record."""

    text: str
    finish_reason: str | None
    usage: dict[str, int]
    scls: dict[str, Any] = field(default_factory=dict)  # the non-streamed body's scls block


async def stream_chunks(
    events: asyncio.Queue[dict[str, str]],
    fmt: ChunkFormat,
    holdback: StopHoldback,
    finish: Callable[[], Awaitable[Finished]],
    timeout_s: float,
    error_body: Callable[[Exception], dict[str, Any]],
    timeout_error: Callable[[], Exception],
) -> AsyncIterator[str]:
    """Server-sent events for one request: a chunk per non-empty slice delta, the final
    chunk with its finish reason (after ``finish()`` read the ended request), the usage
    chunk when asked, then ``[DONE]``. An error (the request failed, timed out, or the
    server is shutting down) ends the stream with an ``{"error": ...}`` event instead."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if fmt.chat:
        yield sse(fmt.chunk(""))  # the role first, as OpenAI does
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise timeout_error()
            try:
                entry = await asyncio.wait_for(events.get(), remaining)
            except asyncio.TimeoutError:
                raise timeout_error() from None
            kind = entry.get("kind")
            if kind == "closed":  # the waiter stopped: shutdown, or readiness lost (its error)
                raise RuntimeError(entry.get("error")
                                   or "the server is shutting down; the request goes on")
            if kind == "final":
                done = await finish()
                rest = holdback.finish(done.text)
                last = fmt.chunk(rest, done.finish_reason)
                if done.scls:  # our extension, as in the non-streamed body; clients ignore it
                    last["scls"] = done.scls
                yield sse(last)
                if fmt.include_usage:
                    yield sse(fmt.usage(done.usage))
                break
            text = holdback.feed(entry.get("delta", ""))
            if text:
                yield sse(fmt.chunk(text))
    except Exception as exc:  # headers are sent: the error travels as an event
        yield sse(error_body(exc))
    yield DONE
