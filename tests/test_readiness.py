"""Readiness (issue 15): ``GET /health``, refusing new requests while no scheduler or worker
could serve them, ending waits once readiness has been lost for the grace period, and the
event waiter surviving Redis errors. A real Redis; the scheduler's leader lock and a
worker's registration are written through the real store API, as those services do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import structlog

from shared.core.embedded_redis import free_port, redis_server_binary
from shared.core.keys import Keys
from shared.core.readiness import MAX_ERROR_CHARS, describe_error
from shared.core.records import InstanceInfo, now
from shared.core.states import RequestStatus
from shared.core.store import Store, connect
from shared.core.waiter import EventWaiter
from shared.settings import Settings
from tests.helpers import serve
from tests.test_ingest import assert_error, play_worker

pytestmark = pytest.mark.anyio

BODY = {"prompt": "Hello", "max_tokens": 4}


def make_ready(store: Store) -> None:
    """A scheduler leader and one live worker instance, as the real services write them."""
    assert store.acquire_or_renew_leader("scheduler-a", ttl_s=30)
    info = InstanceInfo(id="w0", queue="scls-w0", device="cpu", model="tiny-random",
                        memory_budget_bytes=1 << 30, kv_bytes_per_token=64,
                        context_limit=4096, started_at=now(), heartbeat_at=now(),
                        profile="{}")
    store.register_instance(info, ttl_s=30)


async def health_until(
    http: httpx.AsyncClient, status: int, key: str = "status", value: object = None,
    timeout_s: float = 3.0,
) -> dict:
    """The /health body once it answers ``status`` (and ``key`` is ``value`` when given);
    the answer is cached for a moment, so a change shows within about a second."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await http.get("/health")
        ok = resp.status_code == status and (value is None or resp.json()[key] == value)
        if ok or time.monotonic() > deadline:
            assert ok, resp.text
            return dict(resp.json())
        await asyncio.sleep(0.05)


async def test_health_needs_a_leader_and_a_live_instance(
    settings: Settings, store: Store
) -> None:
    async with serve(settings) as http:
        body = await health_until(http, 503)
        assert body["status"] == "not ready"
        assert (body["redis"], body["scheduler"], body["instances"]) == ("ok", None, 0)
        assert "no scheduler holds the leader lock" in body["missing"]
        assert (await http.get("/healthz")).status_code == 200  # liveness is unchanged
        store.acquire_or_renew_leader("scheduler-a", ttl_s=30)
        body = await health_until(http, 503, "scheduler", "scheduler-a")
        assert "no live worker" in body["missing"]  # a leader alone is not enough
        make_ready(store)
        body = await health_until(http, 200)
        assert body == {"status": "ok", "redis": "ok", "scheduler": "scheduler-a",
                        "instances": 1, "draining": 0}
        store.deregister_instance("w0")  # the worker left: not ready again
        assert (await health_until(http, 503))["missing"] == "no live worker instance"


async def test_health_is_503_when_redis_is_down(settings: Settings) -> None:
    async with serve(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})) as http:
        resp = await http.get("/health")
    assert resp.status_code == 503
    assert resp.json()["redis"] != "ok" and "Redis does not answer" in resp.json()["missing"]


