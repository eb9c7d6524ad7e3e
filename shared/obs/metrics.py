"""Serving metrics of docs/design.md §7, computed one way for the benchmark (real system)
and the simulator, from per-request outcomes and worker-side counters.

Conventions follow vLLM's ``bench serve``: the run's duration is from the first request
sent to the last response received; throughputs count completed requests and their output
tokens over that duration; latencies are end-to-end from the request's send time. TTFT is
the time to the first slice's text (no streaming of single tokens here).

Worker-side counters (pad, invalid and recomputed tokens, batch sizes, busy time) are the
cumulative hashes the workers write at each commit (``scls:stats`` and
``scls:instance:<id>:stats``), never estimated by the client.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Counter names the workers add up at every commit (services/worker/runtime.py).
WORKER_COUNTERS = (
    "slices", "batch_size_sum", "generated_tokens", "pad_tokens", "invalid_tokens",
    "recomputed_tokens", "busy_s", "first_slice_finishes", "requests_finished",
    "concurrency_s", "model_busy_s", "kv_hits", "kv_misses", "kv_evictions",
    "kv_miss_handbacks", "preemptions",
)


@dataclass(frozen=True)
class RequestOutcome:
    """How one request of the workload ended, as the client saw it."""

    index: int
    ok: bool
    sent_s: float  # offset from the start of the run
    e2e_s: float | None = None  # response received minus sent
    ttft_s: float | None = None  # first slice committed minus arrival (server clock)
    queue_time_s: float | None = None  # first claimed minus arrival (server clock)
    prompt_tokens: int = 0
    output_tokens: int = 0
    slices: int = 0
    finish_reason: str | None = None
    error: str = ""  # why it failed (HTTP status and message, or the exception)
    server_e2e_s: float | None = None  # finished minus arrival (server clock)
    # Streaming only: (e2e - ttft) / (output tokens - 1), client clock (vLLM's TPOT)
    tpot_s: float | None = None


@dataclass(frozen=True)
class InstanceUsage:
    """One instance's share of the work over the run."""

    id: str
    busy_s: float  # wall time its engine was computing
    slices: int = 0
    generated_tokens: int = 0
    counters: Mapping[str, float] = field(default_factory=dict)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float]:
    """Linear-interpolated percentiles (numpy's default), NaN for no values."""
    if not values:
        return [math.nan] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), qs)]


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Load imbalance of per-instance values: (population std, max / mean).

    (0, 1) is perfect balance; an idle cluster (mean 0) counts as balanced.
    """
    if len(values) == 0:
        return 0.0, 1.0
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    return float(arr.std()), (float(arr.max()) / mean if mean > 0 else 1.0)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def latency_block(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``<prefix>_mean_s`` and ``_p50_s/_p90_s/_p99_s`` of ``values``."""
    p50, p90, p99 = percentiles(values)
    return {f"{prefix}_mean_s": _mean(values), f"{prefix}_p50_s": p50,
            f"{prefix}_p90_s": p90, f"{prefix}_p99_s": p99}


