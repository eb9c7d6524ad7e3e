"""The scheduler and workers together, in one process, on a real Redis and the real
transformers code path (tiny-random model): slicing, fencing, recovery, invariants."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import redis

from services.scheduler.service import Scheduler, create_scheduler
from services.worker.service import WorkerService, create_worker
from shared.core.records import RequestParams, RequestRecord, new_request_id, now
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import load_codec
from shared.settings import Settings
from tests.helpers import greedy_reference


def make_cluster(
    settings: Settings, tiny: LoadedModel, n_workers: int = 1
) -> tuple[Scheduler, list[WorkerService]]:
    sched = create_scheduler(settings)
    workers = [create_worker(settings, instance_id=f"w{i}", loaded=tiny) for i in range(n_workers)]
    for w in workers:
        # No heartbeat thread in these in-process tests: a TTL long enough for the test.
        w.store.register_instance(w.runtime.instance_info(), ttl_s=600)
    return sched, workers


def submit(store: Store, prompt_ids: list[int], **params: object) -> str:
    rec = RequestRecord(
        id=new_request_id(), prompt_ids=prompt_ids,
        params=RequestParams(**params), arrival=now(), model="tiny-random",
    )
    store.submit(rec)
    return rec.id


def places(store: Store, rid: str) -> int:
    """How many places hold a request (docs/design.md §6.1, invariant 1, says exactly one)."""
    count = int(store.r.zscore(store.keys.pending, rid) is not None)
    for bid, _ in store.inflight_batches():
        batch = store.get_batch(bid)
        count += int(batch is not None and rid in batch.fences)
    rec = store.get_request(rid)
    count += int(rec is not None and rec.status.is_terminal)
    return count


def drive(
    store: Store, sched: Scheduler, workers: Iterable[WorkerService], rids: list[str],
    max_rounds: int = 200,
) -> None:
    """Alternate scheduler cycles and worker bursts until every request is terminal,
    checking invariant 1 at every step."""
    workers = list(workers)
    for _ in range(max_rounds):
        sched.cycle()
        for rid in rids:
            assert places(store, rid) == 1, rid
        for w in workers:
            w.serve(burst=True)
        for rid in rids:
            assert places(store, rid) == 1, rid
        records = store.get_requests(rids)
        if all(r is not None and r.status.is_terminal for r in records):
            return
    raise AssertionError("requests did not finish")



def test_greedy_through_many_slices_equals_generate(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Acceptance 2 / invariant 5: slicing changes scheduling, not results."""
    codec = load_codec("tiny-random", Path("unused"))
    prompts = ["The capital of France is", "Hi", "A much longer prompt about slices."]
    sched, workers = make_cluster(settings, tiny)
    rids = [submit(store, codec.encode(p), max_tokens=14) for p in prompts]
    drive(store, sched, workers, rids)
    for prompt, rid in zip(prompts, rids, strict=True):
        rec = store.get_request(rid)
        expected = greedy_reference(tiny, codec.encode(prompt), 14, require_full=False)
        assert rec.status is RequestStatus.FINISHED
        assert rec.slices >= 3  # slice length 4, 14 tokens
        assert rec.generated_ids == expected
        assert rec.text == codec.decode(expected)


