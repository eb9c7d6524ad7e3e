"""IlsEngine (transformers' continuous batching) on the tiny random Llama: no mocks."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from services.worker.engine import SliceEngine, SliceInput
from services.worker.ils import (
    IlsConfig,
    IlsEngine,
    IlsResult,
    IterationShape,
    num_blocks_for,
)
from shared.core.records import RequestParams
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import ByteCodec
from tests.helpers import greedy_reference

# Six prompts from 2 to 150 tokens; the longest ones exceed max_batch_tokens (64 below), so
# transformers prefills them in chunks.
TEXTS = (
    "Hi",
    "Hello",
    "The quick brown fox",
    "Slices, batches & seeds: 12345",
    "Iteration-level scheduling admits and retires requests between two forward passes.",
    "A paged KV cache stores every request in fixed-size blocks; " * 2 + "then what?",
)
MAX_NEW = (5, 9, 13, 17, 21, 40)
SMALL = IlsConfig(max_concurrency=3, page_size=16, num_blocks=256, max_batch_tokens=64)


@pytest.fixture(scope="module")
def prompts(tiny: LoadedModel) -> list[list[int]]:
    """The six prompts as token ids."""
    return [tiny.codec.encode(t) for t in TEXTS]



def sliced(
    loaded: LoadedModel, rows: list[tuple[list[int], RequestParams]]
) -> list[tuple[list[int], FinishReason | None]]:
    """SliceEngine output of ``rows`` in one batch, one slice covering every generation."""
    inputs = [SliceInput(str(i), p, [], params) for i, (p, params) in enumerate(rows)]
    outputs, _ = SliceEngine(loaded).run_slice(inputs, max(p.max_tokens for _, p in rows))
    return [(o.new_ids, o.finish_reason) for o in outputs]


@contextmanager
def running(loaded: LoadedModel, config: IlsConfig) -> Iterator[IlsEngine]:
    """A started engine, always stopped afterwards."""
    engine = IlsEngine(loaded, config)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def collect(engine: IlsEngine, ids: list[str], timeout: float = 60.0) -> dict[str, IlsResult]:
    """Every result of ``ids``; fails on a duplicate, an unknown id, a leftover or a timeout."""
    seen: list[IlsResult] = []
    deadline = time.monotonic() + timeout
    while len(seen) < len(ids):
        assert time.monotonic() < deadline, f"only {len(seen)} of {len(ids)} results came back"
        seen += engine.results(timeout=0.5)
    assert Counter(r.request_id for r in seen) == Counter(ids)  # each exactly once
    assert engine.results(timeout=0.2) == []
    assert engine.active() == 0
    return {r.request_id: r for r in seen}


def as_pair(result: IlsResult) -> tuple[list[int], FinishReason]:
    """Tokens and finish reason of a successful result."""
    assert result.error is None, result.error
    return result.new_ids, result.finish_reason


# ------------------------------------------------------------------------------------------
# Greedy output == SliceEngine == generate()
# ------------------------------------------------------------------------------------------


def test_greedy_matches_slice_engine_and_generate(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    with running(tiny, SMALL) as engine:
        for i, (prompt, n) in enumerate(zip(prompts, MAX_NEW, strict=True)):
            engine.add(str(i), prompt, n)
        results = collect(engine, [str(i) for i in range(len(prompts))])
    rows = [(p, RequestParams(max_tokens=n)) for p, n in zip(prompts, MAX_NEW, strict=True)]
    batch = sliced(tiny, rows)
    for i, (prompt, n) in enumerate(zip(prompts, MAX_NEW, strict=True)):
        expected = greedy_reference(tiny, prompt, n)
        assert as_pair(results[str(i)]) == (expected, FinishReason.LENGTH)
        assert batch[i] == (expected, FinishReason.LENGTH)


# ------------------------------------------------------------------------------------------
# Concurrency cap, observed inside transformers' own scheduler
# ------------------------------------------------------------------------------------------


def spy_on_scheduler(engine: IlsEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record, at every iteration, (requests in the CB scheduler, requests in the forward)."""
    scheduler = engine._manager.batch_processor.scheduler  # exists once start() warmed up
    original = scheduler.schedule_batch
    seen: list[tuple[int, int]] = []

    def schedule_batch(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        held = len(scheduler.active_requests) + len(scheduler.waiting_requests)
        seen.append((held, len(out[0] or [])))
        return out

    monkeypatch.setattr(scheduler, "schedule_batch", schedule_batch)
    return seen


def test_concurrency_cap_holds_inside_transformers(
    tiny: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dataclasses.replace(SMALL, max_concurrency=2)
    with running(tiny, config) as engine:
        seen = spy_on_scheduler(engine, monkeypatch)
        ids = [f"r{i}" for i in range(7)]
        for i, rid in enumerate(ids):
            engine.add(rid, prompts[i % len(prompts)], 4 + 5 * i)
        assert engine.active() == 7  # none can have been returned yet
        results = collect(engine, ids)
    assert all(r.error is None for r in results.values())
    assert seen, "the spy saw no iteration"
    assert max(held for held, _ in seen) == 2  # never above the cap, and the cap is reached
    assert max(batch for _, batch in seen) == 2


# ------------------------------------------------------------------------------------------
# EOS handling per request
# ------------------------------------------------------------------------------------------


def test_ignore_eos_is_per_request(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    prompt = prompts[3]
    tokens = greedy_reference(tiny, prompt, 24)
    # EOS := the first token whose first occurrence is at position >= 2 (tiny-random never
    # emits its real EOS, so the test declares one that greedy decoding does produce).
    cut = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])
    model = dataclasses.replace(tiny, codec=ByteCodec(eos_ids=frozenset({tokens[cut]})))
    with running(model, SMALL) as engine:
        engine.add("stop", prompt, 24)
        engine.add("ignore", prompt, 24, ignore_eos=True)
        results = collect(engine, ["stop", "ignore"])
    assert as_pair(results["stop"]) == (tokens[:cut], FinishReason.STOP)
    assert as_pair(results["ignore"]) == (tokens, FinishReason.LENGTH)
    batch = sliced(
        model,
        [(prompt, RequestParams(max_tokens=24)), (prompt, RequestParams(24, ignore_eos=True))],
    )
    assert batch == [as_pair(results["stop"]), as_pair(results["ignore"])]


# ------------------------------------------------------------------------------------------
# Lifecycle and errors
# ------------------------------------------------------------------------------------------


def test_stop_is_clean_and_returns_unfinished_requests(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = IlsEngine(tiny, dataclasses.replace(SMALL, max_concurrency=2, num_blocks=512))
    engine.start()
    threads = [engine._manager._generation_thread, engine._collector]  # loop + collector
    assert all(t is not None and t.is_alive() for t in threads)
    ids = [f"long{i}" for i in range(5)]
    for i, rid in enumerate(ids):
        engine.add(rid, prompts[i], 3000)  # seconds of decoding each: stop() comes first
    start = time.monotonic()
    engine.stop()
    assert time.monotonic() - start < 10
    assert not any(t.is_alive() for t in threads)
    assert engine._manager._generation_thread is None  # joined by transformers' stop()
    results = collect(engine, ids, timeout=5)
    assert all(r.error and r.finish_reason == FinishReason.ERROR for r in results.values())
    engine.add("late", prompts[0], 5)  # after stop: an error result, never a hang
    (late,) = collect(engine, ["late"], timeout=5).values()
    assert late.error == "ILS engine stopped"
    engine.stop()  # idempotent


def test_failure_inside_the_loop_comes_back_and_the_engine_recovers(
    tiny: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = 300  # a valid id the byte codec never produces: only the poisoned prompt has it
    with running(tiny, SMALL) as engine:
        with monkeypatch.context() as patch:
            forward = tiny.model.forward

            def failing_forward(*args: Any, **kwargs: Any) -> Any:
                if (kwargs["input_ids"] == poison).any():
                    raise RuntimeError("injected forward failure")
                return forward(*args, **kwargs)

            patch.setattr(tiny.model, "forward", failing_forward)
            engine.add("before", prompts[2], 200)
            engine.add("poisoned", prompts[1] + [poison], 10)
            engine.add("after", prompts[3], 10)
            results = collect(engine, ["before", "poisoned", "after"])
            assert results["poisoned"].error and "injected" in results["poisoned"].error
        # The loop died with every request inside it; the engine restarted it.
        engine.add("again", prompts[4], 12)
        (again,) = collect(engine, ["again"]).values()
    assert as_pair(again) == (greedy_reference(tiny, prompts[4], 12), FinishReason.LENGTH)


def test_requests_that_cannot_run_come_back_at_once(tiny: LoadedModel) -> None:
    near_limit = tiny.codec.encode("x" * 4090)  # context window 4096: room for 6 tokens
    with running(tiny, SMALL) as engine:
        engine.add("empty", [], 5)
        engine.add("bad-id", [3, 4, 512], 5)
        engine.add("nothing", [3, 4], 0)
        engine.add("near", near_limit, 20)
        with pytest.raises(ValueError, match="already"):
            engine.add("near", [3], 1)
        results = collect(engine, ["empty", "bad-id", "nothing", "near"])
    with running(tiny, dataclasses.replace(SMALL, num_blocks=8)) as engine:
        engine.add("huge", [3, 4], 200)  # 202 tokens: 13 blocks, the cache has 8
        results |= collect(engine, ["huge"])
    assert results["empty"].error and results["bad-id"].error
    assert (results["nothing"].new_ids, results["nothing"].finish_reason) == (
        [],
        FinishReason.LENGTH,
    )
    assert results["huge"].finish_reason == FinishReason.NEVER_FITS and results["huge"].error
    expected = sliced(tiny, [(near_limit, RequestParams(max_tokens=20))])[0]
    assert as_pair(results["near"]) == expected
    assert len(expected[0]) == 6


def test_cache_is_sized_from_the_budget(tiny: LoadedModel) -> None:
    # SmolLM2-135M: 46,080 KV bytes per token, so 1 GiB holds 728 blocks of 32 tokens.
    assert num_blocks_for(1 << 30, 32, 46_080) == 728
    kv = tiny.info.kv_bytes_per_token
    small = IlsEngine(tiny, IlsConfig(max_concurrency=4, memory_budget_bytes=100 * 32 * kv))
    assert small.num_blocks == 100
    # A budget beyond 4 requests at the full 4096-token window is capped at that.
    large = IlsEngine(tiny, IlsConfig(max_concurrency=4, memory_budget_bytes=1 << 34))
    assert large.num_blocks == 4 * 4096 // 32
    assert large.max_batch_tokens == 512
    with pytest.raises(ValueError, match="too small"):
        IlsEngine(tiny, IlsConfig(max_concurrency=1, memory_budget_bytes=1000))


def test_every_iteration_is_observed_with_its_shape(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    """The iteration observer (how an ILS worker prices its engine's work) sees every
    forward pass: prompt chunks plus one token per later step of every request."""
    shapes: list[IterationShape] = []
    with running(tiny, SMALL) as engine:
        engine.on_iteration = shapes.append
        ids = [f"r{i}" for i in range(len(prompts))]
        for rid, prompt, n in zip(ids, prompts, MAX_NEW, strict=True):
            engine.add(rid, prompt, n, ignore_eos=True)
        results = collect(engine, ids)
    assert [len(results[r].new_ids) for r in ids] == list(MAX_NEW)
    fed = sum(sum(s.query_lens) for s in shapes)
    assert fed == sum(len(p) for p in prompts) + sum(n - 1 for n in MAX_NEW)
    assert max(max(s.query_lens) for s in shapes) <= SMALL.max_batch_tokens  # chunked
    assert all(s.keys_total >= sum(s.query_lens) for s in shapes)
    assert max(len(s.query_lens) for s in shapes) <= SMALL.max_concurrency
