"""``scls chaos``: its checks detect what they claim to (real Redis), and the quick run of the
whole fault suite loses, duplicates and changes nothing (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from services.chaos.command import FULL, QUICK, chaos_settings
from services.chaos.workload import Ledger, Sent, verify
from shared.core.records import RequestParams, RequestRecord, now
from shared.core.store import Store

REPO = Path(__file__).resolve().parents[1]


def _finished(
    store: Store, rclient: redis.Redis, rid: str, ids: list[int], events: list[tuple[str, int, int]]
) -> None:
    """A finished request holding ``ids`` whose event stream is ``events`` (kind, pos,
    tokens)."""
    store.submit(
        RequestRecord(id=rid, prompt_ids=[1, 2], params=RequestParams(max_tokens=8), arrival=now())
    )
    rclient.hset(
        store.keys.request(rid),
        mapping={"status": "finished", "generated_ids": json.dumps(ids), "finish_reason": "length"},
    )
    for kind, pos, tokens in events:
        rclient.xadd(store.keys.events(rid), {"kind": kind, "pos": pos, "tokens": tokens})


def test_verify_counts_lost_duplicated_and_mismatched_requests(
    store: Store, rclient: redis.Redis
) -> None:
    """Each kind of damage is counted once, and a clean request is not counted at all."""
    _finished(store, rclient, "ok", [5, 6, 7, 8], [("slice", 0, 2), ("final", 2, 2)])
    # the second slice committed twice: two finals and overlapping positions
    _finished(
        store, rclient, "dup", [5, 6, 7, 8], [("slice", 0, 2), ("final", 2, 2), ("final", 2, 2)]
    )
    _finished(store, rclient, "other", [9, 9, 9, 9], [("slice", 0, 2), ("final", 2, 2)])
    store.submit(
        RequestRecord(id="stuck", prompt_ids=[1], params=RequestParams(max_tokens=8), arrival=now())
    )
    ledger = Ledger(
        accepted=[
            Sent(0, "ok"),
            Sent(0, "dup"),
            Sent(0, "other"),
            Sent(0, "stuck"),
            Sent(0, "expired"),
        ]
    )

    verdict = verify(store, ledger, baseline={0: [5, 6, 7, 8]})

    assert (verdict.completed, verdict.lost, verdict.duplicated, verdict.mismatched) == (3, 2, 1, 1)
    assert sorted(verdict.lost_ids) == ["expired", "stuck"]
    assert verdict.duplicated_ids == ["dup"] and verdict.mismatched_ids == ["other"]


def test_a_503_counts_as_a_server_error_only_outside_a_redis_outage() -> None:
    """The documented 503 while Redis is down is not a server error; any other 5xx is."""
    ledger = Ledger()
    ledger.note(503, "redis down")
    ledger.note(500, "boom")
    ledger.redis_outage = True
    ledger.note(503, "redis down")
    assert (ledger.server_errors, ledger.unavailable_503) == (2, 1)


@pytest.mark.parametrize("plan", [QUICK, FULL], ids=["quick", "full"])
def test_the_retry_budget_covers_every_kill(plan) -> None:
    """A request may be on the victim of every worker kill: the chaos deployment must not
    fail it for running out of retries (it would count as a server error)."""
    assert chaos_settings("tiny-random", plan).max_retries > plan.max_kills
    assert (QUICK.max_kills, FULL.max_kills) == (4, 15)


@pytest.mark.soak
@pytest.mark.timeout(700)
def test_quick_chaos_run_loses_nothing(tmp_path: Path) -> None:
    """`scls chaos --quick`: worker and leader kill -9, Redis frozen and killed, a burst over
    the pending bound and API fuzzing lose, duplicate and change no request and answer no
    5xx (beyond the documented 503 while Redis is down)."""
    out = tmp_path / "chaos.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "chaos", "--quick", "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the command stops every process it started
        stdout, _ = proc.communicate(timeout=120)
        pytest.fail(f"scls chaos --quick ran over 540 s:\n{stdout[-3000:]}")
    assert out.exists(), stdout[-3000:]
    report = json.loads(out.read_text())
    summary = {k: report[k] for k in ("lost", "duplicated", "mismatched", "server_errors")}
    assert summary == {"lost": 0, "duplicated": 0, "mismatched": 0, "server_errors": 0}, (
        _clues(report)
    )
    assert report["completed"] > 0
    assert report["accepted"] == report["completed"] + report["failed"] + report["lost"]
    assert report["faults"]["leader_kill"]["failover_s"] is not None
    assert report["faults"]["burst"]["bound_held"]
    assert proc.returncode == 0, stdout[-3000:]


def _clues(report: dict) -> str:
    """What a failed quick run needs to be diagnosed from CI's output alone: per phase, the
    bad requests and what Redis held of them, each fault's figures, then every log line
    that names a lost request (the run keeps its logs when it fails)."""
    keys = ("lost_states", "duplicated_ids", "mismatched_ids", "failed_errors", "error_samples",
            "statuses", "transport_errors")
    phases = {name: {k: p.get(k) for k in keys if p.get(k)} for name, p in report["phases"].items()}
    faults = {name: {k: v for k, v in f.items() if not isinstance(v, list)}
              for name, f in report["faults"].items() if not name.startswith("fuzz")}
    lines = []
    lost = [i for p in report["phases"].values() for i in p.get("lost_ids", [])]
    log_dir = Path(report.get("log_dir") or "/nonexistent")
    for log in sorted(log_dir.rglob("*.log")) if lost else []:
        for line in log.read_text(errors="replace").splitlines():
            if any(i in line for i in lost):
                lines.append(f"{log.name}: {line[:400]}")
    text = json.dumps({"phases": phases, "faults": faults}, indent=1, default=str)
    return text[:5000] + "\nlog lines naming a lost request:\n" + "\n".join(lines[-60:])

