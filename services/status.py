"""``scls status``: what a running deployment is doing, read from its Redis alone.

A snapshot holds the live instances (mode, device, state, heartbeat age, the work placed on
each and its cumulative counters), the pending count, the in-flight batches, the scheduler
leader and the global counters. Throughput is a difference of the global counters
(``requests_finished``, ``generated_tokens``) between reads: the live view keeps the reads
of the last minute and divides by their time span; ``--json`` reads twice ``--window``
seconds apart (``--window 0``: cumulative counters only, no rate).
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Annotated, Any

import redis
import typer
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shared.core.connection import describe
from shared.core.keys import Keys
from shared.core.records import now
from shared.core.store import Store, connect
from shared.settings import Settings

#: Global counters a snapshot reports (cumulative since the deployment's Redis was new).
TOTAL_FIELDS = ("requests_finished", "generated_tokens", "slices", "busy_s",
                "first_slice_finishes", "pad_tokens", "invalid_tokens", "recomputed_tokens",
                "kv_hits", "kv_misses", "kv_evictions")
#: Per-instance counters a snapshot reports.
INSTANCE_FIELDS = ("slices", "generated_tokens", "requests_finished", "busy_s", "model_busy_s",
                   "kv_hits", "kv_misses", "kv_evictions")


def snapshot(store: Store) -> dict[str, Any]:
    """One read of the deployment's state (several round trips, not one transaction)."""
    instances = store.live_instances()
    loads = store.instance_loads([inst.id for inst in instances])
    at = now()
    rows = []
    for inst in instances:
        load, stats = loads[inst.id], store.stats(inst.id)
        rows.append({
            "id": inst.id, "mode": inst.mode, "device": inst.device, "state": inst.state,
            "heartbeat_age_s": round(max(0.0, at - inst.heartbeat_at), 3),
            "queued_batches": load.batches, "queued_requests": load.requests,
            "queued_estimated_s": round(load.estimated_s, 4),
            **{name: _number(stats.get(name, 0.0)) for name in INSTANCE_FIELDS},
            # engine seconds over its profile's for the same work: > 1 runs slower than
            # profiled (contention, throttling); None before anything was priced
            "engine_time_ratio": _ratio(stats.get("busy_s", 0.0), stats.get("model_busy_s", 0.0)),
            # the KV pool's use at the last heartbeat, and its capacity (0: retention off)
            "kv_pool_used_bytes": inst.kv_pool_used_bytes,
            "kv_pool_bytes": inst.kv_pool_bytes,
        })
    totals = store.stats()
    return {
        "time": at,
        "leader": store.leader(),
        "pending": store.pending_count(),
        "inflight_batches": len(store.inflight_batches()),
        "instances": rows,
        "totals": {name: _number(totals.get(name, 0.0)) for name in TOTAL_FIELDS},
    }


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 3) if den > 0 else None


def _number(value: float) -> float | int:
    """Counters are stored with HINCRBYFLOAT: show whole ones as integers."""
    return int(value) if float(value).is_integer() else round(value, 4)


def throughput(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float] | None:
    """Requests and tokens per second between two snapshots (None if no time passed)."""
    span = new["time"] - old["time"]
    if span <= 0:
        return None
    done = new["totals"]["requests_finished"] - old["totals"]["requests_finished"]
    tokens = new["totals"]["generated_tokens"] - old["totals"]["generated_tokens"]
    return {"window_s": round(span, 3), "requests_per_s": round(done / span, 4),
            "tokens_per_s": round(tokens / span, 4)}


