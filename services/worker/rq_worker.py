"""The RQ side of a worker: RQ's in-process ``SimpleWorker``, adapted to run slices safely.

:class:`SliceWorker` polls (a stop request from another thread ends it within
:data:`RQ_POLL_S`), takes no job while its service says it may not (a stale heartbeat),
ends its loop quietly when Redis fails (:class:`RedisLost`; the service restarts it), never
writes Redis from a signal handler, and runs in a non-main thread too (tests, embedded
runs). :mod:`services.worker.service` owns the instance, its heartbeat and the restarts.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.timeouts import TimerDeathPenalty
from rq.utils import now as rq_now
from rq.worker import WorkerStatus

from shared.obs.logging import get_logger

log = get_logger(__name__)

#: How long one RQ dequeue blocks (BLPOP) before the loop checks the stop flag, the
#: heartbeat and Redis again; RQ's connection times out this plus 1 s.
RQ_POLL_S = 1


class RedisLost(StopRequested):
    """Ends RQ's work loop quietly (as a stop request does) when Redis does not answer;
    :meth:`WorkerService.serve` restarts the loop once it does."""


class OutageAwareQueue(Queue):
    """RQ's queue whose dequeue ends the work loop on a lost connection or a timeout,
    instead of RQ's retry inside the dequeue (which never returns while Redis is away)."""

    @classmethod
    def dequeue_any(cls, *args: Any, **kwargs: Any) -> Any:
        """RQ's dequeue; a Redis connection error or timeout raises :class:`RedisLost`."""
        try:
            return super().dequeue_any(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisLost() from exc


class SliceWorker(SimpleWorker):
    """RQ's in-process worker. Unlike RQ's own it polls (a stop request from another
    thread ends it within :data:`RQ_POLL_S`), takes no job while ``may_take_jobs`` says
    no, ends its loop when Redis fails (:class:`RedisLost`), never writes Redis from a
    signal handler, and runs in a non-main thread too (tests, embedded runs; job timeouts
    by a timer there)."""

    #: Called from the signal handler when a stop is requested; it must only set flags
    #: (the main thread may hold a Redis connection lock at that moment).
    on_stop_requested: Callable[[], None] | None = None
    #: Asked before each dequeue; while it returns False the worker waits (a stale
    #: heartbeat: the scheduler already treats this instance as dead).
    may_take_jobs: Callable[[], bool] | None = None
    #: Called once RQ's loop has started (registered with Redis).
    on_started: Callable[[], None] | None = None
    #: True while the service sees Redis failing (its heartbeat): teardown skips Redis.
    redis_failing: Callable[[], bool] | None = None
    queue_class = OutageAwareQueue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.redis_lost: Exception | None = None  # why the loop ended, if Redis failed
        self._in_work = False
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        """Seconds one BLPOP blocks (RQ's default is the worker TTL less 15 s: 405 s)."""
        return RQ_POLL_S

    @property
    def connection_timeout(self) -> int:
        """RQ sets its connection's socket timeout to this: a poll plus 1 s."""
        return RQ_POLL_S + 1

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """RQ's work loop; a stop request raises out of a blocking wait only inside it."""
        if threading.current_thread() is not threading.main_thread():
            # SIGALRM (RQ's default job timeout) exists for the main thread only.
            self.death_penalty_class = TimerDeathPenalty
        self._in_work = True
        try:
            return super().work(*args, **kwargs)
        finally:
            self._in_work = False

    def subscribe(self) -> None:
        """RQ's command channel (``rq`` shutdown, stop-job...), read by a thread that looks
        at its stop flag every :data:`RQ_POLL_S`. RQ's own waits 60 s per read, and since
        redis-py 8.2 stopping that thread waits for the read to end: a worker's teardown
        (a SIGTERM, an outage) took up to a minute."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=RQ_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """RQ's start-up (registers this RQ worker in Redis), then ``on_started``."""
        super().bootstrap(*args, **kwargs)
        if self.on_started is not None:
            self.on_started()

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Warm shutdown (RQ's, less its Redis writes): tell the service it is draining,
        finish the job in progress, or end the loop now when idle."""
        if self.on_stop_requested is not None:
            self.on_stop_requested()
        self._shutdown_requested_date = rq_now()  # a second signal within 1 s is ignored
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.request_force_stop)
            signal.signal(signal.SIGTERM, self.request_force_stop)
        self._stop_requested = True
        if self._in_work and self.get_state() != WorkerStatus.BUSY:
            raise StopRequested()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> Any:
        """RQ's dequeue, one poll at a time: between polls, honour a stop request and wait
        while ``may_take_jobs`` says no. Redis failing ends the loop (:class:`RedisLost`)
        where RQ would retry inside, logging each attempt."""
        while True:
            self._wait_until_may_take_jobs()
            # max_idle_time = one poll: RQ returns None after it instead of looping inside.
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, timeout or max_idle_time)
            except RedisLost as lost:  # from the dequeue itself (see OutageAwareQueue)
                self.redis_lost = self.redis_lost or lost.__cause__
                raise
            if result is not None and not self._may_take_jobs():
                # The heartbeat went stale during the poll that brought this job.
                self._put_back(*result)
                continue
            if result is not None or timeout is None:  # a job, or a burst found none
                return result

    # RQ's bookkeeping calls on every turn of its loop: Redis failing there ends the loop
    # quietly (RedisLost) rather than through RQ's "unhandled exception, quitting" path.
    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's own worker heartbeat."""
        with self._ending_on_redis_loss():
            super().heartbeat(timeout, pipeline)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's worker state (idle, busy), written to Redis."""
        with self._ending_on_redis_loss():
            super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check for ``rq suspend``."""
        with self._ending_on_redis_loss():
            super().check_for_suspension(burst)

    @contextmanager
    def _ending_on_redis_loss(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.redis_lost = self.redis_lost or exc
            raise RedisLost() from exc

    def _may_take_jobs(self) -> bool:
        return self.may_take_jobs is None or self.may_take_jobs()

    def _put_back(self, job: Job, queue: Queue) -> None:
        """Return a dequeued, not started job to the head of its queue (RQ moved it to
        the queue's intermediate list)."""
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.lpush(queue.key, job.id)
            pipe.execute()

    def _wait_until_may_take_jobs(self) -> None:
        paused = False
        while True:
            if self._stop_requested:
                raise StopRequested()
            if self._may_take_jobs():
                if paused:
                    log.info("jobs_resumed", worker=self.name)
                return
            if not paused:
                log.warning("jobs_paused", worker=self.name,
                            reason="heartbeat stale: the scheduler treats this instance as dead")
                paused = True
            time.sleep(0.05)

    def teardown(self) -> None:
        """RQ's teardown (record this RQ worker's death), skipped when Redis is gone (this
        loop or the heartbeat saw it fail): it would only wait for the socket timeout."""
        if self.redis_lost is None and not (self.redis_failing and self.redis_failing()):
            try:
                super().teardown()
                return
            except redis.RedisError as exc:
                self.redis_lost = exc
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop()
