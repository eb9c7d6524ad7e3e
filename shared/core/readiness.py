"""Readiness of a deployment, read from Redis (the ingest's ``GET /health``, issue 15).

``/healthz`` says the ingest and Redis are up (liveness). Serving a request needs more: a
scheduler holding the leader lock (``Keys.leader``, SET NX PX and renewed, so it exists only
while a scheduler is alive) and at least one live worker instance (``Keys.instances`` plus an
``instance:<id>`` hash that expires unless heartbeats renew it). Without them an accepted
request sits pending. :class:`Readiness` checks the three over Redis and caches the answer
for a moment, so that probes, every submission and the waiter's guard share one check.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.core.connection import async_client
from shared.core.keys import Keys

#: A ready answer is reused this long (probes and submissions share it).
READY_TTL_S = 1.0
#: A not-ready answer is reused only this long: a deployment that just came up (the launcher
#: waits for its workers, then sends requests at once) is not refused on a stale answer.
UNREADY_TTL_S = 0.25
#: Bound on one check's Redis round trips.
CHECK_TIMEOUT_S = 1.0
#: Longest server message kept in the readiness text (Redis's DENIED answer is ~700 chars).
MAX_ERROR_CHARS = 1000


def describe_error(exc: BaseException) -> str:
    """Why Redis did not answer, for an operator: the exception's class and the server's own
    message (``ResponseError: DENIED Redis is running in protected mode ...``,
    ``AuthenticationError: Authentication required.``). ``repr`` is not enough: redis-py 8
    writes only the category and class (``server:ResponseError``), dropping the message."""
    message = " ".join(str(exc).split())  # one line: the DENIED answer spans several
    name = type(exc).__name__
    text = f"{name}: {message}" if message else name
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class ReadinessState:
    """One readiness check: what answered and what is missing."""

    redis: str  # "ok", or why Redis did not answer (the error and the server's message)
    scheduler: str | None  # the leader lock's holder, None when no scheduler holds it
    instances: int  # live worker instances that take work (not draining)
    draining: int = 0  # live instances that are draining (finish what they have, take no more)

    @property
    def ready(self) -> bool:
        """Redis answers, a scheduler leads and a worker takes work."""
        return self.redis == "ok" and self.scheduler is not None and self.instances > 0

    @property
    def can_progress(self) -> bool:
        """Accepted requests can still move: as :attr:`ready`, but a draining instance
        counts (it finishes the slices it runs; what it hands back waits for a new one)."""
        return (self.redis == "ok" and self.scheduler is not None
                and self.instances + self.draining > 0)

    def missing(self) -> str:
        """What keeps the deployment from serving, in words ("" when ready)."""
        if self.redis != "ok":
            return f"Redis does not answer ({self.redis})"
        gaps = []
        if self.scheduler is None:
            gaps.append("no scheduler holds the leader lock")
        if self.instances == 0:
            draining = f" ({self.draining} draining)" if self.draining else ""
            gaps.append(f"no live worker instance{draining}")
        return " and ".join(gaps)

    def body(self) -> dict[str, Any]:
        """The JSON body of ``GET /health``."""
        return {"status": "ok" if self.ready else "not ready", "redis": self.redis,
                "scheduler": self.scheduler, "instances": self.instances,
                "draining": self.draining, **({} if self.ready else {"missing": self.missing()})}


class Readiness:
    """Cached readiness checks over one small Redis client of their own."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._last: ReadinessState | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()  # one check at a time; the others reuse its answer

    @classmethod
    def open(cls, url: str, keys: Keys) -> Readiness:
        """A checker with its own client on ``url`` (short timeouts: a probe must answer)."""
        client = async_client(  # the factory: plain and Sentinel URLs alike
            url, decode_responses=True, socket_timeout=CHECK_TIMEOUT_S,
            socket_connect_timeout=CHECK_TIMEOUT_S, max_connections=4)
        return cls(client, keys)

    async def aclose(self) -> None:
        """Close the client."""
        await self._r.aclose()

    def _fresh(self) -> ReadinessState | None:
        last = self._last
        if last is None:
            return None
        ttl = READY_TTL_S if last.ready else UNREADY_TTL_S
        return last if time.monotonic() - self._checked_at < ttl else None

    async def state(self) -> ReadinessState:
        """The deployment's readiness, checked at most about once a second."""
        if (cached := self._fresh()) is not None:
            return cached
        async with self._lock:
            if (cached := self._fresh()) is not None:  # checked while we waited
                return cached
            try:
                state = await asyncio.wait_for(self._check(), CHECK_TIMEOUT_S)
            except (TimeoutError, RedisError, OSError) as exc:
                state = ReadinessState(redis=describe_error(exc), scheduler=None, instances=0)
            self._last, self._checked_at = state, time.monotonic()
            return state

    async def unready_reason(self) -> str | None:
        """None while accepted requests can progress (:attr:`ReadinessState.can_progress`),
        else what is missing: the waiter's guard ends waits on it after a grace period."""
        state = await self.state()
        return None if state.can_progress else state.missing()

    async def _check(self) -> ReadinessState:
        keys = self._keys
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.get(keys.leader)
            pipe.pttl(keys.leader)  # -2: gone; the scheduler renews it well before expiry
            pipe.smembers(keys.instances)
            holder, pttl, ids = await pipe.execute()
        live = await self._live_states(sorted(ids))
        draining = sum(1 for s in live if s == "draining")
        leader = holder if holder is not None and pttl != -2 else None
        return ReadinessState(redis="ok", scheduler=leader, instances=len(live) - draining,
                              draining=draining)

    async def _live_states(self, ids: list[str]) -> list[str]:
        """The ``state`` of each instance whose heartbeat hash still exists (as
        ``Store.live_instances`` counts them: an expired hash is a dead instance)."""
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for iid in ids:
                pipe.hmget(self._keys.instance(iid), "queue", "state")
            rows = await pipe.execute()
        return [state or "ready" for queue, state in rows if queue]
