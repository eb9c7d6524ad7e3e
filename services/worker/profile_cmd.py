"""``scls profile``: profile the slice engine on this machine, fit, print the held-out error.

The function is Typer-compatible (options are ``Annotated`` ``typer.Option``s); the CLI
registers it with ``app.command("profile")(profile_command)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.worker.fit import FitReport
from services.worker.samples import ProfileSamples
from shared.policy.costmodel import DECODE_FEATURES, CostModel
from shared.settings import Settings


def profile_command(
    model: Annotated[
        str | None, typer.Option(help="smollm2-135m, tiny-random or a local HF model directory")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick/--full", help="small grid (tests, CI) or the full grid")
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write the errors and coefficients here")
    ] = None,
    reprofile: Annotated[
        bool,
        typer.Option(
            "--reprofile/--use-cache",
            help="measure now (default) or reuse this machine's cached profile if it matches",
        ),
    ] = True,
    slice_length: Annotated[
        int | None, typer.Option(min=1, help="slice length S (default: settings)")
    ] = None,
) -> None:
    """Profile the slice engine, fit the time/memory model, print coefficients and the
    held-out error (slice-time MAPE and max error, memory estimate/measured ratio)."""
    from shared.modeling.registry import resolve_model_name

    overrides = {"model": model, "slice_length": slice_length}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    try:
        resolve_model_name(settings.model)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    console = Console()
    result = run_profile_command(settings, quick, reprofile, console)
    print_result(console, result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1, sort_keys=True))
        console.print(f"wrote {json_path}")


def run_profile_command(
    settings: Settings, quick: bool, reprofile: bool, console: Console
) -> dict[str, Any]:
    """Load the model, profile (or reuse the cache) and return the JSON-able result."""
    import torch

    from services.worker import profile_cache, profiler
    from shared.modeling.loading import load_model

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    loaded = load_model(settings.model, settings.cache_dir, settings.device)
    grid = profiler.QUICK_GRID if quick else profiler.FULL_GRID
    key = profile_cache.cache_key(loaded, settings, grid)
    path = profile_cache.cache_path(loaded, settings, grid)
    report = samples = None
    with profile_cache.profile_lock(path):  # never measure while a worker here is profiling
        cached = None if reprofile else profile_cache.read_cached(path, key)
        if cached is not None:
            console.print(f"using the cached profile {path}")
            cost = cached
        else:
            memory = profile_cache.profile_memory_limit(loaded, settings)
            limit = "" if memory is None else (
                f", memory limit {memory.limit_bytes / 2**30:.1f} GiB ({memory.source})")
            console.print(f"profiling {loaded.info.name} on {loaded.device}, grid {grid.name}"
                          f"{limit}")
            try:
                cost, report, samples = profiler.profile_and_fit(
                    loaded, settings.slice_length, grid,
                    progress=lambda m: console.print(f"  {m}"), memory=memory,
                )
            except ValueError as exc:  # no grid point fits in memory, or too few to fit
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            cost = profile_cache.with_cache_key(cost, key)
            profile_cache.save_profile(cost, path)  # workers with the same settings reuse it
    return result_dict(cost, report, samples, time.perf_counter() - started, path)


def result_dict(
    cost: CostModel,
    report: FitReport | None,
    samples: ProfileSamples | None,
    seconds: float,
    path: Path,
) -> dict[str, Any]:
    """What ``--json`` writes: held-out errors, coefficients, grid, model, device."""
    errors = dict(cost.errors)
    return {
        "time_mape": errors.get("time_mape"),
        "time_max_err": errors.get("time_max_err"),
        "mem_ratio_min": errors.get("mem_ratio_min"),
        "mem_ratio_max": errors.get("mem_ratio_max"),
        "memory_method": cost.meta.get("memory_method"),
        "heap_overhead": cost.heap_overhead,
        "process_ratio_min": errors.get("process_ratio_min"),
        "process_ratio_max": errors.get("process_ratio_max"),
        "resume_ratio_min": errors.get("resume_ratio_min"),
        "resume_ratio_max": errors.get("resume_ratio_max"),
        "n_points": errors.get("n_points"),
        "n_heldout": errors.get("n_heldout"),
        "prefill_features": list(cost.prefill_features),
        "decode_features": None if report is None else list(report.decode_features),
        "coefficients": coefficients(cost),
        "cv_mape": None if report is None else dict(report.cv_mape),
        "heldout": None if report is None else report.to_dict()["heldout"],
        "grid": cost.meta.get("grid"),
        "model": cost.model,
        "device": cost.device,
        "dtype": cost.dtype,
        "slice_length": cost.slice_length,
        "torch_threads": cost.meta.get("torch_threads"),
        "profile_seconds": cost.meta.get("profile_s"),
        "memory_limit_bytes": cost.meta.get("memory_limit_bytes"),
        "skipped_points": cost.meta.get("skipped_points"),
        "total_seconds": round(seconds, 2),
        "cached": report is None,
        "cache_file": str(path),
        "samples": None if samples is None else samples.to_dict(),
        "cost_model": cost.to_dict(),
    }


def coefficients(cost: CostModel) -> dict[str, Any]:
    """Named coefficients of every term."""
    return {
        "prefill": dict(zip(cost.prefill_features, cost.prefill_coef, strict=True)),
        "decode": {
            **dict(zip(DECODE_FEATURES, cost.decode_coef, strict=True)),
            "b2": cost.decode_batched_extra,
        },
        "activation": dict(zip(cost.act_features, cost.act_coef, strict=True)),
        "kv_bytes_per_token": cost.kv_bytes_per_token,
        "mem_margin": cost.mem_margin,
        "heap_overhead": cost.heap_overhead,
        "grammar_token_s": cost.grammar_token_s,
    }


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted, or ``n/a`` when missing."""
    return "n/a" if value is None else format(value, spec)


