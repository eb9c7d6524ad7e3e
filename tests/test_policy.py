"""Scheduling policies: batching optimality, offloading rules, fairness, plan invariants."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from services.scheduler.bench import (
    sample_lengths,
    scheduler_bench_command,
    synthetic_candidates,
)
from shared.policy import planning
from shared.policy.batching import (
    greedy_partition,
    largest_fitting,
    optimal_partition,
    scls_batching,
    slice_cost_matrix,
)
from shared.policy.config import PolicyConfig, with_cursor
from shared.policy.costmodel import ACT_FEATURES, PREFILL_BASE, CostModel
from shared.policy.offloading import (
    Placement,
    fcfs_ect,
    least_requests,
    max_min,
    prefill_first,
    round_robin,
)
from shared.policy.planning import plan_cycle, select_candidates, split_never_fit
from shared.policy.presets import POLICIES
from shared.policy.types import BatchPlan, Candidate, CandidatePool, FormedBatch, InstanceView

GIB = 2**30


@dataclass(frozen=True)
class LinearCost:
    """Synthetic slice model of docs/design.md §2 (prefill + closed-form decode sum)."""

    p: tuple[float, float, float, float] = (0.02, 1e-3, 2e-5, 4e-6)
    d: tuple[float, float, float, float] = (0.01, 2e-4, 1e-6, 2e-7)
    kv: float = 1000.0  # bytes per token
    act: float = 300.0  # activation bytes per context token
    default_s: int = 8

    def slice_time(self, b, l, s=None):  # noqa: E741
        s = self.default_s if s is None else s
        b, l = np.asarray(b, dtype=float), np.asarray(l, dtype=float)  # noqa: E741
        p0, p1, p2, p3 = self.p
        d0, d1, d2, d3 = self.d
        mid = l + s / 2
        return p0 + p1 * b + p2 * l + p3 * b * l + (s - 1) * (d0 + d1 * b + d2 * mid + d3 * b * mid)

    def slice_memory(self, b, l, s=None):  # noqa: E741
        s = self.default_s if s is None else s
        b, l = np.asarray(b, dtype=float), np.asarray(l, dtype=float)  # noqa: E741
        return b * (l + s + 1) * self.kv + self.act * b * l

    def resume_memory(self, b, l, s=None):  # noqa: E741
        return self.slice_memory(b, l, s)

    def mixed_memory(self, b, l, s, fresh_rows, fresh_len):  # noqa: E741
        return self.slice_memory(b, l, s)

    def resume_time(self, b, l, s=None):  # noqa: E741
        s = self.default_s if s is None else s
        b, l = np.asarray(b, dtype=float), np.asarray(l, dtype=float)  # noqa: E741
        d0, d1, d2, d3 = self.d
        mid = l + (s - 1) / 2
        return s * (d0 + d1 * b + d2 * mid + d3 * b * mid)


COST = LinearCost()
FAST = LinearCost(p=(0.01, 5e-4, 1e-5, 2e-6), d=(0.005, 1e-4, 5e-7, 1e-7))


def cand(i: int, length: int, arrival: float | None = None) -> Candidate:
    return Candidate(f"r{i}", length, 64, float(i) if arrival is None else arrival)


def inst(name: str, budget: float = 1e12, cost: LinearCost = COST, busy: float = 0.0,
         requests: int = 0, context_limit: int = 100_000) -> InstanceView:
    return InstanceView(name, cost, int(budget), context_limit, busy, requests, 0)


def compositions(n: int):
    """Every split of ``n`` ordered items into consecutive non-empty runs, as sizes."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        sizes, run = [], 1
        for cut in cuts:
            if cut:
                sizes.append(run)
                run = 1
            else:
                run += 1
        yield [*sizes, run]


def partition_cost(costs: np.ndarray, sizes: list[int]) -> float:
    total, end = 0.0, 0
    for k in sizes:
        end += k
        total += costs[end - 1, k - 1] if k <= costs.shape[1] else np.inf
    return total


def brute_force(costs: np.ndarray) -> float:
    return min(partition_cost(costs, sizes) for sizes in compositions(len(costs)))


