"""Prometheus metrics and the API key, on a real Redis and the tiny-random model.

The ingest app is served over httpx's ASGI transport (its real ``/metrics`` route); the
scheduler and the worker run in this process and are scraped through their real HTTP
exporters. Every counter is checked against what the requests and the stats hashes say.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from services.scheduler.service import Scheduler, create_scheduler
from services.worker.service import WorkerService, create_worker
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.obs.prometheus import MetricsServer, serve_metrics
from shared.settings import Settings
from tests.helpers import metric, serve


def scrape(server: MetricsServer) -> str:
    """The exporter's page, fetched over HTTP as Prometheus would."""
    resp = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert resp.status_code == 200
    return resp.text


async def _send(settings: Settings, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """POST ``bodies`` at once (plus one invalid request); the ingest page before and after."""
    async with serve(settings) as client:
        before = (await client.get("/metrics")).text
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=b) for b in bodies))
        bad = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        after = (await client.get("/metrics")).text
    return {"before": before, "after": after, "responses": responses, "bad": bad}


def serve_while(sched: Scheduler, worker: WorkerService, busy: threading.Thread) -> None:
    """Scheduler cycles and worker bursts in this (main) thread, as RQ's job timeout needs,
    until ``busy`` ends."""
    deadline = time.monotonic() + 120
    while busy.is_alive():
        assert time.monotonic() < deadline, "requests did not finish"
        sched.cycle()
        worker.serve(burst=True)
        time.sleep(0.005)


