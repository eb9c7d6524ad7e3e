"""Serving-time and memory model of one instance (docs/design.md §2), pure.

A slice of our engine is one prefill (which yields the first token) followed by ``S - 1``
decode steps, so for batch size ``b``, padded context length ``l`` and slice length ``S``:

* prefill ``Tp(b, l) = sum_k p_k * f_k(b, l)`` with features chosen from
  ``("1", "b", "l", "bl")`` or ``("1", "b", "l", "bl", "bll")``,
* one decode step at context ``c`` (tokens in the cache after the step)
  ``Td(b, c) = d0 + d1*b + d2*c + d3*b*c (+ e * [b >= 2])``: the optional step ``e`` is
  there because CPUs switch from a matrix-vector to a slower matrix-matrix routine when a
  second row joins (46 -> 75 ms per step for smollm2-135m on 2 cores); it is 0 unless the
  data asks for it,
* slice ``T(b, l, S) = Tp(b, l) + sum_{j=1..S-1} Td(b, l + j)``, in closed form,
* memory beyond the weights ``M(b, l, S) = margin * (b * (l + S + 1) * kv + act(b, l))``:
  the static KV cache is allocated for ``l + S + 1`` positions per row; ``act`` is a
  non-negative combination of ``("1", "b", "bl", "bll")``.

Times are fitted by non-negative least squares on relative errors (scikit-learn), the
feature sets chosen by cross-validation. Memory must be an upper bound, so ``act`` is the
tightest non-negative upper envelope of the measured peaks (a linear programme, solved by
SciPy's HiGHS, which scikit-learn depends on) and ``margin`` the worst leave-one-out
under-estimate plus a slack for measurement noise. On CPU the process grows by more than
torch allocates; ``heap_overhead`` bounds that ratio and the CPU budget is divided by it.
Errors are measured on grid points held out of the fit. Everything here is numpy, SciPy
and scikit-learn only: no torch, no Redis, no I/O, so the scheduler, the simulator and the
tests share it. A :class:`CostModel` serialises to JSON to live in Redis with its instance.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy.optimize import linprog
from sklearn.linear_model import LinearRegression

ArrayLike = Any  # ints, floats or numpy arrays of any broadcastable shape
SCHEMA_VERSION = 1

PREFILL_BASE = ("1", "b", "l", "bl")
PREFILL_QUADRATIC = ("1", "b", "l", "bl", "bll")
PREFILL_CANDIDATES = (PREFILL_BASE, PREFILL_QUADRATIC)
DECODE_FEATURES = ("1", "b", "c", "bc")
DECODE_WITH_STEP = ("1", "b", "c", "bc", "b2")  # b2 = [b >= 2]
DECODE_CANDIDATES = (DECODE_FEATURES, DECODE_WITH_STEP)
ACT_FEATURES = ("1", "b", "bl", "bll")

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
# Features
# --------------------------------------------------------------------------------------------

_FEATURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "1": lambda b, x: np.ones_like(b),
    "b": lambda b, x: b,
    "l": lambda b, x: x,
    "c": lambda b, x: x,
    "bl": lambda b, x: b * x,
    "bc": lambda b, x: b * x,
    "bll": lambda b, x: b * x * x,
    "b2": lambda b, x: (b >= 2).astype(float),
}


def feature_matrix(names: Sequence[str], b: ArrayLike, x: ArrayLike) -> np.ndarray:
    """Features ``names`` of ``(b, x)`` stacked on a new last axis (``x`` is ``l`` or ``c``).

    Raises:
        ValueError: an unknown feature name.
    """
    unknown = [n for n in names if n not in _FEATURES]
    if unknown:
        raise ValueError(f"unknown features {unknown}; known: {sorted(_FEATURES)}")
    bb, xx = np.broadcast_arrays(np.asarray(b, dtype=float), np.asarray(x, dtype=float))
    return np.stack([_FEATURES[n](bb, xx) for n in names], axis=-1)


def _linear(names: Sequence[str], coef: Sequence[float], b: ArrayLike, x: ArrayLike) -> np.ndarray:
    """``sum_k coef_k * feature_k(b, x)``, broadcast over ``b`` and ``x``.

    Summed term by term, skipping zero coefficients (NNLS leaves many): the scheduler
    evaluates this on ``n x max_batch`` matrices every cycle, where stacking a feature
    tensor first cost several times more.
    """
    bb, xx = np.asarray(b, dtype=float), np.asarray(x, dtype=float)
    total = np.zeros(np.broadcast_shapes(bb.shape, xx.shape))
    for name, c in zip(names, coef, strict=True):
        if c:
            total = total + c * _FEATURES[name](bb, xx)
    return total


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Fitted (or analytic) time and memory model of one instance; see the module docstring.

    Times are seconds, memory is bytes beyond the weights. Every method broadcasts over
    numpy arrays of ``b`` and ``l`` (and ``s``) and also takes plain ints; scalars give 0-d
    arrays (``float()`` them).
    """

    slice_length: int
    prefill_features: tuple[str, ...]
    prefill_coef: tuple[float, ...]
    decode_coef: tuple[float, float, float, float]
    kv_bytes_per_token: int
    act_coef: tuple[float, ...]  # coefficients of ``act_features``
    mem_margin: float  # multiplies the whole memory estimate; >= 1
    act_features: tuple[str, ...] = ACT_FEATURES
    decode_batched_extra: float = 0.0  # e: seconds added to each decode step when b >= 2
    # Process growth / allocator estimate, largest over the profile (>= 1): what the heap
    # adds on top of torch's tensors on CPU. The instance's budget is divided by it.
    heap_overhead: float = 1.0
    model: str = ""
    device: str = ""
    dtype: str = ""
    source: str = "profiled"  # "profiled" or "analytic"
    grid: str = ""  # name of the profiling grid
    created_at: float = 0.0
    errors: Mapping[str, float | None] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prefill_features) != len(self.prefill_coef):
            raise ValueError("prefill_features and prefill_coef differ in length")
        if len(self.act_features) != len(self.act_coef):
            raise ValueError("act_features and act_coef differ in length")
        if len(self.decode_coef) != len(DECODE_FEATURES):
            raise ValueError(f"decode_coef needs {len(DECODE_FEATURES)} values")
        if self.slice_length < 1:
            raise ValueError("slice_length must be >= 1")
        if not self.heap_overhead >= 1.0:
            raise ValueError("heap_overhead must be >= 1")

    # --- time -------------------------------------------------------------------------
    def prefill_time(self, b: ArrayLike, l: ArrayLike) -> np.ndarray:  # noqa: E741
        """Seconds to prefill ``b`` rows padded to ``l`` tokens (yields the first token)."""
        return _linear(self.prefill_features, self.prefill_coef, b, l)

    def decode_step_time(self, b: ArrayLike, c: ArrayLike) -> np.ndarray:
        """Seconds of one decode step of ``b`` rows whose cache holds ``c`` tokens after it."""
        step = self.decode_batched_extra * (np.asarray(b, dtype=float) >= 2)
        return _linear(DECODE_FEATURES, self.decode_coef, b, c) + step

    def slice_time(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Seconds of a whole slice: ``Tp(b, l) + sum_{j=1..s-1} Td(b, l + j)``, closed form.

        ``s`` defaults to the profile's slice length. With ``n = s - 1`` decode steps,
        ``sum_j Td(b, l + j) = n*(d0 + d1*b + e*[b>=2]) + (d2 + d3*b) * (n*l + n*(n+1)/2)``.
        """
        n = np.asarray(self.slice_length if s is None else s, dtype=float) - 1.0
        b_ = np.asarray(b, dtype=float)
        l_ = np.asarray(l, dtype=float)
        d0, d1, d2, d3 = self.decode_coef
        per_step = d0 + d1 * b_ + self.decode_batched_extra * (b_ >= 2)
        decode = n * per_step + (d2 + d3 * b_) * (n * l_ + n * (n + 1.0) / 2.0)
        return self.prefill_time(b_, l_) + decode

    def resume_time(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Seconds of a slice whose rows all resume from retained K/V (no prefill).

        Each row feeds its last token and then its own drafts: ``s`` decode steps, step
        ``j`` ending with ``l + j - 1`` tokens cached (``l`` = the longest context),
        ``n*(d0 + d1*b + e*[b>=2]) + (d2 + d3*b) * (n*l + n*(n-1)/2)`` with ``n = s``.
        """
        n = np.asarray(self.slice_length if s is None else s, dtype=float)
        b_ = np.asarray(b, dtype=float)
        l_ = np.asarray(l, dtype=float)
        d0, d1, d2, d3 = self.decode_coef
        per_step = d0 + d1 * b_ + self.decode_batched_extra * (b_ >= 2)
        return n * per_step + (d2 + d3 * b_) * (n * l_ + n * (n - 1.0) / 2.0)

    def run_time(
        self, b: int, l: int, decode_rows: Sequence[int],  # noqa: E741
        prefill_passes: Sequence[tuple[int, int]] | None = None,
    ) -> float:
        """Seconds the model gives a slice that actually ran: its prefill passes
        (``(rows, padded length)`` each; default one pass of ``b`` rows padded to ``l``;
        none when every row resumed from retained K/V), then decode step ``j`` with
        ``decode_rows[j-1]`` rows at context ``l + j`` (rows that finished may have been
        dropped, the slice may have stopped early). Compared with the measured time, it
        shows how far the instance runs from its profile (contention, thermal limits, a
        changed machine)."""
        if b < 1:
            return 0.0
        passes = [(b, l)] if prefill_passes is None else list(prefill_passes)
        rows = np.asarray(decode_rows, dtype=float)
        contexts = l + np.arange(1, len(rows) + 1, dtype=float)
        decode = float(self.decode_step_time(rows, contexts).sum()) if len(rows) else 0.0
        prefill = sum(float(self.prefill_time(n, width)) for n, width in passes)
        return prefill + decode

    def iteration_time(self, query_lens: Sequence[int], keys_total: int) -> float:
        """Seconds the model gives one continuous-batching iteration, priced as the
        simulator's ILS engine prices it: one decode step ``Td(b, c)`` for the ``b``
        requests feeding one token (``c`` their mean context: the keys read, less the
        prompt chunks' own, per decoding request) plus a prefill ``Tp(1, q)`` for each
        request feeding a prompt chunk of ``q > 1`` tokens."""
        decoding = sum(1 for q in query_lens if q == 1)
        chunks = np.array([q for q in query_lens if q > 1], dtype=float)
        total = float(self.prefill_time(1, chunks).sum()) if len(chunks) else 0.0
        if decoding:
            context = max(1.0, (keys_total - float(chunks.sum())) / decoding)
            total += float(self.decode_step_time(decoding, context))
        return total

    def time_scaled(self, factor: float) -> CostModel:
        """The same model with every time multiplied by ``factor`` (memory unchanged): an
        instance that runs ``factor`` times slower than it was profiled.

        Raises:
            ValueError: ``factor`` is not a positive finite number.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"time scale factor must be positive, got {factor}")
        return replace(
            self,
            prefill_coef=tuple(c * factor for c in self.prefill_coef),
            decode_coef=tuple(c * factor for c in self.decode_coef),  # type: ignore[arg-type]
            decode_batched_extra=self.decode_batched_extra * factor,
        )

    # --- memory -----------------------------------------------------------------------
    def kv_cache_bytes(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Bytes of the static KV cache: ``b * (l + s + 1)`` positions."""
        s_ = np.asarray(self.slice_length if s is None else s, dtype=float)
        return np.asarray(b, dtype=float) * (np.asarray(l, dtype=float) + s_ + 1.0) * float(
            self.kv_bytes_per_token
        )

    def activation_bytes(self, b: ArrayLike, l: ArrayLike) -> np.ndarray:  # noqa: E741
        """Fitted activation (and allocator) peak of a slice beyond its KV cache, no margin."""
        return _linear(self.act_features, self.act_coef, b, l)

    def slice_memory(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Peak bytes beyond the weights of a slice: ``margin * (kv cache + act(b, l))``."""
        raw = self.kv_cache_bytes(b, l, s) + self.activation_bytes(b, l)
        return self.mem_margin * raw

    # --- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists, NaN errors become None)."""
        out = asdict(self)
        out["errors"] = {k: _finite_or_none(v) for k, v in self.errors.items()}
        out["meta"] = dict(self.meta)
        out["version"] = SCHEMA_VERSION
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostModel:
        """Inverse of :meth:`to_dict`; unknown keys are ignored.

        Raises:
            ValueError: a schema version this code does not read.
        """
        version = d.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"cost model schema version {version}, expected {SCHEMA_VERSION}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("prefill_features", "prefill_coef", "decode_coef", "act_coef", "act_features"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def to_json(self) -> str:
        """Compact JSON text (what goes into Redis and the profile cache file)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CostModel:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _finite_or_none(value: Any) -> Any:
    """``None`` for NaN/inf floats (JSON has no NaN), the value otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointSample:
    """Measurements of one grid point ``(b, l)`` at slice length ``s`` (medians of repeats).

    ``step_s[j-1]`` is decode step ``j`` (context ``l + j``), ``j = 1..s-1``; ``slice_s`` is
    the measured whole slice (prefill + every step); ``peak_bytes`` is the largest measured
    peak beyond the weights over the repeats (None when it could not be measured).
    """

    b: int
    l: int  # noqa: E741
    s: int
    prefill_s: float
    step_s: tuple[float, ...]
    slice_s: float
    peak_bytes: int | None = None
    process_peak_bytes: int | None = None

    def __post_init__(self) -> None:
        if len(self.step_s) != self.s - 1:
            raise ValueError(f"point ({self.b}, {self.l}): {len(self.step_s)} steps, s={self.s}")


@dataclass(frozen=True)
class ProfileSamples:
    """Everything a profiling run measured, plus what the fit needs to know about the model."""

    points: tuple[PointSample, ...]
    slice_length: int
    kv_bytes_per_token: int
    model: str = ""
    device: str = ""
    dtype: str = ""
    grid: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        out = asdict(self)
        out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileSamples:
        """Inverse of :meth:`to_dict`."""
        points = tuple(
            PointSample(**{**p, "step_s": tuple(p["step_s"])}) for p in d["points"]
        )
        return cls(**{**d, "points": points})


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
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN becomes None)."""
        out = asdict(self)
        out["cv_mape"] = dict(self.cv_mape)
        out["heldout"] = [{k: _finite_or_none(v) for k, v in r.items()} for r in self.heldout]
        return {k: _finite_or_none(v) for k, v in out.items()}


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


def _fit_act(points: Sequence[PointSample], kv: int, s: int) -> np.ndarray:
    """Activation coefficients: the upper envelope of ``peak - kv cache`` over ``points``."""
    b = np.array([p.b for p in points], float)
    l_ = np.array([p.l for p in points], float)
    peak = np.array([p.peak_bytes for p in points], float)
    kv_bytes = b * (l_ + s + 1) * kv
    # Minimise the summed ratio estimate/measured while staying above every measurement.
    return _envelope(feature_matrix(ACT_FEATURES, b, l_), peak - kv_bytes, np.maximum(peak, 1))


def memory_safety(samples: ProfileSamples) -> float:
    """The slack for the memory margin: small for exact allocator peaks, else MEM_SAFETY."""
    method = samples.meta.get("memory_method")
    return MEM_SAFETY_EXACT if method in EXACT_MEMORY_METHODS else MEM_SAFETY


def _fit_memory(
    points: Sequence[PointSample], kv: int, s: int, safety: float = MEM_SAFETY
) -> tuple[np.ndarray, float]:
    """Activation coefficients and the margin that covers points the fit has not seen.

    The envelope touches the measurements it was fitted on, so its margin on unseen points
    is estimated by leaving each non-corner point out in turn (corners are never held out
    and their leave-one-out would be an extrapolation): the margin is the largest ratio
    measured/estimated found that way (at least 1), times ``1 + safety``.
    """
    act = _fit_act(points, kv, s)
    corners = _corners(points)
    worst = 1.0
    for i, p in enumerate(points):
        if (p.b, p.l) in corners or p.peak_bytes is None:
            continue
        rest = [q for k, q in enumerate(points) if k != i]
        if len(rest) < len(ACT_FEATURES):
            continue
        coef = _fit_act(rest, kv, s)
        est = p.b * (p.l + s + 1) * kv + float(feature_matrix(ACT_FEATURES, p.b, p.l) @ coef)
        worst = max(worst, p.peak_bytes / max(est, 1.0))
    return act, worst * (1.0 + safety)


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
        model=samples.model,
        device=samples.device,
        dtype=samples.dtype,
        grid=samples.grid,
        created_at=time.time(),
        meta=dict(samples.meta),
    )
    return replace(model, heap_overhead=_heap_overhead(model, points))


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
        })
    return rows


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
    )
    final = _model_from(samples, points, _fit_times(points, prefill, decode), fallback)
    return replace(final, errors=report.errors()), report


# --------------------------------------------------------------------------------------------
# Analytic fallback
# --------------------------------------------------------------------------------------------

# Placeholder hardware speeds for the analytic model: order-of-magnitude guesses, not
# measurements. Profiling replaces them; they only make an unprofiled instance usable.
_ROUGH_SPEED = {
    "cpu": {"flops": 1e11, "bytes_per_s": 1e10, "overhead_s": 5e-3},
    "cuda": {"flops": 1e14, "bytes_per_s": 1e12, "overhead_s": 5e-3},
}
_ANALYTIC_OVERHEAD_BYTES = 64 * 1024**2  # interpreter and allocator slack per slice
_LOGIT_COPIES = 6  # logits, softmax, sorted probs, cumsum, mask, indices (fp32/int64)


def analytic_cost_model(
    *,
    slice_length: int,
    kv_bytes_per_token: int,
    weights_bytes: int,
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    vocab_size: int,
    dtype_bytes: int,
    device: str = "cpu",
    model: str = "",
    dtype: str = "",
) -> CostModel:
    """A conservative model from the model's shape alone, for ``profile_mode="analytic"``.

    Memory is an upper bound from the model's shape, extended with what a plain
    per-token activation bound misses: per row, the logits and sampling buffers (``b``
    term); per token, four times one
    layer's residual, q/k/v/o and gated-MLP activations (``b*l``); per token pair, one
    layer's fp32 attention scores and probabilities for every head plus the mask
    (``b*l*(l+S+1)``, split into the ``bll`` and ``bl`` terms); and a fixed 64 MiB of
    allocator slack. The tests check it against measured peaks.

    Times are a PLACEHOLDER from rough hardware constants (``_ROUGH_SPEED``): prefill costs
    ``2 * params`` flops per token; a decode step reads the weights once, reads the KV cache
    and costs ``2 * params`` flops per row. Expect errors of a factor 2 or more.
    """
    speed = _ROUGH_SPEED["cuda" if device.startswith("cuda") else "cpu"]
    params = weights_bytes / dtype_bytes
    flop_s = 2.0 * params / speed["flops"]  # seconds per token through all the weights
    per_pair = num_attention_heads * 4 * 2 + 4  # fp32 scores + probabilities, fp32 mask
    # memory.py's bound doubled: on CPU the measured peak per token of smollm2-135m reached
    # twice it (freed blocks of one layer are not always reused by the next: heap layout).
    per_token = 4 * (6 * hidden_size + 3 * intermediate_size) * dtype_bytes + 64
    act = (
        float(_ANALYTIC_OVERHEAD_BYTES),
        float(_LOGIT_COPIES * vocab_size * 8),
        float(per_token + per_pair * (slice_length + 1)),
        float(per_pair),
    )
    return CostModel(
        slice_length=slice_length,
        prefill_features=PREFILL_BASE,
        prefill_coef=(speed["overhead_s"], 0.0, 0.0, flop_s),
        decode_coef=(
            speed["overhead_s"] + weights_bytes / speed["bytes_per_s"],
            flop_s,
            0.0,
            kv_bytes_per_token / speed["bytes_per_s"],
        ),
        kv_bytes_per_token=kv_bytes_per_token,
        act_features=ACT_FEATURES,
        act_coef=act,
        mem_margin=1.0,
        model=model,
        device=device,
        dtype=dtype,
        source="analytic",
        grid="",
        created_at=time.time(),
    )
