"""The Redis layer's atomic operations against a real Redis (docs/design.md §6.1-§6.3)."""

from __future__ import annotations

import pytest

from shared.core.records import CommitItem, RequestParams, RequestRecord, new_batch_id, now
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import CancelOutcome, CommitRejected, Store, connect


def submit(store: Store, n: int = 3, arrival0: float = 1000.0) -> list[str]:
    ids = []
    for i in range(n):
        rec = RequestRecord(
            id=f"r{i}", prompt_ids=[5, 6, 7 + i], params=RequestParams(max_tokens=8),
            arrival=arrival0 + i,
        )
        store.submit(rec)
        ids.append(rec.id)
    return ids


def places(store: Store, rid: str) -> list[str]:
    """Every place a request is found: pending, some in-flight batch, or terminal."""
    found = []
    if store.r.zscore(store.keys.pending, rid) is not None:
        found.append("pending")
    for bid, _ in store.inflight_batches():
        batch = store.get_batch(bid)
        if batch and rid in batch.fences:
            found.append(f"batch:{bid}")
    rec = store.get_request(rid)
    if rec and rec.status.is_terminal:
        found.append("terminal")
    return found


def test_submit_writes_hash_and_pending_in_order(store: Store) -> None:
    ids = submit(store)
    assert store.pending_ids(10) == ids
    rec = store.get_request("r1")
    assert rec is not None and rec.status is RequestStatus.PENDING
    assert rec.prompt_ids == [5, 6, 8] and rec.params.max_tokens == 8


def test_claim_moves_requests_into_one_batch_with_new_fences(store: Store) -> None:
    ids = submit(store)
    fences = store.claim_batch("b1", "w0", ids[:2], 4, now() + 60)
    assert fences == {"r0": 1, "r1": 1}
    assert store.pending_ids(10) == ["r2"]
    for rid in ids:
        assert len(places(store, rid)) == 1, rid  # invariant 1
    batch = store.get_batch("b1")
    assert batch is not None and batch.request_ids == ["r0", "r1"] and batch.slice_length == 4
    # a request already claimed cannot be claimed again
    assert store.claim_batch("b2", "w0", ["r0"], 4, now() + 60) == {}
    assert store.get_batch("b2") is None


def test_commit_appends_requeues_and_finishes(store: Store) -> None:
    ids = submit(store)
    fences = store.claim_batch("b1", "w0", ids, 4, now() + 60)
    batch = store.get_batch("b1")
    items = [
        CommitItem("r0", fences["r0"], [11, 12], FinishReason.STOP, "ab", "ab"),
        CommitItem("r1", fences["r1"], [13, 14, 15, 16], None, "cdef"),
        CommitItem("r2", fences["r2"], [], FinishReason.LENGTH, "", ""),
    ]
    finished = store.commit_slice(batch, items, {"slices": 1, "generated_tokens": 6}, 60)
    assert finished == 2
    r0, r1 = store.get_request("r0"), store.get_request("r1")
    assert r0.status is RequestStatus.FINISHED and r0.generated_ids == [11, 12]
    assert r0.finish_reason is FinishReason.STOP and r0.text == "ab"
    assert r1.status is RequestStatus.PENDING and r1.generated_ids == [13, 14, 15, 16]
    assert store.pending_ids(10) == ["r1"]
    assert store.r.zscore(store.keys.pending, "r1") == 1001.0  # keeps its arrival time
    assert store.inflight_batches() == []
    assert [e["kind"] for e in store.events("r0")] == ["final"]
    assert store.events("r1")[0]["delta"] == "cdef"
    assert store.stats()["slices"] == 1 and store.stats("w0")["generated_tokens"] == 6
    # second slice appends to the tokens already there
    fences = store.claim_batch("b2", "w0", ["r1"], 4, now() + 60)
    store.commit_slice(store.get_batch("b2"), [CommitItem("r1", fences["r1"], [17], None, "g")],
                       {}, 60)
    assert store.get_request("r1").generated_ids == [13, 14, 15, 16, 17]
    assert store.get_request("r1").slices == 2


