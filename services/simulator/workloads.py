"""Workload helpers of the simulator: tiling a trace to any size, the CLI's workload."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from shared.bench.workload import (
    WorkItem,
    read_trace,
    synthetic_workload,
    trace_workload,
    with_arrivals,
)


def tile(items: Sequence[WorkItem], n: int) -> list[WorkItem]:
    """The first ``n`` requests of ``items`` repeated back to back, indices renumbered.

    Each copy is shifted by the span of the arrivals plus one mean gap, so a tiled trace
    keeps its recorded rate and burstiness.
    """
    if not items or n <= 0:
        return []
    first = min(i.arrival_s for i in items)
    span = max(i.arrival_s for i in items) - first
    period = span + (span / (len(items) - 1) if len(items) > 1 else 1.0)
    out = []
    for k in range(n):
        copy, item = divmod(k, len(items))
        base = items[item]
        out.append(replace(base, index=k, arrival_s=base.arrival_s - first + copy * period))
    return out


def build_workload(
    trace: Path | None,
    requests: int | None,
    length_scale: float = 1.0,
    time_scale: float = 1.0,
    seed: int = 0,
) -> list[WorkItem]:
    """The requests of a run: a trace replay (tiled to ``requests`` when longer than the
    trace) or, without a trace, ``requests`` synthetic ones (default 1,000) arriving at 0."""
    if trace is None:
        return synthetic_workload(requests or 1000, seed, length_scale=length_scale)
    items = trace_workload(read_trace(trace), length_scale, time_scale)
    return tile(items, requests if requests is not None else len(items))


def at_rate(items: Sequence[WorkItem], rate: float | None, burstiness: float, seed: int
            ) -> list[WorkItem]:
    """``items`` with Poisson (``burstiness`` 1) or gamma arrivals at ``rate``; None keeps
    their arrivals."""
    if rate is None:
        return list(items)
    mode = "poisson" if burstiness == 1.0 else "gamma"
    return with_arrivals(items, mode, rate, burstiness, seed)
