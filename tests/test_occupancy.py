"""What an instance publishes about its occupancy (rows running, KV held) and what
``scls bench`` makes of it: real Redis, real worker runtime on the tiny model."""

from __future__ import annotations

import pytest

from services.worker.service import create_worker
from shared.core.records import RequestParams, RequestRecord, new_request_id, now
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.obs.metrics import occupancy
from shared.settings import Settings


def test_occupancy_percentiles_count_busy_samples_and_kv_over_all() -> None:
    got = occupancy([0, 0, 4, 8, 12], [0.0, 0.5, 1.0])
    assert (got["running_p10"], got["running_p50"], got["running_p90"]) == (
        pytest.approx(4.8), 8.0, pytest.approx(11.2))
    assert got["kv_in_use_mean"] == 0.5 and got["kv_in_use_p90"] == pytest.approx(0.9)
    assert occupancy([0, 0], []) == dict.fromkeys(
        ("running_p10", "running_p50", "running_p90", "kv_in_use_mean", "kv_in_use_p90"))


def test_a_slice_worker_publishes_its_running_rows_and_kv_while_a_slice_runs(
        settings: Settings, tiny: LoadedModel, store: Store) -> None:
    """Captured mid-slice (at a streamed step): the slice's rows and its cache by the
    memory model; zero rows once the slice committed, the pool's K/V still held."""
    worker = create_worker(settings, instance_id="i0", loaded=tiny)
    runtime = worker.runtime
    store.register_instance(runtime.instance_info(), ttl_s=600)
    seen = []
    submit = runtime.publisher.submit
    runtime.publisher.submit = lambda bid, steps: (seen.append(runtime.heartbeat_fields()),
                                                  submit(bid, steps))
    ids = []
    for prompt in ([5, 6, 7, 8], [9, 10]):
        rec = RequestRecord(id=new_request_id(), prompt_ids=prompt, arrival=now(),
                            params=RequestParams(max_tokens=12, ignore_eos=True, stream=True),
                            model="tiny-random")
        store.submit(rec)
        ids.append(rec.id)
    store.claim_batch("b0", "i0", ids, 4, now() + 600)
    assert runtime.run_batch("b0")["status"] == "committed"
    expected_cache = int(runtime.cost.kv_cache_bytes(2, 4, 4))
    assert seen and all(f["running_rows"] == 2 for f in seen)
    assert all(f["kv_in_use_bytes"] >= expected_cache for f in seen)
    after = runtime.heartbeat_fields()
    assert after["running_rows"] == 0 and after["kv_in_use_bytes"] == after[
        "kv_pool_used_bytes"] > 0  # two unfinished rows kept
    store.heartbeat("i0", 600, extra=after)
    rows, share = store.instance_occupancy(["i0"])["i0"]
    whole = runtime.memory_budget_bytes + runtime.pool.capacity_bytes
    assert rows == 0 and share == pytest.approx(after["kv_in_use_bytes"] / whole)
    assert store.instance_occupancy(["nobody"]) == {}
