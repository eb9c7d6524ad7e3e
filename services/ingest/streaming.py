"""Server-sent events for ``stream: true``: a request's text as its tokens come.

A worker publishes a streaming request's new token ids into its event stream once per
decode step (``kind=tokens``, fields ``pos`` and ``ids``), commits each slice (``kind=slice``,
the last ``kind=final``; with ``pos``/``ids`` of the whole slice and its text ``delta``).
The ingest decodes the ids it holds (:class:`TokenText`) and forwards the new text as OpenAI
stream chunks (``text_completion`` or ``chat.completion.chunk``), then ``data: [DONE]``.
Entries without ``pos`` (older workers, the ILS runtime) are forwarded by their ``delta``:
once per slice. With ``n`` > 1 or batched prompts, every choice is a request of its own and
the chunks of all are interleaved, each with its choice ``index`` (:func:`stream_chunks`).

Log-probabilities, when asked, travel with the text: the worker publishes each token's with
its id (the ``tokens`` entry's ``logprobs`` field, a JSON array in the record's form), and a
chunk carries those of the tokens whose text it completes (:meth:`ChoiceStream.chunks`).
Tokens whose logprobs did not come that way (a commit entry filled a gap; an old worker), and
tokens whose text is never sent (a stop string), travel in the choice's last chunk, read
from the finished request's record; so the chunks' logprobs, joined, are the non-streamed
answer's.

Stop strings: the worker ends a request at a stop string and the final text is cut before
it, but a stop string can begin in one slice and end in the next. Text that could be the
beginning of a stop string is therefore held back until the next delta shows it is not
(:class:`StopHoldback`), so the streamed text always equals the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.ingest.structured import AutoToolFormat, ToolCallFormat, ToolFormat
from shared.core.records import TokenLogprob

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


#: What a multi-byte character cut between tokens decodes to until its last byte arrives.
_INCOMPLETE = "\ufffd"


@dataclass
class TokenText:
    """A streaming request's text, decoded from its generated ids as they arrive.

    Entries with ``pos``/``ids`` (per-step ``tokens`` entries, and slice commits) extend the
    ids held when ``pos`` is the number held; ids already held are skipped (a retried slice
    republishes the same tokens) and an entry beyond what is held waits for the slice's
    commit entry, which covers the whole slice.

    Decoding is incremental, as vLLM's detokenizer does it: only a window of ids is decoded,
    from ``prefix`` (a few ids already sent, so that a tokenizer that strips a leading space
    or merges across tokens sees them in context) to the end; the text past what
    ``ids[prefix:read]`` decodes to is new. Text ending in U+FFFD (a character cut between
    tokens) is held back until its last byte arrives, as the worker's ``text_delta`` does;
    ``read`` only advances when it is sent, so a window always starts on a character.
    The cost per token is constant, where decoding every id held each time made a stream's
    decoding quadratic in its length. A decoder whose window text does not extend the
    window's prefix text (one that rewrites text across tokens) is decoded whole instead.

    Each id's log-probability, when its entry brings one, is kept with it (``logprobs``),
    and each id whose text is handed out gets the length of the text handed out once its
    text is (``ends``): a chunk carries the logprobs of the tokens whose text it completes.
    With ``per_token``, a flush decodes its ids one by one, so that each gets its own end
    (a batch decoded at once would give all its ids the batch's end).
    """

    decode: Callable[[list[int]], str]
    per_token: bool = False  # the stream sends logprobs: an end per id
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per id: its entry's
    ends: list[int] = field(default_factory=list)  # per id read: text length with it sent
    pieces: list[str] = field(default_factory=list)  # the text handed out, piece by piece
    chars: int = 0  # length of the text handed out
    decoded: int = 0  # ids held at the last flush
    prefix: int = 0  # the decode window's first id
    read: int = 0  # ids whose text is handed out
    whole: bool = False  # the window is not enough for this decoder: decode every id held

    @property
    def sent(self) -> str:
        """The decoded text handed out so far."""
        return "".join(self.pieces)

    def take(self, entry: dict[str, str]) -> str | None:
        """The text ``entry`` adds; None when it carries no ``pos`` (an old worker, or the
        ILS runtime: use its ``delta``)."""
        return self.flush() if self.add(entry) else None

    def add(self, entry: dict[str, str]) -> bool:
        """Hold the ids ``entry`` adds, decoding nothing yet (:meth:`flush` does); False
        when it carries no ``pos``."""
        if "pos" not in entry:
            return False
        pos, held = int(entry["pos"]), len(self.ids)
        new = [int(t) for t in entry.get("ids", "").split(",") if t]
        if pos <= held < pos + len(new):  # else a gap (missed entries) or nothing new
            self.ids.extend(new[held - pos:])
            self.logprobs.extend(_logprobs(entry, len(new))[held - pos:])
        return True

    def flush(self) -> str:
        """The text the ids added since the last flush bring."""
        if len(self.ids) == self.decoded:  # nothing new (a repeat, a commit of held ids)
            return ""
        start, self.decoded = self.decoded, len(self.ids)
        if not self.per_token:
            return self._text_upto(len(self.ids))
        return "".join([self._text_upto(upto) for upto in range(start + 1, len(self.ids) + 1)])

    def _text_upto(self, upto: int) -> str:
        """The new text of ``ids[read:upto]`` (none while it ends in a cut character)."""
        if self.whole:
            return self._whole_text(upto)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:upto])
        if not text.startswith(before):  # the decoder rewrote text across the window's
            self.whole = True  # start: only the whole decode is right for it (vLLM's
            return self._whole_text(upto)  # detokenizer would send a wrong text here)
        if len(text) == len(before) or text.endswith(_INCOMPLETE):
            return ""  # nothing yet (a special token), or a cut character: wait
        self.prefix = self.read
        return self._hand_out(text[len(before):], upto)

    def _whole_text(self, upto: int) -> str:
        """The new text of ``ids[read:upto]``, decoding every id before (the old way)."""
        full = self.decode(self.ids[:upto])
        text = full.rstrip(_INCOMPLETE)
        sent = self.sent
        if not text.startswith(sent):  # a decoder that rewrites earlier text
            return ""  # sent text cannot be taken back: the final text settles it
        # Ids whose text is not complete yet are read with what completes it.
        return self._hand_out(text[len(sent):], upto if text == full else self.read)

    def _hand_out(self, new: str, upto: int) -> str:
        """Record ``new`` as handed out, completing the text of ``ids[read:upto]``."""
        self.chars += len(new)
        self.ends.extend([self.chars] * (upto - self.read))
        self.read = max(self.read, upto)
        if new:
            self.pieces.append(new)
        return new


def _logprobs(entry: dict[str, str], count: int) -> list[TokenLogprob | None]:
    """The ``count`` ids' logprobs that ``entry`` brings: each token's as the worker
    published it, or None for each (a commit entry, a request that did not ask)."""
    raw = entry.get("logprobs")
    if not raw:
        return [None] * count
    items: list[TokenLogprob | None] = [TokenLogprob.from_json(item) for item in json.loads(raw)]
    return items if len(items) == count else [None] * count  # never half a list


@dataclass
class ChunkFormat:
    """The envelope of one endpoint's stream chunks."""

    chat: bool
    id: str
    created: int
    model: str
    include_usage: bool = False
    continuous_usage: bool = False  # usage so far on every chunk (vLLM's extension)

    def role(self, index: int = 0) -> dict[str, Any]:
        """Chat's first chunk of a choice: the role, no text yet (as OpenAI does)."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}
        return self._envelope([choice])

    def chunk(self, text: str, finish_reason: str | None = None, index: int = 0,
              logprobs: dict[str, Any] | None = None,
              usage: dict[str, int] | None = None) -> dict[str, Any]:
        """A chunk of choice ``index`` carrying ``text`` (and ``logprobs``, if given);
        with ``continuous_usage``, ``usage`` is the choice's usage so far."""
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        out = self._envelope([choice])
        if self.continuous_usage and usage is not None:
            out["usage"] = usage
        return out

    def tool_chunk(self, deltas: list[dict[str, Any]], finish_reason: str | None = None,
                   index: int = 0, logprobs: dict[str, Any] | None = None,
                   usage: dict[str, int] | None = None, content: str = "") -> dict[str, Any]:
        """A chat chunk of choice ``index`` carrying ``delta.tool_calls`` (OpenAI's
        streamed tool call: the id, type and name first, then pieces of the arguments),
        after the ``content`` it releases, if any."""
        delta: dict[str, Any] = {"content": content} if content else {}
        if deltas:
            delta["tool_calls"] = deltas
        out = self._envelope([{"index": index, "delta": delta, "logprobs": logprobs,
                               "finish_reason": finish_reason}])
        if self.continuous_usage and usage is not None:
            out["usage"] = usage
        return out

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
    generated_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated id, if asked


class ToolStream(Protocol):
    """Turns a chat choice's text with tools, as it is released, into content and
    ``delta.tool_calls``; joined, its chunks are the non-streamed message."""

    def feed(self, released: str) -> tuple[str, list[dict[str, Any]]]:
        """``(content, tool-call deltas)`` the newly ``released`` text allows (maybe
        neither yet)."""
        ...

    def finish(self, rest: str, reason: str | None
               ) -> tuple[str, list[dict[str, Any]], str | None]:
        """``(content, deltas, finish reason)`` of the choice's last chunk, given the
        request's own finish reason."""
        ...


def tool_stream(tools: ToolFormat | None, call_id: Callable[[int], str]
                ) -> ToolStream | None:
    """The stream of a choice answered with ``tools`` (None without); ``call_id(i)`` names
    its call ``i``."""
    if isinstance(tools, ToolCallFormat):
        return ToolCallStream(tools, call_id(0))
    if isinstance(tools, AutoToolFormat):
        return AutoToolStream(tools, call_id)
    return None


def _call_delta(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """The first delta of a streamed call: its id, type, name (and arguments so far)."""
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolCallStream:
    """A forced tool call's text, as it is released, as ``delta.tool_calls``: the call's
    id and function name once the ``{"name": ..., "arguments": `` head is complete, then
    the arguments' JSON as it comes, holding back the last character (the call's closing
    brace) until the request ends. A call cut short (``max_tokens``) before its head is
    complete was never one: its text goes out as content."""

    tools: ToolCallFormat
    call_id: str
    text: str = ""  # released so far
    head: int | None = None  # length of the complete head, once it is
    sent: int = 0  # characters of the arguments sent

    def feed(self, released: str) -> tuple[str, list[dict[str, Any]]]:
        """See :class:`ToolStream`: never content."""
        self.text += released
        return "", self._deltas(len(self.text) - 1)

    def finish(self, rest: str, reason: str | None
               ) -> tuple[str, list[dict[str, Any]], str | None]:
        """See :class:`ToolStream`."""
        self.text += rest
        call = self.tools.parse(self.text) if reason == "stop" else None
        if call is None and self.head is None:
            return self.text, [], reason  # never became a call: plain text
        deltas = self._deltas(len(self.text) - 1 if call is not None else len(self.text))
        return "", deltas, self.tools.finish_reason if call is not None else reason

    def _deltas(self, upto: int) -> list[dict[str, Any]]:
        """Deltas for the head (once) and the arguments up to ``upto`` characters."""
        out: list[dict[str, Any]] = []
        if self.head is None:
            found = self.tools.head(self.text)
            if found is None:
                return out
            name, self.head = found
            out.append(_call_delta(0, self.call_id, name, ""))
        start = self.head + self.sent
        if upto > start:
            out.append({"index": 0, "function": {"arguments": self.text[start:upto]}})
            self.sent = upto - self.head
        return out


@dataclass
class AutoToolStream:
    """``tool_choice: "auto"``: content streams as it comes until the text could be
    opening a call (the parser's start tag, or trailing whitespace before it); from the
    tag on the text is held, and at the end the calls go out whole, one delta each (their
    arguments are re-serialised, so they cannot stream before the block parses). Output
    that made no well-formed call sends what it held as content."""

    tools: AutoToolFormat
    call_id: Callable[[int], str]
    text: str = ""  # released so far
    sent: int = 0  # characters of content sent
    in_call: bool = False  # the start tag has been seen

    def feed(self, released: str) -> tuple[str, list[dict[str, Any]]]:
        """See :class:`ToolStream`: content only, up to what cannot start a call."""
        self.text += released
        if self.in_call:
            return "", []
        # Only the held tail is looked at: what was sent ends before any tag and with a
        # character that is not whitespace, so each chunk costs its own length, not the
        # whole text's.
        tail = self.text[self.sent:]
        start = self.tools.parser.start
        at = tail.find(start)
        if at >= 0:
            self.in_call = True
        else:
            at = len(tail) - _partial_suffix(tail, start)
        out = tail[:at].rstrip()
        self.sent += len(out)
        return out, []

    def finish(self, rest: str, reason: str | None
               ) -> tuple[str, list[dict[str, Any]], str | None]:
        """See :class:`ToolStream`."""
        self.text += rest
        answer = self.tools.answer(self.text, reason)
        content = (answer.content or "")[self.sent:]
        deltas = [_call_delta(i, self.call_id(i), name, arguments)
                  for i, (name, arguments) in enumerate(answer.calls)]
        return content, deltas, answer.finish_reason


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


#: A choice's ``logprobs`` block for some of its tokens (ids and their logprobs), in the
#: endpoint's shape; called on consecutive runs of tokens, in order.
LogprobsBlock = Callable[[list[int], list[TokenLogprob]], dict[str, Any]]


@dataclass
class ChoiceStream:
    """One choice of a stream: its request's event queue and what turns entries into text."""

    index: int
    events: asyncio.Queue[dict[str, str]]
    holdback: StopHoldback
    text: TokenText
    finish: Callable[[], Awaitable[Finished]]  # reads the ended request back
    timeout_error: Callable[[], Exception]
    echo: str = ""  # completions' ``echo``: the prompt, sent first
    prompt_tokens: int = 0  # for ``continuous_usage_stats``
    logprobs: LogprobsBlock | None = None  # the client asked for logprobs
    tool_call: ToolStream | None = None  # tools: text -> content and delta.tool_calls
    done: bool = False  # its last chunk was produced
    logprobs_sent: int = 0  # tokens whose logprobs a chunk carried
    by_text: bool = True  # the text is the ids' (no entry fed its own delta)

    def usage_so_far(self) -> dict[str, int]:
        """Usage of this choice so far: its prompt and the tokens received."""
        done = len(self.text.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    async def chunks(self, fmt: ChunkFormat, deadline: float) -> AsyncIterator[dict[str, Any]]:
        """This choice's chunks: the echoed prompt, a chunk per batch of events that
        releases text (with the logprobs of the tokens whose text it completes, when
        asked), then the last one with the finish reason (and the logprobs not sent yet)."""
        if self.echo:
            yield fmt.chunk(self.echo, index=self.index, usage=self.usage_so_far())
        while True:
            released = ""
            for entry in await self._next_entries(deadline):
                kind = entry.get("kind")
                if kind == "closed":  # the waiter stopped: shutdown, or readiness lost
                    self.done = True  # not cancelled when the stream ends: it goes on
                    raise RuntimeError(entry.get("error")
                                       or "the server is shutting down; the request goes on")
                if kind == "final":
                    released += self.holdback.feed(self.text.flush())
                    if released:  # what the entries before it released: a chunk of its own
                        chunk = self._text_chunk(fmt, released)
                        if chunk is not None:
                            yield chunk
                    yield await self._last_chunk(fmt)
                    return
                if not self.text.add(entry):  # no pos: the entry's own text delta
                    released += self.holdback.feed(self.text.flush())
                    released += self.holdback.feed(entry.get("delta", ""))
                    self.by_text = False  # the ids' text ends no longer match: logprobs wait
            # One flush for every entry that was waiting: a loaded ingest that falls
            # behind sends fewer, larger chunks (and, without logprobs, decodes once).
            released += self.holdback.feed(self.text.flush())
            if released:
                chunk = self._text_chunk(fmt, released)
                if chunk is not None:
                    yield chunk

    def _text_chunk(self, fmt: ChunkFormat, released: str) -> dict[str, Any] | None:
        """A chunk of released text (a tool call's deltas), with the logprobs of the
        tokens it completes; None when a tool call's text releases no delta yet."""
        if self.tool_call is not None:
            content, deltas = self.tool_call.feed(released)
            if not deltas and not content:
                return None
            return fmt.tool_chunk(deltas, index=self.index,
                                  logprobs=self._released_logprobs(),
                                  usage=self.usage_so_far(), content=content)
        return fmt.chunk(released, index=self.index, logprobs=self._released_logprobs(),
                         usage=self.usage_so_far())

    def _released_logprobs(self) -> dict[str, Any] | None:
        """The logprobs block of the tokens whose text has all been released since the
        last one, in order, up to the first whose logprobs did not come with it; None when
        there are none (or the client did not ask)."""
        if self.logprobs is None or not self.by_text:
            return None
        text, start = self.text, self.logprobs_sent
        upto = start
        # The held-back text (a possible stop string) holds its tokens' logprobs back too.
        while (upto < len(text.ends) and text.ends[upto] <= self.holdback.sent
               and text.logprobs[upto] is not None):
            upto += 1
        if upto == start:
            return None
        self.logprobs_sent = upto
        return self.logprobs(text.ids[start:upto],
                             [lp for lp in text.logprobs[start:upto] if lp is not None])

    async def _next_entries(self, deadline: float) -> list[dict[str, str]]:
        """The next entry (waiting until ``deadline``) and every one queued behind it."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self.timeout_error()
        try:
            entries = [await asyncio.wait_for(self.events.get(), remaining)]
        except TimeoutError:
            raise self.timeout_error() from None
        while not self.events.empty():
            entries.append(self.events.get_nowait())
        return entries

    async def _last_chunk(self, fmt: ChunkFormat) -> dict[str, Any]:
        """The choice's last chunk: text not sent yet, the finish reason, the logprobs not
        sent yet (from the record: every generated token's, the stop string's too)."""
        done = await self.finish()
        logprobs = None
        start = self.logprobs_sent
        if self.logprobs is not None and (start < len(done.logprobs) or start == 0):
            logprobs = self.logprobs(done.generated_ids[start:len(done.logprobs)],
                                     done.logprobs[start:])
        rest = self.holdback.finish(done.text)
        if self.tool_call is not None:
            content, deltas, reason = self.tool_call.finish(rest, done.finish_reason)
            last = fmt.tool_chunk(deltas, reason, self.index, logprobs, done.usage, content)
        else:
            last = fmt.chunk(rest, done.finish_reason, self.index, logprobs, done.usage)
        if done.scls:  # our extension, as in the non-streamed body; clients ignore it
            last["scls"] = done.scls
        self.done = True
        return last


_END = object()  # a choice's pump has no more chunks


async def stream_chunks(
    choices: list[ChoiceStream],
    fmt: ChunkFormat,
    usage: Callable[[], dict[str, int]],
    timeout_s: float,
    error_body: Callable[[Exception], dict[str, Any]],
) -> AsyncGenerator[str, None]:
    """Server-sent events for a request's choices (several with ``n`` or batched prompts,
    their chunks interleaved as they come, each with its ``index``), then the usage chunk
    when asked (``usage()``, called once every choice has finished), then ``[DONE]``. An
    error (a request failed, timed out, or the server is shutting down) ends the stream
    with an ``{"error": ...}`` event instead."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    out: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(choice: ChoiceStream) -> None:
        try:
            async for payload in choice.chunks(fmt, deadline):
                await out.put(payload)
            await out.put(_END)
        except Exception as exc:
            await out.put(exc)

    if fmt.chat:
        for choice in choices:
            yield sse(fmt.role(choice.index))
    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(tasks)
        while running:
            item = await out.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield sse(item)
        if fmt.include_usage:
            yield sse(fmt.usage(usage()))
    except Exception as exc:  # headers are sent: the error travels as an event
        yield sse(error_body(exc))
    finally:
        for task in tasks:
            task.cancel()
    yield DONE
