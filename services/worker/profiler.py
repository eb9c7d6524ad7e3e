"""Profiler: measure the slice engine over a grid of batch sizes and context lengths.

Each grid point ``(b, l)`` runs real slices through :class:`SliceEngine.run_slice` (the
code path that serves requests) with EOS ignored, so every slice runs its full ``S``
steps. A forward pre-hook on the model stamps the start of every forward call, which splits
the slice into the prefill (from the call of ``run_slice`` to the first decode step) and
each decode step (from one decode call to the next, the last one to the return of
``run_slice``): per-step times include sampling and bookkeeping and add up exactly to the
measured whole slice.

Peak memory beyond what was allocated before the slice (``PointSample.peak_bytes``, what
the memory model is fitted to):

* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the slice;
* CPU: the same figure for torch's CPU allocator, which has no peak counter: the slice runs
  once more per point under ``torch.profiler`` with ``profile_memory=True`` and the peak is
  the largest running sum of its allocation events (every allocation and free of the CPU
  allocator, kernels' scratch tensors included). It repeats to the byte for a shape. That
  run's time is not used (the profiler slows every op).

On CPU the process also grows by what glibc keeps on top (freed chunks, per-thread arenas):
``PointSample.process_peak_bytes`` is the growth of its peak resident set (``VmHWM``) over
its resident set just before the slice, largest over the timed repeats. Linux resets
``VmHWM`` to the current RSS when ``5`` is written to ``/proc/self/clear_refs``; freed heap
is first returned to the OS (``malloc_trim``) so that the slice cannot hide its growth in
memory already held. The fit turns it into the model's ``heap_overhead``, by which the CPU
budget is divided. Where the reset is not allowed, the process figure is not measured; where
the profiler gives no allocation events either, memory is not measured and the analytic
bound is used.

Warm-up slices run first and are not recorded; every point is repeated (the repeats are
interleaved over the grid, so a burst of outside load hits one repeat of many points rather
than every repeat of one point) and the median time and the largest peak are kept.

:func:`profile_and_fit` measures a grid and fits the model;
:func:`services.worker.profile_cache.load_or_profile` is what a worker calls at start.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from services.worker.engine import SliceEngine, SliceInput
from services.worker.fit import FitReport, fit_cost_model
from services.worker.kv_pool import KvEntry, KvPool
from services.worker.peaks import AllocatorPeak, PeakMeter, measure_after
from services.worker.samples import PointSample, ProfileSamples
from shared.core.records import RequestParams
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import TINY_RANDOM
from shared.obs.logging import get_logger
from shared.policy.costmodel import CostModel, analytic_cost_model

log = get_logger(__name__)

PROFILER_VERSION = 4  # bump when measurement changes: cached profiles then become stale


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileGrid:
    """Points ``(b, l)`` to measure: every pair with ``b * l <= max_batch_tokens``."""

    name: str
    batch_sizes: tuple[int, ...]
    lengths: tuple[int, ...]
    max_batch_tokens: int  # skips the expensive corner (prefill cost grows with b*l)
    repeats: int = 3  # measured runs per point; the median time is kept
    warmup: int = 2  # slices run first and discarded

    def points(self, context_limit: int, slice_length: int) -> list[tuple[int, int]]:
        """The grid points that fit the budget and the model's context window."""
        return [
            (b, x)
            for b in self.batch_sizes
            for x in self.lengths
            if b * x <= self.max_batch_tokens and x + slice_length + 1 <= context_limit
        ]


# Seconds for tiny-random; about 2 minutes for smollm2-135m on an idle 2-core CPU.
QUICK_GRID = ProfileGrid("quick", (1, 2, 4, 8), (8, 16, 32, 64), max_batch_tokens=512)
# For real use: 36 points, 3 repeats; about 9 minutes for smollm2-135m on an idle 2-core CPU
# at S = 32 (an early estimate; BENCHMARKS.md has a measured run). l = 1024 (for b <= 4)
# covers the long contexts a b*l*l term needs; b*l > 4096 (b=32, l=512: 36 s of prefill) is skipped.
FULL_GRID = ProfileGrid(
    "full", (1, 2, 4, 8, 16, 32), (16, 32, 64, 128, 256, 512, 1024), max_batch_tokens=4096
)


