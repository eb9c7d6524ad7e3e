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

Memory of the run itself: each ``torch.profiler`` session holds its records (about 0.6 GB
for one slice of smollm2-135m at S = 32) until it is collected, which
:meth:`AllocatorPeak.measure_after` does at once. Given the process's memory limit
(:func:`services.worker.peaks.memory_limit`: a container's limit), grid points whose
analytic bound, times :data:`ASSUMED_HEAP_OVERHEAD`, plus one session (measured on the
smallest point first) would not fit in what the process may still grow by are skipped and
recorded in the profile's ``meta`` (``skipped_points``).

Progress: ``progress`` gets a line at the start of each phase and at most every
:data:`PROGRESS_EVERY_S` within one ("step 17/70: timing repeat 2/3 (b=1, l=16), ...").

:func:`profile_and_fit` measures a grid and fits the model;
:func:`services.worker.profile_cache.load_or_profile` is what a worker calls at start.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from services.worker.engine import SliceEngine, SliceInput
from services.worker.fit import FitReport, fit_cost_model
from services.worker.kv_pool import KvEntry, KvPool
from services.worker.peaks import (
    AllocatorPeak,
    MemoryLimit,
    PeakMeter,
    measure_after,
    release_free_heap,
)
from services.worker.samples import PointSample, ProfileSamples
from shared.core.records import RequestParams
from shared.grammar.spec import GrammarSpec
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import TINY_RANDOM
from shared.obs.logging import get_logger
from shared.policy.costmodel import CostModel, analytic_cost_model

log = get_logger(__name__)

PROFILER_VERSION = 6  # bump when measurement changes: cached profiles then become stale
#: Process growth per byte of the analytic memory bound, assumed when deciding which grid
#: points fit in memory (on CPU glibc's heap grows the process beyond what torch allocates:
#: ``CostModel.heap_overhead``; smollm2-135m's quick grid measured 1.89 with its slack).
ASSUMED_HEAP_OVERHEAD = 2.0
#: A phase of the run reports its progress at most this often (and when it starts).
PROGRESS_EVERY_S = 10.0


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


class _Steps:
    """Counts the run's steps (one measured slice each) and reports them through
    ``progress``: when a phase starts and at most every ``every_s`` within it."""

    def __init__(self, total: int, progress: Callable[[str], None] | None,
                 every_s: float | None = None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.started = time.perf_counter()
        self._reported = -math.inf
        self._what = ""

    def phase(self, what: str) -> None:
        """A new phase begins: report it now."""
        self._what = what
        self._report()

    def step(self, detail: str = "") -> None:
        """One slice measured; report if the last report is old enough."""
        self.done += 1
        if time.perf_counter() - self._reported >= self.every_s:
            self._report(detail)

    def _report(self, detail: str = "") -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        self._reported = now
        elapsed = now - self.started
        left = (f", about {elapsed / self.done * (self.total - self.done):.0f}s left"
                if self.done else "")
        where = f" ({detail})" if detail else ""
        self.progress(f"step {self.done}/{self.total}: {self._what}{where}; "
                      f"{elapsed:.0f}s so far{left}")


def point_need_bytes(analytic: CostModel, b: int, x: int, session_bytes: int) -> int:
    """How much measuring the point ``(b, x)`` may grow the process by: the analytic bound
    of its slice plus as much K/V again (the resumed pass holds a pool's entries while its
    slice runs), times :data:`ASSUMED_HEAP_OVERHEAD`, plus one profiler session's records."""
    slice_bytes = float(analytic.slice_memory(b, x)) + float(analytic.kv_cache_bytes(b, x))
    return int(slice_bytes * ASSUMED_HEAP_OVERHEAD) + int(session_bytes)


def fit_points(
    points: list[tuple[int, int]], analytic: CostModel, available: int | None,
    session_bytes: int,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``points`` split into those whose :func:`point_need_bytes` fits in ``available``
    bytes and those that do not (None: no limit, all fit)."""
    if available is None:
        return list(points), []
    kept = [p for p in points if point_need_bytes(analytic, *p, session_bytes) <= available]
    return kept, [p for p in points if p not in kept]


def _session_bytes(
    engine: SliceEngine, point: tuple[int, int], s: int, vocab: int,
    rng: np.random.Generator, device: torch.device,
) -> int:
    """Growth of the process's peak resident set while one slice of ``point`` runs under
    the allocator meter: what a profiler session costs beyond the slice (0 where the peak
    cannot be read). The same slice runs once before, unmeasured: a process's first slice
    also allocates torch's lasting state (thread pools, kernels), which is no session's."""
    meter = PeakMeter(device)
    if not meter.available:
        return 0
    rows = _rows(*point, s, vocab, rng)
    engine.run_slice(rows, s)
    meter.start()
    AllocatorPeak.measure(lambda: engine.run_slice(rows, s))
    return int(meter.peak() or 0)


def run_profile(
    loaded: LoadedModel,
    slice_length: int,
    grid: ProfileGrid,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    memory: MemoryLimit | None = None,
) -> ProfileSamples:
    """Measure every point of ``grid`` (repeats interleaved, warm-up discarded) that fits in
    ``memory`` (the process's limit; None: every point).

    Raises:
        ValueError: the grid has no point that fits the model's context window, or none
            that fits in ``memory``.
    """
    points = grid.points(loaded.info.context_limit, slice_length)
    if not points:
        raise ValueError(f"grid {grid.name!r} has no point within the context window")
    # One padded prefill pass per slice: the shape the cost model's Tp(b, l) describes.
    engine = SliceEngine(loaded, pass_tokens=math.inf)
    meter = PeakMeter(loaded.device)
    rng = np.random.default_rng(seed)
    vocab = loaded.info.vocab_size
    allocator = _allocator_meter(loaded.device)
    session = 0
    if allocator is not None and memory is not None:
        if progress is not None:
            progress("measuring one profiler session's memory")
        session = _session_bytes(engine, points[0], slice_length, vocab, rng, loaded.device)
    analytic = analytic_model_for(loaded, slice_length)
    available = None if memory is None else memory.available()
    points, skipped = fit_points(points, analytic, available, session)
    if skipped:
        log.warning("profile_points_skipped", points=[list(p) for p in skipped],
                    kept=len(points), memory_limit_bytes=memory and memory.limit_bytes,
                    limit_source=memory and memory.source, available_bytes=available,
                    session_bytes=session)
    if not points:
        raise ValueError(f"no point of grid {grid.name!r} fits in memory: "
                         f"{available} bytes available under a limit of "
                         f"{memory and memory.limit_bytes} ({memory and memory.source})")
    exact = allocator is not None or meter.cuda
    # Every point with a token to resume from: with only l > S, a quick grid at the
    # default S = 32 had 4 such points, too few to fit an envelope, and resumed slices
    # were then priced as prefills of their whole context (batches capped at ~11 rows).
    resumable = [p for p in points if p[1] > 1] if exact else []
    steps = _Steps(grid.warmup + grid.repeats * len(points)
                   + (len(points) if allocator is not None else 0) + len(resumable)
                   + (grid.repeats + 1) * len(grammar_rows(grid)), progress)
    warm = [points[0], points[-1]]
    steps.phase("warm-up")
    for i in range(grid.warmup):  # first calls allocate pools, pick kernels: not data
        b, x = warm[i % len(warm)]
        measure_slice(engine, _rows(b, x, slice_length, vocab, rng), slice_length, meter)
        steps.step()
    runs: dict[tuple[int, int], list[SliceTiming]] = {p: [] for p in points}
    started = time.perf_counter()
    for rep in range(grid.repeats):
        steps.phase(f"timing repeat {rep + 1}/{grid.repeats} of {len(points)} points")
        for b, x in points:
            rows = _rows(b, x, slice_length, vocab, rng)
            runs[(b, x)].append(measure_slice(engine, rows, slice_length, meter))
            steps.step(f"b={b}, l={x}")
    peaks = _allocator_peaks(engine, points, slice_length, vocab, rng, allocator, steps)
    resumed = _resumed_peaks(loaded, resumable, slice_length, rng, steps)
    grammar = _grammar_runs(loaded, grammar_rows(grid), slice_length, grid.repeats, rng, steps)
    steps.phase("done")
    release_free_heap()  # the run's freed heap goes back to the OS before the worker serves
    return ProfileSamples(
        points=tuple(
            replace(_summarise(b, x, slice_length, runs[(b, x)], peaks.get((b, x))),
                    resume_peak_bytes=resumed.get((b, x)))
            for b, x in points
        ),
        slice_length=slice_length,
        kv_bytes_per_token=loaded.info.kv_bytes_per_token,
        model=loaded.info.name,
        device=str(loaded.device),
        dtype=dtype_name(loaded),
        grid=grid.name,
        grammar=grammar,
        meta={
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "grid": json.loads(json.dumps(asdict(grid))),
            "profile_s": round(time.perf_counter() - started, 2),
            "memory_measured": bool(peaks) or meter.available,
            "memory_method": _memory_method(meter, bool(peaks)),
            "memory_limit_bytes": None if memory is None else memory.limit_bytes,
            "memory_limit_source": None if memory is None else memory.source,
            "profiler_session_bytes": session or None,
            "skipped_points": [list(p) for p in skipped],
        },
    )


def grammar_rows(grid: ProfileGrid) -> tuple[int, ...]:
    """Batch sizes whose masking cost is measured: one row and the grid's largest batch."""
    return tuple(sorted({1, max(grid.batch_sizes)}))


def _grammar_runs(loaded: LoadedModel, sizes: Sequence[int], slice_length: int, repeats: int,
                  rng: np.random.Generator, steps: _Steps
                  ) -> tuple[tuple[int, float, float], ...]:
    """``(rows, seconds masking, tokens masked)`` per batch size: 16-token prompts decoded
    for a slice under a JSON schema that cannot end within it
    (``constrained_bench.LONG_SCHEMA``), ``repeats`` times after one warm-up (which
    compiles the schema), timed by the engine itself (``SliceEngine.mask_s``: computing and
    applying the masks, advancing the grammars). Timing the work directly, not a free run
    against a constrained one, keeps it clear of the run-to-run noise of the model's own
    steps, which on a loaded CPU is larger than the masks. Fitted by
    :func:`services.worker.fit.grammar_token_s`."""
    from services.worker.constrained_bench import LONG_SCHEMA

    engine = SliceEngine(loaded)
    params = RequestParams(max_tokens=slice_length, ignore_eos=True,
                           grammar=GrammarSpec.json_schema(LONG_SCHEMA, "schema").key)
    out = []
    for b in sizes:
        steps.phase(f"masking cost, {b} rows")
        prompts = [rng.integers(3, loaded.info.vocab_size, size=16).tolist() for _ in range(b)]
        rows = [SliceInput(f"g{i}", p, [], params) for i, p in enumerate(prompts)]
        seconds, tokens = engine.mask_s, engine.masked_tokens
        for rep in range(repeats + 1):
            if rep == 1:  # the first was warm-up
                seconds, tokens = engine.mask_s, engine.masked_tokens
            engine.run_slice(rows, slice_length)
            steps.step(f"b={b}")
        out.append((b, engine.mask_s - seconds, float(engine.masked_tokens - tokens)))
    return tuple(out)


def _allocator_meter(device: torch.device) -> AllocatorPeak | None:
    """CPU: the allocator-event meter, None elsewhere or where the profiler gives no
    allocation events (then memory falls back to the resident-set growth)."""
    if device.type != "cpu":
        return None
    meter = AllocatorPeak()
    if not meter.available:
        log.warning("allocator_peak_unavailable", fallback="resident set growth")
        return None
    return meter


def _allocator_peaks(
    engine: SliceEngine,
    points: list[tuple[int, int]],
    s: int,
    vocab: int,
    rng: np.random.Generator,
    meter: AllocatorPeak | None,
    steps: _Steps,
) -> dict[tuple[int, int], int]:
    """CPU: one more slice per point under the allocator meter (empty without a meter)."""
    if meter is None:
        return {}
    steps.phase(f"allocator peaks of {len(points)} points")
    peaks = {}
    for b, x in points:
        rows = _rows(b, x, s, vocab, rng)
        peaks[(b, x)] = meter.measure(lambda rows=rows: engine.run_slice(rows, s))
        steps.step(f"b={b}, l={x}")
    return peaks


def _resumed_peaks(
    loaded: LoadedModel,
    points: list[tuple[int, int]],
    s: int,
    rng: np.random.Generator,
    steps: _Steps,
) -> dict[tuple[int, int], int]:
    """Peak of a slice of ``b`` rows of context ``l`` that all resume from a KV pool,
    per point of ``points`` (those with ``l > 1``, and only where peaks are exact: CUDA's
    counter or CPU allocator events), beyond the level before it. Each row has
    ``min(s, l - 1)`` generated tokens (a resumed row feeds one token whatever it
    generated before: only its context length matters).

    The rows' entries are made (zeros: memory does not depend on values) inside the same
    measurement just before the slice, so their release when the slice copies them in is
    seen; the pool never evicts, so the slice's own entries are all it frees.
    """
    if not points:
        return {}
    steps.phase(f"resumed-slice peaks of {len(points)} points")
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
        gen = min(s, x - 1)
        rows = [replace(r, generated_ids=rng.integers(3, vocab, size=gen).tolist(),
                        params=params, fence=2, kv_fence=1)
                for r in _rows(b, x - gen, s, vocab, rng)]

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
        steps.step(f"b={b}, l={x}")
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
    memory: MemoryLimit | None = None,
) -> tuple[CostModel, FitReport, ProfileSamples]:
    """Measure ``grid`` (the points that fit in ``memory``) and fit; memory falls back to
    the analytic bound if unmeasured.

    Raises:
        ValueError: no point fits, or too few to fit and hold out.
    """
    samples = run_profile(loaded, slice_length, grid, progress, memory=memory)
    fallback = analytic_model_for(loaded, slice_length)
    model, report = fit_cost_model(samples, fallback=fallback)
    return model, report, samples
