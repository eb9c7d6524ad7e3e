"""Batch-to-instance assignment (offloading) on plain arrays (docs/design.md §3), pure.

Each offloader takes one :class:`Placement` (batches x instances) and the round-robin
cursor, and returns, for every batch, the index of its instance (``-1``: not placed this
cycle, its requests stay pending) and the cursor for the next cycle. Every offloader

* places a batch only where it fits (``times`` is ``inf`` elsewhere),
* respects the horizon: an instance whose expected outstanding work, including what this
  cycle already gave it, is ``>= horizon_s`` takes no new batch, so work is not committed
  far ahead and late arrivals can still join well-formed batches,
* places urgent batches (holding a request past the age bound) before all others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    """One cycle's offloading problem: ``B`` batches, ``K >= 1`` instances in a stable order."""

    times: np.ndarray  # (B, K) estimated seconds of batch b on instance k; inf: cannot run there
    sizes: np.ndarray  # (B,) requests per batch
    arrival: np.ndarray  # (B,) oldest arrival in each batch
    urgent: np.ndarray  # (B,) bool: holds a request older than the age bound
    busy_s: np.ndarray  # (K,) expected outstanding (queued + running) work, seconds
    requests: np.ndarray  # (K,) queued + running requests
    horizon_s: float
    # (B,) index of the instance holding the batch's K/V (-1: none); its column of
    # ``times`` is the resume time there, and it is priced even past the horizon.
    home: np.ndarray | None = None

    @property
    def homes(self) -> np.ndarray:
        """``home``, or -1 for every batch when none was given."""
        return np.full(len(self.times), -1) if self.home is None else self.home


def _fifo_order(problem: Placement) -> list[int]:
    """Urgent batches first, then oldest request first (the baselines' order)."""
    return np.lexsort((problem.arrival, ~problem.urgent)).tolist()


class _Loads:
    """Expected outstanding work per instance as batches are placed, and who is open."""

    def __init__(self, problem: Placement) -> None:
        self.horizon_s = problem.horizon_s
        self.busy = problem.busy_s.astype(np.float64)
        # Added to a score: 0 for an instance below the horizon, inf for one past it.
        self.closed = np.where(self.busy >= self.horizon_s, np.inf, 0.0)
        self.open_count = int(np.count_nonzero(self.closed == 0.0))

    def add(self, k: int, seconds: float) -> None:
        self.busy[k] += seconds
        if self.busy[k] >= self.horizon_s and self.closed[k] == 0.0:
            self.closed[k] = np.inf
            self.open_count -= 1


def max_min(problem: Placement, cursor: int) -> tuple[np.ndarray, int]:
    """SCLS max-min: longest batch first, each to the instance where it completes soonest
    (:func:`_earliest_completion` in that order).

    Order: batches resuming retained K/V, then urgent ones (holding a request past the
    age bound), then the rest; within each, longest first.

    Batches go in descending estimated time (on the fastest instance that fits them);
    each goes to the open instance minimising ``busy + T(batch on that instance)``, the
    batch's expected completion time there, which for identical instances is the instance
    with the smallest expected completion time. That instance's busy time then grows by
    the batch's time. Ties go to the first instance in the stable order. The cursor is
    returned unchanged.

    Affinity is a cost, not a pin: a batch whose K/V an instance retains is placed before
    the others, priced there without prefill and elsewhere with it. While fresh batches
    are waiting too, it stays with its home (placed there if the home is open, else left
    pending for it): the other instances have new work to take, and a move would only add
    a re-prefill to the cluster's work, which under load is lost throughput. With no
    fresh work, the cost decides: it goes where it completes soonest (a move pays its
    prefill there and uses capacity that would otherwise idle), or waits for an overloaded
    home that still completes it first. A dead or restarted home is no home (the caller
    drops it), so nothing waits for it.
    """
    longest = np.min(problem.times, axis=1)
    home = problem.homes
    # Batches resuming retained K/V first (requests already started, holding pool memory,
    # as a continuous-batching engine serves running requests before waiting ones: their
    # entries are then not evicted by requests started after them, which would make them
    # re-prefill), then urgent ones (the age bound), then longest first.
    return _earliest_completion(problem, np.lexsort((-longest, ~problem.urgent, home < 0)),
                                cursor)


