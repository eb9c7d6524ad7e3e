"""``scls simulate``: discrete-event simulation of the scheduler and its instances.

The simulator runs the scheduler's own policy code
(:func:`shared.policy.planning.plan_cycle`, :class:`shared.policy.config.DispatchCaps`,
:func:`shared.policy.presets.expected_busy`) against simulated slice and ILS instances
whose time and memory come from cost models, and reports the same metrics as
``scls bench`` (:func:`shared.obs.metrics.summarize`). See docs/simulator.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.simulator.engine import (
    SIM_POLICIES,
    VLLM_POLICY,
    LoadTimeline,
    SimInstance,
    SimOptions,
    SimResult,
    simulate,
)
from services.simulator.instances import StepCost
from shared.bench.workload import WorkItem
from shared.policy.costmodel import CostModel
from shared.settings import Settings

__all__ = ["SIM_POLICIES", "VLLM_POLICY", "LoadTimeline", "SimInstance", "SimOptions",
           "SimResult", "simulate", "simulate_metrics", "uniform_instances"]


def uniform_instances(
    count: int,
    costs: CostModel | Sequence[CostModel],
    memory_budget_bytes: int | Sequence[int],
    context_limit: int | Sequence[int],
    truths: StepCost | Sequence[StepCost] | None = None,
    prefix: str = "sim",
    kv_pool_bytes: int | Sequence[int | None] | None = None,
) -> list[SimInstance]:
    """``count`` instances ``<prefix>-0000``...; each argument is one value for all or one
    per instance. ``memory_budget_bytes`` is the whole budget (batches and KV pool);
    ``kv_pool_bytes`` None: the pool the settings give it."""
    def pick(value: Any, k: int) -> Any:
        return value[k] if isinstance(value, list | tuple) else value

    return [SimInstance(f"{prefix}-{k:04d}", pick(costs, k), int(pick(memory_budget_bytes, k)),
                        int(pick(context_limit, k)), pick(truths, k), pick(kv_pool_bytes, k))
            for k in range(count)]


def simulate_metrics(
    workload: Sequence[WorkItem],
    policy: str,
    instances: int,
    costs: CostModel | Sequence[CostModel],
    truths: StepCost | Sequence[StepCost] | None = None,
    memory_budget_bytes: int | Sequence[int] | None = None,
    context_limit: int | Sequence[int] = 4096,
    settings: Settings | None = None,
    options: SimOptions | None = None,
    kv_pool_bytes: int | Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """The metrics dict of :func:`shared.obs.metrics.summarize` (plus the simulator's extras)
    for ``workload`` served by ``instances`` instances under preset ``policy``.

    ``costs`` are the profiles the policy plans with (one for all or one per instance),
    ``truths`` what the engines really do (default: ``costs``). ``settings`` supplies the
    scheduler knobs (S, G, max batch, horizon, caps, candidate limit, retries); its
    ``policy`` is replaced by ``policy`` (a preset or ``ils-vllm``) and, when
    ``memory_budget_bytes`` is None, its ``memory_budget_bytes`` is every instance's
    budget. The budget is the whole one: with K/V retention the instance's pool
    (``kv_pool_bytes``, None: ``settings.kv_pool_capacity(budget)``) comes out of it.
    """
    base = settings if settings is not None else Settings()
    run_settings = base.model_copy(update={"policy": policy})
    budget = base.memory_budget_bytes if memory_budget_bytes is None else memory_budget_bytes
    specs = uniform_instances(instances, costs, budget, context_limit, truths,
                              kv_pool_bytes=kv_pool_bytes)
    return simulate(workload, specs, run_settings, options or SimOptions()).metrics
