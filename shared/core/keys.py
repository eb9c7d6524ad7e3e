"""Every Redis key scls uses is built here, and nowhere else.

The layout (docs/design.md §5), for the default prefix ``scls:``:

=====================================  ========  ==========================================
key                                    type      holds
=====================================  ========  ==========================================
``scls:req:<id>``                      hash      prompt/generated ids, params, status, fence
``scls:req:<id>:events``               stream    one entry per slice, then a final entry
``scls:pending``                       zset      request id -> arrival time (FCFS order)
``scls:inflight``                      zset      batch id -> deadline (recovery sweep)
``scls:batch:<id>``                    hash      instance, request ids, fences, timings
``scls:instances``                     set       registered instance ids
``scls:instance:<id>``                 hash      device, budget, model facts (TTL heartbeat)
``scls:instance:<id>:batches``         zset      batch id -> estimated s (queued/running)
``scls:instance:<id>:stats``           hash      the instance's cumulative counters
``scls:instance:<id>:kv_drop``         set       request ids whose retained K/V it should drop
``scls:scheduler:leader``              string    the active scheduler (SET NX PX)
``scls:scheduler:wakeup``              list      nudges that wake the scheduler early
``scls:stats``                         hash      cumulative counters (slices, tokens, ...)
``rq:queue:scls-<instance>``           RQ's own  the instance's slice jobs
=====================================  ========  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builder for one deployment, identified by its prefix."""

    prefix: str = "scls:"

    def request(self, request_id: str) -> str:
        """Hash of one request."""
        return f"{self.prefix}req:{request_id}"

    def events(self, request_id: str) -> str:
        """Stream of one request's slice deltas and final entry."""
        return f"{self.prefix}req:{request_id}:events"

    @property
    def pending(self) -> str:
        """Zset of pending request ids scored by arrival time."""
        return f"{self.prefix}pending"

    @property
    def inflight(self) -> str:
        """Zset of in-flight batch ids scored by deadline."""
        return f"{self.prefix}inflight"

    def batch(self, batch_id: str) -> str:
        """Hash of one slice batch."""
        return f"{self.prefix}batch:{batch_id}"

    @property
    def instances(self) -> str:
        """Set of registered instance ids (entries whose hash expired are swept)."""
        return f"{self.prefix}instances"

    def instance(self, instance_id: str) -> str:
        """Hash of one live instance; its TTL is the heartbeat."""
        return f"{self.prefix}instance:{instance_id}"

    def instance_batches(self, instance_id: str) -> str:
        """Zset of the batches queued on or running at one instance."""
        return f"{self.prefix}instance:{instance_id}:batches"

    def kv_drop(self, instance_id: str) -> str:
        """Set of request ids whose K/V the instance should drop from its pool (they ended
        or moved); the worker empties it before each slice."""
        head, tail = self.kv_drop_parts
        return f"{head}{instance_id}{tail}"

    @property
    def kv_drop_parts(self) -> tuple[str, str]:
        """``(head, tail)`` of :meth:`kv_drop` keys, for Lua scripts that name the set of
        an instance they read from a request hash (``head .. instance .. tail``)."""
        return f"{self.prefix}instance:", ":kv_drop"

    def instance_stats(self, instance_id: str) -> str:
        """Hash of one instance's cumulative counters (kept when the instance dies)."""
        return f"{self.prefix}instance:{instance_id}:stats"

    @property
    def leader(self) -> str:
        """The scheduler leader lock."""
        return f"{self.prefix}scheduler:leader"

    @property
    def wakeup(self) -> str:
        """List the scheduler blocks on between cycles."""
        return f"{self.prefix}scheduler:wakeup"

    @property
    def stats(self) -> str:
        """Hash of cumulative counters."""
        return f"{self.prefix}stats"

    def queue_name(self, instance_id: str) -> str:
        """RQ queue name of an instance (RQ stores it as ``rq:queue:<name>``)."""
        return f"{self.prefix.rstrip(':')}-{instance_id}"