def counter_delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Counters accumulated between two reads of a cumulative stats hash."""
    return {k: float(after.get(k, 0.0)) - float(before.get(k, 0.0))
            for k in set(after) | set(before)}


def average_batch_size(counters: Mapping[str, float]) -> float:
    """Mean requests per slice; for ILS engines, the time-averaged running requests.

    An ILS engine commits each request separately, so ``batch_size_sum / slices`` would be
    1; it reports ``concurrency_s`` (request-seconds in the engine) instead, which divided
    by its busy time is the mean size of its running batch.
    """
    if counters.get("concurrency_s", 0.0) > 0 and counters.get("busy_s", 0.0) > 0:
        return counters["concurrency_s"] / counters["busy_s"]
    slices = counters.get("slices", 0.0)
    return counters.get("batch_size_sum", 0.0) / slices if slices else math.nan


def engine_time_ratio(counters: Mapping[str, float]) -> float:
    """``busy_s / model_busy_s``: measured engine seconds over what the instance's cost
    model gives the same slices (ILS: iterations) as they ran (NaN where none was priced)."""
    model = counters.get("model_busy_s", 0.0)
    return counters.get("busy_s", 0.0) / model if model > 0 else math.nan


def summarize(
    outcomes: Sequence[RequestOutcome],
    counters: Mapping[str, float],
    instances: Sequence[InstanceUsage],
    duration_s: float,
    ect_samples: Sequence[Sequence[float]] = (),
) -> dict[str, object]:
    """The metrics of one run (docs/design.md §7) as a flat JSON-able dict.

    ``counters``: the run's worker counters (deltas of the global stats hash);
    ``ect_samples``: per-instance expected completion times (seconds of estimated work
    queued or running) sampled during the run, one sequence per sample; the imbalance of
    expected completion time is the mean over samples of the across-instance spread.
    """
    done = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    out_tokens = sum(o.output_tokens for o in done)
    duration = max(duration_s, 1e-9)
    busy_std, busy_ratio = spread([i.busy_s for i in instances])
    ect = [spread(sample) for sample in ect_samples if len(sample)]
    metrics: dict[str, object] = {
        "sent": len(outcomes),
        "completed": len(done),
        "failed": len(failed),
        "failure_reasons": dict(Counter(_reason(o.error) for o in failed)),
        "duration_s": duration_s,
        "req_per_s": len(done) / duration,
        "tok_per_s": out_tokens / duration,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(o.prompt_tokens for o in done),
        **latency_block("latency", [o.e2e_s for o in done if o.e2e_s is not None]),
        **latency_block("ttft", [o.ttft_s for o in done if o.ttft_s is not None]),
        **latency_block("tpot", [o.tpot_s for o in done if o.tpot_s is not None]),
        **latency_block("queue_time", [o.queue_time_s for o in done
                                       if o.queue_time_s is not None]),
        # the HTTP edge: client-seen latency minus the server's own arrival-to-finish
        "edge_latency_mean_s": _mean([o.e2e_s - o.server_e2e_s for o in done
                                      if o.e2e_s is not None and o.server_e2e_s is not None]),
        "slices_per_request": _mean([o.slices for o in done]),
        "early_return_ratio": (sum(1 for o in done if o.slices == 1) / len(done)
                               if done else math.nan),
        "avg_batch_size": average_batch_size(counters),
        "slices": int(counters.get("slices", 0)),
        "generated_tokens": int(counters.get("generated_tokens", 0)),
        "pad_tokens": int(counters.get("pad_tokens", 0)),
        "invalid_tokens": int(counters.get("invalid_tokens", 0)),
        "recomputed_tokens": int(counters.get("recomputed_tokens", 0)),
        # prompt tokens prefilled again (evictions, moves, preemptions) per prompt token
        "recomputed_share": (int(counters.get("recomputed_tokens", 0))
                             / max(1, sum(o.prompt_tokens for o in done))),
        # rows that resumed from their instance's KV pool / that had generated tokens but
        # re-prefilled (evicted, moved, stale) / pool entries evicted to make room
        "kv_hits": int(counters.get("kv_hits", 0)),
        "kv_misses": int(counters.get("kv_misses", 0)),
        "kv_evictions": int(counters.get("kv_evictions", 0)),
        "busy_s_total": float(counters.get("busy_s", 0.0)),
        # the slice engine's busy time split (None for ILS, whose iterations mix both):
        # prefill passes and cache assembly vs decode steps, summed over every slice
        "prefill_s_total": _positive(counters.get("prefill_s", 0.0)),
        "decode_s_total": _positive(counters.get("decode_s", 0.0)),
        # measured engine time / the instances' own cost models for the same slices: how
        # much slower than profiled the engines ran (contention); NaN if nothing was priced
        "engine_time_ratio": engine_time_ratio(counters),
        "imbalance_busy_std": busy_std,
        "imbalance_busy_max_mean": busy_ratio,
        "imbalance_ect_std": _mean([s for s, _ in ect]) if ect else 0.0,
        "imbalance_ect_max_mean": _mean([r for _, r in ect]) if ect else 1.0,
        "instances": [
            {"id": i.id, "busy_s": i.busy_s, "slices": i.slices,
             "generated_tokens": i.generated_tokens,
             "utilisation": i.busy_s / duration,
             "engine_time_ratio": engine_time_ratio(i.counters)}
            for i in instances
        ],
    }
    return metrics


def _positive(value: float) -> float | None:
    return float(value) if value > 0 else None


def _reason(error: str) -> str:
    """A failure's reason without request-specific detail (for counting)."""
    return error.split(":", 1)[0].strip() or "unknown"


