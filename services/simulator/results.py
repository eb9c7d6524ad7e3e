"""What a simulation takes and gives: instance specs, options, results and their metrics.

The metrics are :func:`shared.obs.metrics.summarize` over the simulated requests and instances,
plus the simulator's extras (docs/simulator.md, "Metrics"): among them the KV counters
that :func:`summarize` does not carry (``kv_hits``, ``kv_misses``, ``kv_evictions``,
``preemptions``), in total and per instance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.simulator.ils import IlsInstance
from services.simulator.instances import InstanceBase, StepCost
from services.simulator.state import DONE, RequestTable
from shared.obs.metrics import WORKER_COUNTERS, InstanceUsage, RequestOutcome, occupancy
from shared.policy.kvlayout import LAYOUTS, PADDED
from shared.policy.presets import ILS_HF_PRESET, ILS_VLLM_PRESET, POLICIES
from shared.policy.types import SliceCost

#: The memory-bounded ILS baseline: the ``ils`` preset's routing (one request per batch,
#: least-requests), instances admitting and preempting by KV memory
#: (:class:`services.simulator.ils.VllmInstance`) instead of a concurrency cap.
VLLM_POLICY = ILS_VLLM_PRESET
#: Every policy name the simulator accepts: the presets it models. ``ils-hf``
#: (transformers' own continuous batching, a peer engine) is not modelled.
SIM_POLICIES: tuple[str, ...] = tuple(p for p in POLICIES if p != ILS_HF_PRESET)
#: Counters the simulator reports beside :func:`summarize`'s (the workers' names).
KV_COUNTERS = ("kv_hits", "kv_misses", "kv_evictions", "preemptions")


@dataclass(frozen=True)
class SimInstance:
    """One simulated instance: the policy's cost model and what really happens."""

    id: str
    cost: SliceCost  # the published profile the policy plans with
    memory_budget_bytes: int  # the whole budget beyond the weights: batches + KV pool
    context_limit: int
    truth: StepCost | None = None  # the engine's real behaviour; None: ``cost`` itself
    # Bytes of the budget kept for retained K/V (slice policies with retention on); None:
    # ``settings.kv_pool_capacity(memory_budget_bytes)``. Batches get the rest.
    kv_pool_bytes: int | None = None

    @property
    def engine(self) -> StepCost:
        """What the engine really does: ``truth``, else the published ``cost``."""
        return self.truth if self.truth is not None else self.cost  # type: ignore[return-value]


@dataclass(frozen=True)
class SimOptions:
    """Simulator knobs that the real system's settings do not have."""

    cycle_overhead_s: float = 0.0  # simulated seconds per scheduler cycle
    slice_overhead_s: float = 0.0  # per slice: commit + next job fetch on the worker
    max_tokens: int | None = None  # None: forced output lengths (max_tokens = output)
    ect_max_samples: int = 512  # bound on kept load samples (halved when reached)
    ect_interval_s: float = 1.0  # first sampling interval of the load (simulated s)
    # KV layout of the simulated slice engines (shared.policy.kvlayout): "padded" is the
    # engine as built; "ragged" prices each row's own tokens (a what-if)
    kv_layout: str = PADDED

    def __post_init__(self) -> None:
        if self.cycle_overhead_s < 0 or self.slice_overhead_s < 0:
            raise ValueError("overheads must be >= 0")
        if self.ect_max_samples < 2 or not self.ect_interval_s > 0:
            raise ValueError("need ect_max_samples >= 2 and ect_interval_s > 0")
        if self.kv_layout not in LAYOUTS:
            raise ValueError(f"unknown KV layout {self.kv_layout!r}; choose from "
                             f"{', '.join(LAYOUTS)}")


