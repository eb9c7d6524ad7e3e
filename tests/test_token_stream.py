"""Per-token streaming and stored log-probabilities in Redis: token entries are fenced like
the commit, every event entry says which tokens it carries (``pos``, ``ids``), and a
request's log-probabilities accumulate across slices (docs/design.md §5)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from services.cli import app
from services.worker.token_stream import TokenPublisher
from shared.core.records import (
    CommitItem,
    RequestParams,
    RequestRecord,
    StepTokens,
    TokenLogprob,
    now,
)
from shared.core.states import FinishReason
from shared.core.store import Store


def running(store: Store, rid: str, batch_id: str) -> int:
    """Submit ``rid`` (streaming, logprobs), claim it into ``batch_id``, start the batch."""
    if store.get_request(rid) is None:
        store.submit(RequestRecord(id=rid, prompt_ids=[5, 6],
                                   params=RequestParams(max_tokens=8, stream=True, logprobs=1),
                                   arrival=1000.0))
    fence = store.claim_batch(batch_id, "w0", [rid], 4, now() + 60)[rid]
    assert store.start_batch(batch_id, now() + 60)
    return fence


def test_token_entries_are_fenced(store: Store) -> None:
    fence = running(store, "r", "b1")
    steps = [StepTokens("r", fence, 0, [11]), StepTokens("r", fence + 1, 1, [12])]
    assert store.publish_tokens("b1", steps) == 1  # the second names a fence it never had
    assert store.publish_tokens("b0", [StepTokens("r", fence, 1, [12])]) == 0  # wrong batch
    [entry] = store.events("r")
    assert entry["kind"] == "tokens" and entry["pos"] == "0" and entry["ids"] == "11"


def test_commit_entries_carry_positions_and_logprobs_accumulate(store: Store) -> None:
    fence = running(store, "r", "b1")
    first = (TokenLogprob(-0.5, ((11, -0.5),)), TokenLogprob(-1.25, ((3, -0.75),)))
    store.commit_slice(store.get_batch("b1"),
                       [CommitItem("r", fence, [11, 12], None, "ab", logprobs=first)], {}, 60)
    fence = running(store, "r", "b2")
    last = (TokenLogprob(-2.0, ((13, -2.0),)),)
    store.commit_slice(store.get_batch("b2"), [CommitItem(
        "r", fence, [13], FinishReason.LENGTH, "c", "abc", logprobs=last)], {}, 60)
    entries = store.events("r")
    assert [(e["kind"], e["pos"], e["ids"]) for e in entries] == [
        ("slice", "0", "11,12"), ("final", "2", "13")]
    rec = store.get_request("r")
    assert rec is not None and rec.logprobs == [*first, *last]


def test_publisher_writes_before_flush_returns(store: Store) -> None:
    fence = running(store, "r", "b1")
    publisher = TokenPublisher(store)
    try:
        for pos in range(5):
            publisher.submit("b1", [StepTokens("r", fence, pos, [20 + pos])])
        publisher.flush()
        entries = store.events("r")
        assert [(e["pos"], e["ids"]) for e in entries] == [
            (str(p), str(20 + p)) for p in range(5)]
    finally:
        publisher.close()


def test_stream_overhead_command_measures_both_kinds(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = CliRunner().invoke(app, [
        "stream-overhead", "--model", "tiny-random", "--batch", "2", "--prompt-len", "8",
        "--slice-length", "4", "--repeats", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # Every streaming row wrote one entry per token: 2 runs x 2 rows x 4 tokens.
    assert report["entries_published"] == 2 * 2 * 4
    assert len(report["runs"]["plain"]) == len(report["runs"]["streaming"]) == 2
    assert report["plain_tokens_per_s"] > 0 and report["streaming_tokens_per_s"] > 0
    assert "streaming overhead:" in result.output
    # The CPU ledger: the publisher wrote (at most one script call per step: 3 decode
    # steps and the prefill's token per slice) and spent CPU doing it.
    cpu = report["cpu"]
    assert 0 < cpu["script_calls_per_step"] <= 4 / 3
    assert cpu["publisher_cpu_ms_per_step"] > 0 and cpu["step_ms"] > 0
    assert cpu["cpu_ms_per_step"] >= cpu["publisher_cpu_ms_per_step"]
    assert "publishing CPU per decode step" in result.output
