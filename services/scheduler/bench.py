"""``scls scheduler-bench``: time one scheduling cycle (batching + offloading) alone.

No Redis, no model: synthetic pending requests whose context lengths follow the Azure LLM
conversation trace (or are sampled from it with ``--trace``), instances with a GPU-like
cost model (a 7B model on A100- and H100-class GPUs, each instance with its own slightly
different fitted profile, as workers profile themselves), and :func:`plan_cycle` timed
over repeats.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from shared.policy.admission import admission_cycle, continuation_cycle
from shared.policy.config import PolicyConfig
from shared.policy.costmodel import PREFILL_BASE, CostModel
from shared.policy.planning import plan_cycle
from shared.policy.presets import POLICIES
from shared.policy.types import Candidate, InstanceView
from shared.settings import Settings

# Inverse CDFs (quantile, tokens) of the Azure LLM 2023 conversation trace, interpolated
# in log space: context mean 1,155, median 1,020, p99 4,142; generated median 129.
_CONTEXT_QUANTILES = (
    (0.0, 2), (0.01, 29), (0.05, 181), (0.1, 207), (0.25, 396), (0.5, 1020), (0.75, 1189),
    (0.9, 2734), (0.95, 4083), (0.99, 4142), (0.999, 6179), (1.0, 14050),
)
_GENERATED_QUANTILES = (
    (0.0, 7), (0.01, 16), (0.05, 41), (0.1, 54), (0.25, 85), (0.5, 129), (0.75, 395),
    (0.9, 424), (0.95, 451), (0.99, 601), (0.999, 954), (1.0, 1000),
)

KV_BYTES_PER_TOKEN = 2 * 32 * 32 * 128 * 2  # Llama-2-7B, fp16
ACT_BYTES_PER_TOKEN = 2 * (6 * 4096 + 3 * 11008) * 2  # activation bound from the model shape
MEMORY_BUDGET = 60 * 10**9  # 80 GB card minus weights and a margin
CONTEXT_LIMIT = 16_384


def gpu_like_cost(prefill: tuple[float, float, float, float],
                  decode: tuple[float, float, float, float], jitter: float = 1.0) -> CostModel:
    """A :class:`CostModel` (the class the scheduler uses) with GPU-class coefficients:
    ``Tp = p0 + p1*b + p2*l + p3*b*l``, ``Td = d0 + d1*b + d2*c + d3*b*c``, memory = static
    KV cache + a per-token activation bound (Llama-2-7B shape, fp16)."""
    return CostModel(
        slice_length=32,
        prefill_features=PREFILL_BASE,
        prefill_coef=tuple(c * jitter for c in prefill),
        decode_coef=tuple(c * jitter for c in decode),  # type: ignore[arg-type]
        kv_bytes_per_token=KV_BYTES_PER_TOKEN,
        act_features=("1", "b", "bl", "bll"),
        act_coef=(0.0, 0.0, float(ACT_BYTES_PER_TOKEN), 0.0),
        mem_margin=1.0,
        source="synthetic",
    )


# ~10k prefill tokens/s and ~12 ms per decode step (A100); about twice as fast (H100).
A100 = ((0.015, 1e-4, 1e-6, 9e-5), (0.012, 1e-4, 1e-8, 3.3e-7))
H100 = ((0.010, 5e-5, 5e-7, 4.5e-5), (0.007, 5e-5, 5e-9, 1.6e-7))


def _from_quantiles(table: tuple[tuple[float, int], ...], rng: np.random.Generator,
                    n: int) -> np.ndarray:
    q, tokens = (np.array(col, dtype=np.float64) for col in zip(*table, strict=True))
    return np.exp(np.interp(rng.random(n), q, np.log(tokens))).round().astype(np.int64)


def _from_trace(path: Path, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(fh)]
    if not rows:
        raise typer.BadParameter(f"{path}: no rows", param_hint="--trace")
    picked = np.array(rows, dtype=np.int64)[rng.integers(0, len(rows), n)]
    return picked[:, 0], picked[:, 1]


def sample_lengths(
    n: int, rng: np.random.Generator, trace: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt tokens, generated tokens)`` of ``n`` requests: from ``trace`` when given,
    else from the built-in distribution fitted to the Azure conversation trace."""
    if trace is not None:
        return _from_trace(trace, rng, n)
    prompt = _from_quantiles(_CONTEXT_QUANTILES, rng, n)
    return prompt, _from_quantiles(_GENERATED_QUANTILES, rng, n)


