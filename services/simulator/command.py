"""``scls simulate``: compare policies on simulated instances (no GPU, no Redis).

Typer-compatible; the CLI registers it with ``app.command("simulate")(simulate_command)``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.config import build_settings
from services.simulator.engine import KV_COUNTERS, SIM_POLICIES, SimOptions, SimResult, simulate
from services.simulator.profiles import BUILTIN, Profile, load_profile
from services.simulator.workloads import at_rate, build_workload
from shared.bench.report import Run, rich_table, write_load_plot, write_report, write_results
from shared.bench.workload import WorkItem, describe, scale_length
from shared.policy.kvlayout import LAYOUTS, PADDED
from shared.settings import Settings


def _floats(text: str | None, hint: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=hint) from None


def simulate_command(
    policies: Annotated[str, typer.Option(
        help=f"comma-separated: {', '.join(SIM_POLICIES)} (ils-vllm: ILS engines bounded by "
             "paged-KV memory, with preemption by recompute)")]
    = "scls,sls,ils",
    instances: Annotated[str, typer.Option(
        help="simulated instances: a count (of --profile), or a fleet of COUNT:PROFILE "
             "groups, e.g. 8:a100-llama2-7b,8:h100-llama2-7b")] = "4",
    profile: Annotated[str, typer.Option(
        help=f"built-in ({', '.join(BUILTIN)}) or a `scls profile --json` file")]
    = "a100-llama2-7b",
    truth_profile: Annotated[str | None, typer.Option(
        help="what the engines really do (default: --profile)")] = None,
    trace: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="TIMESTAMP,ContextTokens,GeneratedTokens CSV")] = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="log-normal lengths fitted to the Azure conversation trace")]
    = False,
    requests: Annotated[int | None, typer.Option(
        min=1, help="requests (a trace is tiled, shifted in time, to reach it)")] = None,
    length_scale: Annotated[float, typer.Option(min=0.0001, help="multiply lengths")] = 1.0,
    output_scale: Annotated[float, typer.Option(
        min=0.0001, help="multiply output lengths only (e.g. 0.25: a prefill-heavy "
                         "workload)")] = 1.0,
    time_scale: Annotated[float, typer.Option(
        min=0.0001, help="divide the trace's arrival times (speed it up)")] = 1.0,
    rate: Annotated[float | None, typer.Option(min=0.0001, help="Poisson/gamma rate, req/s")]
    = None,
    rates: Annotated[str | None, typer.Option(help="several rates: R1,R2,...")] = None,
    burstiness: Annotated[float, typer.Option(min=0.0001, help="gamma shape (1 = Poisson)")]
    = 1.0,
    slice_length: Annotated[int | None, typer.Option(min=1, help="S (default: settings)")]
    = None,
    max_batch: Annotated[int | None, typer.Option(min=1, help="max batch (default: settings)")]
    = None,
    kv_retention: Annotated[bool | None, typer.Option(
        "--kv-retention/--no-kv-retention",
        help="slice instances keep unfinished requests' K/V in a pool between slices "
             "(default: settings, on)")] = None,
    running_set: Annotated[bool | None, typer.Option(
        "--running-set/--no-running-set",
        help="slice instances keep one running set: unfinished rows continue into the next "
             "slice with the rows the scheduler admits (default: settings, off)")] = None,
    kv_layout: Annotated[str, typer.Option(
        help="KV layout of every simulated engine, slice and ILS: padded (the engine as "
             "built) or ragged (each row's own tokens, as vLLM's paged cache: a what-if)")]
    = PADDED,
    memory_budget: Annotated[int | None, typer.Option(
        min=1, help="bytes per instance beyond the weights (default: the profile's)")] = None,
    context_limit: Annotated[int | None, typer.Option(
        min=1, help="context window (default: the profile's)")] = None,
    cycle_overhead: Annotated[float, typer.Option(
        min=0.0, help="simulated seconds per scheduler cycle")] = 0.0,
    slice_overhead: Annotated[float, typer.Option(
        min=0.0, help="simulated seconds per slice commit (worker side)")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    json_file: Annotated[Path | None, typer.Option(
        "--json", help="write the results document here")] = None,
    out: Annotated[Path | None, typer.Option(
        help="write results.json, report.md and plots into this folder")] = None,
) -> None:
    """Simulate the scheduler with each policy on simulated GPU instances and compare."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in SIM_POLICIES]
    if unknown or not names:
        raise typer.BadParameter(f"unknown {unknown}; choose from {', '.join(SIM_POLICIES)}",
                                 param_hint="--policies")
    if trace is not None and synthetic:
        raise typer.BadParameter("give --trace or --synthetic, not both", param_hint="--trace")
    if kv_layout not in LAYOUTS:
        raise typer.BadParameter(f"choose from {', '.join(LAYOUTS)}", param_hint="--kv-layout")
    settings = _settings(slice_length, max_batch, kv_retention, running_set)
    fleet = _fleet(instances, profile, truth_profile, settings, memory_budget, context_limit)
    plan_prof, truth_prof = fleet[0][1], fleet[0][2]
    base = build_workload(trace, requests, length_scale, time_scale, seed)
    if output_scale != 1.0:
        base = [replace(w, output_tokens=scale_length(w.output_tokens, output_scale))
                for w in base]
    rate_list: list[float | None] = [*_floats(rates, "--rates")] or [rate]
    console = Console(stderr=True)
    runs, timelines = [], {}
    for r in rate_list:
        items = at_rate(base, r, burstiness, seed)
        for name in names:
            result = _run_one(items, name, fleet, settings,
                              SimOptions(cycle_overhead_s=cycle_overhead,
                                         slice_overhead_s=slice_overhead,
                                         kv_layout=kv_layout))
            console.print(f"{name} at {'trace' if r is None else f'{r:g} req/s'}: "
                          f"{result.metrics['completed']}/{result.metrics['sent']} done, "
                          f"{result.metrics['req_per_s']:.3f} req/s, "
                          f"{result.metrics['events']} events in "
                          f"{result.metrics['sim_wall_s']:.1f} s")
            result.metrics["offered_rate"] = describe(items)["offered_rate"]
            runs.append(Run(name, r, result.metrics))
            timelines[name] = (result.timeline.times, result.timeline.loads)
    meta = _meta(plan_prof, truth_prof, settings, fleet, base, cycle_overhead,
                 slice_overhead, seed)
    meta["kv_layout"] = kv_layout
    meta["output_scale"] = output_scale
    baseline = "scls" if "scls" in names else names[0]
    title = f"scls simulate: {_fleet_name(fleet)}"
    Console().print(rich_table(runs, baseline, title))
    Console().print(kv_table(runs))
    if json_file is not None:
        write_results(json_file, runs, meta)
        console.print(f"wrote {json_file}")
    if out is not None:
        written = write_report(out, runs, meta, baseline, title)
        plot = write_load_plot(out, timelines)
        with (out / "report.md").open("a") as fh:
            fh.write(f"![{plot.stem}]({plot.name})\n\n{kv_markdown(runs)}\n")
        console.print(f"wrote {', '.join(str(p) for p in [*written, plot])}")


