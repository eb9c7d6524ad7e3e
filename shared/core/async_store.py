"""The async face of the store, for the ingest (docs/design.md §5).

The same keys (:class:`~shared.core.keys.Keys`), records and Lua scripts as the synchronous
:class:`~shared.core.store.Store` (``submit_call``/``cancel_call`` build both faces'
arguments), on a ``redis.asyncio`` client that decodes responses to str. Waiting for a
request's events goes through :class:`~shared.core.waiter.EventWaiter`, on its own
connection.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.core.connection import async_blocking_client
from shared.core.keys import Keys
from shared.core.records import RequestRecord
from shared.core.store import CancelOutcome, cancel_call, cancel_outcome, lua_source, submit_call


class AsyncStore:
    """The ingest's view of Redis: submit, cancel and read requests, ping, count pending."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self.keys = keys
        self._submit = client.register_script(lua_source("submit"))
        self._cancel = client.register_script(lua_source("cancel"))

    @classmethod
    def open(cls, url: str, keys: Keys, max_connections: int = 64) -> AsyncStore:
        """A store on a blocking pool of ``max_connections`` to ``url``.

        Blocking: a burst of requests queues for a connection for up to 10 s instead of
        failing with "Too many connections" (redis-py's plain pool raises at its default
        cap of 100). Create it on the event loop that will use it.
        """
        client = async_blocking_client(url, max_connections=max_connections, timeout=10,
                                       decode_responses=True, health_check_interval=30)
        return cls(client, keys)

    async def aclose(self) -> None:
        """Close the client and its pool."""
        await self._r.aclose()

    async def ping(self) -> None:
        """PING; raises the client's error when Redis does not answer."""
        await self._r.ping()

    async def submit(self, record: RequestRecord, max_pending: int = 0) -> tuple[bool, int]:
        """Write a new request and make it pending, atomically (``lua/submit.lua``):
        ``(written, pending)``, nothing written when ``max_pending`` (> 0) are pending."""
        keys, args = submit_call(self.keys, record, max_pending)
        written, pending = await self._submit(keys=keys, args=args)
        return bool(written), int(pending)

    async def cancel(self, request_id: str, reason: str, ttl_s: int) -> tuple[CancelOutcome, str]:
        """Withdraw a request (``lua/cancel.lua``): the outcome and the request's status."""
        keys, args = cancel_call(self.keys, request_id, reason, ttl_s)
        return cancel_outcome(await self._cancel(keys=keys, args=args))

    async def get_request(self, request_id: str) -> RequestRecord | None:
        """The request's record, or None if unknown or expired."""
        raw = await self._r.hgetall(self.keys.request(request_id))
        return RequestRecord.from_hash(raw) if raw else None

    async def pending_count(self) -> int:
        """Requests in the pending pool."""
        return int(await self._r.zcard(self.keys.pending))
