"""Fitting a cost model (:mod:`shared.policy.costmodel`) to measurements (design §2.3).

Times are fitted by non-negative least squares on relative errors (scikit-learn), the
feature sets chosen by cross-validation. Memory must be an upper bound, so ``act`` is the
tightest non-negative upper envelope of the measured peaks (a linear programme, solved by
SciPy's HiGHS, which scikit-learn depends on) and ``margin`` the worst leave-one-out
under-estimate plus a slack for measurement noise. Errors are measured on grid points held
out of the fit. numpy, SciPy and scikit-learn only (no torch): only the profiler, its
command and the tests import this, never the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import linprog
from sklearn.linear_model import LinearRegression

from services.worker.samples import PointSample, ProfileSamples
from shared.policy.costmodel import (
    ACT_FEATURES,
    DECODE_FEATURES,
    DECODE_WITH_STEP,
    PREFILL_BASE,
    PREFILL_QUADRATIC,
    CostModel,
    feature_matrix,
    finite_or_none,
)

PREFILL_CANDIDATES = (PREFILL_BASE, PREFILL_QUADRATIC)
DECODE_CANDIDATES = (DECODE_FEATURES, DECODE_WITH_STEP)
# A richer feature set must beat a simpler one's cross-validated MAPE by this much (absolute,
# and relative to the simpler one's error) to be chosen, so that fitting noise is not.
SELECT_TOL_ABS = 0.002
SELECT_TOL_REL = 0.05
HELDOUT_EVERY = 3
# Slack on top of the leave-one-out memory margin, by how the peaks were measured. A
# resident-set peak of one point varies by about 10-20% from run to run on CPU (glibc heap
# layout; the profiler keeps the largest of its repeats), more than a leave-one-out over a
# few grid points can see. An allocator peak (CUDA max_memory_allocated, CPU allocator
# events) repeats to the byte for a shape, so its slack only covers shapes between the
# grid points that a leave-one-out did not happen to probe.
MEM_SAFETY = 0.10
MEM_SAFETY_EXACT = 0.03
EXACT_MEMORY_METHODS = frozenset({"cuda_max_memory_allocated", "cpu_allocator_events"})
# The heap overhead is the largest ratio over the profile's points of a resident-set figure,
# so it gets the resident-set slack.
HEAP_SAFETY = MEM_SAFETY


# --------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitReport:
    """How well the fit did: cross-validated feature choice and held-out errors.

    ``heldout`` has one row per held-out point: ``b, l, slice_s`` (measured), ``est_s``,
    ``rel_err`` (signed), ``peak_bytes``, ``est_bytes``, ``mem_ratio`` (estimate/measured),
    ``process_peak_bytes`` and ``process_ratio`` (the estimate times the heap overhead over
    the process's growth; NaN where the platform has no separate process figure).
    """

    prefill_features: tuple[str, ...]
    decode_features: tuple[str, ...]
    cv_mape: Mapping[str, float]  # leave-one-point-out slice-time MAPE per candidate
    time_mape: float
    time_max_err: float
    mem_ratio_min: float
    mem_ratio_max: float
    process_ratio_min: float  # (estimate x heap_overhead) / process growth; NaN if unmeasured
    process_ratio_max: float
    n_points: int
    n_heldout: int
    heldout: tuple[Mapping[str, float], ...]
    # resumed slices: resume estimate / measured peak over held-out points (NaN: unmeasured)
    resume_ratio_min: float = float("nan")
    resume_ratio_max: float = float("nan")

    def errors(self) -> dict[str, float]:
        """The summary numbers stored with the model."""
        return {
            "time_mape": self.time_mape,
            "time_max_err": self.time_max_err,
            "mem_ratio_min": self.mem_ratio_min,
            "mem_ratio_max": self.mem_ratio_max,
            "process_ratio_min": self.process_ratio_min,
            "process_ratio_max": self.process_ratio_max,
            "n_points": float(self.n_points),
            "n_heldout": float(self.n_heldout),
            "resume_ratio_min": self.resume_ratio_min,
            "resume_ratio_max": self.resume_ratio_max,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN becomes None)."""
        out = asdict(self)
        out["cv_mape"] = dict(self.cv_mape)
        out["heldout"] = [{k: finite_or_none(v) for k, v in r.items()} for r in self.heldout]
        return {k: finite_or_none(v) for k, v in out.items()}


def heldout_mask(points: Sequence[PointSample], every: int = HELDOUT_EVERY) -> np.ndarray:
    """Which points are held out: diagonal stripes ``(i_b + i_l) % every == 1`` of the grid.

    ``i_b``/``i_l`` are the ranks of the point's ``b``/``l`` among the grid's values, so the
    held-out points spread over the whole (b, l) range, edges included. The corners of the
    range (:func:`_corners`) always stay in the fit, so that held-out points are never
    extrapolations of it.
    """
    bs = sorted({p.b for p in points})
    ls = sorted({p.l for p in points})
    rank_b = {b: i for i, b in enumerate(bs)}
    rank_l = {x: i for i, x in enumerate(ls)}
    corners = _corners(points)
    return np.array(
        [(rank_b[p.b] + rank_l[p.l]) % every == 1 and (p.b, p.l) not in corners for p in points],
        dtype=bool,
    )


def _corners(points: Sequence[PointSample]) -> set[tuple[int, int]]:
    """Smallest/largest ``l`` at the smallest/largest ``b``, and the largest ``b`` at the
    smallest/largest ``l`` (grids skip expensive corners, so these are the extremes)."""
    bs = sorted({p.b for p in points})
    ls = sorted({p.l for p in points})
    out = set()
    for b in (bs[0], bs[-1]):
        row = sorted(p.l for p in points if p.b == b)
        out |= {(b, row[0]), (b, row[-1])}
    for x in (ls[0], ls[-1]):
        col = sorted(p.b for p in points if p.l == x)
        out |= {(col[0], x), (col[-1], x)}
    return out


def _nnls(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Non-negative weighted least squares ``min sum w (x c - y)^2, c >= 0``."""
    # Columns span orders of magnitude (1 vs b*l*l); scaling them keeps the solver accurate.
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    reg = LinearRegression(positive=True, fit_intercept=False)
    reg.fit(x / scale, y, sample_weight=weight)
    return np.asarray(reg.coef_, dtype=float) / scale


def _decode_data(points: Sequence[PointSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step decode samples ``(b, c, seconds)`` of ``points``."""
    b, c, t = [], [], []
    for p in points:
        for j, sec in enumerate(p.step_s, start=1):
            b.append(p.b)
            c.append(p.l + j)
            t.append(sec)
    return np.array(b, float), np.array(c, float), np.array(t, float)


@dataclass(frozen=True)
class _TimeFit:
    """Fitted time coefficients of one feature choice."""

    prefill_features: tuple[str, ...]
    prefill_coef: tuple[float, ...]
    decode_coef: tuple[float, float, float, float]
    decode_batched_extra: float


def _fit_times(
    points: Sequence[PointSample], prefill_features: Sequence[str], decode_features: Sequence[str]
) -> _TimeFit:
    """NNLS of prefill and decode-step times, minimising squared *relative* errors (MAPE)."""
    b = np.array([p.b for p in points], float)
    l_ = np.array([p.l for p in points], float)
    tp = np.array([p.prefill_s for p in points], float)
    prefill = _nnls(feature_matrix(prefill_features, b, l_), tp, 1.0 / tp**2)
    db, dc, dt = _decode_data(points)
    decode = np.zeros(len(decode_features))
    if len(dt) >= len(decode_features):  # else slices of length 1: no decode step measured
        decode = _nnls(feature_matrix(decode_features, db, dc), dt, 1.0 / dt**2)
    extra = float(decode[4]) if len(decode_features) > 4 else 0.0
    return _TimeFit(
        tuple(prefill_features),
        tuple(float(c) for c in prefill),
        tuple(float(c) for c in decode[:4]),  # type: ignore[arg-type]
        extra,
    )


def _envelope(x: np.ndarray, floor: np.ndarray, scale_by: np.ndarray) -> np.ndarray:
    """Tightest non-negative ``c`` with ``x c >= floor``: min ``sum (x c) / scale_by``."""
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale
    objective = (xs / scale_by[:, None]).sum(axis=0)
    res = linprog(objective, A_ub=-xs, b_ub=-floor, bounds=[(0, None)] * x.shape[1],
                  method="highs")
    if res.status != 0:
        raise ValueError(f"memory envelope fit failed: {res.message}")
    return np.asarray(res.x, dtype=float) / scale


def _fresh_peak(p: PointSample) -> int | None:
    return p.peak_bytes


def _resume_peak(p: PointSample) -> int | None:
    return p.resume_peak_bytes


def _fit_act(
    points: Sequence[PointSample], kv: int, s: int,
    peak_of: Callable[[PointSample], int | None] = _fresh_peak,
) -> np.ndarray:
    """Activation coefficients: the upper envelope of ``peak - kv cache`` over ``points``
    (``peak_of``: the fresh slices' peaks, or the resumed slices')."""
    b = np.array([p.b for p in points], float)
    l_ = np.array([p.l for p in points], float)
    peak = np.array([peak_of(p) for p in points], float)
    kv_bytes = b * (l_ + s + 1) * kv
    # Minimise the summed ratio estimate/measured while staying above every measurement.
    return _envelope(feature_matrix(ACT_FEATURES, b, l_), peak - kv_bytes, np.maximum(peak, 1))


def memory_safety(samples: ProfileSamples) -> float:
    """The slack for the memory margin: small for exact allocator peaks, else MEM_SAFETY."""
    method = samples.meta.get("memory_method")
    return MEM_SAFETY_EXACT if method in EXACT_MEMORY_METHODS else MEM_SAFETY


def _fit_memory(
    points: Sequence[PointSample], kv: int, s: int, safety: float = MEM_SAFETY,
    peak_of: Callable[[PointSample], int | None] = _fresh_peak,
) -> tuple[np.ndarray, float]:
    """Activation coefficients and the margin that covers points the fit has not seen.

    The envelope touches the measurements it was fitted on, so its margin on unseen points
    is estimated by leaving each non-corner point out in turn (corners are never held out
    and their leave-one-out would be an extrapolation): the margin is the largest ratio
    measured/estimated found that way (at least 1), times ``1 + safety``.
    """
    act = _fit_act(points, kv, s, peak_of)
    corners = _corners(points)
    worst = 1.0
    for i, p in enumerate(points):
        peak = peak_of(p)
        if (p.b, p.l) in corners or peak is None:
            continue
        rest = [q for k, q in enumerate(points) if k != i]
        if len(rest) < len(ACT_FEATURES):
            continue
        coef = _fit_act(rest, kv, s, peak_of)
        est = p.b * (p.l + s + 1) * kv + float(feature_matrix(ACT_FEATURES, p.b, p.l) @ coef)
        worst = max(worst, peak / max(est, 1.0))
    return act, worst * (1.0 + safety)


def _fit_resume_memory(
    samples: ProfileSamples, points: Sequence[PointSample]
) -> tuple[tuple[float, ...], float]:
    """The resumed slices' envelope and margin, over the points that measured one
    (``((), 1.0)`` with too few: resumed slices are then bounded like fresh ones)."""
    measured = [p for p in points if p.resume_peak_bytes is not None]
    if len(measured) < len(ACT_FEATURES) + 2:
        return (), 1.0
    act, margin = _fit_memory(measured, samples.kv_bytes_per_token, samples.slice_length,
                              memory_safety(samples), _resume_peak)
    return tuple(float(a) for a in act), float(margin)


def _model_from(
    samples: ProfileSamples,
    points: Sequence[PointSample],
    times: _TimeFit,
    fallback: CostModel | None,
) -> CostModel:
    """A model with time coefficients ``times`` and memory fitted on ``points``."""
    if all(p.peak_bytes is not None for p in points):
        act, margin = _fit_memory(points, samples.kv_bytes_per_token, samples.slice_length,
                                  memory_safety(samples))
        act_features, act_coef = ACT_FEATURES, tuple(float(a) for a in act)
    elif fallback is not None:  # no memory measurement on this platform: analytic bound
        act_features, act_coef = fallback.act_features, fallback.act_coef
        margin = fallback.mem_margin
    else:
        raise ValueError("no peak memory was measured and no fallback model was given")
    resume_act, resume_margin = _fit_resume_memory(samples, points)
    model = CostModel(
        slice_length=samples.slice_length,
        prefill_features=times.prefill_features,
        prefill_coef=times.prefill_coef,
        decode_coef=times.decode_coef,
        decode_batched_extra=times.decode_batched_extra,
        kv_bytes_per_token=samples.kv_bytes_per_token,
        act_features=tuple(act_features),
        act_coef=tuple(act_coef),
        mem_margin=float(margin),
        resume_act_coef=resume_act,
        resume_margin=resume_margin,
        grammar_token_s=grammar_token_s(samples.grammar),
        model=samples.model,
        device=samples.device,
        dtype=samples.dtype,
        grid=samples.grid,
        created_at=time.time(),
        meta=dict(samples.meta),
    )
    return replace(model, heap_overhead=_heap_overhead(model, points))


def grammar_token_s(runs: Sequence[tuple[int, float, float]]) -> float:
    """Seconds a constrained row adds per sampled token: the least-squares slope, through
    the origin, of the seconds masking over the tokens masked of each measured batch size
    (``ProfileSamples.grammar``); 0 when unmeasured."""
    tokens = np.array([masked for _, _, masked in runs], dtype=float)
    seconds = np.array([spent for _, spent, _ in runs], dtype=float)
    if not len(tokens) or not tokens.any():
        return 0.0
    return max(0.0, float(tokens @ seconds / (tokens @ tokens)))


def _heap_overhead(model: CostModel, points: Sequence[PointSample]) -> float:
    """Largest ``process growth / memory estimate`` over ``points`` (at least 1).

    The memory model estimates what torch allocates. On CPU the process grows by more
    (glibc keeps freed chunks, thread arenas, oneDNN scratch), by an amount that varies
    from run to run, so it is not fitted per point but bounded as a whole: an instance
    whose batches stay within ``budget / heap_overhead`` by estimate stayed within
    ``budget`` in process growth at every profiled point, with ``HEAP_SAFETY`` to spare
    for its run-to-run variation. 1 where no process figure was measured.
    """
    ratios = [
        p.process_peak_bytes / max(float(model.slice_memory(p.b, p.l, p.s)), 1.0)
        for p in points
        if p.process_peak_bytes is not None
    ]
    if not ratios:
        return 1.0
    return max(1.0, max(ratios) * (1.0 + HEAP_SAFETY))


def _time_model(times: _TimeFit, s: int) -> CostModel:
    """A model with only the time part (for scoring)."""
    return CostModel(
        slice_length=s,
        prefill_features=times.prefill_features,
        prefill_coef=times.prefill_coef,
        decode_coef=times.decode_coef,
        decode_batched_extra=times.decode_batched_extra,
        kv_bytes_per_token=0,
        act_coef=(0.0,) * len(ACT_FEATURES),
        mem_margin=1.0,
    )


def _rel_errors(model: CostModel, points: Sequence[PointSample]) -> np.ndarray:
    """Signed relative error of the slice-time estimate against the measured slice."""
    b = np.array([p.b for p in points], float)
    l_ = np.array([p.l for p in points], float)
    s = np.array([p.s for p in points], float)
    measured = np.array([p.slice_s for p in points], float)
    return (model.slice_time(b, l_, s) - measured) / measured


def _cv_mape(
    points: Sequence[PointSample], prefill: Sequence[str], decode: Sequence[str], s: int
) -> float:
    """Leave-one-point-out MAPE of the whole-slice time estimate."""
    errs = []
    for i in range(len(points)):
        rest = [p for k, p in enumerate(points) if k != i]
        probe = _time_model(_fit_times(rest, prefill, decode), s)
        errs.append(abs(float(_rel_errors(probe, [points[i]])[0])))
    return float(np.mean(errs))


def _name(prefill: Sequence[str], decode: Sequence[str]) -> str:
    """Display name of a feature choice, e.g. ``1,b,l,bl | 1,b,c,bc``."""
    return f"{','.join(prefill)} | {','.join(decode)}"


def choose_features(
    points: Sequence[PointSample],
    s: int,
    prefill_candidates: Sequence[Sequence[str]] = PREFILL_CANDIDATES,
    decode_candidates: Sequence[Sequence[str]] = DECODE_CANDIDATES,
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, float]]:
    """The prefill and decode feature sets with the lowest cross-validated slice-time MAPE.

    Every pair is scored by leave-one-point-out MAPE on ``points``. Going through the pairs
    from fewest to most features, a pair replaces the current choice only if it lowers the
    error by more than ``SELECT_TOL_ABS`` and ``SELECT_TOL_REL`` (relative), so an extra term
    that only fits noise is not chosen.
    """
    pairs = [(tuple(p), tuple(d)) for p in prefill_candidates for d in decode_candidates]
    pairs.sort(key=lambda pd: len(pd[0]) + len(pd[1]))  # stable: simplest first
    scores = {_name(p, d): _cv_mape(points, p, d, s) for p, d in pairs}
    best = pairs[0]
    for pair in pairs[1:]:
        cur, new = scores[_name(*best)], scores[_name(*pair)]
        if new < cur - max(SELECT_TOL_ABS, SELECT_TOL_REL * cur):
            best = pair
    return best[0], best[1], scores


def _heldout_rows(model: CostModel, points: Sequence[PointSample]) -> list[dict[str, float]]:
    """Per-point comparison of estimates with measurements."""
    rel = _rel_errors(model, points)
    rows = []
    for p, err in zip(points, rel, strict=True):
        est_mem = float(model.slice_memory(p.b, p.l, p.s))
        peak = float("nan") if p.peak_bytes is None else float(p.peak_bytes)
        process = float("nan") if p.process_peak_bytes is None else float(p.process_peak_bytes)
        rows.append({
            "b": float(p.b),
            "l": float(p.l),
            "slice_s": p.slice_s,
            "est_s": float(model.slice_time(p.b, p.l, p.s)),
            "rel_err": float(err),
            "peak_bytes": peak,
            "est_bytes": est_mem,
            "mem_ratio": est_mem / peak if peak > 0 else float("nan"),
            "process_peak_bytes": process,
            "process_ratio": (
                est_mem * model.heap_overhead / process if process > 0 else float("nan")
            ),
            "resume_ratio": (
                float(model.resume_memory(p.b, p.l, p.s)) / p.resume_peak_bytes
                if p.resume_peak_bytes else float("nan")
            ),
        })
    return rows


def _nanmin(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return min(finite) if finite else float("nan")


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return max(finite) if finite else float("nan")


def fit_cost_model(
    samples: ProfileSamples,
    *,
    heldout_every: int = HELDOUT_EVERY,
    prefill_candidates: Sequence[Sequence[str]] = PREFILL_CANDIDATES,
    decode_candidates: Sequence[Sequence[str]] = DECODE_CANDIDATES,
    fallback: CostModel | None = None,
) -> tuple[CostModel, FitReport]:
    """Fit the time and memory models to ``samples`` and measure them on held-out points.

    1. Split the grid (:func:`heldout_mask`); on the training part choose the feature sets
       by leave-one-point-out cross-validation (:func:`choose_features`).
    2. Fit on the training part: times by NNLS, memory as the tightest non-negative upper
       envelope of the measured peaks (a linear programme) times a leave-one-out margin.
       Report, on the held-out part, the MAPE and max relative error of the whole-slice
       time and the min/max ratio estimate/measured of the peak memory.
    3. Refit on *all* points with the chosen features: that model is returned (its
       ``errors`` are the held-out figures of step 2, an honest estimate for it).

    ``fallback`` provides the memory model when no peak was measured (its ``act`` and margin
    are used as they are).

    Raises:
        ValueError: too few points, or no memory measurement and no fallback.
    """
    points = tuple(samples.points)
    s = samples.slice_length
    mask = heldout_mask(points, heldout_every)
    train = [p for p, h in zip(points, mask, strict=True) if not h]
    test = [p for p, h in zip(points, mask, strict=True) if h]
    need = max(len(c) for c in (*prefill_candidates, *decode_candidates)) + 2
    if len(train) < need or not test:
        raise ValueError(f"{len(points)} grid points are too few to fit and hold out")
    prefill, decode, cv = choose_features(train, s, prefill_candidates, decode_candidates)
    split_model = _model_from(samples, train, _fit_times(train, prefill, decode), fallback)
    rows = _heldout_rows(split_model, test)
    rel = np.array([r["rel_err"] for r in rows])
    ratios = np.array([r["mem_ratio"] for r in rows])
    measured = bool(np.isfinite(ratios).all())
    process = np.array([r["process_ratio"] for r in rows])
    process_measured = bool(np.isfinite(process).all())
    report = FitReport(
        prefill_features=prefill,
        decode_features=decode,
        cv_mape=cv,
        time_mape=float(np.mean(np.abs(rel))),
        time_max_err=float(np.max(np.abs(rel))),
        mem_ratio_min=float(np.min(ratios)) if measured else float("nan"),
        mem_ratio_max=float(np.max(ratios)) if measured else float("nan"),
        process_ratio_min=float(np.min(process)) if process_measured else float("nan"),
        process_ratio_max=float(np.max(process)) if process_measured else float("nan"),
        n_points=len(points),
        n_heldout=len(test),
        heldout=tuple(rows),
        resume_ratio_min=_nanmin([r["resume_ratio"] for r in rows]),
        resume_ratio_max=_nanmax([r["resume_ratio"] for r in rows]),
    )
    final = _model_from(samples, points, _fit_times(points, prefill, decode), fallback)
    return replace(final, errors=report.errors()), report
