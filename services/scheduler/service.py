"""The scheduler: one active leader forms slice batches and dispatches them to workers.

Each cycle: hold the leader lock, sweep dead/late batches back to pending, read the live
instances (their cost models and outstanding work), take the oldest pending requests, and
let the configured policy (:func:`shared.policy.planning.plan_cycle`) batch and offload them; fail
the requests no instance can ever hold; claim each planned batch atomically and enqueue
its RQ job on the chosen instance's queue.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from rq import Queue
from rq.job import Job

from shared.core.connection import CALL_TIMEOUT_S, bound_timeouts
from shared.core.connection import rq_connection as open_rq_connection
from shared.core.keys import Keys
from shared.core.records import InstanceInfo, new_batch_id, now
from shared.core.states import FinishReason
from shared.core.store import InstanceLoad, Store, connect
from shared.obs.logging import get_logger
from shared.obs.prometheus import SchedulerMetrics
from shared.policy.admission import continuation_cycle
from shared.policy.config import DispatchCaps, policy_config, with_cursor
from shared.policy.costmodel import CostModel
from shared.policy.planning import plan_cycle
from shared.policy.presets import POLICIES, expected_busy, is_continuous, retains_kv
from shared.policy.types import BatchPlan, Candidate, InstanceView
from shared.settings import Settings

log = get_logger(__name__)

ORPHAN_GRACE_S = 5.0  # see Scheduler.orphan_grace_s
STANDBY_POLL_S = 0.5  # most a standby waits between tries for the leader lock

#: Import path of the worker's job function (RQ resolves it in the worker process).
SLICE_JOB = "services.worker.jobs.run_slice"


@dataclass
class CycleReport:
    """What one cycle did (returned for tests and logged)."""

    leader: bool = False
    instances: int = 0
    candidates: int = 0
    batches: list[str] = field(default_factory=list)
    dispatched_requests: int = 0
    failed_never_fit: int = 0
    swept: int = 0


class Scheduler:
    """The scheduler service; build it with :func:`create_scheduler`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        rq_connection: redis.Redis,
        holder_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.rq_connection = rq_connection
        self.config = policy_config(settings)
        # Running sets apply to slice batching that drops finished rows (docs/design.md
        # §3.6); whole-generation and continuous presets batch as they always do.
        self.running_set = settings.running_set and retains_kv(
            settings.policy, settings.batching) and not is_continuous(settings.policy)
        self.holder_id = holder_id or f"{socket.gethostname()}-{os.getpid()}"
        # parsed profiles by instance (None: unreadable, skipped)
        self._costs: dict[str, tuple[str, CostModel | None]] = {}
        self._last_sweep = 0.0
        # A claimed batch gets its job within milliseconds; one still without a job after
        # this long never will (the claimer died, or a Redis restart lost the enqueue).
        self.orphan_grace_s = ORPHAN_GRACE_S
        self._stop = threading.Event()
        self.metrics = SchedulerMetrics(store)  # this scheduler's own registry

    # --- one cycle ------------------------------------------------------------------
    def cycle(self) -> CycleReport:
        """Run one scheduling cycle; does nothing but wait if another scheduler leads."""
        started = time.perf_counter()
        report = self._cycle()
        self.metrics.observe_cycle(time.perf_counter() - started, report.leader, report.swept,
                                   report.failed_never_fit)
        return report

    def _cycle(self) -> CycleReport:
        report = CycleReport()
        report.leader = self.store.acquire_or_renew_leader(
            self.holder_id, self.settings.leader_ttl_s
        )
        if not report.leader:
            return report
        instances = self.store.live_instances()
        report.instances = len(instances)
        report.swept = self._sweep_if_due(instances)
        views = self._instance_views(instances)
        if not views:
            return report
        boots = {inst.id: inst.boot for inst in instances if inst.state == "ready"}
        candidates = self._candidates(boots)
        report.candidates = len(candidates)
        if not candidates:
            return report
        if self.running_set:
            batches, never_fit = self._continue_running_sets(candidates, views)
        else:
            plan = plan_cycle(candidates, views, self.config, now=now())
            self.config = with_cursor(self.config, plan)
            batches, never_fit = self._within_caps(plan.batches, views), plan.never_fit
        report.failed_never_fit = self._fail_never_fitting(never_fit, views)
        for batch in batches:
            batch_id = self._dispatch(batch)
            if batch_id:
                report.batches.append(batch_id)
                report.dispatched_requests += len(batch.request_ids)
        return report

    def _continue_running_sets(
        self, candidates: list[Candidate], views: list[InstanceView]
    ) -> tuple[list[BatchPlan], list[Candidate]]:
        """Running-set mode (docs/design.md §3.6): each instance with nothing queued or
        running gets one slice, its kept rows continuing plus the oldest fresh rows that
        fit (:func:`shared.policy.admission.continuation_cycle`)."""
        s = self.config.batch_slice_length
        open_ids = {v.id for v in views if v.queued_batches == 0}
        pool, slices, never = continuation_cycle(candidates, views, open_ids, s,
                                                 self.settings.max_running)
        plans = []
        for nxt in slices:
            cost = self._costs[nxt.instance_id][1]
            assert cost is not None  # views are built from readable profiles only
            lens = pool.lens[nxt.rows]
            fresh = pool.lens[nxt.fresh]
            b, width = len(lens), int(lens.max())
            fresh_len = int(fresh.max()) if len(fresh) else 0
            rows = [pool.candidates[i] for i in nxt.rows.tolist()]
            constrained = sum(c.constrained for c in rows)
            estimate = float(cost.resume_time(b, width, s) + cost.grammar_time(constrained, s))
            if len(fresh):
                estimate += float(cost.prefill_time(len(fresh), fresh_len))
            plans.append(BatchPlan(
                instance_id=nxt.instance_id, request_ids=tuple(c.id for c in rows),
                padded_len=width, slice_length=s, estimated_s=estimate,
                estimated_bytes=int(cost.mixed_memory(b, width, s, len(fresh), fresh_len)),
                resumed_rows=len(nxt.continuing), constrained_rows=constrained))
        return plans, never

    def _cost_of(self, inst: InstanceInfo) -> CostModel | None:
        """The instance's published cost model, parsed once per profile; None (logged once
        per profile) when this scheduler cannot read it, e.g. a newer schema published by
        a worker during a rolling upgrade: that instance is skipped, the others served."""
        cached = self._costs.get(inst.id)
        if cached is None or cached[0] != inst.profile:
            try:
                model: CostModel | None = CostModel.from_json(inst.profile)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("profile_unreadable", instance=inst.id,
                          error=f"{type(exc).__name__}: {exc}")
                model = None
            cached = (inst.profile, model)
            self._costs[inst.id] = cached
        return cached[1]

    def _instance_views(self, instances: list[InstanceInfo]) -> list[InstanceView]:
        ready = [inst for inst in instances if inst.state == "ready" and inst.profile
                 and self._cost_of(inst) is not None]
        loads = self.store.instance_loads([inst.id for inst in ready])
        return [
            InstanceView(
                id=inst.id,
                cost=self._costs[inst.id][1],  # type: ignore[arg-type]  # checked above
                memory_budget_bytes=inst.memory_budget_bytes,
                context_limit=inst.context_limit,
                expected_busy_s=self._busy_estimate(loads[inst.id]),
                queued_requests=loads[inst.id].requests,
                queued_batches=loads[inst.id].batches,
                grammar_token_s=self._costs[inst.id][1].grammar_token_s,  # type: ignore[union-attr]
            )
            for inst in ready
        ]

    def _busy_estimate(self, load: InstanceLoad) -> float:
        """Expected outstanding work; ILS instances are paced by their request cap only."""
        return expected_busy(self.settings.policy, load.estimated_s)

    def _within_caps(
        self, batches: Sequence[BatchPlan], views: Sequence[InstanceView]
    ) -> list[BatchPlan]:
        """Drop placements beyond each instance's hard cap (they stay pending).

        Slice instances take at most ``max_queued_batches`` queued or running batches; ILS
        instances at most ``ils_max_concurrency`` requests (their engine's concurrency cap;
        ``max_running`` for the memory-bounded ``ils-vllm``, whose engine queues the rest).
        """
        caps = DispatchCaps.for_policy(self.settings.policy, self.settings.max_queued_batches,
                                       self.settings.ils_max_concurrency,
                                       self.settings.max_running)
        return caps.apply(batches, views)

    def _candidates(self, boots: dict[str, str]) -> list[Candidate]:
        """The oldest pending requests; a request's K/V location counts only while its
        instance is ready and still the run of the worker that kept it (``boots``)."""
        return [
            Candidate(c.id, c.context_len, c.remaining_tokens, c.arrival,
                      c.kv_instance if boots.get(c.kv_instance) == c.kv_boot else "",
                      c.constrained)
            for c in self.store.candidate_lengths(self.settings.candidate_limit)
        ]

    def _fail_never_fitting(
        self, doomed: Sequence[Candidate], views: Sequence[InstanceView]
    ) -> int:
        failed = 0
        s = self.config.batch_slice_length
        for cand in doomed:
            need = min(float(v.cost.slice_memory(1, cand.context_len, s)) for v in views)
            best = max(v.memory_budget_bytes for v in views)
            limit = max(v.context_limit for v in views)
            reason = (
                f"request cannot fit any instance even alone: one slice of "
                f"{cand.context_len} context tokens needs about {need / 2**20:.1f} MiB, the "
                f"largest budget is {best / 2**20:.1f} MiB (context limit {limit})"
            )
            if self.store.fail_pending(
                cand.id, FinishReason.NEVER_FITS, reason, self.settings.result_ttl_s
            ):
                log.warning("request_never_fits", request_id=cand.id, reason=reason)
                failed += 1
        return failed

    def _dispatch(self, plan: BatchPlan) -> str | None:
        """Claim the plan's requests and enqueue the slice job; None if none was claimable."""
        batch_id = new_batch_id()
        deadline = now() + self.settings.queue_timeout_s
        fences = self.store.claim_batch(
            batch_id,
            plan.instance_id,
            plan.request_ids,
            plan.slice_length,
            deadline,
            extra={
                "padded_len": plan.padded_len,
                "estimated_bytes": plan.estimated_bytes,
                "policy": self.settings.policy,
                "drop_finished": int(self.config.batching != "fcfs-fixed"),
                "resumed_rows": plan.resumed_rows,
            },
            estimated_s=plan.estimated_s,
        )
        if not fences:
            return None
        queue = Queue(
            self.store.keys.queue_name(plan.instance_id), connection=self.rq_connection
        )
        # If enqueueing fails after the claim (or this scheduler dies, or Redis loses the
        # enqueue in a restart), the sweep finds the batch has no job and hands it back.
        queue.enqueue(
            SLICE_JOB,
            batch_id,
            job_id=batch_id,
            job_timeout=int(self.settings.slice_timeout_s) + 60,
            result_ttl=300,
            failure_ttl=self.settings.result_ttl_s,
            description=f"slice of {len(fences)} requests",
        )
        self.metrics.observe_batch(len(fences))
        log.debug("batch_dispatched", batch_id=batch_id, instance=plan.instance_id,
                  size=len(fences), padded_len=plan.padded_len,
                  estimated_s=round(plan.estimated_s, 4))
        return batch_id

    # --- recovery ---------------------------------------------------------------------
    def _sweep_if_due(self, instances: list[InstanceInfo]) -> int:
        if time.monotonic() - self._last_sweep < min(1.0, self.settings.heartbeat_interval_s):
            return 0
        self._last_sweep = time.monotonic()
        return self.sweep({inst.id for inst in instances})

    def sweep(self, live_ids: set[str]) -> int:
        """Requeue in-flight batches whose deadline passed, whose instance is gone, or that
        were claimed but have no slice job (orphaned: see :meth:`_orphaned`)."""
        swept = 0
        current = now()
        for batch_id, deadline in self.store.inflight_batches():
            batch = self.store.get_batch(batch_id)
            if batch is None:
                continue
            if batch.instance not in live_ids:
                reason = f"instance {batch.instance} stopped heartbeating"
            elif deadline < current:
                reason = f"batch {batch_id} missed its deadline on {batch.instance}"
            elif self._orphaned(batch.status, batch.created_at, batch_id, batch.instance,
                                current):
                reason = f"batch {batch_id} was claimed but its slice job was never queued"
            else:
                continue
            result = self.store.requeue_batch(
                batch, reason, self.settings.max_retries, self.settings.result_ttl_s
            )
            if result is not None:
                swept += 1
                log.warning("batch_requeued", batch_id=batch_id, reason=reason,
                            requeued=result[0], failed=result[1])
        return swept

    def _orphaned(self, status: str, created_at: float, batch_id: str, instance: str,
                  current: float) -> bool:
        """Whether a queued batch has no RQ job that a worker can still take: the
        scheduler that claimed it died before enqueueing, the enqueue failed, or a Redis
        restart kept the claim and lost the enqueue, or kept the job and lost its place in
        the queue (AOF keeps a prefix of the writes), or the worker that popped (or even
        RQ-started) it was killed, or lost Redis, before starting the slice. Without this
        its requests would wait
        for the queue timeout (``SCLS_QUEUE_TIMEOUT_S``, minutes). Batches younger than
        ``orphan_grace_s`` are left alone: their enqueue may be under way."""
        if status != "queued" or current - created_at < self.orphan_grace_s:
            return False
        job_key = Job.key_for(batch_id)
        job_status = self.rq_connection.hget(job_key, "status")
        if job_status == b"started":
            # RQ started the job, yet the slice never began (start.lua marks the batch
            # running a few calls later): the worker died, or Redis failed under it, in
            # between. Its loop may never come back to it (a new id after a crash).
            return True
        if job_status != b"queued":
            return not self.rq_connection.exists(job_key)  # ended: not ours
        # Waiting in its queue: a worker will take it. Popped into RQ's intermediate list
        # but still not started after the grace: the worker that popped it died (a live one
        # starts it within milliseconds). Should that worker still start it, start.lua
        # refuses the requeued batch: a false alarm costs a skipped job, never a request.
        queue = Queue(self.store.keys.queue_name(instance), connection=self.rq_connection)
        if queue.get_job_position(batch_id) is not None:
            return False
        # Read again: a worker may have taken it between the reads, which is not an orphan.
        return self.rq_connection.hget(job_key, "status") == b"queued"

    # --- loop -------------------------------------------------------------------------
    def run(self) -> None:
        """Cycle until :meth:`stop`; a standby keeps trying for the lock."""
        log.info("scheduler_started", holder=self.holder_id, policy=self.settings.policy,
                 batching=self.config.batching, offloading=self.config.offloading)
        was_leader = False
        outage: str | None = None  # the error of the current Redis outage, logged once
        try:
            while not self._stop.is_set():
                try:
                    report = self.cycle()
                    if outage is not None:
                        log.info("redis_recovered", after=outage)
                        outage = None
                    if report.leader != was_leader:
                        log.info("leadership", leader=report.leader, holder=self.holder_id)
                        was_leader = report.leader
                    if report.batches:
                        log.info("cycle", batches=len(report.batches),
                                 requests=report.dispatched_requests,
                                 instances=report.instances)
                    self._pause(report)
                except redis.RedisError as exc:  # down, read timeout, a Redis error reply
                    if outage is None:
                        outage = f"{type(exc).__name__}: {exc}"
                        log.error("redis_unavailable", error=outage)
                    self._stop.wait(1.0)
        finally:
            self._release(reachable=outage is None)
            log.info("scheduler_stopped", holder=self.holder_id)

    def _pause(self, report: CycleReport) -> None:
        """Between cycles: a standby waits a third of the lock's lifetime, at most half a
        second (one SET NX: cheap), so it takes over soon after the lock lapses; an idle
        leader blocks until woken (new work) or the cycle interval ends."""
        if not report.leader:
            self._stop.wait(min(self.settings.leader_ttl_s / 3, STANDBY_POLL_S))
        elif not report.batches:
            self.store.wait_for_work(self.settings.cycle_interval_s)

    def _release(self, reachable: bool) -> None:
        """Give the leader lock up so a standby takes over at once; with Redis unreachable
        it cannot be, and expires after ``leader_ttl_s`` instead (no wait at shutdown)."""
        if not reachable:
            return
        try:
            self.store.release_leader(self.holder_id)
        except redis.RedisError as exc:
            log.warning("leader_release_failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current cycle."""
        self._stop.set()


def create_scheduler(settings: Settings, redis_url: str | None = None) -> Scheduler:
    """Build a scheduler from settings (``redis_url`` overrides ``settings.redis_url``).

    Raises:
        ValueError: no Redis URL, or an unknown policy name (the message lists choices).
    """
    url = redis_url or settings.redis_url
    if not url:
        raise ValueError("the scheduler needs a Redis URL (SCLS_REDIS_URL)")
    if settings.policy not in POLICIES:
        raise ValueError(f"unknown policy {settings.policy!r}; choose from {', '.join(POLICIES)}")
    # Bounded calls: a Redis that stops answering raises after a few seconds instead of
    # blocking the loop (and a SIGTERM) forever; the wait for work blocks up to a cycle.
    timeout_s = CALL_TIMEOUT_S + settings.cycle_interval_s
    store = Store(bound_timeouts(connect(url), timeout_s), Keys(settings.key_prefix))
    return Scheduler(settings, store, bound_timeouts(open_rq_connection(url), timeout_s))