def test_metrics_move_by_exactly_what_was_served(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    s = settings.model_copy(update={"max_batch_size": 3, "request_timeout_s": 60})
    sched = create_scheduler(s)
    worker = create_worker(s, instance_id="w0", loaded=tiny)
    worker.store.register_instance(worker.runtime.instance_info(), ttl_s=600)
    exporters = [serve_metrics(r, 0, "127.0.0.1")
                 for r in (worker.metrics.registry, sched.metrics.registry)]
    bodies = [{"prompt": f"metrics {i}", "max_tokens": 3 + 2 * i, "temperature": 0,
               "ignore_eos": True} for i in range(5)]
    out: dict[str, Any] = {}
    http = threading.Thread(target=lambda: out.update(asyncio.run(_send(s, bodies))))
    try:
        http.start()
        serve_while(sched, worker, http)
        worker_page, sched_page = (scrape(e) for e in exporters)
    finally:
        http.join(timeout=60)
        for exporter in exporters:
            exporter.close()
    before, after, responses = out["before"], out["after"], out["responses"]
    assert [r.status_code for r in responses] == [200] * 5 and out["bad"].status_code == 400
    usage = [r.json()["usage"]["completion_tokens"] for r in responses]
    assert usage == [b["max_tokens"] for b in bodies]
    timings = [r.json()["scls"] for r in responses]

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    # ingest: one count per answered request, histograms fed from the response timings
    assert delta("scls_ingest_requests_total", endpoint="/v1/completions", status="200") == 5
    assert delta("scls_ingest_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("scls_ingest_requests_total", endpoint="/metrics", status="200") == 1
    assert delta("scls_ingest_output_tokens_total") == sum(usage)
    assert delta("scls_request_latency_seconds_count") == 5
    assert delta("scls_request_ttft_seconds_count") == 5
    assert delta("scls_request_queue_seconds_count") == 5
    assert delta("scls_request_latency_seconds_sum") == pytest.approx(
        sum(t["e2e_s"] for t in timings), abs=1e-4)
    assert delta("scls_request_ttft_seconds_sum") == pytest.approx(
        sum(t["ttft_s"] for t in timings), abs=1e-4)
    assert metric(after, "scls_ingest_pending_requests") == 0

    # worker: the same numbers the commits added to the stats hashes
    stats = store.stats()
    assert stats["generated_tokens"] == sum(usage)
    assert metric(worker_page, "scls_worker_slices_total") == stats["slices"] >= 5
    assert metric(worker_page, "scls_worker_generated_tokens_total") == sum(usage)
    assert metric(worker_page, "scls_worker_requests_finished_total") == 5
    for name, key in (("scls_worker_pad_tokens_total", "pad_tokens"),
                      ("scls_worker_recomputed_tokens_total", "recomputed_tokens"),
                      ("scls_worker_invalid_tokens_total", "invalid_tokens"),
                      ("scls_worker_early_returns_total", "first_slice_finishes")):
        assert metric(worker_page, name) == stats.get(key, 0.0), name
    assert metric(worker_page, "scls_worker_busy_seconds_total") == pytest.approx(
        stats["busy_s"], rel=1e-6)
    assert metric(worker_page, "scls_worker_slice_seconds_count") == stats["slices"]
    assert metric(worker_page, "scls_worker_slice_estimated_seconds_count") == stats["slices"]
    assert metric(worker_page, "scls_worker_slice_estimated_seconds_sum") > 0
    assert metric(worker_page, "scls_worker_commits_rejected_total") == 0
    assert metric(worker_page, "scls_worker_memory_peak_bytes") > 10 * 2**20

    # scheduler: one batch per committed slice (one worker, nothing swept)
    assert metric(sched_page, "scls_scheduler_batches_total") == stats["slices"]
    assert metric(sched_page, "scls_scheduler_batch_size_count") == stats["slices"]
    assert metric(sched_page, "scls_scheduler_dispatched_requests_total") == \
        stats["batch_size_sum"]
    assert metric(sched_page, "scls_scheduler_cycle_seconds_count") > 0
    assert metric(sched_page, "scls_scheduler_swept_batches_total") == 0
    assert metric(sched_page, "scls_scheduler_leader") == 1
    assert metric(sched_page, "scls_scheduler_redis_up") == 1
    assert metric(sched_page, "scls_scheduler_instances_alive") == 1
    assert metric(sched_page, "scls_scheduler_pending_requests") == 0
    assert metric(sched_page, "scls_scheduler_inflight_batches") == 0


@pytest.mark.anyio
async def test_gauges_read_redis_at_scrape_time(
    settings: Settings, store: Store, rclient: redis.Redis
) -> None:
    """Pending requests show up in the ingest's and the scheduler's gauges without any
    cycle having run; a standby scheduler reports leader 0."""
    sched = create_scheduler(settings)
    exporter = serve_metrics(sched.metrics.registry, 0, "127.0.0.1")
    try:
        async with serve(settings) as client:
            sends = [asyncio.create_task(client.post(
                "/v1/completions", json={"prompt": f"wait {i}", "max_tokens": 2}))
                for i in range(3)]
            for _ in range(500):
                if store.pending_count() == 3:
                    break
                await asyncio.sleep(0.01)
            page = (await client.get("/metrics")).text
            for task in sends:
                task.cancel()
        assert metric(page, "scls_ingest_pending_requests") == 3
        store.acquire_or_renew_leader("someone-else", 60)
        assert not sched.cycle().leader
        sched_page = scrape(exporter)
    finally:
        exporter.close()
    assert metric(sched_page, "scls_scheduler_pending_requests") == 3
    assert metric(sched_page, "scls_scheduler_leader") == 0
    assert metric(sched_page, "scls_scheduler_cycle_seconds_count") == 0  # standby: none


# --- API key ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_api_key_guards_v1_only(settings: Settings, store: Store) -> None:
    s = settings.model_copy(update={"api_key": "sk-test-123"})
    good = {"Authorization": "Bearer sk-test-123"}
    async with serve(s) as client:
        missing = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer sk-nope"})
        not_bearer = await client.get("/v1/models", headers={"Authorization": "sk-test-123"})
        models = await client.get("/v1/models", headers=good)
        # With the key a request reaches the endpoint (here: its own 400 and 404).
        invalid = await client.post("/v1/completions", headers=good,
                                    json={"prompt": "hi", "max_tokens": -1})
        unknown = await client.get("/v1/requests/nope", headers=good)
        health = await client.get("/healthz")
        page = await client.get("/metrics")
    for resp in (missing, wrong, not_bearer):
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    assert store.pending_count() == 0  # the unauthorised request was never written
    assert models.status_code == 200 and models.json()["data"][0]["id"]
    assert invalid.status_code == 400 and unknown.status_code == 404
    assert health.status_code == 200 and page.status_code == 200
    assert metric(page.text, "scls_ingest_requests_total", endpoint="/v1/completions",
                  status="401") == 1
    assert metric(page.text, "scls_ingest_requests_total", endpoint="/v1/models",
                  status="401") == 2


@pytest.mark.anyio
async def test_no_api_key_means_open(settings: Settings, rclient: redis.Redis) -> None:
    assert settings.api_key is None
    async with serve(settings) as client:
        assert (await client.get("/v1/models")).status_code == 200


@pytest.mark.parametrize(("with_health", "path", "status"), [
    (True, "/metrics", 200), (True, "/livez", 200), (True, "/livz", 404), (True, "/", 404),
    (False, "/metrics", 200), (False, "/livez", 404), (False, "/healthz", 404),
])
def test_the_exporter_serves_only_its_paths(with_health: bool, path: str, status: int) -> None:
    """prometheus_client answers any path with the metrics page: a mistyped probe path
    (Kubernetes, compose) would pass. Only /metrics and, with a health check, /livez do."""
    registry = CollectorRegistry()
    health = (lambda: (True, {"status": "ok"})) if with_health else None
    exporter = serve_metrics(registry, 0, "127.0.0.1", health=health)
    try:
        reply = httpx.get(f"http://127.0.0.1:{exporter.port}{path}", timeout=5)
    finally:
        exporter.close()
    assert reply.status_code == status
    if status == 404:
        assert path in reply.json()["error"]
