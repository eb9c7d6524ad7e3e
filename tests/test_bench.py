"""The benchmark: workloads, metric definitions, reports, and `scls bench` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from services.bench.client import ClientConfig
from services.bench.command import parse_bytes, parse_rates
from services.bench.runner import external_run, served_model
from services.scheduler.service import create_scheduler
from services.worker.service import create_worker
from shared.bench.report import Run, results_document, table_rows, write_report
from shared.bench.workload import (
    WorkItem,
    arrival_times,
    prompt_token_ids,
    read_trace,
    synthetic_workload,
    trace_workload,
    with_arrivals,
)
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.obs.metrics import InstanceUsage, RequestOutcome, spread, summarize
from shared.settings import Settings
from tests.helpers import served_over_tcp

# The vendored Azure trace (data/traces/README.md); always in the repository, never skipped.
TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure_llm_2023_conv.csv"


def write_trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    """A trace CSV with a byte-order mark, as the published one has."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{t},{c},{g}" for t, c, g in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return path


# --- workloads ------------------------------------------------------------------------------

def test_trace_is_read_in_time_order_with_offsets_and_scaled(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.csv", [
        ("2023-11-16 18:15:50.5000000", 400, 100),
        ("2023-11-16 18:15:46.2500000", 374, 44),  # earlier: sorted first
        ("2023-11-16 18:15:47", 10, 1),
    ])
    rows = read_trace(path)
    assert [r.offset_s for r in rows] == pytest.approx([0.0, 0.75, 4.25])
    items = trace_workload(rows, length_scale=0.05, time_scale=2.0)
    assert [(i.prompt_tokens, i.output_tokens) for i in items] == [(19, 2), (1, 1), (20, 5)]
    assert [i.arrival_s for i in items] == pytest.approx([0.0, 0.375, 2.125])
    assert len(read_trace(path, limit=2)) == 2


