"""``scls stream-overhead``: what per-token streaming costs the decode loop.

The same slice batch runs again and again on one loaded model, alternately as streaming
requests (the engine hands each step's tokens to a :class:`TokenPublisher`, whose thread
writes them to the requests' event streams in a real Redis, fenced) and as plain requests.
Each run is timed from the slice's start until every token entry is written (the worker
flushes the publisher before it commits), so publishing that lags behind decoding is
counted. The report is the median decode throughput of each kind and their ratio; runs
alternate so that the machine's drift falls on both.

On a noisy machine that ratio scatters by several percent, so the report also counts the
CPU time publishing takes, which does not depend on the noise: the engine's hand-off to
the publisher (main thread), the publisher thread's own CPU time, and redis-server's CPU
time during streaming runs beyond plain ones (``INFO cpu``). Per decode step and as a
share of the decode's wall time, that is the most publishing can take from the decode
loop if it competes with it for every core.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from services.worker.engine import SliceEngine, SliceInput, TokenSink
from services.worker.token_stream import TokenPublisher
from shared.core.records import RequestParams, RequestRecord, StepTokens, new_batch_id, now
from shared.core.store import Store
from shared.modeling.loading import LoadedModel


def _rows(store: Store, loaded: LoadedModel, batch: int, prompt_len: int, slice_len: int,
          stream: bool, rng: np.random.Generator) -> tuple[str, list[SliceInput]]:
    """A started batch of fresh requests in Redis and the engine's rows for it."""
    params = RequestParams(max_tokens=slice_len, ignore_eos=True, stream=stream)
    records = [RequestRecord(id=f"so{rng.integers(1 << 40):x}",
                             prompt_ids=rng.integers(3, loaded.info.vocab_size,
                                                     size=prompt_len).tolist(),
                             params=params, arrival=now()) for _ in range(batch)]
    for rec in records:
        store.submit(rec)
    batch_id = new_batch_id()
    fences = store.claim_batch(batch_id, "stream-bench", [r.id for r in records], slice_len,
                               now() + 600)
    store.start_batch(batch_id, now() + 600)
    return batch_id, [SliceInput(r.id, r.prompt_ids, [], params, fence=fences[r.id])
                      for r in records]


class _CpuLedger:
    """CPU seconds and decode wall time of each kind of run, and the hand-off's time."""

    def __init__(self) -> None:
        self.redis = {"plain": 0.0, "streaming": 0.0}
        self.decode_s = {"plain": 0.0, "streaming": 0.0}
        self.steps = {"plain": 0, "streaming": 0}
        self.handoff_s = 0.0  # engine side: building step entries is in the engine either
        # way; this is the submit calls (queueing), on the decode loop's own thread

    def sink(self, publisher: TokenPublisher, batch_id: str) -> TokenSink:
        """The engine's sink for ``batch_id``: hands steps to ``publisher``, timed."""
        def submit(steps: list[StepTokens]) -> None:
            start = time.perf_counter()
            publisher.submit(batch_id, steps)
            self.handoff_s += time.perf_counter() - start
        return submit

    def report(self, publisher: TokenPublisher) -> dict[str, float]:
        per_step = {k: self.redis[k] / max(self.steps[k], 1) for k in self.redis}
        steps = max(self.steps["streaming"], 1)
        redis_extra = max(0.0, per_step["streaming"] - per_step["plain"])
        cpu = publisher.cpu_s / steps + self.handoff_s / steps + redis_extra
        step_s = self.decode_s["streaming"] / steps
        return {
            "publisher_cpu_ms_per_step": 1e3 * publisher.cpu_s / steps,
            "handoff_ms_per_step": 1e3 * self.handoff_s / steps,
            "redis_cpu_ms_per_step": 1e3 * redis_extra,
            "cpu_ms_per_step": 1e3 * cpu,
            "step_ms": 1e3 * step_s,
            "cpu_share": cpu / step_s if step_s else 0.0,
            "script_calls_per_step": publisher.writes / steps,
        }


