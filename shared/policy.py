"""Scheduling policies as pure functions: candidates and instances in, a cycle plan out.

The scheduler service, the simulator and the tests call the same :func:`plan_cycle`. One
cycle (docs/design.md §3):

1. **Select** the ``candidate_limit`` oldest pending requests (a re-queued request keeps
   its arrival time, so it keeps its place; the oldest is always selected).
2. **Never fit**: requests that fit no instance even alone are returned for the caller
   to fail, instead of waiting forever.
3. **Batch** (:data:`BATCHING`) once, for the *tightest* instance (smallest memory
   budget) with its cost model as the reference. Instances serve the same model, so their
   memory models share the KV term and a batch that fits the tightest budget fits the
   others: batches do not depend on where they will run, and the dynamic programme runs
   once, not once per instance. Should a roomier instance have a heavier memory model,
   step 4's per-instance check keeps the batch off it (it always fits the reference).
   Requests too long for the tightest instance but fitting another run alone (rare:
   heterogeneous clusters only).
4. **Offload** (:data:`OFFLOADING`): each batch's time and memory are estimated on every
   open instance's own cost model (instances may differ); a batch goes only where it
   fits and only to instances below the horizon. Batches holding a request older than
   ``max_wait_s`` are placed first, so no request starves behind longer batches.

Estimates use the policy's fixed slice length (``S``; ``G`` for whole-generation
batching) even for requests with fewer tokens left: an upper bound, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

from shared.batching import greedy_partition, optimal_partition, slice_cost_matrix
from shared.offloading import Placement, least_requests, max_min, round_robin


class SliceCost(Protocol):
    """Per-instance serving-time and memory model of one slice (docs/design.md §2).

    Both broadcast like numpy over array-like batch sizes ``b`` and padded lengths ``l``;
    ``s`` is the slice length (decode steps), ``None`` for the model's own default.
    """

    def slice_time(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated seconds to serve the batch for one slice."""
        ...

    def slice_memory(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated peak bytes beyond the weights (KV cache + activations)."""
        ...

    def resume_time(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated seconds of a slice whose rows all resume from retained K/V."""
        ...


@dataclass(frozen=True)
class ResumeCost:
    """A cost model seen by batching for rows resuming on their own instance: the same
    memory, but a slice's time has no prefill (:meth:`SliceCost.resume_time`)."""

    cost: SliceCost

    def slice_time(self, b: ArrayLike, l: ArrayLike, s: int | None = None) -> np.ndarray:  # noqa: E741
        """Time of a resumed slice."""
        return self.cost.resume_time(b, l, s)

    def slice_memory(self, b: ArrayLike, l: ArrayLike, s: int | None = None) -> np.ndarray:  # noqa: E741
        """Memory as for any slice: the batch cache is allocated the same way."""
        return self.cost.slice_memory(b, l, s)

    def resume_time(self, b: ArrayLike, l: ArrayLike, s: int | None = None) -> np.ndarray:  # noqa: E741
        """Time of a resumed slice."""
        return self.cost.resume_time(b, l, s)


@dataclass(frozen=True)
class Candidate:
    """A pending request as the policy sees it (never its true output length)."""

    id: str
    context_len: int  # prompt + tokens generated so far
    remaining_tokens: int  # max_tokens - generated: an upper bound, not a prediction
    arrival: float  # first arrival; kept when the request is re-queued after a slice
    # The live instance whose KV pool holds this request's K/V for its current context
    # ("" = none): its next slice there needs no prefill (the caller checks liveness).
    kv_instance: str = ""


@dataclass(frozen=True)
class InstanceView:
    """A live instance as the policy sees it."""

    id: str
    cost: SliceCost
    memory_budget_bytes: int  # for KV cache + activations, beyond the weights
    context_limit: int  # max positions
    expected_busy_s: float = 0.0  # estimated work queued or running on it now
    queued_requests: int = 0  # requests queued or running on it now
    queued_batches: int = 0  # batches queued or running on it now (informational)


@dataclass(frozen=True)
class FormedBatch:
    """A batch formed but not (yet) given an instance."""

    request_ids: tuple[str, ...]
    padded_len: int
    slice_length: int
    oldest_arrival: float
    home: str = ""  # instance holding every row's K/V ("" = none: rows prefill anywhere)


@dataclass(frozen=True)
class BatchPlan:
    """One slice batch to claim and enqueue on ``instance_id``; estimates on that instance."""

    instance_id: str
    request_ids: tuple[str, ...]
    padded_len: int
    slice_length: int
    estimated_s: float
    estimated_bytes: int
    resumed_rows: int = 0  # rows expected to resume from the instance's KV pool


@dataclass(frozen=True)
class CyclePlan:
    """What one cycle decided: batches to dispatch, requests to fail, the next cursor."""

    batches: list[BatchPlan]
    never_fit: list[Candidate]
    rr_cursor: int
    unplaced: list[FormedBatch] = field(default_factory=list)  # their requests stay pending


@dataclass(frozen=True)
class CandidatePool:
    """Candidates with their context lengths and arrivals as arrays, built once a cycle."""

    candidates: list[Candidate]
    lens: np.ndarray  # int64 context lengths
    arrivals: np.ndarray  # float64 first arrivals

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> CandidatePool:
        """A pool of ``candidates`` in the given order."""
        return cls(
            list(candidates),
            np.array([c.context_len for c in candidates], dtype=np.int64),
            np.array([c.arrival for c in candidates], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.candidates)

    def take(self, index: np.ndarray) -> CandidatePool:
        """The candidates at integer positions ``index``, in that order."""
        return CandidatePool(
            [self.candidates[i] for i in index.tolist()], self.lens[index], self.arrivals[index]
        )

    def split(self, mask: np.ndarray) -> tuple[CandidatePool, CandidatePool]:
        """``(where mask, where not mask)``, each keeping the pool's order."""
        return self.take(np.flatnonzero(mask)), self.take(np.flatnonzero(~mask))


#: Batching policies: ``(pool in arrival order, reference cost, capacity bytes, slice
#: length, max batch) -> batches``. Every candidate fits the reference alone.
BatchingFn = Callable[[CandidatePool, SliceCost, int, int, int], list[FormedBatch]]
#: Offloading policies: ``(placement problem, round-robin cursor) -> (instance index per
#: batch or -1, next cursor)``; see :mod:`shared.offloading`.
OffloadingFn = Callable[[Placement, int], tuple[np.ndarray, int]]


def _batches(pool: CandidatePool, sizes: list[int], slice_length: int) -> list[FormedBatch]:
    """Cut ``pool`` (in batching order) into consecutive batches of ``sizes``."""
    if not sizes:
        return []
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    padded = np.maximum.reduceat(pool.lens, starts).tolist()
    oldest = np.minimum.reduceat(pool.arrivals, starts).tolist()
    ids = [c.id for c in pool.candidates]
    return [
        FormedBatch(tuple(ids[start:start + size]), pad, slice_length, old)
        for start, size, pad, old in zip(starts.tolist(), sizes, padded, oldest, strict=True)
    ]


def scls_batching(
    pool: CandidatePool, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[FormedBatch]:
    """Optimal batches of the length-sorted candidates: minimum summed ``T(b, l)``.

    Subject to ``M(b, l) <= capacity`` and ``b <= max_batch`` per batch; solved exactly by
    :func:`shared.batching.optimal_partition`. Equal lengths keep arrival order.
    """
    ordered = pool.take(np.argsort(pool.lens, kind="stable"))
    costs = slice_cost_matrix(ordered.lens, cost, capacity, slice_length, max_batch)
    return _batches(ordered, optimal_partition(costs), slice_length)


def fcfs_batching(
    pool: CandidatePool, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[FormedBatch]:
    """Arrival-order batches, each as large as ``max_batch`` and the memory estimate allow.

    With the whole generation as slice length this is SLS (``fcfs-fixed``): fixed-size
    batches, shrunk only when the whole generation would not fit.
    """
    sizes = greedy_partition(pool.lens, cost, capacity, slice_length, max_batch)
    return _batches(pool, sizes, slice_length)


def single_batching(
    pool: CandidatePool, cost: SliceCost, capacity: int, slice_length: int, max_batch: int
) -> list[FormedBatch]:
    """One request per batch, for ILS: the instance batches continuously on its own."""
    return _batches(pool, [1] * len(pool), slice_length)


BATCHING: dict[str, BatchingFn] = {
    "scls": scls_batching,
    "fcfs": fcfs_batching,
    "fcfs-fixed": fcfs_batching,
    "single": single_batching,
}
#: Batching policies that run the whole generation in one go (``S = G``).
WHOLE_GENERATION = frozenset({"fcfs-fixed", "single"})

OFFLOADING: dict[str, OffloadingFn] = {
    "max-min": max_min,
    "round-robin": round_robin,
    "least-requests": least_requests,
}

#: Named presets: ``(batching, offloading)``.
POLICIES: dict[str, tuple[str, str]] = {
    "scls": ("scls", "max-min"),
    "sls": ("fcfs-fixed", "round-robin"),
    "scls-rr": ("scls", "round-robin"),
    "fcfs-maxmin": ("fcfs", "max-min"),
    "ils": ("single", "least-requests"),
}


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of one cycle; validated on construction."""

    batching: str = "scls"
    offloading: str = "max-min"
    slice_length: int = 32  # S, decode steps per slice
    max_gen_length: int = 1024  # G, the largest max_tokens accepted
    max_batch: int = 32
    horizon_s: float = 2.0  # an instance with this much expected work takes no new batch
    max_wait_s: float = 30.0  # age bound: older requests' batches are placed first
    # Bounds the DP's n (oldest first): 2048 keeps a cycle with 10,000 pending and 256
    # instances around 10-15 ms on 2 CPU cores (`scls scheduler-bench`).
    candidate_limit: int = 2048
    rr_cursor: int = 0  # round-robin position, carried from the previous CyclePlan
    # Price rows on the instance that retains their K/V without prefill (and form their
    # batches there first); off: every row is priced as re-prefilled anywhere.
    kv_affinity: bool = True

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"unknown batching {self.batching!r}; choose from "
                             f"{', '.join(BATCHING)}")
        if self.offloading not in OFFLOADING:
            raise ValueError(f"unknown offloading {self.offloading!r}; choose from "
                             f"{', '.join(OFFLOADING)}")
        for name in ("slice_length", "max_gen_length", "max_batch", "candidate_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rr_cursor < 0:
            raise ValueError(f"rr_cursor must be >= 0, got {self.rr_cursor}")
        if not self.horizon_s > 0 or not self.max_wait_s >= 0:
            raise ValueError("horizon_s must be > 0 and max_wait_s >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PolicyConfig:
        """The config of a named preset of :data:`POLICIES`, with ``overrides`` on top."""
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        batching, offloading = POLICIES[name]
        return cls(batching=batching, offloading=offloading, **overrides)

    @property
    def batch_slice_length(self) -> int:
        """Decode steps per batch: ``S``, or ``G`` for whole-generation batching."""
        return self.max_gen_length if self.batching in WHOLE_GENERATION else self.slice_length


def retains_kv(policy: str, batching: str | None = None) -> bool:
    """Whether instances serving preset ``policy`` (or its ``batching`` override) keep
    requests' K/V between slices: only slice batching does; whole-generation batches
    (SLS) and continuous batching (ILS) leave nothing unfinished to keep."""
    if policy not in POLICIES:
        return False
    return (batching or POLICIES[policy][0]) not in WHOLE_GENERATION


def select_candidates(candidates: Sequence[Candidate], limit: int) -> list[Candidate]:
    """The ``limit`` oldest candidates in arrival order (ties keep the given order).

    Ordering by first arrival is the fairness rule: a request re-queued after a slice
    keeps its place, and the oldest request is always selected.
    """
    return _select(candidates, limit).candidates


def _select(candidates: Sequence[Candidate], limit: int) -> CandidatePool:
    arrivals = np.array([c.arrival for c in candidates], dtype=np.float64)
    order = np.argsort(arrivals, kind="stable")[:limit].tolist()
    chosen = [candidates[i] for i in order]
    lens = np.array([c.context_len for c in chosen], dtype=np.int64)
    return CandidatePool(chosen, lens, arrivals[order])


def fits_alone(pool: CandidatePool, inst: InstanceView, slice_length: int) -> np.ndarray:
    """Per candidate: whether a batch of it alone fits ``inst`` (context and memory)."""
    if not len(pool):
        return np.zeros(0, dtype=bool)
    memory = np.asarray(inst.cost.slice_memory(1, pool.lens, slice_length)).reshape(-1)
    return (pool.lens <= inst.context_limit) & (memory <= inst.memory_budget_bytes)


def split_never_fit(
    pool: CandidatePool, instances: Sequence[InstanceView], slice_length: int
) -> tuple[CandidatePool, CandidatePool]:
    """``(runnable, never_fit)``: the latter fit no instance even alone. Order is kept.

    Instances are tried roomiest first and only for the requests still unplaced, so a
    usual cycle costs one vectorised check. With no instance nothing is never-fitting.
    """
    unfit = np.full(len(pool), bool(instances))
    for inst in sorted(instances, key=lambda i: -i.memory_budget_bytes):
        idx = np.flatnonzero(unfit)
        if not len(idx):
            break
        unfit[idx[fits_alone(pool.take(idx), inst, slice_length)]] = False
    return pool.split(~unfit)


def tightest_instance(instances: Sequence[InstanceView]) -> InstanceView:
    """The reference instance for batching: smallest memory budget, then context limit."""
    return min(instances, key=lambda i: (i.memory_budget_bytes, i.context_limit, i.id))


def _estimates(
    batches: Sequence[FormedBatch], instances: Sequence[InstanceView], open_: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(times, memory)``, each (batches x instances); time ``inf`` where it cannot run.

    Only open instances (below the horizon) are estimated: the others take nothing this
    cycle anyway. Instances sharing a cost-model object are estimated once.
    """
    sizes = np.array([len(b.request_ids) for b in batches], dtype=np.int64)
    padded = np.array([b.padded_len for b in batches], dtype=np.int64)
    slice_length = batches[0].slice_length
    times = np.full((len(batches), len(instances)), np.inf)
    memory = np.zeros_like(times)
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in np.flatnonzero(open_).tolist():
        inst = instances[k]
        if id(inst.cost) not in seen:
            seen[id(inst.cost)] = (
                inst.cost.slice_time(sizes, padded, slice_length),
                inst.cost.slice_memory(sizes, padded, slice_length),
            )
        t, m = seen[id(inst.cost)]
        fits = (m <= inst.memory_budget_bytes) & (padded <= inst.context_limit)
        times[:, k] = np.where(fits, t, np.inf)
        memory[:, k] = m
    return times, memory


def plan_cycle(
    candidates: Sequence[Candidate],
    instances: Sequence[InstanceView],
    config: PolicyConfig,
    now: float | None = None,
) -> CyclePlan:
    """Batch and offload one cycle's candidates (see the module docstring for the steps).

    ``now`` is the current time on the clock of the arrivals; ``None`` turns the age bound
    off. Instances are taken in order of id, the stable order of round-robin. Requests
    of unplaced batches are simply not dispatched: they stay pending for the next cycle.
    With every instance past the horizon, no batch is even formed.
    """
    insts = sorted(instances, key=lambda i: i.id)
    slice_length = config.batch_slice_length
    runnable, never = split_never_fit(
        _select(candidates, config.candidate_limit), insts, slice_length
    )
    busy = np.array([i.expected_busy_s for i in insts], dtype=np.float64)
    open_ = busy < config.horizon_s
    if not len(runnable) or not open_.any():
        return CyclePlan([], never.candidates, config.rr_cursor)
    ref = tightest_instance(insts)
    regular, oversize = runnable.split(fits_alone(runnable, ref, slice_length))
    batches = _affine_batches(regular, insts, config, slice_length, ref)
    batches += single_batching(oversize, ref.cost, 0, slice_length, 1)
    times, memory = _estimates(batches, insts, open_)
    home = _price_at_home(batches, insts, times, memory, open_)
    arrival = np.array([b.oldest_arrival for b in batches])
    age_limit = -np.inf if now is None else now - config.max_wait_s
    problem = Placement(
        times=times,
        sizes=np.array([len(b.request_ids) for b in batches]),
        arrival=arrival,
        urgent=arrival <= age_limit,
        busy_s=busy,
        requests=np.array([i.queued_requests for i in insts], dtype=np.float64),
        horizon_s=config.horizon_s,
        home=home,
    )
    assign, cursor = OFFLOADING[config.offloading](problem, config.rr_cursor)
    # Dispatch (and so queue on each instance) urgent batches first, then oldest first.
    order = np.lexsort((arrival, ~problem.urgent)).tolist()
    plans, unplaced = [], []
    for j in order:
        b, k = batches[j], int(assign[j])
        if k < 0:
            unplaced.append(b)
            continue
        resumed = len(b.request_ids) if k == home[j] else 0
        plans.append(BatchPlan(insts[k].id, b.request_ids, b.padded_len, b.slice_length,
                               float(times[j, k]), int(memory[j, k]), resumed))
    if config.kv_affinity:
        plans, unplaced = join_resumed(plans, unplaced, insts, config.max_batch)
    return CyclePlan(plans, never.candidates, cursor, unplaced)


def join_resumed(
    plans: Sequence[BatchPlan], unplaced: Sequence[FormedBatch],
    instances: Sequence[InstanceView], max_batch: int,
) -> tuple[list[BatchPlan], list[FormedBatch]]:
    """Let fresh batches join a resuming batch on the same instance, as continuous
    batching lets new requests join running ones.

    A resuming batch (its rows' K/V at home) runs ``S`` decode steps whatever else it
    holds; fresh rows joining it pay their prefill and share those steps, which cost
    little more for more rows. So a fresh batch placed on the same instance joins when
    ``Tp(fresh) + T_resume(both)`` is below the two batches' times apart, and a fresh
    batch left unplaced (every instance past the horizon) joins when what it adds is no
    more than its own time there (it would otherwise wait for a later cycle). Oldest
    fresh batches are tried first; memory and ``max_batch`` bound the joined batch.
    """
    by_id = {inst.id: inst for inst in instances}
    out = list(plans)
    waiting = sorted(unplaced, key=lambda b: b.oldest_arrival)
    for h, host in enumerate(out):
        if not host.resumed_rows:
            continue
        inst = by_id[host.instance_id]
        guests: list[tuple[int, BatchPlan | FormedBatch]] = [
            (j, p) for j, p in enumerate(out) if not p.resumed_rows and p.instance_id == inst.id
        ] + [(-1, b) for b in waiting if not b.home]
        for j, guest in guests:
            joined = _joined(out[h], guest, inst, max_batch)
            if joined is None:
                continue
            added = joined.estimated_s - out[h].estimated_s
            own = guest.estimated_s if isinstance(guest, BatchPlan) else float(
                inst.cost.slice_time(len(guest.request_ids), guest.padded_len,
                                     guest.slice_length))
            if added < own:
                out[h] = joined
                if j >= 0:
                    out[j] = replace(guest, request_ids=())  # emptied; dropped below
                else:
                    waiting.remove(guest)  # type: ignore[arg-type]
    return [p for p in out if p.request_ids], waiting


def _joined(
    host: BatchPlan, guest: BatchPlan | FormedBatch, inst: InstanceView, max_batch: int
) -> BatchPlan | None:
    """``host`` with ``guest``'s (fresh) rows, priced on ``inst``; None if it won't fit."""
    b = len(host.request_ids) + len(guest.request_ids)
    width = max(host.padded_len, guest.padded_len)
    s = host.slice_length
    if not guest.request_ids or b > max_batch or width > inst.context_limit:
        return None
    memory = float(inst.cost.slice_memory(b, width, s))
    if memory > inst.memory_budget_bytes:
        return None
    # The guests' prefill (a slice of length 1 is its prefill), then S shared steps.
    seconds = float(inst.cost.slice_time(len(guest.request_ids), guest.padded_len, 1)) + float(
        inst.cost.resume_time(b, width, s))
    return replace(host, request_ids=host.request_ids + guest.request_ids, padded_len=width,
                   estimated_s=seconds, estimated_bytes=int(memory))


def _affine_batches(
    pool: CandidatePool, insts: Sequence[InstanceView], config: PolicyConfig,
    slice_length: int, ref: InstanceView,
) -> list[FormedBatch]:
    """Batches of ``pool`` where candidates whose K/V a live instance keeps are batched
    only with others of the same instance, priced without prefill (:class:`ResumeCost`);
    the others as usual. With affinity off (or whole-generation batching) this is just
    the configured batching.

    SCLS batching solves every group in one dynamic programme on the reference (tightest)
    instance, as it does without affinity: instances serve one model, so the partition is
    theirs too, and one programme costs a fraction of one per instance (offloading then
    prices each batch on its home's own model). Other batchings run once per group.
    """
    batching = BATCHING[config.batching]
    if not config.kv_affinity or config.batching in WHOLE_GENERATION:
        return batching(pool, ref.cost, ref.memory_budget_bytes, slice_length, config.max_batch)
    index = {inst.id: k for k, inst in enumerate(insts)}
    none = len(insts)  # the group of candidates kept nowhere (sorted last)
    home = np.array([index.get(c.kv_instance, none) for c in pool.candidates], dtype=np.int64)
    if not len(pool) or (home == none).all():
        return batching(pool, ref.cost, ref.memory_budget_bytes, slice_length, config.max_batch)
    if config.batching != "scls":
        batches = []
        for k in np.unique(home).tolist():
            group = pool.take(np.flatnonzero(home == k))
            inst = ref if k == none else insts[k]
            cost = ref.cost if k == none else ResumeCost(inst.cost)
            formed = batching(group, cost, inst.memory_budget_bytes, slice_length,
                              config.max_batch)
            batches += formed if k == none else [replace(b, home=inst.id) for b in formed]
        return batches
    order = np.lexsort((pool.lens, home))  # by group, then length (stable: then arrival)
    ordered, home = pool.take(order), home[order]
    firsts = np.flatnonzero(np.r_[True, home[1:] != home[:-1]])
    group_start = np.repeat(firsts, np.diff(np.r_[firsts, len(home)]))
    costs = slice_cost_matrix(ordered.lens, ref.cost, ref.memory_budget_bytes, slice_length,
                              config.max_batch, group_start, resumed=home < none)
    parts = optimal_partition(costs)
    starts = np.concatenate([[0], np.cumsum(parts)[:-1]]).tolist()
    return [replace(b, home=insts[home[i]].id) if home[i] < none else b
            for b, i in zip(_batches(ordered, parts, slice_length), starts, strict=True)]


def _price_at_home(
    batches: Sequence[FormedBatch], insts: Sequence[InstanceView], times: np.ndarray,
    memory: np.ndarray, open_: np.ndarray,
) -> np.ndarray:
    """Put each homed batch's resume time in its home's column (open or not: the offloader
    weighs waiting for a busy home against re-prefilling elsewhere); returns the home's
    index per batch, -1 for none. One vectorised estimate per home instance; an open
    home's fit was already checked by :func:`_estimates` (memory does not depend on
    resuming)."""
    home = np.full(len(batches), -1)
    index = {inst.id: k for k, inst in enumerate(insts)}
    by_home: dict[int, list[int]] = {}
    for j, b in enumerate(batches):
        if b.home:
            by_home.setdefault(index[b.home], []).append(j)
    for k, rows in by_home.items():
        inst, idx = insts[k], np.array(rows)
        sizes = np.array([len(batches[j].request_ids) for j in rows])
        padded = np.array([batches[j].padded_len for j in rows])
        s = batches[rows[0]].slice_length
        if open_[k]:
            fits = np.isfinite(times[idx, k])
        else:
            memory[idx, k] = inst.cost.slice_memory(sizes, padded, s)
            fits = (memory[idx, k] <= inst.memory_budget_bytes) & (padded <= inst.context_limit)
        resume = np.asarray(inst.cost.resume_time(sizes, padded, s), dtype=float)
        times[idx, k] = np.where(fits, resume, np.inf)
        home[idx] = k
    return home


def with_cursor(config: PolicyConfig, plan: CyclePlan) -> PolicyConfig:
    """``config`` for the next cycle: the round-robin cursor carried over from ``plan``."""
    return replace(config, rr_cursor=plan.rr_cursor)


#: The preset whose instances run continuous batching (iteration-level scheduling).
ILS_PRESET = "ils"


def expected_busy(policy: str, estimated_s: float) -> float:
    """An instance's expected outstanding work as the policy should see it.

    ``estimated_s`` sums the estimates of the batches queued or running on the instance.
    ILS instances batch continuously, so a request's whole-generation estimate says
    nothing about when the next one can join: they are paced by their request cap alone
    (:class:`DispatchCaps`) and look idle to the horizon rule.
    """
    return 0.0 if policy == ILS_PRESET else estimated_s


@dataclass(frozen=True)
class DispatchCaps:
    """Hard per-instance caps applied to a cycle's plan before dispatch.

    Slice instances take at most ``limit`` queued or running batches; ILS instances
    (``count_requests``) at most ``limit`` requests, their engine's concurrency cap. The
    scheduler service and the simulator both apply it after :func:`plan_cycle`.
    """

    limit: int
    count_requests: bool = False

    @classmethod
    def for_policy(
        cls, policy: str, max_queued_batches: int, ils_max_concurrency: int
    ) -> DispatchCaps:
        """The caps of preset ``policy``: requests for ILS, batches otherwise."""
        if policy == ILS_PRESET:
            return cls(ils_max_concurrency, count_requests=True)
        return cls(max_queued_batches)

    def used(self, view: InstanceView) -> int:
        """What ``view`` already holds, in the capped unit."""
        return view.queued_requests if self.count_requests else view.queued_batches

    def has_room(self, view: InstanceView) -> bool:
        """Whether ``view`` can take one more batch of one request."""
        return self.used(view) < self.limit

    def apply(
        self, batches: Sequence[BatchPlan], views: Sequence[InstanceView]
    ) -> list[BatchPlan]:
        """``batches`` in order, without the placements beyond a cap (they stay pending)."""
        used = {v.id: self.used(v) for v in views}
        kept = []
        for batch in batches:
            need = len(batch.request_ids) if self.count_requests else 1
            if used[batch.instance_id] + need <= self.limit:
                used[batch.instance_id] += need
                kept.append(batch)
        return kept
