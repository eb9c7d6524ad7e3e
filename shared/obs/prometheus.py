"""Prometheus metrics of the ingest, scheduler and worker (names in docs/observability.md).

Each service object owns one :class:`~prometheus_client.CollectorRegistry` (never the
global default registry), so tests can run several services in one process and scrape each
on its own. The counters are fed from the numbers the services already compute (the
worker's slice counters, the ingest's request timings), never from a second computation.
Values that live in Redis (pending requests, in-flight batches, live instances) are read at
scrape time, so a scrape always shows the current state and costs nothing between scrapes.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from shared.core.store import Store
from shared.obs.logging import get_logger
from shared.settings import Settings

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONTENT_TYPE_LATEST",
    "HealthCheck",
    "IngestMetrics",
    "MetricsPortError",
    "MetricsServer",
    "SchedulerMetrics",
    "WorkerMetrics",
    "exposition",
    "peak_memory_bytes",
    "serve_metrics",
    "start_exporter",
]

log = get_logger(__name__)

#: Request latencies: tens of milliseconds (tiny model) to minutes (long generations).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                   300.0, 600.0)
#: One slice: a millisecond (tiny model, CPU) to a minute (a long SLS slice).
SLICE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0)
#: One scheduler cycle: BENCHMARKS.md measures sub-millisecond to tens of milliseconds.
CYCLE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Requests per batch (max_batch_size defaults to 32).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (content type :data:`CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry)


# --- ingest ---------------------------------------------------------------------------------


class IngestMetrics:
    """What the ingest app exports at ``GET /metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "scls_ingest_requests_total",
            "HTTP requests answered, by route template and status code",
            ["endpoint", "status"], registry=r,
        )
        self.latency = Histogram(
            "scls_request_latency_seconds",
            "End-to-end latency of finished requests: arrival to last slice committed",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "scls_request_ttft_seconds",
            "Time to first token of finished requests: arrival to first slice committed",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "scls_request_queue_seconds",
            "Queue time of finished requests: arrival to first claimed into a batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "scls_ingest_prompt_tokens_total", "Prompt tokens of finished requests", registry=r
        )
        self.output_tokens = Counter(
            "scls_ingest_output_tokens_total",
            "Completion tokens returned to clients by finished requests", registry=r,
        )
        self.pending = Gauge(
            "scls_ingest_pending_requests",
            "Requests in the pending pool (read from Redis when scraped)", registry=r,
        )

    def observe_request(self, endpoint: str, status: int) -> None:
        """Count one answered HTTP request."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_finished(
        self, timings: Mapping[str, float | None], prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Record a finished request from the timings its response carries."""
        for name, histogram in (("e2e_s", self.latency), ("ttft_s", self.ttft),
                                ("queue_time_s", self.queue_time)):
            value = timings.get(name)
            if value is not None:
                histogram.observe(max(0.0, value))
        self.prompt_tokens.inc(prompt_tokens)
        self.output_tokens.inc(completion_tokens)


# --- scheduler ------------------------------------------------------------------------------


