"""Fault survival of the scheduler and the workers, and JSON logs (issue 15; an operator's
chaos test: tiny-random model, 3 workers, Redis with AOF).

* a worker whose heartbeat fails past the instance TTL takes no job and fails ``/livez``;
  it re-registers and serves again once Redis answers; RQ's loop survives the outage;
* a worker restarting under the same id hands the previous run's batches back at once;
* ``SCLS_LOG_FORMAT=json``: every stderr line of every service is one JSON object;
* SIGTERM ends the scheduler and a worker within seconds while Redis is paused or gone,
  and ends ``scls up`` and its children while it is still starting them.

Real Redis servers (a test that stops one starts its own), the real tiny model, real
subprocesses for the signal tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue

from services.launcher import settings_env
from services.scheduler.service import create_scheduler
from services.worker.service import create_worker
from shared.core.embedded_redis import EmbeddedRedis, free_port
from shared.core.keys import Keys
from shared.core.store import Store, connect
from shared.modeling.loading import LoadedModel
from shared.obs.prometheus import serve_metrics
from shared.policy.types import BatchPlan
from shared.settings import Settings
from tests.helpers import greedy_reference, wait_for
from tests.test_system import drive, make_cluster, places, submit

ROOT = Path(__file__).resolve().parents[1]


def livez(port: int) -> tuple[int, dict[str, object]]:
    """Status and JSON body of the worker's ``GET /livez``."""
    reply = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)
    return reply.status_code, reply.json()


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` parsed as one JSON object (fails on the first that is not)."""
    out = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- all:\n{text[-4000:]}") from None
        assert isinstance(parsed, dict), line
        out.append(parsed)
    return out


@pytest.fixture()
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis server of this test's own (it may be stopped, paused or killed)."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        pid = redis_pid_of(server)
        if pid:
            os.kill(pid, signal.SIGCONT)
        server.stop()


def redis_pid_of(server: EmbeddedRedis) -> int | None:
    """The redis-server's pid, as it reports it (None when it does not answer)."""
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    try:
        return int(client.info("server")["process_id"])
    except redis.RedisError:
        return None
    finally:
        client.close()


@contextmanager
def redis_paused(pid: int) -> Iterator[None]:
    """SIGSTOP the redis-server: connections stay open, nothing answers (a hung server or
    a network partition, the case that blocks a client without timeouts)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# --- 1. zombie workers ------------------------------------------------------------------------


def dispatch_one(settings: Settings, store: Store, instance: str, rid: str) -> str:
    """Claim ``rid`` into a batch on ``instance`` and enqueue its job, as a scheduler cycle
    does (the scheduler's own dispatch; its planning would skip an expired instance)."""
    sched = create_scheduler(settings)
    rec = store.get_request(rid)
    plan = BatchPlan(instance, (rid,), padded_len=len(rec.prompt_ids),
                     slice_length=settings.slice_length, estimated_s=0.01, estimated_bytes=1)
    batch_id = sched._dispatch(plan)
    assert batch_id
    return batch_id


def test_a_worker_with_a_stale_heartbeat_takes_no_job_and_fails_livez(
    settings: Settings, tiny: LoadedModel, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis answers RQ but not the heartbeat (the error is injected into that one call):
    past the instance TTL the instance is dead to the scheduler, so the worker must not
    start the job queued for it, and its liveness must fail; once the heartbeat succeeds it
    re-registers (its hash expired), /livez recovers and the job runs."""
    s = settings.model_copy(update={"heartbeat_interval_s": 0.1, "instance_ttl_s": 1.0})
    worker = create_worker(s, instance_id="z0", loaded=tiny)
    real_heartbeat = worker.store.heartbeat
    broken = threading.Event()

    def heartbeat(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if broken.is_set():
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return real_heartbeat(*args, **kwargs)

    monkeypatch.setattr(worker.store, "heartbeat", heartbeat)
    exporter = serve_metrics(worker.metrics.registry, 0, "127.0.0.1", health=worker.liveness)
    worker.register()
    loop = threading.Thread(target=worker.serve, name="serve", daemon=True)
    loop.start()
    try:
        assert livez(exporter.port)[0] == 200
        broken.set()
        wait_for("/livez 503", lambda: livez(exporter.port)[0] == 503, 5)
        status, body = livez(exporter.port)
        assert body["status"] == "stale" and "ConnectionError" in str(body["last_error"])
        assert float(body["heartbeat_age_s"]) > s.instance_ttl_s  # type: ignore[arg-type]
        wait_for("instance hash expired", lambda: not store.is_instance_alive("z0"), 5)

        rid = submit(store, [5, 6, 7], max_tokens=4)
        batch_id = dispatch_one(s, store, "z0", rid)
        time.sleep(1.5)  # more than a poll of the job loop
        assert store.get_batch(batch_id).status == "queued"  # not started by the zombie
        assert Queue(worker.runtime.queue_name, connection=worker.rq_connection).count == 1
        assert loop.is_alive()

        broken.clear()
        wait_for("re-registered", lambda: store.is_instance_alive("z0"), 5)
        wait_for("/livez 200", lambda: livez(exporter.port)[0] == 200, 5)
        wait_for("the job ran", lambda: store.get_request(rid).status.value == "finished", 20)
        assert store.get_batch(batch_id).status == "committed"
    finally:
        worker.stop()
        loop.join(timeout=10)
        worker._stop_heartbeating()
        exporter.close()
    assert not loop.is_alive(), "stop() from another thread did not end serve()"


def test_the_job_loop_survives_a_redis_outage_and_serves_after_it(
    own_redis: EmbeddedRedis, settings: Settings, tiny: LoadedModel
) -> None:
    """Redis stops answering for longer than the RQ connection's timeout and the instance
    TTL: RQ's work loop ends with a Redis error and is started again after a back-off, the
    liveness fails meanwhile, and once Redis is back the instance re-registers and the
    next request is served by the same serve() call."""
    s = settings.model_copy(update={"redis_url": own_redis.url, "key_prefix": "out:",
                                    "heartbeat_interval_s": 0.2, "instance_ttl_s": 2.0})
    store = Store(connect(own_redis.url), Keys(s.key_prefix))
    worker = create_worker(s, instance_id="o0", loaded=tiny)
    exporter = serve_metrics(worker.metrics.registry, 0, "127.0.0.1", health=worker.liveness)
    worker.register()
    loop = threading.Thread(target=worker.serve, name="serve", daemon=True)
    loop.start()
    pid = redis_pid_of(own_redis)
    assert pid
    try:
        wait_for("RQ's loop started", lambda: worker._rq_runs == 1 and worker.rq_worker
                 is not None and worker.rq_worker.get_state() == "idle", 20)
        with redis_paused(pid):
            wait_for("/livez 503 during the outage", lambda: livez(exporter.port)[0] == 503, 15)
            wait_for("RQ's loop ended on the outage", lambda: worker._loop_error is not None, 15)
            assert loop.is_alive()
        wait_for("re-registered", lambda: store.is_instance_alive("o0"), 15)
        wait_for("/livez 200", lambda: livez(exporter.port)[0] == 200, 10)
        wait_for("RQ's loop resumed", lambda: worker._loop_error is None, 20)
        assert worker._rq_runs >= 2  # restarted, not just paused inside one run

        rid = submit(store, [5, 6, 7], max_tokens=4)
        sched = create_scheduler(s)
        wait_for("served after the outage",
                 lambda: sched.cycle() and store.get_request(rid).status.value == "finished",
                 30)
    finally:
        worker.stop()
        loop.join(timeout=10)
        worker._stop_heartbeating()
        exporter.close()
        store.close()
    assert not loop.is_alive()


def test_a_resumed_job_loop_hands_back_the_batches_the_outage_took_off_its_queue(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """RQ took batch A off w0's queue and started it, then Redis failed and RQ's loop
    ended before the slice committed; batch B's job is still queued. When the loop starts
    again, A goes back to pending at once (fenced, one retry: it had started) and B is
    left to run; then both requests complete with transformers' greedy tokens. Without
    this A would wait for its deadline on a live instance (a chaos run lost two requests
    that way: 'running' 90 s after the faults)."""
    s = settings.model_copy(update={"max_queued_batches": 4, "horizon_s": 1e6})
    sched, (worker,) = make_cluster(s, tiny)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    rids = [submit(store, p, max_tokens=8, ignore_eos=True) for p in prompts]
    batch_a = dispatch_one(s, store, "w0", rids[0])
    batch_b = dispatch_one(s, store, "w0", rids[1])
    queue = Queue(worker.runtime.queue_name, connection=worker.rq_connection)
    queue.remove(batch_a)  # RQ took it off the queue ...
    assert store.start_batch(batch_a, time.time() + 300)  # ... and started the slice
    fence = store.get_request(rids[0]).fence

    worker._loop_error = "ConnectionError: the outage"  # what serve() records
    worker._rq_started()  # the next RQ run starts

    a, b = store.get_request(rids[0]), store.get_request(rids[1])
    assert a.status.value == "pending" and a.fence > fence and a.retries == 1
    assert store.get_batch(batch_a).status == "requeued"
    assert b.status.value == "running" and b.batch == batch_b
    assert queue.get_job_ids() == [batch_b]
    assert worker._loop_error is None
    assert worker.hand_back_interrupted() == 0  # nothing else is off the queue
    drive(store, sched, [worker], rids)
    for prompt, rid in zip(prompts, rids, strict=True):
        rec = store.get_request(rid)
        assert rec.status.value == "finished"
        assert rec.generated_ids == greedy_reference(tiny, prompt, 8)


@pytest.mark.parametrize("policy", ["ils", "ils-hf"])
def test_an_ils_request_that_finishes_while_redis_is_away_is_committed_after(
    settings: Settings, tiny: LoadedModel, own_redis: EmbeddedRedis, policy: str
) -> None:
    """The engine finishes a request during an outage: its commit is kept and retried, the
    request stays admitted meanwhile, and it ends finished with generate()'s tokens once
    Redis answers. (A chaos run under ils-vllm lost a request this way: the collector
    dropped the result whose commit the dead Redis refused.)"""
    s = settings.model_copy(update={"redis_url": own_redis.url, "policy": policy})
    store = Store(connect(own_redis.url), Keys(s.key_prefix))
    worker = create_worker(s, instance_id="w0", loaded=tiny)
    store.register_instance(worker.runtime.instance_info(), ttl_s=600)
    worker.runtime.start()
    try:
        rid = submit(store, [5, 6, 7, 8], max_tokens=300, ignore_eos=True)
        batch = dispatch_one(s, store, "w0", rid)
        Queue(worker.runtime.queue_name, connection=worker.rq_connection).remove(batch)
        pid = redis_pid_of(own_redis)
        assert pid is not None
        assert worker.runtime.run_batch(batch)["status"] == "admitted"
        with redis_paused(pid):  # at once: 300 decode steps are still to run
            wait_for("the engine finished", lambda: not worker.runtime.ils.active(), 60)
            time.sleep(2.5)  # a commit attempt times out (2 s): the result is kept
            assert worker.runtime.in_progress() == 1
        wait_for("committed after the outage", lambda: store.get_request(rid).status.value
                 == "finished", 30)
        assert len(store.get_request(rid).generated_ids) == 300
        assert worker.runtime.in_progress() == 0
    finally:
        worker.runtime.stop()
        store.close()


# --- 2. restart under the same id -------------------------------------------------------------


def test_a_restart_under_the_same_id_hands_the_previous_runs_batches_back(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """worker-0 crashed with one batch running and one queued; its pod comes back as
    worker-0: at registration both batches go back to pending at once (fenced; the running
    one counts a retry, as the sweep would count it), its RQ queue is emptied, and then
    every request completes with exactly transformers' greedy tokens, none lost or doubled."""
    s = settings.model_copy(update={"max_batch_size": 2, "max_queued_batches": 2,
                                    "horizon_s": 1e6})
    sched, (old,) = make_cluster(s, tiny)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    rids = [submit(store, p, max_tokens=8, ignore_eos=True) for p in prompts]
    report = sched.cycle()
    assert len(report.batches) == 2
    running, queued = report.batches
    assert store.start_batch(running, time.time() + 300)  # the old run was mid-slice
    fences = {rid: store.get_request(rid).fence for rid in rids}
    queue = Queue(old.runtime.queue_name, connection=old.rq_connection)
    assert queue.count == 2
    # ... and died there (no drain). Its instance hash still lives (TTL not yet over).

    new = create_worker(s, instance_id="w0", loaded=tiny)
    new.register()
    try:
        for rid in rids:
            rec = store.get_request(rid)
            assert rec.status.value == "pending" and rec.batch == ""
            assert rec.fence > fences[rid]  # a late commit of the old run is rejected
            assert places(store, rid) == 1
        retried = {rid for rid in rids if store.get_request(rid).retries == 1}
        assert retried == set(store.get_batch(running).request_ids)
        assert store.get_batch(running).status == "requeued"
        assert store.get_batch(queued).status == "requeued"
        assert store.instance_batch_count("w0") == 0
        assert store.inflight_batches() == []
        assert queue.count == 0
    finally:
        new._stop_heartbeating()
    drive(store, sched, [new], rids)
    for prompt, rid in zip(prompts, rids, strict=True):
        rec = store.get_request(rid)
        assert rec.status.value == "finished"
        assert rec.generated_ids == greedy_reference(tiny, prompt, 8)


# --- 3. JSON logs -----------------------------------------------------------------------------

LOGGING_SCRIPT = textwrap.dedent("""
    import logging, sys, threading, warnings
    from shared.obs.logging import configure_logging, get_logger

    early = get_logger("early")  # made at import time, before the configuration (every module)
    configure_logging("json", "INFO", service="probe")
    early.debug("hidden_debug")
    early.info("structlog_info", n=1)
    from rq.logutils import setup_loghandlers
    setup_loghandlers("INFO", name="rq.worker")  # what RQ's Worker.work() does
    logging.getLogger("rq.worker").info("rq says %s", "hello")
    logging.getLogger("uvicorn.error").warning("uvicorn warns")
    logging.getLogger("redis").info("library info below WARNING: hidden")
    warnings.warn("a python warning")
    try:
        1 / 0
    except ZeroDivisionError:
        early.exception("structlog_exception")
        logging.getLogger("rq.worker").exception("stdlib_exception")
    worker = threading.Thread(target=lambda: {}["missing"], name="crasher")
    worker.start()
    worker.join()
    raise RuntimeError("uncaught in main")
""")


def test_json_logs_every_line_one_object_tracebacks_inside(tmp_path: Path) -> None:
    """The logging set-up alone, in a subprocess: structlog lines (from a logger made before
    the configuration), RQ's and other stdlib loggers, a Python warning and exceptions
    (caught and logged, uncaught in a thread and in the main thread) all come out as one
    JSON object per stderr line; no debug line at INFO; nothing on stdout."""
    proc = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1  # the uncaught exception
    assert proc.stdout == ""  # RQ installed no handler of its own (it writes to stdout)
    lines = json_lines(proc.stderr)
    events = {str(line["event"]): line for line in lines}
    assert "hidden_debug" not in events and all(line["level"] != "debug" for line in lines)
    assert "library info below WARNING: hidden" not in events
    assert events["structlog_info"]["logger"] == "early"
    assert events["structlog_info"]["service"] == "probe"
    assert events["rq says hello"]["logger"] == "rq.worker"
    assert events["uvicorn warns"]["level"] == "warning"
    assert any("a python warning" in event for event in events)
    for name, error in (("structlog_exception", "ZeroDivisionError"),
                        ("stdlib_exception", "ZeroDivisionError")):
        assert "Traceback (most recent call last)" in str(events[name]["exception"])
        assert error in str(events[name]["exception"])
    uncaught = [line for line in lines if line["event"] == "uncaught_exception"]
    assert len(uncaught) == 2
    assert "KeyError" in str(uncaught[0]["exception"]) and uncaught[0]["thread"] == "crasher"
    assert "RuntimeError: uncaught in main" in str(uncaught[1]["exception"])


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment ``scls up`` gives a child, JSON logs, plus ``extra``."""
    return {**os.environ, **settings_env(settings), "SCLS_LOG_FORMAT": "json", **extra}


def test_the_ingest_logs_json_lines(redis_url: str, tmp_path: Path) -> None:
    """``scls ingest`` (uvicorn's loggers included) writes only JSON lines to stderr."""
    s = Settings(redis_url=redis_url, model="tiny-random", cache_dir=tmp_path / "cache",
                 port=free_port(), key_prefix="ingestlog:")
    err = tmp_path / "ingest.err"
    with err.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest"], cwd=ROOT,
                                env=service_env(s), stdout=subprocess.DEVNULL, stderr=out)
    try:
        def answers() -> bool:
            assert proc.poll() is None, err.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{s.port}/metrics", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_for("ingest answers", answers, 60)
        httpx.get(f"http://127.0.0.1:{s.port}/no-such-path", timeout=5)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal it caught (exit status -SIGTERM)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    json_lines(err.read_text())


# --- 4. SIGTERM while Redis is down -----------------------------------------------------------

#: How soon a SIGTERM must end a service whose Redis is stopped (the operator's chaos test
#: found them running 13 s later). Worst case, a worker: RQ's teardown call times out (2 s),
#: the drain's first call too (2 s) while the heartbeat thread ends its own; then the exit,
#: on a machine whose cores other tests share.
EXIT_WITHIN_S = 8.0


def stop_with_redis_down(proc: subprocess.Popen[bytes], redis_pid: int, how: str,
                         hold_s: float = 1.0) -> float:
    """Take Redis down (``paused``: SIGSTOP, every call blocks; ``killed``: every connect
    is refused), let the service run into it for ``hold_s``, SIGTERM it; the seconds it
    took to exit (a paused Redis resumes only after)."""
    with redis_paused(redis_pid) if how == "paused" else nullcontext():
        if how == "killed":
            os.kill(redis_pid, signal.SIGKILL)
        time.sleep(hold_s)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        took = time.monotonic() - signalled
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return took


REDIS_DOWN = ("paused", "killed")


@pytest.mark.parametrize("how", REDIS_DOWN)
def test_sigterm_ends_the_scheduler_while_redis_is_down(
    own_redis: EmbeddedRedis, tmp_path: Path, how: str
) -> None:
    s = Settings(redis_url=own_redis.url, model="tiny-random", cache_dir=tmp_path / "cache",
                 metrics_port=0, key_prefix="sched:")
    store = Store(connect(own_redis.url), Keys(s.key_prefix))
    err = tmp_path / "scheduler.err"
    with err.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "scheduler"], cwd=ROOT,
                                env=service_env(s), stdout=subprocess.DEVNULL, stderr=out)
    try:
        wait_for("scheduler leads", lambda: store.leader() is not None, 60)
        pid = redis_pid_of(own_redis)
        assert pid
        took = stop_with_redis_down(proc, pid, how)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.close()
    text = err.read_text()
    assert took < EXIT_WITHIN_S, f"exited after {took:.1f} s\n{text[-3000:]}"
    events = [line["event"] for line in json_lines(text)]
    assert "scheduler_stopped" in events


@pytest.mark.parametrize("how", REDIS_DOWN)
def test_sigterm_ends_a_worker_while_redis_is_down(
    own_redis: EmbeddedRedis, tmp_path: Path, how: str
) -> None:
    """An idle worker whose Redis stops answering (or is gone) exits promptly on SIGTERM,
    skipping the hand-back that needs Redis; every stderr line it wrote (RQ's included) is
    JSON."""
    s = Settings(redis_url=own_redis.url, model="tiny-random", cache_dir=tmp_path / "cache",
                 metrics_port=0, key_prefix="wterm:", profile_mode="analytic", torch_threads=1,
                 heartbeat_interval_s=0.5, instance_ttl_s=5.0)
    store = Store(connect(own_redis.url), Keys(s.key_prefix))
    err = tmp_path / "worker.err"
    with err.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--instance-id", "t0"], cwd=ROOT,
            env=service_env(s), stdout=subprocess.DEVNULL, stderr=out)
    try:
        def registered() -> bool:
            assert proc.poll() is None, err.read_text()[-3000:]
            return store.is_instance_alive("t0")

        wait_for("worker registered", registered, 180)
        time.sleep(0.5)  # into RQ's loop
        pid = redis_pid_of(own_redis)
        assert pid
        took = stop_with_redis_down(proc, pid, how, hold_s=1.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.close()
    text = err.read_text()
    assert took < EXIT_WITHIN_S, f"exited after {took:.1f} s\n{text[-3000:]}"
    assert proc.returncode == 0, text[-3000:]
    events = [line["event"] for line in json_lines(text)]
    assert "instance_registered" in events and "drain_skipped" in events


def child_pids(parent: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``parent``, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_sigterm_while_scls_up_starts_stops_its_children(redis_url: str, tmp_path: Path) -> None:
    """``scls up`` runs each child in a session of its own (a terminal's Ctrl-C reaches only
    the launcher): a SIGTERM while it waits for them to be ready must stop them and exit,
    not leave them running orphaned."""
    env = {**os.environ, "SCLS_REDIS_URL": redis_url, "SCLS_KEY_PREFIX": "up:",
           "SCLS_MODEL": "tiny-random", "SCLS_CACHE_DIR": str(tmp_path / "cache"),
           "SCLS_PROFILE_MODE": "analytic", "SCLS_WORKERS": "1", "SCLS_PORT": "0",
           "SCLS_METRICS_PORT": "0", "SCLS_TORCH_THREADS": "1", "SCLS_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for("ingest, scheduler and worker started", lambda: len(child_pids(proc.pid)) >= 3,
                 120)
        children = child_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [pid for pid in children if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    for pid in left:  # do not leak them into other tests
        os.kill(pid, signal.SIGKILL)
    assert not left, "children left running after the launcher exited"
    json_lines(proc.stderr.read().decode() if proc.stderr else "")
