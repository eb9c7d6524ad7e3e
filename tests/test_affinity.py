"""KV affinity in the pure policy: a row is cheaper where its K/V is retained, and moves
when that instance is loaded or gone (docs/design.md §3.6)."""

from __future__ import annotations

import numpy as np
import pytest

from shared.policy.config import PolicyConfig
from shared.policy.offloading import Placement, max_min
from shared.policy.planning import plan_cycle
from shared.policy.types import Candidate, ResumeCost
from tests.test_policy import COST, inst

S = 8
CONFIG = PolicyConfig(slice_length=S, max_batch=8, horizon_s=10.0)


def kept(i: int, length: int, home: str) -> Candidate:
    return Candidate(f"r{i}", length, 64, float(i), kv_instance=home)


def fresh_time(b: int, length: int) -> float:
    return float(COST.slice_time(b, length, S))


def resume_time(b: int, length: int) -> float:
    return float(COST.resume_time(b, length, S))


def test_resume_cost_prices_no_prefill_and_keeps_the_memory() -> None:
    view = ResumeCost(COST)
    assert float(view.slice_time(4, 300, S)) == resume_time(4, 300) < fresh_time(4, 300)
    assert float(view.slice_memory(4, 300, S)) == float(COST.slice_memory(4, 300, S))


def test_retained_rows_are_batched_at_home_and_priced_without_prefill() -> None:
    cands = [kept(i, 300 + i, "b") for i in range(4)] + [Candidate("new", 50, 64, 9.0)]
    plan = plan_cycle(cands, [inst("a"), inst("b")], CONFIG)
    homed = next(p for p in plan.batches if "r0" in p.request_ids)
    assert homed.instance_id == "b" and sorted(homed.request_ids) == ["r0", "r1", "r2", "r3"]
    assert homed.resumed_rows == 4
    assert homed.estimated_s == pytest.approx(resume_time(4, 303))
    other = next(p for p in plan.batches if "new" in p.request_ids)
    assert other.resumed_rows == 0 and other.request_ids == ("new",)
    assert other.instance_id == "a"  # max-min: b already got the other batch


GAP = fresh_time(4, 400) - resume_time(4, 400)  # what a move costs: the batch's prefill


@pytest.mark.parametrize(("busy_gaps", "horizon_gaps", "fresh", "expected"), [
    (0.0, 100, False, "b"),  # idle home: stays
    (0.5, 100, False, "b"),  # loaded by less than a prefill: stays
    (3.0, 100, False, "a"),  # loaded by more and nothing else to run: moves, pays prefill
    (3.0, 2, False, "a"),  # overloaded (past the horizon) and a finishes first: moves
    (3.0, 100, True, "b"),  # new work waiting: a takes that, the batch stays home
])
def test_affinity_is_a_cost_not_a_pin(busy_gaps: float, horizon_gaps: float, fresh: bool,
                                      expected: str) -> None:
    cands = [kept(i, 400, "b") for i in range(4)]
    if fresh:
        cands.append(Candidate("new", 30, 64, 9.0))
    assert GAP > 0
    config = PolicyConfig(slice_length=S, max_batch=8, horizon_s=horizon_gaps * GAP)
    plan = plan_cycle(cands, [inst("a"), inst("b", busy=busy_gaps * GAP)], config)
    moved = next(p for p in plan.batches if "r0" in p.request_ids)
    assert moved.instance_id == expected
    assert moved.resumed_rows == (4 if expected == "b" else 0)
    if not fresh:
        assert moved.estimated_s == pytest.approx(
            resume_time(4, 400) if expected == "b" else fresh_time(4, 400))


def test_a_busy_home_past_the_horizon_is_waited_for_when_still_cheaper() -> None:
    cands = [kept(i, 400, "b") for i in range(4)]
    config = PolicyConfig(slice_length=S, max_batch=8, horizon_s=GAP / 4)
    # b is past the horizon by a little: waiting for it beats re-prefilling on idle a.
    waits = plan_cycle(cands, [inst("a"), inst("b", busy=GAP / 2)], config)
    assert waits.batches == [] and len(waits.unplaced) == 1
    # b is far behind: the batch moves to a.
    moves = plan_cycle(cands, [inst("a"), inst("b", busy=3 * GAP)], config)
    assert [p.instance_id for p in moves.batches] == ["a"]


def test_dead_home_or_affinity_off_means_plain_batches() -> None:
    cands = [kept(i, 400, "gone") for i in range(3)]
    plan = plan_cycle(cands, [inst("a")], CONFIG)  # "gone" is no live instance
    assert plan.batches[0].resumed_rows == 0
    assert plan.batches[0].estimated_s == pytest.approx(fresh_time(3, 400))
    cands = [kept(i, 400, "a") for i in range(3)]
    off = plan_cycle(cands, [inst("a")], PolicyConfig(slice_length=S, kv_affinity=False))
    assert off.batches[0].resumed_rows == 0
    whole = plan_cycle(cands, [inst("a")], PolicyConfig.preset("sls", max_gen_length=64))
    assert all(p.resumed_rows == 0 for p in whole.batches)


