"""Simulated instances: a slice worker (one batch at a time, FIFO queue) and an ILS engine.

Both execute with the *truth* cost model and the requests' true output lengths, which the
policy never sees. Token accounting mirrors :mod:`services.worker.engine` (slices) and
:mod:`services.worker.ils_runtime` (ILS); docs/simulator.md gives the definitions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from services.simulator.state import RequestTable


class StepCost(Protocol):
    """What a simulated engine needs of a cost model (a :class:`CostModel` has it all)."""

    kv_bytes_per_token: int

    def prefill_time(self, b: ArrayLike, l: ArrayLike) -> np.ndarray:  # noqa: E741
        """Seconds of a prefill of ``b`` rows padded to ``l`` tokens."""
        ...

    def decode_step_time(self, b: ArrayLike, c: ArrayLike) -> np.ndarray:
        """Seconds of one decode step of ``b`` rows with ``c`` cached tokens after it."""
        ...

    def slice_memory(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Peak bytes beyond the weights of a slice."""
        ...


@dataclass
class SliceOutcome:
    """What one slice of a batch did (per row arrays follow the batch's order)."""

    compute_s: float  # engine time (the worker's busy_s); for an OOM, the failed prefill
    tokens: np.ndarray  # new tokens per row
    finished: np.ndarray  # bool per row: the request is finished after this slice
    eos: np.ndarray  # bool per row: finished by EOS ("stop"), else by length
    oom: bool
    counters: dict[str, float] = field(default_factory=dict)


def run_slice(
    reqs: RequestTable, idx: np.ndarray, slice_length: int, drop_finished: bool,
    truth: StepCost, budget_bytes: int, context_limit: int,
) -> SliceOutcome:
    """One slice of requests ``idx`` as :meth:`SliceEngine.run_slice` would run it.

    Each row may produce ``min(S, max_tokens - generated, context room)`` tokens; a row
    whose true output ends first emits EOS (not returned) one step later, unless the
    output is forced. Prefill yields the first token, then decode steps run until every
    row is done (early return). With ``drop_finished`` finished rows leave the batch;
    without it (SLS) they stay and are counted as invalid tokens. Time is the truth
    model's prefill plus each decode step at its own batch size and context; memory is
    its ``slice_memory`` for the static cache the engine allocates (longest budget).
    """
    ctx = reqs.context(idx)
    gen = reqs.generated[idx]
    max_tokens = reqs.max_tokens[idx]
    allowed = np.minimum(slice_length, np.minimum(max_tokens - gen, context_limit - ctx))
    live = allowed > 0
    left = reqs.target[idx] - gen
    eos = live & (left < allowed) & (not reqs.forced)
    tokens = np.where(live, np.where(eos, left, allowed), 0)
    finished = ~live | eos | (gen + tokens >= max_tokens) | (ctx + tokens >= context_limit)
    if not live.any():
        return SliceOutcome(0.0, tokens, finished, eos, False, {})
    done_step = np.where(eos, left + 1, allowed)[live]
    live_ctx = ctx[live]
    b, padded, steps = len(live_ctx), int(live_ctx.max()), int(done_step.max())
    prefill = float(truth.prefill_time(b, padded))
    memory = float(truth.slice_memory(b, padded, int(allowed[live].max())))
    if memory > budget_bytes:
        return SliceOutcome(prefill, np.zeros_like(tokens), np.zeros_like(finished), eos, True)
    ks = np.arange(1, steps)
    if drop_finished:
        rows = b - np.searchsorted(np.sort(done_step), ks, side="right")
        invalid = 0
    else:
        rows = np.full(len(ks), b)
        invalid = int((steps - done_step).sum())
    decode = float(np.sum(truth.decode_step_time(rows, padded + ks))) if len(ks) else 0.0
    counters = {
        "slices": 1.0,
        "batch_size_sum": float(b),
        "generated_tokens": float(tokens.sum()),
        "pad_tokens": float(b * padded - live_ctx.sum()),
        "invalid_tokens": float(invalid),
        "recomputed_tokens": float(ctx[live & (gen > 0)].sum()),
        "prefill_s": prefill,
        "decode_s": decode,
        "busy_s": prefill + decode,
    }
    return SliceOutcome(prefill + decode, tokens, finished, eos, False, counters)