def grid_for(mode: str, model: str) -> ProfileGrid | None:
    """Grid of a ``profile_mode``: ``auto`` is quick for tiny-random and full otherwise;
    ``analytic`` measures nothing (None).

    Raises:
        ValueError: an unknown mode.
    """
    # The module globals are read at call time (tests patch them), not copied into a table.
    if mode == "analytic":
        return None
    if mode == "auto":
        return QUICK_GRID if model == TINY_RANDOM else FULL_GRID
    if mode == "quick":
        return QUICK_GRID
    if mode == "full":
        return FULL_GRID
    raise ValueError(f"unknown profile_mode {mode!r}: auto, full, quick or analytic")


# --------------------------------------------------------------------------------------------
# Measuring one slice
# --------------------------------------------------------------------------------------------


@dataclass
class SliceTiming:
    """One measured slice."""

    prefill_s: float
    step_s: list[float]
    slice_s: float
    peak_bytes: int | None


class _ForwardClock:
    """Forward pre-hook recording when each forward call of the model starts."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())


def _rows(b: int, l: int, s: int, vocab: int, rng: np.random.Generator) -> list[SliceInput]:  # noqa: E741
    """``b`` random prompts padded to ``l``: row 0 is ``l`` long, the others shorter.

    Uneven lengths give a real padding mask (as served batches have), so attention takes
    the same path as in serving; the padded shape, which sets the cost, is ``b x l``.
    """
    params = RequestParams(max_tokens=s, ignore_eos=True)
    lengths = [l] + [int(rng.integers(max(1, l // 2), l + 1)) for _ in range(b - 1)]
    return [
        SliceInput(f"p{i}", rng.integers(3, vocab, size=n).tolist(), [], params)
        for i, n in enumerate(lengths)
    ]


def measure_slice(
    engine: SliceEngine, rows: list[SliceInput], s: int, meter: PeakMeter
) -> SliceTiming:
    """Run one slice of ``rows`` and split its time into prefill and decode steps."""
    clock = _ForwardClock()
    handle = engine.model.register_forward_pre_hook(clock, with_kwargs=True)
    try:
        meter.start()
        start = time.perf_counter()
        _, stats = engine.run_slice(rows, s)
        end = time.perf_counter()
        peak = meter.peak()
    finally:
        handle.remove()
    if stats.steps != s or len(clock.stamps) != s:
        raise RuntimeError(f"profiling slice ran {stats.steps} steps/{len(clock.stamps)} calls")
    bounds = [start, *clock.stamps[1:], end]  # prefill | step 1 | ... | step s-1
    durations = np.diff(bounds).tolist()
    return SliceTiming(durations[0], durations[1:], end - start, peak)


# --------------------------------------------------------------------------------------------
# The grid run
# --------------------------------------------------------------------------------------------


def run_profile(
    loaded: LoadedModel,
    slice_length: int,
    grid: ProfileGrid,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> ProfileSamples:
    """Measure every point of ``grid`` (repeats interleaved, warm-up discarded).

    Raises:
        ValueError: the grid has no point that fits the model's context window.
    """
    points = grid.points(loaded.info.context_limit, slice_length)
    if not points:
        raise ValueError(f"grid {grid.name!r} has no point within the context window")
    # One padded prefill pass per slice: the shape the cost model's Tp(b, l) describes.
    engine = SliceEngine(loaded, pass_tokens=math.inf)
    meter = PeakMeter(loaded.device)
    rng = np.random.default_rng(seed)
    vocab = loaded.info.vocab_size
    warm = [points[0], points[-1]]
    for i in range(grid.warmup):  # first calls allocate pools, pick kernels: not data
        b, x = warm[i % len(warm)]
        measure_slice(engine, _rows(b, x, slice_length, vocab, rng), slice_length, meter)
    runs: dict[tuple[int, int], list[SliceTiming]] = {p: [] for p in points}
    started = time.perf_counter()
    for rep in range(grid.repeats):
        for b, x in points:
            rows = _rows(b, x, slice_length, vocab, rng)
            runs[(b, x)].append(measure_slice(engine, rows, slice_length, meter))
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress(f"repeat {rep + 1}/{grid.repeats} of {len(points)} points, {elapsed:.0f}s")
    allocator = _allocator_peaks(engine, points, slice_length, vocab, rng, loaded.device)
    if allocator and progress is not None:
        progress(f"allocator peaks of {len(points)} points")
    resumed = _resumed_peaks(loaded, points, slice_length, rng, bool(allocator) or meter.cuda)
    if resumed and progress is not None:
        progress(f"resumed-slice peaks of {len(resumed)} points")
    return ProfileSamples(
        points=tuple(
            replace(_summarise(b, x, slice_length, runs[(b, x)], allocator.get((b, x))),
                    resume_peak_bytes=resumed.get((b, x)))
            for b, x in points
        ),
        slice_length=slice_length,
        kv_bytes_per_token=loaded.info.kv_bytes_per_token,
        model=loaded.info.name,
        device=str(loaded.device),
        dtype=dtype_name(loaded),
        grid=grid.name,
        meta={
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "grid": json.loads(json.dumps(asdict(grid))),
            "profile_s": round(time.perf_counter() - started, 2),
            "memory_measured": bool(allocator) or meter.available,
            "memory_method": _memory_method(meter, bool(allocator)),
        },
    )


def _allocator_peaks(
    engine: SliceEngine,
    points: list[tuple[int, int]],
    s: int,
    vocab: int,
    rng: np.random.Generator,
    device: torch.device,
) -> dict[tuple[int, int], int]:
    """CPU: one more slice per point under the allocator meter (empty elsewhere, or where
    the profiler gives no allocation events)."""
    if device.type != "cpu":
        return {}
    meter = AllocatorPeak()
    if not meter.available:
        log.warning("allocator_peak_unavailable", fallback="resident set growth")
        return {}
    peaks = {}
    for b, x in points:
        rows = _rows(b, x, s, vocab, rng)
        peaks[(b, x)] = meter.measure(lambda rows=rows: engine.run_slice(rows, s))
    return peaks


def _resumed_peaks(
    loaded: LoadedModel,
    points: list[tuple[int, int]],
    s: int,
    rng: np.random.Generator,
    exact: bool,
) -> dict[tuple[int, int], int]:
    """Peak of a slice of ``b`` rows of context ``l`` that all resume from a KV pool,
    per point with ``l > s``, beyond the level before it; only where peaks are exact
    (CUDA's counter or CPU allocator events), else empty.

    The rows' entries are made (zeros: memory does not depend on values) inside the same
    measurement just before the slice, so their release when the slice copies them in is
    seen; the pool never evicts, so the slice's own entries are all it frees.
    """
    if not exact:
        return {}
    pool = KvPool(1 << 62)
    engine = SliceEngine(loaded, pool=pool, pass_tokens=math.inf)
    config = loaded.model.config.get_text_config(decoder=True)
    layers = int(config.num_hidden_layers)
    dtype = next(loaded.model.parameters()).dtype
    vocab = loaded.info.vocab_size
    # Unfinished after the slice (max_tokens beyond it), so their K/V goes back to the
    # pool while the slice's cache is still allocated: part of the peak.
    params = RequestParams(max_tokens=4 * s, ignore_eos=True)
    peaks = {}
    for b, x in points:
        if x <= s:
            continue
        rows = [replace(r, generated_ids=rng.integers(3, vocab, size=s).tolist(), params=params,
                        fence=2, kv_fence=1)
                for r in _rows(b, x - s, s, vocab, rng)]

        def entries(rows: list[SliceInput] = rows) -> None:
            for r in rows:
                tokens = r.context[:-1]
                shape = (layers, engine.kv_heads, len(tokens), engine.head_dim)
                keys = torch.zeros(shape, dtype=dtype, device=loaded.device)
                pool.put(r.request_id, KvEntry(keys, torch.zeros_like(keys), tokens, 1))

        peaks[(b, x)] = measure_after(loaded.device, entries,
                                      lambda rows=rows: engine.run_slice(rows, s))
        if pool.counters.misses:
            raise RuntimeError("a profiled resumed row did not resume")
        pool.clear()
    return peaks


def _memory_method(meter: PeakMeter, allocator: bool) -> str | None:
    """How ``peak_bytes`` was measured (recorded in the profile's meta)."""
    if meter.cuda:
        return "cuda_max_memory_allocated"
    if allocator:
        return "cpu_allocator_events"
    return "resident_set_growth" if meter.available else None


def _summarise(
    b: int, x: int, s: int, runs: list[SliceTiming], allocator_peak: int | None
) -> PointSample:
    """Median times and largest peak of one point's repeats.

    CUDA: ``peak_bytes`` is the allocator's peak. CPU: ``peak_bytes`` is the allocator peak
    of the memory pass and ``process_peak_bytes`` the largest resident-set growth of the
    timed repeats (without the memory pass, the resident-set growth is all there is and
    becomes ``peak_bytes``).
    """
    largest = _largest([r.peak_bytes for r in runs])
    peak, process = (largest, None) if allocator_peak is None else (allocator_peak, largest)
    steps = np.median(np.array([r.step_s for r in runs]), axis=0) if s > 1 else []
    return PointSample(
        b=b,
        l=x,
        s=s,
        prefill_s=float(np.median([r.prefill_s for r in runs])),
        step_s=tuple(float(v) for v in steps),
        slice_s=float(np.median([r.slice_s for r in runs])),
        peak_bytes=peak,
        process_peak_bytes=process,
    )


def _largest(values: list[int | None]) -> int | None:
    """The largest value, or None if any is missing."""
    if any(v is None for v in values):
        return None
    return int(max(v for v in values if v is not None))


def dtype_name(loaded: LoadedModel) -> str:
    """The weights' dtype, e.g. ``float32``."""
    return str(next(loaded.model.parameters()).dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Models for an instance
# --------------------------------------------------------------------------------------------


def analytic_model_for(loaded: LoadedModel, slice_length: int) -> CostModel:
    """The shape-only fallback model (see :func:`shared.policy.costmodel.analytic_cost_model`)."""
    text = loaded.model.config.get_text_config(decoder=True)
    param = next(loaded.model.parameters())
    return analytic_cost_model(
        slice_length=slice_length,
        kv_bytes_per_token=loaded.info.kv_bytes_per_token,
        weights_bytes=loaded.info.weights_bytes,
        hidden_size=int(text.hidden_size),
        intermediate_size=int(text.intermediate_size),
        num_attention_heads=int(text.num_attention_heads),
        vocab_size=loaded.info.vocab_size,
        dtype_bytes=param.element_size(),
        device=str(loaded.device),
        model=loaded.info.name,
        dtype=dtype_name(loaded),
    )


def profile_and_fit(
    loaded: LoadedModel,
    slice_length: int,
    grid: ProfileGrid,
    progress: Callable[[str], None] | None = None,
) -> tuple[CostModel, FitReport, ProfileSamples]:
    """Measure ``grid`` and fit; memory falls back to the analytic bound if unmeasured."""
    samples = run_profile(loaded, slice_length, grid, progress)
    fallback = analytic_model_for(loaded, slice_length)
    model, report = fit_cost_model(samples, fallback=fallback)
    return model, report, samples
