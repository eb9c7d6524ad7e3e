"""One benchmark run per policy: start a fresh deployment (or attach to one), replay the
workload over HTTP, and compute docs/design.md §7's metrics from the client's outcomes
and the workers' counters in Redis.

Worker-side figures are the deltas of the cumulative stats hashes the workers write at
every commit, read before and after the run; load imbalance of expected completion time
comes from sampling each instance's queued estimated work while the run goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from services.bench.client import ClientConfig, run_workload
from shared.bench.report import Run
from shared.bench.workload import WorkItem
from shared.core.keys import Keys
from shared.core.store import Store, connect
from shared.obs.metrics import (
    InstanceUsage,
    RequestOutcome,
    counter_delta,
    occupancy,
    summarize,
)
from shared.policy.presets import policy_of_mode
from shared.settings import Settings


@dataclass
class LoadSampler:
    """Samples each instance's expected completion time (queued estimated seconds) on a
    background thread, so the imbalance of ECT is measured, not inferred."""

    store: Store
    instance_ids: Sequence[str]
    interval_s: float = 0.25
    samples: list[list[float]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows running, per instance and sample
    kv_share: list[float] = field(default_factory=list)  # KV held / its memory
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LoadSampler:
        """Begin sampling."""
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            loads = self.store.instance_loads(list(self.instance_ids))
            if any(load.batches for load in loads.values()):  # idle moments say nothing
                self.samples.append([loads[i].estimated_s for i in self.instance_ids])
            for rows, share in self.store.instance_occupancy(list(self.instance_ids)).values():
                self.rows.append(rows)
                if share >= 0:
                    self.kv_share.append(share)

    def stop(self) -> list[list[float]]:
        """Stop and return the samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples


def instance_usage(
    store: Store, ids: Sequence[str], before: dict[str, dict[str, float]]
) -> list[InstanceUsage]:
    """Each instance's counters accumulated since ``before``."""
    usage = []
    for iid in ids:
        delta = counter_delta(store.stats(iid), before.get(iid, {}))
        usage.append(InstanceUsage(
            id=iid, busy_s=delta.get("busy_s", 0.0), slices=int(delta.get("slices", 0)),
            generated_tokens=int(delta.get("generated_tokens", 0)), counters=delta,
        ))
    return usage


def failures_of(outcomes: Sequence[RequestOutcome]) -> list[dict[str, object]]:
    """The first 50 failed requests of a run: workload index and error."""
    return [{"index": o.index, "error": o.error} for o in outcomes if not o.ok][:50]


def measure(
    store: Store,
    items: Sequence[WorkItem],
    client: ClientConfig,
    on_sent: Callable[[], None] = lambda: None,
    on_done: Callable[[RequestOutcome], None] = lambda _o: None,
) -> dict[str, object]:
    """Replay ``items`` against a ready deployment and return the run's metrics."""
    ids = [inst.id for inst in store.live_instances()]
    if not ids:
        raise RuntimeError("no live worker instance: start workers before benchmarking")
    before_global = store.stats()
    before = {iid: store.stats(iid) for iid in ids}
    sampler = LoadSampler(store, ids).start()
    try:
        outcomes, duration = asyncio.run(run_workload(items, client, on_sent, on_done))
    finally:
        samples = sampler.stop()
    _wait_for_counters(store, before_global, outcomes)
    counters = counter_delta(store.stats(), before_global)
    metrics = summarize(outcomes, counters, instance_usage(store, ids, before), duration,
                        samples)
    # running rows and KV in use as the workers' heartbeats published them
    metrics.update(occupancy(sampler.rows, sampler.kv_share))
    metrics["instance_ids"] = ids
    metrics["instance_profiles"] = {inst.id: (inst.profile, inst.memory_budget_bytes,
                                              inst.context_limit, inst.mode)
                                    for inst in store.live_instances()}
    metrics["overheads"] = slice_overheads(store, counters)
    queue = [o.queue_time_s for o in outcomes if o.ok and o.queue_time_s is not None]
    # the scheduler's reaction (submit -> wake -> cycle -> claim) when nothing waits ahead
    metrics["overheads"]["reaction_s"] = float(np.percentile(queue, 10)) if queue else 0.0
    metrics["failures"] = failures_of(outcomes)
    return metrics


def slice_overheads(store: Store, counters: dict[str, float]) -> dict[str, float]:
    """System overheads per slice, from the batch hashes' timestamps (for the simulator).

    ``dispatch_s``: claim to start, 10th percentile (an idle worker picking a job up from
    its RQ queue; higher percentiles include waiting behind other batches);
    ``in_job_s``: mean start-to-commit wall time minus the engine's mean busy time per
    slice (reading the batch, decoding text, the commit itself). ILS jobs commit when each
    request ends, so only their dispatch is an overhead.
    """
    fields = store.batch_fields("created_at", "started_at", "committed_at")
    rows = [tuple(float(v) for v in row) for row in fields if None not in row]
    if not rows:
        return {"dispatch_s": 0.0, "in_job_s": 0.0, "batches": 0}
    dispatch = float(np.percentile([s - c for c, s, _ in rows], 10))
    wall = float(np.mean([e - s for _, s, e in rows]))
    slices = counters.get("slices", 0.0)
    busy = counters.get("busy_s", 0.0) / slices if slices else 0.0
    in_job = 0.0 if counters.get("concurrency_s", 0.0) > 0 else max(0.0, wall - busy)
    return {"dispatch_s": max(0.0, dispatch), "in_job_s": in_job, "batches": len(rows)}