class RateWindow:
    """Snapshots of the last ``window_s`` seconds; the rate spans the oldest to the newest."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.samples: deque[dict[str, Any]] = deque()

    def add(self, snap: dict[str, Any]) -> dict[str, float] | None:
        """Keep ``snap``, forget samples older than the window, return the rate over it."""
        self.samples.append(snap)
        # Keep one sample at or beyond the window edge, so the span covers the full window.
        while len(self.samples) > 2 and snap["time"] - self.samples[1]["time"] >= self.window_s:
            self.samples.popleft()
        return throughput(self.samples[0], snap) if len(self.samples) > 1 else None


def render(snap: dict[str, Any], rate: dict[str, float] | None) -> Group:
    """The snapshot as a summary line and an instance table."""
    if rate is None:
        speed = "throughput: measuring ..."
    else:
        speed = (f"throughput (last {rate['window_s']:.0f} s): "
                 f"{rate['requests_per_s']:.2f} req/s, {rate['tokens_per_s']:.1f} tok/s")
    totals = snap["totals"]
    summary = Text(
        f"leader: {snap['leader'] or '(none)'}   pending: {snap['pending']}   "
        f"in-flight batches: {snap['inflight_batches']}   finished: "
        f"{totals['requests_finished']}   tokens: {totals['generated_tokens']}\n{speed}"
    )
    table = Table(title=f"instances ({len(snap['instances'])} live)", title_justify="left")
    for header in ("instance", "mode", "device", "state", "heartbeat", "queued batches",
                   "queued requests", "est. work", "slices", "tokens", "finished",
                   "vs profile", "KV pool", "KV hit/miss"):
        table.add_column(header, justify="left" if header in ("instance", "mode", "device",
                                                              "state") else "right")
    for row in snap["instances"]:
        state = row["state"] if row["state"] != "ready" else "[green]ready[/green]"
        table.add_row(
            row["id"], row["mode"], row["device"], state, f"{row['heartbeat_age_s']:.1f} s ago",
            str(row["queued_batches"]), str(row["queued_requests"]),
            f"{row['queued_estimated_s']:.2f} s", str(row["slices"]),
            str(row["generated_tokens"]), str(row["requests_finished"]),
            "-" if row["engine_time_ratio"] is None else f"{row['engine_time_ratio']:.2f}x",
            _pool(row), f"{row['kv_hits']}/{row['kv_misses']}",
        )
    return Group(summary, table)


def _pool(row: dict[str, Any]) -> str:
    """``used / capacity MiB`` of an instance's KV pool, ``off`` without one."""
    if not row["kv_pool_bytes"]:
        return "off"
    return f"{row['kv_pool_used_bytes'] / 2**20:.0f}/{row['kv_pool_bytes'] / 2**20:.0f} MiB"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _where(url: str) -> str:
    """host:port of a Redis URL, without any password in it."""
    return describe(url)  # a Sentinel URL names several hosts


def open_store(settings: Settings) -> Store:
    """A store on the deployment's Redis, or exit 2 with how to point at it."""
    if not settings.redis_url:
        raise _fail("no Redis to read: set SCLS_REDIS_URL to the deployment's Redis "
                    "(e.g. SCLS_REDIS_URL=redis://127.0.0.1:6379/0 scls status; `scls up` "
                    "prints its URL) or pass --redis-url")
    try:
        client = connect(settings.redis_url)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise _fail(f"cannot reach Redis at {_where(settings.redis_url)} ({exc}); is scls "
                    "running? set SCLS_REDIS_URL to the Redis its services use") from None
    return Store(client, Keys(settings.key_prefix))


def status_command(
    interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between refreshes of the live view")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="print one table and exit")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON snapshot (for scripts) and exit")
    ] = False,
    window: Annotated[
        float,
        typer.Option(min=0, help="--json/--once: seconds between the two reads that the "
                     "throughput comes from (0 = cumulative counters only, no rate)"),
    ] = 1.0,
    redis_url: Annotated[
        str | None, typer.Option(help="the deployment's Redis (default SCLS_REDIS_URL)")
    ] = None,
) -> None:
    """Show instances, queues, the scheduler leader and throughput, refreshed live."""
    try:
        settings = Settings(**({"redis_url": redis_url} if redis_url else {}))
    except ValidationError as exc:
        raise _fail(f"invalid settings (check SCLS_* variables): {exc}") from None
    store = open_store(settings)
    try:
        if as_json or once:
            _print_once(store, as_json, window)
        else:
            _live(store, interval)
    except redis.RedisError as exc:
        raise _fail(f"lost Redis at {_where(settings.redis_url or '')}: {exc}") from None
    except KeyboardInterrupt:
        pass


def _print_once(store: Store, as_json: bool, window: float) -> None:
    first = snapshot(store)
    snap, rate = first, None
    if window > 0:
        time.sleep(window)
        snap = snapshot(store)
        rate = throughput(first, snap)
    if as_json:
        typer.echo(json.dumps({**snap, "throughput": rate}, indent=2))
    else:
        Console().print(render(snap, rate))


def _live(store: Store, interval: float) -> None:
    rates = RateWindow(60.0)
    snap = snapshot(store)
    with Live(render(snap, rates.add(snap)), refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(interval)
            snap = snapshot(store)
            live.update(render(snap, rates.add(snap)))
