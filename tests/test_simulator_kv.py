"""The simulator's KV pool, affinity through the shared plan_cycle, and the vLLM-like ILS."""

from __future__ import annotations

from dataclasses import replace

import pytest

import services.simulator.engine as sim_engine
from services.simulator import SimInstance, SimOptions, simulate
from services.simulator.kv import SimKvPool
from shared.bench.workload import WorkItem, synthetic_workload, with_arrivals
from shared.policy import planning
from shared.settings import Settings
from tests.test_simulator import ROUND, items, settings

# ROUND, settings and items as in tests/test_simulator.py: a prefill costs 1 s + 1 ms per
# padded token, a decode step 0.1 s whatever the batch; one byte per cached position. A
# resumed slice of S steps is estimated at 0.1 * S s (no prefill), a re-prefilled one at
# 1 + 0.001 * l + 0.1 * (S - 1).


def instances(n: int, budget: int = 10**9, pool: int | None = None) -> list[SimInstance]:
    return [SimInstance(chr(ord("a") + k), ROUND, budget, 4096, kv_pool_bytes=pool)
            for k in range(n)]


def multi_slice_workload(n: int = 40, seed: int = 5) -> list[WorkItem]:
    """Requests of 3-12 slices of S = 4, arriving over a few seconds."""
    wl = with_arrivals(synthetic_workload(n, seed, length_scale=0.05), "poisson", 4.0, seed)
    return [replace(w, output_tokens=12 + (w.index * 7) % 37) for w in wl]


@pytest.mark.parametrize(("ops", "capacity", "order", "evicted"), [
    # (op, request, bytes): put / take / discard; the pool's LRU order after them all.
    ([("put", 1, 4), ("put", 2, 4), ("put", 3, 2)], 10, [1, 2, 3], []),
    ([("put", 1, 4), ("put", 2, 4), ("put", 3, 4)], 10, [2, 3], [1]),  # 1 is the oldest
    ([("put", 1, 4), ("put", 2, 4), ("put", 1, 4), ("put", 3, 4)], 10, [1, 3], [2]),
    ([("put", 1, 4), ("put", 2, 4), ("take", 1, 0), ("put", 3, 6)], 10, [2, 3], []),
    ([("put", 1, 3), ("put", 2, 3), ("put", 3, 3), ("put", 4, 9)], 10, [4], [1, 2, 3]),
    ([("put", 1, 3), ("put", 2, 11)], 10, [1], []),  # larger than the pool: not stored
    ([("put", 1, 3), ("discard", 1, 0), ("put", 2, 10)], 10, [2], []),
])
def test_sim_kv_pool_lru(ops: list[tuple[str, int, int]], capacity: int, order: list[int],
                         evicted: list[int]) -> None:
    pool = SimKvPool(capacity)
    gone: list[int] = []
    for op, request, nbytes in ops:
        if op == "put":
            gone += pool.put(request, nbytes)
        else:
            getattr(pool, op)(request)
    assert pool.order() == order and gone == evicted
    assert pool.evictions == len(evicted) and pool.used_bytes <= capacity
    assert not pool.take(99) and (order[0] in pool if order else True)


