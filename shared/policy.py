"""Scheduling policies as pure functions: candidates and instances in, batch plans out.

The scheduler service, the tests (and later the simulator) call these same functions. This
module holds the arrival-order, memory-capped batcher of the foundation; the SCLS dynamic
programme and max-min offloading plug in behind the same :data:`BatchPolicy` signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.memory import estimate_slice_bytes


@dataclass(frozen=True)
class Candidate:
    """A pending request as the policy sees it (never its true output length)."""

    id: str
    context_len: int  # prompt + tokens generated so far
    remaining_tokens: int  # max_tokens - generated: an upper bound, not a prediction
    arrival: float


@dataclass(frozen=True)
class InstanceView:
    """A live instance as the policy sees it."""

    id: str
    memory_budget_bytes: int
    kv_bytes_per_token: int
    act_bytes_per_token: int
    context_limit: int
    queued_batches: int  # queued or running now
    free_slots: int  # batches it may still take this cycle (the horizon)

    def slice_bytes(self, batch_size: int, padded_len: int, slice_length: int) -> int:
        """Memory estimate of a batch on this instance."""
        return estimate_slice_bytes(
            batch_size, padded_len, slice_length, self.kv_bytes_per_token,
            self.act_bytes_per_token,
        )

    def fits_alone(self, context_len: int, slice_length: int) -> bool:
        """Whether one request of this length could ever run here."""
        return (
            context_len <= self.context_limit
            and self.slice_bytes(1, context_len, slice_length) <= self.memory_budget_bytes
        )


@dataclass(frozen=True)
class BatchPlan:
    """One slice batch to claim and enqueue."""

    instance_id: str
    request_ids: tuple[str, ...]
    padded_len: int
    slice_length: int
    estimated_bytes: int


BatchPolicy = Callable[[Sequence[Candidate], Sequence[InstanceView], int, int], list[BatchPlan]]


def never_fitting(
    candidates: Sequence[Candidate], instances: Sequence[InstanceView], slice_length: int
) -> list[Candidate]:
    """Candidates that fit no instance even alone: they must fail now, not wait forever."""
    if not instances:
        return []
    return [
        c for c in candidates
        if not any(inst.fits_alone(c.context_len, slice_length) for inst in instances)
    ]


def fcfs_memory_capped(
    candidates: Sequence[Candidate],
    instances: Sequence[InstanceView],
    slice_length: int,
    max_batch: int,
) -> list[BatchPlan]:
    """Arrival-order batches, each as large as ``max_batch`` and the memory budget allow.

    Batches go to the instance with the fewest queued batches that still has a free slot
    (ties: first in the given order), so two idle instances both get work.
    """
    load = {inst.id: inst.queued_batches for inst in instances}
    slots = {inst.id: inst.free_slots for inst in instances}
    ordered = sorted(candidates, key=lambda c: (c.arrival, c.id))
    plans: list[BatchPlan] = []
    cursor = 0
    while cursor < len(ordered):
        open_instances = [inst for inst in instances if slots[inst.id] > 0]
        if not open_instances:
            break
        target = min(open_instances, key=lambda inst: load[inst.id])
        plan, cursor = _fill_batch(ordered, cursor, target, slice_length, max_batch)
        if plan is None:  # the next request does not fit here: try it next cycle
            break
        plans.append(plan)
        load[target.id] += 1
        slots[target.id] -= 1
    return plans


def _fill_batch(
    ordered: Sequence[Candidate],
    start: int,
    inst: InstanceView,
    slice_length: int,
    max_batch: int,
) -> tuple[BatchPlan | None, int]:
    """Greedily extend a batch from ``ordered[start]`` while it fits ``inst``."""
    ids: list[str] = []
    padded = 0
    est = 0
    cursor = start
    while cursor < len(ordered) and len(ids) < max_batch:
        cand = ordered[cursor]
        new_padded = max(padded, cand.context_len)
        new_est = inst.slice_bytes(len(ids) + 1, new_padded, slice_length)
        if new_est > inst.memory_budget_bytes:
            break
        ids.append(cand.id)
        padded, est = new_padded, new_est
        cursor += 1
    if not ids:
        return None, start
    return BatchPlan(inst.id, tuple(ids), padded, slice_length, est), cursor


#: Batching policies selectable by name (``SCLS_BATCH_POLICY``).
BATCH_POLICIES: dict[str, BatchPolicy] = {"fcfs": fcfs_memory_capped}
