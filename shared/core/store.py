"""Atomic operations on the Redis state (one class, sync; the ingest's async face over the
same keys and scripts is :mod:`shared.core.async_store`). Every multi-key change is one Lua
script or one MULTI, so the invariants of docs/design.md §6 hold whatever crashes in between.
Services reach Redis through these two faces only (RQ's own connection aside)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any

import redis

from shared.core.connection import sync_client
from shared.core.keys import Keys
from shared.core.records import (
    BatchRecord,
    CommitItem,
    InstanceInfo,
    RequestRecord,
    StepTokens,
    now,
)
from shared.core.states import FinishReason


@cache
def lua_source(name: str) -> str:
    """Text of ``shared/core/lua/<name>.lua``, with each ``-- @include <prelude>`` line replaced
    by ``shared/core/lua/<prelude>.lua`` (shared functions; Redis scripts cannot import)."""
    text = resources.files("shared.core").joinpath("lua", f"{name}.lua").read_text()
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("-- @include "):
            line = lua_source(line.removeprefix("-- @include ").strip())
        lines.append(line)
    return "".join(lines)


def submit_call(
    keys: Keys, record: RequestRecord, max_pending: int = 0
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``lua/submit.lua`` for ``record`` (for the sync store and the
    asyncio ingest alike): the request hash and its pending entry are written together and
    the scheduler is nudged, unless ``max_pending`` (> 0) requests are already pending."""
    fields = [item for pair in record.to_hash().items() for item in pair]
    return ([keys.request(record.id), keys.pending, keys.wakeup],
            [record.id, repr(record.arrival), max_pending, *fields])


class CancelOutcome(str, Enum):
    """What ``lua/cancel.lua`` did."""

    CANCELLED = "cancelled"  # it was pending: ended now
    MARKED = "marked"  # it is running: ends cancelled when its current slice commits
    ENDED = "ended"  # it had already ended (finished, failed or cancelled): nothing done
    UNKNOWN = "unknown"  # no such request (or it expired)


_CANCEL_CODES = {1: CancelOutcome.CANCELLED, 2: CancelOutcome.MARKED, 0: CancelOutcome.ENDED,
                 -1: CancelOutcome.UNKNOWN}


def cancel_call(keys: Keys, request_id: str, reason: str, ttl_s: int) -> tuple[list[str],
                                                                              list[Any]]:
    """KEYS and ARGV of ``lua/cancel.lua`` (for the sync store and the asyncio ingest)."""
    return ([keys.pending, keys.request(request_id), keys.events(request_id)],
            [request_id, repr(now()), ttl_s, reason, *keys.kv_drop_parts])


def cancel_outcome(reply: Sequence[Any]) -> tuple[CancelOutcome, str]:
    """``lua/cancel.lua``'s reply as an outcome and the request's status then."""
    code, status = reply
    text = status.decode() if isinstance(status, bytes) else str(status)
    return _CANCEL_CODES[int(code)], text


_LENGTH_FIELDS = ("prompt_tokens", "completion_tokens", "max_tokens", "arrival",
                  "kv_instance", "kv_boot", "constrained")


@dataclass(frozen=True)
class CandidateLengths:
    """What the scheduler needs of a pending request: never its token ids."""

    id: str
    context_len: int  # prompt + generated so far
    remaining_tokens: int  # max_tokens - generated
    arrival: float
    kv_instance: str = ""  # where its K/V is retained ("" = nowhere), as last committed
    kv_boot: str = ""  # the boot of that instance's worker when it kept it
    constrained: bool = False  # decodes under a grammar (priced per row by the scheduler)


@dataclass(frozen=True)
class InstanceLoad:
    """What an instance has queued or running now."""

    batches: int
    requests: int
    estimated_s: float  # sum of the batches' estimated slice times


class CommitRejected(Exception):
    """A slice commit whose batch or fence no longer matches (a late or duplicate commit)."""


def connect(url: str) -> redis.Redis:
    """A client that decodes responses to str (every field scls stores is text)."""
    return sync_client(url, decode_responses=True, health_check_interval=30)


