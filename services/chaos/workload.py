"""The chaos workload: fixed greedy requests over REST, and the ledger of what became of them.

Each request streams (``stream: true``): the response headers carry ``X-Request-Id`` as soon
as the request is written to Redis, so the client knows exactly which requests were
*accepted* even when the connection breaks later (a non-streaming 503 carries no id). When
a stream ends without its final chunk, the client polls ``GET /v1/requests/{id}`` until the
request ends. Submissions refused with 429 or 503, or by a broken connection, are retried
(they were not accepted). Whether a request was served right is checked afterwards from
Redis (:func:`verify`): one final event, as many tokens in its events as it generated, and
the same token ids as the undisturbed run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from shared.core.states import RequestStatus
from shared.core.store import Store

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Slice-level scheduling splits generation into slices.",
    "Redis keeps the request hashes and event streams.",
    "A worker runs one slice per job and commits it with a fence.",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Les sanglots longs des violons de l'automne",
    "1, 2, 3, 5, 8, 13,",
)
#: Constraints a third of the requests run under (docs/structured-outputs.md): their
#: grammar's state must survive kills, restarts and moves like the tokens do.
GRAMMARS: tuple[dict[str, Any], ...] = (
    {"regex": "[a-z0-9 ,.]{8,160}"},
    {"json": {"type": "object", "properties": {
        "words": {"type": "array", "items": {"type": "string", "maxLength": 12},
                  "maxItems": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["words", "count"], "additionalProperties": False}},
)
#: A stream waits as long as its request takes (bounded by the run's deadline).
_STREAM_TIMEOUT = httpx.Timeout(30.0, read=None)
#: Statuses a request ends in.
TERMINAL = {RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED}


@dataclass(frozen=True)
class Spec:
    """One request of the workload: the same body in every run."""

    index: int
    prompt: str
    max_tokens: int
    seed: int
    grammar: dict[str, Any] | None = None  # ``structured_outputs``, if constrained

    def body(self) -> dict[str, Any]:
        """The ``/v1/completions`` body (greedy, EOS ignored so every request needs
        ``max_tokens / slice_length`` slices, unless its grammar ends it sooner)."""
        return {
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "seed": self.seed,
            "ignore_eos": True,
            "stream": True,
            **({"structured_outputs": self.grammar} if self.grammar else {}),
        }


def make_specs(count: int, max_tokens: int) -> list[Spec]:
    """``count`` fixed requests: the prompts in turn, each with its own suffix and seed;
    every third one constrained by one of :data:`GRAMMARS` in turn."""
    return [
        Spec(i, f"{PROMPTS[i % len(PROMPTS)]} #{i}", max_tokens, 1000 + i,
             GRAMMARS[(i // 3) % len(GRAMMARS)] if i % 3 == 2 else None)
        for i in range(count)
    ]


@dataclass
class Sent:
    """One accepted request: which spec, its id, how its client saw it end."""

    spec: int
    request_id: str
    streamed: bool = False  # the stream ended with its final chunk
    polled: bool = False  # the client had to poll for the result
    abandoned: bool = False  # it had not ended when the run's deadline came
    seen_end: bool = False  # the client saw it end (final chunk, or a poll said so)
    text: str = ""


@dataclass
class Ledger:
    """Everything the clients saw: accepted requests and HTTP statuses.

    ``redis_outage`` is set by the Redis faults while Redis is down or frozen, and until it
    works again: a 503 then is documented behaviour, as is a 503 ``not_ready`` (no leader or
    no live worker: the request was refused before anything was stored, docs/operations.md
    "Readiness"); any other 5xx is a server error.
    """

    sent: int = 0  # submission attempts (each POST)
    accepted: list[Sent] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    unavailable_503: int = 0
    not_ready_503: int = 0  # refused before anything was stored: no leader or no worker
    transport_errors: Counter[str] = field(default_factory=Counter)
    stream_errors: int = 0  # streams that ended with an error event or broke
    error_samples: list[str] = field(default_factory=list)
    redis_outage: bool = False

    def note(self, status: int, detail: str = "") -> None:
        """Count one HTTP status seen by a client."""
        self.statuses[status] += 1
        if status == 503 and '"not_ready"' in detail:
            # documented (docs/operations.md, readiness): nothing was stored, retry later
            self.not_ready_503 += 1
        elif status == 503 and self.redis_outage:
            self.unavailable_503 += 1
        elif status >= 500:
            self.server_errors += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{status}: {detail[:300]}")

    def note_transport(self, exc: Exception) -> None:
        """Count a connection-level failure (no HTTP status)."""
        self.transport_errors[type(exc).__name__] += 1


async def _read_stream(resp: httpx.Response, sent: Sent, ledger: Ledger) -> None:
    """Collect a stream's text; ``sent.streamed`` when it reached ``[DONE]`` cleanly."""
    parts: list[str] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            sent.streamed = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            ledger.stream_errors += 1
            if len(ledger.error_samples) < 20:
                ledger.error_samples.append(f"stream error: {chunk['error']}")
            return
        parts.extend(c.get("text") or "" for c in chunk.get("choices", []))
    sent.text = "".join(parts)


async def poll_until_ended(
    client: httpx.AsyncClient, request_id: str, ledger: Ledger, deadline: float
) -> dict[str, Any] | None:
    """GET the request until it has ended; its body, or None at ``deadline``."""
    while time.monotonic() < deadline:
        try:
            resp = await client.get(f"/v1/requests/{request_id}", timeout=10)
        except httpx.HTTPError as exc:
            ledger.note_transport(exc)
        else:
            if resp.status_code != 200:
                ledger.note(resp.status_code, resp.text)
            elif resp.json()["status"] in {s.value for s in TERMINAL}:
                return dict(resp.json())
        await asyncio.sleep(0.5)
    return None