def synthetic_candidates(
    n: int, rng: np.random.Generator, slice_length: int, trace: Path | None = None,
    instances: int = 0, retained: float = 0.0,
) -> list[Candidate]:
    """``n`` pending requests: prompts like the trace, some already a few slices in; a
    ``retained`` share of those have their K/V kept on one of ``instances`` instances."""
    prompt, generated = sample_lengths(n, rng, trace)
    # Re-queued requests carry the slices they already ran; new ones have none.
    slices_done = np.floor(rng.random(n) * np.ceil(generated / slice_length)).astype(np.int64)
    so_far = np.minimum(slices_done * slice_length, generated)
    arrival = rng.uniform(0.0, 60.0, n)  # shuffled: the policy must find the oldest
    kept = (so_far > 0) & (rng.random(n) < retained) & (instances > 0)
    home = rng.integers(0, max(instances, 1), n)
    return [
        Candidate(f"r{i}", int(p + g), int(max(1, 1024 - g)), float(a),
                  f"gpu-{h:04d}" if k else "")
        for i, (p, g, a, k, h) in enumerate(zip(prompt, so_far, arrival, kept, home,
                                               strict=True))
    ]


def synthetic_instances(k: int, rng: np.random.Generator, horizon_s: float) -> list[InstanceView]:
    """``k`` instances, A100- and H100-like alternately, each with its own jittered profile."""
    views = []
    for i in range(k):
        prefill, decode = A100 if i % 2 == 0 else H100
        cost = gpu_like_cost(prefill, decode, jitter=rng.uniform(0.95, 1.05))
        views.append(InstanceView(
            id=f"gpu-{i:04d}", cost=cost, memory_budget_bytes=MEMORY_BUDGET,
            context_limit=CONTEXT_LIMIT, expected_busy_s=float(rng.uniform(0.0, horizon_s)),
            queued_requests=int(rng.integers(0, 64)), queued_batches=int(rng.integers(0, 3)),
        ))
    return views


