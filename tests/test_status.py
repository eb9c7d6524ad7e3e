"""``scls status`` and the metrics ports against a running local deployment.

LocalDeployment starts ingest, scheduler and two tiny-random workers as child processes
(as ``scls up`` does); ``scls status`` runs as a subprocess with ``SCLS_REDIS_URL``, as an
operator would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.launcher import LocalDeployment
from shared.core.embedded_redis import free_port
from shared.core.keys import Keys
from shared.core.records import RequestParams, RequestRecord, new_request_id, now
from shared.core.store import Store, connect
from shared.settings import Settings
from tests.helpers import metric

PREFIX = "status:"  # the module shares the session Redis with flushed tests
# One deployment, one scenario: the first test sees it idle (nothing run yet), the last
# leaves forty long requests behind. Its steps run in the order written, also under
# `pytest --random-order`.
pytestmark = pytest.mark.random_order(disabled=True)


@pytest.fixture(scope="module")
def deployment(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDeployment]:
    base = tmp_path_factory.mktemp("status")
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, model="tiny-random", cache_dir=base / "cache",
        slice_length=512, max_gen_length=1024, max_batch_size=2, max_queued_batches=1,
        horizon_s=1e6, workers=2, port=0, torch_threads=1, profile_mode="analytic",
        log_format="json",
    )
    with LocalDeployment(settings, log_dir=base / "logs") as running:
        yield running


@pytest.fixture()
def store(deployment: LocalDeployment) -> Iterator[Store]:
    s = Store(connect(deployment.settings.redis_url or ""), Keys(PREFIX))
    yield s
    s.r.close()


def scls_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``scls status`` as a separate process."""
    return subprocess.run([sys.executable, "-m", "services.cli", "status", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def status_json(deployment: LocalDeployment, *args: str) -> dict[str, Any]:
    env = {**os.environ, "SCLS_REDIS_URL": deployment.settings.redis_url or "",
           "SCLS_KEY_PREFIX": PREFIX}
    done = scls_status("--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    snap: dict[str, Any] = json.loads(done.stdout)
    return snap


def test_status_json_reports_both_instances_idle(deployment: LocalDeployment) -> None:
    snap = status_json(deployment, "--window", "0")
    assert [row["id"] for row in snap["instances"]] == ["w0", "w1"]
    for row in snap["instances"]:
        assert row["mode"] == "slice" and row["device"] == "cpu" and row["state"] == "ready"
        assert 0 <= row["heartbeat_age_s"] < deployment.settings.instance_ttl_s
        assert row["queued_batches"] == 0 and row["queued_requests"] == 0
        assert row["engine_time_ratio"] is None  # nothing run, nothing priced yet
        # half the budget (SCLS_KV_POOL_SHARE) is the KV pool, empty while idle
        assert row["kv_pool_bytes"] > 0 and row["kv_pool_used_bytes"] == 0
        assert row["kv_hits"] == 0 and row["kv_misses"] == 0
    assert snap["pending"] == 0 and snap["inflight_batches"] == 0
    assert snap["leader"]  # the scheduler child holds the lock
    assert snap["throughput"] is None  # --window 0: cumulative counters only
    assert set(snap["totals"]) >= {"requests_finished", "generated_tokens", "slices"}


def test_each_child_serves_its_own_metrics(deployment: LocalDeployment, store: Store) -> None:
    ports = deployment.metrics_ports
    assert set(ports) == {"scheduler", "worker-0", "worker-1"}
    assert len(set(ports.values())) == 3
    bodies = [{"prompt": f"scrape {i}", "max_tokens": 600, "temperature": 0,
               "ignore_eos": True} for i in range(4)]
    with httpx.Client(base_url=deployment.url, timeout=120) as client:
        before = client.get("/metrics").text
        for body in bodies:  # one at a time: each one's slices are then easy to count
            assert client.post("/v1/completions", json=body).status_code == 200
        after = client.get("/metrics").text
    name = "scls_ingest_requests_total"
    labels = {"endpoint": "/v1/completions", "status": "200"}
    assert metric(after, name, **labels) - metric(before, name, **labels) == 4
    pages = {n: httpx.get(deployment.metrics_url(n), timeout=10).text
             for n in ("worker-0", "worker-1", "scheduler")}
    stats = store.stats()
    for counter, key in (("scls_worker_slices_total", "slices"),
                         ("scls_worker_generated_tokens_total", "generated_tokens"),
                         ("scls_worker_requests_finished_total", "requests_finished")):
        workers = sum(metric(pages[w], counter) for w in ("worker-0", "worker-1"))
        assert workers == stats[key], counter
    model_busy = sum(metric(pages[w], "scls_worker_model_busy_seconds_total")
                     for w in ("worker-0", "worker-1"))
    assert model_busy == pytest.approx(stats["model_busy_s"], rel=1e-6) and model_busy > 0
    assert metric(pages["scheduler"], "scls_scheduler_instances_alive") == 2
    assert metric(pages["scheduler"], "scls_scheduler_leader") == 1
    assert metric(pages["scheduler"], "scls_scheduler_batches_total") == stats["slices"]


def test_status_json_shows_pending_and_inflight_work(
    deployment: LocalDeployment, store: Store
) -> None:
    """Forty long requests (about 15 s of work) on two workers that take one batch of two
    each at a time: a snapshot taken at once sees work in flight and the rest pending."""
    for _ in range(40):
        store.submit(RequestRecord(
            id=new_request_id(), prompt_ids=[7, 8, 9], arrival=now(), model="tiny-random",
            params=RequestParams(max_tokens=1024, ignore_eos=True),
        ))
    finished_before = store.stats().get("requests_finished", 0.0)
    snap = status_json(deployment, "--window", "1")
    assert snap["pending"] >= 4  # at most 2 x 2 requests are placed at a time
    assert 1 <= snap["inflight_batches"] <= 2
    placed = [row["queued_requests"] for row in snap["instances"]]
    assert 1 <= sum(placed) <= 4 and all(row["queued_batches"] <= 1
                                         for row in snap["instances"])
    assert sum(row["queued_estimated_s"] for row in snap["instances"]) > 0
    rate = snap["throughput"]
    assert rate is not None and 0.9 <= rate["window_s"] < 5
    assert rate["requests_per_s"] >= 0 and rate["tokens_per_s"] >= 0
    assert snap["totals"]["requests_finished"] >= finished_before
    # earlier tests ran slices on both: each engine's time against its own profile's
    assert all(row["engine_time_ratio"] > 0 for row in snap["instances"] if row["slices"])


def test_status_once_prints_a_table(deployment: LocalDeployment) -> None:
    env = {**os.environ, "SCLS_REDIS_URL": deployment.settings.redis_url or "",
           "SCLS_KEY_PREFIX": PREFIX, "COLUMNS": "200"}
    done = scls_status("--once", "--window", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert "w0" in done.stdout and "w1" in done.stdout and "pending:" in done.stdout


def test_status_without_redis_says_how_to_fix(tmp_path: Path) -> None:
    bare = {k: v for k, v in os.environ.items() if not k.startswith("SCLS_")}
    unset = scls_status("--json", env=bare)
    assert unset.returncode == 2 and "set SCLS_REDIS_URL" in unset.stderr
    gone = scls_status("--json", env={**bare,
                                      "SCLS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert gone.returncode == 2 and "cannot reach Redis" in gone.stderr
    assert "SCLS_REDIS_URL" in gone.stderr
