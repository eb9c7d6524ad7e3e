"""The simulator: hand-computed timelines, the shared policy code, OOM, ILS cap, accounting."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

import services.simulator.engine as sim_engine
from services.simulator import SimInstance, SimOptions, simulate, simulate_metrics
from services.simulator.profiles import BUILTIN, load_profile
from services.simulator.workloads import tile
from shared.bench.workload import WorkItem, synthetic_workload, with_arrivals
from shared.policy import config as policy_config
from shared.policy import planning, presets
from shared.policy.config import DispatchCaps
from shared.policy.costmodel import PREFILL_BASE, CostModel
from shared.policy.types import BatchPlan, InstanceView
from shared.settings import Settings

# Round numbers: a prefill costs 1 s + 1 ms per padded token, a decode step 0.1 s, so a
# slice of S steps is estimated at 1 + 0.001 * l + 0.1 * (S - 1) seconds whatever b is.
# Memory: one byte per cached position, b * (l + S + 1).
ROUND = CostModel(
    slice_length=4, prefill_features=PREFILL_BASE, prefill_coef=(1.0, 0.0, 0.001, 0.0),
    decode_coef=(0.1, 0.0, 0.0, 0.0), kv_bytes_per_token=1, act_coef=(0.0, 0.0, 0.0, 0.0),
    mem_margin=1.0, source="test",
)


def settings(policy_name: str = "scls", **kw: object) -> Settings:
    base = {"slice_length": 4, "max_gen_length": 64, "max_batch_size": 2, "horizon_s": 100.0}
    return Settings(policy=policy_name, **{**base, **kw})


def items(prompts: list[int], outputs: list[int], arrivals: list[float] | None = None
          ) -> list[WorkItem]:
    arrivals = arrivals or [0.0] * len(prompts)
    return [WorkItem(i, a, p, o) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs,
                                                                    strict=True))]


def instances(n: int, budget: int = 10**9, cost: CostModel = ROUND,
              truth: CostModel | None = None) -> list[SimInstance]:
    return [SimInstance(chr(ord("a") + k), cost, budget, 4096, truth) for k in range(n)]


def by_index(result):  # noqa: ANN001, ANN202
    return {o.index: o for o in result.outcomes}


def test_hand_computed_two_instances_three_batches() -> None:
    # Sorted by length with max batch 2, the DP forms (100,100) est 1.4 s, (200,200) 1.5 s
    # and (400,400) 1.7 s. Max-min: 400s -> a (tie, first id), 200s -> b, 100s -> b
    # (completion 1.5 + 1.4 = 2.9 < 1.7 + 1.4 = 3.1). Dispatch (so queue) order is oldest
    # first, formed order for equal arrivals: b runs the 100s, then the 200s.
    # Retention off: every slice re-prefills (tests/test_simulator_kv.py has it on).
    wl = items([100, 100, 200, 200, 400, 400], [1, 1, 2, 1, 6, 2])
    res = simulate(wl, instances(2), settings(kv_retention=False))
    out = by_index(res)
    # b: the 100s, prefill only (outputs of 1 token): 1.1 s, early return.
    assert out[0].e2e_s == pytest.approx(1.1) and out[1].e2e_s == pytest.approx(1.1)
    # b: then the 200s, 1.2 s prefill + 1 step (longest output 2): 1.1 + 1.3.
    assert out[2].e2e_s == pytest.approx(2.4) and out[3].e2e_s == pytest.approx(2.4)
    assert out[2].queue_time_s == 0.0 and out[2].ttft_s == pytest.approx(2.4)
    # a: the 400s run a full slice (4 tokens): 1.4 + 3 * 0.1 = 1.7. Index 5 (2 tokens)
    # finishes; index 4 has 2 tokens left and comes back with context 404, alone; a has
    # the smaller completion (0 + 1.704 vs 1.4 + 1.704) and serves it in 1.404 + 0.1.
    assert out[5].e2e_s == pytest.approx(1.7)
    assert out[4].e2e_s == pytest.approx(1.7 + 1.504)
    assert out[4].ttft_s == pytest.approx(1.7) and out[4].slices == 2
    assert out[4].output_tokens == 6
    busy = {u.id: u.busy_s for u in res.usage}
    assert busy == pytest.approx({"a": 3.204, "b": 2.4})
    slices = {u.id: u.slices for u in res.usage}
    assert slices == {"a": 2, "b": 2}
    m = res.metrics
    assert m["completed"] == 6 and m["failed"] == 0 and m["oom_events"] == 0
    assert m["duration_s"] == pytest.approx(3.204)
    assert m["recomputed_tokens"] == 404  # the second slice re-prefills 400 + 4
    assert m["pad_tokens"] == 0 and m["invalid_tokens"] == 0
    assert m["generated_tokens"] == 13 and m["slices"] == 4


def test_sls_keeps_finished_rows_and_counts_invalid_tokens() -> None:
    # SLS: whole generation (G = 64), finished rows stay: 3 steps for both rows; the row
    # that finished at step 1 is computed in decode steps 1 and 2 (2 invalid tokens).
    wl = items([10, 8], [3, 1])
    res = simulate(wl, instances(1), settings("sls"))
    m = res.metrics
    assert m["invalid_tokens"] == 2 and m["pad_tokens"] == 2
    assert m["slices"] == 1 and m["avg_batch_size"] == 2
    assert by_index(res)[1].e2e_s == pytest.approx(1.01 + 0.2)  # the short one waits
    scls = simulate(wl, instances(1), settings("scls"))
    assert scls.metrics["invalid_tokens"] == 0


def test_cycle_overhead_delays_dispatch() -> None:
    wl = items([100], [1])
    res = simulate(wl, instances(1), settings(), SimOptions(cycle_overhead_s=0.5,
                                                            slice_overhead_s=0.25))
    out = by_index(res)[0]
    assert out.queue_time_s == 0.0  # claimed in the cycle at t = 0
    assert out.e2e_s == pytest.approx(0.5 + 1.1 + 0.25)


def test_simulator_calls_the_shared_policy_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sim_engine.plan_cycle is planning.plan_cycle
    assert sim_engine.DispatchCaps is policy_config.DispatchCaps
    assert sim_engine.expected_busy is presets.expected_busy
    calls = {"batching": 0, "caps": 0}
    real_batching, real_apply = policy_config.BATCHING["scls"], DispatchCaps.apply

    def counting_batching(*args):  # noqa: ANN002, ANN202
        calls["batching"] += 1
        return real_batching(*args)

    def counting_apply(self, batches, views):  # noqa: ANN001, ANN202
        calls["caps"] += 1
        return real_apply(self, batches, views)

    monkeypatch.setitem(policy_config.BATCHING, "scls", counting_batching)
    monkeypatch.setattr(DispatchCaps, "apply", counting_apply)
    wl = with_arrivals(synthetic_workload(60, 1, length_scale=0.05), "poisson", 5.0, seed=1)
    res = simulate(wl, instances(2), settings(kv_retention=False))
    assert res.metrics["completed"] == 60
    assert calls["batching"] == calls["caps"] == res.metrics["cycles"] > 0
    # With retention, plan_cycle batches through the same exact DP: the configured
    # batching when no candidate has a home, one DP over every home's group otherwise
    # (shared.policy.batching.optimal_partition), once a cycle either way.
    real_partition = planning.optimal_partition
    partitions = []

    def counting_partition(*args):  # noqa: ANN002, ANN202
        partitions.append(1)
        return real_partition(*args)

    monkeypatch.setattr(planning, "optimal_partition", counting_partition)
    calls.update(batching=0, caps=0)
    res = simulate(wl, instances(2), settings())
    assert res.metrics["completed"] == 60 and res.metrics["kv_hits"] > 0
    assert len(partitions) > 0
    assert len(partitions) + calls["batching"] >= calls["caps"] == res.metrics["cycles"] > 0


def test_dispatch_caps_and_busy_rule() -> None:
    cost = ROUND
    views = [InstanceView("a", cost, 10**9, 4096, queued_requests=2, queued_batches=1),
             InstanceView("b", cost, 10**9, 4096, queued_requests=0, queued_batches=0)]
    plans = [BatchPlan(i, ("x", "y"), 10, 4, 1.0, 10) for i in ("a", "a", "b", "b", "b")]
    slices = DispatchCaps.for_policy("scls", max_queued_batches=2, ils_max_concurrency=3)
    assert [p.instance_id for p in slices.apply(plans, views)] == ["a", "b", "b"]
    ils = DispatchCaps.for_policy("ils", max_queued_batches=2, ils_max_concurrency=3)
    assert [p.instance_id for p in ils.apply(plans, views)] == ["b"]
    assert not ils.has_room(replace(views[0], queued_requests=3))
    assert presets.expected_busy("ils", 5.0) == 0.0 and presets.expected_busy("sls", 5.0) == 5.0


def test_sls_reservation_beyond_budget_fails_never_fits_scls_has_no_oom() -> None:
    # M(1, 100, S) = 100 + S + 1: S = 4 fits 150 bytes, G = 64 does not.
    wl = items([100] * 5, [3] * 5)
    sls = simulate(wl, instances(2, budget=150), settings("sls")).metrics
    assert sls["failed"] == 5 and sls["failure_reasons"] == {"never_fits": 5}
    assert sls["oom_events"] == 0
    scls = simulate(wl, instances(2, budget=150), settings("scls", kv_retention=False)).metrics
    assert scls["completed"] == 5 and scls["oom_events"] == 0
    # Retention keeps half the budget for the KV pool: 75 bytes left for batches.
    kept = simulate(wl, instances(2, budget=150), settings("scls")).metrics
    assert kept["failure_reasons"] == {"never_fits": 5}


def test_truth_memory_above_estimate_is_an_oom_then_a_failure() -> None:
    truth = replace(ROUND, kv_bytes_per_token=2)  # the engine needs twice the estimate
    wl = items([100] * 3, [3] * 3)
    res = simulate(wl, instances(1, budget=150, truth=truth),
                   settings(max_retries=1, kv_retention=False))
    m = res.metrics
    assert m["failed"] == 3 and m["failure_reasons"] == {"oom": 3}
    assert m["oom_events"] == 6  # 3 batches of 1 (2 do not fit 150 B), each tried twice
    assert m["completed"] + m["failed"] == m["sent"]


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_ils_iterations_by_hand(layout: str) -> None:
    opts = SimOptions(kv_layout=layout)
    # One request: prefill 1 + 0.01 s gives token 1, two decode steps of 0.1 s (padded:
    # the first in the prefill's iteration, ragged: one iteration each).
    res = simulate(items([10], [3]), instances(1), settings("ils"), opts)
    out = by_index(res)[0]
    assert out.e2e_s == pytest.approx(1.21) and out.slices == 1 and out.output_tokens == 3
    assert res.metrics["busy_s_total"] == pytest.approx(1.21)
    # A second request arriving mid-decode joins at the next iteration boundary (1.11),
    # paying its prefill in that iteration: 1.11 + (0.1 + 1.01). Padded, that iteration's
    # decode step also gives the newcomer its second (last) token; ragged, it needs 1 more.
    res = simulate(items([10, 10], [3, 2], [0.0, 1.05]), instances(1), settings("ils"), opts)
    out = by_index(res)
    assert out[0].e2e_s == pytest.approx(1.11 + 1.11)
    last = 1.11 + 1.11 + (0.1 if layout == "ragged" else 0.0)
    assert out[1].e2e_s == pytest.approx(last - 1.05)


def test_ils_concurrency_cap_is_respected() -> None:
    wl = items([50] * 40, list(range(1, 41)))
    res = simulate(wl, instances(2), settings("ils", ils_max_concurrency=3))
    m = res.metrics
    assert m["completed"] == 40 and m["max_running"] == 3
    assert m["avg_batch_size"] <= 3


@pytest.mark.parametrize("name", ["scls", "sls", "ils", "scls-rr"])
def test_every_request_accounted_and_deterministic(name: str) -> None:
    wl = with_arrivals(synthetic_workload(150, 3, length_scale=0.05), "poisson", 20.0, seed=3)
    wl[7] = replace(wl[7], prompt_tokens=5000)  # too long for the 4096 window: never fits
    a = simulate(wl, instances(3), settings(name, max_batch_size=8)).metrics
    b = simulate(wl, instances(3), settings(name, max_batch_size=8)).metrics
    assert a["completed"] + a["failed"] == a["sent"] == 150
    assert a["failure_reasons"] == {"never_fits": 1}
    volatile = {"sim_wall_s", "events_per_s"}
    assert {k: v for k, v in a.items() if k not in volatile} == \
        {k: v for k, v in b.items() if k not in volatile}


def test_simulate_metrics_api_and_profiles(tmp_path) -> None:  # noqa: ANN001
    for name in BUILTIN:
        prof = load_profile(name)
        assert prof.memory_budget_bytes > 10 * 2**30
        assert 0.005 < float(prof.cost.decode_step_time(1, 1000)) < 0.05
    prof = load_profile("a100-llama2-7b")
    assert prof.cost.kv_bytes_per_token == 524288
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"time_mape": 0.05, "cost_model": ROUND.to_dict()}))
    loaded = load_profile(str(path), memory_budget_bytes=10**9)
    assert loaded.cost == replace(ROUND, created_at=loaded.cost.created_at)
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("no-such-profile")
    wl = synthetic_workload(40, 0, length_scale=0.1)
    m = simulate_metrics(wl, "scls", 2, prof.cost, memory_budget_bytes=prof.memory_budget_bytes,
                         settings=Settings(max_batch_size=8))
    for key in ("req_per_s", "imbalance_ect_std", "oom_events", "events", "events_per_s",
                "sim_wall_s"):
        assert key in m
    assert m["completed"] == 40 and not math.isnan(m["latency_p99_s"])


def test_tile_shifts_copies() -> None:
    base = items([1, 2, 3], [1, 1, 1], [0.0, 1.0, 2.0])
    tiled = tile(base, 7)
    assert [w.index for w in tiled] == list(range(7))
    assert [w.arrival_s for w in tiled] == [0, 1, 2, 3, 4, 5, 6]
    assert [w.prompt_tokens for w in tiled] == [1, 2, 3, 1, 2, 3, 1]
    assert np.all(np.diff([w.arrival_s for w in tiled]) >= 0)


def test_cli_writes_report(tmp_path) -> None:  # noqa: ANN001
    from services.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "simulate", "--policies", "scls,sls,ils", "--instances", "2", "--synthetic",
        "--requests", "60", "--rate", "2", "--max-batch", "8", "--out", str(out),
        "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc) >= {"scls", "sls", "ils", "meta", "runs"}
    assert doc["scls"]["completed"] == 60 and doc["scls"]["oom_events"] == 0
    assert (out / "load_over_time.png").is_file()
    assert "load_over_time.png" in (out / "report.md").read_text()


def test_fidelity_runs_the_simulated_engines_at_the_measured_slowdown() -> None:
    """The real run's engine time over its model's time scales each simulated engine (the
    truth), while the policy still plans with the published profile."""
    from services.simulator.fidelity import engine_slowdowns, simulate_like

    wl = items([100, 100, 200, 200], [3, 3, 2, 2], [0.0, 0.0, 10.0, 10.0])

    def real(ratios: list[float | None]) -> dict:
        ids = ["w0", "w1"]
        return {
            "instance_profiles": {i: (ROUND.to_json(), 10**9, 4096, "slice") for i in ids},
            "instances": [{"id": i, "engine_time_ratio": r} for i, r in zip(ids, ratios,
                                                                             strict=True)],
            "overheads": {"dispatch_s": 0.0, "in_job_s": 0.0, "reaction_s": 0.0},
        }

    assert engine_slowdowns(real([2.0, math.nan])) == {"w0": 2.0}
    base = simulate_like(real([None, None]), "scls", wl, settings())
    slow = simulate_like(real([2.0, 2.0]), "scls", wl, settings())
    # Nothing queues here, so every request's time in the engines doubles exactly.
    assert slow["latency_mean_s"] == pytest.approx(2 * base["latency_mean_s"], rel=1e-9)
    assert slow["completed"] == base["completed"] == 4
