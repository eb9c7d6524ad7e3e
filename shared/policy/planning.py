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

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from shared.policy.batching import (
    cut_batches,
    optimal_partition,
    single_batching,
    slice_cost_matrix,
)
from shared.policy.config import BATCHING, JOINT_DP_BATCHING, OFFLOADING, PolicyConfig
from shared.policy.coststack import EachModel, LinearStack, cost_stack
from shared.policy.offloading import Placement
from shared.policy.presets import WHOLE_GENERATION
from shared.policy.types import (
    BatchPlan,
    Candidate,
    CandidatePool,
    CyclePlan,
    FormedBatch,
    InstanceView,
    ResumeCost,
)


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
    batches: Sequence[FormedBatch], instances: Sequence[InstanceView], open_: np.ndarray,
    stack: LinearStack | EachModel,
) -> tuple[np.ndarray, np.ndarray]:
    """``(times, memory)``, each (batches x instances); time ``inf`` where it cannot run.

    Only open instances (below the horizon) are estimated: the others take nothing this
    cycle anyway. Every open instance is priced in one stacked evaluation.
    """
    sizes = np.array([len(b.request_ids) for b in batches], dtype=np.int64)
    padded = np.array([b.padded_len for b in batches], dtype=np.int64)
    slice_length = batches[0].slice_length
    times = np.full((len(batches), len(instances)), np.inf)
    memory = np.zeros_like(times)
    cols = np.flatnonzero(open_)
    if not len(cols):
        return times, memory
    t = stack.evaluate("slice_time", sizes, padded, slice_length)[cols].T
    m = stack.evaluate("slice_memory", sizes, padded, slice_length)[cols].T
    budget = np.array([instances[k].memory_budget_bytes for k in cols.tolist()])
    limit = np.array([instances[k].context_limit for k in cols.tolist()])
    fits = (m <= budget[None, :]) & (padded[:, None] <= limit[None, :])
    times[:, cols] = np.where(fits, t, np.inf)
    memory[:, cols] = m
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
    stack = cost_stack([i.cost for i in insts])
    times, memory = _estimates(batches, insts, open_, stack)
    home = _price_at_home(batches, insts, times, memory, stack)
    times += _grammar_times(batches, insts)
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
                               float(times[j, k]), int(memory[j, k]), resumed,
                               b.constrained_rows))
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
    hosts_of: dict[str, list[int]] = {}
    for h, plan in enumerate(out):
        if plan.resumed_rows:
            hosts_of.setdefault(plan.instance_id, []).append(h)
    for iid, hosts in hosts_of.items():
        guests: list[tuple[int, BatchPlan | FormedBatch]] = [
            (j, p) for j, p in enumerate(out)
            if p.request_ids and not p.resumed_rows and p.instance_id == iid
        ] + [(-1, b) for b in waiting if not b.home]
        for j, guest in _join_guests(out, hosts, guests, by_id[iid], max_batch):
            if j >= 0:
                out[j] = replace(guest, request_ids=())  # emptied; dropped below
            else:
                waiting.remove(guest)  # type: ignore[arg-type]
    return [p for p in out if p.request_ids], waiting


