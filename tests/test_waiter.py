"""The ingest's EventWaiter: one connection waits for many requests' final events."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

from shared.core.waiter import EventWaiter

pytestmark = pytest.mark.anyio


async def test_many_waiters_share_one_connection(redis_url: str, rclient: redis.Redis) -> None:
    """600 concurrent waits (more than redis-py's default pool of 100 connections, the
    cause of "Too many connections" under a burst) all resolve, in about the time of the
    slowest, while the waiter adds one client to the server."""
    waiter = EventWaiter(redis_url)
    await waiter.start()
    writer = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=8,
                                                 decode_responses=True))
    clients_before = len(rclient.client_list())

    async def finish(i: int) -> None:
        await asyncio.sleep(0.001 * i)
        await writer.xadd(f"ev:{i}", {"kind": "slice", "delta": "a"})
        await writer.xadd(f"ev:{i}", {"kind": "final", "n": str(i)})

    try:
        tasks = [asyncio.create_task(finish(i)) for i in range(600)]
        started = time.perf_counter()
        results = await asyncio.gather(*(waiter.wait(f"ev:{i}", 10.0) for i in range(600)))
        elapsed = time.perf_counter() - started
        assert [r["n"] if r else None for r in results] == [str(i) for i in range(600)]
        assert elapsed < 5.0
        assert len(rclient.client_list()) - clients_before <= 2 + 8  # reader, control, pool
        assert waiter.watching == 0
        await asyncio.gather(*tasks)
    finally:
        await waiter.stop()
        await writer.aclose()


async def test_a_final_written_before_the_wait_is_seen_and_timeouts_return_none(
    redis_url: str, rclient: redis.Redis
) -> None:
    rclient.xadd("ev:early", {"kind": "final", "n": "early"})
    waiter = EventWaiter(redis_url)
    await waiter.start()
    try:
        assert (await waiter.wait("ev:early", 2.0)) == {"kind": "final", "n": "early"}
        started = time.perf_counter()
        assert await waiter.wait("ev:never", 0.3) is None
        assert 0.25 < time.perf_counter() - started < 2.0
        # a slice entry alone is not the end
        rclient.xadd("ev:half", {"kind": "slice"})
        assert await waiter.wait("ev:half", 0.3) is None
    finally:
        started = time.perf_counter()
        await waiter.stop()
        assert time.perf_counter() - started < 1.0  # a blocked read is cut short