# --- batching: the dynamic programme ---------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_batch", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("memory", ["ample", "tight"])
def test_scls_dp_equals_brute_force(seed: int, max_batch: int, memory: str) -> None:
    """Through the policy (shuffled arrivals in), against a brute force on the model itself."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    lens = rng.integers(1, 4000, n)
    slice_length = 8
    # "tight": about three rows of the median length fit, fewer long ones, more short ones.
    capacity = 1e12 if memory == "ample" else float(
        COST.slice_memory(3, np.median(lens), slice_length))
    sorted_lens = np.sort(lens)

    def model_cost(sizes: list[int]) -> float:
        total, end = 0.0, 0
        for k in sizes:
            end += k
            padded = sorted_lens[end - 1]
            if k > max_batch or COST.slice_memory(k, padded, slice_length) > capacity:
                return np.inf
            total += float(COST.slice_time(k, padded, slice_length))
        return total

    best = min(model_cost(sizes) for sizes in compositions(n))
    cands = [cand(i, int(x), float(rng.uniform(0, 10))) for i, x in enumerate(lens)]
    if not np.isfinite(best):  # the longest fits nowhere even alone: the policy refuses
        with pytest.raises(ValueError):
            scls_batching(CandidatePool.of(cands), COST, int(capacity), slice_length, max_batch)
        return
    batches = scls_batching(CandidatePool.of(cands), COST, int(capacity), slice_length,
                            max_batch)
    by_id = {c.id: c.context_len for c in cands}
    assert [by_id[r] for b in batches for r in b.request_ids] == sorted_lens.tolist()
    sizes = [len(b.request_ids) for b in batches]
    assert model_cost(sizes) == pytest.approx(best, rel=1e-12)
    if memory == "tight" and n >= 4:
        assert max(sizes) < n  # the memory limit really was binding


def test_slice_cost_matrix_masks_batches_before_the_first_request() -> None:
    costs = slice_cost_matrix(np.array([5, 6, 7, 8, 9]), COST, 1e12, 8, 4)
    for j in range(4):
        assert np.isinf(costs[j, j + 1:]).all() and np.isfinite(costs[j, :j + 1]).all()
    assert np.isfinite(costs[4]).all()


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_optimal_partition_exact_for_any_cost_matrix(seed: int, width: int) -> None:
    """Across several DP blocks (n > width), with arbitrary costs and infeasible holes."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 13))
    costs = rng.uniform(0.0, 10.0, (n, width))
    costs[rng.random((n, width)) < 0.3] = np.inf
    costs[:, 0] = rng.uniform(0.0, 10.0, n)  # singletons always feasible
    costs[np.arange(width)[None, :] >= np.arange(1, n + 1)[:, None]] = np.inf
    sizes = optimal_partition(costs)
    assert sum(sizes) == n
    assert partition_cost(costs, sizes) == pytest.approx(brute_force(costs), rel=1e-12)


def reference_dp(costs: np.ndarray) -> float:
    """The textbook O(n * m) recurrence, one position at a time."""
    f = [0.0]
    for j in range(len(costs)):
        f.append(min(f[j + 1 - k] + costs[j, k - 1]
                     for k in range(1, min(j + 1, costs.shape[1]) + 1)))
    return f[-1]


@pytest.mark.parametrize(("n", "width"), [(700, 32), (50, 13), (301, 20), (97, 64)])
def test_optimal_partition_matches_reference_dp_on_large_input(n: int, width: int) -> None:
    rng = np.random.default_rng(n)
    lens = np.sort(rng.integers(1, 6000, n))
    costs = slice_cost_matrix(lens, COST, 2e8, 8, width)
    sizes = optimal_partition(costs)
    assert sum(sizes) == n
    assert partition_cost(costs, sizes) == pytest.approx(reference_dp(costs), rel=1e-12)
    noisy = rng.uniform(0.0, 5.0, (n, width))  # no structure at all, with holes
    noisy[rng.random((n, width)) < 0.4] = np.inf
    noisy[:, 0] = 1.0
    sizes = optimal_partition(noisy)
    assert partition_cost(noisy, sizes) == pytest.approx(reference_dp(noisy), rel=1e-12)


def test_optimal_partition_rejects_infeasible_input() -> None:
    with pytest.raises(ValueError, match="no feasible partition"):
        optimal_partition(np.array([[1.0, np.inf], [np.inf, np.inf]]))
    too_long = np.array([10, 20, 5000])  # the last does not fit even alone
    capacity = float(COST.slice_memory(1, 1000, 8))
    with pytest.raises(ValueError, match="no feasible partition"):
        optimal_partition(slice_cost_matrix(too_long, COST, capacity, 8, 4))