def _join_guests(
    out: list[BatchPlan], hosts: list[int], guests: list[tuple[int, BatchPlan | FormedBatch]],
    inst: InstanceView, max_batch: int,
) -> list[tuple[int, BatchPlan | FormedBatch]]:
    """Grow the resuming batches ``out[hosts]`` of one instance with guests: the oldest
    guest worth joining some host joins the host where it adds least, again and again.
    Every (host, guest) pair is priced in one vectorised pass per join (a cycle has many
    candidates and few joins). Returns the guests taken."""
    if not guests:
        return []
    cost = inst.cost
    s = out[hosts[0]].slice_length
    rows = np.array([len(g.request_ids) for _, g in guests])
    lens = np.array([g.padded_len for _, g in guests])
    # Each guest's constrained rows add their masks wherever it runs.
    masks = np.array([g.constrained_rows * s * inst.grammar_token_s for _, g in guests])
    if int(rows.min()) + min(len(out[h].request_ids) for h in hosts) > max_batch:
        return []  # nothing can join: spare the model evaluations
    # Row 0: a guest's prefill (a slice of one step); row 1: its own whole slice here.
    prefill, alone = np.asarray(cost.slice_time(rows, lens, np.array([[1], [s]])), dtype=float)
    own = np.array([g.estimated_s if isinstance(g, BatchPlan) else np.nan for _, g in guests])
    own = np.where(np.isnan(own), alone + masks, own)  # unplaced: their own slice here
    free = np.ones(len(guests), dtype=bool)
    taken: list[tuple[int, BatchPlan | FormedBatch]] = []
    # Rows each host prefills (earlier guests) and the longest of them: a new guest's
    # prefill runs with theirs, so the activations are those of all of them.
    fresh = np.array([len(out[h].request_ids) - out[h].resumed_rows for h in hosts])[:, None]
    fresh_len = np.zeros_like(fresh)
    while free.any():
        size = np.array([len(out[h].request_ids) for h in hosts])[:, None]
        base = np.array([out[h].estimated_s for h in hosts])[:, None]
        b = size + rows[None, :]
        width = np.maximum(np.array([out[h].padded_len for h in hosts])[:, None], lens[None, :])
        fresh_b = fresh + rows[None, :]
        fresh_l = np.maximum(fresh_len, lens[None, :])
        memory = np.asarray(cost.mixed_memory(b, width, s, fresh_b, fresh_l), dtype=float)
        # The joined slice's time anew: its steps, the guest's prefill, every row's masks.
        host_masks = np.array([out[h].constrained_rows * s * inst.grammar_token_s
                               for h in hosts])[:, None]
        added = (prefill[None, :] + masks[None, :] + host_masks
                 + np.asarray(cost.resume_time(b, width, s), dtype=float) - base)
        good = (free[None, :] & (b <= max_batch) & (width <= inst.context_limit)
                & (memory <= inst.memory_budget_bytes) & (added < own[None, :]))
        worth = good.any(axis=0)
        if not worth.any():
            break
        i = int(np.argmax(worth))  # the oldest guest worth joining
        k = int(np.argmin(np.where(good[:, i], added[:, i], np.inf)))
        host, guest = out[hosts[k]], guests[i][1]
        out[hosts[k]] = replace(
            host, request_ids=host.request_ids + guest.request_ids,
            padded_len=int(width[k, i]), estimated_s=float(base[k, 0] + added[k, i]),
            estimated_bytes=int(memory[k, i]),
            constrained_rows=host.constrained_rows + guest.constrained_rows)
        fresh[k, 0] = fresh_b[k, i]
        fresh_len[k, 0] = fresh_l[k, i]
        free[i] = False
        taken.append(guests[i])
    return taken


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
    if config.batching != JOINT_DP_BATCHING:
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
            for b, i in zip(cut_batches(ordered, parts, slice_length), starts, strict=True)]


def _grammar_times(batches: Sequence[FormedBatch], insts: Sequence[InstanceView]
                   ) -> np.ndarray:
    """(batches x instances) seconds the batches' constrained rows add on each instance:
    every row samples ``S`` tokens, each masked (``InstanceView.grammar_token_s``)."""
    rows = np.array([b.constrained_rows * b.slice_length for b in batches], dtype=float)
    per_token = np.array([i.grammar_token_s for i in insts], dtype=float)
    return rows[:, None] * per_token[None, :]


def _price_at_home(
    batches: Sequence[FormedBatch], insts: Sequence[InstanceView], times: np.ndarray,
    memory: np.ndarray, stack: LinearStack | EachModel,
) -> np.ndarray:
    """Put each homed batch's resume time in its home's column (open or not: the offloader
    weighs waiting for a busy home against re-prefilling elsewhere); returns the home's
    index per batch, -1 for none. Every homed batch is priced on its own home's model in
    one stacked evaluation; an open home's fit was already checked by :func:`_estimates`
    (memory does not depend on resuming)."""
    index = {inst.id: k for k, inst in enumerate(insts)}
    home = np.array([index[b.home] if b.home else -1 for b in batches], dtype=np.int64)
    rows = np.flatnonzero(home >= 0)
    if not len(rows):
        return home
    which = home[rows]
    sizes = np.array([len(batches[j].request_ids) for j in rows.tolist()])
    padded = np.array([batches[j].padded_len for j in rows.tolist()])
    s = batches[int(rows[0])].slice_length
    # Resuming needs less memory than the prefill _estimates priced it with.
    resume_memory = stack.evaluate("resume_memory", sizes, padded, s, which)
    budget = np.array([insts[k].memory_budget_bytes for k in which.tolist()])
    limit = np.array([insts[k].context_limit for k in which.tolist()])
    fits = (resume_memory <= budget) & (padded <= limit)
    memory[rows, which] = resume_memory
    times[rows, which] = np.where(fits, stack.evaluate("resume_time", sizes, padded, s, which),
                                  np.inf)
    return home
