"""Chunked prefill: passes of at most ``SCLS_PREFILL_CHUNK_TOKENS`` tokens bound a slice's
prefill activations, and the memory model prices that bound (shared/policy/prefill.py,
CostModel.prefill_activation). Table-driven and property checks, then the real engine on
the tiny model: chunks change nothing but the passes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.worker.engine import SliceEngine, SliceInput
from shared.core.records import RequestParams
from shared.modeling.loading import LoadedModel
from shared.policy.admission import _SetMemory
from shared.policy.costmodel import ACT_FEATURES, PREFILL_BASE, CostModel
from shared.policy.prefill import chunk_groups, prefill_passes
from tests.helpers import greedy_reference

MODEL = CostModel(
    slice_length=16, prefill_features=PREFILL_BASE, prefill_coef=(0.01, 0.002, 1e-5, 2e-3),
    decode_coef=(0.04, 0.004, 2e-5, 3e-6), kv_bytes_per_token=46_080,
    act_coef=(240.0, 212_870.0, 16_094.0, 127.4), mem_margin=1.03,
    resume_act_coef=(240.0, 888_114.0, 0.0, 0.08), resume_margin=1.0,
)


@pytest.mark.parametrize(("groups", "lengths", "chunk", "expected"), [
    ([[0, 1, 2, 3]], [256] * 4, 0, [[0, 1, 2, 3]]),  # no limit
    ([[0, 1, 2, 3]], [256] * 4, 512, [[0, 1], [2, 3]]),  # 2 rows x 256 per pass
    ([[0, 1, 2]], [100, 200, 300], 600, [[0, 1], [2]]),  # counted at the group's longest
    ([[0], [1, 2]], [3000, 10, 20], 1000, [[0], [1, 2]]),  # a long row is a pass alone
    ([[0, 1, 2]], [5, 5, 5], 10, [[0, 1], [2]]),
])
def test_chunk_groups_cut_passes_to_the_token_budget(
    groups: list[list[int]], lengths: list[int], chunk: int, expected: list[list[int]]
) -> None:
    assert chunk_groups(groups, lengths, chunk) == expected


def test_the_priced_bound_covers_every_pass_the_engine_makes() -> None:
    """For random batches: every pass's activations (rows x padded length) are within
    prefill_activation(fresh rows, longest), and without a chunk limit the bound is one
    padded pass exactly."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        lengths = rng.integers(1, 3000, int(rng.integers(1, 40))).tolist()
        chunk = int(rng.choice([256, 1024, 2048, 8192]))
        model = replace(MODEL, prefill_chunk_tokens=chunk)
        bound = float(model.prefill_activation(len(lengths), max(lengths)))
        for rows, longest in prefill_passes(lengths, 32.0, chunk):
            assert rows * longest <= max(chunk, longest)
            assert float(model.activation_bytes(rows, longest)) <= bound * (1 + 1e-12)
    assert float(MODEL.prefill_activation(20, 256)) == float(MODEL.activation_bytes(20, 256))


def test_chunks_free_a_slice_budget_for_more_rows() -> None:
    """20 fresh 256-token rows: one pass's activations are about half the slice's peak;
    chunks of 2048 tokens (8 rows) cut the peak, and never below its decode phase."""
    chunked = replace(MODEL, prefill_chunk_tokens=2048)
    one_pass, cut = float(MODEL.slice_memory(20, 256, 32)), float(chunked.slice_memory(20, 256, 32))
    assert cut < 0.75 * one_pass
    assert cut >= float(chunked.resume_memory(20, 256, 32))
    # without a resume envelope the decode phase is unknown: no reduction is claimed
    bare = replace(chunked, resume_act_coef=())
    assert float(bare.slice_memory(20, 256, 32)) == one_pass


@pytest.mark.parametrize("model", [
    replace(MODEL, prefill_chunk_tokens=1024),  # chunked, resume envelope
    replace(MODEL, prefill_chunk_tokens=1024, act_coef=(1.0, 1e5, 2e4, 90.0)),
    MODEL,  # one pass, resume envelope
    replace(MODEL, prefill_chunk_tokens=1024, resume_act_coef=()),  # no envelope: plain
    replace(MODEL, act_features=("1", "b", "l", "bl", "bll", "b2"),  # every feature form
            act_coef=(5.0, 1e4, 300.0, 2e3, 7.0, 4e6), resume_act_coef=(1.0, 2e4, 0, 0, 0, 9.0),
            prefill_chunk_tokens=512),
])
def test_admissions_scalar_memory_prices_like_the_model(model: CostModel) -> None:
    """Admission prices one set at a time on Python floats (_SetMemory): it must agree
    with CostModel.mixed_memory, chunks, envelopes and every feature form included."""
    assert model.act_features == ACT_FEATURES or "b2" in model.act_features
    scalar = _SetMemory(model, 16)
    rng = np.random.default_rng(3)
    for _ in range(200):
        b = int(rng.integers(1, 64))
        fresh = int(rng.integers(0, b + 1))
        width = float(rng.integers(1, 4000))
        fresh_len = float(rng.integers(1, int(width) + 1)) if fresh else 0.0
        want = float(model.mixed_memory(b, width, 16, fresh, fresh_len))
        assert scalar(b, width, fresh, fresh_len) == pytest.approx(want, rel=1e-12)


def test_chunked_prefill_gives_generates_greedy_tokens(tiny: LoadedModel) -> None:
    """Chunks of 24 tokens split six prompts into several passes, written into one batch
    cache; every row still ends with generate()'s greedy tokens."""
    prompts = [tiny.codec.encode(t) for t in (
        "Chunked prefill keeps activations bounded", "Hi there", "A third, longer prompt!",
        "short", "Another prompt of middling length", "and one more")]
    engine = SliceEngine(tiny, prefill_chunk_tokens=24)
    rows = [SliceInput(f"r{i}", p, [], RequestParams(max_tokens=8, ignore_eos=True))
            for i, p in enumerate(prompts)]
    outputs, stats = engine.run_slice(rows, 8)
    assert len(stats.prefill_passes) >= 3
    assert all(n * longest <= max(24, longest) for n, longest in stats.prefill_passes)
    for out, prompt in zip(outputs, prompts, strict=True):
        assert out.new_ids == greedy_reference(tiny, prompt, 8)
