"""The ``scls`` command line: run one service (for containers) or a whole local deployment."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from services.config import build_settings
from shared.obs.logging import configure_logging
from shared.settings import Settings

app = typer.Typer(
    help="scls: LLM serving with slice-level scheduling on Redis + RQ.",
    no_args_is_help=True,
    add_completion=False,
)

ModelOpt = Annotated[
    str | None, typer.Option(help="smollm2-135m, tiny-random or a local HF model directory")
]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="number of workers")]
PortOpt = Annotated[int | None, typer.Option(min=0, max=65535, help="ingest port (0 = free)")]
SliceOpt = Annotated[int | None, typer.Option(min=1, help="slice length S (decode steps)")]
PolicyOpt = Annotated[
    str | None, typer.Option(help="scheduling preset: scls, sls, ils, scls-rr, fcfs-maxmin")
]


def _check_model(settings: Settings) -> None:
    """Exit with a clear message on an unknown model or policy name."""
    from shared.modeling.registry import resolve_model_name
    from shared.policy.presets import POLICIES

    try:
        resolve_model_name(settings.model)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if settings.policy not in POLICIES:
        typer.echo(f"error: unknown policy {settings.policy!r}; choose from "
                   f"{', '.join(POLICIES)}", err=True)
        raise typer.Exit(2)


@app.command()
def ingest(model: ModelOpt = None, port: PortOpt = None,
           host: Annotated[str | None, typer.Option(help="bind address")] = None) -> None:
    """Run the ingest service (OpenAI-compatible REST) in the foreground."""
    import uvicorn

    from services.ingest.app import create_app

    settings = build_settings(model=model, port=port, host=host)
    _check_model(settings)
    configure_logging(settings.log_format, settings.log_level, service="ingest")
    try:
        app = create_app(settings)
    except ValueError as exc:  # SCLS_CHAT_TEMPLATE names no template
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(app, host=settings.host, port=settings.port,
                log_level="warning", access_log=False,
                log_config=None,  # uvicorn's loggers reach our root handler (JSON lines)
                # longer than a load balancer's idle timeout (60 s on common ones), so
                # the server is never the side that closes a connection being reused
                timeout_keep_alive=75)


@app.command()
def scheduler(slice_length: SliceOpt = None, policy: PolicyOpt = None) -> None:
    """Run the scheduler service (leader or standby) in the foreground."""
    from services.scheduler.service import create_scheduler
    from shared.core.signals import on_stop_signals
    from shared.obs.prometheus import start_exporter

    settings = build_settings(slice_length=slice_length, policy=policy)
    configure_logging(settings.log_format, settings.log_level, service="scheduler")
    try:
        sched = create_scheduler(settings)
        start_exporter(sched.metrics.registry, settings)  # SCLS_METRICS_PORT, 0 = off
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    on_stop_signals(sched.stop)  # not in the handler: it may interrupt the loop's waits
    sched.run()


@app.command()
def worker(
    model: ModelOpt = None,
    instance_id: Annotated[str | None, typer.Option(help="instance id (default hostname-pid)")]
    = None,
    policy: PolicyOpt = None,
    reprofile: Annotated[bool, typer.Option(help="profile again even if cached")] = False,
) -> None:
    """Run one worker (one model instance) in the foreground; it profiles the model on
    this hardware at start (or loads its cached profile)."""
    from services.worker.service import create_worker
    from shared.obs.prometheus import start_exporter

    settings = build_settings(model=model, instance_id=instance_id, policy=policy)
    _check_model(settings)
    configure_logging(settings.log_format, settings.log_level, service="worker")
    try:
        service = create_worker(settings, reprofile=reprofile)
        # SCLS_METRICS_PORT (0 = off); GET /livez there is the liveness probe
        start_exporter(service.metrics.registry, settings, health=service.liveness)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    service.run()


@app.command()
def up(model: ModelOpt = None, workers: WorkersOpt = None, port: PortOpt = None,
       slice_length: SliceOpt = None, policy: PolicyOpt = None) -> None:
    """Start Redis (embedded unless SCLS_REDIS_URL), ingest, scheduler and workers; Ctrl-C
    stops them all."""
    from services.launcher import LocalDeployment

    settings = build_settings(model=model, workers=workers, port=port, slice_length=slice_length,
                              policy=policy)
    _check_model(settings)
    configure_logging(settings.log_format, settings.log_level, service="up")
    deployment = LocalDeployment(settings)
    stop = {"requested": False}

    def request_stop(*_: object) -> None:
        stop["requested"] = True

    typer.echo("starting; on first start each worker profiles its hardware (SmolLM2: about "
               "11 min on 2 CPU cores; cached afterwards; SCLS_PROFILE_MODE=cached skips it)")
    # A stop signal can come at any moment, so the try covers the start too, and SIGTERM's
    # handler is set before start(), which restores it when it returns: a moment with the
    # default one would kill us outright and leave the children (own sessions) running.
    signal.signal(signal.SIGTERM, request_stop)
    try:
        # SIGTERM (exit 143) or Ctrl-C while it starts: it stops what it started, raises
        deployment.start(ready_timeout_s=3600)
        signal.signal(signal.SIGINT, request_stop)
        typer.echo(
            f"scls is up: {deployment.url}  (redis {deployment.settings.redis_url}, "
            f"{deployment.settings.workers} workers, model {deployment.settings.model}); "
            "Ctrl-C to stop"
        )
        metrics = [f"ingest {deployment.url}/metrics"] + [
            f"{name} {deployment.metrics_url(name)}" for name in deployment.metrics_ports
        ]
        typer.echo("Prometheus metrics: " + ", ".join(metrics))
        while not stop["requested"]:
            time.sleep(0.5)
            deployment.check_children()
        typer.echo("stopping ...")
    finally:
        signal.signal(signal.SIGINT, request_stop)  # a second Ctrl-C must not cut it short
        deployment.stop()


@app.command()
def demo(model: ModelOpt = None, workers: WorkersOpt = None, slice_length: SliceOpt = None,
         policy: PolicyOpt = None,
         max_tokens: Annotated[int, typer.Option(min=1, help="tokens per answer")] = 48) -> None:
    """Start everything, answer a few built-in prompts over REST, print a summary, stop."""
    from services.demo import run_demo

    # Profiling SmolLM2's full grid takes ~13 min on a 2-core CPU: the demo uses a cached
    # profile when `scls profile` (or an earlier `scls up`) made one, else the analytic model.
    profile_mode = None if "SCLS_PROFILE_MODE" in os.environ else "cached"
    settings = build_settings(model=model, workers=workers, slice_length=slice_length, port=0,
                              policy=policy, profile_mode=profile_mode)
    _check_model(settings)
    configure_logging(settings.log_format, "WARNING", service="demo")
    log_dir = Path(tempfile.mkdtemp(prefix="scls-demo-logs-"))
    ok = run_demo(settings, max_tokens=max_tokens, log_dir=log_dir)
    raise typer.Exit(0 if ok else 1)


def _register_tools() -> None:
    """Commands whose code lives beside the service it measures."""
    from services.bench.command import bench_command
    from services.chaos.command import chaos_command
    from services.scheduler.bench import scheduler_bench_command
    from services.simulator.command import simulate_command
    from services.simulator.fidelity import fidelity_command
    from services.status import status_command
    from services.worker.constrained_bench import constrained_bench_command
    from services.worker.grammar_bench import grammar_bench_command
    from services.worker.kv_memory_cmd import kv_memory_command
    from services.worker.profile_cmd import profile_command
    from services.worker.stream_bench_cmd import stream_overhead_command

    app.command("profile")(profile_command)
    app.command("bench")(bench_command)
    app.command("scheduler-bench")(scheduler_bench_command)
    app.command("simulate")(simulate_command)
    app.command("fidelity")(fidelity_command)
    app.command("status")(status_command)
    app.command("kv-memory")(kv_memory_command)
    app.command("chaos")(chaos_command)
    app.command("stream-overhead")(stream_overhead_command)
    app.command("grammar-bench")(grammar_bench_command)
    app.command("constrained-bench")(constrained_bench_command)


_register_tools()


def main() -> None:
    """Entry point of the ``scls`` script."""
    app()


if __name__ == "__main__":
    sys.exit(main())