#: Metrics where more is better (for ratio columns in reports).
HIGHER_IS_BETTER = frozenset({"req_per_s", "tok_per_s", "avg_batch_size",
                              "early_return_ratio", "completed"})

#: The columns of the side-by-side table, in order, with their labels and formats.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("offered_rate", "offered req/s", "{:.2f}"),
    ("completed", "completed", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
    ("req_per_s", "req/s", "{:.3f}"),
    ("tok_per_s", "tok/s", "{:.1f}"),
    ("latency_mean_s", "E2E mean s", "{:.2f}"),
    ("latency_p50_s", "E2E p50 s", "{:.2f}"),
    ("latency_p90_s", "E2E p90 s", "{:.2f}"),
    ("latency_p99_s", "E2E p99 s", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("tpot_p50_s", "TPOT p50 s", "{:.3f}"),
    ("queue_time_p50_s", "queue p50 s", "{:.2f}"),
    ("slices_per_request", "slices/req", "{:.2f}"),
    ("early_return_ratio", "early return", "{:.2f}"),
    ("avg_batch_size", "avg batch", "{:.2f}"),
    ("pad_tokens", "pad tok", "{:.0f}"),
    ("invalid_tokens", "invalid tok", "{:.0f}"),
    ("recomputed_tokens", "recomputed tok", "{:.0f}"),
    ("recomputed_share", "recomputed/prompt", "{:.3f}"),
    ("running_p10", "running p10", "{:.0f}"),
    ("running_p50", "running p50", "{:.0f}"),
    ("running_p90", "running p90", "{:.0f}"),
    ("kv_in_use_mean", "KV in use mean", "{:.2f}"),
    ("kv_in_use_p90", "KV in use p90", "{:.2f}"),
    ("kv_hits", "KV hits", "{:.0f}"),
    ("kv_misses", "KV misses", "{:.0f}"),
    ("prefill_s_total", "prefill s", "{:.1f}"),
    ("decode_s_total", "decode s", "{:.1f}"),
    ("imbalance_busy_std", "busy std s", "{:.2f}"),
    ("imbalance_busy_max_mean", "busy max/mean", "{:.2f}"),
    ("imbalance_ect_std", "ECT std s", "{:.2f}"),
    ("imbalance_ect_max_mean", "ECT max/mean", "{:.2f}"),
)


def occupancy(rows: Sequence[float], kv_share: Sequence[float]) -> dict[str, float | None]:
    """Running-set size percentiles over samples where an instance ran something, and the
    KV memory it held as a share of its budget (mean, p90) over every sample: the same
    figures for the simulator and the real system (``scls bench``); None without samples."""
    busy = np.asarray([r for r in rows if r > 0], dtype=float)
    kv = np.asarray(kv_share, dtype=float)
    out: dict[str, float | None] = {
        f"running_p{q}": float(np.percentile(busy, q)) if len(busy) else None
        for q in (10, 50, 90)}
    out["kv_in_use_mean"] = float(kv.mean()) if len(kv) else None
    out["kv_in_use_p90"] = float(np.percentile(kv, 90)) if len(kv) else None
    return out