def test_home_batches_respect_the_home_budget() -> None:
    cands = [kept(i, 1000, "b") for i in range(6)]
    one_row = float(COST.slice_memory(1, 1000, S))
    plan = plan_cycle(cands, [inst("a"), inst("b", budget=2.5 * one_row)], CONFIG)
    homed = [p for p in plan.batches if p.instance_id == "b"]
    assert homed and all(len(p.request_ids) <= 2 for p in homed)
    assert sorted(r for p in plan.batches for r in p.request_ids) == [f"r{i}" for i in range(6)]


def test_max_min_without_homes_is_unchanged() -> None:
    times = np.array([[2.0, 2.0], [1.0, 1.0]])
    base = dict(times=times, sizes=np.array([1, 1]), arrival=np.zeros(2),
                urgent=np.zeros(2, bool), busy_s=np.array([0.0, 0.5]),
                requests=np.zeros(2), horizon_s=10.0)
    plain, _ = max_min(Placement(**base), 0)
    no_home, _ = max_min(Placement(**base, home=np.array([-1, -1])), 0)
    assert plain.tolist() == no_home.tolist() == [0, 1]


def test_resuming_batches_are_placed_first() -> None:
    """Started requests hold pool memory: in overload they go first, so the requests
    started after them cannot evict their K/V before their next slice."""
    times = np.array([[5.0], [1.0], [3.0]])  # the resuming batch is the shortest
    base = dict(times=times, sizes=np.ones(3), arrival=np.zeros(3),
                busy_s=np.zeros(1), requests=np.zeros(1), horizon_s=0.5)
    # Room for one batch: without a home the longest goes; with one, the resuming batch.
    plain, _ = max_min(Placement(**base, urgent=np.zeros(3, bool)), 0)
    assert plain.tolist() == [0, -1, -1]
    homed, _ = max_min(Placement(**base, urgent=np.zeros(3, bool),
                                 home=np.array([-1, 0, -1])), 0)
    assert homed.tolist() == [-1, 0, -1]
    # Even before an urgent fresh batch (running requests first, as in vLLM); urgency
    # orders the rest.
    urgent, _ = max_min(Placement(**base, urgent=np.array([False, False, True]),
                                  home=np.array([-1, 0, -1])), 0)
    assert urgent.tolist() == [-1, 0, -1]
    no_home, _ = max_min(Placement(**base, urgent=np.array([False, False, True])), 0)
    assert no_home.tolist() == [-1, -1, 0]


def test_fresh_rows_join_a_resuming_batch_on_its_instance() -> None:
    """As in continuous batching, new requests join the running ones: their prefill, then
    the resuming batch's S steps shared."""
    cands = [kept(0, 300, "b"), kept(1, 301, "b"), Candidate("n0", 280, 64, 5.0),
             Candidate("n1", 281, 64, 6.0)]
    plan = plan_cycle(cands, [inst("b")], CONFIG)
    assert len(plan.batches) == 1
    joined = plan.batches[0]
    assert sorted(joined.request_ids) == ["n0", "n1", "r0", "r1"]
    assert joined.resumed_rows == 2 and joined.padded_len == 301
    expected = float(COST.slice_time(2, 281, 1)) + resume_time(4, 301)
    assert joined.estimated_s == pytest.approx(expected)
    assert expected < resume_time(2, 301) + fresh_time(2, 281)  # cheaper than apart


def test_joining_respects_memory_and_the_batch_cap() -> None:
    cands = [kept(0, 300, "b"), Candidate("n0", 280, 64, 5.0)]
    two = float(COST.slice_memory(2, 300, S))
    tight = plan_cycle(cands, [inst("b", budget=two - 1)], CONFIG)
    assert sorted(len(p.request_ids) for p in tight.batches + tight.unplaced) == [1, 1]
    capped = plan_cycle(cands, [inst("b")], PolicyConfig(slice_length=S, max_batch=1))
    assert all(len(p.request_ids) == 1 for p in capped.batches)
    off = plan_cycle(cands, [inst("b")], PolicyConfig(slice_length=S, kv_affinity=False))
    assert len(off.batches) == 1 and off.batches[0].resumed_rows == 0


def test_an_overloaded_home_keeps_its_batch_while_others_have_new_work() -> None:
    """A move re-prefills: with fresh work waiting, the open instance takes that instead."""
    times = np.array([[1.0, 0.2], [0.5, 0.5]])  # batch 0 resumes on 1, batch 1 is new
    base = dict(times=times, sizes=np.ones(2), arrival=np.zeros(2), busy_s=np.array([0.0, 5.0]),
                requests=np.zeros(2), horizon_s=2.0, home=np.array([1, -1]))
    assign, _ = max_min(Placement(**base, urgent=np.zeros(2, bool)), 0)
    assert assign.tolist() == [-1, 0]  # the resuming batch waits, the new one runs on 0
    # Without new work the cost decides: 0 finishes it first, it moves.
    alone, _ = max_min(Placement(**{**base, "times": times[:1], "sizes": np.ones(1),
                                    "arrival": np.zeros(1), "home": np.array([1])},
                                 urgent=np.zeros(1, bool)), 0)
    assert alone.tolist() == [0]
