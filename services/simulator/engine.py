"""Discrete-event simulation of the scheduler and its instances, with the real policy code.

Every simulated scheduler cycle does what :meth:`services.scheduler.service.Scheduler.cycle`
does, with the same functions: the oldest ``candidate_limit`` pending requests become
:class:`~shared.policy.types.Candidate`\\ s (context so far, tokens left before ``max_tokens``;
never the true output length), instances become :class:`~shared.policy.types.InstanceView`\\ s
(estimated work claimed and not committed, through :func:`shared.policy.presets.expected_busy`),
:func:`shared.policy.planning.plan_cycle` batches and offloads, never-fitting requests fail, and
:class:`shared.policy.config.DispatchCaps` drops placements beyond the caps. Cycles are
event-driven, like the real scheduler woken by submissions and commits: one runs when
requests arrive or an instance commits, and only if some request is pending and some
instance is open (below the horizon and its cap); after a cycle that dispatched, the
next follows at once (the real loop does not sleep after dispatching).

Optional latencies model what the real system spends outside the engines:
``cycle_overhead_s`` (a cycle takes that long: its batches reach the instances, and the
next cycle starts, that much later; events meanwhile are coalesced) and
``slice_overhead_s`` (per slice: the worker's commit and next-job fetch, during which it
computes nothing; for ILS the commit delay of each finished request).

K/V retention (``settings.kv_retention``, slice policies that are not whole-generation):
each slice instance keeps a :class:`~services.simulator.kv.SimKvPool` beside its batch
budget; the simulator tracks which instance holds each request's K/V and gives it to the
policy as ``Candidate.kv_instance`` (affinity: ``PolicyConfig.kv_affinity`` follows
retention, as in the scheduler service). ``ils-vllm`` (:data:`VLLM_POLICY`) is the ``ils``
preset on vLLM-like engines that admit and preempt by paged-KV memory.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.simulator.ils import IlsInstance, VllmInstance, total_blocks
from services.simulator.instances import InstanceBase, QueuedBatch, SliceInstance
from services.simulator.kv import KvDirectory
from services.simulator.results import (
    KV_COUNTERS,
    SIM_POLICIES,
    VLLM_POLICY,
    LoadTimeline,
    SimInstance,
    SimOptions,
    SimResult,
    kv_metrics,
    occupancy_metrics,
    outcomes_of,
    usage_of,
)
from services.simulator.running_set import RunningSetInstance
from services.simulator.state import DONE, FAILED, INFLIGHT, PENDING, PendingPool, RequestTable
from shared.bench.workload import WorkItem
from shared.obs.metrics import summarize
from shared.policy.admission import admission_cycle
from shared.policy.config import DispatchCaps, policy_config, with_cursor
from shared.policy.planning import plan_cycle
from shared.policy.presets import ILS_PRESET, WHOLE_GENERATION, expected_busy, is_continuous
from shared.policy.types import Candidate, InstanceView
from shared.settings import Settings

__all__ = ["KV_COUNTERS", "SIM_POLICIES", "VLLM_POLICY", "LoadTimeline", "SimInstance",
           "SimOptions", "SimResult", "simulate"]

# Event kinds, in the order events at the same time are handled.
_DELIVER, _SLICE_DONE, _ILS_EVENT, _ILS_COMMIT, _SCHED = range(5)


def simulate(
    workload: Sequence[WorkItem],
    instances: Sequence[SimInstance],
    settings: Settings,
    options: SimOptions | None = None,
) -> SimResult:
    """Simulate serving ``workload`` on ``instances`` under ``settings`` (policy, S, G,
    batch size, horizon, caps, candidate limit, retries).

    Raises:
        ValueError: no instances, duplicate instance ids, or an unknown policy.
    """
    if not instances:
        raise ValueError("need at least one instance")
    if len({s.id for s in instances}) != len(instances):
        raise ValueError("instance ids must be unique")
    return _Simulation(workload, instances, settings, options or SimOptions()).run()


class _Simulation:
    """One run: request table, instances, event heap, scheduler state."""

    def __init__(self, workload: Sequence[WorkItem], specs: Sequence[SimInstance],
                 settings: Settings, options: SimOptions) -> None:
        self.settings = settings
        self.options = options
        self.vllm = settings.policy == VLLM_POLICY
        # The scheduler's view: ils-vllm is the ils preset (its engines differ).
        self.policy = ILS_PRESET if self.vllm else settings.policy
        base = settings.model_copy(update={"policy": self.policy}) if self.vllm else settings
        # The scheduler's own config (kv_affinity follows kv_retention there).
        self.config = policy_config(base)
        self.caps = DispatchCaps.for_policy(self.policy, settings.max_queued_batches,
                                            settings.ils_max_concurrency)
        if self.vllm:
            # Memory, not a count, bounds a vLLM engine: every request inside one holds at
            # least one KV block, so a request cap of the largest block count never binds
            # before memory does (requests beyond what memory admits wait in the engine).
            self.caps = DispatchCaps(max(total_blocks(s.memory_budget_bytes, s.engine
                                                      .kv_bytes_per_token) for s in specs),
                                     count_requests=True)
        self.drop_finished = self.config.batching != "fcfs-fixed"  # as Scheduler._dispatch
        # Slice workers keep unfinished requests' K/V between slices (whole-generation
        # batching finishes its requests in one go: nothing to keep).
        slices = not is_continuous(self.policy) and self.config.batching not in WHOLE_GENERATION
        # One running set per slice instance (RunningSetInstance): its rows' K/V stays in
        # its memory while they run, so there is no pool and no retention between claims.
        self.running_set = settings.running_set and slices
        self.retention = settings.kv_retention and slices and not self.running_set
        self.reqs = RequestTable(workload, options.max_tokens)
        self.pending = PendingPool(self.reqs.n)
        self.specs = list(specs)
        self.insts = [self._instance(k, s) for k, s in enumerate(specs)]
        self.kv = KvDirectory(self.reqs.n, [getattr(i, "pool", None) for i in self.insts])
        self.by_id = {inst.id: inst for inst in self.insts}
        self.views = [self._view(inst) for inst in self.insts]
        self.open = {k for k in range(len(self.insts)) if self._is_open(k)}
        self.cands: dict[int, Candidate] = {}
        self.ils_claims: dict[int, tuple[InstanceBase, float]] = {}  # ILS: owner, estimate
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self.seq = 0
        self.sched_free_at = -math.inf
        self.sched_wake = False
        self.cycles = 0
        self.events = 0
        self.last_t = 0.0
        self.timeline = LoadTimeline([inst.id for inst in self.insts])
        self.budgets = np.array([s.memory_budget_bytes for s in self.specs], dtype=np.float64)
        self.sample_every = options.ect_interval_s
        self.next_sample = -math.inf

    # --- set-up ---------------------------------------------------------------------
    def _pool_bytes(self, spec: SimInstance) -> int:
        """KV pool capacity of ``spec``'s instance (0 without retention)."""
        if not self.retention:
            return 0
        if spec.kv_pool_bytes is not None:
            return min(spec.kv_pool_bytes, spec.memory_budget_bytes)
        return self.settings.kv_pool_capacity(spec.memory_budget_bytes)

    def _instance(self, k: int, spec: SimInstance) -> InstanceBase:
        truth = spec.engine
        if self.vllm:
            return VllmInstance(k, spec.id, truth, spec.memory_budget_bytes, spec.context_limit,
                                self.options.kv_layout)
        if is_continuous(self.policy):
            return IlsInstance(k, spec.id, truth, spec.memory_budget_bytes, spec.context_limit,
                               self.settings.ils_max_concurrency, self.options.kv_layout)
        if self.running_set:
            return RunningSetInstance(k, spec.id, truth, spec.memory_budget_bytes,
                                      spec.context_limit, self.options.slice_overhead_s,
                                      spec.cost, self.config.batch_slice_length,
                                      self.settings.max_running, self.options.kv_layout)
        pool = self._pool_bytes(spec)
        # The batch budget is what the pool leaves (what a worker publishes).
        return SliceInstance(k, spec.id, truth, spec.memory_budget_bytes - pool,
                             spec.context_limit, self.options.slice_overhead_s, pool,
                             self.options.kv_layout)

    def _view(self, inst: InstanceBase) -> InstanceView:
        spec = self.specs[inst.position]
        running = isinstance(inst, RunningSetInstance)
        return InstanceView(
            id=inst.id, cost=spec.cost, memory_budget_bytes=inst.budget_bytes,
            context_limit=spec.context_limit,
            expected_busy_s=expected_busy(self.policy, inst.estimated_s),
            queued_requests=inst.requests, queued_batches=inst.batches,
            running_rows=inst.running_rows if running else 0,
            running_width=inst.running_width if running else 0,
        )

    def _is_open(self, k: int) -> bool:
        """Whether a cycle could give instance ``k`` work (the horizon rule and its cap;
        a running set: nothing given to it still waits to join)."""
        inst = self.insts[k]
        if isinstance(inst, RunningSetInstance):
            return inst.is_open()
        view = self.views[k]
        return view.expected_busy_s < self.config.horizon_s and self.caps.has_room(view)

    def _refresh(self, inst: InstanceBase) -> None:
        """Rebuild the instance's view after its load changed."""
        self.views[inst.position] = self._view(inst)
        if self._is_open(inst.position):
            self.open.add(inst.position)
        else:
            self.open.discard(inst.position)

    def _push(self, t: float, kind: int, k: int, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, k, payload))

    # --- main loop ------------------------------------------------------------------
    def run(self) -> SimResult:
        """Run to the end and summarise."""
        started = time.perf_counter()
        reqs, arrival = self.reqs, self.reqs.arrival
        ptr, n = 0, self.reqs.n
        while True:
            t_arr = float(arrival[ptr]) if ptr < n else math.inf
            t = min(t_arr, self.heap[0][0] if self.heap else math.inf)
            if t == math.inf:
                break
            if t_arr <= t:
                end = int(np.searchsorted(arrival, t, side="right"))
                idx = np.arange(ptr, end)
                reqs.status[idx] = PENDING
                self.pending.add(idx)
                self.events += end - ptr
                ptr = end
            while self.heap and self.heap[0][0] <= t:
                self._handle(heapq.heappop(self.heap))
            self.last_t = t
            self._sample(t)
            self._maybe_cycle(t)
        return self._finish(time.perf_counter() - started)

    def _handle(self, event: tuple[float, int, int, int, Any]) -> None:
        t, kind, _seq, k, payload = event
        self.events += 1
        if kind == _SCHED:
            self.sched_wake = False
        elif kind == _DELIVER:
            self._deliver(self.insts[k], payload, t)
        elif kind == _SLICE_DONE:
            self._slice_done(self.insts[k], t)  # type: ignore[arg-type]
        elif kind == _ILS_EVENT:
            inst = self.insts[k]
            if payload == inst.version:  # else superseded by an earlier boundary
                self._ils_boundary(inst, t)  # type: ignore[arg-type]
        elif kind == _ILS_COMMIT:
            self._ils_commit(self.insts[k], payload, t)  # type: ignore[arg-type]

    def _maybe_cycle(self, t: float) -> None:
        """Run cycles at ``t`` while one can dispatch (see the module docstring)."""
        overhead = self.options.cycle_overhead_s
        while self.pending.count and self.open:
            if t < self.sched_free_at:
                if not self.sched_wake:
                    self._push(self.sched_free_at, _SCHED, -1)
                    self.sched_wake = True
                return
            dispatched = self._cycle(t)
            if overhead > 0:
                self.sched_free_at = t + overhead
                if dispatched and not self.sched_wake:
                    self._push(self.sched_free_at, _SCHED, -1)
                    self.sched_wake = True
                return
            if not dispatched:
                return

    # --- the scheduler cycle ---------------------------------------------------------
    def _candidate(self, i: int) -> Candidate:
        cand = self.cands.get(i)
        if cand is None:
            reqs = self.reqs
            gen = int(reqs.generated[i])
            home = int(self.kv.home[i])
            cand = Candidate(str(i), int(reqs.prompt[i]) + gen, int(reqs.max_tokens[i]) - gen,
                             float(reqs.arrival[i]), self.insts[home].id if home >= 0 else "")
            self.cands[i] = cand
        return cand

    def _cycle(self, t: float) -> int:
        """One scheduler cycle at ``t``; the number of batches dispatched."""
        self.cycles += 1
        self.events += 1
        cands = [self._candidate(i) for i in self.pending.oldest(self.config.candidate_limit)
                 .tolist()]
        views = list(self.views)
        if self.running_set:
            return self._fill_cycle(cands, views, t)
        plan = plan_cycle(cands, views, self.config, now=t)
        self.config = with_cursor(self.config, plan)
        for cand in plan.never_fit:
            self._never_fits(int(cand.id), cand.context_len, t)
        kept = self.caps.apply(plan.batches, views)
        for bp in kept:
            idx = np.array([int(r) for r in bp.request_ids], dtype=np.int64)
            inst = self.by_id[bp.instance_id]
            if is_continuous(self.policy):
                for i in idx.tolist():
                    self.ils_claims[i] = (inst, bp.estimated_s / len(idx))
            self._claim(inst, QueuedBatch(idx, bp.slice_length, bp.estimated_s,
                                          self.drop_finished), t)
        return len(kept)

    def _fill_cycle(self, cands: list[Candidate], views: list[InstanceView], t: float) -> int:
        """A running-set cycle: never-fitting requests fail, then the open instances'
        running sets are filled with the oldest candidates (shared.policy.admission)."""
        s = self.config.batch_slice_length
        runnable, admissions, never = admission_cycle(
            cands, views, {views[k].id for k in self.open}, s, self.settings.max_running,
            self.options.kv_layout)
        for cand in never:
            self._never_fits(int(cand.id), cand.context_len, t)
        for adm in admissions:
            rows = [runnable.candidates[r] for r in adm.rows.tolist()]
            idx = np.array([int(c.id) for c in rows], dtype=np.int64)
            inst = self.by_id[adm.instance_id]
            est = float(inst.estimate.slice_time(len(idx), max(c.context_len for c in rows), 1))
            self._claim(inst, QueuedBatch(idx, s, est, True), t)
        return len(admissions)

    def _claim(self, inst: InstanceBase, batch: QueuedBatch, t: float) -> None:
        """Claim ``batch`` for ``inst`` and deliver it (after the cycle's overhead)."""
        idx = batch.idx
        self.kv.claimed(idx, inst.position)
        inst.claimed(batch)
        self._refresh(inst)
        self.pending.remove(idx)
        self.reqs.status[idx] = INFLIGHT
        claim = self.reqs.first_claim
        claim[idx] = np.where(np.isnan(claim[idx]), t, claim[idx])
        arrive = t + self.options.cycle_overhead_s
        if arrive > t:
            self._push(arrive, _DELIVER, inst.position, batch)
        else:
            self._deliver(inst, batch, t)

    def _never_fits(self, i: int, context_len: int, t: float) -> None:
        self.pending.remove(i)
        self.cands.pop(i, None)
        self.kv.forget(i)  # it ends: its K/V goes
        self.reqs.fail(i, t, f"never_fits: a slice of {context_len} context tokens fits no "
                             "instance even alone")

    # --- instances ------------------------------------------------------------------
    def _deliver(self, inst: InstanceBase, batch: QueuedBatch, t: float) -> None:
        if isinstance(inst, SliceInstance):  # RunningSetInstance too
            end = inst.deliver(batch, t, self.reqs)
            if end is not None:
                self._push(end, _SLICE_DONE, inst.position)
            self._requeue_shed(inst)
            return
        assert isinstance(inst, IlsInstance)
        nxt = inst.deliver(batch, t, self.reqs, self._ils_fail)
        if nxt is not None:
            inst.version += 1
            self._push(nxt, _ILS_EVENT, inst.position, inst.version)

    def _requeue_shed(self, inst: SliceInstance) -> None:
        """Rows the instance handed back at a slice start (they missed their K/V and did
        not fit): pending again, with their tokens."""
        if not inst.shed:
            return
        back = np.array(inst.shed, dtype=np.int64)
        inst.shed = []
        for i in back.tolist():
            self.cands.pop(i, None)
        self.reqs.status[back] = PENDING
        self.pending.add(back)
        self._refresh(inst)

    def _slice_done(self, inst: SliceInstance, t: float) -> None:
        batch, out, nxt = inst.complete(t, self.reqs)
        if nxt is not None:
            self._push(nxt, _SLICE_DONE, inst.position)
        self._requeue_shed(inst)  # from the next slice, which has started
        self._refresh(inst)
        reqs, idx = self.reqs, batch.idx
        for i in idx.tolist():
            self.cands.pop(i, None)
        for i in self.kv.after_slice(inst.position, idx, out.stored, out.evicted):
            self.cands.pop(i, None)  # pending, and no longer retained anywhere
        if out.oom:
            self._requeue_oom(idx, inst, t)
            if isinstance(inst, RunningSetInstance):
                self._next_running_slice(inst, batch, out, t)  # nothing carried: the queue
            return
        first = reqs.slices[idx] == 0
        inst.add_counters({"first_slice_finishes": float(np.sum(out.finished & first)),
                           "requests_finished": float(out.finished.sum())})
        reqs.generated[idx] += out.tokens
        reqs.slices[idx] += 1
        reqs.first_commit[idx] = np.where(first, t, reqs.first_commit[idx])
        done = idx[out.finished]
        reqs.status[done] = DONE
        reqs.finish[done] = t
        for i in idx[out.finished & out.eos].tolist():
            reqs.reason[i] = "stop"
        again = idx[~out.finished]
        if isinstance(inst, RunningSetInstance):
            self._next_running_slice(inst, batch, out, t)
        elif len(again):
            reqs.status[again] = PENDING
            self.pending.add(again)

    def _next_running_slice(self, inst: RunningSetInstance, batch: QueuedBatch,
                            out: Any, t: float) -> None:
        """Running set: the unfinished rows stay on ``inst`` (in flight); its next slice
        starts with them and what joins; preempted rows go back to pending."""
        inst.carry_on(batch, out)
        nxt = inst.start_next(t, self.reqs)
        if nxt is not None:
            self._push(nxt, _SLICE_DONE, inst.position)
        if inst.preempted:
            back = np.array(inst.preempted, dtype=np.int64)
            self.reqs.status[back] = PENDING
            self.pending.add(back)
        self._refresh(inst)

    def _requeue_oom(self, idx: np.ndarray, inst: InstanceBase, t: float) -> None:
        """An out-of-memory slice: requeue its requests, failing those out of retries."""
        reqs = self.reqs
        reqs.retries[idx] += 1
        for i in idx.tolist():
            if reqs.retries[i] > self.settings.max_retries:
                reqs.fail(i, t, f"oom: slice out of memory on {inst.id} "
                                f"{reqs.retries[i]} times")
            else:
                reqs.status[i] = PENDING
                self.pending.add(i)

    def _ils_boundary(self, inst: IlsInstance, t: float) -> None:
        departed, nxt = inst.boundary(t, self.reqs, self._ils_fail)
        if nxt is not None:
            inst.version += 1
            self._push(nxt, _ILS_EVENT, inst.position, inst.version)
        if not departed:
            return
        if self.options.slice_overhead_s > 0:
            self._push(t + self.options.slice_overhead_s, _ILS_COMMIT, inst.position, departed)
        else:
            self._ils_commit(inst, departed, t)

    def _ils_commit(self, inst: IlsInstance, departed: list[int], t: float) -> None:
        """Commit finished ILS requests (one slice each, as IlsRuntime commits them)."""
        reqs = self.reqs
        idx = np.array(departed, dtype=np.int64)
        est = sum(self.ils_claims.pop(i, (inst, 0.0))[1] for i in departed)
        inst.released(est, len(idx), len(idx))
        self._refresh(inst)
        tokens = reqs.generated[idx]
        inst.add_counters({"slices": float(len(idx)), "batch_size_sum": float(len(idx)),
                           "generated_tokens": float(tokens.sum()),
                           "first_slice_finishes": float(len(idx)),
                           "requests_finished": float(len(idx))})
        reqs.slices[idx] = 1
        reqs.status[idx] = DONE
        reqs.finish[idx] = t
        reqs.first_commit[idx] = t  # the whole answer is its first (and only) commit
        for i in departed:
            self.cands.pop(i, None)
            if not reqs.forced and reqs.target[i] < reqs.max_tokens[i]:
                reqs.reason[i] = "stop"

    def _ils_fail(self, i: int, t: float, error: str) -> None:
        """An ILS engine refused request ``i`` (it cannot fit even alone): fail it."""
        self.reqs.fail(i, t, error)
        owner, est = self.ils_claims.pop(i)
        owner.released(est, 1, 1)
        self._refresh(owner)

    # --- load samples and results -------------------------------------------------------
    def _sample(self, t: float) -> None:
        """Record every instance's estimated work at fixed simulated intervals (bounded)."""
        if t < self.next_sample:
            return
        tl = self.timeline
        tl.times.append(t)
        tl.loads.append(np.fromiter((inst.estimated_s for inst in self.insts), np.float64,
                                    len(self.insts)))
        occupancy = [inst.occupancy() for inst in self.insts]
        tl.rows.append(np.array([rows for rows, _ in occupancy], dtype=np.float64))
        tl.kv_share.append(np.array([held for _, held in occupancy]) / self.budgets)
        if len(tl.times) >= self.options.ect_max_samples:
            tl.thin()
            self.sample_every *= 2
        base = tl.times[0] if len(tl.times) > 1 else t
        steps = math.floor((t - base) / self.sample_every) + 1
        self.next_sample = base + steps * self.sample_every

    def _finish(self, wall_s: float) -> SimResult:
        reqs = self.reqs
        for i in np.flatnonzero((reqs.status != DONE) & (reqs.status != FAILED)).tolist():
            reqs.fail(i, self.last_t, "stuck: never dispatched before the simulation ended")
        usage, counters = usage_of(self.insts)
        outcomes = outcomes_of(reqs)
        done = reqs.status == DONE
        first = float(reqs.arrival.min()) if reqs.n else 0.0
        last = float(reqs.finish[done].max()) if done.any() else first
        metrics = summarize(outcomes, counters, usage, last - first,
                            [load for load in self.timeline.loads])
        oom = sum(inst.oom_events for inst in self.insts)
        metrics.update({
            "oom_events": oom,
            "events": self.events,
            "events_per_s": self.events / max(wall_s, 1e-9),
            "sim_wall_s": wall_s,
            "cycles": self.cycles,
            "simulated_s": self.last_t,
            "max_running": max((getattr(i, "max_running", 0) for i in self.insts), default=0),
        })
        kv_metrics(metrics, counters, usage)
        occupancy_metrics(metrics, self.timeline)
        return SimResult(metrics, outcomes, usage, counters, self.timeline)
