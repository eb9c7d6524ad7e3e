"""Admission into running sets (``settings.running_set``): pure functions, numpy only.

With one running set per instance (docs/design.md §3.6), the unfinished rows of a slice
continue on their instance, and the scheduler's work is to give each instance fresh rows
for its next slice boundary, as many as its memory can carry, oldest first:

* an instance is **open** when nothing it was given is still waiting to join (the queued
  rows join at the boundary; a second batch would only wait behind the first);
* each row goes to an **empty** open set first, if one fits it (an idle instance is never
  left idle beside a packed one), else where it adds the **least memory** (a longer row
  widens the padded cache for all, so rows of like length share a set), ties to the most
  free memory. (Measured in the simulator: placing every row in the set with the fewest
  rows instead cost 5% of throughput at saturation, by mixing lengths.) An instance is
  open again as soon as its slice ends, so a faster instance comes back for work sooner
  (the load follows speed without a speed estimate: what a heterogeneous fleet needs);
* each takes the **oldest** candidates, in arrival order, while its running set plus them
  fits its memory budget at the next slice (:func:`admissible`), under ``max_running``
  rows. Arrival order is the fairness rule, as in :func:`shared.policy.planning.plan_cycle`:
  a candidate is never passed by a younger one that happens to fit.

The running set is priced as it will be at its next slice: every row still there (the
scheduler does not know which will finish), each ``S`` tokens longer, with the cache as
wide as its longest row; the memory model prices the merged slice (fresh rows' prefill
activations included) with :meth:`SliceCost.mixed_memory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shared.policy.costmodel import CostModel, chunked_features, feature, feature_matrix
from shared.policy.kvlayout import PADDED, RAGGED
from shared.policy.planning import split_never_fit
from shared.policy.types import Candidate, CandidatePool, InstanceView, SliceCost


def admissible(
    lens: np.ndarray, cost: SliceCost, budget_bytes: int, running_rows: int,
    running_width: int, slice_length: int, max_rows: int,
) -> int:
    """How many of the first candidates (context lengths ``lens``, in admission order) can
    join a running set of ``running_rows`` rows, ``running_width`` tokens wide at its next
    slice, within ``budget_bytes`` and ``max_rows`` rows. A prefix: the first candidate
    that does not fit stops the count."""
    room = min(len(lens), max_rows - running_rows)
    if room <= 0:
        return 0
    k = np.arange(1, room + 1)
    fresh_len = np.maximum.accumulate(np.asarray(lens[:room], dtype=np.int64))
    width = np.maximum(running_width, fresh_len)
    memory = np.asarray(cost.mixed_memory(running_rows + k, width, slice_length, k, fresh_len))
    fits = memory <= budget_bytes
    return room if fits.all() else int(np.argmin(fits))


@dataclass(frozen=True)
class Admission:
    """Candidates (their positions in the pool) given to one instance this cycle."""

    instance_id: str
    rows: np.ndarray


def admit(
    pool: CandidatePool, instances: Sequence[InstanceView], slice_length: int, max_rows: int,
    layout: str = PADDED, sets_grow: bool = True,
) -> list[Admission]:
    """Place ``pool``'s candidates, oldest first, into the open instances' running sets
    (module docstring): each goes to an empty set where one fits it, else where it adds
    the least memory (the padded cache grows for every row when a longer one joins), ties
    to the most free memory; the first
    candidate that fits nowhere ends the cycle (no younger one passes it). Each view's
    ``running_rows``/``running_width`` describe its set (``sets_grow``: as of the start of
    the slice it is running, so ``S`` tokens longer at the next one; otherwise as of the
    next slice's start); ``layout`` is the engines' KV layout
    (:mod:`shared.policy.kvlayout`: the width a row adds to). Returns one admission per
    instance that takes at least one row, its rows in arrival order."""
    if not len(pool) or not instances:
        return []
    order = np.argsort(pool.arrivals, kind="stable")
    sets = _Sets(instances, slice_length, layout == RAGGED, sets_grow)
    taken: list[list[int]] = [[] for _ in instances]
    for c in order.tolist():
        k, after = sets.best(int(pool.lens[c]), max_rows)
        if k < 0:
            break
        sets.add(k, int(pool.lens[c]), after)
        taken[k].append(c)
    return [Admission(inst.id, np.array(rows, dtype=np.int64))
            for inst, rows in zip(instances, taken, strict=True) if rows]


class _Sets:
    """The open instances' running sets as admission grows them (one column each)."""

    def __init__(self, instances: Sequence[InstanceView], slice_length: int,
                 ragged: bool, grow: bool = True) -> None:
        self.instances = list(instances)
        self.s = slice_length
        self.ragged = ragged
        self.rows = np.array([i.running_rows for i in instances], dtype=np.int64)
        # a set still running is S tokens longer at its next slice
        growth = slice_length if grow else 0
        self.width = np.array([i.running_width + growth if i.running_rows else 0
                               for i in instances], dtype=np.float64)
        self.fresh = np.zeros(len(instances), dtype=np.int64)
        self.fresh_len = np.zeros(len(instances), dtype=np.int64)
        self.budget = np.array([i.memory_budget_bytes for i in instances], dtype=np.float64)
        self.stacked = _StackedMemory.of([i.cost for i in instances])
        by_model: dict[int, list[int]] = {}
        for k, inst in enumerate(instances):
            by_model.setdefault(id(inst.cost), []).append(k)
        self.groups = [(instances[cols[0]].cost, np.array(cols)) for cols in by_model.values()]
        self.used = self._memory(self.rows, self.width, self.fresh, self.fresh_len)

    def _memory(self, rows: np.ndarray, width: np.ndarray, fresh: np.ndarray,
                fresh_len: np.ndarray) -> np.ndarray:
        """Each set's next-slice peak (0 for an empty one): one vectorised evaluation per
        distinct memory model (instances serving one model usually share it)."""
        if self.stacked is not None:
            return np.where(rows > 0, self.stacked(rows, width, self.s, fresh, fresh_len), 0.0)
        out = np.zeros(len(rows))
        for cost, cols in self.groups:
            out[cols] = np.asarray(cost.mixed_memory(rows[cols], width[cols], self.s,
                                                     fresh[cols], fresh_len[cols]), dtype=float)
        return np.where(rows > 0, out, 0.0)

    def best(self, length: int, max_rows: int) -> tuple[int, float]:
        """The set a row of ``length`` tokens joins (-1: it fits none) and that set's
        next-slice peak with it."""
        fresh_len = np.maximum(self.fresh_len, length)
        after = self._memory(self.rows + 1, self._widened(self.width, self.rows, length),
                             self.fresh + 1, fresh_len)
        ok = (after <= self.budget) & (self.rows < max_rows)
        if not ok.any():
            return -1, 0.0
        added = np.where(ok, after - self.used, np.inf)
        occupied = np.where(ok, self.rows > 0, True)
        k = int(np.lexsort((self.used - self.budget, added, occupied))[0])
        return k, float(after[k])

    def _widened(self, width: Any, rows: Any, length: int) -> Any:
        """A set's width once a row of ``length`` joins: the longest row (padded) or the
        mean row (ragged)."""
        if self.ragged:
            return (width * rows + length) / (rows + 1)
        return np.maximum(width, length)

    def add(self, k: int, length: int, after: float) -> None:
        """A row of ``length`` tokens joins set ``k``, whose peak is then ``after``."""
        self.rows[k] += 1
        self.fresh[k] += 1
        self.width[k] = self._widened(self.width[k], self.rows[k] - 1, length)
        self.fresh_len[k] = max(self.fresh_len[k], length)
        self.used[k] = after


class _StackedMemory:
    """:meth:`CostModel.mixed_memory` of every instance in one vectorised evaluation
    (instances profile themselves, so each has its own coefficients; evaluated model by
    model, a cycle that admits hundreds of rows costs tens of milliseconds)."""

    def __init__(self, models: Sequence[CostModel]) -> None:
        names = models[0].act_features
        feature_matrix(names, 1, 1)  # unknown feature names fail here, not in the loop
        self.margin = np.array([m.mem_margin for m in models])
        self.resume_margin = np.array([m.resume_margin for m in models])
        self.kv = np.array([float(m.kv_bytes_per_token) for m in models])
        act = np.array([m.act_coef for m in models], dtype=float)
        self.has_resume = np.array([bool(m.resume_act_coef) for m in models])
        resume = np.array([m.resume_act_coef or m.act_coef for m in models], dtype=float)
        # only the features some model uses (fits leave many coefficients at zero)
        used = [j for j in range(len(names)) if act[:, j].any() or resume[:, j].any()]
        self.terms = [(names[j], act[:, j], resume[:, j]) for j in used]
        # chunked prefill (one chunk size for the stack: `of` checks it)
        self.chunk_tokens = models[0].prefill_chunk_tokens
        self.chunked = np.array([m.chunks_prefill for m in models], dtype=bool)
        self.used_names = [names[j] for j in used]
        self.used_act = act[:, used]

    def _act(self, b: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Activation bytes of ``(b, x)`` per instance: prefill envelope, resume envelope."""
        plain, resumed = np.zeros(len(self.kv)), np.zeros(len(self.kv))
        b, x = np.asarray(b, dtype=float), np.asarray(x, dtype=float)
        for name, coef, rcoef in self.terms:
            value = feature(name, b, x)
            plain += coef * value
            resumed += rcoef * value
        return plain, resumed

    @classmethod
    def of(cls, costs: Sequence[SliceCost]) -> _StackedMemory | None:
        """The stack, or None when some model is not a :class:`CostModel` or the models'
        activation features differ (then each model is evaluated on its own)."""
        if not costs or not all(isinstance(c, CostModel) for c in costs):
            return None
        models = [c for c in costs if isinstance(c, CostModel)]
        if len({m.act_features for m in models}) != 1 or len(
                {m.prefill_chunk_tokens for m in models}) != 1:
            return None
        return cls(models)

    def __call__(self, b: np.ndarray, w: np.ndarray, s: int, fresh: np.ndarray,
                 fresh_len: np.ndarray) -> np.ndarray:
        cache = self.kv * b * (w + s + 1.0)
        if self.chunked.any():  # the chunks' bound (CostModel.prefill_activation)
            phi = chunked_features(self.used_names, fresh, fresh_len, self.chunk_tokens)
            prefill_act = np.einsum("ij,ij->i", self.used_act, np.atleast_2d(phi))
            if not self.chunked.all():
                prefill_act = np.where(self.chunked, prefill_act, self._act(fresh, fresh_len)[0])
        else:
            prefill_act, _ = self._act(fresh, fresh_len)
        whole_act, resume_act = self._act(b, w)
        plain = self.margin * (cache + whole_act)
        mixed = self.margin * (cache + prefill_act)
        resumed = self.resume_margin * (cache + resume_act)
        return np.where(self.has_resume, np.maximum(mixed, resumed), plain)


def admission_cycle(
    candidates: Sequence[Candidate], instances: Sequence[InstanceView], open_ids: set[str],
    slice_length: int, max_rows: int, layout: str = PADDED,
) -> tuple[CandidatePool, list[Admission], list[Candidate]]:
    """One running-set cycle: ``(runnable pool, admissions into it, never-fitting)``.
    Requests that fit no instance even alone (any instance, open or not) are returned for
    the caller to fail; the rest are admitted into the ``open_ids`` instances."""
    runnable, never = split_never_fit(CandidatePool.of(candidates), instances, slice_length)
    open_views = [v for v in instances if v.id in open_ids]
    admitted = admit(runnable, open_views, slice_length, max_rows, layout)
    return runnable, admitted, never.candidates



@dataclass(frozen=True)
class Continuation:
    """One open instance's next slice in the scheduler's running-set mode: the rows whose
    K/V it keeps (``continuing``, they resume) and the fresh rows admitted beside them,
    as positions in the cycle's runnable pool, each in arrival order."""

    instance_id: str
    continuing: np.ndarray
    fresh: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        """Every row of the slice: the continuing ones, then the fresh ones."""
        return np.concatenate([self.continuing, self.fresh])


def continuation_cycle(
    candidates: Sequence[Candidate], instances: Sequence[InstanceView], open_ids: set[str],
    slice_length: int, max_rows: int, layout: str = PADDED,
) -> tuple[CandidatePool, list[Continuation], list[Candidate]]:
    """One cycle of the scheduler's running-set mode: ``(runnable pool, next slices,
    never-fitting)``.

    The workers keep unfinished rows' K/V between slices and commit them back to pending;
    here those rows make their instance's running set. An instance is open when nothing
    is queued or running on it (its last slice committed), and its next slice is:

    1. its **continuing** rows (pending, K/V kept there), oldest first, as many as fit its
       budget as resumed rows (at their current width, plus the slice's ``S`` steps) and
       ``max_rows``. The rest are *preempted*: they become fresh candidates (their K/V
       will be re-prefilled wherever they go);
    2. **fresh** rows admitted by :func:`admit`, oldest first, best fit across the open
       instances, beside those sets.

    A row whose K/V is on an instance that is not open waits for it (its instance's slice
    is committing or queued): moving it would re-prefill what is kept.
    """
    runnable, never = split_never_fit(CandidatePool.of(candidates), instances, slice_length)
    home = np.array([c.kv_instance for c in runnable.candidates], dtype=object)
    open_views = [v for v in instances if v.id in open_ids]
    kept: dict[str, np.ndarray] = {}
    preempted: list[np.ndarray] = []
    views = []
    for view in open_views:
        mine = np.flatnonzero(home == view.id)
        mine = mine[np.argsort(runnable.arrivals[mine], kind="stable")]
        k = _resumable(runnable.lens[mine], view, slice_length, max_rows)
        kept[view.id] = mine[:k]
        preempted.append(mine[k:])
        width = int(runnable.lens[mine[:k]].max()) if k else 0
        views.append(replace(view, running_rows=k, running_width=width))
    waiting = np.array([bool(h) for h in home], dtype=bool)  # kept somewhere
    fresh_pos = np.flatnonzero(~waiting)
    if preempted:
        fresh_pos = np.sort(np.concatenate([fresh_pos, *preempted]))
    admitted = {a.instance_id: fresh_pos[a.rows] for a in admit(
        runnable.take(fresh_pos), views, slice_length, max_rows, layout, sets_grow=False)}
    empty = np.zeros(0, dtype=np.int64)
    slices = [Continuation(v.id, kept.get(v.id, empty), admitted.get(v.id, empty))
              for v in open_views]
    return runnable, [c for c in slices if len(c.rows)], never.candidates


def _resumable(lens: np.ndarray, view: InstanceView, slice_length: int, max_rows: int) -> int:
    """How many of the first rows (context lengths ``lens``, oldest first) resume together
    on ``view`` within its budget and ``max_rows``: a prefix."""
    room = min(len(lens), max_rows)
    if room <= 0:
        return 0
    k = np.arange(1, room + 1)
    width = np.maximum.accumulate(np.asarray(lens[:room], dtype=np.int64))
    memory = np.asarray(view.cost.mixed_memory(k, width, slice_length, 0, 0), dtype=float)
    fits = memory <= view.memory_budget_bytes
    return room if fits.all() else int(np.argmin(fits))
