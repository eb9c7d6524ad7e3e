"""Batch-forming algorithms on plain arrays (docs/design.md §3), pure and vectorised.

Every function here partitions a sequence of requests, given by their context lengths in
the order the caller chose, into consecutive batches and returns the batch sizes. A batch
of the requests ``i..j`` has ``b = j - i + 1`` rows padded to the longest length among
them. The batching policies at the end turn the sizes into batches of request ids.
"""

from __future__ import annotations

import numpy as np

from shared.policy.types import CandidatePool, FormedBatch, SliceCost


def slice_cost_matrix(
    sorted_lens: np.ndarray, cost: SliceCost, capacity: int, slice_length: int, max_batch: int,
    group_start: np.ndarray | None = None, resumed: np.ndarray | None = None,
) -> np.ndarray:
    """Estimated time of every candidate batch of ``sorted_lens`` (ascending), ``inf`` if none.

    Entry ``[j, k - 1]`` is ``T(k, l_j)`` for the batch of the ``k`` requests ending at
    ``j``: sorted ascending, ``l_j`` is its padded length. It is ``inf`` when the batch
    would start before the first request or ``M(k, l_j) > capacity``. Columns past the
    largest batch that fits at all are dropped, so a tight memory budget also shrinks the
    dynamic programme's work. The memory model must not decrease with ``b`` (more rows
    never need less memory), so the fitting sizes of each row are ``1..largest``.

    ``group_start[j]`` (optional) is the first position of ``j``'s group: batches never
    cross a group boundary (lengths then ascend within each group, not overall).
    ``resumed`` (optional, per position) marks rows whose batches resume from retained K/V:
    they are priced with ``cost.resume_time`` (a group is all resumed or all not).
    """
    n = len(sorted_lens)
    if n == 0:
        return np.empty((0, 1))
    lens = np.asarray(sorted_lens, dtype=np.float64)
    largest = largest_fitting(lens, cost, capacity, slice_length, min(max_batch, n))
    if resumed is not None and resumed.any():  # resumed slices need less memory
        largest[resumed] = largest_fitting(lens[resumed], _ResumeMemory(cost), capacity,
                                           slice_length, min(max_batch, n))
    width = max(1, int(largest.max()))
    sizes = np.arange(1, width + 1)
    times = np.asarray(cost.slice_time(sizes[None, :], lens[:, None], slice_length))
    if resumed is not None and resumed.any():
        times = np.array(times, dtype=float)  # writable
        times[resumed] = cost.resume_time(sizes[None, :], lens[resumed][:, None], slice_length)
    # A batch of k ending at j must fit memory and must not start before request 0.
    limit = np.minimum(largest, np.arange(1, n + 1))
    if group_start is not None:
        limit = np.minimum(limit, np.arange(1, n + 1) - group_start)
    return np.where(sizes[None, :] > limit[:, None], np.inf, times)


class _ResumeMemory:
    """``cost`` seen by :func:`largest_fitting` for resumed rows: their memory model."""

    def __init__(self, cost: SliceCost) -> None:
        self.cost = cost

    def slice_memory(self, b: np.ndarray, l: np.ndarray, s: int | None = None) -> np.ndarray:  # noqa: E741
        return self.cost.resume_memory(b, l, s)