#: The recomputation and KV columns: (metric, label).
KV_COLUMNS = (("req_per_s", "req/s"), ("latency_mean_s", "E2E mean s"),
              ("recomputed_tokens", "recomputed tok"), ("kv_hits", "KV hits"),
              ("kv_misses", "KV misses"), ("kv_evictions", "KV evictions"),
              ("preemptions", "preemptions"))


def _kv_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        m = run.metrics
        rate = "" if run.rate is None else f" @ {run.rate:g}"
        rows.append([run.policy + rate, *(f"{m.get(k, 0):.3f}" if k == "req_per_s" else
                                          f"{m.get(k, 0):.2f}" if k.endswith("_s") else
                                          f"{int(m.get(k, 0)):,}" for k, _ in KV_COLUMNS)])
    return rows


def kv_table(runs: list[Run]) -> Table:
    """Recomputed tokens and the KV counters (:data:`KV_COUNTERS`) per run."""
    assert set(KV_COUNTERS) <= {k for k, _ in KV_COLUMNS}
    table = Table(title="recomputation and KV retention")
    for i, (_, label) in enumerate((("policy", "policy"), *KV_COLUMNS)):
        table.add_column(label, justify="left" if i == 0 else "right")
    for row in _kv_rows(runs):
        table.add_row(*row)
    return table


