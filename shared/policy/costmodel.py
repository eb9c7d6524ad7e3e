"""Serving-time and memory model of one instance (docs/design.md §2): evaluation, numpy only.

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

On CPU the process grows by more than torch allocates; ``heap_overhead`` bounds that ratio
and the CPU budget is divided by it. This module evaluates a model and builds the analytic
fallback; fitting one to measurements (scikit-learn, SciPy) is the profiler's business
(``services/worker/fit.py``). Everything here is numpy only: no torch, no Redis, no I/O, so
the scheduler, the simulator and the tests share it. A :class:`CostModel` serialises to JSON
to live in Redis with its instance.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

ArrayLike = Any  # ints, floats or numpy arrays of any broadcastable shape
SCHEMA_VERSION = 1

PREFILL_BASE = ("1", "b", "l", "bl")
PREFILL_QUADRATIC = ("1", "b", "l", "bl", "bll")
DECODE_FEATURES = ("1", "b", "c", "bc")
DECODE_WITH_STEP = ("1", "b", "c", "bc", "b2")  # b2 = [b >= 2]
ACT_FEATURES = ("1", "b", "bl", "bll")


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


def feature(name: str, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One feature of float arrays ``(b, x)`` of the same shape (no checks: the hot path
    of admission; :func:`feature_matrix` validates names)."""
    return _FEATURES[name](b, x)


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


#: Activation features a chunked prefill can bound (every feature is ``b^i * l^j``, i <= 1).
CHUNKABLE = frozenset({"1", "b", "l", "bl", "bll", "b2"})


def chunked_features(names: Sequence[str], rows: ArrayLike, longest: ArrayLike,
                     chunk_tokens: int) -> np.ndarray:
    """Upper bounds of activation features ``names`` over every prefill pass the engine
    makes of ``rows`` fresh rows at most ``longest`` tokens long when a pass holds at most
    ``chunk_tokens`` tokens (rows x padded length; a longer row is a pass alone): a pass
    has ``b <= rows`` rows of ``l <= longest``, so ``b * l <= T = min(rows * longest,
    max(chunk_tokens, longest))`` and ``b * l * l <= T * longest``. With ``chunk_tokens``
    at least ``rows * longest`` these are the features of one pass of all the rows.
    Stacked on a new last axis, as :func:`feature_matrix`.

    Raises:
        ValueError: a feature that is not of that form.
    """
    bad = [n for n in names if n not in CHUNKABLE]
    if bad:
        raise ValueError(f"features {bad} cannot be bounded under chunked prefill")
    f, ln = np.broadcast_arrays(np.asarray(rows, dtype=float), np.asarray(longest, dtype=float))
    t = np.minimum(f * ln, np.maximum(float(chunk_tokens), ln))
    by_name = {"1": np.ones_like(f), "b": f, "l": ln, "bl": t, "bll": t * ln,
               "b2": (f >= 2).astype(float)}
    return np.stack([by_name[n] for n in names], axis=-1)


