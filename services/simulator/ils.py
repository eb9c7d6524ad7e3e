"""Simulated continuous-batching (ILS) engines: a concurrency-capped one and a vLLM-like one.

Both are simulated iteration by iteration with event skipping: between two changes of the
running set every iteration runs the same requests, so the iterations up to the next change
are costed at once (one vectorised call, each iteration at its own context) and only the
boundary is an event. An iteration costs ``Td(b, c)`` for the ``b`` running requests, with
``c`` their *mean* context (a paged cache has no padding: attention work follows the summed
KV), plus ``Tp(1, l)`` for each request admitted in it (``l`` its whole context); a request
leaves after its last token.

* :class:`IlsInstance` (policy ``ils``): at most ``cap`` requests run at once, more wait in
  a FIFO; KV beyond the budget is only counted (``oom_events``), never paid for.
* :class:`VllmInstance` (simulator policy ``ils-vllm``): memory decides, as in vLLM's paged
  cache: see its docstring.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.simulator.instances import InstanceBase, QueuedBatch, StepCost
from services.simulator.state import RequestTable

#: Tokens per KV block of the vLLM-like engine (vLLM's default ``block_size``).
BLOCK_TOKENS = 16

FailFn = Callable[[int, float, str], None]


def _empty() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass
class _Running:
    """Requests inside an engine, in admission order: positions, iterations done and
    needed since admission, final token count, context when admitted."""

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


class IlsInstance(InstanceBase):
    """Continuous batching with a concurrency cap (see the module docstring)."""

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, cap: int) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit)
        self.cap = cap
        self.waiting: deque[int] = deque()
        self.run = _Running()
        self.seg_start = 0.0
        self.seg_ends = np.zeros(0)  # absolute end time of each iteration of the segment
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
        self._check_memory()
        leave = run.done >= run.need
        departed = run.idx[leave].tolist()
        reqs.generated[run.idx[leave]] = run.tokens[leave]
        self.run = run.select(~leave)
        return departed, self._segment(t, reqs, fail)

    def occupancy(self) -> tuple[int, float]:
        """Requests inside the engine and their K/V (contexts as of the last boundary)."""
        tokens = float(np.sum(self.run.ctx0 + self.run.done))
        return len(self.run.idx), tokens * self.truth.kv_bytes_per_token

    # --- hooks the vLLM-like engine overrides ------------------------------------------
    def _may_join(self, waiting_before: int) -> bool:
        """Whether a request delivered mid-segment may join at the next boundary."""
        return len(self.run.idx) < self.cap

    def _check_memory(self) -> None:
        """Count an OOM event when the running set's KV exceeds the budget (the real
        engine would preempt and recompute; that cost is not modelled here)."""
        kv = float(np.sum(self.run.ctx0 + self.run.done)) * self.truth.kv_bytes_per_token
        if kv > self.budget_bytes:
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
    def _segment(self, t: float, reqs: RequestTable, fail: FailFn) -> float | None:
        """Admit waiting requests and plan the iterations up to the next change."""
        preempted = self._make_room(reqs)
        new = self._admit(t, reqs, fail) if not preempted else _empty()
        run = self.run
        self.seg_start = t
        if not len(run.idx):
            self.seg_ends = np.zeros(0)
            self.event_at = math.inf
            return None
        self.max_running = max(self.max_running, len(run.idx))
        b = len(run.idx)
        old = run.done > 0
        m = self._limit(int((run.need - run.done).min()))
        first = 0.0
        if old.any():
            ctx_old = float(np.mean(run.ctx0[old] + run.done[old]))
            first += float(self.truth.decode_step_time(int(old.sum()), ctx_old))
        if len(new):
            first += float(np.sum(self.truth.prefill_time(1, run.ctx0[~old])))
        base = float(np.mean(run.ctx0 + run.done))
        rest = self.truth.decode_step_time(b, base + np.arange(1, m)) if m > 1 else np.zeros(0)
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
    """A vLLM-like engine: admission and preemption by paged-KV memory, not by a count.

    The budget is cut into blocks of :data:`BLOCK_TOKENS` tokens' K/V. A request whose
    context before an iteration is ``c`` tokens (prompt + generated so far) needs
    ``ceil(c / 16)`` blocks during it: a prefill writes its ``c`` tokens, a decode step
    writes the slot of the token it feeds. Waiting requests are admitted FCFS at an
    iteration boundary while the blocks of all running requests plus theirs fit. As running
    requests grow, when the next iteration would not fit, the most recently admitted
    running request is **preempted by recompute**: its blocks are freed and it goes back to
    the head of the waiting queue, keeping its tokens; re-admitted, it re-prefills prompt +
    generated so far (recomputed tokens) and counts one ``preemptions``. No admission
    happens at a boundary that preempted (as vLLM's scheduler). A request whose
    ``prompt + max_tokens`` blocks exceed the budget fails ``never_fits``. Nothing else
    caps the running set (no ``max_num_seqs``) and the whole budget is KV: no pool.
    """

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit, cap=0)
        self.blocks = total_blocks(budget_bytes, truth.kv_bytes_per_token)

    def _may_join(self, waiting_before: int) -> bool:
        # FCFS: with a request already waiting (memory blocked it), a new one cannot pass.
        return waiting_before == 0

    def _check_memory(self) -> None:
        return None  # never over: the engine preempts first

    def _used(self, ahead: int = 0) -> int:
        """Blocks the running set needs ``ahead`` iterations from now."""
        return int(np.sum(-(-(self.run.ctx0 + self.run.done + ahead) // BLOCK_TOKENS)))

    def _make_room(self, reqs: RequestTable) -> bool:
        preempted = 0
        while len(self.run.idx) > 1 and self._used() > self.blocks:
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
        return self._used() + -(-ctx // BLOCK_TOKENS) <= self.blocks

    def occupancy(self) -> tuple[int, float]:
        """Requests inside the engine and the KV blocks they hold."""
        return len(self.run.idx), float(self._used() * BLOCK_TOKENS
                                        * self.truth.kv_bytes_per_token)

    def _never_fits(self, prompt: int, max_new: int) -> str:
        need = -(-(prompt + max_new) // BLOCK_TOKENS)
        if need > self.blocks:
            return (f"never_fits: needs {need} KV blocks of {BLOCK_TOKENS} tokens, the "
                    f"budget holds {self.blocks}")
        return ""

    def _limit(self, m: int) -> int:
        """Up to the first iteration whose blocks would not fit (then it preempts).

        ``sum_r ceil((c_r + k) / 16)`` over ``k < m`` from the 16 residues of ``c_r + 15``,
        so a segment costs O(16 m), not O(b m)."""
        if m <= 1:
            return m
        a = self.run.ctx0 + self.run.done + BLOCK_TOKENS - 1
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
