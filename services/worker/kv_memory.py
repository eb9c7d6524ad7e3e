"""``scls kv-memory``: the memory model still bounds every slice when the KV pool is full.

With retention on, an instance holds two things beside its weights: the KV pool (at most
its capacity, enforced by LRU eviction before any copy) and the running slice (bounded by
the memory model ``M(b, l)`` that batching keeps within the batch budget). This command
fills a pool to capacity with real requests, then runs slices of every kind over it:
all rows resuming from the pool, half resuming and half prefilled, all prefilled. For each
it measures the peak bytes the slice allocates beyond the level before it (the pool's
bytes included in that level: torch's CPU allocator events, or CUDA's peak counter) and
compares it with the estimate the scheduler checks for that kind of slice (``M(b, l)``,
``resume_memory`` or ``mixed_memory``). An estimate/measured ratio of at least 1 at every
point, with the pool never above its capacity, is what "0 OOM" rests on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from services.worker.engine import SliceEngine, SliceInput
from services.worker.kv_pool import KvPool
from services.worker.peaks import measure_after
from services.worker.profile_cache import load_or_profile
from shared.core.records import RequestParams
from shared.modeling.loading import LoadedModel
from shared.policy.prefill import pass_tokens_of
from shared.settings import Settings

KINDS = ("resumed", "mixed", "fresh")


class _Requests:
    """Requests of one length driven slice by slice through an engine with a pool."""

    def __init__(self, engine: SliceEngine, vocab: int, seed: int) -> None:
        self.engine = engine
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def new(self, n: int, length: int, max_tokens: int) -> list[SliceInput]:
        rows = []
        for _ in range(n):
            self.count += 1
            prompt = self.rng.integers(3, self.vocab, size=length).tolist()
            rows.append(SliceInput(f"m{self.count}", prompt, [],
                                   RequestParams(max_tokens=max_tokens, ignore_eos=True),
                                   fence=1))
        return rows

    def advance(self, rows: list[SliceInput], s: int) -> list[SliceInput]:
        """Run one slice of ``rows``; the same requests ready for their next slice."""
        outputs, _ = self.engine.run_slice(rows, s)
        return [SliceInput(r.request_id, r.prompt_ids, r.generated_ids + o.new_ids, r.params,
                           fence=r.fence + 1, kv_fence=r.fence if o.kv_retained else None)
                for r, o in zip(rows, outputs, strict=True)]


def _measure_point(
    device: torch.device, reqs: _Requests, engine: SliceEngine, b: int, length: int,
    resumed: int, s: int,
) -> tuple[int, int]:
    """Peak of one slice of ``b`` rows of context ``length``, ``resumed`` of them from the
    pool (their first slices run just before, inside the measurement session); the peak
    and the batch's padded length."""
    warm: list[SliceInput] = []
    fresh = reqs.new(b - resumed, length, 10 * s)

    def first_slices() -> None:
        if resumed:
            warm.extend(reqs.advance(reqs.new(resumed, length - s, 10 * s), s))

    # Frees of older tensors (pool entries the slice evicts) are not seen on CPU, which
    # can only overstate the peak.
    peak = measure_after(device, first_slices, lambda: engine.run_slice(warm + fresh, s))
    return peak, max(len(r.prompt_ids) + len(r.generated_ids) for r in warm + fresh)


def measure(
    loaded: LoadedModel, settings: Settings, pool_bytes: int, points: list[tuple[int, int]],
    seed: int = 0,
) -> dict[str, Any]:
    """Fill a pool of ``pool_bytes`` and measure each ``(b, l)`` point of each kind."""
    cost = load_or_profile(loaded, settings)
    s = settings.slice_length
    pool = KvPool(pool_bytes)
    engine = SliceEngine(loaded, pool=pool,
                         pass_tokens=pass_tokens_of(cost.prefill_features, cost.prefill_coef))
    reqs = _Requests(engine, int(loaded.model.config.vocab_size), seed)
    filler_len = max(16, points[0][1])
    while pool.used_bytes < 0.9 * pool_bytes:  # fill it with requests in mid-generation
        reqs.advance(reqs.new(4, filler_len, 10 * s), s)
    rows = []
    for b, length in points:
        for kind in KINDS:
            resumed = {"resumed": b, "mixed": b // 2, "fresh": 0}[kind]
            peak, padded = _measure_point(loaded.device, reqs, engine, b, length, resumed, s)
            # The estimate the scheduler checks for this kind of batch (docs/design.md §9.6).
            if resumed == b:
                estimate = float(cost.resume_memory(b, padded, s))
            elif resumed:
                estimate = float(cost.mixed_memory(b, padded, s, b - resumed, length))
            else:
                estimate = float(cost.slice_memory(b, padded, s))
            rows.append({
                "b": b, "l": padded, "kind": kind, "resumed_rows": resumed,
                "measured_bytes": peak, "estimate_bytes": estimate,
                "ratio": estimate / peak if peak else float("inf"),
                "pool_used_bytes": pool.used_bytes,
            })
            assert pool.used_bytes <= pool_bytes, "the pool exceeded its capacity"
    ratios = [r["ratio"] for r in rows]
    return {
        "model": loaded.info.name, "device": str(loaded.device), "slice_length": s,
        "pool_bytes": pool_bytes, "evictions": pool.counters.evictions,
        "hits": pool.counters.hits, "ratio_min": min(ratios), "ratio_max": max(ratios),
        "points": rows,
    }