def measure(store: Store, loaded: LoadedModel, batch: int, prompt_len: int, slice_len: int,
            repeats: int, seed: int = 0) -> dict[str, Any]:
    """Median decode tokens/s with and without per-token publishing, their ratio, and the
    CPU time publishing takes per decode step."""
    engine = SliceEngine(loaded)
    publisher = TokenPublisher(store)
    rng = np.random.default_rng(seed)
    rates: dict[str, list[float]] = {"plain": [], "streaming": []}
    ordered: list[float] = []  # every run's rate in run order (ABBA blocks of four)
    ledger = _CpuLedger()
    published = 0
    try:
        engine.run_slice(_rows(store, loaded, batch, prompt_len, slice_len, False, rng)[1],
                         slice_len)  # warm-up
        for i in range(repeats * 2):
            stream = i % 4 in (1, 2)  # plain, streaming, streaming, plain, ...: ABBA
            kind = "streaming" if stream else "plain"
            batch_id, rows = _rows(store, loaded, batch, prompt_len, slice_len, stream, rng)
            sink = ledger.sink(publisher, batch_id) if stream else None
            redis_before = store.server_cpu_s()
            _, stats = engine.run_slice(rows, slice_len, sink)
            start = time.perf_counter()
            publisher.flush()
            lag = time.perf_counter() - start
            ledger.redis[kind] += store.server_cpu_s() - redis_before
            ledger.decode_s[kind] += stats.decode_s + lag
            ledger.steps[kind] += len(stats.decode_rows)
            decode_tokens = stats.generated_tokens - len(rows)  # the prefill drew the first
            rate = decode_tokens / (stats.decode_s + lag)
            rates[kind].append(rate)
            ordered.append(rate)
            if stream:
                published += sum(len(store.events(r.request_id)) for r in rows)
    finally:
        publisher.close()
    plain, streaming = (statistics.median(rates[k]) for k in ("plain", "streaming"))
    # Within one ABBA block the machine drifts little: the median of the blocks' ratios
    # resists a slow or busy stretch that a ratio of medians does not.
    blocks = [ordered[i:i + 4] for i in range(0, len(ordered) - 3, 4)]
    paired = [(b[1] + b[2]) / (b[0] + b[3]) for b in blocks]
    return {
        "model": loaded.info.name, "device": str(loaded.device), "batch": batch,
        "prompt_len": prompt_len, "slice_length": slice_len, "repeats": repeats,
        "plain_tokens_per_s": plain, "streaming_tokens_per_s": streaming,
        "overhead": 1 - streaming / plain, "entries_published": published,
        "paired_overhead": 1 - statistics.median(paired) if paired else None,
        "block_ratios": [round(r, 4) for r in paired],
        "runs": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
        "cpu": ledger.report(publisher),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable report."""
    cpu = result["cpu"]
    return [
        f"{result['model']} on {result['device']}: batch {result['batch']}, prompt "
        f"{result['prompt_len']} tokens, slice {result['slice_length']} steps, "
        f"{result['repeats']} runs each (alternating)",
        f"decode tokens/s, median: plain {result['plain_tokens_per_s']:.1f}, streaming "
        f"{result['streaming_tokens_per_s']:.1f}",
        f"streaming overhead: {100 * result['overhead']:.1f}% from the medians"
        + (f", {100 * result['paired_overhead']:.1f}% median over ABBA blocks"
           if result["paired_overhead"] is not None else "")
        + f" ({result['entries_published']} token entries written)",
        f"publishing CPU per decode step ({cpu['step_ms']:.1f} ms): "
        f"{cpu['cpu_ms_per_step']:.3f} ms = {100 * cpu['cpu_share']:.2f}% of the step "
        f"(publisher thread {cpu['publisher_cpu_ms_per_step']:.3f}, hand-off "
        f"{cpu['handoff_ms_per_step']:.3f}, redis-server {cpu['redis_cpu_ms_per_step']:.3f}; "
        f"{cpu['script_calls_per_step']:.2f} script calls per step)",
    ]
