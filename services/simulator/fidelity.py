"""``scls fidelity``: the same workload through the real system and through the simulator,
and how far apart they land.

Per policy: a fresh local deployment serves the workload over HTTP (exactly as
``scls bench`` does); then the simulator replays it with the profiles the real workers
published (their own measured cost models and memory budgets), the same settings, and the
system overheads measured from that run's batch timestamps (claim-to-start dispatch and the
in-job time around the engine, see :func:`services.bench.runner.slice_overheads`) and the
scheduler's reaction time (the 10th percentile of queue time: arrival to first claim when
nothing is ahead). The overheads are per-slice constants of the machine, not fitted to the
compared metrics.

The profiles are measured with one worker computing alone; in the real run the workers
share the machine with each other and with the rest of the deployment, so their engines run
slower than profiled. Each worker counts both its measured engine seconds and what its own
cost model gives the slices it ran (``model_busy_s``); their ratio, per instance, scales
that instance's *truth* model in the simulator (what its simulated engine really takes)
while the policy still plans with the published profile, as the real scheduler does. ILS
workers price each iteration of transformers' loop as the simulated ILS engine does
(:meth:`shared.policy.costmodel.CostModel.iteration_time`), so theirs is measured the same way.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.bench.client import ClientConfig
from services.bench.command import arrivals_for, build_workload
from services.bench.runner import run_policy
from services.config import workload_settings
from services.simulator import SimOptions, simulate_metrics
from shared.bench.report import json_safe
from shared.bench.workload import SyntheticLengths, WorkItem, describe
from shared.modeling.registry import model_info
from shared.policy.costmodel import CostModel
from shared.settings import Settings


def relative_error(simulated: float, real: float) -> float:
    """(simulated - real) / real; NaN when the real value is 0 or missing."""
    if not isinstance(real, int | float) or not real or math.isnan(real):
        return math.nan
    return (simulated - real) / real


def simulate_like(real: dict[str, Any], policy: str, items: list[WorkItem],
                  settings: Settings) -> dict[str, Any]:
    """Simulate ``items`` on instances shaped like the real run's workers."""
    profiles = list(real["instance_profiles"].values())
    costs = [CostModel.from_json(entry[0]) for entry in profiles]
    split = [whole_budget(entry, settings) for entry in profiles]
    budgets = [budget for budget, _pool in split]
    pools = [pool for _budget, pool in split]
    contexts = [int(entry[2]) for entry in profiles]
    slowdown = engine_slowdowns(real)
    ids = list(real["instance_profiles"])
    truths = [cost.time_scaled(slowdown.get(iid, 1.0)) for iid, cost in zip(ids, costs,
                                                                            strict=True)]
    overheads = real["overheads"]
    options = SimOptions(slice_overhead_s=overheads["dispatch_s"] + overheads["in_job_s"],
                         cycle_overhead_s=overheads.get("reaction_s", 0.0))
    return simulate_metrics(items, policy, len(costs), costs, truths=truths,
                            memory_budget_bytes=budgets, context_limit=contexts,
                            settings=settings, options=options, kv_pool_bytes=pools)


def whole_budget(entry: Sequence[Any], settings: Settings) -> tuple[int, int]:
    """``(whole memory budget, KV pool bytes)`` of a real instance from its published
    ``(profile, memory_budget_bytes, context_limit, mode[, kv_pool_bytes])``.

    A worker publishes its *batch* budget, its pool beside it; the simulator takes the
    whole budget and the pool. A run that did not record the pool gets the one the
    settings give a slice worker with retention on (``kv_pool_capacity`` of the whole
    budget, solved for it from the batch budget)."""
    batch = int(entry[1])
    if len(entry) > 4 and entry[4] is not None:
        return batch + int(entry[4]), int(entry[4])
    if (len(entry) > 3 and entry[3] != "slice") or not settings.kv_retention:
        return batch, 0
    if settings.kv_pool_bytes is not None:
        return batch + settings.kv_pool_bytes, settings.kv_pool_bytes
    whole = int(batch / (1.0 - settings.kv_pool_share))
    return whole, whole - batch


def engine_slowdowns(real: dict[str, Any]) -> dict[str, float]:
    """Per instance id, measured engine time over its cost model's time for the same
    slices (only where it was measured)."""
    out = {}
    for inst in real.get("instances", []):
        ratio = inst.get("engine_time_ratio")
        if isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0:
            out[inst["id"]] = ratio
    return out