@dataclass
class LoadTimeline:
    """Per-instance expected completion time (s of estimated work) sampled over time."""

    instance_ids: list[str]
    times: list[float] = field(default_factory=list)
    loads: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # rows running, per instance
    kv_share: list[np.ndarray] = field(default_factory=list)  # KV held / memory budget

    def thin(self) -> None:
        """Keep every other sample (the bound on kept samples was reached)."""
        self.times, self.loads = self.times[::2], self.loads[::2]
        self.rows, self.kv_share = self.rows[::2], self.kv_share[::2]


def occupancy_metrics(metrics: dict[str, Any], timeline: LoadTimeline) -> None:
    """Running-set size (over samples where an instance runs something) and KV memory
    in use (share of each instance's budget, over every sample) into ``metrics``."""
    rows = np.concatenate(timeline.rows) if timeline.rows else np.zeros(0)
    kv = np.concatenate(timeline.kv_share) if timeline.kv_share else np.zeros(0)
    metrics.update(occupancy(rows.tolist(), kv.tolist()))


@dataclass
class SimResult:
    """Everything one simulation produced; ``metrics`` is :func:`summarize`'s dict plus
    ``oom_events``, ``events``, ``events_per_s``, ``sim_wall_s``, ``cycles``,
    ``simulated_s``, ``max_running`` and the :data:`KV_COUNTERS`."""

    metrics: dict[str, Any]
    outcomes: list[RequestOutcome]
    usage: list[InstanceUsage]
    counters: dict[str, float]
    timeline: LoadTimeline


def usage_of(insts: Sequence[InstanceBase]) -> tuple[list[InstanceUsage], dict[str, float]]:
    """Per-instance usage and the summed worker counters (every key any instance has)."""
    usage, total = [], dict.fromkeys((*WORKER_COUNTERS, *KV_COUNTERS), 0.0)
    for inst in insts:
        counters = dict(inst.counters)
        if isinstance(inst, IlsInstance):
            counters["busy_s"] = inst.busy_s
            counters["concurrency_s"] = inst.concurrency_s
        for key, value in counters.items():
            total[key] = total.get(key, 0.0) + value
        usage.append(InstanceUsage(inst.id, counters.get("busy_s", 0.0),
                                   int(counters.get("slices", 0)),
                                   int(counters.get("generated_tokens", 0)), counters))
    return usage, total


def kv_metrics(metrics: dict[str, Any], counters: dict[str, float],
               usage: Sequence[InstanceUsage]) -> None:
    """Add the :data:`KV_COUNTERS` to ``metrics``: totals, and per instance in its
    ``instances`` entries (which :func:`summarize` builds in ``usage``'s order)."""
    for key in KV_COUNTERS:
        metrics[key] = int(counters.get(key, 0))
    for entry, inst in zip(metrics.get("instances", []), usage, strict=False):
        entry.update({key: int(inst.counters.get(key, 0)) for key in
                      ("recomputed_tokens", *KV_COUNTERS)})


def outcomes_of(reqs: RequestTable) -> list[RequestOutcome]:
    """Every request's outcome, as the benchmark client would have recorded it."""
    ok = (reqs.status == DONE).tolist()
    e2e = (reqs.finish - reqs.arrival).tolist()
    ttft = (reqs.first_commit - reqs.arrival).tolist()
    queue = (reqs.first_claim - reqs.arrival).tolist()
    out = []
    for i, (index, sent, prompt, gen, slices) in enumerate(zip(
            reqs.index.tolist(), reqs.arrival.tolist(), reqs.prompt.tolist(),
            reqs.generated.tolist(), reqs.slices.tolist(), strict=True)):
        if ok[i]:
            out.append(RequestOutcome(index, True, sent, e2e[i], ttft[i],
                                      _finite(queue[i]), prompt, gen, slices,
                                      reqs.reason.get(i, "length")))
        else:
            error = reqs.error.get(i, "error: unknown")
            out.append(RequestOutcome(index, False, sent, prompt_tokens=prompt,
                                      slices=slices, finish_reason=error.split(":", 1)[0],
                                      error=error))
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
