"""Simulated continuous-batching (ILS) engines: a concurrency-capped one and a vLLM-like one.

Both are simulated iteration by iteration with event skipping: between two changes of the
running set every iteration runs the same requests, so the iterations up to the next change
are costed at once (one vectorised call, each iteration at its own context) and only the
boundary is an event. A request leaves at the first boundary after its last token; waiting
requests are admitted FCFS at a boundary (none at one that preempted). How an iteration is
priced, and what the KV cache holds, depends on the KV layout
(:mod:`shared.policy.kvlayout`, ``SimOptions.kv_layout``):

* ``padded`` (the default: our iteration-level engine, built on the slice engine's kernels
  with one left-padded static cache whose width is the longest live row): the requests
  admitted at a boundary are prefilled in the slice engine's left-padded passes
  (:func:`shared.policy.prefill.prefill_passes`), ``Tp(rows, longest)`` each, and get their
  first token from them; the same iteration then runs one decode step for *all* running
  rows, the new ones feeding that first token, at ``Td(b, w)`` with ``w`` the **longest**
  context (attention reads the padded width). So a request produces two tokens in the
  iteration that admits it (one if that is its last: it takes no decode step), and the
  width grows by one per iteration. The cache holds
  ``b x (width + 1)`` token slots, ``width`` the longest context when the iteration starts.
* ``ragged`` (a paged cache, vLLM's): an iteration costs ``Td(b_old, c)`` for the requests
  already running, ``c`` their **mean** context (no padding: attention work follows the
  summed KV), plus ``Tp(1, l)`` for each request admitted in it (``l`` its whole context),
  which yields its first (and, in that iteration, only) token. The cache holds each
  request's own tokens (the vLLM-like engine rounds them up to blocks).

* :class:`IlsInstance` (policy ``ils``): at most ``cap`` requests run at once, more wait in
  a FIFO; KV beyond the budget is only counted (``oom_events``), never paid for.
* :class:`VllmInstance` (simulator policy ``ils-vllm``): memory decides, admission and
  preemption by recompute: see its docstring.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.simulator.instances import InstanceBase, QueuedBatch, StepCost, pass_tokens
from services.simulator.state import RequestTable
from shared.policy.kvlayout import PADDED, RAGGED
from shared.policy.prefill import prefill_passes

#: Tokens per KV block of the vLLM-like engine under the ragged layout (vLLM's default
#: ``block_size``).
BLOCK_TOKENS = 16

FailFn = Callable[[int, float, str], None]


def _empty() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass
class _Running:
    """Requests inside an engine, in admission order: positions, tokens drawn and needed
    since admission, final token count, context when admitted."""

    idx: np.ndarray = field(default_factory=_empty)
    done: np.ndarray = field(default_factory=_empty)
    need: np.ndarray = field(default_factory=_empty)
    tokens: np.ndarray = field(default_factory=_empty)
    ctx0: np.ndarray = field(default_factory=_empty)  # prompt + tokens generated before

    def select(self, keep: np.ndarray) -> _Running:
        """The rows where ``keep`` (a mask or positions), order kept."""
        return _Running(self.idx[keep], self.done[keep], self.need[keep], self.tokens[keep],
                        self.ctx0[keep])

    def extend(self, other: _Running) -> _Running:
        """These rows, then ``other``'s."""
        return _Running(*(np.concatenate([a, b]) for a, b in (
            (self.idx, other.idx), (self.done, other.done), (self.need, other.need),
            (self.tokens, other.tokens), (self.ctx0, other.ctx0))))

    def contexts(self) -> np.ndarray:
        """Each row's context now: prompt + every token generated so far."""
        return self.ctx0 + self.done