def _timed_ms(cycle: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and p90 milliseconds of ``repeat`` calls of ``cycle``."""
    times_ms = []
    for _ in range(repeat):
        start = time.perf_counter()
        cycle()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms), float(np.percentile(times_ms, 90))


def _report(what: str, cycle: Callable[[], object], repeat: int, json_file: Path | None,
            **fields: int) -> None:
    """Time ``cycle``; print ``what`` and the timings, and write them with ``fields`` to
    ``json_file`` when given."""
    median, p90 = _timed_ms(cycle, repeat)
    typer.echo(f"{what}\n  median {median:.2f} ms, p90 {p90:.2f} ms per cycle over {repeat} "
               "repeats")
    if json_file is not None:
        json_file.write_text(json.dumps({"median_ms": median, "p90_ms": p90, **fields,
                                         "repeat": repeat}, indent=2) + "\n")


def _admission_bench(pending: int, instances: int, rows: int, repeat: int,
                     trace: Path | None, rng: np.random.Generator, config: PolicyConfig,
                     json_file: Path | None) -> None:
    """Time :func:`admission_cycle` with ``rows`` running on every (open) instance, each
    set as wide as a trace-like context (``running_width`` 1,500 tokens)."""
    cands = synthetic_candidates(pending, rng, config.slice_length, trace)
    views = [replace(v, running_rows=rows, running_width=1500 if rows else 0)
             for v in synthetic_instances(instances, rng, config.horizon_s)]
    ids = {v.id for v in views}
    max_rows = Settings.model_fields["max_running"].default

    def cycle() -> list:  # noqa: ANN401
        return admission_cycle(cands, views, ids, config.slice_length, max_rows)[1]

    admitted = sum(len(a.rows) for a in cycle())
    _report(f"admission_cycle: {pending} pending, {instances} instances running {rows} rows "
            f"each -> {admitted} rows admitted", cycle, repeat, json_file, pending=pending,
            instances=instances, running_rows=rows, admitted=admitted)


def _continuation_bench(pending: int, instances: int, retained: float, repeat: int,
                        trace: Path | None, rng: np.random.Generator, config: PolicyConfig,
                        json_file: Path | None) -> None:
    """Time :func:`continuation_cycle`, the real scheduler's running-set cycle, with every
    instance open and a ``retained`` share of the re-queued requests kept on one."""
    cands = synthetic_candidates(pending, rng, config.slice_length, trace, instances, retained)
    views = synthetic_instances(instances, rng, config.horizon_s)
    ids = {v.id for v in views}
    max_rows = Settings.model_fields["max_running"].default

    def cycle() -> list:  # noqa: ANN401
        return continuation_cycle(cands, views, ids, config.slice_length, max_rows)[1]

    slices = cycle()
    kept = sum(len(c.continuing) for c in slices)
    admitted = sum(len(c.fresh) for c in slices)
    _report(f"continuation_cycle: {pending} pending ({sum(1 for c in cands if c.kv_instance)} "
            f"kept on an instance), {instances} open instances -> {kept} rows continue, "
            f"{admitted} fresh rows admitted", cycle, repeat, json_file, pending=pending,
            instances=instances, continuing=kept, admitted=admitted)


def scheduler_bench_command(
    pending: Annotated[int, typer.Option(min=1, help="pending requests per cycle")] = 1000,
    instances: Annotated[int, typer.Option(min=1, help="live instances")] = 16,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="write the results to this JSON file")
    ] = None,
    repeat: Annotated[int, typer.Option(min=1, help="timed cycles")] = 30,
    trace: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="sample lengths from this trace CSV"),
    ] = None,
    policy: Annotated[str, typer.Option(help=f"preset: {', '.join(POLICIES)}")] = "scls",
    candidate_limit: Annotated[
        int | None, typer.Option(min=1, help="requests the batcher sees (default: policy's)")
    ] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    retained: Annotated[
        float, typer.Option(min=0.0, max=1.0,
                            help="share of re-queued requests whose K/V an instance keeps")
    ] = 1.0,
    running_rows: Annotated[
        int | None, typer.Option(
            min=0, help="time the running-set admission instead (SCLS_RUNNING_SET): every "
                        "instance runs this many rows (0: empty sets, everything admits)")
    ] = None,
    continuation: Annotated[
        bool, typer.Option(help="time the real scheduler's running-set cycle "
                                "(continuation_cycle, every instance open)")
    ] = False,
) -> None:
    """Time one scheduling cycle (batching + offloading) on synthetic load; no Redis."""
    if policy not in POLICIES:
        raise typer.BadParameter(f"choose from {', '.join(POLICIES)}", param_hint="--policy")
    limit = candidate_limit or PolicyConfig().candidate_limit
    config = PolicyConfig.preset(policy, candidate_limit=limit)
    rng = np.random.default_rng(seed)
    if running_rows is not None:
        _admission_bench(pending, instances, running_rows, repeat, trace, rng, config,
                         json_file)
        return
    if continuation:
        _continuation_bench(pending, instances, retained, repeat, trace, rng, config,
                            json_file)
        return
    cands = synthetic_candidates(pending, rng, config.slice_length, trace, instances, retained)
    views = synthetic_instances(instances, rng, config.horizon_s)
    plan = plan_cycle(cands, views, config, now=60.0)  # warm-up, and the plan to report
    median, p90 = _timed_ms(lambda: plan_cycle(cands, views, config, now=60.0), repeat)
    seen = min(pending, limit)
    formed = len(plan.batches) + len(plan.unplaced)
    homed = sum(1 for c in cands if c.kv_instance)
    resumed = sum(p.resumed_rows for p in plan.batches)
    typer.echo(
        f"plan_cycle [{policy}]: {pending} pending ({seen} seen by the batcher, {homed} with "
        f"retained K/V), {instances} instances -> {formed} batches, {len(plan.batches)} "
        f"placed ({resumed} rows resume at home)\n"
        f"  median {median:.2f} ms, p90 {p90:.2f} ms per cycle over {repeat} repeats"
    )
    if json_file is not None:
        result = {
            "median_ms": median, "p90_ms": p90, "pending": pending, "instances": instances,
            "candidates_seen": seen, "policy": policy, "repeat": repeat,
            "batches": formed, "placed": len(plan.batches), "retained_share": retained,
            "candidates_with_kv": homed, "rows_resumed": resumed,
        }
        json_file.write_text(json.dumps(result, indent=2) + "\n")