def compare(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, float]:
    """The fidelity figures of one policy.

    The simulator models the server (arrival to finish); the HTTP edge in front of it (the
    client's latency minus the server's own, measured per request in the real run) is
    added to its mean latency so both sides measure the same span.
    """
    edge = real.get("edge_latency_mean_s")
    edge = edge if isinstance(edge, float) and math.isfinite(edge) else 0.0
    sim = {**sim, "latency_mean_s": sim["latency_mean_s"] + edge}
    return {
        "real_req_per_s": real["req_per_s"], "sim_req_per_s": sim["req_per_s"],
        "throughput_rel_err": relative_error(sim["req_per_s"], real["req_per_s"]),
        "real_latency_mean_s": real["latency_mean_s"],
        "sim_latency_mean_s": sim["latency_mean_s"],
        "latency_mean_rel_err": relative_error(sim["latency_mean_s"],
                                               real["latency_mean_s"]),
        "real_completed": real["completed"], "sim_completed": sim["completed"],
        "slice_overhead_s": real["overheads"]["dispatch_s"] + real["overheads"]["in_job_s"],
        "edge_latency_s": edge,
        "engine_time_ratio": real.get("engine_time_ratio"),
    }


def fidelity_command(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-random or a model dir")]
    = "tiny-random",
    workers: Annotated[int, typer.Option(min=1, help="workers (and simulated instances)")] = 2,
    policies: Annotated[str, typer.Option(help="comma-separated presets")] = "scls,sls,ils",
    requests: Annotated[int, typer.Option(min=1, help="requests per run")] = 200,
    trace: Annotated[Path | None, typer.Option(help="CSV: TIMESTAMP, ContextTokens, "
                                               "GeneratedTokens (default: synthetic)")] = None,
    length_scale: Annotated[float, typer.Option(min=0.0001, help="scale lengths")] = 1.0,
    rate: Annotated[float | None, typer.Option(min=0.0001, help="Poisson arrivals, req/s "
                                               "(default: as recorded / all at once)")]
    = None,
    seed: Annotated[int, typer.Option(help="workload seed")] = 0,
    slice_length: Annotated[int | None, typer.Option(min=1, help="S")] = None,
    profile_mode: Annotated[str | None, typer.Option(help="workers' profiling mode")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="write the figures "
                                                   "here")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for the real runs' logs")]
    = None,
) -> None:
    """Run a workload on the real system and in the simulator; print their differences."""
    from services.simulator.results import SIM_POLICIES

    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [n for n in names if n not in SIM_POLICIES]
    if not names or unknown:
        typer.echo(f"error: unknown or no policy {', '.join(unknown)}; choose from "
                   f"{', '.join(SIM_POLICIES)} (ils-hf runs transformers' engine, which "
                   "the simulator does not model)", err=True)
        raise typer.Exit(2)
    try:
        items = build_workload(trace, requests, length_scale, 1.0, seed, SyntheticLengths())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    timed = arrivals_for(items, rate, 1.0, trace is not None, seed)
    settings = workload_settings(model, workers, slice_length, None, None, profile_mode, items)
    info = model_info(settings.model, settings.cache_dir)
    client = ClientConfig(base_url="", model=settings.model, vocab_size=info.vocab_size,
                          seed=seed)
    out_dir = out or Path(tempfile.mkdtemp(prefix="scls-fidelity-"))
    console = Console(stderr=True)
    results: dict[str, Any] = {}
    for policy in names:
        console.print(f"{policy}: real run ...")
        real = run_policy(settings, policy, timed, client, rate, out_dir / policy).metrics
        console.print(f"{policy}: simulating ...")
        sim = simulate_like(real, policy, timed, settings.model_copy(update={"policy": policy}))
        results[policy] = compare(real, sim)
    console.print(_table(results))
    doc = {"command": "scls fidelity " + " ".join(sys.argv[2:]),
           "workload": describe(timed), "policies": results}
    text = json.dumps(json_safe(doc), indent=2)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(text + "\n")
    sys.stdout.write(text + "\n")


def _table(results: dict[str, dict[str, float]]) -> Table:
    table = Table(title="fidelity: simulated vs real")
    for name in ("policy", "real req/s", "sim req/s", "thr err", "real mean s", "sim mean s",
                 "lat err"):
        table.add_column(name, justify="left" if name == "policy" else "right")
    for policy, r in results.items():
        table.add_row(policy, f"{r['real_req_per_s']:.3f}", f"{r['sim_req_per_s']:.3f}",
                      f"{r['throughput_rel_err']:+.1%}", f"{r['real_latency_mean_s']:.3f}",
                      f"{r['sim_latency_mean_s']:.3f}", f"{r['latency_mean_rel_err']:+.1%}")
    return table
