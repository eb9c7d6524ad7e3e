"""Admission into running sets (shared.policy.admission) and the cache width of each KV
layout (shared.policy.kvlayout): table-driven, no model, no Redis."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from shared.policy.admission import admissible, admit, continuation_cycle, fair_share
from shared.policy.costmodel import PREFILL_BASE, CostModel
from shared.policy.kvlayout import PADDED, RAGGED, cache_width
from shared.policy.types import Candidate, CandidatePool, InstanceView

S = 4
#: One byte per cached position, no activations: a slice of b rows w wide needs
#: b * (w + S + 1) bytes, so every figure below is checked by hand.
BYTE = CostModel(
    slice_length=S, prefill_features=PREFILL_BASE, prefill_coef=(1.0, 0.0, 0.001, 0.0),
    decode_coef=(0.1, 0.0, 0.0, 0.0), kv_bytes_per_token=1, act_coef=(0.0, 0.0, 0.0, 0.0),
    mem_margin=1.0, source="test",
)


@pytest.mark.parametrize(("lens", "budget", "rows", "width", "max_rows", "expected"), [
    ([10, 10, 10], 45, 0, 0, 256, 3),  # 3 x 15 bytes
    ([10, 10, 10], 44, 0, 0, 256, 2),
    ([10], 75, 2, 20, 256, 1),  # 3 x (20 + 5)
    ([10], 74, 2, 20, 256, 0),
    ([30], 60, 2, 10, 256, 0),  # a longer row widens the whole padded cache: 3 x 35
    ([10, 100, 10], 60, 0, 0, 256, 1),  # a prefix: the row that does not fit stops it
    ([1, 1, 1], 10**6, 3, 4, 4, 1),  # max_rows
    ([1, 1, 1], 10**6, 4, 4, 4, 0),
    ([], 10**6, 0, 0, 256, 0),
])
def test_admissible_counts_the_prefix_that_fits(lens: list[int], budget: int, rows: int,
                                                width: int, max_rows: int, expected: int) -> None:
    assert admissible(np.array(lens), BYTE, budget, rows, width, S, max_rows) == expected


def view(name: str, rows: int = 0, width: int = 0, budget: int = 10**6) -> InstanceView:
    return InstanceView(name, BYTE, budget, 4096, running_rows=rows, running_width=width)


def pool(lens: list[int], arrivals: list[float] | None = None) -> CandidatePool:
    arrivals = arrivals if arrivals is not None else [float(k) for k in range(len(lens))]
    return CandidatePool.of([Candidate(str(k), n, 100, a)
                             for k, (n, a) in enumerate(zip(lens, arrivals, strict=True))])


def placed(admissions: list) -> dict[str, list[int]]:  # noqa: ANN001
    return {a.instance_id: a.rows.tolist() for a in admissions}


@pytest.mark.parametrize(("lens", "views", "expected"), [
    # equal rows on empty instances: each goes where it adds least, ties to the most free
    # memory, then the id: they alternate (balance without a speed estimate)
    ([10, 10, 10, 10], [view("a"), view("b")], {"a": [0, 2], "b": [1, 3]}),
    # a long row goes to the set that is already wide, a short one to the narrow set:
    # a: 4 rows 96 wide (100 at its next slice), b: 4 rows 6 wide (10 next)
    ([90, 8], [view("a", 4, 96), view("b", 4, 6)], {"a": [0], "b": [1]}),
    # the oldest fits nowhere: nobody younger passes it
    ([500, 10], [view("a", budget=300), view("b", budget=300)], {}),
    # the fuller instance gets rows only when the emptier one has none left to give
    ([10, 10], [view("a", 8, 6, budget=150), view("b", budget=150)], {"b": [0, 1]}),
])
def test_admit_places_oldest_first_where_each_row_adds_least(
    lens: list[int], views: list[InstanceView], expected: dict[str, list[int]]
) -> None:
    assert placed(admit(pool(lens), views, S, 256)) == expected


def test_admit_follows_arrival_order_not_pool_order() -> None:
    """Candidates given youngest first are still admitted oldest first: with room for one,
    the oldest gets it."""
    got = admit(pool([10, 10], arrivals=[5.0, 1.0]), [view("a", budget=15)], S, 256)
    assert placed(got) == {"a": [1]}


def test_a_ragged_layout_admits_a_long_row_beside_short_ones() -> None:
    """4 rows 6 wide (10 at the next slice) and a 90-token candidate on 200 bytes: padded,
    every row would be 90 wide (5 x 95 = 475); ragged, the mean is 26 (5 x 31 = 155)."""
    views = [view("a", 4, 6, budget=200)]
    assert placed(admit(pool([90]), views, S, 256, PADDED)) == {}
    assert placed(admit(pool([90]), views, S, 256, RAGGED)) == {"a": [0]}


@pytest.mark.parametrize(("contexts", "layout", "width"), [
    ([3, 10, 4], PADDED, 10),
    ([3, 10, 4], RAGGED, 6),  # ceil(17 / 3)
    ([7], RAGGED, 7),
    ([], PADDED, 0),
])
def test_cache_width_per_layout(contexts: list[int], layout: str, width: int) -> None:
    assert cache_width(contexts, layout) == width


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown KV layout 'paged'"):
        cache_width([1, 2], "paged")


# --- the scheduler's running-set mode (continuation_cycle) ---------------------------------

def cands(spec: list[tuple[int, str]]) -> list[Candidate]:
    """Candidates ``(context length, instance keeping its K/V or "")``, oldest first."""
    return [Candidate(str(k), n, 100, float(k), home) for k, (n, home) in enumerate(spec)]


def slices_of(spec: list[tuple[int, str]], views: list[InstanceView], open_ids: set[str],
              max_rows: int = 256) -> dict[str, tuple[list[str], list[str]]]:
    runnable, slices, never = continuation_cycle(cands(spec), views, open_ids, S, max_rows)
    assert never == []
    ids = [c.id for c in runnable.candidates]
    return {c.instance_id: ([ids[i] for i in c.continuing], [ids[i] for i in c.fresh])
            for c in slices}


@pytest.mark.parametrize(("spec", "views", "open_ids", "max_rows", "expected"), [
    # a's kept rows continue there, the fresh ones fill both sets oldest first
    ([(10, "a"), (10, ""), (10, "a"), (10, "")], [view("a"), view("b")], {"a", "b"}, 256,
     {"a": (["0", "2"], []), "b": ([], ["1", "3"])}),
    # rows kept on a busy instance wait for it: nobody else takes them
    ([(10, "a"), (10, "")], [view("a"), view("b")], {"b"}, 256, {"b": ([], ["1"])}),
    # kept rows beyond the budget: the youngest is preempted and goes where it fits as a
    # fresh row (3 x (30 + 5) = 105 > 100; two resume in 70 bytes)
    ([(30, "a"), (30, "a"), (30, "a")], [view("a", budget=100), view("b", budget=100)],
     {"a", "b"}, 256, {"a": (["0", "1"], []), "b": ([], ["2"])}),
    # max_rows bounds the continuing rows as well as the admitted ones
    ([(5, "a"), (5, "a"), (5, "a"), (5, "")], [view("a")], {"a"}, 2,
     {"a": (["0", "1"], [])}),
    # nothing open: nothing dispatched
    ([(10, "")], [view("a")], set(), 256, {}),
    # a burst while a is busy with 2 rows: b fills to the fleet's fair share, 8 rows / 2
    # instances = 4, and leaves the rest for a (its set would otherwise take all 6)
    ([(10, "")] * 6, [replace(view("a"), queued_requests=2), view("b")], {"b"}, 256,
     {"b": ([], ["0", "1", "2", "3"])}),
    # kept rows count in the share: a keeps 3, b is empty, 3 fresh -> 6 / 2 = 3 each
    ([(10, "a"), (10, "a"), (10, "a"), (10, ""), (10, ""), (10, "")],
     [view("a"), view("b")], {"a", "b"}, 256,
     {"a": (["0", "1", "2"], []), "b": ([], ["3", "4", "5"])}),
])
def test_continuation_cycle_continues_kept_rows_and_admits_fresh_ones(
    spec: list[tuple[int, str]], views: list[InstanceView], open_ids: set[str],
    max_rows: int, expected: dict[str, tuple[list[str], list[str]]],
) -> None:
    assert slices_of(spec, views, open_ids, max_rows) == expected


@pytest.mark.parametrize(("views", "open_rows", "fresh", "share"), [
    ([view("a"), view("b")], {"a": 0, "b": 0}, 0, 1),  # never below one row
    ([view("a"), view("b")], {"a": 0, "b": 0}, 9, 5),  # rounded up: nobody is left out
    ([view("a", rows=7), view("b")], {"b": 0}, 1, 4),  # a busy set counts its rows
    ([replace(view("a"), queued_requests=5), view("b")], {"b": 2}, 3, 5),  # and in flight
    ([view("a", rows=9)], {"a": 3}, 0, 3),  # an open set counts what it keeps
])
def test_fair_share(views: list[InstanceView], open_rows: dict[str, int], fresh: int,
                    share: int) -> None:
    assert fair_share(views, open_rows, fresh) == share


def test_the_share_does_not_bind_a_deep_queue() -> None:
    """Memory fills the sets long before a deep queue's share does: 4 rows of 20 + S + 1
    = 25 bytes fit in 100; the share of 200 rows over 2 instances is 100."""
    got = slices_of([(20, "")] * 200, [view("a", budget=100), view("b", budget=100)],
                    {"a", "b"})
    assert {k: len(v[1]) for k, v in got.items()} == {"a": 4, "b": 4}


def test_a_kept_set_is_priced_at_its_width_now_not_a_slice_later() -> None:
    """Two kept rows 20 wide and a fresh 20-token row on 75 bytes: 3 x (20 + 5) fits.
    (Pricing the kept set S tokens wider, as for a set still running, would refuse it.)"""
    got = slices_of([(20, "a"), (20, "a"), (20, "")], [view("a", budget=75)], {"a"})
    assert got == {"a": (["0", "1"], ["2"])}


def _reference_admit(lens: list[int], views: list[InstanceView], max_rows: int,
                     ragged: bool) -> dict[str, list[int]]:
    """The admission rule written plainly: every row prices every set with the model's
    own ``mixed_memory``; no cached peaks, no scalar shortcuts."""
    rows = [v.running_rows for v in views]
    width = [float(v.running_width + S) if v.running_rows else 0.0 for v in views]
    fresh, fresh_len = [0] * len(views), [0] * len(views)
    used = [float(v.cost.mixed_memory(r, w, S, 0, 0)) if r else 0.0
            for v, r, w in zip(views, rows, width, strict=True)]
    out: dict[str, list[int]] = {}
    for c, n in enumerate(lens):
        keys = []
        for k, v in enumerate(views):
            wide = (width[k] * rows[k] + n) / (rows[k] + 1) if ragged else max(width[k], n)
            after = float(v.cost.mixed_memory(rows[k] + 1, wide, S, fresh[k] + 1,
                                              max(fresh_len[k], n)))
            if rows[k] < max_rows and after <= v.memory_budget_bytes:
                keys.append((rows[k] > 0, after - used[k], used[k] - v.memory_budget_bytes,
                             k, after, wide))
        if not keys:
            break
        *_, k, after, wide = min(keys)
        rows[k], width[k], fresh[k] = rows[k] + 1, wide, fresh[k] + 1
        fresh_len[k], used[k] = max(fresh_len[k], n), after
        out.setdefault(views[k].id, []).append(c)
    return out


@pytest.mark.parametrize("layout", [PADDED, RAGGED])
@pytest.mark.parametrize("seed", range(6))
def test_admit_places_rows_as_the_plain_rule_does(layout: str, seed: int) -> None:
    """The fast admission (per-set scalar memory, cached peaks for rows that widen
    nothing) places every row where the plain rule does, on models with activations,
    resume envelopes and chunked prefill, beside sets already running."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    model = CostModel(
        slice_length=S, prefill_features=PREFILL_BASE, prefill_coef=(1.0, 0.0, 0.001, 0.0),
        decode_coef=(0.1, 0.0, 0.0, 0.0), kv_bytes_per_token=64,
        act_coef=(100.0, 3_000.0, 40.0, 0.01), mem_margin=1.05,
        resume_act_coef=(100.0, 9_000.0, 0.0, 0.0), resume_margin=1.0,
    )
    models = [model, replace(model, prefill_chunk_tokens=256), replace(model, resume_act_coef=()),
              BYTE]
    views = [InstanceView(f"i{k}", models[k % len(models)] if seed % 2 else model,
                          int(rng.integers(200_000, 2_000_000)), 4096,
                          running_rows=(r := int(rng.integers(0, 6))),
                          running_width=int(rng.integers(8, 300)) if r else 0)
             for k in range(int(rng.integers(2, 9)))]
    lens = [int(n) for n in rng.integers(4, 400, size=120)]
    got = placed(admit(pool(lens), views, S, 24, layout))
    assert got == _reference_admit(lens, views, 24, layout == RAGGED)
    assert sum(len(r) for r in got.values()) > 10  # the case places rows somewhere
