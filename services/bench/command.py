"""``scls bench``: replay a workload through the running system, once per policy, and
compare the policies side by side (vLLM ``bench serve`` conventions)."""

from __future__ import annotations

import math
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.bench.client import ClientConfig
from services.bench.runner import attach_run, external_run, run_policy, served_model
from services.config import cli_error, workload_settings
from shared.bench.report import Run, rich_table, write_report
from shared.bench.workload import (
    SyntheticLengths,
    WorkItem,
    describe,
    fixed_workload,
    read_trace,
    synthetic_workload,
    trace_workload,
    with_arrivals,
)
from shared.modeling.registry import model_info
from shared.settings import Settings

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6,
          "gb": 10**9}


def parse_bytes(text: str) -> int:
    """``64MiB``, ``2GiB``, ``1000000`` -> bytes; ValueError with the accepted forms."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kmg]i?b|b)?", text.strip().lower())
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 512MiB, 2GiB or bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parse_rates(rate: float | None, rates: str | None) -> list[float | None]:
    """The arrival rates to run: ``--rates`` list, else ``--rate``, else [None]."""
    if rates:
        try:
            values = [float(r) for r in rates.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--rates must be numbers separated by commas, got {rates!r}") \
                from None
        if not values or any(not v > 0 for v in values):
            raise ValueError("--rates must list positive numbers")
        return sorted(values)
    return [rate]


def build_workload(
    trace: Path | None, requests: int, length_scale: float, time_scale: float, seed: int,
    lengths: SyntheticLengths, fixed: tuple[int, int] | None = None,
) -> list[WorkItem]:
    """The workload's lengths (and recorded arrivals for a trace); ``fixed`` = (prompt,
    output) tokens of every request."""
    if fixed is not None:
        return fixed_workload(requests, *fixed)
    if trace is not None:
        return trace_workload(read_trace(trace, limit=requests), length_scale, time_scale)
    return synthetic_workload(requests, seed, lengths, length_scale)


def arrivals_for(
    items: list[WorkItem], rate: float | None, burstiness: float, trace: bool, seed: int,
    constant: bool = False,
) -> list[WorkItem]:
    """Poisson/gamma (or, ``constant``, evenly spaced) arrivals at ``rate``; recorded times
    for a trace; else all at once."""
    if rate is not None and constant:
        return with_arrivals(items, "constant", rate)
    if rate is not None:
        mode = "poisson" if burstiness == 1.0 else "gamma"
        return with_arrivals(items, mode, rate, burstiness, seed)
    return with_arrivals(items, "trace" if trace else "burst")


def bench_command(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-random or a model dir")]
    = "smollm2-135m",
    workers: Annotated[int, typer.Option(min=1, help="workers per deployment")] = 2,
    policies: Annotated[str, typer.Option(help="comma-separated presets, each run on a fresh "
                                          "deployment")] = "scls,sls,ils",
    trace: Annotated[Path | None, typer.Option(help="CSV: TIMESTAMP, ContextTokens, "
                                               "GeneratedTokens")] = None,
    synthetic: Annotated[bool, typer.Option(help="built-in synthetic lengths (default when "
                                            "no --trace)")] = False,
    requests: Annotated[int, typer.Option(min=1, help="requests per run")] = 200,
    length_scale: Annotated[float, typer.Option(min=0.0001, help="multiply prompt and "
                                                "output lengths (CPU runs)")] = 1.0,
    time_scale: Annotated[float, typer.Option(min=0.0001, help="speed up recorded "
                                              "arrivals by this factor")] = 1.0,
    rate: Annotated[float | None, typer.Option(min=0.0001, help="Poisson/gamma arrivals, "
                                               "req/s (default: as recorded, or all at "
                                               "once)")] = None,
    rates: Annotated[str | None, typer.Option(help="several rates, e.g. 2,5,10: one run "
                                              "each")] = None,
    burstiness: Annotated[float, typer.Option(min=0.0001, help="gamma shape; 1 = "
                                              "Poisson")] = 1.0,
    seed: Annotated[int, typer.Option(help="workload and arrival seed")] = 0,
    slice_length: Annotated[int | None, typer.Option(min=1, help="S (default: "
                                                     "settings)")] = None,
    max_gen_length: Annotated[int | None, typer.Option(min=1, help="G (default: settings, "
                                                       "raised to the workload's longest "
                                                       "output)")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="per-instance KV+activation "
                                                      "budget on CPU, e.g. 256MiB")] = None,
    profile_mode: Annotated[str | None, typer.Option(help="auto, full, quick, cached, "
                                                     "analytic")] = None,
    url: Annotated[str | None, typer.Option(help="attach to a running deployment (its "
                                            "policy; needs SCLS_REDIS_URL)")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for results.json, report.md, "
                                             "plots")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print results.json to "
                                           "stdout")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="stream responses "
                                         "(TTFT measured by the client at the first "
                                         "chunk, as vLLM's benchmark does)")] = False,
    prompt_tokens: Annotated[int | None, typer.Option(min=1, help="every prompt exactly "
                                                      "this long (with --output-tokens)")]
    = None,
    output_tokens: Annotated[int | None, typer.Option(min=1, help="every output exactly "
                                                      "this long (with --prompt-tokens)")]
    = None,
    external: Annotated[list[str] | None, typer.Option(
        "--external", help="NAME=URL: also replay the same workload against an external "
        "OpenAI-compatible server serving the same model (e.g. vllm=http://127.0.0.1:8000), "
        "one column NAME in the same report; repeatable")] = None,
    constant: Annotated[bool, typer.Option("--constant", help="evenly spaced arrivals at "
                                           "--rate (GuideLLM's constant profile)")] = False,
) -> None:
    """Replay a workload over REST once per policy and compare them side by side."""
    console = Console(stderr=json_out)
    if (prompt_tokens is None) != (output_tokens is None):
        raise cli_error("give --prompt-tokens and --output-tokens together")
    fixed = None if prompt_tokens is None or output_tokens is None else (prompt_tokens,
                                                                         output_tokens)
    if fixed is not None and (trace is not None or synthetic):
        raise cli_error("fixed lengths (--prompt-tokens/--output-tokens) replace --trace and "
                        "--synthetic: give one of them")
    if constant and rate is None and rates is None:
        raise cli_error("--constant spaces arrivals at --rate: give --rate (or --rates)")
    try:
        rate_list = parse_rates(rate, rates)
        items = build_workload(trace, requests, length_scale, time_scale, seed,
                               SyntheticLengths(), fixed)
        budget = parse_bytes(memory_budget) if memory_budget else None
    except ValueError as exc:
        raise cli_error(str(exc)) from None
    if trace is not None and synthetic:
        raise cli_error("give either --trace or --synthetic, not both")
    names = [p.strip() for p in policies.split(",") if p.strip()]
    settings = workload_settings(model, workers, slice_length, max_gen_length, budget,
                                 profile_mode, items)
    _check_policies(names, url)
    externals = _externals(external or [], names)
    out_dir = out or Path(tempfile.mkdtemp(prefix="scls-bench-"))
    info = model_info(settings.model, settings.cache_dir)
    client = ClientConfig(base_url=url or "", model=settings.model,
                          vocab_size=info.vocab_size, seed=seed, stream=stream)
    meta = _meta(settings, items, names, rate_list, trace, length_scale)
    # what TTFT means in this run (client's first chunk, or the server's first slice)
    meta["ttft"] = "client, first streamed chunk" if stream else "server, first slice commit"
    console.print(f"[bold]scls bench[/]: {len(items)} requests x {len(names)} policies x "
                  f"{len(rate_list)} rate(s), model {settings.model}, {workers} workers; "
                  f"out {out_dir}")
    meta["external"] = {n: {"url": u, "model": m} for n, (u, m) in externals.items()}
    runs = _run_all(console, settings, names, rate_list, items, client, url, burstiness,
                    trace is not None, seed, out_dir, constant, externals)
    title = f"scls bench: {settings.model}, {workers} workers"
    write_report(out_dir, runs, meta, baseline=names[0], title=title)
    console.print(rich_table(runs, baseline=names[0], title=title))
    console.print(f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'} and plots")
    if json_out:
        sys.stdout.write((out_dir / "results.json").read_text())
    lost = sum(r.metrics["sent"] - r.metrics["completed"] - r.metrics["failed"] for r in runs)
    if lost:
        raise cli_error(f"{lost} request(s) unaccounted for")


def _check_policies(names: list[str], url: str | None) -> None:
    from shared.policy.presets import POLICIES

    if not names:
        raise cli_error("--policies is empty")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise cli_error(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    if url and len(names) > 1:
        raise cli_error("with --url only the running deployment's policy can be measured; "
                    "pass one --policies name (or drop --url to start fresh deployments)")


def _externals(specs: list[str], names: list[str]) -> dict[str, tuple[str, str]]:
    """``--external NAME=URL`` options: NAME -> (URL, the model it serves)."""
    from shared.policy.presets import POLICIES

    out: dict[str, tuple[str, str]] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not re.match(
                r"https?://", url):
            raise cli_error(f"--external {spec!r}: give NAME=URL, e.g. "
                            "vllm=http://127.0.0.1:8000")
        if name in POLICIES or name in names or name in out:
            raise cli_error(f"--external {name}: the name is taken (a policy, or given twice)")
        try:
            out[name] = (url.rstrip("/"), served_model(url))
        except ValueError as exc:
            raise cli_error(f"--external {name}: {exc}") from None
    return out


def _meta(settings: Settings, items: list[WorkItem], names: list[str],
          rate_list: list[float | None], trace: Path | None, length_scale: float
          ) -> dict[str, Any]:
    return {
        "command": "scls bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "model": settings.model,
        "workers": settings.workers,
        "policies": names,
        "rates": rate_list,
        "slice_length": settings.slice_length,
        "max_gen_length": settings.max_gen_length,
        "max_batch_size": settings.max_batch_size,
        "memory_budget_bytes": settings.memory_budget_bytes,
        "profile_mode": settings.profile_mode,
        "trace": str(trace) if trace else None,
        "length_scale": length_scale,
        # lengths only: arrivals differ per rate (each run's "offered_rate" says)
        "workload": {k: v for k, v in describe(items).items()
                     if k not in ("arrival_span_s", "offered_rate")},
    }


def _run_all(console: Console, settings: Settings, names: list[str],
             rate_list: list[float | None], items: list[WorkItem], client: ClientConfig,
             url: str | None, burstiness: float, is_trace: bool, seed: int, out_dir: Path,
             constant: bool = False, externals: dict[str, tuple[str, str]] | None = None
             ) -> list[Run]:
    runs = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for rate in rate_list:
            timed = arrivals_for(items, rate, burstiness, is_trace, seed, constant)
            for policy in [*names, *(externals or {})]:
                label = f"{policy}" + (f" @ {rate:g} req/s" if rate else "")
                sent = progress.add_task(f"{label}: sent", total=len(timed))
                done = progress.add_task(f"{label}: completed", total=len(timed))

                def on_sent(task: Any = sent) -> None:
                    progress.advance(task)

                def on_done(_o: Any, task: Any = done) -> None:
                    progress.advance(task)

                if policy in (externals or {}):
                    base, served = (externals or {})[policy]
                    cfg = ClientConfig(**{**client.__dict__, "base_url": base, "model": served})
                    run = external_run(policy, timed, cfg, rate, on_sent, on_done)
                elif url:
                    run = attach_run(settings, timed,
                                     ClientConfig(**{**client.__dict__, "base_url": url}),
                                     rate, on_sent, on_done)
                else:
                    run = run_policy(settings, policy, timed, client, rate,
                                     out_dir / "logs" / f"{policy}-{rate}", on_sent, on_done)
                run.metrics["offered_rate"] = describe(timed)["offered_rate"]
                runs.append(run)
                m = run.metrics
                console.print(f"{label}: {m['completed']}/{m['sent']} completed, "
                              f"{_f(m['req_per_s'])} req/s, {_f(m['tok_per_s'])} tok/s, "
                              f"p50 {_f(m['latency_p50_s'])} s")
    return runs


def _f(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or math.isnan(value) else f"{value:.3g}"

