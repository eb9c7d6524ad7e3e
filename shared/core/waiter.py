"""One Redis connection that waits for every in-flight request's final event.

A blocking ``XREAD`` per waiting request would hold one Redis connection per open HTTP
request: a burst of a few hundred requests exhausts the pool ("Too many connections") and
thousands would exhaust the server's client limit. Instead, one task runs ``XREAD BLOCK``
over all watched event streams at once on its own connection and resolves each waiter's
future when its ``final`` entry appears. A newly registered stream interrupts the current
block with ``CLIENT UNBLOCK`` so it is watched at once (no added latency). Streams are read
from their start, so a final entry written before the waiter registered is still seen.

Streaming responses :meth:`EventWaiter.subscribe` instead: every entry of the stream (each
slice's text delta, then the final entry) is put in the subscriber's queue, over the same
connection.

Given a ``health`` check, a guard task watches the deployment's readiness while anyone
waits: once it has been lost for ``grace_s`` (no scheduler, no worker, no Redis), waits
raise :class:`Unready` and subscribers get ``{"kind": "closed", "error": ...}`` rather than
hanging until the request timeout. The requests themselves stay pending in Redis.
A Redis error (the connection drops during a Redis restart) never ends the loops: they log
it once, back off and reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from shared.core.connection import async_client
from shared.obs.logging import get_logger

log = get_logger(__name__)

_BLOCK_MS = 2_000  # longest block; registrations and events cut it short
# redis-py's connections time reads out after 5 s by default: the reader's must outlast
# its longest block, or an idle XREAD ends in a TimeoutError and a reconnect.
_READER_SOCKET_TIMEOUT_S = _BLOCK_MS / 1000 + 10
_RETRY_S = 0.5  # first back-off after a Redis error (the waiters keep waiting)
_RETRY_MAX_S = 4.0  # the back-off doubles up to this while Redis stays away
_GUARD_PERIOD_S = 1.0  # how often the guard checks readiness (at most; less for tiny graces)


class Unready(RuntimeError):
    """The deployment has not been ready for longer than the grace period: the wait for
    ``key`` ends; its request stays pending and goes on when the deployment recovers."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


@dataclass
class _Watch:
    last_id: str = "0"
    futures: list[asyncio.Future[dict[str, str]]] = field(default_factory=list)
    followers: list[asyncio.Queue[dict[str, str]]] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        return not self.futures and not self.followers