def print_result(console: Console, result: dict[str, Any]) -> None:
    """Rich tables: coefficients, held-out points, and the summary errors."""
    coef = result["coefficients"]
    table = Table(title=f"cost model of {result['model']} on {result['device']} "
                        f"(S={result['slice_length']})")
    table.add_column("term")
    table.add_column("feature")
    table.add_column("coefficient", justify="right")
    for part, unit in (("prefill", "s"), ("decode", "s"), ("activation", "B")):
        for name, value in coef[part].items():
            table.add_row(part, name, f"{value:.4g} {unit}")
    table.add_row("memory", "kv bytes/token", str(coef["kv_bytes_per_token"]))
    table.add_row("memory", "margin", f"{coef['mem_margin']:.4f}")
    table.add_row("memory", "heap overhead", f"{coef.get('heap_overhead', 1.0):.4f}")
    table.add_row("masks", "per constrained token", f"{coef.get('grammar_token_s', 0.0):.4g} s")
    console.print(table)
    if result["heldout"]:
        held = Table(title="held-out grid points (not used for the fit)")
        for col in ("b", "l", "slice s", "estimate s", "error", "peak MiB", "estimate MiB",
                    "ratio", "process MiB", "process ratio"):
            held.add_column(col, justify="right")
        for r in result["heldout"]:
            held.add_row(
                f"{r['b']:.0f}", f"{r['l']:.0f}", f"{r['slice_s']:.4f}", f"{r['est_s']:.4f}",
                f"{r['rel_err']:+.1%}", _fmt(_mib(r["peak_bytes"]), ".2f"),
                f"{r['est_bytes'] / 2**20:.2f}", _fmt(r["mem_ratio"], ".3f"),
                _fmt(_mib(r.get("process_peak_bytes")), ".2f"),
                _fmt(r.get("process_ratio"), ".3f"),
            )
        console.print(held)
    console.print(
        f"held-out slice time: MAPE {_fmt(result['time_mape'], '.2%')}, "
        f"max error {_fmt(result['time_max_err'], '.2%')}; "
        f"memory estimate/measured: min {_fmt(result['mem_ratio_min'], '.3f')}, "
        f"max {_fmt(result['mem_ratio_max'], '.3f')}  "
        f"({result['total_seconds']:.0f}s)"
    )
    if result.get("resume_ratio_min") is not None:
        console.print(
            f"resumed slices (rows from the KV pool): memory estimate/measured: min "
            f"{_fmt(result['resume_ratio_min'], '.3f')}, "
            f"max {_fmt(result['resume_ratio_max'], '.3f')}"
        )
    if result.get("process_ratio_min") is not None:
        console.print(
            f"process growth (resident set): heap overhead {result['heap_overhead']:.3f}, "
            f"estimate x overhead / measured: min {result['process_ratio_min']:.3f}, "
            f"max {result['process_ratio_max']:.3f}"
        )
    if result.get("skipped_points"):
        console.print(
            f"skipped, beyond the memory limit of {result['memory_limit_bytes'] / 2**30:.1f} "
            "GiB: " + ", ".join(f"(b={b}, l={x})" for b, x in result["skipped_points"])
        )
    if result["cv_mape"]:
        console.print("feature sets, leave-one-out slice-time MAPE on the fit points: " + "; ".join(
            f"{name}: {value:.2%}" for name, value in result["cv_mape"].items()
        ))


def _mib(value: float | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if value is None else value / 2**20