@pytest.mark.parametrize("seed", range(5))
def test_largest_fitting_matches_a_full_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 5000, 200).astype(float)
    capacity = float(COST.slice_memory(4, 2500, 8))
    max_batch = int(rng.integers(1, 40))
    got = largest_fitting(lens, COST, capacity, 8, max_batch)
    sizes = np.arange(1, max_batch + 1)
    fits = COST.slice_memory(sizes[None, :], lens[:, None], 8) <= capacity
    assert got.tolist() == fits.sum(axis=1).tolist()
    assert largest_fitting(np.array([1e9]), COST, capacity, 8, 8).tolist() == [0]


def test_scls_batches_are_contiguous_runs_of_sorted_lengths() -> None:
    rng = np.random.default_rng(3)
    cands = [cand(i, int(x)) for i, x in enumerate(rng.integers(1, 3000, 60))]
    batches = scls_batching(CandidatePool.of(cands), COST, 10**8, 8, 8)
    by_id = {c.id: c for c in cands}
    flat = [rid for b in batches for rid in b.request_ids]
    assert sorted(flat) == sorted(by_id)
    assert [by_id[r].context_len for r in flat] == sorted(c.context_len for c in cands)
    for b in batches:
        assert b.padded_len == max(by_id[r].context_len for r in b.request_ids)
        assert COST.slice_memory(len(b.request_ids), b.padded_len, 8) <= 10**8


# --- batching: arrival order ---------------------------------------------------------

def test_greedy_partition_fills_each_batch_to_the_memory_or_size_limit() -> None:
    lens = np.array([100, 3000, 200, 200, 50, 2500, 10, 10, 10, 10, 10])
    capacity = float(COST.slice_memory(3, 2000, 8))
    sizes = greedy_partition(lens, COST, capacity, 8, 4)
    end = 0
    for k in sizes:
        start, end = end, end + k
        assert COST.slice_memory(k, lens[start:end].max(), 8) <= capacity
        if end < len(lens) and k < 4:  # one more would not have fit
            assert COST.slice_memory(k + 1, lens[start:end + 1].max(), 8) > capacity
    assert sum(sizes) == len(lens)


def test_fcfs_fixed_runs_whole_generation_in_arrival_order() -> None:
    cands = [cand(i, length) for i, length in enumerate([900, 10, 500, 20, 700, 30])]
    shuffled = [cands[i] for i in (3, 0, 5, 1, 4, 2)]
    g = 256
    capacity = float(COST.slice_memory(3, 900, g))  # three rows of the whole generation
    config = PolicyConfig.preset("sls", max_gen_length=g, slice_length=8, max_batch=4,
                                 horizon_s=1e9)
    plan = plan_cycle(shuffled, [inst("a", capacity)], config)
    assert [b.request_ids for b in plan.batches] == [("r0", "r1", "r2"), ("r3", "r4", "r5")]
    for b in plan.batches:
        assert b.slice_length == g
        assert b.estimated_bytes == int(COST.slice_memory(len(b.request_ids), b.padded_len, g))
        assert b.estimated_s == pytest.approx(
            float(COST.slice_time(len(b.request_ids), b.padded_len, g)))


def test_single_batching_makes_one_batch_per_request() -> None:
    cands = [cand(i, 100 + i) for i in range(5)]
    plan = plan_cycle(cands, [inst("a"), inst("b")], PolicyConfig.preset("ils", horizon_s=1e9))
    assert sorted(b.request_ids for b in plan.batches) == [(c.id,) for c in cands]
    assert {b.slice_length for b in plan.batches} == {PolicyConfig().max_gen_length}


# --- candidates and fairness ---------------------------------------------------------

def test_oldest_request_is_always_a_candidate() -> None:
    cands = [cand(i, 100, arrival=10.0 + i) for i in range(50)] + [cand(99, 5000, arrival=1.0)]
    assert [c.id for c in select_candidates(cands, 1)] == ["r99"]
    plan = plan_cycle(cands, [inst("a")], PolicyConfig(candidate_limit=1, horizon_s=1e9))
    assert [b.request_ids for b in plan.batches] == [("r99",)]


