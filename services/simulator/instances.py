"""Simulated instances: a slice worker (one batch at a time, FIFO queue, a KV pool).

Both kinds of instance (slice workers here, continuous-batching engines in
:mod:`services.simulator.ils`) execute with the *truth* cost model and the requests' true
output lengths, which the policy never sees. Token accounting mirrors
:mod:`services.worker.engine` (slices) and :mod:`services.worker.ils_runtime` (ILS);
docs/simulator.md gives the definitions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from services.simulator.kv import SimKvPool
from services.simulator.state import RequestTable
from shared.policy.kvlayout import PADDED, cache_width
from shared.policy.prefill import pass_tokens_of, prefill_passes


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


def pass_tokens(truth: StepCost) -> float:
    """A prefill pass's overhead in tokens' worth, as the engine derives it from its cost
    model; a model without prefill coefficients gets one padded pass (``inf``)."""
    features = getattr(truth, "prefill_features", None)
    if features is None:
        return float("inf")
    return pass_tokens_of(features, truth.prefill_coef)  # type: ignore[attr-defined]


@dataclass
class SliceOutcome:
    """What one slice of a batch did (per row arrays follow the batch's order)."""

    compute_s: float  # engine time (the worker's busy_s); for an OOM, the failed prefill
    tokens: np.ndarray  # new tokens per row
    finished: np.ndarray  # bool per row: the request is finished after this slice
    eos: np.ndarray  # bool per row: finished by EOS ("stop"), else by length
    oom: bool
    counters: dict[str, float] = field(default_factory=dict)
    # Rows (batch positions) whose K/V goes to the pool when the slice ends, in the order
    # the engine stores them (rows done earlier leave the batch earlier), and their bytes.
    retain: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    retain_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # Filled when the slice ends (SliceInstance.complete): requests whose entry the pool
    # now holds, and requests evicted to make room (any request, in eviction order).
    stored: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)
    cache_bytes: float = 0.0  # the slice's KV cache as allocated (width x rows)


def _resume_rows(reqs: RequestTable, idx: np.ndarray, live: np.ndarray,
                 pool: SimKvPool | None) -> np.ndarray:
    """Per row: whether it resumes from ``pool`` (taking its entry out, as the engine's
    ``KvPool.take`` does at slice start). Rows with nothing left to generate drop theirs."""
    resumed = np.zeros(len(idx), dtype=bool)
    if pool is None:
        return resumed
    gen = reqs.generated[idx]
    for r, i in enumerate(idx.tolist()):
        if not live[r]:
            pool.discard(i)
        elif gen[r] > 0:
            resumed[r] = pool.take(i)
    return resumed


def _slice_memory(truth: StepCost, b: int, padded: int, s: int, prefilled: int,
                  prefill_len: int) -> float:
    """The slice's peak as the engine would allocate it: resumed rows have no prefill
    activations (where the model says so: ``resume_memory``/``mixed_memory``)."""
    if prefilled == b or not hasattr(truth, "mixed_memory"):
        return float(truth.slice_memory(b, padded, s))
    if prefilled == 0:
        return float(truth.resume_memory(b, padded, s))
    return float(truth.mixed_memory(b, padded, s, prefilled, prefill_len))


def slice_peak(truth: StepCost, reqs: RequestTable, idx: np.ndarray, fresh: np.ndarray,
               slice_length: int, context_limit: int, layout: str = PADDED) -> float:
    """Peak bytes of a slice of rows ``idx`` (``fresh`` marks rows that prefill) as
    :func:`run_slice` computes it; 0 when no row has a token left to draw."""
    ctx = reqs.context(idx)
    allowed = np.minimum(slice_length, np.minimum(reqs.max_tokens[idx] - reqs.generated[idx],
                                                  context_limit - ctx))
    live = allowed > 0
    if not live.any():
        return 0.0
    pre = fresh & live
    return _slice_memory(truth, int(live.sum()), cache_width(ctx[live], layout),
                         int(allowed[live].max()), int(pre.sum()),
                         int(ctx[pre].max()) if pre.any() else 0)


