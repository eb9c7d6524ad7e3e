"""Reports of benchmark and simulation runs: the side-by-side table, ``results.json``,
``report.md`` and PNG plots. ``scls bench`` and ``scls simulate`` both write through here,
so their outputs have the same shape and can be compared file to file.

``results.json`` maps each policy name to its metrics (:func:`shared.obs.metrics.summarize`)
at the highest rate run, with ``by_rate`` holding every rate when several were run; plus
``meta`` (command, settings, workload) and ``runs`` (one entry per policy and rate).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from shared.obs.metrics import HIGHER_IS_BETTER, TABLE_COLUMNS


@dataclass(frozen=True)
class Run:
    """One policy at one arrival rate (``None``: recorded arrivals or all at once)."""

    policy: str
    rate: float | None
    metrics: Mapping[str, Any]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def ratio(value: Any, base: Any) -> float | None:
    """``value / base`` or None when either is missing or the base is 0."""
    v, b = _number(value), _number(base)
    if v is None or b is None or b == 0:
        return None
    return v / b


def _cell(fmt: str, value: Any) -> str:
    number = _number(value)
    return "-" if number is None else fmt.format(number)


def by_policy(runs: Sequence[Run]) -> dict[str, Run]:
    """Each policy's run at its highest rate (the last run for equal rates)."""
    chosen: dict[str, Run] = {}
    for run in runs:
        best = chosen.get(run.policy)
        if best is None or (run.rate or 0.0) >= (best.rate or 0.0):
            chosen[run.policy] = run
    return chosen


def table_rows(
    runs: Sequence[Run], baseline: str
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: one row per metric, a column per
    policy, then ``<policy>/<baseline>`` ratio columns."""
    chosen = by_policy(runs)
    policies = list(chosen)
    others = [p for p in policies if p != baseline] if baseline in chosen else []
    header = ["metric", *policies, *(f"{p}/{baseline}" for p in others)]
    rows = []
    for key, label, fmt in TABLE_COLUMNS:
        cells = [_cell(fmt, chosen[p].metrics.get(key)) for p in policies]
        base = chosen[baseline].metrics.get(key) if others else None
        ratios = [_cell("{:.2f}x", ratio(chosen[p].metrics.get(key), base)) for p in others]
        rows.append([label, *cells, *ratios])
    return header, rows


def rich_table(runs: Sequence[Run], baseline: str, title: str) -> Table:
    """The side-by-side table for the terminal."""
    header, rows = table_rows(runs, baseline)
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(runs: Sequence[Run], baseline: str) -> str:
    """The side-by-side table as GitHub markdown."""
    header, rows = table_rows(runs, baseline)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_document(runs: Sequence[Run], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``results.json`` document (see the module docstring)."""
    doc: dict[str, Any] = {}
    for policy, run in by_policy(runs).items():
        entry = dict(run.metrics)
        entry["rate"] = run.rate
        rates = [r for r in runs if r.policy == policy]
        if len(rates) > 1:
            entry["by_rate"] = {str(r.rate): dict(r.metrics) for r in rates}
        doc[policy] = entry
    doc["meta"] = dict(meta)
    doc["runs"] = [{"policy": r.policy, "rate": r.rate, "metrics": dict(r.metrics)}
                   for r in runs]
    return doc


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_results(path: Path, runs: Sequence[Run], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``results.json`` (strict JSON) and return the document."""
    doc = json_safe(results_document(runs, meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return doc


def write_report(
    out_dir: Path, runs: Sequence[Run], meta: Mapping[str, Any], baseline: str, title: str
) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    write_results(written[0], runs, meta)
    plots = write_plots(out_dir, runs)
    written += plots
    lines = [f"# {title}", "", "```", str(meta.get("command", "")), "```", ""]
    workload = meta.get("workload")
    if workload:
        lines += ["Workload: " + ", ".join(f"{k} {_fmt(v)}" for k, v in workload.items()), ""]
    lines += [markdown_table(runs, baseline), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    written.append(out_dir / "report.md")
    return written


def _fmt(value: Any) -> str:
    number = _number(value)
    if number is None:
        return str(value)
    return f"{number:.4g}"


def write_plots(out_dir: Path, runs: Sequence[Run]) -> list[Path]:
    """PNG plots: per-instance busy time, and throughput/latency vs rate (several rates)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = [_plot_busy(out_dir, by_policy(runs), plt)]
    rated = [r for r in runs if r.rate is not None]
    if len({r.rate for r in rated}) > 1:
        paths.append(_plot_vs_rate(out_dir, rated, plt))
    return paths


def _plot_busy(out_dir: Path, chosen: Mapping[str, Run], plt: Any) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(chosen))
    for k, (policy, run) in enumerate(chosen.items()):
        inst = list(run.metrics.get("instances", []))
        xs = [i + k * width for i in range(len(inst))]
        ax.bar(xs, [i["busy_s"] for i in inst], width, label=policy)
    ax.set_xlabel("instance")
    ax.set_ylabel("busy time (s)")
    ax.set_title("per-instance busy time")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "busy_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_vs_rate(out_dir: Path, runs: Sequence[Run], plt: Any) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("req_per_s", "throughput (req/s)"), ("latency_mean_s", "mean latency (s)"),
              ("latency_p99_s", "p99 latency (s)"))
    for policy in dict.fromkeys(r.policy for r in runs):
        mine = sorted((r for r in runs if r.policy == policy), key=lambda r: r.rate or 0.0)
        for ax, (key, _label) in zip(axes, panels, strict=True):
            ax.plot([r.rate for r in mine], [_number(r.metrics.get(key)) for r in mine],
                    marker="o", label=policy)
    for ax, (_key, label) in zip(axes, panels, strict=True):
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "vs_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is an improvement."""
    return metric in HIGHER_IS_BETTER


def write_load_plot(
    out_dir: Path,
    timelines: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    name: str = "load_over_time.png",
) -> Path:
    """Per-instance load over time, one panel per policy: ``timelines`` maps a policy to
    ``(sample times, per-sample loads per instance)`` (seconds of expected work).

    Each panel shows the across-instance max, mean and min, and up to 8 instances' own
    lines; a spread between max and min is load imbalance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(p, t, np.asarray(v, dtype=float)) for p, (t, v) in timelines.items() if len(t)]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(8, 2.6 * max(1, len(panels))),
                             squeeze=False)
    for ax, (policy, times, loads) in zip(axes[:, 0], panels, strict=False):
        for k in range(min(8, loads.shape[1])):
            ax.plot(times, loads[:, k], lw=0.6, alpha=0.5)
        ax.plot(times, loads.max(axis=1), color="black", lw=1.2, label="max")
        ax.plot(times, loads.mean(axis=1), color="black", lw=1.2, ls="--", label="mean")
        ax.plot(times, loads.min(axis=1), color="grey", lw=1.2, label="min")
        ax.set_title(f"{policy}: expected work per instance ({loads.shape[1]} instances)")
        ax.set_ylabel("s of work")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("simulated time (s)")
    fig.tight_layout()
    path = out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
