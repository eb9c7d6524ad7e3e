"""The worker service: load the model once, register the instance, heartbeat, and run an
RQ ``SimpleWorker`` on the instance's own queue until told to stop.

On SIGTERM/SIGINT RQ finishes the slice in progress (warm shutdown); then the worker hands
back the batches still queued for it, so no request waits for a dead instance.
"""

from __future__ import annotations

import os
import socket
import threading

import redis
import torch
from rq import Queue, SimpleWorker

from services.worker import jobs
from services.worker.ils_runtime import IlsRuntime
from services.worker.profiler import instance_memory_budget, load_or_profile
from services.worker.runtime import WorkerRuntime
from shared.costmodel import CostModel
from shared.keys import Keys
from shared.logging import get_logger
from shared.models import LoadedModel, load_model
from shared.settings import Settings
from shared.store import Store, connect

log = get_logger(__name__)


class SliceWorker(SimpleWorker):
    """RQ's in-process worker, usable from a non-main thread (tests, embedded runs)."""

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()


class WorkerService:
    """One instance's lifecycle: register, heartbeat, serve, drain, deregister."""

    def __init__(self, settings: Settings, runtime: WorkerRuntime, rq_connection: redis.Redis):
        self.settings = settings
        self.runtime = runtime
        self.store = runtime.store
        self.rq_connection = rq_connection
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self.rq_worker: SliceWorker | None = None

    @property
    def instance_id(self) -> str:
        """This instance's id."""
        return self.runtime.instance_id

    def register(self) -> None:
        """Publish the instance and start heartbeating."""
        self.store.register_instance(self.runtime.instance_info(), self.settings.instance_ttl_s)
        self._stop_heartbeat.clear()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"heartbeat-{self.instance_id}", daemon=True
        )
        self._heartbeat_thread.start()
        self.store.wake_scheduler("instance")
        log.info("instance_registered", instance=self.instance_id,
                 device=str(self.runtime.loaded.device), queue=self.runtime.queue_name)

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.settings.heartbeat_interval_s):
            try:
                if not self.store.heartbeat(self.instance_id, self.settings.instance_ttl_s):
                    # We were presumed dead (e.g. a long GC pause): come back as new.
                    self.store.register_instance(
                        self.runtime.instance_info(), self.settings.instance_ttl_s
                    )
                    log.warning("instance_reregistered", instance=self.instance_id)
            except redis.ConnectionError as exc:
                log.error("heartbeat_failed", error=str(exc))

    def serve(self, burst: bool = False) -> None:
        """Run jobs from the instance's queue until stopped (or empty, with ``burst``)."""
        queue = Queue(self.runtime.queue_name, connection=self.rq_connection)
        self.rq_worker = SliceWorker(
            [queue], connection=self.rq_connection, name=f"{self.runtime.queue_name}-{os.getpid()}"
        )
        jobs.install_runtime(self.runtime)
        try:
            self.rq_worker.work(burst=burst, logging_level="WARNING")
        finally:
            jobs.install_runtime(None)

    def drain(self) -> int:
        """Stop heartbeating, hand queued batches back to pending, deregister.

        Returns how many batches were handed back. A handed-back batch does not count as a
        failed attempt of its requests.
        """
        self._stop_heartbeat.set()
        handed_back = 0
        for batch_id in self.store.r.zrange(self.store.keys.instance_batches(self.instance_id),
                                            0, -1):
            batch = self.store.get_batch(batch_id)
            if batch is None:
                continue
            result = self.store.requeue_batch(
                batch, f"instance {self.instance_id} shut down", self.settings.max_retries,
                self.settings.result_ttl_s, count_retry=False,
            )
            handed_back += result is not None
        Queue(self.runtime.queue_name, connection=self.rq_connection).empty()
        self.store.deregister_instance(self.instance_id)
        log.info("instance_drained", instance=self.instance_id, handed_back=handed_back)
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
    budget = instance_memory_budget(loaded, settings)
    store = Store(connect(url), Keys(settings.key_prefix))
    iid = instance_id or settings.instance_id or default_instance_id()
    runtime_class = IlsRuntime if settings.policy == "ils" else WorkerRuntime
    runtime = runtime_class(settings, store, loaded, iid, cost, budget)
    return WorkerService(settings, runtime, redis.Redis.from_url(url))
