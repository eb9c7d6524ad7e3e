"""The faults of a chaos run, each a coroutine that breaks one thing and measures how the
system came back. They run while the workload runs (:mod:`.command`), one after another.

Every fault returns a plain dict for the report. Recovery is measured from the outside as a
client would see it: a *probe* (a workload request) submitted until it is accepted and
followed to its end, plus, where a fault touched them, every worker registered again and a
scheduler holding the leader lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import redis

from services.chaos.deployment import ChaosDeployment
from services.chaos.workload import Ledger, Spec, submit
from shared.core.store import Store
from shared.obs.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class FaultContext:
    """What every fault works with."""

    dep: ChaosDeployment
    ledger: Ledger
    probe: Spec  # the request a probe sends (a workload spec: its text is checked too)
    recovery_timeout_s: float = 120.0


def _ask_store(dep: ChaosDeployment, question: Callable[[Store], T]) -> T | None:
    """``question(store)`` on a fresh client; None while Redis does not answer."""
    store = dep.store()
    try:
        return question(store)
    except (redis.RedisError, OSError):
        return None
    finally:
        store.close()


async def ask(dep: ChaosDeployment, question: Callable[[Store], T]) -> T | None:
    """:func:`_ask_store` off the event loop (the workload's clients keep running)."""
    return await asyncio.to_thread(_ask_store, dep, question)


async def probe(ctx: FaultContext, deadline: float) -> float | None:
    """Seconds until one probe request was accepted and ended; None at ``deadline``."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=ctx.dep.url, timeout=30) as client:
        sent = await submit(client, ctx.probe, ctx.ledger, deadline)
    if sent is None:
        return None
    return round(time.monotonic() - started, 3)


async def workers_live(ctx: FaultContext, deadline: float) -> float | None:
    """Seconds until every worker process has a live instance; None at ``deadline``."""
    started = time.monotonic()
    while time.monotonic() < deadline:
        ctx.dep.supervise()
        live = await ask(ctx.dep, lambda s: {i.id for i in s.live_instances()})
        if live is not None and set(ctx.dep.worker_names()) <= live:
            return round(time.monotonic() - started, 3)
        await asyncio.sleep(0.2)
    return None


async def recovered(ctx: FaultContext) -> dict[str, Any]:
    """How long until a request completes and every worker is registered again."""
    started = time.monotonic()
    deadline = started + ctx.recovery_timeout_s
    probe_s, live_s = await asyncio.gather(probe(ctx, deadline), workers_live(ctx, deadline))
    both = None if probe_s is None or live_s is None else round(max(probe_s, live_s), 3)
    return {"request_completes_s": probe_s, "workers_registered_s": live_s, "recovered_s": both}


async def worker_kills(ctx: FaultContext, duration_s: float, every_s: float) -> dict[str, Any]:
    """``kill -9`` a worker every ``every_s`` seconds for ``duration_s``; restart each at
    once, alternately with the same instance id and with a new one. A worker is killed only
    while at least two are registered, so the system is degraded, never empty."""
    kills: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        await asyncio.sleep(every_s)
        live = await ask(ctx.dep, lambda s: sorted(i.id for i in s.live_instances())) or []
        victims = [w for w in ctx.dep.worker_names() if w in live]
        if len(victims) < 2:
            continue
        victim = victims[len(kills) % len(victims)]
        ctx.dep.kill(victim)
        same_id = len(kills) % 2 == 0
        new_id = victim if same_id else f"w{ctx.dep.next_worker}"
        if not same_id:
            ctx.dep.next_worker += 1
        ctx.dep.spawn_worker(new_id)
        kills.append(
            {
                "at_s": round(duration_s - (deadline - time.monotonic()), 2),
                "killed": victim,
                "restarted_as": new_id,
            }
        )
        log.info("chaos_worker_killed", killed=victim, restarted_as=new_id)
    after = await recovered(ctx)
    return {
        "kills": len(kills),
        "same_id_restarts": sum(k["killed"] == k["restarted_as"] for k in kills),
        "new_id_restarts": sum(k["killed"] != k["restarted_as"] for k in kills),
        "every_s": every_s,
        "duration_s": duration_s,
        "events": kills,
        **after,
    }


async def _leader_other_than(ctx: FaultContext, old: str, deadline: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        holder = await ask(ctx.dep, lambda s: s.leader())
        if holder and holder != old:
            return round(time.monotonic() - started, 3)
        await asyncio.sleep(0.05)
    return None


async def leader_kill(ctx: FaultContext) -> dict[str, Any]:
    """``kill -9`` the scheduler holding the leader lock; ``failover_s`` is the time until
    the standby holds it, then the killed one is restarted (as the new standby)."""
    holder = await ask(ctx.dep, lambda s: s.leader())
    victim = ctx.dep.scheduler_of(holder) if holder else None
    if holder is None or victim is None:
        return {"skipped": f"no leader to kill (holder {holder!r})"}
    started = time.monotonic()
    ctx.dep.kill(victim)
    deadline = started + ctx.recovery_timeout_s
    failover_s = await _leader_other_than(ctx, holder, deadline)
    probe_s = await probe(ctx, deadline)
    ctx.dep.restart(victim)
    return {
        "killed": victim,
        "holder": holder,
        "failover_s": failover_s,
        "request_completes_s": None if probe_s is None else round(time.monotonic() - started, 3),
        "leader_ttl_s": ctx.dep.settings.leader_ttl_s,
    }


@contextlib.contextmanager
def redis_outage(ledger: Ledger) -> Iterator[None]:
    """Mark 503s as expected while Redis is broken and until the system recovered."""
    ledger.redis_outage = True
    try:
        yield
    finally:
        ledger.redis_outage = False


async def redis_freeze(ctx: FaultContext, freeze_s: float) -> dict[str, Any]:
    """SIGSTOP Redis for ``freeze_s`` (every client hangs, TTLs run out meanwhile), then
    SIGCONT; measure how long until the system works again."""
    before = dict(ctx.ledger.statuses)
    with redis_outage(ctx.ledger):
        ctx.dep.aof.signal(signal.SIGSTOP)
        await asyncio.sleep(freeze_s)
        ctx.dep.aof.signal(signal.SIGCONT)
        after = await recovered(ctx)
    return {
        "frozen_s": freeze_s,
        **after,
        "exited": _exits(ctx),
        "statuses_during": _diff(ctx.ledger.statuses, before),
    }


async def redis_kill(ctx: FaultContext, down_s: float) -> dict[str, Any]:
    """``kill -9`` Redis, keep it down ``down_s``, restart it on the same port and AOF;
    ``redis_recovery_s`` runs from the restart until a request completes and every worker
    is registered again."""
    before = dict(ctx.ledger.statuses)
    with redis_outage(ctx.ledger):
        ctx.dep.aof.signal(signal.SIGKILL)
        await asyncio.sleep(down_s)
        started = time.monotonic()
        await asyncio.to_thread(ctx.dep.aof.start)
        loaded_s = round(time.monotonic() - started, 3)
        after = await recovered(ctx)
    return {
        "down_s": down_s,
        "aof_load_s": loaded_s,
        **after,
        "redis_recovery_s": after["recovered_s"] and round(after["recovered_s"] + loaded_s, 3),
        "exited": _exits(ctx),
        "statuses_during": _diff(ctx.ledger.statuses, before),
    }


def _exits(ctx: FaultContext) -> dict[str, int]:
    """Children the supervisor had to restart so far (a service that died of a fault)."""
    ctx.dep.supervise()
    return dict(ctx.dep.restarts)


def _diff(now: Counter[int], before: dict[int, int]) -> dict[str, int]:
    """Statuses counted since ``before``."""
    return {str(k): v - before.get(k, 0) for k, v in sorted(now.items()) if v - before.get(k, 0)}


async def _answered(ledger: Ledger, count: int, timeout_s: float) -> None:
    """Return once ``count`` submissions have had an answer (a status or a broken
    connection), or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(ledger.statuses.values()) + sum(ledger.transport_errors.values()) >= count:
            return
        await asyncio.sleep(0.1)


async def _watch_pending(ctx: FaultContext, seen: list[int], stop: asyncio.Event) -> None:
    """Append the pending count every 50 ms until ``stop``."""
    while not stop.is_set():
        count = await ask(ctx.dep, lambda s: s.pending_count())
        if count is not None:
            seen.append(count)
        await asyncio.sleep(0.05)


async def burst(
    ctx: FaultContext, ledger: Ledger, specs: list[Spec], count: int, timeout_s: float
) -> dict[str, Any]:
    """``count`` requests at once, each sent once, against the pending bound
    (``max_pending``): what is not accepted must be answered 429 (or the documented 503
    ``not_ready``), and the pending pool, sampled meanwhile, must never exceed the bound
    by more than can be in flight.
    The requests are long (many slices), so the pool fills faster than it drains."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    timeout = httpx.Timeout(timeout_s, connect=timeout_s)
    started = time.monotonic()
    seen: list[int] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_pending(ctx, seen, stop))
    try:
        async with httpx.AsyncClient(
            base_url=ctx.dep.url, timeout=timeout, limits=limits
        ) as client:
            sent = await asyncio.gather(
                *(
                    submit(client, specs[i % len(specs)], ledger, started + timeout_s, retry=False)
                    for i in range(count)
                )
            )
    finally:
        stop.set()
        await watcher
    bound = ctx.dep.settings.max_pending
    # The bound is checked at admission (submit.lua). A request that was running when the
    # pool filled returns to pending after its slice (commit.lua must not drop it), so the
    # pool may exceed the bound by what can be in flight: every worker's queued batches.
    cfg = ctx.dep.settings
    slack = len(ctx.dep.worker_names()) * cfg.max_queued_batches * cfg.max_batch_size
    other = {str(k): v for k, v in ledger.statuses.items() if k not in (200, 429)}
    return {
        "requests": count,
        "bound": bound,
        "accepted": sum(s is not None for s in sent),
        "rejected_429": ledger.statuses.get(429, 0),
        "not_ready_503": ledger.not_ready_503,
        "other_statuses": other,
        "transport_errors": dict(ledger.transport_errors),
        "max_pending_seen": max(seen, default=None),
        "in_flight_slack": slack,
        "bound_held": bool(seen) and max(seen) <= bound + slack,
        "seconds": round(time.monotonic() - started, 2),
    }