class _SchedulerStateCollector(Collector):
    """Gauges read from Redis at scrape time: same answer from a leader and a standby."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("scls_scheduler_redis_up",
                               "1 if Redis answered this scrape's reads, else 0")
        try:
            pending = self.store.pending_count()
            inflight = len(self.store.inflight_batches())
            alive = self.store.live_instances()
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("scls_scheduler_pending_requests",
                                "Requests in the pending pool", value=pending)
        yield GaugeMetricFamily("scls_scheduler_inflight_batches",
                                "Batches claimed and not yet committed or requeued",
                                value=inflight)
        yield GaugeMetricFamily("scls_scheduler_instances_alive",
                                "Worker instances with a current heartbeat", value=len(alive))


class SchedulerMetrics:
    """What ``scls scheduler`` exports on its metrics port."""

    def __init__(self, store: Store, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cycle = Histogram(
            "scls_scheduler_cycle_seconds",
            "Duration of one scheduling cycle while leader (sweep, plan, claim, enqueue)",
            buckets=CYCLE_BUCKETS, registry=r,
        )
        self.batches = Counter(
            "scls_scheduler_batches_total", "Slice batches formed and dispatched", registry=r
        )
        self.dispatched = Counter(
            "scls_scheduler_dispatched_requests_total",
            "Requests claimed into dispatched batches (one per request per slice)", registry=r,
        )
        self.batch_size = Histogram(
            "scls_scheduler_batch_size", "Requests per dispatched batch",
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.swept = Counter(
            "scls_scheduler_swept_batches_total",
            "In-flight batches requeued by the recovery sweep (dead instance or deadline)",
            registry=r,
        )
        self.never_fit = Counter(
            "scls_scheduler_never_fit_total",
            "Requests failed because no instance can hold them even alone", registry=r,
        )
        self.leader = Gauge(
            "scls_scheduler_leader", "1 while this scheduler holds the leader lock", registry=r
        )
        r.register(_SchedulerStateCollector(store))

    def observe_cycle(self, seconds: float, leader: bool, swept: int, never_fit: int) -> None:
        """Record one cycle (its duration only while leader: a standby's is a lock try)."""
        self.leader.set(1 if leader else 0)
        if leader:
            self.cycle.observe(seconds)
        self.swept.inc(swept)
        self.never_fit.inc(never_fit)

    def observe_batch(self, size: int) -> None:
        """Record one dispatched batch of ``size`` requests."""
        self.batches.inc()
        self.dispatched.inc(size)
        self.batch_size.observe(size)


# --- worker ---------------------------------------------------------------------------------


def peak_memory_bytes(device: torch.device) -> float:
    """Peak memory of this worker: CUDA's max allocated bytes, else the process's peak RSS."""
    if device.type == "cuda":
        import torch  # the ingest imports this module and needs no torch

        return float(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return float(peak if sys.platform == "darwin" else peak * 1024)


#: Slice counter (``services.worker.runtime.slice_counters``) -> exported counter name.
_SLICE_COUNTERS = {
    "slices": ("scls_worker_slices_total", "Slices committed"),
    "generated_tokens": ("scls_worker_generated_tokens_total",
                         "Tokens generated and committed"),
    "pad_tokens": ("scls_worker_pad_tokens_total", "Padding tokens computed (left padding)"),
    "invalid_tokens": ("scls_worker_invalid_tokens_total",
                       "Tokens computed for rows that had already finished (SLS)"),
    "recomputed_tokens": ("scls_worker_recomputed_tokens_total",
                          "Context tokens re-prefilled at slice starts"),
    "busy_s": ("scls_worker_busy_seconds_total", "Seconds the engine computed committed slices"),
    "model_busy_s": ("scls_worker_model_busy_seconds_total",
                     "Seconds the instance's cost model gives the committed slices as they ran "
                     "(busy / model busy: how far the engine runs from its profile)"),
    "first_slice_finishes": ("scls_worker_early_returns_total",
                             "Requests finished within their first slice"),
    "kv_hits": ("scls_worker_kv_hits_total",
                "Rows that resumed from this instance's KV pool (no prefill)"),
    "kv_misses": ("scls_worker_kv_misses_total",
                  "Rows with generated tokens that re-prefilled (evicted, moved or stale)"),
    "kv_evictions": ("scls_worker_kv_evictions_total",
                     "Retained K/V entries evicted (least recently used) to make room"),
    "kv_miss_handbacks": ("scls_worker_kv_miss_handbacks_total",
                          "Rows planned to resume whose K/V was evicted meanwhile, handed back "
                          "because re-prefilling them would not fit the batch budget"),
    "preemptions": ("scls_worker_preemptions_total",
                    "Requests the memory-bounded ILS engine (ils-vllm) took out of its batch "
                    "to recompute later, for lack of KV memory"),
}


class WorkerMetrics:
    """What ``scls worker`` exports on its metrics port; fed by each committed slice."""

    def __init__(self, device: torch.device, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.counters = {key: Counter(name, text, registry=r)
                         for key, (name, text) in _SLICE_COUNTERS.items()}
        self.requests_finished = Counter(
            "scls_worker_requests_finished_total", "Requests this worker finished", registry=r
        )
        self.rejected = Counter(
            "scls_worker_commits_rejected_total",
            "Slice commits rejected by the fence (the batch was swept meanwhile)", registry=r,
        )
        self.slice_seconds = Histogram(
            "scls_worker_slice_seconds",
            "Measured engine time of each committed slice (ILS: a request's time in the engine)",
            buckets=SLICE_BUCKETS, registry=r,
        )
        self.slice_estimated = Histogram(
            "scls_worker_slice_estimated_seconds",
            "The scheduler's estimate for each committed slice (the batch's estimated_s)",
            buckets=SLICE_BUCKETS, registry=r,
        )
        self.memory_peak = Gauge(
            "scls_worker_memory_peak_bytes",
            "Peak memory: torch.cuda.max_memory_allocated on CUDA, peak process RSS on CPU",
            registry=r,
        )
        self.memory_peak.set_function(lambda: peak_memory_bytes(device))
        self.kv_pool_used = Gauge(
            "scls_worker_kv_pool_used_bytes",
            "Bytes of retained K/V in this instance's pool (read at scrape)", registry=r,
        )
        self.kv_pool_capacity = Gauge(
            "scls_worker_kv_pool_capacity_bytes",
            "Capacity of this instance's KV pool (0: retention off)", registry=r,
        )

    def watch_pool(self, used: Callable[[], float], capacity: float) -> None:
        """Export a KV pool: ``used()`` is read at each scrape."""
        self.kv_pool_used.set_function(used)
        self.kv_pool_capacity.set(capacity)

    def observe_commit(
        self, counters: Mapping[str, float], finished: int, actual_s: float, estimated_s: float
    ) -> None:
        """Add one committed slice's counters (the same dict the commit adds to Redis)."""
        for key, counter in self.counters.items():
            counter.inc(counters.get(key, 0))
        self.requests_finished.inc(finished)
        self.slice_seconds.observe(actual_s)
        self.slice_estimated.observe(estimated_s)


# --- the exporter ---------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running Prometheus HTTP exporter (a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class MetricsPortError(ValueError):
    """The configured metrics port cannot be bound (the message says how to fix it)."""


#: A liveness check: (alive, JSON body). ``GET /livez`` answers 200 or 503 with the body.
HealthCheck = Callable[[], tuple[bool, Mapping[str, object]]]


def start_exporter(
    registry: CollectorRegistry, settings: Settings, health: HealthCheck | None = None
) -> MetricsServer | None:
    """Serve ``registry`` on ``settings.metrics_port`` (None when that is 0: disabled),
    and ``health`` at ``/livez`` when given (the worker's liveness).

    Raises:
        MetricsPortError: the port is taken or the address cannot be bound.
    """
    if not settings.metrics_port:
        return None
    try:
        server = serve_metrics(registry, settings.metrics_port, settings.metrics_host, health)
    except OSError as exc:
        raise MetricsPortError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc}); "
            "set SCLS_METRICS_PORT to a free port, or 0 to disable the exporter"
        ) from None
    log.info("metrics_serving", host=settings.metrics_host, port=server.port)
    return server


def serve_metrics(
    registry: CollectorRegistry, port: int, host: str = "0.0.0.0",
    health: HealthCheck | None = None,
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread, and
    ``health`` at ``/livez`` when given; any other path is 404.

    Raises:
        OSError: the port is taken.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    server.set_app(_routed(server.get_app(), health))
    return MetricsServer(server, thread)


def _routed(app: Any, health: HealthCheck | None) -> Any:
    """The exporter's WSGI app at ``/metrics`` only (prometheus_client answers every path
    with the metrics, so a mistyped probe path would pass), plus ``GET /livez``: 200 or 503
    and ``health``'s JSON body. /livez reads only process state (no Redis call), so it
    answers while Redis is down."""

    def respond(start_response: Callable[..., Any], status: str, body: object) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(payload)))])
        return [payload]

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/metrics":
            return app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/livez" and health is not None:
            alive, body = health()
            return respond(start_response, "200 OK" if alive else "503 Service Unavailable",
                           body)
        served = "/metrics, /livez" if health is not None else "/metrics"
        return respond(start_response, "404 Not Found",
                       {"error": f"no such path: {path}; this port serves {served}"})

    return wsgi
