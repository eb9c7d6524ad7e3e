"""``scls stream-overhead``: what per-token streaming costs the decode loop.

The same slice batch runs again and again on one loaded model, alternately as streaming
requests (the engine hands each step's tokens to a :class:`TokenPublisher`, whose thread
writes them to the requests' event streams in a real Redis, fenced) and as plain requests.
Each run is timed from the slice's start until every token entry is written (the worker
flushes the publisher before it commits), so publishing that lags behind decoding is
counted. The report is the median decode throughput of each kind and their ratio; runs
alternate so that the machine's drift falls on both.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from services.worker.engine import SliceEngine, SliceInput
from services.worker.token_stream import TokenPublisher
from shared.core.records import RequestParams, RequestRecord, new_batch_id, now
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


def measure(store: Store, loaded: LoadedModel, batch: int, prompt_len: int, slice_len: int,
            repeats: int, seed: int = 0) -> dict[str, Any]:
    """Median decode tokens/s with and without per-token publishing, and their ratio."""
    engine = SliceEngine(loaded)
    publisher = TokenPublisher(store)
    rng = np.random.default_rng(seed)
    rates: dict[str, list[float]] = {"plain": [], "streaming": []}
    ordered: list[float] = []  # every run's rate in run order (ABBA blocks of four)
    published = 0
    try:
        engine.run_slice(_rows(store, loaded, batch, prompt_len, slice_len, False, rng)[1],
                         slice_len)  # warm-up
        for i in range(repeats * 2):
            stream = i % 4 in (1, 2)  # plain, streaming, streaming, plain, ...: ABBA
            batch_id, rows = _rows(store, loaded, batch, prompt_len, slice_len, stream, rng)
            sink = (lambda steps, b=batch_id: publisher.submit(b, steps)) if stream else None
            _, stats = engine.run_slice(rows, slice_len, sink)
            start = time.perf_counter()
            publisher.flush()
            lag = time.perf_counter() - start
            decode_tokens = stats.generated_tokens - len(rows)  # the prefill drew the first
            rate = decode_tokens / (stats.decode_s + lag)
            rates["streaming" if stream else "plain"].append(rate)
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
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable report."""
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
    ]