def fcfs_ect(problem: Placement, cursor: int) -> tuple[np.ndarray, int]:
    """Max-min's placement in arrival order: resuming batches first, then the batch holding
    the oldest request first, each to the instance where it completes soonest.

    Max-min's longest-first order balances one cycle's batches across instances, but with
    a horizon that defers whatever does not fit this cycle, the batches it leaves are the
    short ones, again and again, until the age bound makes them urgent: under overload,
    short new requests wait longest for their first token. In arrival order the same
    placement rule serves new requests first come, first served.
    """
    return _earliest_completion(problem, np.lexsort((problem.arrival, problem.homes < 0)),
                                cursor)


def prefill_first(problem: Placement, cursor: int) -> tuple[np.ndarray, int]:
    """Fresh batches (their requests' first slice) first, oldest first, then the resuming
    ones, oldest first; each to the instance where it completes soonest.

    The order of a prefill-first engine (vLLM's original scheduler): new requests get their
    first token before running ones continue, trading end-to-end latency and retained K/V
    (resuming batches wait, their entries may be evicted) for time to first token.
    """
    return _earliest_completion(problem, np.lexsort((problem.arrival, problem.homes >= 0)),
                                cursor)


def _earliest_completion(
    problem: Placement, order: np.ndarray, cursor: int
) -> tuple[np.ndarray, int]:
    """Place the batches in ``order``, each on the open instance where it completes soonest,
    with max-min's affinity rule (see :func:`max_min`); the cursor is returned unchanged."""
    loads = _Loads(problem)
    home = problem.homes
    assign = np.full(len(problem.times), -1)
    fresh_waiting = bool((home < 0).any())  # new work an open instance can take instead
    for b in order.tolist():
        if not loads.open_count:
            break  # every instance is past the horizon: nothing else can be placed
        completion = loads.busy + problem.times[b] + loads.closed
        k = int(np.argmin(completion))
        h = int(home[b])
        if h >= 0 and np.isfinite(problem.times[b, h]):
            if fresh_waiting and not loads.closed[h]:
                k = h  # others have new work to take: a move would only add a prefill
            elif fresh_waiting:
                continue  # ... so it waits for its overloaded home, which takes it first
            elif loads.closed[h] and loads.busy[h] + problem.times[b, h] <= completion[k]:
                continue  # no new work: its overloaded home still finishes it first
        if completion[k] == np.inf:
            continue  # fits no open instance: stays pending
        assign[b] = k
        loads.add(k, problem.times[b, k])
    return assign, cursor


def round_robin(problem: Placement, cursor: int) -> tuple[np.ndarray, int]:
    """Cycle over the instances from ``cursor``, skipping those full or too small.

    The cursor is the index of the next instance to try; it is returned so that the
    rotation continues across cycles instead of restarting at the first instance.
    """
    loads = _Loads(problem)
    n_inst = len(loads.busy)
    assign = np.full(len(problem.times), -1)
    cursor %= n_inst
    for b in _fifo_order(problem):
        if not loads.open_count:
            break
        rotation = (cursor + np.arange(n_inst)) % n_inst
        score = problem.times[b, rotation] + loads.closed[rotation]
        first = int(np.argmax(score < np.inf))
        if score[first] == np.inf:
            continue
        k = int(rotation[first])
        assign[b] = k
        loads.add(k, problem.times[b, k])
        cursor = (k + 1) % n_inst
    return assign, cursor


def least_requests(problem: Placement, cursor: int) -> tuple[np.ndarray, int]:
    """Each batch to the open instance with the fewest queued and running requests.

    Counts include the requests this cycle already gave it; ties go to the first instance
    in the stable order. The cursor is returned unchanged.
    """
    loads = _Loads(problem)
    requests = problem.requests.astype(np.float64)
    assign = np.full(len(problem.times), -1)
    for b in _fifo_order(problem):
        if not loads.open_count:
            break
        # The request count where the batch can run and the instance is open, else inf.
        score = np.where(problem.times[b] < np.inf, requests, np.inf) + loads.closed
        k = int(np.argmin(score))
        if score[k] == np.inf:
            continue
        assign[b] = k
        loads.add(k, problem.times[b, k])
        requests[k] += problem.sizes[b]
    return assign, cursor
