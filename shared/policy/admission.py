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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from shared.policy.costmodel import CostModel, chunked_features
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
    """The open instances' running sets as admission grows them, one row at a time.

    A cycle places hundreds of rows, one decision each, over a dozen or so sets: the cost
    is Python's per-call overhead, not arithmetic, so the sets are plain lists and each
    set's memory model is a scalar function (:class:`_SetMemory`). A row no longer than a
    set's cache and its fresh rows (padded layout) adds the same memory whatever its
    length: that peak is kept per set (``plain_after``) and only recomputed when the set
    changes, so a row prices only the sets it would widen.
    """

    def __init__(self, instances: Sequence[InstanceView], slice_length: int,
                 ragged: bool, grow: bool = True) -> None:
        self.ragged = ragged
        self.memory = [_SetMemory.of(i.cost, slice_length) for i in instances]
        self.rows = [i.running_rows for i in instances]
        # a set still running is S tokens longer at its next slice
        growth = slice_length if grow else 0
        self.width = [float(i.running_width + growth) if i.running_rows else 0.0
                      for i in instances]
        self.fresh = [0] * len(instances)
        self.fresh_len = [0] * len(instances)
        self.budget = [float(i.memory_budget_bytes) for i in instances]
        self.used = [self.memory[k](r, self.width[k], 0, 0) if r else 0.0
                     for k, r in enumerate(self.rows)]
        self.plain_len = [-1.0] * len(instances)
        self.plain_after = [0.0] * len(instances)
        for k in range(len(instances)):
            self._refresh(k)

    def _refresh(self, k: int) -> None:
        """Set ``k``'s peak with one more row that widens nothing, and the longest such
        row (-1: every row changes its peak: an empty set, or the ragged layout)."""
        if self.ragged or not self.rows[k] or not self.fresh[k]:
            self.plain_len[k] = -1.0
            return
        self.plain_len[k] = min(self.width[k], self.fresh_len[k])
        self.plain_after[k] = self.memory[k](self.rows[k] + 1, self.width[k],
                                             self.fresh[k] + 1, self.fresh_len[k])

    def best(self, length: int, max_rows: int) -> tuple[int, float]:
        """The set a row of ``length`` tokens joins (-1: it fits none) and that set's
        next-slice peak with it: an empty set first, then the least added memory, then
        the most free memory, then the first instance."""
        chosen, chosen_after, chosen_empty, least_added, most_free = -1, 0.0, False, 0.0, 0.0
        used, budget, width = self.used, self.budget, self.width
        plain_len, plain_after = self.plain_len, self.plain_after
        for k, rows in enumerate(self.rows):  # the hot loop: written out, no helpers
            if rows >= max_rows:
                continue
            if length <= plain_len[k]:
                after = plain_after[k]
            else:
                wide = self._widened(width[k], rows, length) if self.ragged else (
                    width[k] if width[k] >= length else float(length))
                fresh_len = self.fresh_len[k]
                after = self.memory[k](rows + 1, wide, self.fresh[k] + 1,
                                       fresh_len if fresh_len >= length else length)
            if after > budget[k]:
                continue
            empty, added, free = rows == 0, after - used[k], budget[k] - used[k]
            if chosen < 0 or (empty and not chosen_empty) or (
                    empty == chosen_empty and (added < least_added or (
                        added == least_added and free > most_free))):
                chosen, chosen_after = k, after
                chosen_empty, least_added, most_free = empty, added, free
        return chosen, chosen_after

    def _widened(self, width: float, rows: int, length: int) -> float:
        """A set's width once a row of ``length`` tokens joins: the longest row (padded) or
        the mean row (ragged)."""
        if self.ragged:
            return (width * rows + length) / (rows + 1)
        return max(width, float(length))

    def add(self, k: int, length: int, after: float) -> None:
        """A row of ``length`` tokens joins set ``k``, whose peak is then ``after``."""
        self.width[k] = self._widened(self.width[k], self.rows[k], length)
        self.rows[k] += 1
        self.fresh[k] += 1
        self.fresh_len[k] = max(self.fresh_len[k], length)
        self.used[k] = after
        self._refresh(k)


class _SetMemory:
    """One instance's :meth:`SliceCost.mixed_memory` at a slice of ``S`` steps, on Python
    floats: admission prices one set at a time, where a numpy call costs more than the
    arithmetic. Every activation feature is ``b^i * x^j`` with ``i <= 1``
    (``CHUNKABLE`` in :mod:`shared.policy.costmodel`), so each envelope is one expression."""

    def __init__(self, model: CostModel, slice_length: int) -> None:
        chunked_features(model.act_features, 1, 1, 1)  # refuses features it cannot bound
        self.s1 = slice_length + 1.0
        self.kv = float(model.kv_bytes_per_token)
        self.margin, self.resume_margin = float(model.mem_margin), float(model.resume_margin)
        self.act = _coefficients(model.act_features, model.act_coef)
        self.resume = _coefficients(model.act_features, model.resume_act_coef) if (
            model.resume_act_coef) else None
        self.chunk = float(model.prefill_chunk_tokens) if model.chunks_prefill else 0.0

    @staticmethod
    def of(cost: SliceCost, slice_length: int) -> Callable[[int, float, int, float], float]:
        """The scalar evaluation of ``cost``: this class for a :class:`CostModel`, the
        model's own ``mixed_memory`` otherwise."""
        if isinstance(cost, CostModel):
            return _SetMemory(cost, slice_length)
        return lambda b, w, f, fl: float(cost.mixed_memory(b, w, slice_length, f, fl))

    def __call__(self, b: int, w: float, fresh: int, fresh_len: float) -> float:
        cache = self.kv * b * (w + self.s1)
        if self.resume is None:
            return self.margin * (cache + _poly(self.act, b, w, b * w))
        tokens = fresh * fresh_len
        if self.chunk:  # the chunks' bound (chunked_features)
            tokens = min(tokens, max(self.chunk, fresh_len))
        prefill = self.margin * (cache + _poly(self.act, fresh, fresh_len, tokens))
        return max(prefill, self.resume_margin * (cache + _poly(self.resume, b, w, b * w)))