def test_stale_commit_is_rejected_and_changes_nothing(store: Store, rclient) -> None:
    """Invariant 2: a worker presumed dead commits late; nothing moves."""
    submit(store, 2)
    fences = store.claim_batch("b1", "w0", ["r0", "r1"], 4, now() + 60)
    stale = store.get_batch("b1")
    assert store.requeue_batch(stale, "worker w0 died", 3, 60) == (2, 0)
    # the scheduler hands them to another worker, which has not committed yet
    fences2 = store.claim_batch("b2", "w1", ["r0", "r1"], 4, now() + 60)
    assert fences2 == {"r0": fences["r0"] + 2, "r1": fences["r1"] + 2}
    before = {k: rclient.dump(k) for k in sorted(rclient.keys("*"))}
    late = [CommitItem(rid, fences[rid], [9, 9], FinishReason.LENGTH, "xx", "xx")
            for rid in ("r0", "r1")]
    with pytest.raises(CommitRejected, match="not in flight"):
        store.commit_slice(stale, late, {"slices": 1}, 60)
    after = {k: rclient.dump(k) for k in sorted(rclient.keys("*"))}
    assert before == after
    # a forged commit naming the live batch but carrying the old fence is rejected too
    with pytest.raises(CommitRejected, match="fence mismatch"):
        store.commit_slice(store.get_batch("b2"), late, {"slices": 1}, 60)
    assert {k: rclient.dump(k) for k in sorted(rclient.keys("*"))} == before
    # the rightful commit goes through exactly once
    good = [CommitItem(rid, fences2[rid], [1], FinishReason.LENGTH, "a", "a")
            for rid in ("r0", "r1")]
    assert store.commit_slice(store.get_batch("b2"), good, {}, 60) == 2
    with pytest.raises(CommitRejected):
        store.commit_slice(store.get_batch("b2"), good, {}, 60)
    assert store.get_request("r0").generated_ids == [1]


def test_requeue_fails_request_after_max_retries_with_reason(store: Store) -> None:
    """Invariant 3: a request that keeps failing ends failed, with the reason."""
    submit(store, 1)
    for attempt in range(3):
        bid = new_batch_id()
        store.claim_batch(bid, "w0", ["r0"], 4, now() + 60)
        result = store.requeue_batch(store.get_batch(bid), f"boom {attempt}", 2, 60)
        assert result == ((1, 0) if attempt < 2 else (0, 1))
    rec = store.get_request("r0")
    assert rec.status is RequestStatus.FAILED and rec.finish_reason is FinishReason.ERROR
    assert "boom 2" in rec.error
    assert store.events("r0")[-1]["status"] == "failed"
    assert places(store, "r0") == ["terminal"]


def test_start_batch_refuses_a_swept_batch(store: Store) -> None:
    submit(store, 1)
    store.claim_batch("b1", "w0", ["r0"], 4, now() + 60)
    batch = store.get_batch("b1")
    assert store.start_batch("b1", now() + 30)
    store.requeue_batch(batch, "deadline passed", 3, 60)
    assert not store.start_batch("b1", now() + 30)
    assert store.requeue_batch(batch, "again", 3, 60) is None


def test_fail_pending_states_the_reason(store: Store) -> None:
    submit(store, 1)
    assert store.fail_pending("r0", FinishReason.NEVER_FITS, "needs 9 GiB, budget 2 GiB", 60)
    rec = store.get_request("r0")
    assert rec.status is RequestStatus.FAILED and "9 GiB" in rec.error
    assert not store.fail_pending("r0", FinishReason.NEVER_FITS, "again", 60)


def test_leader_lock_has_one_holder(store: Store) -> None:
    assert store.acquire_or_renew_leader("a", 5)
    assert not store.acquire_or_renew_leader("b", 5)
    assert store.acquire_or_renew_leader("a", 5)
    store.release_leader("b")  # not the holder: no effect
    assert store.leader() == "a"
    store.release_leader("a")
    assert store.acquire_or_renew_leader("b", 5)


def test_candidate_lengths_follow_commits_without_reading_token_lists(store: Store) -> None:
    submit(store, 2)
    fences = store.claim_batch("b1", "w0", ["r0"], 4, now() + 60)
    store.commit_slice(store.get_batch("b1"), [CommitItem("r0", fences["r0"], [1, 2, 3], None,
                                                          "abc")], {}, 60)
    got = store.candidate_lengths(10)
    assert [(c.id, c.context_len, c.remaining_tokens, c.arrival) for c in got] == [
        ("r0", 3 + 3, 8 - 3, 1000.0), ("r1", 3, 8, 1001.0)
    ]
    store.r.delete(store.keys.request("r1"))  # expired hash, stale pending entry
    assert [c.id for c in store.candidate_lengths(10)] == ["r0"]