@dataclass
class QueuedBatch:
    """A dispatched batch: request positions, slice length, estimate, SLS flag."""

    idx: np.ndarray
    slice_length: int
    estimated_s: float
    drop_finished: bool


class InstanceBase:
    """Load as the scheduler reads it (batches claimed and not committed) and usage."""

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int) -> None:
        self.position = position
        self.id = inst_id
        self.truth = truth
        self.budget_bytes = budget_bytes
        self.context_limit = context_limit
        self.estimated_s = 0.0  # sum of estimates of queued + running batches
        self.batches = 0
        self.requests = 0
        self.counters: dict[str, float] = {}
        self.oom_events = 0
        self.version = 0  # bumps when the instance's next event is rescheduled

    def claimed(self, batch: QueuedBatch) -> None:
        """The scheduler claimed ``batch`` for this instance (load goes up at once)."""
        self.estimated_s += batch.estimated_s
        self.batches += 1
        self.requests += len(batch.idx)

    def released(self, estimated_s: float, batches: int, requests: int) -> None:
        """Work committed (load goes down)."""
        self.estimated_s = max(0.0, self.estimated_s - estimated_s)
        self.batches -= batches
        self.requests -= requests

    def add_counters(self, counters: dict[str, float]) -> None:
        """Accumulate worker counters."""
        for key, value in counters.items():
            self.counters[key] = self.counters.get(key, 0.0) + value


class SliceInstance(InstanceBase):
    """A slice worker: runs its queue's batches one at a time, in order (an RQ queue)."""

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, overhead_s: float) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit)
        self.overhead_s = overhead_s
        self.queue: deque[QueuedBatch] = deque()
        self.running: tuple[QueuedBatch, SliceOutcome] | None = None

    def deliver(self, batch: QueuedBatch, t: float, reqs: RequestTable) -> float | None:
        """Enqueue ``batch`` at ``t``; the time its slice ends if it starts now, else None."""
        self.queue.append(batch)
        return self._start(t, reqs) if self.running is None else None

    def _start(self, t: float, reqs: RequestTable) -> float | None:
        if not self.queue:
            return None
        batch = self.queue.popleft()
        out = run_slice(reqs, batch.idx, batch.slice_length, batch.drop_finished, self.truth,
                        self.budget_bytes, self.context_limit)
        self.running = (batch, out)
        # The worker is occupied by the compute and the commit/next-job latency.
        return t + out.compute_s + self.overhead_s

    def complete(self, t: float, reqs: RequestTable) -> tuple[QueuedBatch, SliceOutcome,
                                                              float | None]:
        """Finish the running slice at ``t``: ``(batch, outcome, next slice's end or None)``."""
        assert self.running is not None
        batch, out = self.running
        self.running = None
        self.released(batch.estimated_s, 1, len(batch.idx))
        if out.oom:
            self.oom_events += 1
        else:
            self.add_counters(out.counters)
        return batch, out, self._start(t, reqs)


