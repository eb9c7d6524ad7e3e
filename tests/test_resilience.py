"""Long-running loops survive Redis errors and unreadable profiles (issue: a read timeout
killed the scheduler loop and silently ended the worker heartbeat). Real Redis; the error
is injected into one call at a time."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from rq import Queue
from rq.job import Job

from shared.core.states import RequestStatus
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.policy.costmodel import SCHEMA_VERSION
from shared.settings import Settings
from tests.test_system import make_cluster, submit


def _failing(real, times: int, exc: Exception):  # noqa: ANN001, ANN202
    """``real`` that raises ``exc`` on its first ``times`` calls."""
    calls = {"n": 0}

    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return real(*args, **kwargs)

    return call, calls


def test_the_scheduler_loop_survives_redis_timeouts(
    settings: Settings, tiny: LoadedModel, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched, _ = make_cluster(settings, tiny)
    failing, calls = _failing(sched.store.candidate_lengths, 2,
                              redis.TimeoutError("Timeout reading from socket"))
    monkeypatch.setattr(sched.store, "candidate_lengths", failing)
    rid = submit(store, [5, 6, 7], max_tokens=4)
    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 15
        while store.get_request(rid).status.value == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls["n"] > 2  # it failed twice and went on
        assert store.get_request(rid).status.value == "running"  # and dispatched
        assert loop.is_alive()
    finally:
        sched.stop()
        loop.join(timeout=10)


def test_an_unreadable_profile_skips_that_instance_only(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    sched, _ = make_cluster(settings, tiny, n_workers=2)
    newer = json.dumps({"version": SCHEMA_VERSION + 1})  # a rolling upgrade's newer schema
    store.r.hset(store.keys.instance("w0"), "profile", newer)
    rids = [submit(store, [5, 6, 7 + i], max_tokens=4) for i in range(6)]
    report = sched.cycle()
    assert report.batches
    assert {store.get_batch(b).instance for b in report.batches} == {"w1"}
    assert all(store.get_request(r).status.value == "running" for r in rids)


def test_the_heartbeat_survives_redis_errors(
    settings: Settings, tiny: LoadedModel, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings.model_copy(update={"heartbeat_interval_s": 0.1})
    _, (worker,) = make_cluster(s, tiny)
    failing, calls = _failing(worker.store.heartbeat, 3, redis.TimeoutError("stalled"))
    monkeypatch.setattr(worker.store, "heartbeat", failing)
    worker.register()
    try:
        deadline = time.monotonic() + 10
        while calls["n"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls["n"] >= 6  # kept beating after three failures
        beat = float(store.r.hget(store.keys.instance("w0"), "heartbeat_at"))
        assert time.time() - beat < 2
    finally:
        worker._stop_heartbeating()


def test_a_claimed_batch_without_a_job_is_handed_back_at_once(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """The leader claimed a batch and died before enqueueing its job (or a Redis restart
    kept the claim and lost the enqueue): the next sweep hands it back instead of leaving
    its requests for the queue timeout, and a batch whose job exists is left alone."""
    sched, _workers = make_cluster(settings, tiny)
    sched.orphan_grace_s = 0.0
    queued = submit(store, [5, 6, 7], max_tokens=3)
    sched.cycle()  # a real dispatch: claimed and enqueued
    dispatched = store.get_request(queued).batch
    assert dispatched
    stranded = submit(store, [8, 9], max_tokens=3)
    assert store.claim_batch("b-orphan", "w0", [stranded], 3, time.time() + 600)
    assert sched.sweep({"w0"}) == 1
    assert store.get_request(stranded).status is RequestStatus.PENDING
    assert store.get_batch(dispatched).status == "queued"  # its job exists: untouched
    sched.orphan_grace_s = 60.0  # a young batch may still be getting its job
    assert store.claim_batch("b-young", "w0", [stranded], 3, time.time() + 600)
    assert sched.sweep({"w0"}) == 0


def test_a_queued_batch_whose_job_left_its_queue_is_handed_back(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """A Redis restart kept the job (status queued) but lost its place in the instance's
    queue (found by scls chaos: the push was cut off, or the pop was half kept): no worker
    can take it, so the sweep hands the batch back."""
    sched, _workers = make_cluster(settings, tiny)
    sched.orphan_grace_s = 0.0
    rid = submit(store, [5, 6, 7], max_tokens=3)
    sched.cycle()
    batch_id = store.get_request(rid).batch
    assert sched.sweep({"w0"}) == 0  # queued and listed: a worker will take it
    queue_key = Queue(store.keys.queue_name("w0"), connection=sched.rq_connection).key
    assert sched.rq_connection.lrem(queue_key, 0, batch_id) == 1
    assert sched.sweep({"w0"}) == 1
    assert store.get_request(rid).status is RequestStatus.PENDING


def test_a_batch_whose_job_rq_started_but_whose_slice_never_began_is_handed_back(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """RQ marked the job started, then the worker lost Redis (or died) before the slice
    marked the batch running (found by scls chaos under CPU load: two requests 'running'
    for minutes on a live instance). After the grace the sweep hands it back; a worker
    that does start it late finds it requeued and skips it."""
    sched, (worker,) = make_cluster(settings, tiny)
    rid = submit(store, [5, 6, 7], max_tokens=3)
    sched.cycle()
    batch_id = store.get_request(rid).batch
    queue = Queue(store.keys.queue_name("w0"), connection=sched.rq_connection)
    queue.remove(batch_id)
    sched.rq_connection.hset(Job.key_for(batch_id), "status", "started")
    assert sched.sweep({"w0"}) == 0  # within the grace: the slice may be starting
    sched.orphan_grace_s = 0.0
    assert sched.sweep({"w0"}) == 1
    assert store.get_request(rid).status is RequestStatus.PENDING
    assert worker.runtime.run_batch(batch_id) == {"status": "skipped"}


def test_a_slice_failing_with_redis_down_is_handed_back_once_redis_returns(
    settings: Settings, tiny: LoadedModel, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis went away mid-slice (found by scls chaos): the slice fails and so does its
    hand-back. The batch must not stay ``running`` on this live instance until the slice
    timeout: the next successful heartbeat hands it back."""
    sched, (worker,) = make_cluster(settings, tiny)
    rid = submit(store, [5, 6, 7], max_tokens=3)
    sched.cycle()
    batch_id = store.get_request(rid).batch
    runtime = worker.runtime
    lost = redis.ConnectionError("Connection refused")
    monkeypatch.setattr(runtime.engines[True], "run_slice", _failing(lambda *a: None, 1, lost)[0])
    monkeypatch.setattr(runtime.store, "requeue_batch",
                        _failing(runtime.store.requeue_batch, 1, lost)[0])
    with pytest.raises(redis.ConnectionError):
        runtime.run_batch(batch_id)
    assert store.get_request(rid).status is RequestStatus.RUNNING  # the hand-back failed
    assert list(runtime.unreturned) == [batch_id]
    worker._beat()  # Redis answers again
    rec = store.get_request(rid)
    assert rec.status is RequestStatus.PENDING and rec.retries == 1
    assert runtime.unreturned == {}
