"""A simulated slice instance with one running set (``settings.running_set``).

The slice instance of :mod:`services.simulator.instances` runs the batches the scheduler
queued for it one after another; a batch's unfinished rows go back to the scheduler, which
may batch them again only with rows of the same instance, so the rows that came back
together go out together again: each instance serves several small cohorts in turn. Here
the instance keeps **one running set** instead. At every slice boundary:

1. the set's unfinished rows stay (their K/V stays in the instance's memory: they resume,
   no prefill);
2. if the next slice of the set would not fit the whole memory budget (contexts grow), the
   most recently admitted rows are **preempted**: their K/V is dropped and they go back to
   the scheduler as pending, keeping their tokens (they re-prefill later, as in vLLM);
3. batches the scheduler queued for the instance join, oldest first, while the merged
   slice fits the budget and ``settings.max_running`` rows (first come, first served: a batch that
   does not fit waits, and the ones behind it too).

There is no KV pool beside the batch: the running set's K/V *is* the slice's cache, and
one budget bounds it (memory by :func:`services.simulator.instances.run_slice`'s truth
model). The scheduler still forms fresh batches, places them (max-min) and sees the
instance's load: the running slice's estimate plus its queued batches'.
"""

from __future__ import annotations

import numpy as np

from services.simulator.instances import (
    QueuedBatch,
    SliceInstance,
    SliceOutcome,
    StepCost,
    run_slice,
    slice_peak,
)
from services.simulator.kv import SimKvPool
from services.simulator.state import RequestTable
from shared.policy.kvlayout import PADDED, cache_width
from shared.policy.types import SliceCost


class RunningSetInstance(SliceInstance):
    """A slice worker whose unfinished rows continue into its next slice (module docstring).

    ``budget_bytes`` is the instance's whole memory budget; ``estimate`` the policy's cost
    model (what the scheduler would publish as the running slice's estimate).
    """

    def __init__(self, position: int, inst_id: str, truth: StepCost, budget_bytes: int,
                 context_limit: int, overhead_s: float, estimate: SliceCost,
                 slice_length: int, max_running: int, layout: str = PADDED) -> None:
        super().__init__(position, inst_id, truth, budget_bytes, context_limit, overhead_s,
                         layout=layout)
        self.estimate = estimate
        self.slice_length = slice_length
        self.row_cap = max_running
        # The resident K/V of the set's rows: inside the slice's memory (run_slice prices
        # it as the static cache), so the store itself is unbounded.
        self.resident = SimKvPool(2**62)
        self.carry = np.zeros(0, np.int64)  # unfinished rows, in admission order
        self.preempted: list[int] = []  # rows sent back to pending by the last start
        self.max_running = 0  # the largest running set so far (the run's max_running)
        self.running_width = 0  # the running slice's cache width at its start (kvlayout)

    @property
    def running_rows(self) -> int:
        """Rows of the running slice (0 when idle)."""
        return 0 if self.running is None else len(self.running[0].idx)

    def is_open(self) -> bool:
        """Whether the scheduler may give it rows: nothing given is still waiting to join."""
        return not self.queue

    def deliver(self, batch: QueuedBatch, t: float, reqs: RequestTable) -> float | None:
        """Queue ``batch``; it joins at the next slice boundary (at once when idle)."""
        self.queue.append(batch)
        return self.start_next(t, reqs) if self.running is None else None

    def complete(self, t: float, reqs: RequestTable) -> tuple[QueuedBatch, SliceOutcome,
                                                              float | None]:
        """End the running slice; the caller commits its tokens, then calls
        :meth:`carry_on` and :meth:`start_next` (the next slice reads the new contexts)."""
        batch, out = self._end_running()
        if out.oom:  # the slice's K/V is gone with it
            for i in batch.idx.tolist():
                self.resident.discard(i)
        return batch, out, None

    def carry_on(self, batch: QueuedBatch, out: SliceOutcome) -> np.ndarray:
        """Keep the slice's unfinished rows (their K/V stays); returns them."""
        if out.oom:
            self.carry = np.zeros(0, np.int64)
            return self.carry
        rows = np.flatnonzero(~out.finished)
        ctx_bytes = int(self.truth.kv_bytes_per_token)
        for r in rows.tolist():
            self.resident.put(int(batch.idx[r]), ctx_bytes)
        self.carry = batch.idx[rows]
        return self.carry

    def _memory(self, reqs: RequestTable, idx: np.ndarray, fresh: np.ndarray) -> float:
        return slice_peak(self.truth, reqs, idx, fresh, self.slice_length, self.context_limit,
                          self.layout)

    def _preempt(self, reqs: RequestTable) -> np.ndarray:
        """Drop the most recently admitted carried rows until the set's next slice fits."""
        rows = self.carry
        self.preempted = []
        resumed = np.zeros(len(rows), dtype=bool)
        while len(rows) > 1 and (len(rows) > self.row_cap or self._memory(
                reqs, rows, resumed) > self.budget_bytes):
            last = int(rows[-1])
            self.resident.discard(last)
            self.preempted.append(last)
            rows, resumed = rows[:-1], resumed[:-1]
        if self.preempted:
            self.add_counters({"preemptions": float(len(self.preempted))})
        return rows

    def start_next(self, t: float, reqs: RequestTable) -> float | None:
        """Start the next slice at ``t``: the carried rows (preempting what no longer
        fits), then queued batches while they fit; the time it ends, or None when idle."""
        rows = self._preempt(reqs)
        self.carry = np.zeros(0, np.int64)
        fresh = np.zeros(len(rows), dtype=bool)
        joined: list[QueuedBatch] = []
        while self.queue:
            batch = self.queue[0]
            more = np.concatenate([rows, batch.idx])
            more_fresh = np.concatenate([fresh, np.ones(len(batch.idx), dtype=bool)])
            if len(rows) and (len(more) > self.row_cap
                              or self._memory(reqs, more, more_fresh) > self.budget_bytes):
                break  # first come, first served: it waits for room
            rows, fresh = more, more_fresh
            joined.append(self.queue.popleft())
        for batch in joined:
            self.released(batch.estimated_s, 1, len(batch.idx))
        if not len(rows):
            return None
        ctx = reqs.context(rows)
        width = cache_width(ctx, self.layout)
        est = float(self.estimate.resume_time(len(rows), width, self.slice_length))
        if fresh.any():  # the joiners' prefill, padded to the longest of them
            est += float(self.estimate.slice_time(int(fresh.sum()), int(ctx[fresh].max()), 1))
        self.running_width = width
        merged = QueuedBatch(rows, self.slice_length, est, True)
        self.claimed(merged)
        self.max_running = max(self.max_running, len(rows))
        out = run_slice(reqs, rows, self.slice_length, True, self.truth, self.budget_bytes,
                        self.context_limit, self.resident, self.layout)
        self.running = (merged, out)
        return t + out.compute_s + self.overhead_s
