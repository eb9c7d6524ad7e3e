"""Settings building for the commands: one place that every ``scls`` command imports.

``build_settings`` reads the environment (``SCLS_*``) and puts the options that were given on
top; ``workload_settings`` adapts them to a benchmark workload (``scls bench`` and
``scls fidelity`` run the same deployments). Importing this module imports no service.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer
from pydantic import ValidationError

from shared.bench.workload import WorkItem
from shared.settings import Settings


def cli_error(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit (status 2) for the caller to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment (``SCLS_*``), with CLI options that were given on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                 for e in exc.errors()]
        typer.echo("invalid settings (check SCLS_* variables and options):\n" + "\n".join(lines),
                   err=True)
        raise typer.Exit(2) from None


def workload_settings(model: str, workers: int, slice_length: int | None,
                      max_gen_length: int | None, budget: int | None, profile_mode: str | None,
                      items: Sequence[WorkItem]) -> Settings:
    """Settings for deployments that serve ``items``: long timeouts, room for every request.

    ``max_gen_length`` grows to the longest output the workload asks for unless it was given.

    Raises:
        typer.Exit: the workload needs more output tokens than ``--max-gen-length`` allows.
    """
    settings = build_settings(model=model, workers=workers, slice_length=slice_length,
                              max_gen_length=max_gen_length, memory_budget_bytes=budget,
                              profile_mode=profile_mode)
    longest = max(item.output_tokens for item in items)
    updates: dict[str, Any] = {"request_timeout_s": max(settings.request_timeout_s, 3600.0),
                               "max_pending": max(settings.max_pending, len(items))}
    if longest > settings.max_gen_length:
        if max_gen_length is not None:
            raise cli_error(f"the workload asks for up to {longest} output tokens but "
                            f"--max-gen-length is {max_gen_length}; raise it or use "
                            "--length-scale")
        updates["max_gen_length"] = longest
    return settings.model_copy(update=updates)