def test_requeued_request_keeps_its_place_by_arrival() -> None:
    # r_old came back after a slice: longer context now, but its first arrival is oldest.
    fresh = [cand(i, 50, arrival=100.0 + i) for i in range(6)]
    requeued = Candidate("r_old", 1500, 32, arrival=5.0)
    chosen = select_candidates([*fresh, requeued], 3)
    assert [c.id for c in chosen] == ["r_old", "r0", "r1"]
    config = PolicyConfig(batching="fcfs", max_batch=2, horizon_s=1e9)
    plan = plan_cycle([*fresh, requeued], [inst("a")], config)
    assert plan.batches[0].request_ids == ("r_old", "r0")


def test_overdue_batch_is_placed_before_longer_ones() -> None:
    # Room for one batch only; max-min would pick the longest, the age bound wins.
    old_short = cand(0, 10, arrival=0.0)
    new_long = [cand(i, 3000, arrival=100.0 + i) for i in range(1, 5)]
    config = PolicyConfig(max_batch=4, horizon_s=1e-9, max_wait_s=30.0)
    instances = [inst("a", busy=0.0)]
    plan = plan_cycle([old_short, *new_long], instances, config, now=100.0)
    assert [b.request_ids for b in plan.batches] == [("r0",)]
    without_age = plan_cycle([old_short, *new_long], instances, config, now=None)
    assert without_age.batches[0].request_ids == ("r1", "r2", "r3", "r4")
    assert [b.request_ids for b in without_age.unplaced] == [("r0",)]


def test_never_fit_requests_are_returned_separately() -> None:
    small = inst("small", budget=COST.slice_memory(1, 1000, 32), context_limit=2000)
    big = inst("big", budget=COST.slice_memory(1, 3000, 32), context_limit=4000)
    cands = [cand(0, 500), cand(1, 2500), cand(2, 3500), cand(3, 5000)]
    runnable, never = split_never_fit(CandidatePool.of(cands), [small, big], 32)
    assert [c.id for c in runnable.candidates] == ["r0", "r1"]
    assert [c.id for c in never.candidates] == ["r2", "r3"]  # memory, then context limit
    plan = plan_cycle(cands, [small, big], PolicyConfig(horizon_s=1e9))
    assert [c.id for c in plan.never_fit] == ["r2", "r3"]
    # r1 is too long for the tightest instance: it runs alone, on the one it fits.
    placed = {b.request_ids: b.instance_id for b in plan.batches}
    assert placed[("r1",)] == "big"


def test_requests_too_long_for_the_tightest_instance_alone() -> None:
    small = inst("small", budget=COST.slice_memory(1, 1000, 32))
    big = inst("big", budget=COST.slice_memory(8, 3000, 32))
    plan = plan_cycle([cand(i, 2000 + i) for i in range(3)], [small, big],
                      PolicyConfig(horizon_s=1e9))
    assert sorted(b.request_ids for b in plan.batches) == [("r0",), ("r1",), ("r2",)]
    assert {b.instance_id for b in plan.batches} == {"big"}


def test_no_instances_means_nothing_planned_and_nothing_failed() -> None:
    plan = plan_cycle([cand(0, 10**6)], [], PolicyConfig())
    assert plan.batches == [] and plan.never_fit == []


# --- offloading ----------------------------------------------------------------------

def problem(times, busy, horizon=np.inf, requests=None, sizes=None, urgent=None) -> Placement:
    times = np.asarray(times, dtype=float)
    n_batches = len(times)
    return Placement(
        times=times,
        sizes=np.ones(n_batches) if sizes is None else np.asarray(sizes),
        arrival=np.arange(n_batches, dtype=float),
        urgent=np.zeros(n_batches, bool) if urgent is None else np.asarray(urgent),
        busy_s=np.asarray(busy, dtype=float),
        requests=np.zeros(len(busy)) if requests is None else np.asarray(requests),
        horizon_s=horizon,
    )


