"""What a scheduling cycle sees and decides (docs/design.md §3): plain frozen records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from shared.policy.offloading import Placement


class SliceCost(Protocol):
    """Per-instance serving-time and memory model of one slice (docs/design.md §2).

    Both broadcast like numpy over array-like batch sizes ``b`` and padded lengths ``l``;
    ``s`` is the slice length (decode steps), ``None`` for the model's own default.
    """

    def slice_time(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated seconds to serve the batch for one slice."""
        ...

    def slice_memory(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated peak bytes beyond the weights (KV cache + activations)."""
        ...

    def resume_time(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated seconds of a slice whose rows all resume from retained K/V."""
        ...

    def resume_memory(
        self, b: ArrayLike, l: ArrayLike, s: int | None = None, /  # noqa: E741
    ) -> np.ndarray:
        """Estimated peak bytes of a slice whose rows all resume (no prefill activations)."""
        ...

    def mixed_memory(
        self, b: ArrayLike, l: ArrayLike, s: int | None,  # noqa: E741
        fresh_rows: ArrayLike, fresh_len: ArrayLike, /,
    ) -> np.ndarray:
        """Estimated peak bytes of a slice where ``fresh_rows`` rows prefill, the rest resume."""
        ...


@dataclass(frozen=True)
class ResumeCost:
    """A cost model seen by batching for rows resuming on their own instance: a slice's
    time and memory have no prefill (:meth:`SliceCost.resume_time`,
    :meth:`SliceCost.resume_memory`); the cache it allocates is the same."""

    cost: SliceCost

    def slice_time(self, b: ArrayLike, l: ArrayLike, s: int | None = None) -> np.ndarray:  # noqa: E741
        """Time of a resumed slice."""
        return self.cost.resume_time(b, l, s)

    def slice_memory(self, b: ArrayLike, l: ArrayLike, s: int | None = None) -> np.ndarray:  # noqa: E741
        """Memory of a resumed slice."""
        return self.cost.resume_memory(b, l, s)

    def resume_time(self, b: ArrayLike, l: ArrayLike, s: int | None = None) -> np.ndarray:  # noqa: E741
        """Time of a resumed slice."""
        return self.cost.resume_time(b, l, s)


@dataclass(frozen=True)
class Candidate:
    """A pending request as the policy sees it (never its true output length)."""

    id: str
    context_len: int  # prompt + tokens generated so far
    remaining_tokens: int  # max_tokens - generated: an upper bound, not a prediction
    arrival: float  # first arrival; kept when the request is re-queued after a slice
    # The live instance whose KV pool holds this request's K/V for its current context
    # ("" = none): its next slice there needs no prefill (the caller checks liveness).
    kv_instance: str = ""
    constrained: bool = False  # decodes under a grammar: each token costs a mask more


@dataclass(frozen=True)
class InstanceView:
    """A live instance as the policy sees it."""

    id: str
    cost: SliceCost
    memory_budget_bytes: int  # for KV cache + activations, beyond the weights
    context_limit: int  # max positions
    expected_busy_s: float = 0.0  # estimated work queued or running on it now
    queued_requests: int = 0  # requests queued or running on it now
    queued_batches: int = 0  # batches queued or running on it now (informational)
    # running_set mode (shared.policy.admission): rows of its running slice, which
    # continue into its next one, and the longest context among them at the slice's start
    running_rows: int = 0
    running_width: int = 0
    # Seconds a constrained row adds per sampled token (CostModel.grammar_token_s)
    grammar_token_s: float = 0.0


@dataclass(frozen=True)
class FormedBatch:
    """A batch formed but not (yet) given an instance."""

    request_ids: tuple[str, ...]
    padded_len: int
    slice_length: int
    oldest_arrival: float
    home: str = ""  # instance holding every row's K/V ("" = none: rows prefill anywhere)
    constrained_rows: int = 0  # rows decoding under a grammar


@dataclass(frozen=True)
class BatchPlan:
    """One slice batch to claim and enqueue on ``instance_id``; estimates on that instance."""

    instance_id: str
    request_ids: tuple[str, ...]
    padded_len: int
    slice_length: int
    estimated_s: float
    estimated_bytes: int
    resumed_rows: int = 0  # rows expected to resume from the instance's KV pool
    constrained_rows: int = 0  # rows decoding under a grammar (priced in estimated_s)


@dataclass(frozen=True)
class CyclePlan:
    """What one cycle decided: batches to dispatch, requests to fail, the next cursor."""

    batches: list[BatchPlan]
    never_fit: list[Candidate]
    rr_cursor: int
    unplaced: list[FormedBatch] = field(default_factory=list)  # their requests stay pending


@dataclass(frozen=True)
class CandidatePool:
    """Candidates with their context lengths and arrivals as arrays, built once a cycle."""

    candidates: list[Candidate]
    lens: np.ndarray  # int64 context lengths
    arrivals: np.ndarray  # float64 first arrivals

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> CandidatePool:
        """A pool of ``candidates`` in the given order."""
        return cls(
            list(candidates),
            np.array([c.context_len for c in candidates], dtype=np.int64),
            np.array([c.arrival for c in candidates], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.candidates)

    def take(self, index: np.ndarray) -> CandidatePool:
        """The candidates at integer positions ``index``, in that order."""
        return CandidatePool(
            [self.candidates[i] for i in index.tolist()], self.lens[index], self.arrivals[index]
        )

    def split(self, mask: np.ndarray) -> tuple[CandidatePool, CandidatePool]:
        """``(where mask, where not mask)``, each keeping the pool's order."""
        return self.take(np.flatnonzero(mask)), self.take(np.flatnonzero(~mask))


#: Batching policies: ``(pool in arrival order, reference cost, capacity bytes, slice
#: length, max batch) -> batches``. Every candidate fits the reference alone.
BatchingFn = Callable[[CandidatePool, SliceCost, int, int, int], list[FormedBatch]]
#: Offloading policies: ``(placement problem, round-robin cursor) -> (instance index per
#: batch or -1, next cursor)``; see :mod:`shared.policy.offloading`.
OffloadingFn = Callable[[Placement, int], tuple[np.ndarray, int]]