_Poly = tuple[float, float, float, float, float, float]


def _coefficients(names: Sequence[str], coef: Sequence[float]) -> _Poly:
    """An envelope's coefficients of ``1, b, l, b*l, b*l*l, [b >= 2]`` (``c`` for ``l``)."""
    by_name = {"c": "l", "bc": "bl"}
    out = dict.fromkeys(("1", "b", "l", "bl", "bll", "b2"), 0.0)
    for name, c in zip(names, coef, strict=True):
        out[by_name.get(name, name)] += float(c)
    return out["1"], out["b"], out["l"], out["bl"], out["bll"], out["b2"]


def _poly(c: _Poly, b: float, x: float, bx: float) -> float:
    """An envelope at ``(b, x)`` with ``b * x`` given as ``bx`` (a chunked prefill bounds
    it by a chunk's tokens)."""
    return c[0] + c[1] * b + c[2] * x + bx * (c[3] + c[4] * x) + (c[5] if b >= 2 else 0.0)


def fair_share(instances: Sequence[InstanceView], open_rows: dict[str, int],
               fresh: int) -> int:
    """Rows per instance if the rows the fleet holds and ``fresh`` more were spread evenly:
    an open instance's set (``open_rows``, its id -> rows it keeps) and each busy one's
    rows (running, and queued or in flight).

    Admission fills a set no further than this. With one KV memory a single set can hold
    most of a short queue: the first instance to open after a burst took 59 of 64 rows
    while the other, still running its first slice, got 5 (measured, BENCHMARKS.md), and
    running sets never rebalance. Under a deep queue the share exceeds what memory admits
    and changes nothing."""
    held = sum(open_rows[v.id] if v.id in open_rows else v.running_rows + v.queued_requests
               for v in instances)
    return max(1, -(-(held + fresh) // max(1, len(instances))))


def admission_cycle(
    candidates: Sequence[Candidate], instances: Sequence[InstanceView], open_ids: set[str],
    slice_length: int, max_rows: int, layout: str = PADDED,
) -> tuple[CandidatePool, list[Admission], list[Candidate]]:
    """One running-set cycle: ``(runnable pool, admissions into it, never-fitting)``.
    Requests that fit no instance even alone (any instance, open or not) are returned for
    the caller to fail; the rest are admitted into the ``open_ids`` instances, each set
    filled up to the fleet's :func:`fair_share` of rows."""
    runnable, never = split_never_fit(CandidatePool.of(candidates), instances, slice_length)
    open_views = [v for v in instances if v.id in open_ids]
    share = fair_share(instances, {v.id: v.running_rows for v in open_views}, len(runnable))
    admitted = admit(runnable, open_views, slice_length, min(max_rows, share), layout)
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
       instances, beside those sets, none filled past the fleet's :func:`fair_share`.

    A row whose K/V is on an instance that is not open waits for it (its instance's slice
    is committing or queued): moving it would re-prefill what is kept.
    """
    runnable, never = split_never_fit(CandidatePool.of(candidates), instances, slice_length)
    homes: dict[str, list[int]] = {}
    for pos, c in enumerate(runnable.candidates):
        if c.kv_instance:
            homes.setdefault(c.kv_instance, []).append(pos)
    open_views = [v for v in instances if v.id in open_ids]
    kept: dict[str, np.ndarray] = {}
    preempted: list[np.ndarray] = []
    views = []
    for view in open_views:
        mine = np.array(homes.get(view.id, ()), dtype=np.int64)
        mine = mine[np.argsort(runnable.arrivals[mine], kind="stable")]
        k = _resumable(runnable.lens[mine], view, slice_length, max_rows)
        kept[view.id] = mine[:k]
        preempted.append(mine[k:])
        width = int(runnable.lens[mine[:k]].max()) if k else 0
        views.append(replace(view, running_rows=k, running_width=width))
    fresh_pos = np.array([pos for pos, c in enumerate(runnable.candidates)
                          if not c.kv_instance], dtype=np.int64)  # kept nowhere
    if preempted:
        fresh_pos = np.sort(np.concatenate([fresh_pos, *preempted]))
    share = fair_share(instances, {v.id: v.running_rows for v in views}, len(fresh_pos))
    admitted = {a.instance_id: fresh_pos[a.rows] for a in admit(
        runnable.take(fresh_pos), views, slice_length, min(max_rows, share), layout,
        sets_grow=False)}
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
