"""Every instance's cost model evaluated in one pass: the offloading step's estimates.

Each cycle prices every formed batch on every open instance (time and memory) and each
batch with retained K/V on its home (resume time and memory). Instances profile
themselves, so each has its own :class:`~shared.policy.costmodel.CostModel`; evaluated one
by one that is four numpy model evaluations per instance and cycle, most of a
millisecond at 16 instances. But a fitted model is linear in its coefficients: a slice's
time is ``coef . phi(b, l, s)`` for a feature vector ``phi`` that does not depend on the
instance. :class:`LinearStack` stacks the instances' coefficients into one matrix and
evaluates them all with one matrix product.

:func:`cost_stack` falls back to :class:`EachModel` (one evaluation per distinct model)
when some instance's model is not a :class:`CostModel` (tests' hand-written models), so
callers use one interface either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from shared.policy.costmodel import CostModel, chunked_features, feature_matrix
from shared.policy.types import SliceCost

#: What a stack evaluates: the :class:`~shared.policy.types.SliceCost` methods of one name.
KINDS = ("slice_time", "slice_memory", "resume_time", "resume_memory")


class EachModel:
    """Evaluates each instance's own model in turn (models shared by several instances
    once)."""

    def __init__(self, costs: Sequence[SliceCost]) -> None:
        self.costs = list(costs)

    def evaluate(self, kind: str, b: ArrayLike, l: ArrayLike, s: int,  # noqa: E741
                 which: np.ndarray | None = None) -> np.ndarray:
        """``kind`` of batches ``(b, l)`` at slice length ``s``: ``(models, batches)``, or
        with ``which`` (a model index per batch) each batch on its own model, ``(batches,)``."""
        b_, l_ = np.broadcast_arrays(np.asarray(b), np.asarray(l))
        if which is None:
            seen: dict[int, np.ndarray] = {}
            for cost in self.costs:
                if id(cost) not in seen:
                    seen[id(cost)] = _call(cost, kind, b_, l_, s)
            return np.array([seen[id(c)] for c in self.costs], dtype=float).reshape(
                len(self.costs), b_.size)
        out = np.empty(b_.size, dtype=float)
        for k in np.unique(which).tolist():
            rows = np.flatnonzero(which == k)
            out[rows] = _call(self.costs[k], kind, b_.ravel()[rows], l_.ravel()[rows], s)
        return out


def _call(cost: SliceCost, kind: str, b: np.ndarray, l: np.ndarray, s: int) -> np.ndarray:  # noqa: E741
    return np.broadcast_to(np.asarray(getattr(cost, kind)(b, l, s), dtype=float),
                           b.shape).ravel()


class LinearStack:
    """The coefficients of several :class:`CostModel` as matrices, one row per model.

    Per kind, a model's value is ``coef . phi(b, l, s)``:

    * time: ``phi`` = the prefill features (the union over the models, absent ones with a
      zero coefficient) and ``(n, n*b, n*[b>=2], w, b*w)`` with coefficients ``(d0, d1, e,
      d2, d3)``; ``n = s - 1``, ``w = n*l + n*(n+1)/2`` for a slice (prefill, then ``s - 1``
      decode steps), ``n = s``, ``w = n*l + n*(n-1)/2`` for a resumed one (``s`` decode
      steps, no prefill), as :meth:`CostModel.slice_time` and :meth:`CostModel.resume_time`;
    * memory: ``phi = (b*(l+s+1), activation features)`` with coefficients ``margin *
      (kv bytes per token, act coefficients)``; a resumed slice uses the resume envelope
      and margin, or the slice's when the model has none (:meth:`CostModel.resume_memory`).
      With chunked prefill (:attr:`CostModel.chunks_prefill`) a slice's memory is the
      larger of two such forms: its prefill phase, on the chunk-bounded features
      (:func:`~shared.policy.costmodel.chunked_features`), and its decode phase, the
      resume form.

    Sums run in another order than the models' own methods, so values may differ from
    them in the last bits.
    """

    def __init__(self, models: Sequence[CostModel]) -> None:
        self.prefill_names = _union(m.prefill_features for m in models)
        self.act_names = _union(m.act_features for m in models)
        decode = np.array([(*m.decode_coef[:2], m.decode_batched_extra, *m.decode_coef[2:])
                           for m in models], dtype=float)
        prefill = np.array([_spread(m.prefill_features, m.prefill_coef, self.prefill_names)
                            for m in models], dtype=float).reshape(len(models), -1)
        # one chunk size for the whole stack (cost_stack checks it): per model, whether it
        # bounds its prefill by chunks
        self.chunk_tokens = models[0].prefill_chunk_tokens if models else 0
        self.chunked = np.array([m.chunks_prefill for m in models], dtype=bool)
        self.coef = {
            "slice_time": np.hstack([prefill, decode]),
            "resume_time": np.hstack([np.zeros_like(prefill), decode]),
            "slice_memory": np.array([_memory_row(m, self.act_names, resume=False)
                                      for m in models], dtype=float),
            "resume_memory": np.array([_memory_row(m, self.act_names, resume=True)
                                       for m in models], dtype=float),
        }

    def features(self, kind: str, b: ArrayLike, l: ArrayLike, s: int) -> np.ndarray:  # noqa: E741
        """``phi`` of each batch for ``kind``: ``(batches, features)``."""
        b_, l_ = (a.ravel() for a in np.broadcast_arrays(np.asarray(b, dtype=float),
                                                         np.asarray(l, dtype=float)))
        if kind.endswith("_memory"):
            return np.column_stack([b_ * (l_ + s + 1.0), feature_matrix(self.act_names, b_, l_)])
        resumed = kind == "resume_time"
        n = float(s if resumed else s - 1)
        w = n * l_ + n * (n + (-1.0 if resumed else 1.0)) / 2.0
        prefill = feature_matrix(self.prefill_names, b_, l_)
        return np.column_stack([prefill, np.full_like(b_, n), n * b_, n * (b_ >= 2), w, b_ * w])

    def evaluate(self, kind: str, b: ArrayLike, l: ArrayLike, s: int,  # noqa: E741
                 which: np.ndarray | None = None) -> np.ndarray:
        """As :meth:`EachModel.evaluate`."""
        plain = self.features(kind, b, l, s)
        value = self._linear(self.coef[kind], plain, which)
        if kind != "slice_memory" or not self.chunked.any():
            return value
        # chunked models: max(prefill phase on chunk-bounded features, decode phase); the
        # decode phase (resume form) has the same features as the plain slice
        b_, l_ = (a.ravel() for a in np.broadcast_arrays(np.asarray(b, dtype=float),
                                                         np.asarray(l, dtype=float)))
        phi = np.column_stack([plain[:, 0],
                               chunked_features(self.act_names, b_, l_, self.chunk_tokens)])
        prefill = self._linear(self.coef["slice_memory"], phi, which)
        resumed = self._linear(self.coef["resume_memory"], plain, which)
        mask = self.chunked if which is None else self.chunked[which]
        if which is None:
            mask = mask[:, None]
        return np.where(mask, np.maximum(prefill, resumed), value)

    @staticmethod
    def _linear(coef: np.ndarray, phi: np.ndarray, which: np.ndarray | None) -> np.ndarray:
        if which is None:
            return coef @ phi.T
        return np.einsum("ij,ij->i", coef[which], phi)


def cost_stack(costs: Sequence[SliceCost]) -> LinearStack | EachModel:
    """The fastest exact evaluator of ``costs`` (one per instance, in order)."""
    if costs and all(type(c) is CostModel for c in costs) and len(
            {c.prefill_chunk_tokens for c in costs}) == 1:  # type: ignore[union-attr]
        return LinearStack(costs)  # type: ignore[arg-type]
    return EachModel(costs)


def _union(groups: object) -> tuple[str, ...]:
    names: list[str] = []
    for group in groups:  # type: ignore[attr-defined]
        names += [n for n in group if n not in names]
    return tuple(names)


def _spread(names: Sequence[str], coef: Sequence[float], into: Sequence[str]) -> list[float]:
    by_name = dict(zip(names, coef, strict=True))
    return [float(by_name.get(n, 0.0)) for n in into]


def _memory_row(m: CostModel, act_names: Sequence[str], resume: bool) -> list[float]:
    own = m.resume_act_coef if resume and m.resume_act_coef else m.act_coef
    margin = m.resume_margin if resume and m.resume_act_coef else m.mem_margin
    act = _spread(m.act_features, own, act_names)
    return [margin * m.kv_bytes_per_token, *(margin * c for c in act)]