def kv_markdown(runs: list[Run]) -> str:
    """The same as :func:`kv_table`, as a markdown section of ``report.md``."""
    header = ["policy", *(label for _, label in KV_COLUMNS)]
    lines = ["## Recomputation and KV retention", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _kv_rows(runs)]
    return "\n".join(lines) + "\n"


def _settings(slice_length: int | None, max_batch: int | None,
              kv_retention: bool | None = None, running_set: bool | None = None) -> Settings:
    return build_settings(slice_length=slice_length, max_batch_size=max_batch,
                          kv_retention=kv_retention, running_set=running_set)


#: One group of a simulated fleet: how many instances, planning profile, truth profile.
Group = tuple[int, Profile, Profile]


def _fleet(instances: str, profile: str, truth: str | None, settings: Settings,
           memory_budget: int | None, context_limit: int | None) -> list[Group]:
    """Parse ``--instances``: a count of ``--profile`` instances, or ``COUNT:PROFILE``
    groups (each its own truth; ``--truth-profile`` applies to a count only)."""
    hint = "--instances"
    text = instances.strip()
    if text.isdigit():
        if int(text) < 1:
            raise typer.BadParameter("need at least one instance", param_hint=hint)
        plan, real = _profiles(profile, truth, settings, memory_budget, context_limit)
        return [(int(text), plan, real)]
    groups = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        count, _, name = part.partition(":")
        if not count.strip().isdigit() or int(count) < 1 or not name.strip():
            raise typer.BadParameter(
                f"{part!r}: give a count, or COUNT:PROFILE groups such as "
                "8:a100-llama2-7b,8:h100-llama2-7b", param_hint=hint)
        if truth is not None:
            raise typer.BadParameter("--truth-profile applies to a plain count of instances",
                                     param_hint="--truth-profile")
        plan, real = _profiles(name.strip(), None, settings, memory_budget, context_limit)
        groups.append((int(count), plan, real))
    if not groups:
        raise typer.BadParameter("need at least one instance", param_hint=hint)
    return groups


def _fleet_name(fleet: list[Group]) -> str:
    """``16 x a100-llama2-7b`` or ``8 x a100-llama2-7b + 8 x h100-llama2-7b``."""
    return " + ".join(f"{count} x {plan.name}" for count, plan, _ in fleet)


def _profiles(profile: str, truth: str | None, settings: Settings, memory_budget: int | None,
              context_limit: int | None) -> tuple[Profile, Profile]:
    try:
        plan = load_profile(profile, settings.slice_length, memory_budget, context_limit)
        real = plan if truth is None else load_profile(truth, settings.slice_length,
                                                       memory_budget, context_limit)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from None
    return plan, real


def _run_one(items: list[WorkItem], policy: str, fleet: list[Group], settings: Settings,
             options: SimOptions) -> SimResult:
    from services.simulator import uniform_instances

    specs = []
    for count, plan, truth in fleet:
        prefix = "sim" if len(fleet) == 1 else plan.name
        specs += uniform_instances(count, plan.cost, plan.memory_budget_bytes,
                                   plan.context_limit, truth.cost, prefix)
    return simulate(items, specs, settings.model_copy(update={"policy": policy}), options)


def _meta(plan: Profile, truth: Profile, settings: Settings, fleet: list[Group],
          items: list[WorkItem], cycle_overhead: float, slice_overhead: float,
          seed: int) -> dict[str, Any]:
    return {
        "command": " ".join(["scls", *sys.argv[1:]]),
        "tool": "simulate",
        "instances": sum(count for count, _, _ in fleet),
        "fleet": [{"count": count, "profile": p.name, "truth_profile": t.name}
                  for count, p, t in fleet],
        "profile": {"name": plan.name, "source": plan.source,
                    "memory_budget_bytes": plan.memory_budget_bytes,
                    "context_limit": plan.context_limit},
        "truth_profile": truth.name,
        "settings": {k: getattr(settings, k) for k in (
            "slice_length", "max_gen_length", "max_batch_size", "horizon_s", "max_wait_s",
            "candidate_limit", "max_queued_batches", "ils_max_concurrency", "max_retries",
            "kv_retention", "kv_pool_bytes", "kv_pool_share", "running_set", "max_running")},
        "cycle_overhead_s": cycle_overhead,
        "slice_overhead_s": slice_overhead,
        "seed": seed,
        "workload": describe(items),
    }
