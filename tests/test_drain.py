"""A real worker process drains cleanly on SIGTERM (README "Clean shutdown").

The worker runs as ``python -m services.cli worker`` (as LocalDeployment starts it); the
scheduler runs in a thread of this process. SIGTERM arrives while a long slice runs and a
second batch waits in the worker's queue: the slice finishes and commits, the queued batch
goes back to pending without a retry counted, the instance deregisters, the process exits 0,
and every request is in exactly one place with its tokens and fence consistent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.launcher import settings_env
from services.scheduler.service import Scheduler, create_scheduler
from shared.core.keys import Keys
from shared.core.records import RequestParams, RequestRecord, new_request_id, now
from shared.core.states import RequestStatus
from shared.core.store import Store, connect
from shared.modeling.loading import LoadedModel
from shared.settings import Settings
from tests.helpers import wait_for

SLICE = 1024  # a second or two per slice of 2 rows on one CPU thread (tiny-random)
MAX_TOKENS = 2048
REQUESTS = 6


@pytest.fixture()
def drain_settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url, key_prefix="drain:", model="tiny-random",
        cache_dir=tmp_path / "cache", slice_length=SLICE, max_gen_length=MAX_TOKENS,
        max_batch_size=2, max_queued_batches=2, horizon_s=1e6, torch_threads=1,
        profile_mode="analytic", heartbeat_interval_s=0.5, instance_ttl_s=5.0,
        metrics_port=0, log_format="json",
    )


@pytest.fixture()
def drain_store(drain_settings: Settings, rclient: redis.Redis) -> Iterator[Store]:
    store = Store(connect(drain_settings.redis_url or ""), Keys(drain_settings.key_prefix))
    yield store
    store.r.close()


@pytest.fixture()
def scheduler(drain_settings: Settings) -> Iterator[Scheduler]:
    sched = create_scheduler(drain_settings)
    thread = threading.Thread(target=sched.run, name="scheduler", daemon=True)
    thread.start()
    yield sched
    sched.stop()
    thread.join(timeout=30)


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(settings)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--instance-id", "d0"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def submit(store: Store) -> str:
    rec = RequestRecord(
        id=new_request_id(), prompt_ids=[5, 6, 7, 8],
        params=RequestParams(max_tokens=MAX_TOKENS, ignore_eos=True), arrival=now(),
        model="tiny-random",
    )
    store.submit(rec)
    return rec.id


def placed_on_d0(store: Store) -> tuple[list[str], list[str]]:
    """(running, all) batch ids placed on instance d0."""
    placed = store.r.zrange(store.keys.instance_batches("d0"), 0, -1)
    batches = [store.get_batch(bid) for bid in placed]
    return [b.id for b in batches if b is not None and b.status == "running"], placed


def test_sigterm_finishes_the_slice_hands_back_the_queue_and_exits_0(
    drain_settings: Settings, drain_store: Store, scheduler: Scheduler, tmp_path: Path
) -> None:
    store = drain_store
    log = tmp_path / "worker.log"
    proc = start_worker(drain_settings, log)
    try:
        wait_for("worker registered", lambda: store.is_instance_alive("d0"), 180, proc)
        rids = [submit(store) for _ in range(REQUESTS)]
        seen: dict[str, list[str]] = {}

        def slice_running_with_queue() -> bool:
            seen["running"], seen["placed"] = placed_on_d0(store)
            return len(seen["running"]) == 1 and len(seen["placed"]) >= 2

        wait_for("a slice running with a batch queued behind it", slice_running_with_queue,
                 60, proc)
        proc.send_signal(signal.SIGTERM)
        signalled_at = now()
        draining = False
        while proc.poll() is None:  # the heartbeat says "draining" while the slice finishes
            state = store.r.hget(store.keys.instance("d0"), "state")
            draining = draining or state == "draining"
            time.sleep(0.01)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert rc == 0, output[-3000:]
    assert draining, "the instance never published the draining state"
    assert "instance_drained" in output

    # The slice in progress was finished and committed after the signal; the queued batch
    # was handed back.
    in_progress = seen["running"][0]
    assert store.get_batch(in_progress).status == "committed"
    assert float(store.r.hget(store.keys.batch(in_progress), "committed_at")) > signalled_at
    handed_back = [store.get_batch(bid) for bid in seen["placed"] if bid != in_progress]
    assert handed_back and all(b.status == "requeued" for b in handed_back)
    for batch in handed_back:
        assert "shut down" in store.r.hget(store.keys.batch(batch.id), "reason")
    # Deregistered, nothing left placed on it or waiting in its RQ queue.
    assert not store.is_instance_alive("d0")
    assert "d0" not in store.r.smembers(store.keys.instances)
    assert store.instance_batch_count("d0") == 0
    assert store.r.llen(f"rq:queue:{store.keys.queue_name('d0')}") == 0
    assert store.inflight_batches() == []

    # No request lost: each finished or pending, in exactly one place, tokens consistent.
    pending = set(store.pending_ids(100))
    records = store.get_requests(rids)
    committed_slices = 0
    for rec in records:
        assert rec is not None
        committed_slices += rec.slices
        assert rec.retries == 0  # a hand-back at shutdown is not the request's failure
        assert len(rec.generated_ids) == rec.slices * SLICE  # ignore_eos: full slices
        if rec.status is RequestStatus.FINISHED:
            assert rec.id not in pending and len(rec.generated_ids) == MAX_TOKENS
        else:
            assert rec.status is RequestStatus.PENDING and rec.id in pending
            assert rec.batch == ""
            raw = store.r.hget(store.keys.request(rec.id), "completion_tokens")
            assert int(raw) == len(rec.generated_ids)
    assert pending <= set(rids)
    # every row of the batch that was running at the signal got its slice committed
    assert committed_slices >= len(store.get_batch(in_progress).request_ids) >= 1
    for batch in handed_back:
        for rid, fence in batch.fences.items():
            rec = store.get_request(rid)
            assert rec.fence > fence  # a late commit of the handed-back batch is rejected
    stats = store.stats("d0")
    assert stats["slices"] * 2 >= committed_slices and stats["generated_tokens"] == \
        committed_slices * SLICE


def test_an_ils_worker_lets_admitted_requests_finish_before_it_drains(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """A request inside transformers' engine would start again from its prompt elsewhere:
    draining lets it finish and commit (within ``drain_timeout_s``); a batch not yet
    admitted goes back to pending at once, with no retry counted."""
    from services.worker.service import create_worker

    s = settings.model_copy(update={"policy": "ils", "ils_max_concurrency": 1,
                                    "max_gen_length": 256, "drain_timeout_s": 60.0})
    worker = create_worker(s, instance_id="i0", loaded=tiny)
    worker.runtime.start()
    try:
        worker.register()
        ids = []
        for _ in range(3):
            rec = RequestRecord(id=new_request_id(), prompt_ids=[5, 6, 7],
                                params=RequestParams(max_tokens=200, ignore_eos=True),
                                arrival=now(), model="tiny-random")
            store.submit(rec)
            ids.append(rec.id)
        admitted, queued = ids[:2], ids[2:]
        for rid in admitted:  # one at a time inside the engine: ~400 iterations to run
            store.claim_batch(f"b-{rid}", "i0", [rid], 200, now() + 600)
            assert worker.runtime.run_batch(f"b-{rid}")["status"] == "admitted"
        store.claim_batch("b-queued", "i0", queued, 200, now() + 600)
        assert worker.runtime.in_progress() == 2
        assert worker.drain() == 1  # only the batch that never started
    finally:
        worker.runtime.stop()
    for rid in admitted:
        rec = store.get_request(rid)
        assert rec.status is RequestStatus.FINISHED and len(rec.generated_ids) == 200
    (back,) = (store.get_request(rid) for rid in queued)
    assert back.status is RequestStatus.PENDING and back.retries == 0
    assert not store.is_instance_alive("i0")
