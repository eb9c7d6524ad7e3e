"""KV retention through Redis and the whole scheduler + worker path (docs/design.md §6.8):
where a request's K/V lives is recorded by the commit that left it, forgotten by every
other outcome, and correctness never depends on it (eviction, moves, worker death)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prometheus_client import generate_latest

from services.worker.service import WorkerService
from shared.core.records import CommitItem
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import load_codec
from shared.settings import Settings
from tests.helpers import greedy_reference, metric
from tests.test_system import drive, make_cluster, submit

BOOT = "1234.5"


def claim(store: Store, instance: str, rids: list[str], batch_id: str) -> dict[str, int]:
    fences = store.claim_batch(batch_id, instance, rids, 4, deadline=1e12)
    assert set(fences) == set(rids)
    return fences


def commit(store: Store, batch_id: str, fences: dict[str, int], kept: bool,
           finish: FinishReason | None = None) -> None:
    batch = store.get_batch(batch_id)
    items = [CommitItem(rid, fence, [5], finish, "x", kv_retained=kept)
             for rid, fence in fences.items()]
    store.commit_slice(batch, items, {"slices": 1}, 60, kv_boot=BOOT)


def location(store: Store, rid: str) -> tuple[str, int, str]:
    rec = store.get_request(rid)
    return rec.kv_instance, rec.kv_fence, rec.kv_boot


def test_commit_records_moves_and_forgets_the_kv_location(store: Store) -> None:
    rid = submit(store, [7, 8, 9], max_tokens=8)
    fences = claim(store, "w0", [rid], "b1")
    commit(store, "b1", fences, kept=True)
    assert location(store, rid) == ("w0", fences[rid], BOOT)
    # Next slice on w1 (the scheduler moved it): w1 keeps it now, w0 is told to drop.
    fences = claim(store, "w1", [rid], "b2")
    commit(store, "b2", fences, kept=True)
    assert location(store, rid) == ("w1", fences[rid], BOOT)
    assert store.take_kv_drops("w0") == [rid] and store.take_kv_drops("w0") == []
    # A slice on w1 that kept nothing (its pool was full): the location is forgotten,
    # and w1 needs no message (it knows).
    fences = claim(store, "w1", [rid], "b3")
    commit(store, "b3", fences, kept=False)
    assert location(store, rid) == ("", 0, "")
    assert store.take_kv_drops("w1") == []
    # Finishing on w0 after w1 kept it: w1 is told, the location cleared.
    fences = claim(store, "w1", [rid], "b4")
    commit(store, "b4", fences, kept=True)
    fences = claim(store, "w0", [rid], "b5")
    commit(store, "b5", fences, kept=False, finish=FinishReason.LENGTH)
    assert location(store, rid) == ("", 0, "")
    assert store.take_kv_drops("w1") == [rid]


def test_requeue_cancel_and_fail_forget_the_location(store: Store) -> None:
    rids = [submit(store, [7, 8], max_tokens=8) for _ in range(3)]
    fences = claim(store, "w0", rids, "b1")
    commit(store, "b1", fences, kept=True)
    assert all(location(store, r)[0] == "w0" for r in rids)
    # Requeue (worker error, dead worker, hand-back): it will re-prefill anywhere.
    claim(store, "w0", [rids[0]], "b2")
    store.requeue_batch(store.get_batch("b2"), "boom", 3, 60)
    # Cancel while pending, and fail while pending.
    store.cancel(rids[1], "client went away", 60)
    store.fail_pending(rids[2], FinishReason.NEVER_FITS, "too big", 60)
    assert all(location(store, r) == ("", 0, "") for r in rids)
    assert store.take_kv_drops("w0") == sorted(rids)


def test_eviction_clears_only_a_location_that_still_names_the_instance(store: Store) -> None:
    a, b = (submit(store, [7], max_tokens=8) for _ in range(2))
    commit(store, "b1", claim(store, "w0", [a], "b1"), kept=True)
    commit(store, "b2", claim(store, "w1", [b], "b2"), kept=True)
    assert store.forget_kv("w0", [a, b]) == 1  # b lives on w1: untouched
    assert location(store, a) == ("", 0, "") and location(store, b)[0] == "w1"
    assert store.forget_kv("w0", []) == 0


def _texts(store: Store, rids: list[str]) -> list[list[int]]:
    records = store.get_requests(rids)
    assert all(r is not None and r.status is RequestStatus.FINISHED for r in records)
    return [r.generated_ids for r in records]


PROMPTS = ["The capital of France is", "Hi", "A much longer prompt about slices.", "ok"]


def _expected(tiny: LoadedModel) -> list[list[int]]:
    """generate()'s greedy tokens without the EOS it appends (the engine never returns it)."""
    codec = load_codec("tiny-random", Path("unused"))
    out = []
    for p in PROMPTS:
        ref = greedy_reference(tiny, codec.encode(p), 14, require_full=False)
        out.append(ref[:-1] if ref and ref[-1] in tiny.codec.eos_ids else ref)
    return out


def _run(settings: Settings, tiny: LoadedModel, store: Store, workers: int = 2
         ) -> tuple[list[str], list[WorkerService]]:
    codec = load_codec("tiny-random", Path("unused"))
    sched, cluster = make_cluster(settings, tiny, n_workers=workers)
    rids = [submit(store, codec.encode(p), max_tokens=14) for p in PROMPTS]
    drive(store, sched, cluster, rids)
    return rids, cluster