class EventWaiter:
    """Waits for ``final`` entries on many event streams over one connection."""

    def __init__(
        self,
        url: str,
        health: Callable[[], Awaitable[str | None]] | None = None,
        grace_s: float = 30.0,
    ) -> None:
        """``health`` answers None when the deployment is ready, else what is missing;
        without it waits end only with their final entry or their timeout."""
        self._url = url
        self._health = health
        self._grace_s = grace_s
        self._unready_since: float | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._redis_down = False  # logged once per outage
        self._watch: dict[str, _Watch] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reader: aioredis.Redis | None = None
        self._control: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._blocked_on: frozenset[str] = frozenset()
        self._closing = False

    async def start(self) -> None:
        """Prepare the clients; the reader loop starts with the first wait (so it runs in
        the loop that serves requests, and an idle server holds no blocked connection)."""
        # No transparent reconnect: the read loop must see a dropped connection, to learn
        # the new connection's client id (CLIENT UNBLOCK wakes the reader by it).
        self._reader = async_client(self._url, decode_responses=True,
                                    single_connection_client=True, reconnect=False,
                                    socket_timeout=_READER_SOCKET_TIMEOUT_S)
        self._control = async_client(self._url, decode_responses=True)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="event-waiter")
        if self._health is not None and (self._guard_task is None or self._guard_task.done()):
            self._guard_task = asyncio.create_task(self._guard(), name="event-waiter-guard")

    async def stop(self) -> None:
        """Stop the loop; pending waits are cancelled."""
        # redis-py may turn the cancellation of a blocked read into a RedisError: the flag
        # makes the loop end either way.
        self._closing = True
        if self._reader_id is not None and self._control is not None:
            with contextlib.suppress(RedisError):  # end a blocked read now, not in 5 s
                await self._control.client_unblock(self._reader_id)
        tasks = [t for t in (self._task, self._guard_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: shutdown must not hang on a connection stuck mid-handshake.
            await asyncio.wait(tasks, timeout=2.0)
        for watch in self._watch.values():
            for fut in watch.futures:
                fut.cancel()
            for queue in watch.followers:  # a streaming response ends instead of waiting
                queue.put_nowait({"kind": "closed"})
        self._watch.clear()
        for client in (self._reader, self._control):
            if client is not None:
                await client.aclose()

    @property
    def watching(self) -> int:
        """Streams being watched now."""
        return len(self._watch)

    async def wait(self, key: str, timeout_s: float) -> dict[str, str] | None:
        """The final entry of stream ``key``, or None after ``timeout_s``."""
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._watch.setdefault(key, _Watch()).futures.append(fut)
        self._ensure_running()
        await self._nudge(key)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            return None
        finally:
            self._forget(key, fut)

    async def subscribe(self, key: str) -> asyncio.Queue[dict[str, str]]:
        """A queue that receives every entry of stream ``key`` (read from its start when it
        is not watched yet), the ``final`` one last, until :meth:`unsubscribe`. If the
        waiter stops first, the queue gets ``{"kind": "closed"}``."""
        queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._watch.setdefault(key, _Watch()).followers.append(queue)
        self._ensure_running()
        await self._nudge(key)
        return queue

    def unsubscribe(self, key: str, queue: asyncio.Queue[dict[str, str]]) -> None:
        """Stop feeding ``queue``."""
        self._forget(key, queue)

    def _forget(self, key: str, waiter: object) -> None:
        """Drop a waiter's future or a subscriber's queue; unwatch ``key`` once none is left."""
        watch = self._watch.get(key)
        if watch is None:
            return
        for group in (watch.futures, watch.followers):
            if waiter in group:
                group.remove(waiter)  # type: ignore[arg-type]
        if watch.idle:
            del self._watch[key]

    async def _nudge(self, key: str) -> None:
        """Make the loop watch ``key`` now: interrupt a block that does not include it.

        CLIENT UNBLOCK answers 0 when the reader's XREAD has been sent but has not reached
        the server yet: retry briefly until it lands or the loop has moved on.
        """
        self._changed.set()
        for _ in range(100):
            blocked = self._blocked_on
            if not blocked or key in blocked or self._reader_id is None:
                return
            try:
                assert self._control is not None
                if await self._control.client_unblock(self._reader_id):
                    return
            except (RedisError, OSError):  # the reader's own error handling recovers
                return
            await asyncio.sleep(0.002)

    async def _run(self) -> None:
        assert self._reader is not None
        # The task copied the context of the request that started it: unbind that
        # request's id so the loop's own log lines are not attributed to it.
        structlog.contextvars.clear_contextvars()
        backoff = _RETRY_S
        while not self._closing:
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                # redis-py reconnects the reader on its next command; the new connection
                # has a new client id, which CLIENT UNBLOCK needs.
                self._reader_id = None
                if not self._redis_down:
                    log.warning("event_waiter_redis_error", error=str(exc),
                                retry_in_s=backoff, watching=len(self._watch))
                    self._redis_down = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_MAX_S)
                continue
            if self._redis_down:
                log.info("event_waiter_redis_back", watching=len(self._watch))
                self._redis_down = False
            backoff = _RETRY_S

    async def _guard(self) -> None:
        """While anyone waits, end the waits once readiness has been lost for the grace
        period; exits when nobody waits (the next wait starts it again)."""
        assert self._health is not None
        structlog.contextvars.clear_contextvars()
        loop = asyncio.get_running_loop()
        period = min(_GUARD_PERIOD_S, self._grace_s / 4)
        while not self._closing and self._watch:
            try:
                reason = await self._health()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed check is itself a sign of trouble
                reason = f"the readiness check failed: {exc!r}"
            if reason is None:
                if self._unready_since is not None:
                    log.info("deployment_ready_again")
                self._unready_since = None
            else:
                if self._unready_since is None:
                    log.warning("deployment_not_ready", missing=reason, grace_s=self._grace_s)
                    self._unready_since = loop.time()
                if loop.time() - self._unready_since >= self._grace_s:
                    self._fail_all(reason)
            await asyncio.sleep(period)

    def _fail_all(self, reason: str) -> None:
        """End every current wait with :class:`Unready` (the requests stay pending)."""
        message = (f"the deployment has not been ready for over {self._grace_s:g} s "
                   f"({reason}); the request stays pending and goes on when it recovers")
        log.warning("waits_ended_unready", waits=len(self._watch), missing=reason)
        watches, self._watch = self._watch, {}
        for key, watch in watches.items():
            for fut in watch.futures:
                if not fut.done():
                    fut.set_exception(Unready(message, key))
            for queue in watch.followers:
                queue.put_nowait({"kind": "closed", "error": message})

    async def _read_once(self) -> None:
        assert self._reader is not None
        if not self._watch:
            self._changed.clear()
            await self._changed.wait()
        self._changed.clear()
        streams = {key: watch.last_id for key, watch in self._watch.items()}
        self._blocked_on = frozenset(streams)
        try:
            reply = await self._reader.xread(streams, count=64, block=_BLOCK_MS)
        finally:
            self._blocked_on = frozenset()
        for key, entries in reply or []:
            self._deliver(key, entries)

    def _deliver(self, key: str, entries: list[tuple[str, dict[str, str]]]) -> None:
        watch = self._watch.get(key)
        if watch is None:
            return
        for entry_id, fields in entries:
            watch.last_id = entry_id
            for queue in watch.followers:
                queue.put_nowait(dict(fields))
            if fields.get("kind") == "final":
                for fut in watch.futures:
                    if not fut.done():
                        fut.set_result(dict(fields))
                return
