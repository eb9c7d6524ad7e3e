"""The worker service: load the model once, register the instance, heartbeat, and run an
RQ ``SimpleWorker`` on the instance's own queue until told to stop.

On SIGTERM/SIGINT RQ finishes the slice in progress (warm shutdown) while the heartbeat
publishes the instance as ``draining`` at once (the scheduler places no new batch on it);
then the worker hands back the batches still queued for it, so no request waits for a dead
instance, and deregisters.

Faults (docs/operations.md, "Worker and scheduler faults"):

* Every Redis call is bounded (:data:`REDIS_TIMEOUT_S`), so a Redis that stops answering
  raises instead of blocking; a SIGTERM then ends the process within seconds, skipping the
  hand-back that needs Redis (the scheduler's sweep requeues the batches once the instance
  hash expires).
* A heartbeat that has failed for longer than the instance TTL makes the instance a
  zombie the scheduler already treats as dead: the job loop takes no new job, and
  ``GET /livez`` on the metrics port answers 503 so Kubernetes restarts the pod. When Redis
  answers again the heartbeat re-registers the instance and the loop resumes.
* RQ's work loop ends on a Redis error; :meth:`WorkerService.serve` starts it again with
  a back-off, until a stop is requested.
* A worker that starts under the id of a previous run (a StatefulSet pod restarted as
  worker-0) hands that run's batches back at once (:meth:`WorkerService.register`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import redis
import torch
from rq import Queue
from rq.exceptions import StopRequested

from services.worker import jobs
from services.worker.ils_runtime import IlsRuntime
from services.worker.profile_cache import instance_memory_budget, load_or_profile
from services.worker.rq_worker import RQ_POLL_S, OutageAwareQueue, SliceWorker
from services.worker.runtime import WorkerRuntime
from shared.core.connection import CALL_TIMEOUT_S, bound_timeouts
from shared.core.connection import rq_connection as open_rq_connection
from shared.core.keys import Keys
from shared.core.signals import on_stop_signals
from shared.core.states import BatchStatus
from shared.core.store import Store, connect
from shared.modeling.loading import LoadedModel, load_model
from shared.obs.logging import get_logger
from shared.obs.prometheus import WorkerMetrics
from shared.policy.costmodel import CostModel
from shared.policy.presets import SLICE_MODE, is_continuous, retains_kv
from shared.settings import Settings

log = get_logger(__name__)

#: Socket (and connect) timeout of the worker's store client.
REDIS_TIMEOUT_S = CALL_TIMEOUT_S
#: Back-off between restarts of RQ's work loop after a Redis error.
RESTART_BACKOFF_S = (0.5, 5.0)


class WorkerService:
    """One instance's lifecycle: register, heartbeat, serve, drain, deregister."""

    def __init__(self, settings: Settings, runtime: WorkerRuntime, rq_connection: redis.Redis):
        self.settings = settings
        self.runtime = runtime
        self.store = runtime.store
        self.rq_connection = rq_connection
        self._stop_heartbeat = threading.Event()
        self._draining = threading.Event()
        self._stop_requested = threading.Event()  # serve() returns; set by SIGTERM or stop()
        self._wake_heartbeat = threading.Event()  # beat now, not at the next interval
        self._heartbeat_thread: threading.Thread | None = None
        self._last_beat_ok: float | None = None  # monotonic time of the last good beat
        self._beat_error: str | None = None  # the last beat's error; None when it succeeded
        self._loop_error: str | None = None  # why RQ's loop last stopped, until it resumes
        self._rq_runs = 0
        self._loop_redis_down = False  # RQ's last run ended on a Redis error
        self._restart_delay = RESTART_BACKOFF_S[0]
        self.rq_worker: SliceWorker | None = None

    @property
    def metrics(self) -> WorkerMetrics:
        """This instance's Prometheus metrics (its own registry)."""
        return self.runtime.metrics

    @property
    def instance_id(self) -> str:
        """This instance's id."""
        return self.runtime.instance_id

    # --- registration and heartbeat ---------------------------------------------------
    def register(self) -> None:
        """Hand back what a previous run under this id left placed here, publish the
        instance and start heartbeating."""
        self.hand_back_previous_run()
        self.store.register_instance(self.runtime.instance_info(), self.settings.instance_ttl_s)
        self._last_beat_ok = time.monotonic()
        self._beat_error = None
        self._stop_heartbeat.clear()
        self._draining.clear()
        self._stop_requested.clear()
        self._wake_heartbeat.clear()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"heartbeat-{self.instance_id}", daemon=True
        )
        self._heartbeat_thread.start()
        self.store.wake_scheduler("instance")
        log.info("instance_registered", instance=self.instance_id,
                 device=str(self.runtime.loaded.device), queue=self.runtime.queue_name)

    def hand_back_previous_run(self) -> int:
        """Requeue, fenced, the batches an earlier process under this instance id left
        queued or running (it crashed, or its pod restarted under the same name), and drop
        their RQ jobs; returns how many batches went back.

        Without this they would wait for the old instance hash to expire (the sweep) or,
        with the hash renewed by this new run, for the slice/queue timeout. A batch the
        previous run had started counts as a failed attempt (as the sweep counts it: a
        slice that crashes its worker must not loop forever); one still queued does not.
        The queue is emptied first: a batch the scheduler places on this id meanwhile is
        either listed below (and handed back) or keeps its job; a job whose batch went
        back is skipped when it runs (the batch is no longer in flight).
        """
        queue = Queue(self.runtime.queue_name, connection=self.rq_connection)
        dropped = queue.count
        queue.empty()
        handed_back = self._requeue_own_batches("restarted", say_when=True, count_started=True)
        if handed_back or dropped:
            log.warning("previous_run_handed_back", instance=self.instance_id,
                        batches=handed_back, jobs_dropped=dropped)
        return handed_back

    def begin_drain(self) -> None:
        """Publish the instance as draining at the next beat, which comes at once.

        Safe in a signal handler: it only sets events; the heartbeat thread writes Redis.
        """
        self._draining.set()
        self._wake_heartbeat.set()

    def _on_stop_signal(self) -> None:
        """SIGTERM/SIGINT (from RQ's handler): drain, and end :meth:`serve`'s loop."""
        self.begin_drain()
        self._stop_requested.set()

    def stop(self) -> None:
        """Ask :meth:`serve` to return (any thread): the job in progress finishes, the
        loop ends within a poll."""
        self._on_stop_signal()
        if self.rq_worker is not None:
            self.rq_worker._stop_requested = True

    def _heartbeat_loop(self) -> None:
        while True:
            self._wake_heartbeat.wait(self.settings.heartbeat_interval_s)
            self._wake_heartbeat.clear()
            if self._stop_heartbeat.is_set():
                return
            self._beat()

    def _beat(self) -> None:
        state = "draining" if self._draining.is_set() else "ready"
        try:
            alive = self.store.heartbeat(self.instance_id, self.settings.instance_ttl_s, state,
                                         self.runtime.heartbeat_fields())
            if not alive and state == "ready":
                # Presumed dead (a long pause, or Redis was away past the TTL and the hash
                # expired): come back as new. The scheduler's sweep has handed our batches
                # back, or will; a job of theirs still queued is skipped when it runs.
                self.store.register_instance(
                    self.runtime.instance_info(), self.settings.instance_ttl_s
                )
                log.warning("instance_reregistered", instance=self.instance_id)
        except Exception as exc:  # a beat must never end the heartbeat thread
            self._beat_failed(exc)
            return
        self._last_beat_ok = time.monotonic()
        if self._beat_error is not None:
            log.info("heartbeat_recovered", instance=self.instance_id)
            self._beat_error = None
        if self.runtime.unreturned:
            try:  # a slice that failed while Redis was away: its batch goes back now
                self.runtime.retry_hand_backs()
            except Exception:  # a beat must never end the heartbeat thread
                log.exception("hand_back_retry_failed", instance=self.instance_id)

    def _beat_failed(self, exc: Exception) -> None:
        """Log the first failure of an outage (connection lost, read timeout, a Redis
        error reply, or a bug), not one line per beat."""
        error = f"{type(exc).__name__}: {exc}"
        if self._beat_error is None:
            if isinstance(exc, redis.RedisError):
                log.error("heartbeat_failed", instance=self.instance_id, error=error)
            else:
                log.exception("heartbeat_failed", instance=self.instance_id)
        self._beat_error = error

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the last successful heartbeat (None before registration)."""
        last = self._last_beat_ok
        return None if last is None else time.monotonic() - last

    def heartbeat_fresh(self) -> bool:
        """False once heartbeats have failed for longer than the instance TTL (the
        instance hash has expired or is about to); True when not heartbeating at all (an
        instance driven by hand, as in tests)."""
        age = self.heartbeat_age_s()
        return self._heartbeat_thread is None or age is None or \
            age <= self.settings.instance_ttl_s

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """What ``GET /livez`` on the metrics port answers: alive (200) while the last
        successful heartbeat is younger than the instance TTL, else 503 with the reason."""
        age = self.heartbeat_age_s()
        ttl = self.settings.instance_ttl_s
        body: dict[str, object] = {"instance": self.instance_id, "ttl_s": ttl,
                                   "heartbeat_age_s": None if age is None else round(age, 3)}
        if self._heartbeat_thread is None:
            return True, {**body, "status": "not heartbeating (starting or stopped)"}
        if self.heartbeat_fresh():
            return True, {**body, "status": "ok"}
        return False, {
            **body, "status": "stale",
            "reason": f"no successful heartbeat for {age:.1f} s (instance TTL {ttl:g} s): the "
                      "scheduler treats this instance as dead and it takes no job",
            "last_error": self._beat_error,
        }

    def _stop_heartbeating(self) -> None:
        """Stop the heartbeat thread and wait for it: a beat still in progress after the
        deregistration would re-register the instance (a ghost the scheduler feeds). A
        beat is at most two bounded Redis calls, so the wait is bounded too."""
        self._stop_heartbeat.set()
        self._wake_heartbeat.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2 * REDIS_TIMEOUT_S + 1)
            self._heartbeat_thread = None

    # --- the job loop -------------------------------------------------------------------
    def serve(self, burst: bool = False) -> None:
        """Run jobs from the instance's queue until stopped (or empty, with ``burst``).

        RQ's loop ends when Redis fails under it; it is started again after a back-off
        (doubling up to :data:`RESTART_BACKOFF_S`), the outage logged once, until a stop
        is requested. With ``burst`` it runs once.
        """
        jobs.install_runtime(self.runtime)
        self._restart_delay = RESTART_BACKOFF_S[0]
        if not burst and threading.current_thread() is threading.main_thread():
            # Until RQ installs its own (and between its runs): a stop only sets flags.
            # They stay installed after serve() returns: a signal during the drain must
            # not kill the process half-way.
            on_stop_signals(self._on_stop_signal)
        try:
            while not self._stop_requested.is_set():
                error = self._run_rq_once(burst)
                if burst or self._stop_requested.is_set():
                    return
                if self._loop_error is None:
                    log.error("job_loop_interrupted", instance=self.instance_id,
                              error=error, retry_s=self._restart_delay)
                    self._loop_error = error
                self._stop_requested.wait(self._restart_delay)
                self._restart_delay = min(2 * self._restart_delay, RESTART_BACKOFF_S[1])
        finally:
            jobs.install_runtime(None)

    def _run_rq_once(self, burst: bool) -> str:
        """One run of RQ's work loop; why it ended (when no stop was requested)."""
        self._rq_runs += 1
        try:
            worker = self._new_rq_worker()  # RQ names its connection: a Redis call
            worker.work(burst=burst, logging_level="WARNING")
        except StopRequested:  # a signal before RQ's loop began
            return "stop requested"
        except redis.RedisError as exc:  # RQ's start-up or a job's bookkeeping
            self._loop_redis_down = True
            return f"{type(exc).__name__}: {exc}"
        if worker.redis_lost is not None:
            self._loop_redis_down = True
            return f"{type(worker.redis_lost).__name__}: {worker.redis_lost}"
        return "RQ's work loop ended (see its log line above)"

    def _new_rq_worker(self) -> SliceWorker:
        queue = OutageAwareQueue(self.runtime.queue_name, connection=self.rq_connection)
        worker = SliceWorker(
            [queue], connection=self.rq_connection,
            name=f"{self.runtime.queue_name}-{os.getpid()}-{self._rq_runs}",
        )
        worker.on_stop_requested = self._on_stop_signal
        worker.may_take_jobs = self.heartbeat_fresh
        worker.on_started = self._rq_started
        worker.redis_failing = lambda: self._beat_error is not None
        self.rq_worker = worker
        return worker

    def _rq_started(self) -> None:
        self._loop_redis_down = False
        self._restart_delay = RESTART_BACKOFF_S[0]  # a later outage backs off afresh
        if self._loop_error is not None:
            # A Redis error here ends this RQ run too; the next one tries again.
            self.hand_back_interrupted()
            log.info("job_loop_resumed", instance=self.instance_id)
            self._loop_error = None

    def hand_back_interrupted(self) -> int:
        """Requeue, fenced, the batches placed on this instance that the interrupted RQ
        loop had taken off the queue and never committed; returns how many went back.

        RQ moves a job off the queue before it runs it. When Redis fails between that
        move and the slice's commit (RQ's loop ends on the outage), the job is gone from
        the queue and its batch is still in flight on this live instance: no sweep looks at
        it before its deadline, and its requests would wait that long. So when the loop
        starts again, every batch of this instance whose job is no longer queued goes
        back: nothing else can be running here then (a slice runs inside the loop's own
        thread). Batches are listed before the queue is read, so a batch placed meanwhile
        is not touched; one listed whose job was not pushed yet goes back, and its job is
        skipped when it runs (the batch is no longer in flight). A batch that had started
        counts a retry, as the sweep counts it. An ILS engine keeps running its admitted
        requests across the outage, so only slice instances do this.
        """
        if self.runtime.mode != SLICE_MODE:
            return 0
        listed = self.store.instance_batch_ids(self.instance_id)
        if not listed:
            return 0
        queue = Queue(self.runtime.queue_name, connection=self.rq_connection)
        waiting = set(queue.get_job_ids())
        handed_back = self._requeue_own_batches(
            "lost its job loop to a Redis outage", [b for b in listed if b not in waiting],
            say_when=True, count_started=True)
        if handed_back:
            log.warning("interrupted_batches_handed_back", instance=self.instance_id,
                        batches=handed_back)
        return handed_back

    # --- shutdown -----------------------------------------------------------------------
    def redis_reachable(self) -> bool:
        """False while the heartbeat or the job loop sees Redis failing."""
        lost = self.rq_worker is not None and self.rq_worker.redis_lost is not None
        return self._beat_error is None and not lost and not self._loop_redis_down

    def drain(self) -> int:
        """Mark the instance draining, hand queued batches back to pending, deregister.

        Requests already inside an ILS engine get up to ``drain_timeout_s`` to finish and
        commit first (a restart elsewhere would begin them again from the prompt); a slice
        worker gets here after its last slice committed. Returns how many batches were
        handed back. A handed-back batch does not count as a failed attempt of its requests.

        With Redis unreachable nothing can be handed back: the drain stops at the first
        failed call (each is bounded by :data:`REDIS_TIMEOUT_S`), or is skipped when Redis
        is already known to be failing, and the scheduler's sweep requeues the batches
        once this instance's hash expires.
        """
        self._draining.set()
        if not self.redis_reachable():
            self._stop_heartbeating()
            log.warning("drain_skipped", instance=self.instance_id,
                        reason="Redis unreachable; the sweep requeues this instance's "
                               "batches when its hash expires")
            return 0
        handed_back = 0
        try:
            handed_back = self._drain_steps()
        except redis.RedisError as exc:
            self._stop_heartbeating()
            log.error("drain_incomplete", instance=self.instance_id, handed_back=handed_back,
                      error=f"{type(exc).__name__}: {exc}")
        return handed_back

    def _drain_steps(self) -> int:
        # Draining first, so the scheduler stops placing batches here before we hand back.
        self.store.heartbeat(self.instance_id, self.settings.instance_ttl_s, "draining")
        handed_back = self._hand_back_queued(only_unstarted=True)
        self._let_started_finish()  # the heartbeat thread keeps us alive meanwhile
        self._stop_heartbeating()
        handed_back += self._hand_back_queued()
        self.store.deregister_instance(self.instance_id)
        # A cycle that read us as ready just before may have placed one more batch.
        handed_back += self._hand_back_queued()
        Queue(self.runtime.queue_name, connection=self.rq_connection).empty()
        log.info("instance_drained", instance=self.instance_id, handed_back=handed_back)
        return handed_back

    def _let_started_finish(self) -> None:
        """Wait (bounded by ``drain_timeout_s``) while the runtime has requests in progress."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.runtime.in_progress() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.runtime.in_progress()
        if left:
            log.warning("drain_timeout", instance=self.instance_id, in_progress=left,
                        timeout_s=self.settings.drain_timeout_s)

    def _hand_back_queued(self, only_unstarted: bool = False) -> int:
        """Requeue the batches still placed on this instance (no retry counted): all, or
        only those no worker has started yet."""
        return self._requeue_own_batches("shut down", only_unstarted=only_unstarted)

    def _requeue_own_batches(
        self, why: str, batch_ids: Sequence[str] | None = None, *, say_when: bool = False,
        count_started: bool = False, only_unstarted: bool = False,
    ) -> int:
        """Requeue, fenced, ``batch_ids`` (default: every batch placed on this instance)
        with the reason ``instance <id> <why>`` (plus whether it was mid-slice, with
        ``say_when``); a started batch counts a retry with ``count_started``, and is left
        alone with ``only_unstarted``. Returns how many went back."""
        if batch_ids is None:
            batch_ids = self.store.instance_batch_ids(self.instance_id)
        handed_back = 0
        for batch_id in batch_ids:
            batch = self.store.get_batch(batch_id)
            if batch is None:
                continue
            started = batch.status != BatchStatus.QUEUED.value
            if only_unstarted and started:
                continue
            reason = f"instance {self.instance_id} {why}"
            if say_when:
                reason += f" ({'mid-slice' if started else 'before running it'})"
            result = self.store.requeue_batch(batch, reason, self.settings.max_retries,
                                              self.settings.result_ttl_s,
                                              count_retry=count_started and started)
            handed_back += result is not None
        return handed_back

    def run(self) -> None:
        """Register, serve until SIGTERM/SIGINT, then drain."""
        self.runtime.start()
        self.register()
        try:
            self.serve()
        finally:
            try:
                self.drain()
            finally:
                self.runtime.stop()


def default_instance_id() -> str:
    """Hostname (a StatefulSet pod name in Kubernetes) plus pid when run locally."""
    return f"{socket.gethostname()}-{os.getpid()}"


def create_worker(
    settings: Settings,
    instance_id: str | None = None,
    loaded: LoadedModel | None = None,
    cost: CostModel | None = None,
    reprofile: bool = False,
) -> WorkerService:
    """Load the model (unless given), profile it (or load its cached profile, unless a cost
    model is given) and build the worker service for one instance. The ``ils`` policy
    preset makes it a continuous-batching instance."""
    url = settings.redis_url
    if not url:
        raise ValueError("the worker needs a Redis URL (SCLS_REDIS_URL)")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if loaded is None:
        loaded = load_model(settings.model, settings.cache_dir, settings.device)
    if cost is None:
        cost = load_or_profile(loaded, settings, reprofile=reprofile)
    # The engine's prefill chunk is a serving setting, not a profiled figure: published
    # with the profile so the scheduler prices the passes the engine will run.
    cost = replace(cost, prefill_chunk_tokens=settings.prefill_chunk_tokens)
    budget = instance_memory_budget(loaded, settings, cost)
    store = Store(bound_timeouts(connect(url), REDIS_TIMEOUT_S), Keys(settings.key_prefix))
    iid = instance_id or settings.instance_id or default_instance_id()
    if is_continuous(settings.policy):
        runtime: WorkerRuntime = IlsRuntime(settings, store, loaded, iid, cost, budget)
    else:
        # The KV pool comes out of the instance's budget, or shares it with the running
        # set's slices: either way the memory model bounds everything the instance holds
        # (docs/design.md §2).
        batch_budget, pool = budget, 0
        if retains_kv(settings.policy, settings.batching):
            config = loaded.model.config.get_text_config(decoder=True)
            batch_budget, pool = settings.kv_memory_split(budget, config.num_hidden_layers)
        runtime = WorkerRuntime(settings, store, loaded, iid, cost, batch_budget, pool)
    # RQ's own connection, bounded to a poll plus 1 s (redis-py's default is 5 s; RQ only
    # ever raises a connection's timeout to SliceWorker.connection_timeout).
    rq_connection = bound_timeouts(open_rq_connection(url), RQ_POLL_S + 1)
    return WorkerService(settings, runtime, rq_connection)