def largest_fitting(
    lens: np.ndarray, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> np.ndarray:
    """Per length ``l``: the largest ``b <= max_batch`` with ``M(b, l) <= capacity`` (0: none).

    A vectorised binary search over ``b`` (memory does not decrease with ``b``): about
    ``log2(max_batch)`` model evaluations on ``len(lens)`` points rather than one on
    ``len(lens) * max_batch``, which matters for models that are costly to evaluate.
    """
    lo = np.zeros(len(lens), dtype=np.int64)  # fits (0 = nothing fits)
    hi = np.full(len(lens), max_batch, dtype=np.int64)  # no size above hi fits
    while np.any(lo < hi):
        mid = (lo + hi + 1) // 2
        fits = np.asarray(cost.slice_memory(mid, lens, slice_length)) <= capacity
        lo = np.where(fits, mid, lo)
        hi = np.where(fits, hi, mid - 1)
    return lo


#: Rows per block of the dynamic programme: a trade-off between vectorised work
#: (``n * rows * m / 2``) and sequential numpy calls (``n / rows``), tuned on 1k-10k rows.
_BLOCK_ROWS = 12


def optimal_partition(costs: np.ndarray) -> list[int]:
    """Batch sizes minimising the summed cost; ``costs[j, k - 1]`` prices requests ``j-k+1..j``.

    Dynamic programme ``f[p] = min_k f[p - k] + costs[p - 1, k - 1]`` (``f[0] = 0``) over
    the ``n`` prefixes, exact for any cost matrix (``inf`` marks an infeasible batch); see
    :func:`_prefix_optima` for how it is vectorised. The argmin is then recovered from
    ``f`` in one vectorised pass. Raises ``ValueError`` when no partition is finite.
    """
    n, m = costs.shape
    if n == 0:
        return []
    f = _prefix_optima(costs)
    if not np.isfinite(f[n]):
        raise ValueError("no feasible partition: some request does not fit even alone")
    # f[p - k] + costs[p - 1, k - 1] for every p and k, with f of negative positions inf.
    padded_f = np.concatenate([np.full(m, np.inf), f])
    rows = np.arange(n)[:, None]
    prev = padded_f[rows + m - np.arange(m)[None, :]]  # f[j + 1 - k] for k = 1..m
    best_k = np.argmin(prev + costs, axis=1) + 1
    sizes: list[int] = []
    p = n
    while p > 0:
        k = int(best_k[p - 1])
        sizes.append(k)
        p -= k
    sizes.reverse()
    return sizes


def _prefix_optima(costs: np.ndarray) -> np.ndarray:
    """``f[0..n]`` of :func:`optimal_partition`, solved in blocks of ``rows`` positions.

    A batch is at most ``m`` long, so a position of block ``B`` is reached from the ``m``
    positions just before the block (the *state*) through positions of the block itself.
    The min-plus transfer matrices of all blocks (cheapest path from each state position
    to each row of the block) are built together in ``rows`` numpy steps; ``f`` is then
    carried across the blocks with one small min-plus product each. That is
    ``O(n * rows * m)`` work in ``O(n / rows + rows)`` numpy calls, instead of ``n``
    Python-level minimisations.
    """
    n, m = costs.shape
    rows = min(m, _BLOCK_ROWS)
    blocks = -(-n // rows)
    w = np.full((blocks * rows, m), np.inf)
    w[:n] = costs
    # rev[r, m - k, B]: cost of the batch of size k ending at row r of block B (a view).
    rev = w.reshape(blocks, rows, m).transpose(1, 2, 0)[:, ::-1, :]
    # into[r, c, B]: cheapest path from state position c of block B to its row r; blocks
    # last, so every numpy call below works on long runs.
    into = np.full((rows, m, blocks), np.inf)
    scratch = np.empty_like(into)  # reused: no large allocation per step
    via = np.empty((m, blocks))
    for r in range(rows):
        # One batch straight from state position c: k = m + r - c, needs c >= r.
        into[r, r:] = rev[r, :m - r]
        if r:
            # Or a path to an earlier row r' of this block, then one batch of r - r'.
            last = rev[r, m - r:, None, :]  # (r', 1, B): sizes r - r' for r' = 0..r-1
            np.add(into[:r], last, out=scratch[:r])
            np.min(scratch[:r], axis=0, out=via)
            np.minimum(into[r], via, out=into[r])
    transfer = into.transpose(2, 0, 1)  # [B, r, c]
    # f[p] lives at index p + m - 1; the m - 1 slots before f[0] are unreachable (inf).
    f = np.full(blocks * rows + m, np.inf)
    f[m - 1] = 0.0
    step = np.empty((rows, m))
    for b in range(blocks):
        state = f[b * rows:b * rows + m]
        np.add(state, transfer[b], out=step)
        np.min(step, axis=1, out=f[b * rows + m:(b + 1) * rows + m])
    return f[m - 1:m + n]


def greedy_partition(
    lens: np.ndarray, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[int]:
    """Batch sizes in the given order, each as long as ``max_batch`` and memory allow.

    The arrival-order batcher (``fcfs``, and ``fcfs-fixed`` with the whole generation as
    slice length): extend the batch while ``M(b, longest so far) <= capacity``, shrinking
    the fixed size when memory says so. Every request must fit alone.
    """
    lens = np.asarray(lens, dtype=np.float64)
    sizes: list[int] = []
    start, n = 0, len(lens)
    while start < n:
        window = np.maximum.accumulate(lens[start:start + max_batch])
        memory = np.asarray(
            cost.slice_memory(np.arange(1, len(window) + 1), window, slice_length)
        )
        fits = memory <= capacity
        if not fits[0]:
            raise ValueError(f"request at position {start} does not fit even alone")
        size = len(window) if fits.all() else int(np.argmin(fits))
        sizes.append(size)
        start += size
    return sizes


# --------------------------------------------------------------------------------------------
# Batching policies: candidates in, batches of request ids out
# --------------------------------------------------------------------------------------------


def cut_batches(pool: CandidatePool, sizes: list[int], slice_length: int) -> list[FormedBatch]:
    """Cut ``pool`` (in batching order) into consecutive batches of ``sizes``."""
    if not sizes:
        return []
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    padded = np.maximum.reduceat(pool.lens, starts).tolist()
    oldest = np.minimum.reduceat(pool.arrivals, starts).tolist()
    ids = [c.id for c in pool.candidates]
    constrained = np.add.reduceat([int(c.constrained) for c in pool.candidates],
                                  starts).tolist()
    return [
        FormedBatch(tuple(ids[start:start + size]), pad, slice_length, old,
                    constrained_rows=k)
        for start, size, pad, old, k in zip(starts.tolist(), sizes, padded, oldest,
                                            constrained, strict=True)
    ]


def scls_batching(
    pool: CandidatePool, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[FormedBatch]:
    """Optimal batches of the length-sorted candidates: minimum summed ``T(b, l)``.

    Subject to ``M(b, l) <= capacity`` and ``b <= max_batch`` per batch; solved exactly by
    :func:`optimal_partition`. Equal lengths keep arrival order.
    """
    ordered = pool.take(np.argsort(pool.lens, kind="stable"))
    costs = slice_cost_matrix(ordered.lens, cost, capacity, slice_length, max_batch)
    return cut_batches(ordered, optimal_partition(costs), slice_length)


def fcfs_batching(
    pool: CandidatePool, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[FormedBatch]:
    """Arrival-order batches, each as large as ``max_batch`` and the memory estimate allow.

    With the whole generation as slice length this is SLS (``fcfs-fixed``): fixed-size
    batches, shrunk only when the whole generation would not fit.
    """
    sizes = greedy_partition(pool.lens, cost, capacity, slice_length, max_batch)
    return cut_batches(pool, sizes, slice_length)


def single_batching(
    pool: CandidatePool, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[FormedBatch]:
    """One request per batch, for ILS: the instance batches continuously on its own."""
    return cut_batches(pool, [1] * len(pool), slice_length)
