"""KV retention in the slice engine: results never depend on the pool (docs/design.md §6).

Greedy output must be token-for-token the same with retention on, off, and from an
unsliced ``generate()``, for batches mixing resumed and freshly prefilled rows of
different lengths; seeded sampling must be the same on and off; evictions, stale entries
and a tiny pool fall back to re-prefill. Real transformers code on tiny-random and on
SmolLM2-135M (float32).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from transformers import StaticCache

from services.worker.engine import SliceEngine, SliceInput, SliceStats
from services.worker.kv_pool import KvEntry, KvPool
from shared.core.records import RequestParams
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel
from shared.policy.prefill import pass_tokens_of, prefill_groups
from tests.helpers import greedy_reference

PROMPTS = ("The quick brown fox jumps over", "Hi", "Slices, batches & seeds: 12345", "ok?")
SAMPLED = RequestParams(max_tokens=21, temperature=0.9, top_p=0.95, seed=77)
BIG = 1 << 30

Result = tuple[list[int], FinishReason]


class Driver:
    """Runs requests slice by slice like the worker + scheduler do: each slice takes the
    unfinished requests (optionally only some of them), with fences that grow per slice
    and the KV fence Redis would have recorded when the pool kept the row."""

    def __init__(self, engine: SliceEngine) -> None:
        self.engine = engine
        self.generated: dict[str, list[int]] = {}
        self.params: dict[str, tuple[list[int], RequestParams]] = {}
        self.fence: dict[str, int] = {}
        self.kv_fence: dict[str, int | None] = {}
        self.finished: dict[str, Result] = {}
        self.stats: list[SliceStats] = []

    def add(self, rid: str, prompt: list[int], params: RequestParams) -> None:
        self.params[rid] = (prompt, params)
        self.generated[rid] = []
        self.fence[rid] = 0
        self.kv_fence[rid] = None

    def step(self, slice_len: int, only: set[str] | None = None) -> SliceStats:
        rows = []
        for rid, (prompt, params) in self.params.items():
            if rid in self.finished or (only is not None and rid not in only):
                continue
            self.fence[rid] += 1
            rows.append(SliceInput(rid, prompt, list(self.generated[rid]), params,
                                   fence=self.fence[rid], kv_fence=self.kv_fence[rid]))
        outputs, stats = self.engine.run_slice(rows, slice_len)
        for row, out in zip(rows, outputs, strict=True):
            self.generated[out.request_id] += out.new_ids
            self.kv_fence[out.request_id] = row.fence if out.kv_retained else None
            if out.finish_reason is not None:
                self.finished[out.request_id] = (self.generated[out.request_id],
                                                 out.finish_reason)
        self.stats.append(stats)
        return stats

    def run(self, slice_len: int) -> dict[str, Result]:
        while len(self.finished) < len(self.params):
            self.step(slice_len)
        return self.finished


@pytest.fixture(scope="module")
def prompts(tiny: LoadedModel) -> list[list[int]]:
    return [tiny.codec.encode(p) for p in PROMPTS]


def _greedy(loaded: LoadedModel, prompts: list[list[int]], n: int) -> dict[str, Result]:
    return {str(i): (greedy_reference(loaded, p, n), FinishReason.LENGTH)
            for i, p in enumerate(prompts)}


# ------------------------------------------------------------------------------------------
# The pool itself
# ------------------------------------------------------------------------------------------


def _entry(n: int, fence: int = 1, start: int = 0) -> KvEntry:
    shape = (2, 1, n, 4)  # layers, heads, tokens, dim: 32 bytes per token per tensor
    return KvEntry(torch.zeros(shape), torch.zeros(shape), list(range(start, start + n)), fence)


def test_pool_evicts_least_recently_stored_and_validates_takes() -> None:
    pool = KvPool(capacity_bytes=_entry(10).nbytes * 2)
    assert pool.put("a", _entry(10)) == []
    assert pool.put("b", _entry(10)) == []
    assert pool.put("c", _entry(10)) == ["a"]  # the oldest goes
    assert pool.used_bytes == 2 * _entry(10).nbytes and len(pool) == 2
    assert pool.take("b", 1, list(range(9))) is None  # wrong tokens: stale, dropped
    assert "b" not in pool and pool.counters.stale == 1
    assert pool.take("c", 2, list(range(10))) is None  # wrong fence
    pool.put("c", _entry(10, fence=3))
    got = pool.take("c", 3, list(range(10)))
    assert got is not None and got.length == 10 and "c" not in pool  # taken out
    assert pool.take("zz", 1, [1]) is None
    counters = pool.counters
    assert (counters.hits, counters.misses, counters.evictions) == (1, 3, 1)
    assert pool.put("huge", _entry(100)) == [] and pool.counters.rejected == 1
    assert not pool.holds("huge", 1) and pool.used_bytes == 0


def test_pool_discard_and_bad_entries() -> None:
    pool = KvPool(capacity_bytes=BIG)
    pool.put("a", _entry(3))
    assert pool.discard("a") and not pool.discard("a")
    assert pool.used_bytes == 0 and pool.counters.dropped == 1
    with pytest.raises(ValueError, match="do not hold"):
        KvEntry(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), [1, 2], 1)
    with pytest.raises(ValueError, match=">= 0"):
        KvPool(capacity_bytes=-1)


@pytest.mark.parametrize(("lengths", "pass_tokens", "expected"), [
    ([], 32.0, []),
    ([5], 32.0, [[0]]),
    ([10, 10, 10], 32.0, [[0, 1, 2]]),  # no padding: one pass
    ([100, 10], 32.0, [[1], [0]]),  # padding 90 > a pass's 32: two passes
    ([100, 90], 32.0, [[1, 0]]),  # padding 10 < 32: one pass
    ([100, 10], float("inf"), [[1, 0]]),  # the profiler's single padded pass
    ([7, 300, 8, 290], 32.0, [[0, 2], [3, 1]]),
])
def test_prefill_groups(lengths: list[int], pass_tokens: float,
                        expected: list[list[int]]) -> None:
    assert prefill_groups(lengths, pass_tokens) == expected


def test_prefill_groups_are_optimal_against_brute_force() -> None:
    lengths = [3, 40, 41, 9, 100, 12, 95, 60]
    pass_tokens = 20.0

    def cost(groups: list[list[int]]) -> float:
        return sum(pass_tokens + len(g) * max(lengths[i] for i in g) for g in groups)

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))])
        for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r)
    )
    assert cost(prefill_groups(lengths, pass_tokens)) == best


def test_pass_tokens_from_the_fitted_prefill() -> None:
    assert pass_tokens_of(("1", "b", "l", "bl"), (0.04, 0.0, 0.0, 0.002)) == pytest.approx(20)
    assert pass_tokens_of(("1", "b"), (0.04, 0.01)) == 32.0  # no per-token term: default


# ------------------------------------------------------------------------------------------
# Equal outputs with retention on, off and generate()
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slice_len", [1, 3, 5])
def test_greedy_equal_on_off_and_generate(
    tiny: LoadedModel, prompts: list[list[int]], slice_len: int
) -> None:
    expected = _greedy(tiny, prompts, 13)
    for pool in (None, KvPool(BIG)):
        driver = Driver(SliceEngine(tiny, pool=pool))
        for i, p in enumerate(prompts):
            driver.add(str(i), p, RequestParams(max_tokens=13))
        assert driver.run(slice_len) == expected
        later = driver.stats[1:]
        if pool is None:
            assert all(s.resumed_rows == 0 for s in later)
            assert sum(s.recomputed_tokens for s in later) > 0
        else:  # every later slice resumes every row: nothing recomputed, nothing missed
            assert all(s.resumed_rows == s.batch_size for s in later)
            assert sum(s.recomputed_tokens + s.kv_misses for s in later) == 0
            assert len(pool) == 0  # finished requests leave nothing behind


def test_mixed_batches_of_resumed_and_fresh_rows(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    """Requests join at different slices, so batches mix resumed rows and first prefills
    of very different lengths (several prefill passes)."""
    long_prompt = tiny.codec.encode("a much longer prompt, so that prefill passes split " * 3)
    everything = [*prompts, long_prompt]
    expected = _greedy(tiny, everything, 11)
    driver = Driver(SliceEngine(tiny, pool=KvPool(BIG), pass_tokens=4.0))
    for i, p in enumerate(everything):
        driver.add(str(i), p, RequestParams(max_tokens=11))
    driver.step(3, only={"0", "1"})
    mixed = driver.step(3, only={"0", "1", "2", "4"})
    assert mixed.resumed_rows == 2 and len(mixed.prefill_passes) == 2
    driver.step(3, only={"1", "3", "4"})  # 3 joins, 0 and 2 wait a slice
    assert driver.run(3) == expected


def test_stale_and_evicted_entries_fall_back_to_prefill(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    expected = _greedy(tiny, prompts, 10)
    # Room for about one row's cache: rows evict each other all the time.
    one_row = tiny.info.kv_bytes_per_token * 40
    pool = KvPool(one_row)
    driver = Driver(SliceEngine(tiny, pool=pool))
    for i, p in enumerate(prompts):
        driver.add(str(i), p, RequestParams(max_tokens=10))
    driver.step(2)
    # A stale fence (as after a slice committed elsewhere): must miss, not resume.
    driver.kv_fence = {rid: (f + 100 if f else f) for rid, f in driver.kv_fence.items()}
    stale = driver.step(2)
    assert stale.resumed_rows == 0
    assert driver.run(2) == expected
    assert pool.counters.evictions > 0 and pool.counters.stale > 0
    assert sum(s.resumed_rows for s in driver.stats) > 0  # some rows did resume
    assert pool.used_bytes <= one_row


def test_seeded_sampling_equal_on_and_off(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    results = []
    for pool in (None, KvPool(BIG)):
        driver = Driver(SliceEngine(tiny, pool=pool))
        for i, p in enumerate(prompts):
            driver.add(str(i), p, dataclasses.replace(SAMPLED, seed=SAMPLED.seed + i))
        results.append(driver.run(4))
    assert results[0] == results[1]
    assert results[0]["0"][0] != greedy_reference(tiny, prompts[0], SAMPLED.max_tokens)


def test_rows_ending_mid_slice_leave_nothing(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    pool = KvPool(BIG)
    driver = Driver(SliceEngine(tiny, pool=pool))
    driver.add("short", prompts[0], RequestParams(max_tokens=2))
    driver.add("long", prompts[1], RequestParams(max_tokens=9))
    driver.step(4)
    assert "short" in driver.finished and "short" not in pool and "long" in pool
    entry = pool._entries["long"]
    assert entry.length == len(prompts[1]) + 4 - 1  # context before the unfed last token


def _cache_layers(cache: StaticCache) -> list[bool]:
    """Whether each layer of ``cache`` holds tensors."""
    return [bool(getattr(layer, "is_initialized", False)) and layer.keys.numel() > 0
            for layer in cache.layers]


def test_rows_move_in_and_out_one_layer_at_a_time(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    """A resumed row's K/V moves into the batch cache layer by layer and each entry layer
    is dropped once copied; at the end unfinished rows move back to the pool layer by
    layer, each cache layer released once copied: a row is held twice for at most one
    layer (the bound the one-memory budget reserves, docs/design.md)."""
    pool = KvPool(BIG)
    engine = SliceEngine(tiny, pool=pool)
    driver = Driver(engine)
    for i, p in enumerate(prompts):
        driver.add(str(i), p, RequestParams(max_tokens=12))
    driver.step(3)
    entries = {rid: pool._entries[rid] for rid in list(pool._entries)}
    assert len(entries) == len(prompts)
    layers = len(tiny.model.model.layers)
    seen: list[tuple[int, list[bool], int]] = []

    def on_layer(i: int, cache: StaticCache) -> None:
        held_in_entries = sum(t.nbytes for e in entries.values()
                              for t in e.keys + e.values if t is not None)
        seen.append((i, _cache_layers(cache), held_in_entries))

    engine.on_layer = on_layer
    driver.step(3)
    moving_in, moving_out = seen[:layers], seen[layers:]
    assert [i for i, *_ in moving_in] == list(range(layers))
    total = sum(e.nbytes for e in entries.values())
    for i, cache, held in moving_in:
        assert cache == [k <= i for k in range(layers)]
        assert held == total * (layers - 1 - i) // layers  # layer i of every entry is gone
    # the last batch leaves one layer at a time (a shrink before it would come first)
    assert [i for i, *_ in moving_out[-layers:]] == list(range(layers))
    for i, cache, _ in moving_out[-layers:]:
        assert cache == [k > i for k in range(layers)]
    assert set(pool._entries) == set(entries)  # every row came back, longer
    assert all(pool._entries[r].length == entries[r].length + 3 for r in entries)
    engine.on_layer = None
    assert driver.run(3) == _greedy(tiny, prompts, 12)


# ------------------------------------------------------------------------------------------
# SmolLM2-135M, float32
# ------------------------------------------------------------------------------------------


def test_smollm2_greedy_equal_on_off_and_generate(smollm2: LoadedModel) -> None:
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
             "1, 2, 3, 4,"]
    prompts = [smollm2.codec.encode(t) for t in texts]
    expected = {str(i): greedy_reference(smollm2, p, 12) for i, p in enumerate(prompts)}
    for pool in (None, KvPool(BIG)):
        driver = Driver(SliceEngine(smollm2, pool=pool, pass_tokens=8.0))
        for i, p in enumerate(prompts):
            driver.add(str(i), p, RequestParams(max_tokens=12))
        driver.step(4, only={"0"})  # then mixed batches: one resumed row, two prefilled
        results = driver.run(4)
        assert {rid: tokens for rid, (tokens, _) in results.items()} == expected
        if pool is not None:
            assert driver.stats[1].resumed_rows == 1 and driver.stats[1].batch_size == 3
            assert sum(s.recomputed_tokens for s in driver.stats) == 0