async def submit(
    client: httpx.AsyncClient, spec: Spec, ledger: Ledger, deadline: float, retry: bool = True
) -> Sent | None:
    """Send one request until it is accepted (once only without ``retry``), then follow it
    to its end; None if it was not accepted before ``deadline``."""
    while time.monotonic() < deadline:
        ledger.sent += 1
        sent: Sent | None = None
        try:
            # No read timeout: a client that gives up closes the stream, which cancels the
            # request (by design); the run's deadline bounds the wait instead.
            async with client.stream(
                "POST", "/v1/completions", json=spec.body(), timeout=_STREAM_TIMEOUT
            ) as resp:
                if resp.status_code != 200:
                    ledger.note(resp.status_code, (await resp.aread()).decode(errors="replace"))
                else:
                    ledger.note(200)
                    sent = Sent(spec.index, resp.headers["x-request-id"])
                    ledger.accepted.append(sent)
                    left = max(0.1, deadline - time.monotonic())
                    await asyncio.wait_for(_read_stream(resp, sent, ledger), left)
        except TimeoutError:
            if sent is None:
                continue
            sent.abandoned = True  # not ended by the deadline: counted as lost
            return sent
        except (httpx.HTTPError, ValueError) as exc:
            ledger.note_transport(exc)
            if sent is not None:  # accepted, then the stream broke: poll below
                ledger.stream_errors += 1
        if sent is None:  # refused (429, 503, connection): not accepted, send again
            if not retry:
                return None
            await asyncio.sleep(0.5)
            continue
        sent.seen_end = sent.streamed
        if not sent.streamed:
            sent.polled = True
            body = await poll_until_ended(client, sent.request_id, ledger, deadline)
            sent.seen_end = body is not None
        return sent
    return None


async def run_workload(
    url: str,
    specs: list[Spec],
    ledger: Ledger,
    concurrency: int,
    deadline_s: float,
    keep_going: asyncio.Event | None = None,
) -> None:
    """Send ``specs`` with ``concurrency`` clients; while ``keep_going`` is set, start over
    from the first spec when all were sent (the faulted run lasts as long as its faults)."""
    deadline = time.monotonic() + deadline_s
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(60.0, read=120.0), limits=limits
    ) as client:

        async def one_client() -> None:
            for n in counter:
                if n >= len(specs) and not (keep_going and keep_going.is_set()):
                    return
                await submit(client, specs[n % len(specs)], ledger, deadline)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


@dataclass
class Verdict:
    """What became of the accepted requests, read from Redis after the run."""

    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    stream_text_differs: int = 0
    polled: int = 0
    lost_ids: list[str] = field(default_factory=list)
    lost_states: dict[str, str] = field(default_factory=dict)
    duplicated_ids: list[str] = field(default_factory=list)
    mismatched_ids: list[str] = field(default_factory=list)
    failed_errors: list[str] = field(default_factory=list)


def _duplicated(store: Store, request_id: str, generated: int) -> bool:
    """Not exactly one final event, or commit events (``slice``/``final``) whose tokens
    overlap (an event starting before the previous ones ended) or add up to more or fewer
    tokens than the request holds."""
    commits = [e for e in store.events(request_id) if e.get("kind") in ("slice", "final")]
    if sum(1 for e in commits if e["kind"] == "final") != 1:
        return True
    total = 0
    for event in commits:
        if "pos" in event and int(event["pos"]) != total:
            return True
        total += int(event.get("tokens") or 0)
    return total != generated


def verify(store: Store, ledger: Ledger, baseline: dict[int, list[int]] | None) -> Verdict:
    """Check every accepted request in Redis: ended, once, with the undisturbed tokens."""
    verdict = Verdict()
    for sent in ledger.accepted:
        verdict.polled += sent.polled
        record = store.get_request(sent.request_id)
        if record is None or record.status not in TERMINAL or sent.abandoned:
            verdict.lost += 1
            verdict.lost_ids.append(sent.request_id)
            # what Redis holds of it, and whether its client gave up: the first clue
            verdict.lost_states[sent.request_id] = (
                ("missing" if record is None else record.status.value)
                + (" (client stopped waiting)" if sent.abandoned else "")
            )
            continue
        if record.status is not RequestStatus.FINISHED:
            verdict.failed += 1
            verdict.failed_errors.append(
                f"{sent.request_id}: {record.status.value} {record.error}"[:300]
            )
            continue
        verdict.completed += 1
        if _duplicated(store, sent.request_id, len(record.generated_ids)):
            verdict.duplicated += 1
            verdict.duplicated_ids.append(sent.request_id)
        reference = None if baseline is None else baseline.get(sent.spec)
        if reference is not None and reference != list(record.generated_ids):
            verdict.mismatched += 1
            verdict.mismatched_ids.append(sent.request_id)
        if sent.streamed and sent.text != record.text:
            verdict.stream_text_differs += 1
    return verdict


def abandon_open(ledger: Ledger) -> int:
    """Mark every accepted request whose end its client has not seen as abandoned (the
    run's clients were stopped at its deadline): they count as lost. Returns how many."""
    open_ = [s for s in ledger.accepted if not s.seen_end]
    for sent in open_:
        sent.abandoned = True
    return len(open_)


def baseline_tokens(store: Store, ledger: Ledger) -> dict[int, list[int]]:
    """Token ids per spec from the undisturbed run (its finished requests)."""
    tokens: dict[int, list[int]] = {}
    for sent in ledger.accepted:
        record = store.get_request(sent.request_id)
        if record is not None and record.status is RequestStatus.FINISHED:
            tokens.setdefault(sent.spec, list(record.generated_ids))
    return tokens
