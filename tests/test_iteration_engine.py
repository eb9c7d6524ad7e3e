"""The ILS baseline on our own engine (services/worker/iteration.py) on the tiny random
Llama: real transformers code, no mocks. Its outputs must be the slice engine's, however
requests join, leave, are preempted or share slots."""

from __future__ import annotations

import time

import pytest

from services.worker.engine import SliceEngine, SliceInput
from services.worker.iteration import IterationEngine, IterationLimits
from services.worker.profiler import analytic_model_for
from shared.core.records import RequestParams
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel
from tests.helpers import greedy_reference
from tests.test_engine import run_to_end, with_eos

UNBOUNDED = 1 << 40


def engine_for(loaded: LoadedModel, cap: int = 8, memory_bounded: bool = False,
               budget: int = UNBOUNDED) -> IterationEngine:
    """An engine priced by the analytic model of ``loaded``."""
    return IterationEngine(loaded, IterationLimits(cap, memory_bounded),
                           analytic_model_for(loaded, 4), budget)


def drain(engine: IterationEngine, arrivals: dict[int, list[SliceInput]],
          max_iterations: int = 2000) -> dict[str, tuple[list[int], FinishReason]]:
    """Iterate on the caller's thread, adding ``arrivals[k]`` before iteration ``k``,
    until every request is back; checks the cap at every step, and for the memory-bounded
    engine that the cache it holds stays within its budget."""
    expected = sum(len(v) for v in arrivals.values())
    out: dict[str, tuple[list[int], FinishReason]] = {}
    for k in range(max_iterations):
        for spec in arrivals.get(k, []):
            engine.add(spec)
        if len(out) == expected:
            return out
        engine.iterate()
        assert engine.running() <= engine.limits.max_concurrency
        # what the worker publishes: at least one column per running request is held
        assert engine.cache_bytes() >= engine.running() * engine.loaded.info.kv_bytes_per_token
        if engine.limits.memory_bounded:
            assert engine.cache_bytes() <= engine.memory_budget_bytes
        for result in engine.results(0):
            assert result.error is None, result.error
            out[result.request_id] = (result.new_ids, result.finish_reason)
    raise AssertionError(f"only {len(out)} of {expected} requests finished")


def greedy(n: int) -> RequestParams:
    return RequestParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny: LoadedModel) -> list[list[int]]:
    texts = ("The quick brown fox jumps", "Hi", "Slices, batches & seeds: 12345",
             "A somewhat longer prompt, to widen the padded cache past the others: ok",
             "mid-length prompt here")
    return [tiny.codec.encode(t) for t in texts]


def test_staggered_arrivals_give_generates_greedy_tokens(
        tiny: LoadedModel, prompts: list[list[int]]) -> None:
    """Requests join a running batch at different steps (shorter and longer than its
    width, so both the in-place and the rebuild paths run) and leave at different steps."""
    lengths = [12, 30, 7, 20, 16]
    specs = [SliceInput(f"r{i}", p, [], greedy(n)) for i, (p, n)
             in enumerate(zip(prompts, lengths, strict=True))]
    engine = engine_for(tiny, cap=3)
    out = drain(engine, {0: specs[:2], 3: specs[2:3], 5: specs[3:]})
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        assert out[f"r{i}"] == (greedy_reference(tiny, prompt, n), FinishReason.LENGTH)
    # Both ways of joining ran: into a freed slot in place (what keeps the baseline from
    # copying its cache at every join) and by rebuilding the cache.
    assert engine.stats.in_place >= 1 and engine.stats.rebuilds >= 2


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_the_cap_bounds_the_running_set_and_every_request_finishes(
        tiny: LoadedModel, prompts: list[list[int]], cap: int) -> None:
    specs = [SliceInput(f"r{i}", p, [], greedy(9)) for i, p in enumerate(prompts)]
    engine = engine_for(tiny, cap=cap)
    out = drain(engine, {0: specs})
    assert set(out) == {s.request_id for s in specs}
    mean_running = engine.stats.running_sum / engine.stats.iterations
    assert mean_running <= cap
    assert engine.stats.preemptions == 0


def test_memory_bound_preempts_by_recompute_and_output_is_unchanged(
        tiny: LoadedModel, prompts: list[list[int]]) -> None:
    """A budget that holds about two grown rows: the youngest is preempted, re-prefills its
    prompt plus what it generated, and still ends with generate's greedy tokens."""
    cost = analytic_model_for(tiny, 4)
    budget = int(cost.mixed_memory(2, 60, 1, 0, 0))
    specs = [SliceInput(f"r{i}", p, [], greedy(40)) for i, p in enumerate(prompts[:3])]
    engine = engine_for(tiny, cap=64, memory_bounded=True, budget=budget)
    out = drain(engine, {0: specs})
    assert engine.stats.preemptions > 0
    assert engine.stats.recomputed_tokens > 0
    for i, prompt in enumerate(prompts[:3]):
        assert out[f"r{i}"] == (greedy_reference(tiny, prompt, 40), FinishReason.LENGTH)


