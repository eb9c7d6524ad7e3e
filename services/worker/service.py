"""The worker service: load the model once, register the instance, heartbeat, and run an
RQ ``SimpleWorker`` on the instance's own queue until told to stop.

On SIGTERM/SIGINT RQ finishes the slice in progress (warm shutdown) while the heartbeat
publishes the instance as ``draining`` at once (the scheduler places no new batch on it);
then the worker hands back the batches still queued for it, so no request waits for a dead
instance, and deregisters.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

import redis
import torch
from rq import Queue, SimpleWorker

from services.worker import jobs
from services.worker.ils_runtime import IlsRuntime
from services.worker.profile_cache import instance_memory_budget, load_or_profile
from services.worker.runtime import WorkerRuntime
from shared.core.connection import rq_connection as open_rq_connection
from shared.core.keys import Keys
from shared.core.states import BatchStatus
from shared.core.store import Store, connect
from shared.modeling.loading import LoadedModel, load_model
from shared.obs.logging import get_logger
from shared.obs.prometheus import WorkerMetrics
from shared.policy.costmodel import CostModel
from shared.policy.presets import is_continuous, retains_kv
from shared.settings import Settings

log = get_logger(__name__)


class SliceWorker(SimpleWorker):
    """RQ's in-process worker, usable from a non-main thread (tests, embedded runs)."""

    #: Called from the signal handler when a stop is requested; it must only set flags
    #: (the main thread may hold a Redis connection lock at that moment).
    on_stop_requested: Callable[[], None] | None = None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Warm shutdown (RQ's), after telling the service that it is draining."""
        if self.on_stop_requested is not None:
            self.on_stop_requested()
        super().request_stop(signum, frame)


class WorkerService:
    """One instance's lifecycle: register, heartbeat, serve, drain, deregister."""

    def __init__(self, settings: Settings, runtime: WorkerRuntime, rq_connection: redis.Redis):
        self.settings = settings
        self.runtime = runtime
        self.store = runtime.store
        self.rq_connection = rq_connection
        self._stop_heartbeat = threading.Event()
        self._draining = threading.Event()
        self._wake_heartbeat = threading.Event()  # beat now, not at the next interval
        self._heartbeat_thread: threading.Thread | None = None
        self.rq_worker: SliceWorker | None = None

    @property
    def metrics(self) -> WorkerMetrics:
        """This instance's Prometheus metrics (its own registry)."""
        return self.runtime.metrics

    @property
    def instance_id(self) -> str:
        """This instance's id."""
        return self.runtime.instance_id

    def register(self) -> None:
        """Publish the instance and start heartbeating."""
        self.store.register_instance(self.runtime.instance_info(), self.settings.instance_ttl_s)
        self._stop_heartbeat.clear()
        self._draining.clear()
        self._wake_heartbeat.clear()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"heartbeat-{self.instance_id}", daemon=True
        )
        self._heartbeat_thread.start()
        self.store.wake_scheduler("instance")
        log.info("instance_registered", instance=self.instance_id,
                 device=str(self.runtime.loaded.device), queue=self.runtime.queue_name)

    def begin_drain(self) -> None:
        """Publish the instance as draining at the next beat, which comes at once.

        Safe in a signal handler: it only sets events; the heartbeat thread writes Redis.
        """
        self._draining.set()
        self._wake_heartbeat.set()

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
                # We were presumed dead (e.g. a long GC pause): come back as new.
                self.store.register_instance(
                    self.runtime.instance_info(), self.settings.instance_ttl_s
                )
                log.warning("instance_reregistered", instance=self.instance_id)
        except redis.RedisError as exc:  # connection lost, read timeout, a Redis error
            log.error("heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
        except Exception:  # a beat must never end the heartbeat thread silently
            log.exception("heartbeat_failed")

    def _stop_heartbeating(self) -> None:
        """Stop the heartbeat thread and wait for it: a beat still in progress after the
        deregistration would re-register the instance (a ghost the scheduler feeds)."""
        self._stop_heartbeat.set()
        self._wake_heartbeat.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=30)
            self._heartbeat_thread = None

    def serve(self, burst: bool = False) -> None:
        """Run jobs from the instance's queue until stopped (or empty, with ``burst``)."""
        queue = Queue(self.runtime.queue_name, connection=self.rq_connection)
        self.rq_worker = SliceWorker(
            [queue], connection=self.rq_connection, name=f"{self.runtime.queue_name}-{os.getpid()}"
        )
        self.rq_worker.on_stop_requested = self.begin_drain
        jobs.install_runtime(self.runtime)
        try:
            self.rq_worker.work(burst=burst, logging_level="WARNING")
        finally:
            jobs.install_runtime(None)

    def drain(self) -> int:
        """Mark the instance draining, hand queued batches back to pending, deregister.

        Requests already inside an ILS engine get up to ``drain_timeout_s`` to finish and
        commit first (a restart elsewhere would begin them again from the prompt); a slice
        worker gets here after its last slice committed. Returns how many batches were
        handed back. A handed-back batch does not count as a failed attempt of its requests.
        """
        self._draining.set()
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
        handed_back = 0
        for batch_id in self.store.instance_batch_ids(self.instance_id):
            batch = self.store.get_batch(batch_id)
            if batch is None:
                continue
            if only_unstarted and batch.status != BatchStatus.QUEUED.value:
                continue
            result = self.store.requeue_batch(
                batch, f"instance {self.instance_id} shut down", self.settings.max_retries,
                self.settings.result_ttl_s, count_retry=False,
            )
            handed_back += result is not None
        return handed_back

    def run(self) -> None:
        """Register, serve until SIGTERM/SIGINT, then drain."""
        self.runtime.start()
        self.register()
        try:
            self.serve()
        finally:
            self.drain()
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
    budget = instance_memory_budget(loaded, settings, cost)
    store = Store(connect(url), Keys(settings.key_prefix))
    iid = instance_id or settings.instance_id or default_instance_id()
    if is_continuous(settings.policy):
        runtime: WorkerRuntime = IlsRuntime(settings, store, loaded, iid, cost, budget)
    else:
        # The KV pool comes out of the instance's budget: batches get the rest, so the
        # memory model still bounds everything the instance holds (docs/design.md §2).
        pool = settings.kv_pool_capacity(budget) if retains_kv(
            settings.policy, settings.batching) else 0
        runtime = WorkerRuntime(settings, store, loaded, iid, cost, budget - pool, pool)
    return WorkerService(settings, runtime, open_rq_connection(url))