class Store:
    """The scheduler's and workers' view of Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._claim = client.register_script(lua_source("claim"))
        self._start = client.register_script(lua_source("start"))
        self._commit = client.register_script(lua_source("commit"))
        self._requeue = client.register_script(lua_source("requeue"))
        self._fail_pending = client.register_script(lua_source("fail_pending"))
        self._renew_leader = client.register_script(lua_source("renew_leader"))
        self._release_leader = client.register_script(lua_source("release_leader"))
        self._submit = client.register_script(lua_source("submit"))
        self._cancel = client.register_script(lua_source("cancel"))
        self._kv_evicted = client.register_script(lua_source("kv_evicted"))
        self._heartbeat = client.register_script(lua_source("heartbeat"))
        self._publish_tokens = client.register_script(lua_source("publish_tokens"))

    # --- requests ---------------------------------------------------------------
    def submit(self, record: RequestRecord, max_pending: int = 0) -> bool:
        """Write a new request and make it pending, atomically; False (nothing written)
        when ``max_pending`` (> 0) requests are pending already."""
        keys, args = submit_call(self.keys, record, max_pending)
        written, _pending = self._submit(keys=keys, args=args)
        return bool(written)

    def cancel(self, request_id: str, reason: str, ttl_s: int) -> tuple[CancelOutcome, str]:
        """Withdraw a request (see ``lua/cancel.lua``); the outcome and its status."""
        keys, args = cancel_call(self.keys, request_id, reason, ttl_s)
        return cancel_outcome(self._cancel(keys=keys, args=args))

    def get_request(self, request_id: str) -> RequestRecord | None:
        """The request's record, or None if unknown or expired."""
        raw = self.r.hgetall(self.keys.request(request_id))
        return RequestRecord.from_hash(raw) if raw else None

    def get_requests(self, request_ids: Sequence[str]) -> list[RequestRecord | None]:
        """Several records in one round trip, in the given order."""
        pipe = self.r.pipeline(transaction=False)
        for rid in request_ids:
            pipe.hgetall(self.keys.request(rid))
        return [RequestRecord.from_hash(raw) if raw else None for raw in pipe.execute()]

    def pending_count(self) -> int:
        """Number of pending requests."""
        return int(self.r.zcard(self.keys.pending))

    def pending_ids(self, limit: int) -> list[str]:
        """The ``limit`` oldest pending request ids (arrival order; re-queued keep theirs)."""
        return list(self.r.zrange(self.keys.pending, 0, limit - 1))

    def candidate_lengths(self, limit: int) -> list[CandidateLengths]:
        """The ``limit`` oldest pending requests with their current lengths, oldest first.

        This runs every scheduler cycle on up to ``candidate_limit`` requests, so it reads
        four small fields (HMGET), never the token lists, and decodes no JSON.
        """
        ids = self.pending_ids(limit)
        pipe = self.r.pipeline(transaction=False)
        for rid in ids:
            pipe.hmget(self.keys.request(rid), _LENGTH_FIELDS)
        out = []
        for rid, row in zip(ids, pipe.execute(), strict=True):
            prompt, done, max_tokens, arrival, kv_instance, kv_boot, constrained = row
            if arrival is None:  # expired between ZRANGE and HMGET
                continue
            out.append(CandidateLengths(
                rid, int(prompt) + int(done), int(max_tokens) - int(done), float(arrival),
                kv_instance or "", kv_boot or "", constrained == "1",
            ))
        return out

    def fail_pending(self, request_id: str, reason: FinishReason, error: str, ttl_s: int) -> bool:
        """Fail a still-pending request with a stated reason. False if it was not pending."""
        keys = [self.keys.pending, self.keys.request(request_id), self.keys.events(request_id)]
        args = [request_id, repr(now()), reason.value, error, ttl_s, *self.keys.kv_drop_parts]
        return bool(self._fail_pending(keys=keys, args=args))

    # --- batches ----------------------------------------------------------------
    def claim_batch(
        self,
        batch_id: str,
        instance_id: str,
        request_ids: Sequence[str],
        slice_length: int,
        deadline: float,
        extra: dict[str, str | int | float] | None = None,
        estimated_s: float = 0.0,
    ) -> dict[str, int]:
        """Move pending requests into a new in-flight batch; returns request id -> fence.

        Requests that are no longer pending are left out; an empty result means no batch.
        """
        fields = {"slice_length": slice_length, "estimated_s": estimated_s, **(extra or {})}
        keys = [
            self.keys.pending,
            self.keys.inflight,
            self.keys.batch(batch_id),
            self.keys.instance_batches(instance_id),
            *(self.keys.request(rid) for rid in request_ids),
        ]
        args = [
            batch_id, instance_id, repr(deadline), repr(now()), json.dumps(fields),
            repr(estimated_s),
        ]
        flat = self._claim(keys=keys, args=[*args, *request_ids])
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        """The batch record, or None if unknown or expired."""
        raw = self.r.hgetall(self.keys.batch(batch_id))
        return BatchRecord.from_hash(raw) if raw else None

    def start_batch(self, batch_id: str, deadline: float) -> bool:
        """Mark a batch running with a new deadline; False if it was swept meanwhile."""
        keys = [self.keys.inflight, self.keys.batch(batch_id)]
        return bool(self._start(keys=keys, args=[batch_id, repr(deadline), repr(now())]))

    def commit_slice(
        self,
        batch: BatchRecord,
        items: Sequence[CommitItem],
        stats: dict[str, float],
        result_ttl_s: int,
        kv_boot: str = "",
    ) -> int:
        """Commit a slice's results, fenced. Returns how many requests finished.

        Items with ``kv_retained`` record that the batch's instance (run ``kv_boot``) keeps
        their K/V at their fence; every other item forgets where its K/V was.

        Raises :class:`CommitRejected` (and changes nothing) when the batch is no longer in
        flight or a request's batch/fence does not match.
        """
        keys = [
            self.keys.pending,
            self.keys.inflight,
            self.keys.batch(batch.id),
            self.keys.instance_batches(batch.instance),
            self.keys.stats,
            self.keys.instance_stats(batch.instance),
            self.keys.wakeup,
        ]
        args: list[str | int] = [batch.id, repr(now()), result_ttl_s, json.dumps(stats),
                                 len(items), kv_boot, *self.keys.kv_drop_parts]
        for item in items:
            keys += [self.keys.request(item.request_id), self.keys.events(item.request_id)]
            args += [
                item.request_id,
                item.fence,
                ",".join(map(str, item.new_ids)),
                item.finish_reason.value if item.finish_reason else "",
                item.delta_text,
                item.final_text,
                int(item.kv_retained),
                # Items of the stored JSON array, without its brackets: the script appends.
                ",".join(json.dumps(lp.to_json(), separators=(",", ":"))
                         for lp in item.logprobs),
            ]
        ok, detail = self._commit(keys=keys, args=args)
        if int(ok) != 1:
            raise CommitRejected(str(detail))
        return int(detail)

    def server_cpu_s(self) -> float:
        """CPU seconds the Redis server has used (user + system, ``INFO cpu``): what a
        measurement attributes to the server's side of a workload."""
        info = self.r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def publish_tokens(self, batch_id: str, steps: Sequence[StepTokens]) -> int:
        """Append streaming requests' new tokens to their event streams, fenced (see
        ``lua/publish_tokens.lua``), with their logprobs when the request asks (a JSON
        array in the record's form); returns how many entries were written."""
        keys: list[str] = []
        args: list[str | int] = [batch_id]
        for step in steps:
            keys += [self.keys.request(step.request_id), self.keys.events(step.request_id)]
            logprobs = (json.dumps([lp.to_json() for lp in step.logprobs], separators=(",", ":"))
                        if step.logprobs else "")
            args += [step.fence, step.position, ",".join(map(str, step.ids)), logprobs]
        return int(self._publish_tokens(keys=keys, args=args)) if steps else 0

    def requeue_batch(
        self,
        batch: BatchRecord,
        reason: str,
        max_retries: int,
        result_ttl_s: int,
        count_retry: bool = True,
    ) -> tuple[int, int] | None:
        """Give a batch's requests back to pending (or fail those out of retries).

        Returns (requeued, failed), or None when the batch was no longer in flight.
        """
        keys = [
            self.keys.pending,
            self.keys.inflight,
            self.keys.batch(batch.id),
            self.keys.instance_batches(batch.instance),
            self.keys.wakeup,
        ]
        for rid in batch.request_ids:
            keys += [self.keys.request(rid), self.keys.events(rid)]
        args = [
            batch.id, repr(now()), reason, max_retries, result_ttl_s, int(count_retry),
            *self.keys.kv_drop_parts, *batch.request_ids,
        ]
        requeued, failed = self._requeue(keys=keys, args=args)
        return None if int(requeued) < 0 else (int(requeued), int(failed))

    def inflight_batches(self) -> list[tuple[str, float]]:
        """All in-flight batch ids with their deadlines."""
        return [(bid, float(score)) for bid, score in self.r.zrange(self.keys.inflight, 0, -1,
                                                                     withscores=True)]

    def instance_batch_ids(self, instance_id: str) -> list[str]:
        """Batches queued on or running at an instance, oldest placement first."""
        return list(self.r.zrange(self.keys.instance_batches(instance_id), 0, -1))

    def instance_batch_count(self, instance_id: str) -> int:
        """Batches queued on or running at an instance."""
        return int(self.r.zcard(self.keys.instance_batches(instance_id)))

    def instance_loads(self, instance_ids: Sequence[str]) -> dict[str, InstanceLoad]:
        """Work queued on or running at each instance (two pipelined round trips)."""
        pipe = self.r.pipeline(transaction=False)
        for iid in instance_ids:
            pipe.zrange(self.keys.instance_batches(iid), 0, -1, withscores=True)
        entries = dict(zip(instance_ids, pipe.execute(), strict=True))
        pipe = self.r.pipeline(transaction=False)
        for iid in instance_ids:
            for bid, _score in entries[iid]:
                pipe.hget(self.keys.batch(bid), "members")
        members = iter(pipe.execute())
        loads = {}
        for iid in instance_ids:
            requests = sum(len((next(members) or "").split(",")) for _ in entries[iid])
            loads[iid] = InstanceLoad(
                batches=len(entries[iid]),
                requests=requests,
                estimated_s=float(sum(score for _bid, score in entries[iid])),
            )
        return loads

    def instance_occupancy(self, instance_ids: Sequence[str]) -> dict[str, tuple[int, float]]:
        """Each live instance's rows running and KV bytes in use as a share of its memory
        budget, as its last heartbeat published them (one pipelined round trip); an
        instance that publishes no KV figure (``ils-hf``) reports a share of -1."""
        pipe = self.r.pipeline(transaction=False)
        for iid in instance_ids:
            pipe.hmget(self.keys.instance(iid), "running_rows", "kv_in_use_bytes",
                       "memory_budget_bytes", "kv_pool_bytes")
        out = {}
        for iid, (rows, kv, budget, pool) in zip(instance_ids, pipe.execute(), strict=True):
            if rows is None:
                continue
            total = float(budget or 0) + float(pool or 0)  # the instance's whole memory
            share = float(kv) / total if kv is not None and total > 0 else -1.0
            out[iid] = (int(rows), share)
        return out

    # --- retained K/V ---------------------------------------------------------------
    def forget_kv(self, instance_id: str, request_ids: Sequence[str]) -> int:
        """Clear the K/V location of requests an instance evicted, where it still names
        that instance. Returns how many were cleared."""
        if not request_ids:
            return 0
        keys = [self.keys.request(rid) for rid in request_ids]
        return int(self._kv_evicted(keys=keys, args=[instance_id]))

    def take_kv_drops(self, instance_id: str) -> list[str]:
        """Empty the instance's drop set: requests whose K/V it should no longer keep."""
        pipe = self.r.pipeline(transaction=True)
        pipe.smembers(self.keys.kv_drop(instance_id))
        pipe.delete(self.keys.kv_drop(instance_id))
        members, _ = pipe.execute()
        return sorted(members)

    # --- instances ----------------------------------------------------------------
    def register_instance(self, info: InstanceInfo, ttl_s: float) -> None:
        """Publish (or refresh) an instance; its hash expires unless heartbeats renew it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.keys.instances, info.id)
        pipe.hset(self.keys.instance(info.id), mapping=info.to_hash())
        pipe.pexpire(self.keys.instance(info.id), int(ttl_s * 1000))
        pipe.execute()

    def heartbeat(
        self, instance_id: str, ttl_s: float, state: str = "ready",
        extra: dict[str, int | float | str] | None = None,
    ) -> bool:
        """Renew an instance's TTL (and refresh ``extra`` fields, e.g. its KV pool's use);
        False if it had expired (the caller re-registers).

        One script (``lua/heartbeat.lua``) that renews only a whole instance hash: a beat
        that reaches Redis after the hash expired (its client timed out while Redis was
        paused) cannot re-create it as a partial hash the scheduler counts as dead while
        the worker goes on renewing it.
        """
        fields = {"heartbeat_at": repr(now()), "state": state, **(extra or {})}
        args = [int(ttl_s * 1000), *(item for pair in fields.items() for item in pair)]
        return bool(self._heartbeat(keys=[self.keys.instance(instance_id)], args=args))

    def deregister_instance(self, instance_id: str) -> None:
        """Remove an instance at shutdown."""
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.keys.instances, instance_id)
        pipe.delete(self.keys.instance(instance_id))
        pipe.execute()

    def live_instances(self) -> list[InstanceInfo]:
        """Instances whose heartbeat is current; forgets those whose hash expired."""
        ids = sorted(self.r.smembers(self.keys.instances))
        pipe = self.r.pipeline(transaction=False)
        for iid in ids:
            pipe.hgetall(self.keys.instance(iid))
        live, dead = [], []
        for iid, raw in zip(ids, pipe.execute(), strict=True):
            if raw and "queue" in raw:
                live.append(InstanceInfo.from_hash(raw))
            else:
                dead.append(iid)
        if dead:
            self.r.srem(self.keys.instances, *dead)
        return live

    def is_instance_alive(self, instance_id: str) -> bool:
        """True while the instance's heartbeat hash exists."""
        return bool(self.r.exists(self.keys.instance(instance_id)))

    # --- scheduler coordination -------------------------------------------------------
    def acquire_or_renew_leader(self, holder: str, ttl_s: float) -> bool:
        """Become (or stay) the active scheduler. True while we hold the lock."""
        ttl_ms = int(ttl_s * 1000)
        if self._renew_leader(keys=[self.keys.leader], args=[holder, ttl_ms]):
            return True
        return bool(self.r.set(self.keys.leader, holder, nx=True, px=ttl_ms))

    def release_leader(self, holder: str) -> None:
        """Give the lock up if we hold it, so a standby takes over at once."""
        self._release_leader(keys=[self.keys.leader], args=[holder])

    def leader(self) -> str | None:
        """Who holds the leader lock now."""
        return self.r.get(self.keys.leader)

    def wake_scheduler(self, reason: str = "nudge") -> None:
        """Wake the scheduler before its cycle interval ends."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(self.keys.wakeup, reason)
        pipe.ltrim(self.keys.wakeup, 0, 63)
        pipe.execute()

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a wake-up; drains the backlog of nudges."""
        got = self.r.blpop([self.keys.wakeup], timeout=timeout_s)
        if got:
            self.r.delete(self.keys.wakeup)
        return got is not None

    # --- counters -----------------------------------------------------------------
    def stats(self, instance_id: str | None = None) -> dict[str, float]:
        """Cumulative counters, global or for one instance."""
        key = self.keys.instance_stats(instance_id) if instance_id else self.keys.stats
        return {k: float(v) for k, v in self.r.hgetall(key).items()}

    def batch_fields(self, *fields: str) -> list[list[str | None]]:
        """``fields`` of every batch hash still stored (a SCAN: for tools, not for serving)."""
        pipe = self.r.pipeline(transaction=False)
        for key in self.r.scan_iter(match=self.keys.batch("*"), count=1000):
            pipe.hmget(key, *fields)
        return list(pipe.execute())

    def close(self) -> None:
        """Close the client's connections."""
        self.r.close()

    def events(self, request_id: str) -> list[dict[str, str]]:
        """All events of a request so far (oldest first)."""
        return [fields for _id, fields in self.r.xrange(self.keys.events(request_id))]