def test_seeded_sampling_is_the_same_for_any_slice_length(
    settings: Settings, tiny: LoadedModel, rclient: redis.Redis, store: Store
) -> None:
    codec = load_codec("tiny-random", Path("unused"))
    texts = []
    for slice_length in (4, 64):
        rclient.flushdb()
        s = settings.model_copy(update={"slice_length": slice_length})
        sched, workers = make_cluster(s, tiny)
        others = [submit(store, codec.encode(f"noise {i}"), max_tokens=9, temperature=1.0,
                         seed=i) for i in range(slice_length // 16)]
        rid = submit(store, codec.encode("Once upon a time"), max_tokens=24, temperature=0.9,
                     top_p=0.95, seed=4242)
        drive(store, sched, workers, [rid, *others])
        rec = store.get_request(rid)
        assert rec.slices == (6 if slice_length == 4 else 1)
        texts.append(rec.text)
    assert texts[0] == texts[1] and len(texts[0]) > 0


def test_two_workers_both_serve_and_each_request_completes_once(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Acceptance 3: two instances share one run; every request finishes exactly once."""
    s = settings.model_copy(update={"max_batch_size": 3, "max_queued_batches": 1})
    sched, workers = make_cluster(s, tiny, n_workers=2)
    rids = [submit(store, [10 + i, 20, 30], max_tokens=6, ignore_eos=True) for i in range(12)]
    drive(store, sched, workers, rids)
    for rid in rids:
        rec = store.get_request(rid)
        assert rec.status is RequestStatus.FINISHED and len(rec.generated_ids) == 6
        finals = [e for e in store.events(rid) if e["kind"] == "final"]
        assert len(finals) == 1
    assert store.stats("w0")["slices"] > 0 and store.stats("w1")["slices"] > 0
    assert store.stats()["generated_tokens"] == 12 * 6


def test_dead_worker_batch_is_swept_and_its_late_run_changes_nothing(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Invariants 2 and 3: a presumed-dead worker's batch goes to a live one; when the dead
    one wakes up and runs its job, the fenced start/commit rejects it."""
    sched, (w0, w1) = make_cluster(settings, tiny, n_workers=2)
    rid = submit(store, [5, 6, 7], max_tokens=4)
    sched.cycle()
    holder = store.get_request(rid).batch
    stale_batch = store.get_batch(holder)
    dead, alive = (w0, w1) if stale_batch.instance == "w0" else (w1, w0)
    store.r.delete(store.keys.instance(dead.instance_id))  # heartbeat lapsed
    assert sched.sweep({alive.instance_id}) == 1
    assert store.get_request(rid).status is RequestStatus.PENDING
    assert dead.runtime.run_batch(stale_batch.id) == {"status": "skipped"}
    drive(store, sched, [alive], [rid])
    rec = store.get_request(rid)
    assert rec.status is RequestStatus.FINISHED and len(rec.generated_ids) == 4
    assert rec.retries == 1


def test_failing_request_ends_failed_with_its_reason(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Invariant 3: a request whose slice keeps raising fails with the stated error."""
    s = settings.model_copy(update={"max_retries": 1})
    sched, workers = make_cluster(s, tiny)
    rid = submit(store, [5, 99_999], max_tokens=4)  # token id outside the vocabulary
    for _ in range(4):
        sched.cycle()
        for w in workers:
            w.serve(burst=True)
    rec = store.get_request(rid)
    assert rec.status is RequestStatus.FAILED and rec.finish_reason is FinishReason.ERROR
    assert "IndexError" in rec.error and "gave up after 2" in rec.error
    assert store.events(rid)[-1]["kind"] == "final"


def test_request_that_never_fits_fails_at_once(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Invariant 3/4: a request too big for every instance fails with the numbers."""
    _, (probe,) = make_cluster(settings, tiny)
    budget = int(probe.runtime.cost.slice_memory(1, 100, settings.slice_length))
    # The whole budget for batches (no KV pool carved out of it): the numbers stay exact.
    s = settings.model_copy(update={"memory_budget_bytes": budget, "kv_pool_bytes": 0})
    sched, _ = make_cluster(s, tiny)
    small = submit(store, [5] * 4, max_tokens=4)
    huge = submit(store, [5] * 2000, max_tokens=4)
    report = sched.cycle()
    assert report.failed_never_fit == 1
    rec = store.get_request(huge)
    assert rec.finish_reason is FinishReason.NEVER_FITS and "budget" in rec.error
    assert store.get_request(small).status is RequestStatus.RUNNING


def test_batches_respect_the_memory_budget(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Invariant 4 (basic form): no batch's estimate exceeds the instance budget."""
    _, (probe,) = make_cluster(settings, tiny)
    cost = probe.runtime.cost
    budget = int(cost.slice_memory(3, 40, settings.slice_length)) + 1
    assert cost.slice_memory(4, 40, settings.slice_length) > budget
    s = settings.model_copy(update={"memory_budget_bytes": budget, "kv_pool_bytes": 0,
                                    "max_batch_size": 8,
                                    "max_queued_batches": 8, "horizon_s": 1e9})
    sched, workers = make_cluster(s, tiny)
    rids = [submit(store, [7] * 40, max_tokens=2) for _ in range(7)]
    sched.cycle()
    batches = [store.get_batch(bid) for bid, _ in store.inflight_batches()]
    sizes = sorted(len(b.fences) for b in batches)
    assert sum(sizes) == 7 and max(sizes) == 3
    assert all(float(store.r.hget(store.keys.batch(b.id), "estimated_bytes")) <= budget
               for b in batches)
    drive(store, sched, workers, rids)


def test_only_the_leader_dispatches(settings: Settings, tiny: LoadedModel, store: Store) -> None:
    leader, workers = make_cluster(settings, tiny)
    standby = create_scheduler(settings)
    standby.holder_id = "standby"
    submit(store, [5, 6], max_tokens=2)
    assert leader.cycle().leader
    report = standby.cycle()
    assert not report.leader and report.batches == []
    leader.store.release_leader(leader.holder_id)
    assert standby.cycle().leader


def test_drain_hands_queued_batches_back_without_a_retry(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    sched, (w0,) = make_cluster(settings, tiny)
    rid = submit(store, [5, 6], max_tokens=3)
    sched.cycle()
    assert store.get_request(rid).status is RequestStatus.RUNNING
    assert w0.drain() == 1
    rec = store.get_request(rid)
    assert rec.status is RequestStatus.PENDING and rec.retries == 0
    assert store.live_instances() == []


def test_one_kv_memory_drops_what_a_slice_does_not_continue(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Running sets give the instance one KV memory (docs/design.md §2): its slices may
    use the whole budget, so the pool keeps only the running set. A kept request that the
    next slice does not continue is dropped before the slice runs and its location is
    forgotten in Redis (it re-prefills wherever it goes next); outputs stay generate's."""
    codec = load_codec("tiny-random", Path("unused"))
    s = settings.model_copy(update={"running_set": True})
    sched, (worker,) = make_cluster(s, tiny)
    runtime = worker.runtime
    layers = tiny.model.config.num_hidden_layers
    assert runtime.one_kv_memory and runtime.pool is not None
    assert runtime.pool.capacity_bytes == runtime.memory_budget_bytes
    split = create_worker(settings, instance_id="w-split", loaded=tiny).runtime
    assert split.pool is not None and not split.one_kv_memory
    whole = split.memory_budget_bytes + split.pool.capacity_bytes  # the instance's budget
    assert runtime.memory_budget_bytes == whole * layers // (layers + 2)  # was whole / 2
    prompts = ["Kept and continued.", "Kept, then preempted by its scheduler."]
    kept, preempted = (submit(store, codec.encode(p), max_tokens=10, ignore_eos=True)
                       for p in prompts)
    sched.cycle()
    worker.serve(burst=True)
    assert set(runtime.pool.request_ids()) == {kept, preempted}
    assert store.get_request(preempted).kv_instance == "w0"
    batch_id = "b-only-one"
    store.claim_batch(batch_id, "w0", [kept], s.slice_length, now() + 60,
                      extra={"drop_finished": 1})
    assert runtime.run_batch(batch_id)["status"] == "committed"
    assert runtime.pool.request_ids() == [kept]  # resumed, stored again; the other gone
    assert store.get_request(preempted).kv_instance == ""
    drive(store, sched, [worker], [kept, preempted])
    for prompt, rid in zip(prompts, (kept, preempted), strict=True):
        assert store.get_request(rid).generated_ids == greedy_reference(
            tiny, codec.encode(prompt), 10)
    stats = store.stats()
    assert stats["kv_hits"] > 0 and stats["recomputed_tokens"] > 0  # the preempted one


def test_running_sets_continue_kept_rows_with_fresh_ones_and_keep_greedy_output(
    settings: Settings, tiny: LoadedModel, store: Store
) -> None:
    """Scheduler running-set mode (docs/design.md §3.6): an instance's kept rows come back
    together with fresh ones in one slice, bigger than max_batch_size, resumed from its
    pool (no recomputation), and the output is still generate's."""
    codec = load_codec("tiny-random", Path("unused"))
    s = settings.model_copy(update={"running_set": True, "max_batch_size": 2,
                                    "max_running": 64})
    sched, workers = make_cluster(s, tiny, n_workers=2)
    prompts = [f"Row {i} of one running set, all of one length." for i in range(8)]
    first = [submit(store, codec.encode(p), max_tokens=10, ignore_eos=True)
             for p in prompts[:4]]
    sched.cycle()  # the first four split between the two instances (rows of one length)
    batches = [store.get_batch(b) for b, _ in store.inflight_batches()]
    assert sorted(len(b.request_ids) for b in batches) == [2, 2]
    for w in workers:
        w.serve(burst=True)
    later = [submit(store, codec.encode(p), max_tokens=10, ignore_eos=True)
             for p in prompts[4:]]
    sched.cycle()  # each instance: its two kept rows plus two fresh ones
    batches = [store.get_batch(b) for b, _ in store.inflight_batches()]
    assert sorted(len(b.request_ids) for b in batches) == [4, 4]
    for batch in batches:
        assert len(set(batch.request_ids) & set(first)) == 2
    rids = first + later
    drive(store, sched, workers, rids)
    for prompt, rid in zip(prompts, rids, strict=True):
        rec = store.get_request(rid)
        assert rec.generated_ids == greedy_reference(tiny, codec.encode(prompt), 10)
    stats = store.stats()
    assert stats["recomputed_tokens"] == 0 and stats["kv_hits"] > 0
