"""The knobs of one scheduling cycle, the batching and offloading registries, dispatch caps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from shared.policy.batching import fcfs_batching, scls_batching, single_batching
from shared.policy.offloading import (
    fcfs_ect,
    least_requests,
    max_min,
    prefill_first,
    round_robin,
)
from shared.policy.presets import (
    MEMORY_ENGINE,
    POLICIES,
    WHOLE_GENERATION,
    ils_engine,
    is_continuous,
)
from shared.policy.types import BatchingFn, BatchPlan, CyclePlan, InstanceView, OffloadingFn

if TYPE_CHECKING:
    from shared.settings import Settings

#: Batching that forms every home group's batches in one dynamic programme (§9.5).
JOINT_DP_BATCHING = "scls"

#: Batching policies by name (:data:`~shared.policy.types.BatchingFn`).
BATCHING: dict[str, BatchingFn] = {
    "scls": scls_batching,
    "fcfs": fcfs_batching,
    "fcfs-fixed": fcfs_batching,
    "single": single_batching,
}
#: Offloading policies by name (:data:`~shared.policy.types.OffloadingFn`).
OFFLOADING: dict[str, OffloadingFn] = {
    "max-min": max_min,
    "fcfs-ect": fcfs_ect,
    "prefill-first": prefill_first,
    "round-robin": round_robin,
    "least-requests": least_requests,
}


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of one cycle; validated on construction."""

    batching: str = "scls"
    offloading: str = "max-min"
    slice_length: int = 32  # S, decode steps per slice
    max_gen_length: int = 1024  # G, the largest max_tokens accepted
    max_batch: int = 32
    horizon_s: float = 2.0  # an instance with this much expected work takes no new batch
    max_wait_s: float = 30.0  # age bound: older requests' batches are placed first
    # Bounds the DP's n (oldest first): 2048 keeps a cycle with 10,000 pending and 256
    # instances around 10-15 ms on 2 CPU cores (`scls scheduler-bench`).
    candidate_limit: int = 2048
    rr_cursor: int = 0  # round-robin position, carried from the previous CyclePlan
    # Price rows on the instance that retains their K/V without prefill (and form their
    # batches there first); off: every row is priced as re-prefilled anywhere.
    kv_affinity: bool = True

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"unknown batching {self.batching!r}; choose from "
                             f"{', '.join(BATCHING)}")
        if self.offloading not in OFFLOADING:
            raise ValueError(f"unknown offloading {self.offloading!r}; choose from "
                             f"{', '.join(OFFLOADING)}")
        for name in ("slice_length", "max_gen_length", "max_batch", "candidate_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rr_cursor < 0:
            raise ValueError(f"rr_cursor must be >= 0, got {self.rr_cursor}")
        if not self.horizon_s > 0 or not self.max_wait_s >= 0:
            raise ValueError("horizon_s must be > 0 and max_wait_s >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PolicyConfig:
        """The config of a named preset of :data:`POLICIES`, with ``overrides`` on top."""
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        batching, offloading = POLICIES[name]
        return cls(batching=batching, offloading=offloading, **overrides)

    @property
    def batch_slice_length(self) -> int:
        """Decode steps per batch: ``S``, or ``G`` for whole-generation batching."""
        return self.max_gen_length if self.batching in WHOLE_GENERATION else self.slice_length


def policy_config(settings: Settings) -> PolicyConfig:
    """The cycle policy the settings select: a preset, optionally overridden."""
    config = PolicyConfig.preset(
        settings.policy,
        slice_length=settings.slice_length,
        max_gen_length=settings.max_gen_length,
        max_batch=settings.max_batch_size,
        horizon_s=settings.horizon_s,
        max_wait_s=settings.max_wait_s,
        candidate_limit=settings.candidate_limit,
        kv_affinity=settings.kv_retention,
    )
    overrides = {k: v for k, v in (("batching", settings.batching),
                                   ("offloading", settings.offloading)) if v}
    return replace(config, **overrides)


def with_cursor(config: PolicyConfig, plan: CyclePlan) -> PolicyConfig:
    """``config`` for the next cycle: the round-robin cursor carried over from ``plan``."""
    return replace(config, rr_cursor=plan.rr_cursor)


@dataclass(frozen=True)
class DispatchCaps:
    """Hard per-instance caps applied to a cycle's plan before dispatch.

    Slice instances take at most ``limit`` queued or running batches; ILS instances
    (``count_requests``) at most ``limit`` requests, their engine's concurrency cap. The
    scheduler service and the simulator both apply it after :func:`plan_cycle`.
    """

    limit: int
    count_requests: bool = False

    @classmethod
    def for_policy(
        cls, policy: str, max_queued_batches: int, ils_max_concurrency: int,
        max_running: int | None = None,
    ) -> DispatchCaps:
        """The caps of preset ``policy``: requests for ILS, batches otherwise. A
        memory-bounded ILS engine admits by memory and queues the rest itself: its
        instances take up to ``max_running`` requests (``ils_max_concurrency`` when not
        given)."""
        if is_continuous(policy):
            memory = ils_engine(policy) == MEMORY_ENGINE and max_running is not None
            return cls(max_running if memory and max_running else ils_max_concurrency,
                       count_requests=True)
        return cls(max_queued_batches)

    def used(self, view: InstanceView) -> int:
        """What ``view`` already holds, in the capped unit."""
        return view.queued_requests if self.count_requests else view.queued_batches

    def has_room(self, view: InstanceView) -> bool:
        """Whether ``view`` can take one more batch of one request."""
        return self.used(view) < self.limit

    def apply(
        self, batches: Sequence[BatchPlan], views: Sequence[InstanceView]
    ) -> list[BatchPlan]:
        """``batches`` in order, without the placements beyond a cap (they stay pending)."""
        used = {v.id: self.used(v) for v in views}
        kept = []
        for batch in batches:
            need = len(batch.request_ids) if self.count_requests else 1
            if used[batch.instance_id] + need <= self.limit:
                used[batch.instance_id] += need
                kept.append(batch)
        return kept
