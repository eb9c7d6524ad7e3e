"""The scheduler: one active leader forms slice batches and dispatches them to workers.

Each cycle: hold the leader lock, sweep dead/late batches back to pending, read the live
instances and how much work each already has, take the oldest pending requests, fail the
ones no instance can ever hold, form batches with the configured policy, then claim each
batch atomically and enqueue its RQ job on the chosen instance's queue.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

import redis
from rq import Queue

from shared.keys import Keys
from shared.logging import get_logger
from shared.policy import (
    BATCH_POLICIES,
    BatchPlan,
    BatchPolicy,
    Candidate,
    InstanceView,
    never_fitting,
)
from shared.records import InstanceInfo, new_batch_id, now
from shared.settings import Settings
from shared.states import FinishReason
from shared.store import Store, connect

log = get_logger(__name__)

#: Import path of the worker's job function (RQ resolves it in the worker process).
SLICE_JOB = "services.worker.jobs.run_slice"


@dataclass
class CycleReport:
    """What one cycle did (returned for tests and logged at debug level)."""

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
        policy: BatchPolicy,
        holder_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.rq_connection = rq_connection
        self.policy = policy
        self.holder_id = holder_id or f"{socket.gethostname()}-{os.getpid()}"
        self._last_sweep = 0.0
        self._stop = threading.Event()

    # --- one cycle ------------------------------------------------------------------
    def cycle(self) -> CycleReport:
        """Run one scheduling cycle; does nothing but wait if another scheduler leads."""
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
        if not any(v.free_slots > 0 for v in views):
            return report
        candidates = self._candidates()
        report.candidates = len(candidates)
        doomed = never_fitting(candidates, views, self.settings.slice_length)
        report.failed_never_fit = self._fail_never_fitting(doomed, views)
        doomed_ids = {c.id for c in doomed}
        runnable = [c for c in candidates if c.id not in doomed_ids]
        plans = self.policy(
            runnable, views, self.settings.slice_length, self.settings.max_batch_size
        )
        for plan in plans:
            batch_id = self._dispatch(plan)
            if batch_id:
                report.batches.append(batch_id)
                report.dispatched_requests += len(plan.request_ids)
        return report

    def _instance_views(self, instances: list[InstanceInfo]) -> list[InstanceView]:
        views = []
        for inst in instances:
            if inst.state != "ready":
                continue
            queued = self.store.instance_batch_count(inst.id)
            views.append(
                InstanceView(
                    id=inst.id,
                    memory_budget_bytes=inst.memory_budget_bytes,
                    kv_bytes_per_token=inst.kv_bytes_per_token,
                    act_bytes_per_token=inst.activation_bytes_per_token,
                    context_limit=inst.context_limit,
                    queued_batches=queued,
                    free_slots=max(0, self.settings.max_queued_batches - queued),
                )
            )
        return views

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(rec.id, rec.context_len, rec.remaining_tokens, rec.arrival)
            for rec in self.store.candidates(self.settings.candidate_limit)
        ]

    def _fail_never_fitting(self, doomed: list[Candidate], views: list[InstanceView]) -> int:
        failed = 0
        for cand in doomed:
            best = max(v.memory_budget_bytes for v in views)
            need = views[0].slice_bytes(1, cand.context_len, self.settings.slice_length)
            reason = (
                f"request needs about {need / 2**20:.1f} MiB for one slice of "
                f"{cand.context_len} context tokens, more than any instance's budget "
                f"({best / 2**20:.1f} MiB) or context limit"
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
            extra={"padded_len": plan.padded_len, "estimated_bytes": plan.estimated_bytes},
        )
        if not fences:
            return None
        queue = Queue(
            self.store.keys.queue_name(plan.instance_id), connection=self.rq_connection
        )
        # If enqueueing fails after the claim, the sweep requeues the batch at its deadline.
        queue.enqueue(
            SLICE_JOB,
            batch_id,
            job_id=batch_id,
            job_timeout=int(self.settings.slice_timeout_s) + 60,
            result_ttl=300,
            failure_ttl=self.settings.result_ttl_s,
            description=f"slice of {len(fences)} requests",
        )
        log.debug("batch_dispatched", batch_id=batch_id, instance=plan.instance_id,
                  size=len(fences), padded_len=plan.padded_len)
        return batch_id

    # --- recovery ---------------------------------------------------------------------
    def _sweep_if_due(self, instances: list[InstanceInfo]) -> int:
        if time.monotonic() - self._last_sweep < min(1.0, self.settings.heartbeat_interval_s):
            return 0
        self._last_sweep = time.monotonic()
        return self.sweep({inst.id for inst in instances})

    def sweep(self, live_ids: set[str]) -> int:
        """Requeue in-flight batches whose deadline passed or whose instance is gone."""
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

    # --- loop -------------------------------------------------------------------------
    def run(self) -> None:
        """Cycle until :meth:`stop`; a standby keeps trying for the lock."""
        log.info("scheduler_started", holder=self.holder_id, policy=self.settings.batch_policy)
        was_leader = False
        try:
            while not self._stop.is_set():
                try:
                    report = self.cycle()
                except redis.ConnectionError as exc:
                    log.error("redis_unavailable", error=str(exc))
                    self._stop.wait(1.0)
                    continue
                if report.leader != was_leader:
                    log.info("leadership", leader=report.leader, holder=self.holder_id)
                    was_leader = report.leader
                if report.batches:
                    log.info("cycle", batches=len(report.batches),
                             requests=report.dispatched_requests, instances=report.instances)
                if not report.leader:
                    self._stop.wait(self.settings.leader_ttl_s / 3)
                elif not report.batches:
                    self.store.wait_for_work(self.settings.cycle_interval_s)
        finally:
            self.store.release_leader(self.holder_id)
            log.info("scheduler_stopped", holder=self.holder_id)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current cycle."""
        self._stop.set()


def create_scheduler(settings: Settings, redis_url: str | None = None) -> Scheduler:
    """Build a scheduler from settings (``redis_url`` overrides ``settings.redis_url``)."""
    url = redis_url or settings.redis_url
    if not url:
        raise ValueError("the scheduler needs a Redis URL (SCLS_REDIS_URL)")
    if settings.batch_policy not in BATCH_POLICIES:
        raise ValueError(
            f"unknown batch policy {settings.batch_policy!r}; choose from "
            f"{', '.join(BATCH_POLICIES)}"
        )
    store = Store(connect(url), Keys(settings.key_prefix))
    return Scheduler(
        settings, store, redis.Redis.from_url(url), BATCH_POLICIES[settings.batch_policy]
    )
