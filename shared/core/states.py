"""Request and batch lifecycle states, and why a request finished.

A request moves ``pending -> running -> pending -> ... -> finished | failed | cancelled``.
Every state but ``pending`` and ``running`` is terminal; each terminal state carries a
:class:`FinishReason` so that no accepted request ever ends without a stated reason
(docs/design.md §6.3, invariant 3).
"""

from __future__ import annotations

from enum import Enum


class RequestStatus(str, Enum):
    """Where a request is. Stored verbatim in the request hash's ``status`` field."""

    PENDING = "pending"  # in the pending zset, waiting for a slice
    RUNNING = "running"  # claimed by exactly one in-flight batch
    FINISHED = "finished"  # generation ended normally (stop or length)
    FAILED = "failed"  # ended with an error; ``error`` says why
    CANCELLED = "cancelled"  # withdrawn by the client or an operator

    @property
    def is_terminal(self) -> bool:
        """True once the request will never be scheduled again."""
        return self in _TERMINAL


_TERMINAL = frozenset({RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED})


class FinishReason(str, Enum):
    """Why generation ended; the first two are OpenAI's ``finish_reason`` values."""

    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # reached max_tokens
    ERROR = "error"  # failed: see the request's ``error`` field
    CANCELLED = "cancelled"
    NEVER_FITS = "never_fits"  # cannot fit an instance's memory budget even alone


#: The terminal status each finish reason implies.
STATUS_FOR_REASON: dict[FinishReason, RequestStatus] = {
    FinishReason.STOP: RequestStatus.FINISHED,
    FinishReason.LENGTH: RequestStatus.FINISHED,
    FinishReason.ERROR: RequestStatus.FAILED,
    FinishReason.NEVER_FITS: RequestStatus.FAILED,
    FinishReason.CANCELLED: RequestStatus.CANCELLED,
}


class BatchStatus(str, Enum):
    """Lifecycle of one slice batch (``scls:batch:<id>`` hash, ``status`` field)."""

    QUEUED = "queued"  # claimed by the scheduler, job on the instance's RQ queue
    RUNNING = "running"  # a worker started the slice
    COMMITTED = "committed"  # results committed (fence matched)
    REQUEUED = "requeued"  # swept or failed: its requests went back to pending
