"""Per-request state of a simulation, as numpy columns (compact for a million requests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.bench.workload import WorkItem

# Request status codes.
FUTURE, PENDING, INFLIGHT, DONE, FAILED = range(5)


class RequestTable:
    """Every request of a workload, sorted by arrival (ties keep the workload's order).

    Position ``i`` in the table is the simulator's request id (the policy sees ``str(i)``);
    ``index[i]`` is the :class:`WorkItem` index it came from. ``target`` is the true output
    length, which only the simulated engines read; the policy sees ``max_tokens``.
    """

    def __init__(self, items: Sequence[WorkItem], max_tokens: int | None) -> None:
        order = sorted(range(len(items)), key=lambda k: (items[k].arrival_s, k))
        n = len(order)
        self.n = n
        self.index = np.fromiter((items[k].index for k in order), np.int64, n)
        self.arrival = np.fromiter((items[k].arrival_s for k in order), np.float64, n)
        self.prompt = np.fromiter((items[k].prompt_tokens for k in order), np.int64, n)
        self.target = np.fromiter((items[k].output_tokens for k in order), np.int64, n)
        # The benchmark forces the output length (max_tokens = output, ignore_eos); with a
        # fixed max_tokens instead, requests stop on EOS after their true output length.
        self.forced = max_tokens is None
        self.max_tokens = (self.target.copy() if max_tokens is None
                           else np.maximum(self.target, max_tokens).astype(np.int64))
        self.generated = np.zeros(n, np.int64)
        self.slices = np.zeros(n, np.int32)
        self.retries = np.zeros(n, np.int16)
        self.status = np.full(n, FUTURE, np.int8)
        self.first_claim = np.full(n, np.nan)
        self.first_commit = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.reason: dict[int, str] = {}  # finish reason ("stop") where not "length"
        self.error: dict[int, str] = {}  # failed requests only

    def context(self, idx: np.ndarray) -> np.ndarray:
        """Prompt plus tokens generated so far."""
        return self.prompt[idx] + self.generated[idx]

    def fail(self, i: int, t: float, error: str) -> None:
        """Mark request ``i`` failed at ``t`` with ``error`` (``reason: detail``)."""
        self.status[i] = FAILED
        self.finish[i] = t
        self.error[i] = error


class PendingPool:
    """Pending requests, oldest first arrival first, as a mask over the arrival order.

    The table is sorted by arrival and a re-queued request keeps its arrival, so "the N
    oldest pending" is the first N set bits: found by scanning chunks from the oldest
    request that may still be pending (what ``Store.candidate_lengths`` reads from the
    pending sorted set).
    """

    _CHUNK = 8192

    def __init__(self, n: int) -> None:
        self.mask = np.zeros(n, dtype=bool)
        self.count = 0
        self._low = 0  # no pending request before this position

    def add(self, idx: np.ndarray | int) -> None:
        """Make requests pending (none of them may be pending already)."""
        idx = np.atleast_1d(idx)
        self.mask[idx] = True
        self.count += len(idx)
        self._low = min(self._low, int(idx.min()))

    def remove(self, idx: np.ndarray | int) -> None:
        """Take pending requests out (claimed or failed)."""
        idx = np.atleast_1d(idx)
        self.mask[idx] = False
        self.count -= len(idx)

    def oldest(self, limit: int) -> np.ndarray:
        """Positions of the ``limit`` oldest pending requests, oldest first."""
        found: list[np.ndarray] = []
        need, start, n = min(limit, self.count), self._low, len(self.mask)
        first = True
        while need > 0 and start < n:
            chunk = np.flatnonzero(self.mask[start:start + self._CHUNK]) + start
            if first:
                self._low = int(chunk[0]) if len(chunk) else min(start + self._CHUNK, n)
                first = not len(chunk)
            found.append(chunk[:need])
            need -= len(found[-1])
            start += self._CHUNK
        return np.concatenate(found) if found else np.zeros(0, np.int64)