def test_retention_on_and_off_give_generate_and_on_recomputes_nothing(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    expected = _expected(tiny)
    stats = {}
    for on in (True, False):
        store.r.flushdb()
        s = settings.model_copy(update={"kv_retention": on})
        rids, cluster = _run(s, tiny, store)
        assert _texts(store, rids) == expected
        stats[on] = store.stats()
        pools = [w.runtime.pool for w in cluster]
        pages = [generate_latest(w.metrics.registry).decode() for w in cluster]
        for name, key in (("scls_worker_kv_hits_total", "kv_hits"),
                          ("scls_worker_kv_misses_total", "kv_misses")):
            assert sum(metric(p, name) for p in pages) == stats[on].get(key, 0)
        if on:
            assert all(p is not None and len(p) == 0 for p in pools)  # finished: nothing kept
            assert all(metric(p, "scls_worker_kv_pool_capacity_bytes") > 0 for p in pages)
        else:
            assert pools == [None, None]
    assert stats[True]["kv_hits"] > 0 and stats[True]["recomputed_tokens"] == 0
    assert stats[False]["recomputed_tokens"] > 0 and stats[False].get("kv_hits", 0) == 0


def test_a_tiny_pool_evicts_and_still_gives_the_same_text(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    expected = _expected(tiny)
    room = tiny.info.kv_bytes_per_token * 45  # about one request's cache
    s = settings.model_copy(update={"kv_pool_bytes": room})
    rids, _ = _run(s, tiny, store, workers=1)
    assert _texts(store, rids) == expected
    stats = store.stats()
    assert stats["kv_evictions"] > 0 and stats["kv_misses"] > 0 and stats["kv_hits"] > 0


def test_a_dead_worker_loses_its_pool_and_every_request_finishes_with_the_same_text(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Worker w0 dies after one round (its pool is gone, its queued batches swept); the
    scheduler sees the dead instance and moves its requests to w1, which re-prefills."""
    expected = _expected(tiny)
    s = settings.model_copy(update={"max_batch_size": 2})
    sched, (w0, w1) = make_cluster(s, tiny, n_workers=2)
    rids = [submit(store, tiny.codec.encode(p), max_tokens=14) for p in PROMPTS]
    sched.cycle()
    w0.serve(burst=True)
    w1.serve(burst=True)
    kept_on_w0 = [r for r in store.get_requests(rids) if r.kv_instance == "w0"]
    assert kept_on_w0  # w0 held some requests' K/V when it died
    store.deregister_instance("w0")  # as if its heartbeat expired
    drive(store, sched, [w1], rids)
    assert _texts(store, rids) == expected
    assert all(r.kv_instance == "" for r in store.get_requests(rids))


def test_a_restarted_worker_with_the_same_id_does_not_trust_old_locations(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    expected = _expected(tiny)
    sched, (w0,) = make_cluster(settings, tiny)
    rids = [submit(store, tiny.codec.encode(p), max_tokens=14) for p in PROMPTS]
    sched.cycle()
    w0.serve(burst=True)
    assert any(r.kv_instance == "w0" for r in store.get_requests(rids))
    _, (again,) = make_cluster(settings, tiny)  # same id "w0", a new boot, an empty pool
    assert again.runtime.boot != w0.runtime.boot
    drive(store, sched, [again], rids)
    assert _texts(store, rids) == expected
    assert store.stats()["kv_misses"] > 0


def test_a_row_whose_kv_was_evicted_is_handed_back_when_its_prefill_would_not_fit(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Two requests ran a slice together and kept their K/V on w0; the scheduler plans
    their next slice as resumed (priced without prefill). Before it starts, the younger
    one's entry is evicted: re-prefilling it would need its prefill activations too, which
    this worker's budget (between the two figures, by its own memory model) does not hold.
    The slice runs the older row alone and commits the younger one with no tokens (pending
    again, no retry counted); then both finish with generate()'s greedy tokens."""
    s = settings.model_copy(update={"max_batch_size": 2, "horizon_s": 1e6})
    codec = load_codec("tiny-random", Path("unused"))
    expected = _expected(tiny)[:2]
    sched, (worker,) = make_cluster(s, tiny)
    rids = [submit(store, codec.encode(p), max_tokens=14) for p in PROMPTS[:2]]
    (first,) = sched.cycle().batches
    worker.runtime.run_batch(first)
    (second,) = sched.cycle().batches
    assert set(store.get_batch(second).request_ids) == set(rids)
    records = {r.id: r for r in store.get_requests(rids)}
    young = max(rids, key=lambda r: records[r].arrival)
    old = next(r for r in rids if r != young)
    runtime = worker.runtime
    assert runtime.pool is not None and runtime.pool.discard(young)
    cost, budget = runtime.cost, runtime.memory_budget_bytes
    # a measured-like resume envelope: a resumed row feeds one token, no prefill activations
    runtime.cost = replace(cost, resume_act_coef=(0.0,) * len(cost.act_coef),
                           resume_margin=cost.mem_margin)
    ctx = {r: len(records[r].prompt_ids) + len(records[r].generated_ids) for r in rids}
    resumed = float(runtime.cost.mixed_memory(2, max(ctx.values()), s.slice_length, 0, 0))
    with_miss = float(runtime.cost.mixed_memory(2, max(ctx.values()), s.slice_length, 1,
                                                ctx[young]))
    assert with_miss > resumed
    runtime.memory_budget_bytes = int((resumed + with_miss) / 2)
    try:
        assert runtime.run_batch(second)["status"] == "committed"
    finally:
        runtime.cost, runtime.memory_budget_bytes = cost, budget
    handed, ran = store.get_request(young), store.get_request(old)
    assert handed.status is RequestStatus.PENDING and handed.retries == 0
    assert handed.generated_ids == records[young].generated_ids  # nothing computed
    assert len(ran.generated_ids) > len(records[old].generated_ids)
    assert store.stats()["kv_miss_handbacks"] == 1
    drive(store, sched, [worker], rids)
    assert _texts(store, rids) == expected