@pytest.mark.parametrize(("text", "message"), [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:50,1\n", r"lacks column\(s\) GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nnot-a-time,1,2\n", "line 2"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:50,x,2\n", "line 2"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no rows"),
])
def test_bad_trace_files_are_refused_with_the_place(tmp_path: Path, text: str,
                                                    message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_trace(path)


def test_missing_trace_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "nope.csv")


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_are_seeded() -> None:
    for mode, burstiness in (("poisson", 1.0), ("gamma", 0.5), ("gamma", 4.0)):
        times = arrival_times(20_000, mode, rate=50.0, burstiness=burstiness, seed=3)
        assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
        assert np.mean(np.diff(times)) == pytest.approx(1 / 50, rel=0.05)
        assert np.array_equal(times, arrival_times(20_000, mode, 50.0, burstiness, seed=3))
    # burstiness < 1 spreads the gaps more than Poisson, > 1 less (coefficient of variation)
    cv = {b: np.std(np.diff(arrival_times(20_000, "gamma", 50.0, b, 1))) * 50 for b in (0.5, 4)}
    assert cv[0.5] > 1.2 and cv[4] < 0.6
    assert np.all(arrival_times(5, "burst", 0.0, 1.0, 0) == 0)
    assert np.allclose(arrival_times(5, "constant", 4.0, 1.0, 0), [0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="rate"):
        arrival_times(5, "poisson", 0.0, 1.0, 0)


def test_with_arrivals_keeps_lengths_and_trace_keeps_times() -> None:
    items = [WorkItem(i, float(i), 10 + i, 5) for i in range(4)]
    assert with_arrivals(items, "trace") == items
    timed = with_arrivals(items, "poisson", rate=10.0, seed=1)
    assert [(i.prompt_tokens, i.output_tokens) for i in timed] == [(10, 5), (11, 5), (12, 5),
                                                                  (13, 5)]
    assert timed[0].arrival_s == 0.0 and timed[1].arrival_s != 1.0


def test_synthetic_lengths_follow_the_trace_statistics() -> None:
    items = synthetic_workload(20_000, seed=0)
    prompts = np.array([i.prompt_tokens for i in items])
    outputs = np.array([i.output_tokens for i in items])
    # docs/design.md §8: prompts median 1,020 / mean 1,155; outputs median 129 / mean 211.
    assert np.median(prompts) == pytest.approx(1020, rel=0.05)
    assert prompts.mean() == pytest.approx(1155, rel=0.05)
    assert np.median(outputs) == pytest.approx(129, rel=0.05)
    assert outputs.mean() == pytest.approx(211, rel=0.08)
    assert outputs.max() <= 1000
    assert synthetic_workload(5, seed=1) == synthetic_workload(5, seed=1)


def test_prompt_ids_have_the_length_avoid_special_ids_and_are_deterministic() -> None:
    item = WorkItem(7, 0.0, 300, 4)
    ids = prompt_token_ids(item, vocab_size=512, seed=1, avoid=(200,))
    assert len(ids) == 300 and min(ids) >= 100 and max(ids) < 512 and 200 not in ids
    assert ids == prompt_token_ids(item, 512, 1, (200,))
    assert ids != prompt_token_ids(WorkItem(8, 0.0, 300, 4), 512, 1, (200,))


def test_the_published_trace_reads() -> None:
    rows = read_trace(TRACE, limit=1000)
    assert len(rows) == 1000 and rows[0].offset_s == 0.0
    assert all(r.prompt_tokens > 0 and r.output_tokens > 0 for r in rows)


# --- metrics --------------------------------------------------------------------------------

def outcome(index: int, e2e: float, tokens: int = 10, slices: int = 1, ok: bool = True,
            error: str = "") -> RequestOutcome:
    return RequestOutcome(index=index, ok=ok, sent_s=float(index), e2e_s=e2e,
                          ttft_s=e2e / 2, queue_time_s=e2e / 4, output_tokens=tokens,
                          slices=slices, error=error)


def test_summary_follows_the_definitions() -> None:
    outcomes = [outcome(0, 1.0), outcome(1, 2.0, slices=2), outcome(2, 3.0, slices=3),
                outcome(3, 4.0), outcome(4, 0.5, ok=False, tokens=0,
                                         error="HTTP 503: store down")]
    counters = {"slices": 4, "batch_size_sum": 10, "pad_tokens": 7, "invalid_tokens": 3,
                "recomputed_tokens": 11, "generated_tokens": 40, "busy_s": 6.0,
                "prefill_s": 2.5, "decode_s": 3.25}
    instances = [InstanceUsage("a", 2.0), InstanceUsage("b", 4.0)]
    m = summarize(outcomes, counters, instances, duration_s=8.0,
                  ect_samples=[[1.0, 3.0], [2.0, 2.0]])
    assert (m["sent"], m["completed"], m["failed"]) == (5, 4, 1)
    assert m["failure_reasons"] == {"HTTP 503": 1}
    assert m["req_per_s"] == 0.5 and m["tok_per_s"] == 5.0
    assert m["latency_mean_s"] == 2.5 and m["latency_p50_s"] == 2.5
    assert m["latency_p99_s"] == pytest.approx(3.97)
    assert m["ttft_p50_s"] == 1.25 and m["queue_time_mean_s"] == 0.625
    assert m["slices_per_request"] == 1.75 and m["early_return_ratio"] == 0.5
    assert m["avg_batch_size"] == 2.5
    assert (m["prefill_s_total"], m["decode_s_total"]) == (2.5, 3.25)
    assert (m["pad_tokens"], m["invalid_tokens"], m["recomputed_tokens"]) == (7, 3, 11)
    assert m["imbalance_busy_std"] == 1.0
    assert m["imbalance_busy_max_mean"] == pytest.approx(4 / 3)
    assert m["imbalance_ect_std"] == 0.5  # mean of (1.0, 0.0)
    assert m["imbalance_ect_max_mean"] == pytest.approx(1.25)  # mean of (1.5, 1.0)
    assert [i["utilisation"] for i in m["instances"]] == [0.25, 0.5]


def test_ils_batch_size_is_its_time_averaged_concurrency() -> None:
    m = summarize([outcome(0, 1.0)], {"slices": 9, "batch_size_sum": 9, "busy_s": 2.0,
                                      "concurrency_s": 7.0}, [], 1.0)
    assert m["avg_batch_size"] == 3.5
    assert m["prefill_s_total"] is None  # ILS iterations mix prefill and decode


def test_spread_of_balanced_and_idle_clusters() -> None:
    assert spread([2.0, 2.0, 2.0]) == (0.0, 1.0)
    assert spread([0.0, 0.0]) == (0.0, 1.0)
    assert spread([]) == (0.0, 1.0)


def test_summary_of_nothing_completed_has_no_fake_numbers() -> None:
    m = summarize([outcome(0, 1.0, ok=False, error="HTTP 500: boom")], {}, [], 1.0)
    assert m["completed"] == 0 and math.isnan(m["latency_p50_s"])


# --- reports --------------------------------------------------------------------------------

def fake_runs() -> list[Run]:
    base = {"completed": 10, "failed": 0, "sent": 10, "instances": [
        {"id": "w0", "busy_s": 1.0}, {"id": "w1", "busy_s": 2.0}]}
    return [
        Run("scls", 5.0, {**base, "req_per_s": 2.0, "latency_p50_s": float("nan")}),
        Run("sls", 5.0, {**base, "req_per_s": 0.5, "latency_p50_s": 3.0}),
        Run("scls", 10.0, {**base, "req_per_s": 4.0, "latency_p50_s": 1.0}),
        Run("sls", 10.0, {**base, "req_per_s": 1.0, "latency_p50_s": 6.0}),
    ]


def test_results_document_is_per_policy_at_the_highest_rate() -> None:
    doc = results_document(fake_runs(), {"command": "x"})
    assert doc["scls"]["req_per_s"] == 4.0 and doc["scls"]["rate"] == 10.0
    assert set(doc["sls"]["by_rate"]) == {"5.0", "10.0"}
    assert len(doc["runs"]) == 4 and doc["meta"] == {"command": "x"}


def test_table_shows_ratios_to_the_baseline() -> None:
    header, rows = table_rows(fake_runs(), baseline="scls")
    assert header == ["metric", "scls", "sls", "sls/scls"]
    by_label = {row[0]: row for row in rows}
    assert by_label["req/s"] == ["req/s", "4.000", "1.000", "0.25x"]
    assert by_label["E2E p50 s"][-1] == "6.00x"


def test_report_files_are_written_as_strict_json(tmp_path: Path) -> None:
    written = write_report(tmp_path, fake_runs(), {"command": "scls bench"}, "scls", "t")
    names = {p.name for p in written}
    assert {"results.json", "report.md", "busy_time.png", "vs_rate.png"} <= names
    doc = json.loads((tmp_path / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert doc["scls"]["by_rate"]["5.0"]["latency_p50_s"] is None  # NaN -> null
    assert "| req/s |" in (tmp_path / "report.md").read_text()


# --- command line ---------------------------------------------------------------------------

def test_option_parsers() -> None:
    assert parse_bytes("64MiB") == 64 * 2**20 and parse_bytes("2gib") == 2 * 2**30
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="512MiB"):
        parse_bytes("lots")
    assert parse_rates(None, "10,2.5") == [2.5, 10.0]
    assert parse_rates(3.0, None) == [3.0] and parse_rates(None, None) == [None]
    with pytest.raises(ValueError, match="positive"):
        parse_rates(None, "0,1")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
    """``scls ARGS`` in a child process; each bench deployment starts its own Redis."""
    base = {k: v for k, v in os.environ.items() if k != "SCLS_REDIS_URL"}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


@pytest.mark.parametrize(("args", "message"), [
    (["--policies", "scls,fifo"], "unknown policy fifo"),
    (["--rates", "1,x"], "--rates"),
    (["--memory-budget", "lots"], "512MiB"),
    (["--trace", "/nonexistent.csv"], "does not exist"),
    (["--url", "http://127.0.0.1:9", "--policies", "scls,sls"], "only the running"),
    (["--prompt-tokens", "8"], "together"),
    (["--prompt-tokens", "8", "--output-tokens", "4", "--synthetic"], "replace --trace"),
    (["--constant"], "give --rate"),
])
def test_bench_refuses_bad_options_with_a_fix(args: list[str], message: str) -> None:
    result = run_cli("bench", "--model", "tiny-random", "--requests", "2", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.soak
def test_bench_streams_and_measures_ttft_at_the_client(tmp_path: Path) -> None:
    """--stream: every request streams; TTFT is the client's time to the first chunk (never
    after its end-to-end latency), and the server-side figures still come through. Fixed
    lengths at a constant rate (GuideLLM's shape of workload)."""
    env = {"SCLS_CACHE_DIR": str(tmp_path / "cache"), "SCLS_PROFILE_MODE": "analytic",
           "SCLS_SLICE_LENGTH": "4", "SCLS_LOG_FORMAT": "json"}
    result = run_cli("bench", "--model", "tiny-random", "--workers", "1", "--policies",
                     "scls", "--prompt-tokens", "6", "--output-tokens", "9", "--requests",
                     "8", "--rate", "20", "--constant", "--seed", "3", "--stream", "--out",
                     str(tmp_path / "o"), "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    m = doc["scls"]
    assert m["completed"] == 8 and m["failed"] == 0, m["failure_reasons"]
    assert m["generated_tokens"] == m["output_tokens"] == 8 * 9
    assert 0 < m["ttft_p50_s"] <= m["latency_p50_s"]
    assert m["slices_per_request"] > 1 and m["queue_time_p50_s"] >= 0
    assert doc["meta"]["ttft"] == "client, first streamed chunk"


@pytest.mark.soak
def test_bench_runs_two_policies_end_to_end(tmp_path: Path) -> None:
    """Real deployments (Redis, ingest, scheduler, 2 workers) per policy; every request
    is accounted for and the worker-side counters come from Redis."""
    out = tmp_path / "out"
    env = {"SCLS_CACHE_DIR": str(tmp_path / "cache"), "SCLS_PROFILE_MODE": "analytic",
           "SCLS_SLICE_LENGTH": "4", "SCLS_LOG_FORMAT": "json"}
    result = run_cli("bench", "--model", "tiny-random", "--workers", "2", "--policies",
                     "scls,sls", "--synthetic", "--length-scale", "0.02", "--requests", "16",
                     "--rate", "40", "--seed", "5", "--out", str(out), "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "results.json").read_text())
    for policy in ("scls", "sls"):
        m = doc[policy]
        assert m["sent"] == 16 and m["completed"] + m["failed"] == 16
        assert m["completed"] == 16, m["failure_reasons"]
        assert m["req_per_s"] > 0 and m["latency_p50_s"] > 0 and m["ttft_p50_s"] > 0
        assert m["generated_tokens"] == m["output_tokens"]  # workers' counter == client's sum
        assert sum(i["slices"] for i in m["instances"]) == m["slices"] > 0
        assert len(m["instances"]) == 2
        # every slice was also priced by its instance's own (analytic) model
        assert m["engine_time_ratio"] > 0
        assert all(i["engine_time_ratio"] > 0 for i in m["instances"] if i["slices"])
    # SLS keeps finished rows computing until the batch's longest finishes; SCLS drops them
    # and slices (S = 4), so its requests take more slices.
    assert doc["sls"]["slices_per_request"] == 1.0
    assert doc["scls"]["slices_per_request"] > 1.0 and doc["scls"]["invalid_tokens"] == 0
    assert doc["meta"]["workload"]["requests"] == 16
    assert (out / "report.md").exists() and (out / "busy_time.png").exists()


def test_bench_replays_the_workload_against_an_external_openai_server(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """``--external``: the same timed workload against another OpenAI-compatible server
    (here a live scls deployment over TCP: ingest, a scheduler loop, a worker loop): every
    request completes with its forced length, and only client-side figures are reported."""
    scheduler = create_scheduler(settings)
    worker = create_worker(settings, instance_id="x0", loaded=tiny)
    worker.register()
    threads = [threading.Thread(target=scheduler.run, daemon=True),
               threading.Thread(target=worker.serve, daemon=True)]
    for t in threads:
        t.start()
    items = with_arrivals([WorkItem(i, 0.0, 5 + i, 3 + i % 4) for i in range(6)],
                          "poisson", 20.0, seed=1)
    try:
        with served_over_tcp(settings) as url:
            model = served_model(url)
            assert model == settings.model
            config = ClientConfig(base_url=url, model=model,
                                  vocab_size=tiny.info.vocab_size, stream=True)
            run = external_run("peer", items, config, 20.0)
    finally:
        scheduler.stop()
        worker.stop()
        for t in threads:
            t.join(timeout=20)
        worker._stop_heartbeating()
    m = run.metrics
    assert run.policy == "peer" and m["external"] == {"url": url, "model": model}
    assert m["completed"] == 6 and m["failed"] == 0, m["failures"]
    assert m["output_tokens"] == sum(w.output_tokens for w in items)
    assert 0 < m["ttft_p50_s"] <= m["latency_p50_s"] and m["req_per_s"] > 0
    # no worker counters: the server is not ours to read, so unknown, not zero
    assert m["slices"] is None and m["recomputed_tokens"] is None
    assert m["imbalance_ect_std"] is None and m["slices_per_request"] is None


@pytest.mark.parametrize(("spec", "message"), [
    ("vllm", "give NAME=URL"),
    ("vllm=ftp://x", "give NAME=URL"),
    ("scls=http://127.0.0.1:9", "the name is taken"),
    ("peer=http://127.0.0.1:9", "does not answer GET /v1/models"),
])
def test_bench_refuses_a_bad_external_server(spec: str, message: str) -> None:
    result = run_cli("bench", "--model", "tiny-random", "--requests", "2", "--external", spec,
                     timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