def test_seeded_sampling_and_logprobs_match_the_slice_engine(
        tiny: LoadedModel, prompts: list[list[int]]) -> None:
    params = RequestParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=7, logprobs=2,
                           ignore_eos=True)
    rows = {f"r{i}": (p, params) for i, p in enumerate(prompts[:3])}
    reference, _ = run_to_end(SliceEngine(tiny), rows, slice_len=15)
    engine = engine_for(tiny, cap=2)
    specs = [SliceInput(rid, p, [], params) for rid, (p, _) in rows.items()]
    results = {}
    for k in range(500):
        if k == 0:
            for spec in specs:
                engine.add(spec)
        engine.iterate()
        results.update({r.request_id: r for r in engine.results(0)})
        if len(results) == 3:
            break
    for rid, (ids, finish) in reference.items():
        assert results[rid].new_ids == ids and results[rid].finish_reason is finish
        assert len(results[rid].logprobs) == len(ids)


def test_eos_finishes_with_stop_and_resumed_requests_continue(
        tiny: LoadedModel, prompts: list[list[int]]) -> None:
    """A request that emits EOS leaves with STOP at once; one with tokens generated
    elsewhere continues from them (prompt + generated are prefilled)."""
    free = greedy_reference(tiny, prompts[0], 12)
    eos = free[5]
    model = with_eos(tiny, eos)
    engine = engine_for(model, cap=4)
    first = free.index(eos)
    out = drain(engine, {0: [SliceInput("stop", prompts[0], [], RequestParams(max_tokens=12)),
                             SliceInput("resumed", prompts[2], greedy_reference(
                                 tiny, prompts[2], 4), greedy(10))]})
    assert out["stop"] == (free[:first], FinishReason.STOP)
    assert out["resumed"][0] == greedy_reference(tiny, prompts[2], 10)[4:]


def test_the_threaded_engine_returns_every_request_and_stop_fails_the_rest(
        tiny: LoadedModel, prompts: list[list[int]]) -> None:
    engine = engine_for(tiny, cap=4)
    engine.start()
    try:
        engine.add(SliceInput("a", prompts[1], [], greedy(6)))
        with pytest.raises(ValueError, match="already"):
            engine.add(SliceInput("a", prompts[1], [], greedy(6)))
        got = []
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            got = engine.results(0.2)
        assert [(r.request_id, r.new_ids) for r in got] == [
            ("a", greedy_reference(tiny, prompts[1], 6))]
        engine.add(SliceInput("long", prompts[0], [], greedy(10_000)))
    finally:
        engine.stop()
    left = engine.results(5)
    assert [(r.request_id, r.finish_reason) for r in left] == [("long", FinishReason.ERROR)]
    assert engine.active() == 0


# --- the worker runtime around it (real Redis) -------------------------------------------

@pytest.mark.parametrize("policy", ["ils", "ils-vllm"])
def test_an_ils_worker_on_our_engine_streams_and_commits_generates_tokens(
        settings, tiny: LoadedModel, store, prompts: list[list[int]],  # noqa: ANN001
        policy: str) -> None:
    """Admitted through RQ's job body like any batch: each request is committed once,
    fenced, with generate's greedy tokens, its stream gets one entry per token before
    the final one, and the instance publishes which ILS it runs."""
    from services.worker.service import create_worker
    from shared.core.records import RequestRecord, new_request_id, now
    from shared.core.states import RequestStatus

    s = settings.model_copy(update={"policy": policy, "ils_max_concurrency": 2})
    worker = create_worker(s, instance_id="i0", loaded=tiny)
    worker.runtime.start()
    try:
        worker.register()
        assert store.live_instances()[0].mode == policy
        ids = []
        for i, prompt in enumerate(prompts[:3]):
            rec = RequestRecord(id=new_request_id(), prompt_ids=prompt,
                                params=RequestParams(max_tokens=8 + i, ignore_eos=True,
                                                     stream=True),
                                arrival=now(), model="tiny-random")
            store.submit(rec)
            store.claim_batch(f"b{i}", "i0", [rec.id], 64, now() + 600)
            assert worker.runtime.run_batch(f"b{i}")["status"] == "admitted"
            ids.append(rec.id)
        deadline = time.monotonic() + 60
        while worker.runtime.in_progress() and time.monotonic() < deadline:
            time.sleep(0.05)
        for i, (rid, prompt) in enumerate(zip(ids, prompts[:3], strict=True)):
            rec = store.get_request(rid)
            assert rec.status is RequestStatus.FINISHED
            assert rec.generated_ids == greedy_reference(tiny, prompt, 8 + i)
            kinds = [e["kind"] for e in store.events(rid)]
            assert kinds == ["tokens"] * (8 + i) + ["final"], kinds
        assert store.stats()["model_busy_s"] > 0
    finally:
        worker.drain()  # stops its heartbeat thread: "i0" must not outlive the test
        worker.runtime.stop()
