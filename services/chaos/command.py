"""``scls chaos``: start a local deployment, run a greedy workload undisturbed and again under
faults, burst it, fuzz its API, and report what was lost (docs/reliability.md).

Order: undisturbed run (the reference texts) -> the same workload again while the faults
run one after another (worker ``kill -9`` with restarts, leader scheduler ``kill -9``,
Redis frozen, Redis ``kill -9`` and restarted on its AOF) -> a burst over the pending bound
-> schemathesis and hand-made bad bodies -> every accepted request checked in Redis.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from services.chaos import faults
from services.chaos.deployment import ChaosDeployment
from services.chaos.fuzz import nasty_fuzz, schemathesis_fuzz
from services.chaos.report import passed, phase_dict, print_table, totals, write_json
from services.chaos.workload import (
    TERMINAL,
    Ledger,
    Spec,
    Verdict,
    abandon_open,
    baseline_tokens,
    make_specs,
    run_workload,
    verify,
)
from services.config import build_settings
from shared.modeling.registry import TINY_RANDOM, resolve_model_name
from shared.obs.logging import configure_logging
from shared.settings import Settings


@dataclass(frozen=True)
class Plan:
    """How hard a run pushes: the full run, or ``--quick`` (CI, about 5 min on 2 cores)."""

    requests: int = 64  # distinct workload requests (the faulted run repeats them)
    concurrency: int = 12
    max_tokens: int = 24  # with slice length 4: six slices per request
    kill_duration_s: float = 60.0
    kill_every_s: float = 4.0
    freeze_s: float = 15.0
    redis_down_s: float = 2.0
    burst: int = 2000
    max_pending: int = 300  # the pending bound the burst is sent against
    fuzz_cases: int = 1000
    settle_s: float = 300.0  # how long requests may take to end after the faults
    recovery_timeout_s: float = 120.0  # how long a fault waits for the system to recover

    @property
    def max_kills(self) -> int:
        """Worker kills the run may make: a request may be running on the victim of each."""
        return math.ceil(self.kill_duration_s / self.kill_every_s)


FULL = Plan()
QUICK = Plan(
    requests=24,
    concurrency=6,
    kill_duration_s=12.0,
    kill_every_s=3.0,
    freeze_s=5.0,
    redis_down_s=1.0,
    burst=400,
    max_pending=100,
    fuzz_cases=100,
    settle_s=90.0,
    recovery_timeout_s=60.0,
)


def chaos_settings(model: str | None, plan: Plan) -> Settings:
    """Settings of the chaos deployment: 3 workers, short slices and timers (the tests'
    values), the plan's pending bound, JSON logs; ``SCLS_*`` variables still apply to every
    field not set here."""
    settings = build_settings(model=model)
    tiny = resolve_model_name(settings.model) == TINY_RANDOM
    return settings.model_copy(
        update={
            "workers": 3,
            "slice_length": 4,
            "max_gen_length": 64,
            "max_batch_size": 8,
            "cycle_interval_s": 0.02,
            "heartbeat_interval_s": 0.5,
            "instance_ttl_s": 3.0,
            "torch_threads": 1,
            "max_pending": plan.max_pending,
            # Every kill may hit a slice of the same request (a CI run saw two requests
            # requeued by all four kills of --quick, each time from the worker they had
            # moved to); with the default budget (3 requeues) they then fail, which this run
            # would count against the system. Its budget covers every kill, plus the Redis
            # freeze and kill, which hand back what was running too.
            "max_retries": plan.max_kills + 2,
            "log_format": "json",
            # tiny-random: the analytic cost model, as in the tests; a real model: its cached
            # profile (`scls profile`), else the analytic one, never minutes of profiling here
            "profile_mode": "analytic" if tiny else "cached",
        }
    )


async def _supervise(dep: ChaosDeployment, stop: asyncio.Event) -> None:
    """Restart children that died (the faults restart the ones they kill themselves)."""
    while not stop.is_set():
        dep.supervise()
        await asyncio.sleep(0.5)


async def _faulted(
    dep: ChaosDeployment, plan: Plan, specs: list[Spec], ledger: Ledger, console: Console
) -> dict[str, Any]:
    """The workload again, with the faults one after another while it runs."""
    ctx = faults.FaultContext(dep, ledger, specs[0], plan.recovery_timeout_s)
    keep_going, stop = asyncio.Event(), asyncio.Event()
    keep_going.set()
    deadline = plan.kill_duration_s + plan.freeze_s + 4 * ctx.recovery_timeout_s + plan.settle_s
    workload = asyncio.create_task(
        run_workload(dep.url, specs, ledger, plan.concurrency, deadline, keep_going)
    )
    supervisor = asyncio.create_task(_supervise(dep, stop))
    results: dict[str, Any] = {}
    try:
        for name, fault in (
            (
                "worker_kill",
                lambda: faults.worker_kills(ctx, plan.kill_duration_s, plan.kill_every_s),
            ),
            ("leader_kill", lambda: faults.leader_kill(ctx)),
            ("redis_freeze", lambda: faults.redis_freeze(ctx, plan.freeze_s)),
            ("redis_kill", lambda: faults.redis_kill(ctx, plan.redis_down_s)),
        ):
            console.print(f"  fault: {name} ...")
            results[name] = await fault()
            console.print(
                f"  fault: {name} done: "
                + ", ".join(
                    f"{k}={v}" for k, v in results[name].items() if not isinstance(v, list | dict)
                )
            )
        keep_going.clear()
        # the requests still open get settle_s to end; then their clients are stopped
        done, _ = await asyncio.wait({workload}, timeout=plan.settle_s)
        if not done:
            workload.cancel()
            await asyncio.gather(workload, return_exceptions=True)
            results["abandoned_at_deadline"] = {"requests": abandon_open(ledger)}
    finally:
        keep_going.clear()
        stop.set()
        await supervisor
    return results


async def _settle(dep: ChaosDeployment, ledgers: list[Ledger], timeout_s: float) -> None:
    """Wait until every accepted request has ended in Redis, or ``timeout_s``."""
    ids = [s.request_id for ledger in ledgers for s in ledger.accepted if not s.abandoned]
    deadline = time.monotonic() + timeout_s
    while ids and time.monotonic() < deadline:
        waiting = list(ids)
        records = await faults.ask(dep, lambda s, w=waiting: s.get_requests(w))
        if records is not None:
            ids = [
                i
                for i, r in zip(waiting, records, strict=True)
                if r is not None and r.status not in TERMINAL
            ]
        if ids:
            await asyncio.sleep(1.0)


def _check(dep: ChaosDeployment, ledger: Ledger, baseline: dict[int, list[int]] | None) -> Verdict:
    store = dep.store()
    try:
        return verify(store, ledger, baseline)
    finally:
        store.close()


def _reference(dep: ChaosDeployment, ledger: Ledger) -> dict[int, list[int]]:
    store = dep.store()
    try:
        return baseline_tokens(store, ledger)
    finally:
        store.close()


async def run_chaos(dep: ChaosDeployment, plan: Plan, console: Console) -> dict[str, Any]:
    """Every phase against a started deployment; the report (without settings)."""
    specs = make_specs(plan.requests, plan.max_tokens)
    ledgers = {"undisturbed": Ledger(), "faulted": Ledger(), "burst": Ledger()}
    started = time.monotonic()
    console.print(f"undisturbed run: {len(specs)} requests ...")
    await run_workload(dep.url, specs, ledgers["undisturbed"], plan.concurrency, plan.settle_s)
    baseline = _reference(dep, ledgers["undisturbed"])
    console.print("faulted run ...")
    fault_results = await _faulted(dep, plan, specs, ledgers["faulted"], console)
    console.print(f"burst: {plan.burst} requests over a bound of {dep.settings.max_pending} ...")
    burst_specs = make_specs(8, dep.settings.max_gen_length)
    ctx = faults.FaultContext(dep, ledgers["burst"], specs[0])
    fault_results["burst"] = await faults.burst(
        ctx, ledgers["burst"], burst_specs, plan.burst, plan.settle_s
    )
    # the excess must be 429 and nothing else: a refused connection fails the burst too
    ledgers["burst"].server_errors += sum(ledgers["burst"].transport_errors.values())
    console.print(f"fuzzing: hand-made bodies and {plan.fuzz_cases} schemathesis cases ...")
    nasty = await asyncio.to_thread(nasty_fuzz, dep.url)
    fuzzed = await asyncio.to_thread(schemathesis_fuzz, dep.url, plan.fuzz_cases)
    fault_results["fuzz_nasty"] = nasty.as_dict()
    fault_results["fuzz_schemathesis"] = fuzzed.as_dict()
    await _settle(dep, list(ledgers.values()), plan.settle_s)
    phases = {
        "undisturbed": phase_dict(
            ledgers["undisturbed"], _check(dep, ledgers["undisturbed"], baseline)
        ),
        "faulted": phase_dict(ledgers["faulted"], _check(dep, ledgers["faulted"], baseline)),
        # the burst's requests repeat 8 bodies: each must give the same tokens every time
        "burst": phase_dict(
            ledgers["burst"], _check(dep, ledgers["burst"], _reference(dep, ledgers["burst"]))
        ),
    }
    report = totals(phases, nasty.server_errors + fuzzed.server_errors)
    report.update(
        failover_s=fault_results["leader_kill"].get("failover_s"),
        redis_recovery_s=fault_results["redis_kill"].get("redis_recovery_s"),
        faults=fault_results,
        phases=phases,
        service_restarts=dict(dep.restarts),
        wall_s=round(time.monotonic() - started, 1),
    )
    return report


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def chaos_command(
    model: Annotated[
        str | None,
        typer.Option(help="model to serve (default tiny-random: the tiny random test model)"),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="short run for CI (under 5 min on 2 cores)")
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write the report as one JSON object to this file")
    ] = None,
    keep_logs: Annotated[
        bool, typer.Option(help="keep the run's directory (logs, AOF) even when it passed")
    ] = False,
) -> None:
    """Deploy scls locally (Redis with AOF, ingest, 2 schedulers, 3 workers), break it on
    purpose (worker and leader kill -9, Redis freeze and kill -9, a burst over the pending
    bound, API fuzzing) and report lost, duplicated and mismatched requests and server
    errors; exit status 1 if any is non-zero."""
    plan = QUICK if quick else FULL
    try:
        resolve_model_name(model or TINY_RANDOM)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = chaos_settings(model or TINY_RANDOM, plan)
    configure_logging("console", "WARNING", service="chaos")
    console = Console()
    dep = ChaosDeployment(settings)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop like Ctrl-C: the finally cleans up
    started = time.monotonic()
    try:
        console.print(
            f"starting Redis (AOF), ingest, 2 schedulers, {settings.workers} workers "
            f"({settings.model}) in {dep.workdir} ..."
        )
        dep.start(ready_timeout_s=600)
        report = asyncio.run(run_chaos(dep, plan, console))
    except KeyboardInterrupt:
        dep.stop()
        console.print(f"interrupted: every process stopped (logs: {dep.workdir})")
        raise typer.Exit(130) from None
    finally:
        dep.stop()
    report.update(
        ok=passed(report),
        commit=_commit(),
        log_dir=str(dep.workdir),
        total_wall_s=round(time.monotonic() - started, 1),
        plan=asdict(plan),
        settings=dep.settings.model_dump(mode="json") | {"api_key": None},
    )
    if json_path is not None:
        write_json(report, json_path)
    print_table(report, console)
    if report["ok"] and not keep_logs:
        dep.remove_files()
    raise typer.Exit(0 if report["ok"] else 1)