def run_slice(
    reqs: RequestTable, idx: np.ndarray, slice_length: int, drop_finished: bool,
    truth: StepCost, budget_bytes: int, context_limit: int, pool: SimKvPool | None = None,
    layout: str = PADDED,
) -> SliceOutcome:
    """One slice of requests ``idx`` as :meth:`SliceEngine.run_slice` would run it.

    Each row may produce ``min(S, max_tokens - generated, context room)`` tokens; a row
    whose true output ends first emits EOS (not returned) one step later, unless the
    output is forced. Rows whose entry is in ``pool`` (this instance's) **resume**: no
    prefill, they feed their last token, so all their tokens come from decode steps. The
    others **prefill** (in the engine's passes: :func:`shared.policy.prefill.prefill_groups`
    cuts them, by length, into left-padded passes), which yields their first
    token. Decode steps run until every row is done (early return): a resumed row needs as
    many steps as it draws tokens, a prefilled row one fewer. With ``drop_finished``
    finished rows leave the batch; without it (SLS) they stay and are counted as invalid
    tokens. Time is the truth model's prefill plus each decode step at its own batch size
    and context (the cache's width, i.e. the longest cached context, plus the step); memory
    is its ``slice_memory`` for the static cache the engine allocates (longest budget)
    against ``budget_bytes``, the instance's batch budget (its pool is outside it).
    ``layout`` (:mod:`shared.policy.kvlayout`): with ``ragged`` the cache's width in
    these formulas is the mean context instead of the longest (a what-if).
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
    resumed = _resume_rows(reqs, idx, live, pool)
    if not live.any():
        return SliceOutcome(0.0, tokens, finished, eos, False, {})
    res = resumed[live]
    live_ctx = ctx[live]
    # Tokens each row draws (an EOS draw included), then the decode steps that takes.
    need = np.where(eos, left + 1, allowed)[live] - (~res)
    b, padded, steps = len(live_ctx), cache_width(live_ctx, layout), int(need.max())
    pre = ~res
    prefill, pad = 0.0, 0
    if pre.any():
        # The engine's passes: rows sorted by length, cut where padding costs more than a
        # pass's overhead (shared.policy.prefill.prefill_groups).
        lens = live_ctx[pre]
        passes = prefill_passes(lens.tolist(), pass_tokens(truth))
        prefill = sum(float(truth.prefill_time(n, longest)) for n, longest in passes)
        pad = sum(n * longest for n, longest in passes) - int(lens.sum())
    memory = _slice_memory(truth, b, padded, int(allowed[live].max()), int(pre.sum()),
                           int(live_ctx[pre].max()) if pre.any() else 0)
    if memory > budget_bytes:
        return SliceOutcome(prefill, np.zeros_like(tokens), np.zeros_like(finished), eos, True)
    width = cache_width(live_ctx - res, layout)  # a resumed row's cache lacks its last token
    ks = np.arange(1, steps + 1)
    if drop_finished:
        rows = b - np.searchsorted(np.sort(need), ks, side="left")  # rows with need >= k
        invalid = 0
    else:
        rows = np.full(len(ks), b)
        invalid = int((steps - need).sum())
    decode = float(np.sum(truth.decode_step_time(rows, width + ks))) if steps else 0.0
    counters = {
        "slices": 1.0,
        "batch_size_sum": float(b),
        "generated_tokens": float(tokens.sum()),
        "pad_tokens": float(pad),
        "invalid_tokens": float(invalid),
        "recomputed_tokens": float(ctx[live & ~resumed & (gen > 0)].sum()),
        "prefill_s": prefill,
        "decode_s": decode,
        "busy_s": prefill + decode,
    }
    out = SliceOutcome(prefill + decode, tokens, finished, eos, False, counters)
    out.cache_bytes = float(b * (padded + int(allowed[live].max()) + 1)
                            * truth.kv_bytes_per_token)
    if pool is not None:
        counters["kv_hits"] = float(resumed.sum())
        counters["kv_misses"] = float((live & ~resumed & (gen > 0)).sum())
        # Unfinished rows leave their K/V (exact length: context but the last token),
        # those done earlier first: the engine stores a row as it leaves the batch.
        full_need = np.zeros(len(idx), np.int64)
        full_need[live] = need
        keep = np.flatnonzero(live & ~finished)
        out.retain = keep[np.argsort(full_need[keep], kind="stable")]
        out.retain_bytes = (ctx + tokens - 1)[out.retain] * int(truth.kv_bytes_per_token)
    return out


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

    def occupancy(self) -> tuple[int, float]:
        """``(rows running, KV bytes held)`` now (sampled for the run's distributions)."""
        return 0, 0.0

    def add_counters(self, counters: dict[str, float]) -> None:
        """Accumulate worker counters."""
        for key, value in counters.items():
            self.counters[key] = self.counters.get(key, 0.0) + value


class SliceInstance(InstanceBase):
    """A slice worker: runs its queue's batches one at a time, in order (an RQ queue)."""

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, overhead_s: float, pool_bytes: int = 0,
                 layout: str = PADDED) -> None:
        """``budget_bytes`` is the batch budget; ``pool_bytes`` (0: retention off) the KV
        pool's capacity beside it, as a worker splits its memory budget."""
        super().__init__(position, inst_id, truth, budget_bytes, context_limit)
        self.overhead_s = overhead_s
        self.queue: deque[QueuedBatch] = deque()
        self.running: tuple[QueuedBatch, SliceOutcome] | None = None
        self.pool = SimKvPool(pool_bytes) if pool_bytes > 0 else None
        self.layout = layout
        self.shed: list[int] = []  # rows handed back at a slice start (the engine requeues)

    def deliver(self, batch: QueuedBatch, t: float, reqs: RequestTable) -> float | None:
        """Enqueue ``batch`` at ``t``; the time its slice ends if it starts now, else None."""
        self.queue.append(batch)
        return self._start(t, reqs) if self.running is None else None

    def _start(self, t: float, reqs: RequestTable) -> float | None:
        if not self.queue:
            return None
        batch = self._shed_misses(self.queue.popleft(), reqs)
        # SLS batches (drop_finished off) run whole generations: nothing to retain.
        pool = self.pool if batch.drop_finished else None
        out = run_slice(reqs, batch.idx, batch.slice_length, batch.drop_finished, self.truth,
                        self.budget_bytes, self.context_limit, pool, self.layout)
        self.running = (batch, out)
        # The worker is occupied by the compute and the commit/next-job latency.
        return t + out.compute_s + self.overhead_s

    def occupancy(self) -> tuple[int, float]:
        """The running slice's rows and its cache, plus what the pool holds."""
        pooled = float(self.pool.used_bytes) if self.pool is not None else 0.0
        if self.running is None:
            return 0, pooled
        batch, out = self.running
        return len(batch.idx), out.cache_bytes + pooled

    def _shed_misses(self, batch: QueuedBatch, reqs: RequestTable) -> QueuedBatch:
        """The batch without the rows it cannot hold now: a row planned to resume whose
        entry was evicted since (a *miss*) must prefill, which needs more memory than the
        scheduler priced; while the slice would not fit, the youngest missed row is handed
        back (``shed``, to pending) instead of running out of memory."""
        if self.pool is None or not batch.drop_finished:
            return batch
        idx = batch.idx
        in_pool = np.array([i in self.pool for i in idx.tolist()], dtype=bool)
        missed = np.flatnonzero(~in_pool & (reqs.generated[idx] > 0))
        keep = np.ones(len(idx), dtype=bool)
        for r in missed[np.argsort(-idx[missed])].tolist():  # youngest first (a larger
            # position arrived later)
            if slice_peak(self.truth, reqs, idx[keep], ~in_pool[keep], batch.slice_length,
                          self.context_limit, self.layout) <= self.budget_bytes:
                break
            keep[r] = False
        if keep.all() or not keep.any():
            return batch
        self.shed += idx[~keep].tolist()
        self.add_counters({"kv_miss_handbacks": float((~keep).sum())})
        self.released(0.0, 0, int((~keep).sum()))
        return QueuedBatch(idx[keep], batch.slice_length, batch.estimated_s, batch.drop_finished)

    def complete(self, t: float, reqs: RequestTable) -> tuple[QueuedBatch, SliceOutcome,
                                                              float | None]:
        """Finish the running slice at ``t``: ``(batch, outcome, next slice's end or None)``."""
        batch, out = self._end_running()
        if not out.oom:
            self._retain(batch, out)
        # The next slice starts after this one's K/V is stored: it may resume from it.
        return batch, out, self._start(t, reqs)

    def _end_running(self) -> tuple[QueuedBatch, SliceOutcome]:
        """Take the running slice off the instance: its claim is released, and its OOM
        event or its counters recorded."""
        assert self.running is not None
        batch, out = self.running
        self.running = None
        self.released(batch.estimated_s, 1, len(batch.idx))
        if out.oom:
            self.oom_events += 1
        else:
            self.add_counters(out.counters)
        return batch, out

    def _retain(self, batch: QueuedBatch, out: SliceOutcome) -> None:
        """Store the unfinished rows' K/V in the pool (evicting LRU entries for room)."""
        if self.pool is None or not len(out.retain):
            return
        rows = batch.idx[out.retain].tolist()
        for i, nbytes in zip(rows, out.retain_bytes.tolist(), strict=True):
            out.evicted += self.pool.put(i, nbytes)
        out.stored = [i for i in rows if i in self.pool]
        self.add_counters({"kv_evictions": float(len(out.evicted))})