def test_resumed_slice_is_priced_and_run_without_prefill(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The hand-computed run of tests/test_simulator.py with retention on: request 4 comes
    back with context 404 and its K/V on a. The shared plan_cycle groups it by its home,
    prices it there with resume_time (0.4 s for 4 steps, vs 1.704 s re-prefilled) and places
    it on a; the slice feeds its last token and runs 2 decode steps, no prefill."""
    plans: list[planning.CyclePlan] = []
    budgets: set[int] = set()

    def spy(cands, views, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        budgets.update(v.memory_budget_bytes for v in views)
        plans.append(planning.plan_cycle(cands, views, *args, **kw))
        return plans[-1]

    monkeypatch.setattr(sim_engine, "plan_cycle", spy)
    wl = items([100, 100, 200, 200, 400, 400], [1, 1, 2, 1, 6, 2])
    res = simulate(wl, instances(2), settings())
    resumed = [b for p in plans for b in p.batches if b.request_ids == ("4",)]
    assert len(resumed) == 1
    batch = resumed[0]
    assert batch.instance_id == "a" and batch.resumed_rows == 1
    assert batch.estimated_s == pytest.approx(float(ROUND.resume_time(1, 404, 4)))
    assert batch.estimated_s == pytest.approx(0.4)
    out = {o.index: o for o in res.outcomes}
    assert out[4].e2e_s == pytest.approx(1.7 + 0.2) and out[4].slices == 2
    m = res.metrics
    assert m["recomputed_tokens"] == 0 and m["kv_hits"] == 1 and m["kv_misses"] == 0
    assert m["completed"] == 6 and m["generated_tokens"] == 13
    assert m["kv_evictions"] == 0 and m["instances"][0]["kv_hits"] == 1
    # Half the budget is the pool: the batch budget the policy plans with is the rest.
    assert budgets == {10**9 - Settings().kv_pool_capacity(10**9)} == {5 * 10**8}


def test_retention_recomputes_far_fewer_tokens() -> None:
    wl = multi_slice_workload()
    on = simulate(wl, instances(3), settings(max_batch_size=4)).metrics
    off = simulate(wl, instances(3), settings(max_batch_size=4, kv_retention=False)).metrics
    for m in (on, off):
        assert m["completed"] == m["sent"] == 40 and m["failed"] == 0
        assert m["output_tokens"] == sum(w.output_tokens for w in wl)
    assert off["kv_hits"] == off["kv_misses"] == off["kv_evictions"] == 0
    assert on["kv_hits"] > 0 and on["recomputed_tokens"] * 10 <= off["recomputed_tokens"]
    assert on["req_per_s"] > off["req_per_s"]


def test_tiny_pool_evicts_and_misses_but_everything_finishes() -> None:
    wl = multi_slice_workload()
    ample = simulate(wl, instances(3), settings(max_batch_size=4)).metrics
    tiny = simulate(wl, instances(3, pool=300), settings(max_batch_size=4)).metrics
    assert tiny["completed"] == tiny["sent"] == 40 and tiny["failed"] == 0
    assert tiny["output_tokens"] == ample["output_tokens"]
    assert tiny["kv_evictions"] > 0 and tiny["kv_misses"] > 0
    assert tiny["recomputed_tokens"] > ample["recomputed_tokens"]
    assert tiny["kv_hits"] < ample["kv_hits"]
    assert sum(i["kv_evictions"] for i in tiny["instances"]) == tiny["kv_evictions"]


def test_vllm_preempts_by_recompute_by_hand() -> None:
    """Ragged layout (vLLM's paged cache; tests/test_simulator_ils_layout.py has the padded
    one): two requests of 30 prompt and 40 output tokens in 5 blocks of 16 (80 bytes): both
    fit at first (2 + 2 blocks); at their 4th iteration each needs a 3rd block (context 33),
    6 > 5, so the later one is preempted with 3 tokens. The first finishes alone; the second
    then re-prefills its 33 tokens and produces its other 37. (G = 40 so that the policy's
    whole-generation memory check, 30 + 40 + 1 bytes, passes.)"""
    res = simulate(items([30, 30], [40, 40]), instances(1, budget=80),
                   settings("ils-vllm", max_gen_length=40), SimOptions(kv_layout="ragged"))
    out = {o.index: o for o in res.outcomes}
    first = 2 * 1.03 + 2 * 0.1  # two prefills, then 2 decode iterations: 3 tokens each
    assert out[0].e2e_s == pytest.approx(first + 37 * 0.1)
    assert out[1].e2e_s == pytest.approx(first + 37 * 0.1 + 1.033 + 36 * 0.1)
    m = res.metrics
    assert m["preemptions"] == 1 and m["recomputed_tokens"] == 33
    assert m["output_tokens"] == 80 and m["oom_events"] == 0 and m["max_running"] == 2


@pytest.mark.parametrize("budget", [320, 10**9])
def test_vllm_memory_bounds_the_running_set(budget: int) -> None:
    wl = items([40] * 12, [60 - 3 * k for k in range(12)], [0.1 * k for k in range(12)])
    res = simulate(wl, instances(2, budget=budget), settings("ils-vllm"))
    m = res.metrics
    assert m["completed"] == 12 and m["failed"] == 0 and m["oom_events"] == 0
    assert m["output_tokens"] == sum(w.output_tokens for w in wl)
    if budget == 320:  # 20 blocks: 6 prompts fit, their growth does not
        assert m["preemptions"] > 0 and m["recomputed_tokens"] > 0
    else:
        assert m["preemptions"] == 0 and m["recomputed_tokens"] == 0
        assert m["max_running"] == 6  # every request of an instance at once: no count cap


def test_vllm_never_fits_and_the_count_capped_ils_is_unchanged() -> None:
    # 95 bytes pass the policy's check for 30 + G + 1 (G = 64) but hold 5 blocks of 16:
    # 30 + 60 tokens need 6, so the ragged engine refuses it; 20 + 5 need 2. The padded
    # engine has no blocks: 90 token slots fit 95 bytes, both complete.
    res = simulate(items([30, 20], [60, 5]), instances(1, budget=95), settings("ils-vllm"),
                   SimOptions(kv_layout="ragged"))
    assert res.metrics["failure_reasons"] == {"never_fits": 1}
    assert res.metrics["completed"] == 1
    res = simulate(items([30, 20], [60, 5]), instances(1, budget=95), settings("ils-vllm"))
    assert res.metrics["failure_reasons"] == {} and res.metrics["completed"] == 2
    capped = simulate(items([50] * 10, [5] * 10), instances(1),
                      settings("ils", ils_max_concurrency=3)).metrics
    vllm = simulate(items([50] * 10, [5] * 10), instances(1), settings("ils-vllm")).metrics
    assert capped["max_running"] == 3 and vllm["max_running"] == 10
    assert vllm["duration_s"] < capped["duration_s"]


@pytest.mark.parametrize("name", ["scls", "scls-rr", "fcfs-maxmin", "ils-vllm"])
def test_every_request_accounted_with_retention(name: str) -> None:
    wl = with_arrivals(synthetic_workload(150, 3, length_scale=0.05), "poisson", 20.0, seed=3)
    wl[7] = replace(wl[7], prompt_tokens=5000)  # too long for the 4096 window: never fits
    a = simulate(wl, instances(3, pool=2000), settings(name, max_batch_size=8)).metrics
    b = simulate(wl, instances(3, pool=2000), settings(name, max_batch_size=8)).metrics
    assert a["completed"] + a["failed"] == a["sent"] == 150
    assert a["failure_reasons"] == {"never_fits": 1}
    volatile = {"sim_wall_s", "events_per_s"}
    assert {k: v for k, v in a.items() if k not in volatile} == \
        {k: v for k, v in b.items() if k not in volatile}


def test_cli_reports_both_ils_variants_and_kv_counters(tmp_path) -> None:  # noqa: ANN001
    import json

    from typer.testing import CliRunner

    from services.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "simulate", "--policies", "scls,ils,ils-vllm", "--instances", "2", "--synthetic",
        "--requests", "40", "--rate", "2", "--max-batch", "8", "--out", str(out),
        "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {"scls", "ils", "ils-vllm"} <= set(doc)
    assert doc["meta"]["settings"]["kv_retention"] is True
    for key in ("recomputed_tokens", "kv_hits", "kv_misses", "kv_evictions", "preemptions"):
        assert key in doc["scls"] and key in doc["ils-vllm"]
    assert "Recomputation and KV retention" in (out / "report.md").read_text()
    off = CliRunner().invoke(app, [
        "simulate", "--policies", "scls", "--instances", "2", "--synthetic", "--requests",
        "40", "--rate", "2", "--no-kv-retention", "--json", str(tmp_path / "off.json")])
    assert off.exit_code == 0, off.output
    doc = json.loads((tmp_path / "off.json").read_text())
    assert doc["meta"]["settings"]["kv_retention"] is False and doc["scls"]["kv_hits"] == 0


def test_fidelity_whole_budget_from_published_figures() -> None:
    from services.simulator.fidelity import whole_budget

    on = Settings()
    assert whole_budget(("p", 600, 4096, "slice", 400), on) == (1000, 400)  # pool recorded
    assert whole_budget(("p", 500, 4096, "slice"), on) == (1000, 500)  # share 0.5 assumed
    assert whole_budget(("p", 500, 4096, "slice"), Settings(kv_pool_bytes=300)) == (800, 300)
    assert whole_budget(("p", 500, 4096, "ils"), on) == (500, 0)
    assert whole_budget(("p", 500, 4096, "slice"), Settings(kv_retention=False)) == (500, 0)