@pytest.mark.parametrize("seed", range(10))
def test_max_min_never_leaves_an_instance_idle_beside_a_double_load(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_inst, n_batches = int(rng.integers(2, 6)), int(rng.integers(2, 15))
    times = np.repeat(rng.uniform(0.1, 5.0, (n_batches, 1)), n_inst, axis=1)
    assign, _ = max_min(problem(times, np.zeros(n_inst)), 0)
    counts = np.bincount(assign, minlength=n_inst)
    assert assign.min() >= 0
    assert not (counts.min() == 0 and counts.max() >= 2)


def test_max_min_gives_longest_batch_to_least_loaded_instance() -> None:
    times = np.array([[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]])
    assign, cursor = max_min(problem(times, [0.5, 0.0]), 3)
    # 5 -> b (0.0); then a is 0.5 vs b 5.0: 2 -> a, 1 -> a (2.5 vs 5.0).
    assert assign.tolist() == [0, 1, 0]
    assert cursor == 3


def test_max_min_estimates_each_batch_on_its_target_instance() -> None:
    cands = [cand(i, 400 + i) for i in range(4)]
    config = PolicyConfig(max_batch=4, horizon_s=1e9)
    plan = plan_cycle(cands, [inst("slow", cost=COST), inst("fast", cost=FAST)], config)
    (batch,) = plan.batches
    assert batch.instance_id == "fast"
    assert batch.estimated_s == pytest.approx(float(FAST.slice_time(4, 403, 32)))
    # Once the fast instance is busy enough, the slow one is where the batch ends soonest.
    busy_fast = [inst("slow", cost=COST), inst("fast", cost=FAST, busy=100.0)]
    (batch,) = plan_cycle(cands, busy_fast, config).batches
    assert batch.instance_id == "slow"
    assert batch.estimated_s == pytest.approx(float(COST.slice_time(4, 403, 32)))


# One instance, horizon 3 s: batches 0, 1, 3 are fresh (arrived at 0, 1, 3 s), batch 2
# resumes K/V kept on the instance (arrived at 2 s). What each order places before the
# instance closes; a resuming batch never moves while fresh work waits.
ORDER_CASES = [
    # max-min: resuming first, then longest (1: 2.5 s) -> closed at 3.5 s
    (max_min, [-1, 0, 0, -1]),
    # fcfs-ect: resuming first, then oldest: 0, then 1 -> closed at 4.5 s
    (fcfs_ect, [0, 0, 0, -1]),
    # prefill-first: fresh oldest first: 0, then 1 -> closed; the resuming batch waits
    (prefill_first, [0, 0, -1, -1]),
]


@pytest.mark.parametrize(("offload", "expected"), ORDER_CASES,
                         ids=["max-min", "fcfs-ect", "prefill-first"])
def test_each_order_places_what_its_rule_says(offload, expected) -> None:
    times = np.array([[1.0], [2.5], [1.0], [0.5]])
    placement = replace(problem(times, [0.0], horizon=3.0), home=np.array([-1, -1, 0, -1]))
    assign, cursor = offload(placement, 7)
    assert assign.tolist() == expected
    assert cursor == 7


def test_batch_goes_only_where_it_fits() -> None:
    times = np.array([[np.inf, 2.0, np.inf]])
    for offload in (max_min, fcfs_ect, prefill_first, round_robin, least_requests):
        assign, _ = offload(problem(times, [0.0, 9.0, 0.0]), 0)
        assert assign.tolist() == [1]
    assign, _ = max_min(problem(np.array([[np.inf, np.inf]]), [0.0, 0.0]), 0)
    assert assign.tolist() == [-1]


def test_memory_is_checked_on_each_instance_own_model() -> None:
    # "b" has more budget but a heavier memory model (say, a bigger KV dtype): the batch
    # formed for the tightest budget ("a") must still not land on "b" where it won't fit.
    heavy = LinearCost(kv=5000.0)
    cands = [cand(i, 1000) for i in range(4)]
    budget_a = float(COST.slice_memory(4, 1000, 32))
    instances = [inst("a", budget_a, busy=1.0), inst("b", budget_a * 1.1, cost=heavy)]
    for offload in ("max-min", "fcfs-ect", "prefill-first", "round-robin", "least-requests"):
        config = PolicyConfig(offloading=offload, max_batch=4, horizon_s=1e9)
        (batch,) = plan_cycle(cands, instances, config).batches
        assert batch.instance_id == "a"


def test_plan_lists_batches_oldest_first() -> None:
    # Lengths fall as arrivals rise: scls forms batches by length, dispatch is by age.
    cands = [cand(i, 3000 - 100 * i) for i in range(12)]
    plan = plan_cycle(cands, [inst("a")], PolicyConfig(max_batch=4, horizon_s=1e9))
    firsts = [min(int(r[1:]) for r in b.request_ids) for b in plan.batches]
    assert len(firsts) > 1 and firsts == sorted(firsts)


def test_round_robin_cursor_persists_across_cycles() -> None:
    times = np.ones((2, 3))
    assign, cursor = round_robin(problem(times, np.zeros(3)), 1)
    assert assign.tolist() == [1, 2] and cursor == 0
    assign, cursor = round_robin(problem(times, np.zeros(3)), cursor)
    assert assign.tolist() == [0, 1] and cursor == 2
    # Through plan_cycle: instances in id order, cursor carried by the plan.
    config = PolicyConfig(batching="fcfs", offloading="round-robin", max_batch=1, horizon_s=1e9)
    instances = [inst("c"), inst("a"), inst("b")]
    targets = []
    for i in range(4):
        plan = plan_cycle([cand(i, 10)], instances, config)
        targets.append(plan.batches[0].instance_id)
        config = with_cursor(config, plan)
    assert targets == ["a", "b", "c", "a"]


def test_round_robin_skips_instances_past_the_horizon() -> None:
    assign, cursor = round_robin(problem(np.ones((3, 3)), [0.0, 5.0, 0.0], horizon=2.0), 0)
    assert assign.tolist() == [0, 2, 0] and cursor == 1


@pytest.mark.parametrize(
    ("requests", "sizes", "expected"),
    [
        ([3, 1, 2], [1], [1]),  # fewest requests
        ([2, 2, 2], [1], [0]),  # tie: first in stable order
        ([0, 1, 5], [4, 1, 1], [0, 1, 1]),  # counts grow with what this cycle assigns
    ],
)
def test_least_requests(requests, sizes, expected) -> None:
    p = problem(np.ones((len(sizes), 3)), np.zeros(3), requests=requests, sizes=sizes)
    assign, cursor = least_requests(p, 7)
    assert assign.tolist() == expected and cursor == 7


@pytest.mark.parametrize("offload", ["max-min", "round-robin", "least-requests"])
def test_horizon_is_respected(offload: str) -> None:
    # Each batch is ~0.46 s. An instance takes batches only while below the horizon:
    # "a" (idle) takes ceil(1.2 / t), "b" (1.0 s of work) one, "c" (past it) none.
    cands = [cand(i, 2000) for i in range(40)]
    config = PolicyConfig(batching="fcfs", offloading=offload, max_batch=1, horizon_s=1.2)
    instances = [inst("a", busy=0.0), inst("b", busy=1.0), inst("c", busy=1.3)]
    plan = plan_cycle(cands, instances, config)
    per_batch = float(COST.slice_time(1, 2000, 32))
    counts = {i.id: sum(b.instance_id == i.id for b in plan.batches) for i in instances}
    assert counts == {"a": int(np.ceil(1.2 / per_batch)), "b": 1, "c": 0}
    assert len(plan.unplaced) == len(cands) - len(plan.batches)


def test_every_instance_past_the_horizon_means_no_batch() -> None:
    cands = [cand(0, 100), cand(1, 10**6)]
    plan = plan_cycle(cands, [inst("a", busy=5.0)], PolicyConfig(horizon_s=5.0))
    assert plan.batches == [] and plan.unplaced == []
    assert [c.id for c in plan.never_fit] == ["r1"]  # still reported: it can never run


@pytest.mark.parametrize("offload", ["round-robin", "least-requests"])
def test_baselines_place_oldest_batches_first(offload: str) -> None:
    # scls forms batches by length (newest requests shortest here); with room for one
    # batch, the baselines place the batch holding the oldest request.
    cands = [cand(i, 3000 - 200 * i) for i in range(8)]
    config = PolicyConfig(offloading=offload, max_batch=4, horizon_s=1e-9)
    plan = plan_cycle(cands, [inst("a")], config)
    assert [b.request_ids for b in plan.batches] == [("r3", "r2", "r1", "r0")]


# --- the whole cycle -----------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(POLICIES))
def test_plan_cycle_places_each_request_at_most_once(preset: str) -> None:
    rng = np.random.default_rng(11)
    cands = [cand(i, int(x), float(rng.uniform(0, 50)))
             for i, x in enumerate(rng.integers(1, 6000, 300))]
    instances = [inst(f"i{k}", budget=rng.uniform(2e7, 8e7), busy=rng.uniform(0, 3),
                      cost=COST if k % 2 else FAST) for k in range(6)]
    config = PolicyConfig.preset(preset, candidate_limit=250, horizon_s=4.0)
    plan = plan_cycle(cands, instances, config, now=60.0)
    placed = [r for b in plan.batches for r in b.request_ids]
    pending = [r for b in plan.unplaced for r in b.request_ids]
    never = [c.id for c in plan.never_fit]
    assert len(set(placed + pending + never)) == len(placed + pending + never) == 250
    budget = {i.id: i.memory_budget_bytes for i in instances}
    for b in plan.batches:
        assert b.estimated_bytes <= budget[b.instance_id]
        assert len(b.request_ids) <= config.max_batch
    assert plan.batches  # something was placed


def test_policy_config_validates_names() -> None:
    with pytest.raises(ValueError, match="unknown batching"):
        PolicyConfig(batching="nope")
    with pytest.raises(ValueError, match="unknown offloading"):
        PolicyConfig(offloading="nope")
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig.preset("nope")
    with pytest.raises(ValueError, match="max_batch"):
        PolicyConfig(max_batch=0)
    with pytest.raises(ValueError, match="horizon_s"):
        PolicyConfig(horizon_s=0.0)
    assert PolicyConfig.preset("sls").batch_slice_length == PolicyConfig().max_gen_length


# --- scheduler-bench ------------------------------------------------------------------

# The vendored Azure trace (data/traces/README.md); always in the repository, never skipped.
TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure_llm_2023_conv.csv"


@pytest.mark.parametrize("use_trace", [False, True])
def test_scheduler_bench_writes_its_json(tmp_path: Path, use_trace: bool) -> None:
    out = tmp_path / "bench.json"
    scheduler_bench_command(pending=300, instances=3, json_file=out, repeat=2,
                            trace=TRACE if use_trace else None, policy="scls",
                            candidate_limit=None, seed=1)
    result = json.loads(out.read_text())
    assert result["pending"] == 300 and result["instances"] == 3
    assert 0 < result["median_ms"] <= result["p90_ms"]
    assert result["candidates_seen"] == 300 and result["placed"] >= 1


@pytest.mark.parametrize(("rows", "admits_all_it_can"), [(0, True), (60, False)])
def test_scheduler_bench_times_the_running_set_admission(
    tmp_path: Path, rows: int, admits_all_it_can: bool
) -> None:
    """Empty sets take many rows; sets of 60 rows at 1,500 tokens (their next slice near
    the 60 GB budget) take few or none."""
    out = tmp_path / "admit.json"
    scheduler_bench_command(pending=300, instances=3, json_file=out, repeat=2, trace=None,
                            policy="scls", candidate_limit=None, seed=1, running_rows=rows)
    result = json.loads(out.read_text())
    assert result["running_rows"] == rows and 0 < result["median_ms"] <= result["p90_ms"]
    assert (result["admitted"] > 30) is admits_all_it_can


def test_scheduler_bench_times_the_continuation_cycle(tmp_path: Path) -> None:
    """The real scheduler's running-set cycle: kept rows continue on their instance, fresh
    ones fill the open sets."""
    out = tmp_path / "continue.json"
    scheduler_bench_command(pending=300, instances=3, json_file=out, repeat=2, trace=None,
                            policy="scls", candidate_limit=None, seed=1, continuation=True)
    result = json.loads(out.read_text())
    assert 0 < result["median_ms"] <= result["p90_ms"]
    assert result["continuing"] > 0 and result["admitted"] > 0


def test_bench_lengths_follow_the_trace_statistics() -> None:
    prompt, generated = sample_lengths(100_000, np.random.default_rng(0))
    assert np.mean(prompt) == pytest.approx(1155, rel=0.03)
    assert np.median(prompt) == pytest.approx(1020, rel=0.03)
    assert np.percentile(prompt, 99) == pytest.approx(4142, rel=0.03)
    assert np.median(generated) == pytest.approx(129, rel=0.05)
    # Candidates carry the tokens generated so far: some are re-queued, a few slices in.
    first, _ = sample_lengths(1000, np.random.default_rng(5))
    context = np.array([c.context_len for c in synthetic_candidates(
        1000, np.random.default_rng(5), 32)])
    assert (context >= first).all() and 0.2 < np.mean(context > first) < 0.9


def test_joined_guests_are_priced_with_every_guests_prefill() -> None:
    """Two one-row guests join a resuming batch of two (a prefill of 1.1 s added to a 0.4 s
    resume beats each guest's own 1.4 s slice). The joined slice prefills both guests at
    once, so its peak counts both guests' activations: 4 x (100 + 4 + 1) cached positions
    plus 2 x 100 prefill bytes = 620, not the 520 of the last guest alone."""
    cost = CostModel(
        slice_length=4, prefill_features=PREFILL_BASE, prefill_coef=(1.0, 0.0, 0.001, 0.0),
        decode_coef=(0.1, 0.0, 0.0, 0.0), kv_bytes_per_token=1, act_features=ACT_FEATURES,
        act_coef=(0.0, 0.0, 1.0, 0.0), resume_act_coef=(0.0, 0.0, 0.0, 0.0), mem_margin=1.0,
        source="test",
    )
    host = BatchPlan("a", ("h1", "h2"), 100, 4, 0.4, 210, resumed_rows=2)
    guests = [FormedBatch(("g1",), 100, 4, 1.0), FormedBatch(("g2",), 100, 4, 2.0)]
    plans, left = planning.join_resumed([host], guests, [InstanceView("a", cost, 10**6, 4096)],
                                        max_batch=4)
    assert left == [] and len(plans) == 1
    joined = plans[0]
    assert joined.request_ids == ("h1", "h2", "g1", "g2")
    assert joined.estimated_bytes == 620
    assert joined.estimated_bytes == int(cost.mixed_memory(4, 100, 4, 2, 100))


# --- masking cost: constrained rows are priced per row --------------------------------------

MASK_S = 0.002  # seconds a constrained row adds per sampled token


@pytest.mark.parametrize(("constrained", "per_token", "added"), [
    (0, MASK_S, 0.0),  # free rows pay nothing
    (1, MASK_S, 1 * 32 * MASK_S),  # a row samples S = 32 tokens, each masked
    (4, MASK_S, 4 * 32 * MASK_S),
    (4, 0.0, 0.0),  # an instance whose profile did not measure it
])
def test_constrained_rows_add_their_masks_to_the_estimate(constrained: int, per_token: float,
                                                          added: float) -> None:
    cands = [replace(cand(i, 400 + i), constrained=i < constrained) for i in range(4)]
    config = PolicyConfig(max_batch=4, horizon_s=1e9)
    (batch,) = plan_cycle(cands, [replace(inst("a"), grammar_token_s=per_token)],
                          config).batches
    assert batch.constrained_rows == constrained
    assert batch.estimated_s == pytest.approx(float(COST.slice_time(4, 403, 32)) + added)


def test_constrained_batches_go_where_masks_cost_least() -> None:
    """Two instances alike but for what a mask costs them (a worker whose CPU is slower, or
    busier): a constrained batch goes to the cheaper one, a free batch to the first."""
    config = PolicyConfig(max_batch=4, horizon_s=1e9)
    views = [replace(inst("a"), grammar_token_s=0.01), replace(inst("b"), grammar_token_s=0.0)]
    free = [cand(i, 400) for i in range(4)]
    constrained = [replace(c, constrained=True) for c in free]
    assert plan_cycle(free, views, config).batches[0].instance_id == "a"
    (batch,) = plan_cycle(constrained, views, config).batches
    assert batch.instance_id == "b"
    assert batch.estimated_s == pytest.approx(float(COST.slice_time(4, 400, 32)))


def test_joined_guests_bring_their_masks() -> None:
    """A constrained guest joining a resuming batch adds its prefill, the shared steps and
    its own masks (S tokens x 2 rows); the joined plan counts its constrained rows."""
    cost = CostModel(
        slice_length=4, prefill_features=PREFILL_BASE, prefill_coef=(1.0, 0.0, 0.001, 0.0),
        decode_coef=(0.1, 0.0, 0.0, 0.0), kv_bytes_per_token=1, act_features=ACT_FEATURES,
        act_coef=(0.0, 0.0, 1.0, 0.0), resume_act_coef=(0.0, 0.0, 0.0, 0.0), mem_margin=1.0,
        source="test", grammar_token_s=0.01,
    )
    host = BatchPlan("a", ("h1",), 100, 4, 0.4 + 4 * 0.01, 210, resumed_rows=1,
                     constrained_rows=1)
    guest = FormedBatch(("g1", "g2"), 100, 4, 1.0, constrained_rows=2)
    view = InstanceView("a", cost, 10**6, 4096, grammar_token_s=cost.grammar_token_s)
    plans, left = planning.join_resumed([host], [guest], [view], max_batch=4)
    assert left == [] and plans[0].constrained_rows == 3
    expected = (float(cost.resume_time(3, 100, 4)) + float(cost.prefill_time(2, 100))
                + float(cost.grammar_time(3, 4)))
    assert plans[0].estimated_s == pytest.approx(expected)
