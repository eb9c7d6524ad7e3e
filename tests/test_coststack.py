"""Every instance's cost model evaluated at once (shared/policy/coststack.py): the stacked
matrix product gives what each model's own methods give, for models with different
feature sets, with and without a resume envelope; other SliceCosts fall back to one call
per model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from shared.policy.costmodel import PREFILL_BASE, PREFILL_QUADRATIC, CostModel
from shared.policy.coststack import KINDS, EachModel, LinearStack, cost_stack


def _model(prefill_features: tuple[str, ...], jitter: float, resume: bool) -> CostModel:
    prefill = (0.01, 0.002, 1e-5, 2e-3, 1.2e-6)[: len(prefill_features)]
    return CostModel(
        slice_length=16,
        prefill_features=prefill_features,
        prefill_coef=tuple(c * jitter for c in prefill),
        decode_coef=(0.04 * jitter, 0.004, 2e-5, 3e-6 * jitter),
        decode_batched_extra=0.025 * jitter,
        kv_bytes_per_token=46_080,
        act_coef=(8e6, 4e5 * jitter, 7e4, 20.0),
        mem_margin=1.1,
        resume_act_coef=(5e6, 2e5, 3e4 * jitter, 0.0) if resume else (),
        resume_margin=1.05,
    )


MODELS = [
    _model(PREFILL_BASE, 1.0, resume=False),
    _model(PREFILL_QUADRATIC, 1.1, resume=True),
    _model(PREFILL_BASE, 0.9, resume=True),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s", [1, 16, 32])
@pytest.mark.parametrize("chunk", [0, 2048])
def test_the_stack_equals_each_models_own_method(kind: str, s: int, chunk: int) -> None:
    """Also with chunked prefill (a slice's memory is then the larger of two forms)."""
    rng = np.random.default_rng(s)
    b = rng.integers(1, 33, 50)
    l = rng.integers(1, 4096, 50)  # noqa: E741
    models = [replace(m, prefill_chunk_tokens=chunk) for m in MODELS]
    stack = cost_stack(models)
    assert isinstance(stack, LinearStack)
    got = stack.evaluate(kind, b, l, s)
    want = np.array([getattr(m, kind)(b, l, s) for m in models])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    which = rng.integers(0, len(models), 50)
    np.testing.assert_allclose(stack.evaluate(kind, b, l, s, which),
                               want[which, np.arange(50)], rtol=1e-12)


class Delegate:
    """A SliceCost that is not a CostModel (as tests' hand-written models are)."""

    def __init__(self, model: CostModel) -> None:
        self.model = model

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)


@pytest.mark.parametrize("kind", KINDS)
def test_other_slice_costs_are_evaluated_one_by_one(kind: str) -> None:
    costs = [Delegate(MODELS[0]), MODELS[1], MODELS[1]]  # not all CostModel: no stack
    stack = cost_stack(costs)
    assert isinstance(stack, EachModel)
    b, l = np.array([1, 4, 9]), np.array([10, 300, 2000])  # noqa: E741
    want = np.array([getattr(c, kind)(b, l, 16) for c in costs])
    np.testing.assert_allclose(stack.evaluate(kind, b, l, 16), want)
    which = np.array([2, 0, 1])
    np.testing.assert_allclose(stack.evaluate(kind, b, l, 16, which),
                               want[which, np.arange(3)])


def test_a_time_scaled_model_stacks_too() -> None:
    slow = MODELS[0].time_scaled(2.0)
    stack = cost_stack([MODELS[0], slow])
    t = stack.evaluate("slice_time", [4], [512], 16)
    assert t[1, 0] == pytest.approx(2 * t[0, 0])
    assert isinstance(cost_stack([replace(MODELS[0])]), LinearStack)


def test_models_with_different_prefill_chunks_are_evaluated_one_by_one() -> None:
    models = [MODELS[1], replace(MODELS[2], prefill_chunk_tokens=512)]
    stack = cost_stack(models)
    assert isinstance(stack, EachModel)
    want = np.array([m.slice_memory(8, 300, 16) for m in models])
    np.testing.assert_allclose(stack.evaluate("slice_memory", 8, 300, 16).ravel(), want)