@dataclass
class _Running:
    """Requests inside an ILS engine: positions, iterations done and needed, prompts."""

    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    need: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prompt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class IlsInstance(InstanceBase):
    """Continuous batching, simulated iteration by iteration with event skipping.

    Between two changes of the running set (an admission or a departure) every iteration
    runs the same requests, so the iterations up to the next departure are costed at once
    (one vectorised call, each iteration at its own context) and only the boundary is an
    event. An iteration costs ``Td(b, c)`` for the ``b`` running requests, with ``c`` their
    *mean* context (a paged cache has no padding: attention work follows the summed KV),
    plus ``Tp(1, l)`` for each request admitted in it; a request leaves after its last
    token. At most ``cap`` requests are inside the engine; more wait in a FIFO.
    """

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, cap: int) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit)
        self.cap = cap
        self.waiting: deque[int] = deque()
        self.run = _Running()
        self.seg_start = 0.0
        self.seg_ends = np.zeros(0)  # absolute end time of each iteration of the segment
        self.event_at = math.inf  # the boundary the engine stops at next
        self.new_in_segment = 0  # admitted at the segment's first iteration
        self.max_running = 0
        self.busy_s = 0.0
        self.concurrency_s = 0.0

    def deliver(self, batch: QueuedBatch, t: float, reqs: RequestTable,
                fail: Callable[[int, float, str], None]) -> float | None:
        """Admit ``batch``'s requests at ``t``; the engine's next event time if it changed."""
        for i in batch.idx.tolist():
            self.waiting.append(i)
        if not len(self.run.idx):
            return self._segment(t, reqs, fail)
        if len(self.run.idx) >= self.cap:
            return None
        # Join at the first iteration boundary at or after t.
        j = int(np.searchsorted(self.seg_ends, t, side="left"))
        boundary = float(self.seg_ends[min(j, len(self.seg_ends) - 1)])
        if boundary < self.event_at:
            self.event_at = boundary
            return boundary
        return None

    def boundary(self, t: float, reqs: RequestTable, fail: Callable[[int, float, str], None]
                 ) -> tuple[list[int], float | None]:
        """The engine reached its event at ``t``: ``(departed requests, next event time)``."""
        iters = int(np.searchsorted(self.seg_ends, t, side="right"))
        run = self.run
        span = t - self.seg_start
        self.busy_s += span
        self.concurrency_s += span * len(run.idx)
        run.done = run.done + iters
        kv = float(np.sum(run.prompt + run.done)) * self.truth.kv_bytes_per_token
        if kv > self.budget_bytes:
            self.oom_events += 1  # the real engine would preempt (and later recompute)
        leave = run.done >= run.need
        departed = run.idx[leave].tolist()
        reqs.generated[run.idx[leave]] = run.tokens[leave]
        keep = ~leave
        self.run = _Running(run.idx[keep], run.done[keep], run.need[keep], run.tokens[keep],
                            run.prompt[keep])
        return departed, self._segment(t, reqs, fail)

    def _segment(self, t: float, reqs: RequestTable,
                 fail: Callable[[int, float, str], None]) -> float | None:
        """Admit waiting requests and plan the iterations up to the next departure."""
        new = self._admit(t, reqs, fail)
        run = self.run
        self.seg_start = t
        if not len(run.idx):
            self.seg_ends = np.zeros(0)
            self.event_at = math.inf
            return None
        self.max_running = max(self.max_running, len(run.idx))
        b = len(run.idx)
        old = run.done > 0
        m = int((run.need - run.done).min())
        first = 0.0
        if old.any():
            ctx_old = float(np.mean(run.prompt[old] + run.done[old]))
            first += float(self.truth.decode_step_time(int(old.sum()), ctx_old))
        if len(new):
            first += float(np.sum(self.truth.prefill_time(1, reqs.prompt[new])))
        base = float(np.mean(run.prompt + run.done))
        rest = self.truth.decode_step_time(b, base + np.arange(1, m)) if m > 1 else np.zeros(0)
        self.seg_ends = t + np.cumsum(np.concatenate([[first], rest]))
        self.event_at = float(self.seg_ends[-1])
        return self.event_at

    def _admit(self, t: float, reqs: RequestTable,
               fail: Callable[[int, float, str], None]) -> np.ndarray:
        """Move waiting requests into the engine up to the cap; returns those admitted."""
        room = self.cap - len(self.run.idx)
        admitted: list[int] = []
        while self.waiting and room > 0:
            i = self.waiting.popleft()
            prompt = int(reqs.prompt[i])
            max_new = min(int(reqs.max_tokens[i] - reqs.generated[i]),
                          self.context_limit - prompt)
            kv = (prompt + max_new) * self.truth.kv_bytes_per_token
            if kv > self.budget_bytes:
                fail(i, t, f"never_fits: needs {kv} bytes of KV cache, the budget is "
                           f"{self.budget_bytes}")
                continue
            admitted.append(i)
            room -= 1
        new = np.array(admitted, dtype=np.int64)
        if len(new):
            target = reqs.target[new]
            max_new = np.minimum(reqs.max_tokens[new], self.context_limit - reqs.prompt[new])
            eos = (target < max_new) & (not reqs.forced)
            tokens = np.where(eos, target, max_new)
            need = np.maximum(1, np.where(eos, target + 1, max_new))
            r = self.run
            self.run = _Running(np.concatenate([r.idx, new]),
                                np.concatenate([r.done, np.zeros(len(new), np.int64)]),
                                np.concatenate([r.need, need]),
                                np.concatenate([r.tokens, tokens]),
                                np.concatenate([r.prompt, reqs.prompt[new]]))
        return new
