"""The chaos report: one JSON object (``--json``) and a rich table.

The headline figures are over every request the clients sent (undisturbed run, faulted run,
probes and the burst): ``accepted`` requests either ``completed``, ``failed`` (ended with an
error the client was told of) or are ``lost`` (accepted and never ended). ``duplicated``
counts requests whose events carry two final entries or more tokens than they generated;
``mismatched`` counts greedy texts that differ from the undisturbed run's.
``server_errors`` counts 5xx answers outside a Redis outage (a 503 while Redis is down or
frozen is documented and counted as ``unavailable_503``; a 503 ``not_ready`` refusal, while
no scheduler leads or no worker lives, as ``not_ready_503``), fuzzing's 5xx and failed
requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.chaos.workload import Ledger, Verdict

#: The figures that must be zero for the run to pass (exit status 1 otherwise).
MUST_BE_ZERO = ("lost", "duplicated", "mismatched", "server_errors")
#: Request counts each phase reports and the report sums (server errors are summed apart:
#: the fuzzing and failed requests add to them).
COUNTS = ("sent", "accepted", "completed", "failed", "lost", "duplicated", "mismatched",
          "unavailable_503", "not_ready_503", "rejected_429")


def phase_dict(ledger: Ledger, verdict: Verdict) -> dict[str, Any]:
    """One phase's figures (what its clients saw and what Redis says of its requests)."""
    return {
        "sent": ledger.sent,
        "accepted": len(ledger.accepted),
        "completed": verdict.completed,
        "failed": verdict.failed,
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "mismatched": verdict.mismatched,
        "server_errors": ledger.server_errors,
        "unavailable_503": ledger.unavailable_503,
        "not_ready_503": ledger.not_ready_503,
        "rejected_429": ledger.statuses.get(429, 0),
        "statuses": {str(k): v for k, v in sorted(ledger.statuses.items())},
        "transport_errors": dict(ledger.transport_errors),
        "stream_errors": ledger.stream_errors,
        "polled": verdict.polled,
        "stream_text_differs": verdict.stream_text_differs,
        "lost_ids": verdict.lost_ids[:20],
        "lost_states": dict(list(verdict.lost_states.items())[:20]),
        "duplicated_ids": verdict.duplicated_ids[:20],
        "mismatched_ids": verdict.mismatched_ids[:20],
        "failed_errors": verdict.failed_errors[:10],
        "error_samples": ledger.error_samples[:10],
    }


def totals(phases: dict[str, dict[str, Any]], fuzz_errors: int) -> dict[str, Any]:
    """The headline figures summed over the phases."""
    out: dict[str, Any] = {k: sum(p[k] for p in phases.values()) for k in COUNTS}
    out["server_errors"] = (
        sum(p["server_errors"] for p in phases.values()) + fuzz_errors + out["failed"]
    )
    return out


def passed(report: dict[str, Any]) -> bool:
    """True when every figure of :data:`MUST_BE_ZERO` is zero."""
    return all(report[k] == 0 for k in MUST_BE_ZERO)


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write the report as one JSON object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_table(report: dict[str, Any], console: Console) -> None:
    """The headline figures, then one row per fault."""
    head = Table(title="scls chaos: requests", show_header=True)
    head.add_column("figure")
    head.add_column("value", justify="right")
    for name in (*COUNTS, "server_errors", "failover_s", "redis_recovery_s"):
        bad = name in MUST_BE_ZERO and report.get(name)
        head.add_row(name, _fmt(report.get(name)), style="bold red" if bad else None)
    console.print(head)
    faults = Table(title="faults", show_header=True)
    faults.add_column("fault")
    faults.add_column("what happened")
    for name, result in report["faults"].items():
        shown = {
            k: v
            for k, v in result.items()
            if not isinstance(v, list | dict) or k in ("statuses", "exited")
        }
        faults.add_row(name, ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    console.print(faults)
    verdict = "[green]PASS[/green]" if passed(report) else "[bold red]FAIL[/bold red]"
    console.print(
        f"{verdict}  (lost, duplicated, mismatched, server_errors must all be 0; "
        f"logs: {report.get('log_dir')})"
    )