def test_candidate_lengths_say_which_requests_decode_under_a_grammar(store: Store) -> None:
    """The scheduler prices a constrained row's masks (docs/design.md §3): the flag is
    written with the request and read in the same small HMGET."""
    grammar = RequestParams(max_tokens=8, grammar='regex:"[a-z]+"')
    for rid, params in (("free", RequestParams(max_tokens=8)), ("json", grammar)):
        store.submit(RequestRecord(id=rid, prompt_ids=[1, 2, 3], params=params,
                                   arrival=1000.0))
    assert {c.id: c.constrained for c in store.candidate_lengths(10)} == {
        "free": False, "json": True}


def _final_events(store: Store, rid: str) -> list[dict[str, str]]:
    return [e for e in store.events(rid) if e["kind"] == "final"]


def test_cancel_ends_a_pending_request_at_once(store: Store) -> None:
    ids = submit(store)
    assert store.cancel("r1", "cancelled by the client", 60) == (CancelOutcome.CANCELLED,
                                                                  "cancelled")
    rec = store.get_request("r1")
    assert rec.status is RequestStatus.CANCELLED and rec.finish_reason is FinishReason.CANCELLED
    assert rec.error == "cancelled by the client"
    assert store.pending_ids(10) == [ids[0], ids[2]]
    assert places(store, "r1") == ["terminal"]  # invariant 1
    (final,) = _final_events(store, "r1")  # a waiting or streaming client hears of it
    assert final["status"] == "cancelled"
    # the scheduler can no longer claim it, and a second cancel changes nothing
    assert store.claim_batch("b1", "w0", ["r1"], 4, now() + 60) == {}
    assert store.cancel("r1", "again", 60) == (CancelOutcome.ENDED, "cancelled")
    assert store.cancel("nope", "x", 60) == (CancelOutcome.UNKNOWN, "")


def test_cancel_of_a_running_request_takes_effect_at_its_commit(store: Store) -> None:
    submit(store, 2)
    fences = store.claim_batch("b1", "w0", ["r0", "r1"], 4, now() + 60)
    assert store.cancel("r0", "user pressed stop", 60) == (CancelOutcome.MARKED, "running")
    assert places(store, "r0") == ["batch:b1"]  # still in exactly one place meanwhile
    items = [CommitItem("r0", fences["r0"], [9, 10], None, "ab", ""),
             CommitItem("r1", fences["r1"], [11, 12], None, "cd", "")]
    store.commit_slice(store.get_batch("b1"), items, {"slices": 1}, 60)
    r0, r1 = store.get_request("r0"), store.get_request("r1")
    assert r0.status is RequestStatus.CANCELLED and r0.generated_ids == [9, 10]
    assert r0.error == "user pressed stop" and places(store, "r0") == ["terminal"]
    (final,) = _final_events(store, "r0")
    assert final["delta"] == "ab" and final["status"] == "cancelled"
    assert r1.status is RequestStatus.PENDING and store.pending_ids(10) == ["r1"]


def test_a_finished_slice_wins_over_a_cancel_and_a_hand_back_ends_it(store: Store) -> None:
    submit(store, 2)
    fences = store.claim_batch("b1", "w0", ["r0", "r1"], 4, now() + 60)
    store.cancel("r0", "stop", 60)
    store.cancel("r1", "stop", 60)
    # the worker died: its batch is handed back; the cancelled requests end, not retry
    assert store.requeue_batch(store.get_batch("b1"), "worker lost", 3, 60) == (0, 0)
    for rid in ("r0", "r1"):
        rec = store.get_request(rid)
        assert rec.status is RequestStatus.CANCELLED and places(store, rid) == ["terminal"]
        assert rec.fence == fences[rid] + 1  # a late commit of the lost worker is rejected
    store.submit(RequestRecord(id="r2", prompt_ids=[5], params=RequestParams(max_tokens=8),
                               arrival=now()))
    fences = store.claim_batch("b2", "w0", ["r2"], 4, now() + 60)
    store.cancel("r2", "stop", 60)
    item = CommitItem("r2", fences["r2"], [9], FinishReason.STOP, "x", "x")
    assert store.commit_slice(store.get_batch("b2"), [item], {}, 60) == 1
    assert store.get_request("r2").status is RequestStatus.FINISHED  # it had finished anyway


def test_embedded_redis_is_out_of_reach_of_a_terminal_ctrl_c() -> None:
    """Its own process group: a Ctrl-C to `scls up` does not kill Redis before the
    services that still write to it have drained (the launcher stops it last)."""
    import os

    from shared.core.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        pid = server._proc.pid  # noqa: SLF001 - the test checks the process itself
        assert os.getpgid(pid) != os.getpgrp()
        assert connect(server.url).ping()
