"""Benchmark workloads: who arrives when, with how long a prompt and how long an output.

The same workloads drive ``scls bench`` (over HTTP, against the real system) and
``scls simulate`` (against simulated instances), so both see identical requests for the
same seed. docs/design.md §8: a trace has no prompt text, only lengths; a replay builds
prompts of the given token length and forces the given output length (``max_tokens`` with
``ignore_eos``), and the scheduler only ever sees ``max_tokens`` as an upper bound.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

#: Arrival processes: as recorded in the trace, Poisson, gamma (burstiness), all at t=0.
ARRIVALS = ("trace", "poisson", "gamma", "constant", "burst")


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload."""

    index: int
    arrival_s: float  # offset from the start of the run
    prompt_tokens: int
    output_tokens: int  # forced output length: max_tokens with ignore_eos


@dataclass(frozen=True)
class SyntheticLengths:
    """Log-normal prompt and output lengths, clipped.

    Defaults are fitted to the Azure 2023 conversation trace (docs/design.md §8): a
    log-normal with median m and mean u has sigma = sqrt(2 ln(u / m)); prompts median 1,020,
    mean 1,155 -> sigma 0.50; outputs median 129, mean 211 -> sigma 0.99, max 1,000.
    """

    prompt_median: float = 1020.0
    prompt_sigma: float = 0.50
    prompt_max: int = 4096
    output_median: float = 129.0
    output_sigma: float = 0.99
    output_max: int = 1000


@dataclass(frozen=True)
class TraceRow:
    """One row of a length trace: seconds since the first row, and the two lengths."""

    offset_s: float
    prompt_tokens: int
    output_tokens: int


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch of ``2023-11-16 18:15:46.6805900`` (7-digit fractions too)."""
    whole, _, frac = text.strip().partition(".")
    stamp = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return stamp + (float(f"0.{frac}") if frac else 0.0)


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Rows of a ``TIMESTAMP, ContextTokens, GeneratedTokens`` CSV, in time order.

    Raises ``ValueError`` naming the file and line for a missing column or a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"trace {path} lacks column(s) {', '.join(sorted(missing))}; "
                             f"expected TIMESTAMP, ContextTokens, GeneratedTokens")
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append((_parse_timestamp(rec["TIMESTAMP"]), int(rec["ContextTokens"]),
                             int(rec["GeneratedTokens"])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"trace {path} line {line}: {exc}") from None
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"trace {path} has no rows")
    rows.sort(key=lambda r: r[0])
    first = rows[0][0]
    return [TraceRow(t - first, p, g) for t, p, g in rows]


def scale_length(tokens: int, factor: float) -> int:
    """A length multiplied by ``factor``, rounded, at least 1."""
    return max(1, round(tokens * factor))


def trace_workload(
    rows: Sequence[TraceRow], length_scale: float = 1.0, time_scale: float = 1.0
) -> list[WorkItem]:
    """Replay ``rows``: recorded arrivals divided by ``time_scale``, lengths scaled."""
    return [
        WorkItem(i, row.offset_s / time_scale, scale_length(row.prompt_tokens, length_scale),
                 scale_length(row.output_tokens, length_scale))
        for i, row in enumerate(rows)
    ]


def synthetic_workload(
    n: int, seed: int, lengths: SyntheticLengths = SyntheticLengths(), length_scale: float = 1.0
) -> list[WorkItem]:
    """``n`` requests with log-normal lengths (arrivals all 0: see :func:`with_arrivals`)."""
    rng = np.random.default_rng(seed)
    prompts = rng.lognormal(math.log(lengths.prompt_median), lengths.prompt_sigma, n)
    outputs = rng.lognormal(math.log(lengths.output_median), lengths.output_sigma, n)
    prompts = np.clip(np.rint(prompts), 1, lengths.prompt_max).astype(int)
    outputs = np.clip(np.rint(outputs), 1, lengths.output_max).astype(int)
    return [
        WorkItem(i, 0.0, scale_length(int(p), length_scale), scale_length(int(g), length_scale))
        for i, (p, g) in enumerate(zip(prompts, outputs, strict=True))
    ]


def fixed_workload(n: int, prompt_tokens: int, output_tokens: int) -> list[WorkItem]:
    """``n`` requests of exactly ``prompt_tokens`` in and ``output_tokens`` out (GuideLLM's
    ``synthetic_text`` shape; arrivals all 0: see :func:`with_arrivals`)."""
    if prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("fixed lengths need at least 1 prompt and 1 output token")
    return [WorkItem(i, 0.0, prompt_tokens, output_tokens) for i in range(n)]


def arrival_times(n: int, mode: str, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Arrival offsets (seconds, ascending, first at 0) of ``n`` requests.

    ``poisson``: exponential gaps of mean ``1/rate``; ``gamma``: gamma gaps with shape
    ``burstiness`` and the same mean (vLLM's convention: < 1 burstier, > 1 smoother);
    ``constant``: evenly spaced at ``1/rate`` (GuideLLM's constant profile); ``burst``:
    everyone at 0.
    """
    if mode == "burst" or n == 0:
        return np.zeros(n)
    if not rate > 0:
        raise ValueError(f"rate must be > 0 for {mode} arrivals, got {rate}")
    if mode == "constant":
        return np.arange(n) / rate
    rng = np.random.default_rng(seed)
    if mode == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif mode == "gamma":
        if not burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {burstiness}")
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    else:
        raise ValueError(f"unknown arrival mode {mode!r}; choose from {', '.join(ARRIVALS)}")
    gaps[0] = 0.0
    return np.cumsum(gaps)


def with_arrivals(
    items: Sequence[WorkItem], mode: str, rate: float = 0.0, burstiness: float = 1.0,
    seed: int = 0,
) -> list[WorkItem]:
    """``items`` with arrivals replaced (``trace`` keeps theirs)."""
    if mode == "trace":
        return list(items)
    times = arrival_times(len(items), mode, rate, burstiness, seed)
    return [replace(item, arrival_s=float(t)) for item, t in zip(items, times, strict=True)]


def prompt_token_ids(item: WorkItem, vocab_size: int, seed: int, avoid: Sequence[int] = ()
                     ) -> list[int]:
    """Deterministic token ids of the item's prompt length (no text: the trace has none).

    Ids are drawn from ``[low, vocab_size)`` where ``low`` skips the first ids, which
    tokenizers use for special tokens; ``avoid`` (e.g. EOS ids) are replaced.
    """
    low = min(100, vocab_size // 4)
    rng = np.random.default_rng([seed, item.index])
    ids = rng.integers(low, vocab_size, item.prompt_tokens)
    banned = set(avoid)
    return [low if i in banned else int(i) for i in ids.tolist()]


def describe(items: Sequence[WorkItem]) -> dict[str, float | None]:
    """Summary statistics of a workload (for reports)."""
    if not items:
        return {"requests": 0}
    prompts = np.array([i.prompt_tokens for i in items])
    outputs = np.array([i.output_tokens for i in items])
    span = max(i.arrival_s for i in items)
    return {
        "requests": len(items),
        "prompt_mean": float(prompts.mean()),
        "prompt_p50": float(np.median(prompts)),
        "prompt_max": int(prompts.max()),
        "output_mean": float(outputs.mean()),
        "output_p50": float(np.median(outputs)),
        "output_max": int(outputs.max()),
        "arrival_span_s": float(span),
        "offered_rate": float(len(items) / span) if span > 0 else None,  # None: all at once
    }