class IlsInstance(InstanceBase):
    """Continuous batching with a concurrency cap (see the module docstring)."""

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, cap: int, layout: str = PADDED) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit)
        if layout not in (PADDED, RAGGED):
            raise ValueError(f"unknown KV layout {layout!r}")
        self.cap = cap
        self.layout = layout
        self.padded = layout == PADDED
        # A prefill pass's overhead in tokens' worth, as the slice instances derive it.
        self.pass_tokens = pass_tokens(truth)
        # Token slots the budget holds (the padded cache's memory bound).
        self.slots = budget_bytes // max(1, int(truth.kv_bytes_per_token))
        self.waiting: deque[int] = deque()
        self.run = _Running()
        self.seg_start = 0.0
        self.seg_ends = np.zeros(0)  # absolute end time of each iteration of the segment
        self.seg_new = np.zeros(0, dtype=bool)  # rows admitted (prefilled) at its start
        self.seg_ctx = _empty()  # the rows' contexts at its start
        self.event_at = math.inf  # the boundary the engine stops at next
        self.max_running = 0
        self.busy_s = 0.0
        self.concurrency_s = 0.0

    def deliver(self, batch: QueuedBatch, t: float, reqs: RequestTable,
                fail: FailFn) -> float | None:
        """Admit ``batch``'s requests at ``t``; the engine's next event time if it changed."""
        waiting_before = len(self.waiting)
        self.waiting.extend(batch.idx.tolist())
        if not len(self.run.idx):
            return self._segment(t, reqs, fail)
        if not self._may_join(waiting_before):
            return None
        # Join at the first iteration boundary at or after t.
        j = int(np.searchsorted(self.seg_ends, t, side="left"))
        boundary = float(self.seg_ends[min(j, len(self.seg_ends) - 1)])
        if boundary < self.event_at:
            self.event_at = boundary
            return boundary
        return None

    def boundary(self, t: float, reqs: RequestTable, fail: FailFn
                 ) -> tuple[list[int], float | None]:
        """The engine reached its event at ``t``: ``(departed requests, next event time)``."""
        iters = int(np.searchsorted(self.seg_ends, t, side="right"))
        run = self.run
        span = t - self.seg_start
        self.busy_s += span
        self.concurrency_s += span * len(run.idx)
        run.done = run.done + iters
        if self.padded and iters:  # the admission iteration's prefill drew one token more
            run.done = run.done + self.seg_new
        self._check_memory(iters)
        leave = run.done >= run.need
        departed = run.idx[leave].tolist()
        reqs.generated[run.idx[leave]] = run.tokens[leave]
        self.run = run.select(~leave)
        return departed, self._segment(t, reqs, fail)

    def occupancy(self) -> tuple[int, float]:
        """Requests inside the engine and their K/V (contexts as of the last boundary):
        ``b x`` the longest context padded, the summed contexts ragged."""
        return len(self.run.idx), self._kv_tokens() * float(self.truth.kv_bytes_per_token)

    def _kv_tokens(self) -> float:
        ctx = self.run.contexts()
        if not len(ctx):
            return 0.0
        return float(len(ctx) * int(ctx.max())) if self.padded else float(np.sum(ctx))

    # --- hooks the vLLM-like engine overrides ------------------------------------------
    def _may_join(self, waiting_before: int) -> bool:
        """Whether a request delivered mid-segment may join at the next boundary."""
        return len(self.run.idx) < self.cap

    def _check_memory(self, iters: int) -> None:
        """Count an OOM event when the running set's KV exceeds the budget (the real
        engine would preempt and recompute; that cost is not modelled here). Ragged: the
        summed contexts after the segment; padded: ``b x (width + 1)`` slots of its last
        iteration (``width`` the longest context when it started)."""
        if self.padded:
            if not iters:
                return
            width = int(self._mem_widths(iters)[-1])
            over = len(self.run.idx) * (width + 1) > self.slots
        else:
            kv = float(np.sum(self.run.contexts())) * self.truth.kv_bytes_per_token
            over = kv > self.budget_bytes
        if over:
            self.oom_events += 1

    def _make_room(self, reqs: RequestTable) -> bool:
        """Before a segment: free memory for the next iteration; whether it preempted."""
        return False

    def _limit(self, m: int) -> int:
        """Iterations the segment may run before the running set must change (``m``: up
        to the next departure)."""
        return m

    def _fits(self, ctx: int) -> bool:
        """Whether one more request of context ``ctx`` may be admitted now."""
        return len(self.run.idx) < self.cap

    def _never_fits(self, prompt: int, max_new: int) -> str:
        """Why a request can never run here ("" if it can)."""
        kv = (prompt + max_new) * self.truth.kv_bytes_per_token
        if kv > self.budget_bytes:
            return (f"never_fits: needs {kv} bytes of KV cache, the budget is "
                    f"{self.budget_bytes}")
        return ""

    # --- segments ---------------------------------------------------------------------
    def _mem_widths(self, m: int) -> np.ndarray:
        """Padded: the width (longest context) at the start of each of the segment's first
        ``m`` iterations. Every row grows by one token per iteration, and by one more in
        the admission iteration for the rows it prefills."""
        ctx = self.seg_ctx
        after = int((ctx + self.seg_new).max())  # after the admission iteration's prefill
        return np.concatenate([[int(ctx.max())], after + np.arange(1, m)]).astype(np.int64)

    def _segment(self, t: float, reqs: RequestTable, fail: FailFn) -> float | None:
        """Admit waiting requests and plan the iterations up to the next change."""
        preempted = self._make_room(reqs)
        new = self._admit(t, reqs, fail) if not preempted else _empty()
        run = self.run
        b = len(run.idx)
        self.seg_start = t
        self.seg_new = np.arange(b) >= b - len(new)
        self.seg_ctx = run.contexts()
        if not b:
            self.seg_ends = np.zeros(0)
            self.event_at = math.inf
            return None
        self.max_running = max(self.max_running, b)
        fresh, ctx = self.seg_new, self.seg_ctx
        left = run.need - run.done
        if self.padded:  # the admission iteration draws a fresh row's first two tokens
            left = np.where(fresh, np.maximum(1, left - 1), left)
        m = self._limit(int(left.min()))
        first = 0.0
        if self.padded:
            if fresh.any():
                lens = run.ctx0[fresh].tolist()
                first += sum(float(self.truth.prefill_time(n, longest))
                             for n, longest in prefill_passes(lens, self.pass_tokens))
            # Rows whose prefill drew their last token leave without a decode step.
            decoding = ~(fresh & (run.need <= 1))
            width = 0
            if decoding.any():  # a fresh row's context after its prefill: one more
                width = int((ctx + fresh)[decoding].max())
                first += float(self.truth.decode_step_time(int(decoding.sum()), width))
            rest = (self.truth.decode_step_time(b, width + np.arange(1, m)) if m > 1
                    else np.zeros(0))
        else:
            old = ~fresh
            if old.any():
                ctx_old = float(np.mean(ctx[old]))
                first += float(self.truth.decode_step_time(int(old.sum()), ctx_old))
            if len(new):
                first += float(np.sum(self.truth.prefill_time(1, run.ctx0[fresh])))
            base = float(np.mean(ctx))
            rest = (self.truth.decode_step_time(b, base + np.arange(1, m)) if m > 1
                    else np.zeros(0))
        self.seg_ends = t + np.cumsum(np.concatenate([[first], rest]))
        self.event_at = float(self.seg_ends[-1])
        return self.event_at

    def _admit(self, t: float, reqs: RequestTable, fail: FailFn) -> np.ndarray:
        """Move waiting requests into the engine, FCFS, while :meth:`_fits` allows;
        returns those admitted. A request admitted with tokens already generated (after a
        preemption) re-prefills its whole context: counted as recomputed tokens."""
        admitted: list[int] = []
        while self.waiting:
            i = self.waiting[0]
            prompt, gen = int(reqs.prompt[i]), int(reqs.generated[i])
            max_new = min(int(reqs.max_tokens[i]), self.context_limit - prompt)
            why = self._never_fits(prompt, max_new)
            if why:
                self.waiting.popleft()
                fail(i, t, why)
                continue
            if not self._fits(prompt + gen):
                break
            self.waiting.popleft()
            admitted.append(i)
            self.run = self.run.extend(self._rows(np.array([i]), reqs))
        new = np.array(admitted, dtype=np.int64)
        gen = reqs.generated[new]
        if gen.any():
            self.add_counters({"recomputed_tokens": float((reqs.prompt[new] + gen)[gen > 0]
                                                          .sum())})
        return new

    def _rows(self, new: np.ndarray, reqs: RequestTable) -> _Running:
        """Engine rows for requests ``new`` admitted now (after ``generated`` tokens)."""
        target, gen = reqs.target[new], reqs.generated[new]
        max_new = np.minimum(reqs.max_tokens[new], self.context_limit - reqs.prompt[new])
        eos = (target < max_new) & (not reqs.forced)
        tokens = np.where(eos, target, max_new)
        need = np.maximum(1, np.where(eos, target + 1, max_new)) - gen
        return _Running(new, np.zeros(len(new), np.int64), need, tokens,
                        reqs.prompt[new] + gen)