def _wait_for_counters(
    store: Store, before: dict[str, float], outcomes: Sequence[RequestOutcome],
    timeout_s: float = 10.0,
) -> None:
    """Let in-flight commits land: a response is sent as soon as the final event exists,
    which the same Lua commit writes with the counters, so this is normally immediate."""
    want = sum(1 for o in outcomes if o.ok)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = counter_delta(store.stats(), before).get("requests_finished", 0.0)
        if done >= want:
            return
        time.sleep(0.1)


def run_policy(
    base: Settings,
    policy: str,
    items: Sequence[WorkItem],
    client: ClientConfig,
    rate: float | None,
    log_dir: Path | None,
    on_sent: Callable[[], None] = lambda: None,
    on_done: Callable[[RequestOutcome], None] = lambda _o: None,
    ready_timeout_s: float = 3600.0,
) -> Run:
    """Start a fresh local deployment with ``policy``, run the workload, stop it."""
    from services.launcher import LocalDeployment

    settings = base.model_copy(update={"policy": policy, "port": 0})
    with LocalDeployment(settings, log_dir=log_dir) as deployment:
        store = Store(connect(deployment.settings.redis_url or ""),
                      Keys(deployment.settings.key_prefix))
        try:
            cfg = ClientConfig(**{**client.__dict__, "base_url": deployment.url})
            metrics = measure(store, items, cfg, on_sent, on_done)
        finally:
            store.close()
    metrics["policy"] = policy
    return Run(policy, rate, metrics)


def attach_run(
    settings: Settings,
    items: Sequence[WorkItem],
    client: ClientConfig,
    rate: float | None,
    on_sent: Callable[[], None] = lambda: None,
    on_done: Callable[[RequestOutcome], None] = lambda _o: None,
) -> Run:
    """Benchmark a deployment that is already running (its own policy)."""
    if not settings.redis_url:
        raise ValueError("attaching with --url needs SCLS_REDIS_URL (the deployment's Redis) "
                         "to read the workers' counters")
    store = Store(connect(settings.redis_url), Keys(settings.key_prefix))
    try:
        policy = _deployment_policy(store) or settings.policy
        metrics = measure(store, items, client, on_sent, on_done)
    finally:
        store.close()
    metrics["policy"] = policy
    return Run(policy, rate, metrics)


#: Metrics that come from scls' workers and Redis (counters, slices, load samples): an
#: external server's run reports them as unknown.
SERVER_SIDE = ("slices_per_request", "early_return_ratio", "avg_batch_size", "slices",
               "generated_tokens", "pad_tokens", "invalid_tokens", "recomputed_tokens",
               "recomputed_share", "kv_hits", "kv_misses", "kv_evictions", "busy_s_total",
               "imbalance_busy_std", "imbalance_busy_max_mean", "imbalance_ect_std",
               "imbalance_ect_max_mean")


def served_model(base_url: str, timeout_s: float = 10.0) -> str:
    """The first model an OpenAI-compatible server lists at ``GET /v1/models``.

    Raises:
        ValueError: it does not answer, or lists no model.
    """
    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/v1/models", timeout=timeout_s)
        resp.raise_for_status()
        models = [m["id"] for m in resp.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{base_url} does not answer GET /v1/models as an OpenAI-compatible "
                         f"server ({type(exc).__name__}: {exc})") from None
    if not models:
        raise ValueError(f"{base_url} lists no model at GET /v1/models")
    return str(models[0])


def external_run(
    name: str,
    items: Sequence[WorkItem],
    client: ClientConfig,
    rate: float | None,
    on_sent: Callable[[], None] = lambda: None,
    on_done: Callable[[RequestOutcome], None] = lambda _o: None,
) -> Run:
    """Replay ``items`` against an external OpenAI-compatible server (``client.base_url``,
    serving ``client.model``): only what its client sees is measured (no worker counters,
    no Redis), so its table column has latency and throughput, not slices or KV."""
    outcomes, duration = asyncio.run(run_workload(items, client, on_sent, on_done))
    metrics = summarize(outcomes, {}, [], duration)
    # what only our workers' counters and Redis can say: unknown here, not zero
    metrics.update(dict.fromkeys(SERVER_SIDE))
    metrics.update(policy=name, external={"url": client.base_url, "model": client.model},
                   failures=failures_of(outcomes))
    return Run(name, rate, metrics)


def _deployment_policy(store: Store) -> str | None:
    """The policy a running deployment serves, from its instances' mode (best effort)."""
    modes = {inst.mode for inst in store.live_instances()}
    return policy_of_mode(modes)
