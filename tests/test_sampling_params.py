"""OpenAI/vLLM sampling parameters in the engine: logit_bias, min_tokens, penalties, top_k,
log-probabilities and per-step token streaming, on the tiny random Llama (real transformers).

Each one must give the same tokens however the request is sliced (docs/design.md §6.5).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.worker.engine import SliceEngine, SliceInput
from services.worker.sampling import RowTokens, adjust_logits, select_tokens
from shared.core.records import RequestParams, StepTokens
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel
from tests.test_engine import run_to_end, with_eos

PROMPT = "Slices, batches & seeds: 12345"


@pytest.fixture(scope="module")
def prompt(tiny: LoadedModel) -> list[int]:
    return tiny.codec.encode(PROMPT)


def test_logit_bias_forces_a_token(tiny: LoadedModel, prompt: list[int]) -> None:
    params = RequestParams(max_tokens=6, logit_bias=((77, 100.0),))
    results, _ = run_to_end(SliceEngine(tiny), {"r": (prompt, params)}, 2)
    assert results["r"] == ([77] * 6, FinishReason.LENGTH)


def test_min_tokens_holds_back_eos(tiny: LoadedModel, prompt: list[int]) -> None:
    eos = 77
    model = with_eos(tiny, eos)
    # EOS is the only token the bias makes likely: without min_tokens it comes first.
    biased = RequestParams(max_tokens=10, logit_bias=((eos, 100.0),))
    results, _ = run_to_end(SliceEngine(model), {"r": (prompt, biased)}, 4)
    assert results["r"] == ([], FinishReason.STOP)
    held = dataclasses.replace(biased, min_tokens=3)
    results, _ = run_to_end(SliceEngine(model), {"r": (prompt, held)}, 2)
    tokens, reason = results["r"]
    assert len(tokens) == 3 and eos not in tokens and reason is FinishReason.STOP


def test_repetition_penalty_matches_transformers(tiny: LoadedModel, prompt: list[int]) -> None:
    ids = torch.tensor([prompt])
    reference = tiny.model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
        repetition_penalty=0.5, pad_token_id=tiny.codec.pad_id,
    )[0, len(prompt):].tolist()
    # Below 1 the penalty favours tokens already seen: the tiny model's output changes.
    params = RequestParams(max_tokens=24, repetition_penalty=0.5)
    for slice_len in (3, 64):
        results, _ = run_to_end(SliceEngine(tiny), {"r": (prompt, params)}, slice_len)
        assert results["r"] == (reference, FinishReason.LENGTH)
    plain, _ = run_to_end(SliceEngine(tiny), {"r": (prompt, RequestParams(max_tokens=24))}, 64)
    assert plain["r"][0] != reference, "the penalty changed nothing: pick another prompt"


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0]])
    params = RequestParams(max_tokens=4, presence_penalty=0.5, frequency_penalty=0.25)
    out = adjust_logits(logits, [RowTokens(params, [0, 1], [3, 3, 4])], eos_ids=())
    # OpenAI: logit -= count * frequency + (count > 0) * presence, over generated tokens only.
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0 - 2 * 0.25 - 0.5, -1.0 - 0.25 - 0.5]])
    assert torch.allclose(out, expected)
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0]]))  # not in place
    plain = RequestParams(max_tokens=4)
    assert adjust_logits(logits, [RowTokens(plain, [0], [3])], eos_ids=()) is logits


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    greedy = logits.argmax(dim=-1)
    drawn = select_tokens(logits, [1.5] * 6, [1.0] * 6, list(range(6)), [0] * 6,
                          top_ks=[1] * 6)
    assert torch.equal(drawn, greedy)
    wide = [select_tokens(logits[:1], [1.5], [1.0], [9], [p], top_ks=[3]).item()
            for p in range(300)]
    assert set(wide) == set(logits[0].topk(3).indices.tolist())


def test_parameters_do_not_depend_on_slicing(tiny: LoadedModel, prompt: list[int]) -> None:
    params = RequestParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=20, seed=7,
                           presence_penalty=0.6, frequency_penalty=0.3,
                           repetition_penalty=1.2, logit_bias=((5, 2.0),), logprobs=3)
    other = (tiny.codec.encode("another row"), RequestParams(max_tokens=9))
    runs = []
    for slice_len in (1, 5, 64):
        finished, _ = run_to_end(SliceEngine(tiny), {"r": (prompt, params), "o": other},
                                 slice_len)
        runs.append(finished["r"])
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0][0]) == 20


def test_logprobs_are_the_raw_distribution(tiny: LoadedModel, prompt: list[int]) -> None:
    engine = SliceEngine(tiny)
    params = RequestParams(max_tokens=3, logprobs=4)
    outputs, _ = engine.run_slice([SliceInput("r", prompt, [], params)], 8)
    out = outputs[0]
    assert len(out.logprobs) == len(out.new_ids) == 3
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([prompt])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    first = out.logprobs[0]
    assert first.logprob == pytest.approx(expected[out.new_ids[0]].item(), abs=1e-4)
    assert [t for t, _ in first.top] == expected.topk(4).indices.tolist()
    for token, logprob in zip(out.new_ids, out.logprobs, strict=True):
        assert len(logprob.top) == 4
        assert logprob.top[0] == (token, pytest.approx(logprob.logprob))  # greedy: the max
    none, _ = engine.run_slice([SliceInput("r", prompt, [], RequestParams(max_tokens=3))], 8)
    assert none[0].logprobs == []


def test_streaming_rows_report_every_token_once(tiny: LoadedModel, prompt: list[int]) -> None:
    engine = SliceEngine(tiny)
    seen: list[StepTokens] = []
    rows = [
        SliceInput("s", prompt, [4, 5], RequestParams(max_tokens=9, stream=True), fence=3),
        SliceInput("q", prompt, [], RequestParams(max_tokens=9)),
    ]
    outputs, _ = engine.run_slice(rows, 5, seen.extend)
    assert {s.request_id for s in seen} == {"s"}
    assert [s.position for s in seen] == [2, 3, 4, 5, 6]
    assert [t for s in seen for t in s.ids] == outputs[0].new_ids
    assert {s.fence for s in seen} == {3}