def _linear(names: Sequence[str], coef: Sequence[float], b: ArrayLike, x: ArrayLike) -> np.ndarray:
    """``sum_k coef_k * feature_k(b, x)``, broadcast over ``b`` and ``x``.

    Summed term by term, skipping zero coefficients (NNLS leaves many): the scheduler
    evaluates this on ``n x max_batch`` matrices every cycle, where stacking a feature
    tensor first cost several times more.
    """
    bb, xx = np.asarray(b, dtype=float), np.asarray(x, dtype=float)
    total: Any = 0.0
    for name, c in zip(names, coef, strict=True):
        if c:  # the constant feature is added as a scalar: no array of ones
            total = total + (c if name == "1" else c * _FEATURES[name](bb, xx))
    shape = np.broadcast_shapes(bb.shape, xx.shape)
    return total if np.shape(total) == shape else np.zeros(shape) + total


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
    # Slices whose rows resume from retained K/V have no prefill activations: their own
    # fitted envelope (coefficients of ``act_features``) and margin; () = not measured,
    # such slices are bounded by ``slice_memory``.
    resume_act_coef: tuple[float, ...] = ()
    resume_margin: float = 1.0
    decode_batched_extra: float = 0.0  # e: seconds added to each decode step when b >= 2
    # Process growth / allocator estimate, largest over the profile (>= 1): what the heap
    # adds on top of torch's tensors on CPU. The instance's budget is divided by it.
    heap_overhead: float = 1.0
    # Tokens (rows x padded length) in one prefill pass of the serving engine; 0 = no
    # limit (a pass per group of like lengths). Not a profiled figure: the worker sets it
    # from SCLS_PREFILL_CHUNK_TOKENS before publishing, so the scheduler prices the passes
    # the engine will run (see prefill_activation).
    prefill_chunk_tokens: int = 0
    # Seconds each token a row samples under a grammar adds (the mask's fill and apply,
    # docs/structured-outputs.md), per row: profiled by decoding batches with and without
    # a JSON schema (services/worker/profiler.py). 0 = not measured. Additive per row, so
    # it changes no batch's partition, only its price: where it runs and when.
    grammar_token_s: float = 0.0
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
        if self.resume_act_coef and len(self.resume_act_coef) != len(self.act_features):
            raise ValueError("act_features and resume_act_coef differ in length")
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

    def grammar_time(self, rows: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:
        """Seconds ``rows`` constrained rows add to a slice of ``s`` sampled tokens each
        (a slice samples ``s`` tokens per row, the first after its prefill)."""
        n = np.asarray(self.slice_length if s is None else s, dtype=float)
        return np.asarray(rows, dtype=float) * n * self.grammar_token_s

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
        """Seconds the model gives one iteration of transformers' continuous batching
        (``ils-hf``, a paged cache), priced as the simulator's ILS engines price a ragged
        layout: one decode step ``Td(b, c)`` for the ``b``
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
            grammar_token_s=self.grammar_token_s * factor,
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

    @property
    def chunks_prefill(self) -> bool:
        """Whether prefill activations are bounded by chunked passes: a chunk size is set
        and a resume envelope separates the decode phase's activations from them."""
        return self.prefill_chunk_tokens > 0 and bool(self.resume_act_coef)

    def prefill_activation(self, rows: ArrayLike, longest: ArrayLike) -> np.ndarray:
        """Activation peak (no margin) of prefilling ``rows`` fresh rows at most
        ``longest`` tokens long: one pass of them all, or with chunked prefill the bound
        over the chunks (:func:`chunked_features`)."""
        if self.prefill_chunk_tokens <= 0:
            return self.activation_bytes(rows, longest)
        phi = chunked_features(self.act_features, rows, longest, self.prefill_chunk_tokens)
        return phi @ np.asarray(self.act_coef, dtype=float)

    def slice_memory(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Peak bytes beyond the weights of a slice: ``margin * (kv cache + act(b, l))``;
        with chunked prefill (:attr:`chunks_prefill`) the larger of its prefill phase (the
        cache plus the chunks' activations) and its decode phase (as a resumed slice)."""
        if self.chunks_prefill:
            return self.mixed_memory(b, l, s, b, l)
        raw = self.kv_cache_bytes(b, l, s) + self.activation_bytes(b, l)
        return self.mem_margin * raw

    def resume_memory(self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:  # noqa: E741
        """Peak bytes of a slice whose rows all resume from retained K/V: the same cache,
        no prefill activations (the fitted resume envelope); ``slice_memory`` when the
        profile did not measure resumed slices."""
        if not self.resume_act_coef:
            return self.slice_memory(b, l, s)
        raw = self.kv_cache_bytes(b, l, s) + _linear(self.act_features, self.resume_act_coef,
                                                     b, l)
        return self.resume_margin * raw

    def mixed_memory(
        self, b: ArrayLike, l: ArrayLike, s: ArrayLike | None,  # noqa: E741
        fresh_rows: ArrayLike, fresh_len: ArrayLike,
    ) -> np.ndarray:
        """Peak bytes of a slice of ``b`` rows (cache width ``l``) of which ``fresh_rows``
        are prefilled (padded to ``fresh_len``) and the rest resume: the larger of its
        prefill phase (the whole cache plus that pass's activations) and its decode phase
        (as a resumed slice). All rows prefilled: ``slice_memory``."""
        if not self.resume_act_coef:
            return self.slice_memory(b, l, s)
        prefill = self.mem_margin * (self.kv_cache_bytes(b, l, s)
                                     + self.prefill_activation(fresh_rows, fresh_len))
        return np.maximum(prefill, self.resume_memory(b, l, s))

    # --- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists, NaN errors become None)."""
        out = asdict(self)
        out["errors"] = {k: finite_or_none(v) for k, v in self.errors.items()}
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
        for key in ("prefill_features", "prefill_coef", "decode_coef", "act_coef", "act_features",
                    "resume_act_coef"):
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


def finite_or_none(value: Any) -> Any:
    """``None`` for NaN/inf floats (JSON has no NaN), the value otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
