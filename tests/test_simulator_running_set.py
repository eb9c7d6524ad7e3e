"""The simulator's running sets (``settings.running_set``), the KV-layout what-if, mixed
fleets, and the slice instance's hand-back of rows that missed their K/V."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from services.simulator import SimOptions, simulate
from services.simulator.instances import QueuedBatch, SliceInstance
from services.simulator.profiles import load_profile
from services.simulator.state import RequestTable
from shared.bench.workload import synthetic_workload, with_arrivals
from tests.test_simulator import ROUND, by_index, instances, items, settings

# ROUND (tests/test_simulator.py): a prefill pass costs 1 s + 1 ms per padded token, a
# decode step 0.1 s whatever the batch, one byte per cached position, S = 4.
REPO = Path(__file__).resolve().parents[1]


def running(**kw: object):  # noqa: ANN201
    return settings(running_set=True, **kw)


def test_carried_rows_resume_without_prefill_by_hand() -> None:
    """Two 100-token prompts, 10 and 6 output tokens, one instance. Slice 1 prefills both
    (1.1 s) and decodes 3 steps (4 tokens each): 1.4 s. Slice 2: both carried, no prefill,
    4 steps (B draws its last 2): 1.8 s, B ends. Slice 3: A alone, 2 steps: 2.0 s."""
    res = simulate(items([100, 100], [10, 6]), instances(1), running())
    out = by_index(res)
    assert out[0].e2e_s == pytest.approx(2.0)
    assert out[1].e2e_s == pytest.approx(1.8)
    m = res.metrics
    assert m["kv_hits"] == 3 and m["recomputed_tokens"] == 0 and m["oom_events"] == 0
    assert m["slices"] == 3


def test_cohorts_merge_and_max_batch_does_not_cap_the_running_set() -> None:
    """Four requests at once with max_batch_size 2: without a running set, the instance
    alternates two batches of 2 (each cohort comes back and goes out again alone); with
    one, all four run in every slice, and all end sooner."""
    wl = items([100] * 4, [12] * 4)
    cohorts = simulate(wl, instances(1), settings()).metrics
    merged = simulate(wl, instances(1), running()).metrics
    assert cohorts["avg_batch_size"] == pytest.approx(2.0)
    assert merged["avg_batch_size"] == pytest.approx(4.0) and merged["max_running"] == 4
    assert merged["latency_mean_s"] < cohorts["latency_mean_s"]
    assert merged["oom_events"] == cohorts["oom_events"] == 0


def test_growing_rows_preempt_the_youngest_which_recomputes_later() -> None:
    """Two 20-token prompts, 20 output tokens each, 70 bytes (a slice of b rows w wide
    needs b * (w + 5)). Both fit at first (50); once their contexts reach 32 the pair needs
    74, so the younger is preempted with its 12 tokens, waits for the older to end (the
    two never fit again), then re-prefills its 32 tokens. Nothing runs out of memory."""
    res = simulate(items([20, 20], [20, 20]), instances(1, budget=70), running())
    m = res.metrics
    assert m["completed"] == 2 and m["oom_events"] == 0
    assert m["preemptions"] == 1 and m["recomputed_tokens"] == 32
    assert m["output_tokens"] == 40
    out = by_index(res)
    assert out[1].e2e_s > out[0].e2e_s


def a100_workload(n: int = 300, rate: float = 20.0):  # noqa: ANN201
    return with_arrivals(synthetic_workload(n, 3), "poisson", rate, 3)


def a100_instances(count: int = 2):  # noqa: ANN201
    prof = load_profile("a100-llama2-7b", 32)
    from services.simulator import uniform_instances

    return uniform_instances(count, prof.cost, prof.memory_budget_bytes, prof.context_limit)


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_running_sets_account_every_request_without_oom(layout: str) -> None:
    """A100 profile, 300 requests past saturation: every request ends once, no memory
    overrun, the same figures on a second run (deterministic)."""
    opts = SimOptions(kv_layout=layout)
    first = simulate(a100_workload(), a100_instances(), running(slice_length=32,
                                                                 max_batch_size=32), opts)
    again = simulate(a100_workload(), a100_instances(), running(slice_length=32,
                                                                max_batch_size=32), opts)
    m = first.metrics
    assert m["completed"] + m["failed"] == 300 and m["oom_events"] == 0
    assert m["output_tokens"] == sum(o.output_tokens for o in first.outcomes
                                     if o.finish_reason is not None)
    assert m["max_running"] > 32  # beyond max_batch_size: memory bounds the set
    assert [o.e2e_s for o in first.outcomes] == [o.e2e_s for o in again.outcomes]


def test_a_ragged_layout_runs_larger_sets_than_the_padded_cache() -> None:
    """Mixed lengths: the padded cache holds every row at the longest's width, a ragged one
    does not, so the same memory carries more rows and serves faster."""
    wl = a100_workload(400, 40.0)
    s = running(slice_length=32, max_batch_size=32)
    padded = simulate(wl, a100_instances(), s, SimOptions(kv_layout="padded")).metrics
    ragged = simulate(wl, a100_instances(), s, SimOptions(kv_layout="ragged")).metrics
    assert ragged["avg_batch_size"] > padded["avg_batch_size"]
    assert ragged["req_per_s"] > padded["req_per_s"]


def test_a_missed_row_that_does_not_fit_is_handed_back_not_run_out_of_memory() -> None:
    """Pool mode: rows 0-2 were planned to resume, but only row 0's entry is still in the
    pool. Re-prefilling all three needs 3 * (40 + 5) = 135 bytes of 100; handing back the
    youngest missed row (2) leaves 90, which fits: the slice runs rows 0 and 1."""
    reqs = RequestTable(items([30, 30, 30], [50, 50, 50]), None)
    reqs.generated[:] = 10  # context 40 each
    inst = SliceInstance(0, "a", ROUND, 100, 4096, 0.0, pool_bytes=1000)
    inst.pool.put(0, 39)
    batch = QueuedBatch(np.array([0, 1, 2]), 4, 1.0, True)
    inst.claimed(batch)
    inst.queue = deque([batch])
    end = inst._start(0.0, reqs)
    assert end is not None and inst.shed == [2]
    running_batch, outcome = inst.running
    assert running_batch.idx.tolist() == [0, 1] and not outcome.oom
    assert inst.requests == 2 and inst.counters["kv_miss_handbacks"] == 1


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", "simulate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_simulates_a_mixed_fleet_with_running_sets(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    proc = run_cli("--instances", "1:a100-llama2-7b,1:h100-llama2-7b", "--running-set",
                   "--kv-layout", "ragged", "--synthetic", "--requests", "60", "--rate", "4",
                   "--policies", "scls,ils-vllm", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["fleet"] == [
        {"count": 1, "profile": "a100-llama2-7b", "truth_profile": "a100-llama2-7b"},
        {"count": 1, "profile": "h100-llama2-7b", "truth_profile": "h100-llama2-7b"}]
    assert doc["meta"]["kv_layout"] == "ragged" and doc["meta"]["settings"]["running_set"]
    assert doc["scls"]["completed"] == 60 and doc["scls"]["oom_events"] == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--instances", "2:nope"], "unknown profile 'nope'"),
    (["--instances", "a100-llama2-7b"], "COUNT:PROFILE"),
    (["--instances", "0"], "at least one instance"),
    (["--kv-layout", "paged"], "padded, ragged"),
])
def test_cli_refuses_a_bad_fleet_or_layout(args: list[str], message: str) -> None:
    proc = run_cli(*args, "--synthetic", "--requests", "5", "--rate", "1")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1500:]


@pytest.mark.parametrize("policy", ["scls", "ils", "ils-vllm"])
def test_runs_report_running_sizes_kv_in_use_and_recomputed_share(policy: str) -> None:
    """Every policy reports its running-set distribution (rows while busy), the KV memory
    it holds as a share of the budget, and recomputed prompt tokens per prompt token."""
    s = settings(policy, running_set=True, slice_length=32, max_batch_size=32)
    m = simulate(a100_workload(), a100_instances(), s).metrics
    assert 1 <= m["running_p10"] <= m["running_p50"] <= m["running_p90"] <= m["max_running"]
    assert 0 < m["kv_in_use_mean"] <= m["kv_in_use_p90"]
    # Only the count-capped ILS may hold more than its budget: 32 rows of its padded cache
    # overrun it, which it counts as OOM events instead of preempting.
    assert m["kv_in_use_p90"] <= 1.0 or (policy == "ils" and m["oom_events"] > 0)
    assert m["recomputed_share"] == pytest.approx(m["recomputed_tokens"] / m["prompt_tokens"])