class VllmInstance(IlsInstance):
    """A vLLM-like engine: admission and preemption by KV memory, not by a count.

    What a request holds depends on the layout. **Ragged** (vLLM's paged cache): the
    budget is cut into blocks of :data:`BLOCK_TOKENS` tokens' K/V; a request whose context
    before an iteration is ``c`` tokens (prompt + generated so far) needs ``ceil(c / 16)``
    blocks during it (a prefill writes its ``c`` tokens, a decode step the slot of the
    token it feeds). **Padded** (our engine's one left-padded cache): the running set holds
    ``b x (width + 1)`` token slots, ``width`` its longest context, no block rounding.

    Waiting requests are admitted FCFS at an iteration boundary while the running requests
    plus theirs fit (padded: ``(b + 1) x (max(width, c) + 1)`` slots). As running
    requests grow, when the next iteration would not fit, the most recently admitted
    running request is **preempted by recompute**: its K/V is freed and it goes back to
    the head of the waiting queue, keeping its tokens; re-admitted, it re-prefills prompt +
    generated so far (recomputed tokens) and counts one ``preemptions``. No admission
    happens at a boundary that preempted (as vLLM's scheduler). A request whose ``prompt +
    max_tokens`` tokens (ragged: their blocks) exceed the budget fails ``never_fits``.
    Nothing else caps the running set (no ``max_num_seqs``) and the whole budget is KV: no
    pool.
    """

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, layout: str = PADDED) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit, cap=0,
                         layout=layout)
        self.blocks = total_blocks(budget_bytes, truth.kv_bytes_per_token)

    def _may_join(self, waiting_before: int) -> bool:
        # FCFS: with a request already waiting (memory blocked it), a new one cannot pass.
        return waiting_before == 0

    def _check_memory(self, iters: int) -> None:
        return None  # never over: the engine preempts first

    def _used(self, ahead: int = 0) -> int:
        """Ragged: blocks the running set needs ``ahead`` iterations from now."""
        return int(np.sum(-(-(self.run.contexts() + ahead) // BLOCK_TOKENS)))

    def _over(self) -> bool:
        """Whether the running set's next iteration does not fit the budget."""
        if self.padded:
            return len(self.run.idx) * (int(self.run.contexts().max()) + 1) > self.slots
        return self._used() > self.blocks

    def _make_room(self, reqs: RequestTable) -> bool:
        preempted = 0
        while len(self.run.idx) > 1 and self._over():
            last = len(self.run.idx) - 1
            i = int(self.run.idx[last])
            reqs.generated[i] = self.run.ctx0[last] + self.run.done[last] - reqs.prompt[i]
            self.run = self.run.select(np.arange(last))
            self.waiting.appendleft(i)
            preempted += 1
        if preempted:
            self.add_counters({"preemptions": float(preempted)})
        return preempted > 0

    def _fits(self, ctx: int) -> bool:
        if self.padded:
            ctxs = self.run.contexts()
            width = max(int(ctxs.max()), ctx) if len(ctxs) else ctx
            return (len(ctxs) + 1) * (width + 1) <= self.slots
        return self._used() + -(-ctx // BLOCK_TOKENS) <= self.blocks

    def _kv_tokens(self) -> float:
        if self.padded:
            return super()._kv_tokens()
        return float(self._used() * BLOCK_TOKENS)  # the blocks the requests hold

    def _never_fits(self, prompt: int, max_new: int) -> str:
        if self.padded:  # alone, its last iteration holds prompt + max_new slots
            return super()._never_fits(prompt, max_new)
        need = -(-(prompt + max_new) // BLOCK_TOKENS)
        if need > self.blocks:
            return (f"never_fits: needs {need} KV blocks of {BLOCK_TOKENS} tokens, the "
                    f"budget holds {self.blocks}")
        return ""

    def _limit(self, m: int) -> int:
        """Up to the first iteration that would not fit (then it preempts).

        Padded: ``b x (width_k + 1)`` from :meth:`_mem_widths`. Ragged: ``sum_r ceil((c_r
        + k) / 16)`` over ``k < m`` from the 16 residues of ``c_r + 15``, so a segment
        costs O(16 m), not O(b m)."""
        if m <= 1:
            return m
        if self.padded:
            used = len(self.run.idx) * (self._mem_widths(m) + 1)
            over = np.flatnonzero(used > self.slots)
            return max(1, int(over[0])) if len(over) else m
        a = self.run.contexts() + BLOCK_TOKENS - 1
        counts = np.bincount(a % BLOCK_TOKENS, minlength=BLOCK_TOKENS)
        ks = np.arange(m)
        used = int(np.sum(a // BLOCK_TOKENS)) + (
            (np.arange(BLOCK_TOKENS)[None, :] + ks[:, None]) // BLOCK_TOKENS
        ) @ counts
        over = np.flatnonzero(used > self.blocks)
        return max(1, int(over[0])) if len(over) else m


def total_blocks(budget_bytes: int, kv_bytes_per_token: int) -> int:
    """KV blocks of :data:`BLOCK_TOKENS` tokens in ``budget_bytes``."""
    return budget_bytes // max(1, BLOCK_TOKENS * int(kv_bytes_per_token))