def _start_refusing_redis(port: int, *args: str) -> subprocess.Popen[bytes]:
    """A redis-server that accepts connections but refuses commands (``args``: e.g.
    ``--requirepass``); started once its port accepts a connection."""
    proc = subprocess.Popen(
        [str(redis_server_binary()), "--port", str(port), "--save", "", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


async def _health_of_refusing_redis(settings: Settings, host: str, *args: str) -> Any:
    """``GET /health`` of an ingest whose Redis (started with ``args``) is reached at
    ``host`` and refuses it."""
    port = free_port()
    proc = _start_refusing_redis(port, *args)
    try:
        url = f"redis://{host}:{port}/0"
        async with serve(settings.model_copy(update={"redis_url": url})) as http:
            return await http.get("/health")
    finally:
        proc.kill()
        proc.wait()


async def test_health_names_the_servers_answer_when_redis_refuses(settings: Settings) -> None:
    """A Redis that answers with an error (here NOAUTH: it wants a password) is reported
    with the server's message, not only the error's class (redis-py 8's repr,
    ``auth:AuthenticationError``, drops it)."""
    resp = await _health_of_refusing_redis(settings, "127.0.0.1",
                                           "--requirepass", "not-the-one-we-send")
    assert resp.status_code == 503
    body = resp.json()
    # The server's NOAUTH text (to HELLO, which redis-py 8 sends first, or to the command).
    assert body["redis"].startswith("AuthenticationError: ")
    assert "authenticat" in body["redis"].removeprefix("AuthenticationError: ").lower()
    assert body["missing"] == f"Redis does not answer ({body['redis']})"


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_health_names_the_protected_mode_denial(settings: Settings) -> None:
    """The symptom of issue 23: a Redis in protected mode (no password, default bind) answers
    a client from another address with DENIED and how to fix it; /health shows that text."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address to connect from")
    resp = await _health_of_refusing_redis(settings, address, "--protected-mode", "yes")
    assert resp.status_code == 503
    body = resp.json()
    assert body["redis"].startswith("ResponseError: DENIED Redis is running in protected mode")
    assert "protected-mode no" in body["missing"] and "\n" not in body["missing"]


def test_describe_error_keeps_the_message_on_one_line() -> None:
    denied = redis.ResponseError("DENIED Redis is running\nin protected mode")
    assert describe_error(denied) == "ResponseError: DENIED Redis is running in protected mode"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert len(describe_error(redis.ResponseError("x" * 5000))) == MAX_ERROR_CHARS


async def test_new_requests_get_503_while_unready_and_nothing_is_stored(
    settings: Settings, store: Store, rclient: redis.Redis
) -> None:
    rejecting = settings.model_copy(update={"reject_when_unready": True,
                                            "request_timeout_s": 0.5})
    async with serve(rejecting) as http:
        for path, body in (("/v1/completions", BODY),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "stream": True})):
            resp = await http.post(path, json=body)
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"] == "5"
            error = resp.json()["error"]
            assert error["code"] == "not_ready" and "nothing was stored" in error["message"]
            assert "no scheduler holds the leader lock" in error["message"]
        assert rclient.keys("*") == []  # not a request hash, not a pending entry
        make_ready(store)
        await health_until(http, 200)
        resp = await http.post("/v1/completions", json=BODY)  # accepted; no worker runs it
        assert resp.status_code == 504, resp.text
    assert len(store.pending_ids(10)) == 1


async def test_waits_end_after_the_grace_period_once_the_scheduler_is_gone(
    settings: Settings, store: Store
) -> None:
    """Accepted while ready; then the scheduler dies (its lock expires) and no worker is
    left: the waiting client gets 503 after the grace period, not after the request
    timeout, and the request is still pending, to go on when the deployment recovers."""
    quick = settings.model_copy(update={"reject_when_unready": True, "unready_grace_s": 0.5,
                                        "request_timeout_s": 60})
    make_ready(store)
    async with serve(quick) as http:
        await health_until(http, 200)
        started = time.monotonic()
        waiting = asyncio.create_task(http.post("/v1/completions", json=BODY))
        while not store.pending_ids(10):
            await asyncio.sleep(0.01)
        rid = store.pending_ids(10)[0]
        store.r.delete(store.keys.leader)  # the scheduler died and its lock expired
        resp = await waiting
        elapsed = time.monotonic() - started
    assert resp.status_code == 503, resp.text
    assert 0.5 <= elapsed < 5.0
    assert resp.headers["X-Request-Id"] == rid
    message = resp.json()["error"]["message"]
    assert "no scheduler holds the leader lock" in message
    assert "stays pending" in message and f"GET /v1/requests/{rid}" in message
    record = store.get_request(rid)
    assert record is not None and record.status is RequestStatus.PENDING
    assert store.pending_ids(10) == [rid]


async def test_a_draining_worker_refuses_new_work_but_keeps_waits_alive(
    settings: Settings, store: Store
) -> None:
    """The only worker drains (it finishes what it runs): /health is 503 and new requests
    are refused, but waiting clients are not failed while it lives; once it is gone they
    are, after the grace period."""
    quick = settings.model_copy(update={"reject_when_unready": True, "unready_grace_s": 0.3,
                                        "request_timeout_s": 60})
    make_ready(store)
    async with serve(quick) as http:
        await health_until(http, 200)
        waiting = asyncio.create_task(http.post("/v1/completions", json=BODY))
        while not store.pending_ids(10):
            await asyncio.sleep(0.01)
        assert store.heartbeat("w0", ttl_s=30, state="draining")
        body = await health_until(http, 503, "draining", 1)
        assert body["missing"] == "no live worker instance (1 draining)"
        refused = await http.post("/v1/completions", json=BODY)
        assert_error(refused, 503, "no live worker instance (1 draining)")
        await asyncio.sleep(1.0)  # > grace: a draining worker still counts for waits
        assert not waiting.done()
        store.deregister_instance("w0")
        resp = await waiting
    assert_error(resp, 503, "has not been ready", "no live worker instance")
    assert len(store.pending_ids(10)) == 1  # only the accepted one, still pending


async def test_a_stream_ends_with_an_error_event_after_the_grace_period(
    settings: Settings, store: Store
) -> None:
    quick = settings.model_copy(update={"unready_grace_s": 0.3, "request_timeout_s": 60})
    async with serve(quick) as http:  # not ready, and accepting: the waiter's guard ends it
        started = time.monotonic()
        async with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - started
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert "has not been ready" in error["message"] and "no live worker" in error["message"]
    assert elapsed < 5.0
    assert len(store.pending_ids(10)) == 1  # the request was not cancelled


async def test_the_waiter_survives_a_dropped_connection(
    redis_url: str, rclient: redis.Redis
) -> None:
    """The reader's connection is killed mid-XREAD (as in a Redis restart): the loop backs
    off, reconnects with a new client id and still delivers the final entry."""
    waiter = EventWaiter(redis_url)
    await waiter.start()
    try:
        waiting = asyncio.create_task(waiter.wait("ev:1", 10.0))
        while waiter._reader_id is None or not waiter._blocked_on:
            await asyncio.sleep(0.01)
        first_id = waiter._reader_id
        with structlog.testing.capture_logs() as logs:
            assert rclient.client_kill_filter(_id=str(first_id)) == 1
            await asyncio.sleep(0.1)
            rclient.xadd("ev:1", {"kind": "final", "n": "1"})
            assert await waiting == {"kind": "final", "n": "1"}
        events = [e["event"] for e in logs]
        assert events.count("event_waiter_redis_error") == 1, events  # logged once
        assert "event_waiter_redis_back" in events
        assert waiter._reader_id not in (None, first_id)  # a new connection
        rclient.xadd("ev:2", {"kind": "final", "n": "2"})
        assert await waiter.wait("ev:2", 5.0) == {"kind": "final", "n": "2"}
    finally:
        await waiter.stop()


def _start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """A redis-server with an append-only file in ``folder``, so a restart keeps the data."""
    proc = subprocess.Popen(
        [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(folder), "--appendonly", "yes", "--save", "", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                client.close()
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


async def test_a_waiting_request_survives_a_redis_restart(
    settings: Settings, tmp_path: Path
) -> None:
    """Redis restarts (every connection of the ingest drops) while a client waits: the
    waiter reconnects, the final entry written after the restart reaches the client, and
    /health is ready again."""
    port = free_port()
    proc = _start_redis(port, tmp_path)
    local = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0",
                                        "request_timeout_s": 30})
    store = Store(connect(local.redis_url or ""), Keys(local.key_prefix))
    try:
        make_ready(store)
        async with serve(local) as http:
            await health_until(http, 200)
            waiting = asyncio.create_task(http.post("/v1/completions", json=BODY))
            while not store.pending_ids(10):
                await asyncio.sleep(0.01)
            with contextlib.suppress(redis.ConnectionError):
                store.r.shutdown()  # saves the append-only file, drops every connection
            proc.wait(timeout=10)
            await asyncio.sleep(0.3)  # the ingest's reader notices and backs off
            proc = _start_redis(port, tmp_path)
            rid = await play_worker(store, "Hello there")
            resp = await waiting
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"] == "Hello there"
            assert resp.headers["X-Request-Id"] == rid
            await health_until(http, 200)
    finally:
        store.close()
        proc.kill()
        proc.wait()
