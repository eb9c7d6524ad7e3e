"""SliceEngine and sampling on the tiny random Llama: real transformers code, no mocks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch

from services.worker.engine import SliceEngine, SliceInput, SliceStats
from services.worker.sampling import select_tokens, uniform_for
from shared.core.records import RequestParams
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel, load_model
from shared.modeling.registry import ByteCodec
from tests.helpers import greedy_reference

PROMPTS = ("The quick brown fox jumps", "Hi", "Slices, batches & seeds: 12345")
SAMPLED = RequestParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1234)

Result = tuple[list[int], FinishReason]


@pytest.fixture(scope="module")
def prompts(tiny: LoadedModel) -> list[list[int]]:
    """Three prompts of different lengths (5 to 30 tokens)."""
    return [tiny.codec.encode(p) for p in PROMPTS]



def run_to_end(
    engine: SliceEngine, rows: dict[str, tuple[list[int], RequestParams]], slice_len: int
) -> tuple[dict[str, Result], list[SliceStats]]:
    """Run slices until every request finishes, re-feeding generated ids like the worker does."""
    generated: dict[str, list[int]] = {rid: [] for rid in rows}
    finished: dict[str, Result] = {}
    all_stats = []
    while len(finished) < len(rows):
        batch = [
            SliceInput(rid, prompt, list(generated[rid]), params)
            for rid, (prompt, params) in rows.items()
            if rid not in finished
        ]
        outputs, stats = engine.run_slice(batch, slice_len)
        all_stats.append(stats)
        assert [o.request_id for o in outputs] == [r.request_id for r in batch]
        for out in outputs:
            assert len(out.new_ids) <= slice_len
            generated[out.request_id] += out.new_ids
            if out.finish_reason is not None:
                finished[out.request_id] = (generated[out.request_id], out.finish_reason)
    return finished, all_stats


def with_eos(loaded: LoadedModel, eos: int) -> LoadedModel:
    """The same model, with ``eos`` declared as its end-of-sequence token."""
    return dataclasses.replace(loaded, codec=ByteCodec(eos_ids=frozenset({eos})))


# ------------------------------------------------------------------------------------------
# (a) greedy == generate()
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slice_len", [4, 64])
def test_greedy_slices_match_generate(
    tiny: LoadedModel, prompts: list[list[int]], slice_len: int
) -> None:
    engine = SliceEngine(tiny)
    rows = {str(i): (p, RequestParams(max_tokens=13)) for i, p in enumerate(prompts)}
    results, all_stats = run_to_end(engine, rows, slice_len)
    for i, prompt in enumerate(prompts):
        assert results[str(i)] == (greedy_reference(tiny, prompt, 13), FinishReason.LENGTH)
    assert len(all_stats) == (4 if slice_len == 4 else 1)  # 13 tokens = 4 + 4 + 4 + 1


# ------------------------------------------------------------------------------------------
# (b) seeded sampling
# ------------------------------------------------------------------------------------------


def test_seeded_sampling_ignores_slicing_and_batching(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = SliceEngine(tiny)
    target = prompts[0]
    others = {
        "greedy": (prompts[1], RequestParams(max_tokens=10)),
        "other-seed": (prompts[2], dataclasses.replace(SAMPLED, seed=99, max_tokens=30)),
    }
    runs = []
    for slice_len in (4, 64):
        alone, _ = run_to_end(engine, {"t": (target, SAMPLED)}, slice_len)
        batched, _ = run_to_end(engine, {**others, "t": (target, SAMPLED)}, slice_len)
        runs += [alone["t"], batched["t"]]
    assert all(run == runs[0] for run in runs)
    tokens = runs[0][0]
    assert len(tokens) == SAMPLED.max_tokens
    assert tokens != greedy_reference(tiny, target, SAMPLED.max_tokens)  # really sampled

    other_seed = dataclasses.replace(SAMPLED, seed=4321)
    different, _ = run_to_end(engine, {"t": (target, other_seed)}, 64)
    assert different["t"][0] != tokens


def test_select_tokens_greedy_and_nucleus() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    greedy = select_tokens(logits, [0.0, 0.0], [1.0, 1.0], [1, 2], [0, 0])
    assert greedy.tolist() == [1, 0]
    # A nucleus this small keeps only the most likely token, whatever the draw.
    for position in range(50):
        tiny_p = select_tokens(logits, [1.0, 1.0], [1e-6, 1e-6], [7, 7], [position] * 2)
        assert tiny_p.tolist() == [1, 0]


def test_select_tokens_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :]
    draws = [select_tokens(logits, [1.0], [1.0], [5], [p]).item() for p in range(4000)]
    freq = Counter(draws)
    for token, p in enumerate(probs.tolist()):
        assert abs(freq[token] / len(draws) - p) < 0.03
    # top_p = 0.8 keeps {0.5, 0.3}: renormalised to 0.625 / 0.375, the tail never drawn.
    nucleus = [select_tokens(logits, [1.0], [0.8], [5], [p]).item() for p in range(4000)]
    assert set(nucleus) == {0, 1}
    assert abs(nucleus.count(0) / len(nucleus) - 0.625) < 0.03


def test_uniform_depends_only_on_seed_and_position() -> None:
    assert uniform_for(1234, 7) == uniform_for(1234, 7)
    values = {uniform_for(seed, pos) for seed in range(20) for pos in range(20)}
    assert len(values) == 400
    assert all(0.0 <= v < 1.0 for v in values)


# ------------------------------------------------------------------------------------------
# (c) early stop on EOS
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_case(tiny: LoadedModel, prompts: list[list[int]]) -> tuple[int, list[list[int]]]:
    """A token that greedy decoding emits in every prompt's output, and those outputs."""
    greedy = [greedy_reference(tiny, p, 40) for p in prompts]
    rows_with = Counter(t for g in greedy for t in set(g))
    eos, count = rows_with.most_common(1)[0]
    assert count == len(prompts), "no token shared by every greedy output"
    assert len({g.index(eos) for g in greedy}) > 1, "rows must stop at different steps"
    return eos, greedy


@pytest.mark.parametrize("drop", [True, False])
def test_eos_finishes_rows_and_returns_early(
    tiny: LoadedModel,
    prompts: list[list[int]],
    eos_case: tuple[int, list[list[int]]],
    drop: bool,
) -> None:
    eos, greedy = eos_case
    engine = SliceEngine(with_eos(tiny, eos), drop_finished_rows=drop)
    rows = [SliceInput(str(i), p, [], RequestParams(max_tokens=40)) for i, p in enumerate(prompts)]
    outputs, stats = engine.run_slice(rows, slice_len=64)
    stop_at = [g.index(eos) for g in greedy]  # EOS is not part of new_ids
    for out, g, k in zip(outputs, greedy, stop_at, strict=True):
        assert out.new_ids == g[:k]
        assert out.finish_reason is FinishReason.STOP
    assert stats.steps == max(stop_at) + 1 < 64  # returned as soon as the last row stopped
    assert stats.generated_tokens == sum(stop_at)
    expected_invalid = 0 if drop else sum(stats.steps - (k + 1) for k in stop_at)
    assert stats.invalid_tokens == expected_invalid
    if not drop:
        assert stats.invalid_tokens > 0


def test_eos_is_ignored_on_request(
    tiny: LoadedModel, prompts: list[list[int]], eos_case: tuple[int, list[list[int]]]
) -> None:
    eos, greedy = eos_case
    engine = SliceEngine(with_eos(tiny, eos))
    params = RequestParams(max_tokens=40, ignore_eos=True)
    results, _ = run_to_end(engine, {"0": (prompts[0], params)}, 16)
    assert results["0"] == (greedy[0], FinishReason.LENGTH)


def test_eos_across_slices(
    tiny: LoadedModel, prompts: list[list[int]], eos_case: tuple[int, list[list[int]]]
) -> None:
    eos, greedy = eos_case
    engine = SliceEngine(with_eos(tiny, eos))
    rows = {str(i): (p, RequestParams(max_tokens=40)) for i, p in enumerate(prompts)}
    results, _ = run_to_end(engine, rows, 3)
    for i, g in enumerate(greedy):
        assert results[str(i)] == (g[: g.index(eos)], FinishReason.STOP)


# ------------------------------------------------------------------------------------------
# (d) LENGTH and max_tokens
# ------------------------------------------------------------------------------------------


def test_length_finish_never_exceeds_max_tokens(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = SliceEngine(tiny)
    greedy = greedy_reference(tiny, prompts[0], 10)
    rows = [
        SliceInput("short", prompts[0], [], RequestParams(max_tokens=3)),
        SliceInput("long", prompts[0], [], RequestParams(max_tokens=10)),
        SliceInput("resumed", prompts[0], greedy[:8], RequestParams(max_tokens=10)),
        SliceInput("spent", prompts[0], greedy[:10], RequestParams(max_tokens=10)),
    ]
    outputs, stats = engine.run_slice(rows, slice_len=4)
    by_id = {o.request_id: o for o in outputs}
    assert (by_id["short"].new_ids, by_id["short"].finish_reason) == (
        greedy[:3],
        FinishReason.LENGTH,
    )
    assert (by_id["long"].new_ids, by_id["long"].finish_reason) == (greedy[:4], None)
    assert (by_id["resumed"].new_ids, by_id["resumed"].finish_reason) == (
        greedy[8:10],
        FinishReason.LENGTH,
    )
    assert (by_id["spent"].new_ids, by_id["spent"].finish_reason) == ([], FinishReason.LENGTH)
    assert stats.batch_size == 3  # the spent row is never prefilled
    assert stats.steps == 4
    # rows per decode step: "resumed" leaves after its 2nd token, "short" after its 3rd
    assert stats.decode_rows == (3, 2, 1)
    assert stats.generated_tokens == 3 + 4 + 2


def test_slice_of_only_spent_rows_runs_nothing(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    engine = SliceEngine(tiny)
    row = SliceInput("spent", prompts[1], [5, 6], RequestParams(max_tokens=2))
    outputs, stats = engine.run_slice([row], slice_len=8)
    assert (outputs[0].new_ids, outputs[0].finish_reason) == ([], FinishReason.LENGTH)
    assert (stats.batch_size, stats.steps, stats.generated_tokens) == (0, 0, 0)


def test_bad_arguments_raise(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    engine = SliceEngine(tiny)
    with pytest.raises(ValueError, match="slice_len"):
        engine.run_slice([SliceInput("a", prompts[0], [], RequestParams(max_tokens=2))], 0)
    with pytest.raises(ValueError, match="no prompt"):
        engine.run_slice([SliceInput("a", [], [], RequestParams(max_tokens=2))], 4)


# ------------------------------------------------------------------------------------------
# (e) stop strings
# ------------------------------------------------------------------------------------------


def stop_string_case(loaded: LoadedModel, prompts: list[list[int]]) -> tuple[int, str, int]:
    """(prompt index, stop string, j): a two-character stop string that first appears in
    the greedy text when token j (>= 2) is added, its first character coming from token j-1."""
    codec = loaded.codec
    for index, prompt in enumerate(prompts):
        greedy = greedy_reference(loaded, prompt, 40)
        printable = [33 + 3 <= t <= 126 + 3 for t in greedy]  # printable ASCII byte ids
        for j in range(2, len(greedy)):
            if not (printable[j] and printable[j - 1]):
                continue
            stop = codec.decode(greedy[j - 1 : j + 1])
            if stop not in codec.decode(greedy[:j]):
                return index, stop, j
    raise AssertionError("no usable stop string in the greedy outputs")


def test_stop_string_spanning_slices(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    index, stop, j = stop_string_case(tiny, prompts)
    greedy = greedy_reference(tiny, prompts[index], 40)
    engine = SliceEngine(tiny)
    params = RequestParams(max_tokens=40, stop=("never-there", stop))
    # slice_len = j puts token j-1 at the end of one slice and token j at the start of the
    # next: only the text of all generated tokens, old and new, contains the stop string.
    results, _ = run_to_end(engine, {"s": (prompts[index], params)}, j)
    assert results["s"] == (greedy[: j + 1], FinishReason.STOP)  # the stop token is kept
    results, _ = run_to_end(engine, {"s": (prompts[index], params)}, 64)
    assert results["s"] == (greedy[: j + 1], FinishReason.STOP)


# ------------------------------------------------------------------------------------------
# (f) stats
# ------------------------------------------------------------------------------------------


def test_stats_count_padding_and_recomputation(tiny: LoadedModel) -> None:
    engine = SliceEngine(tiny)
    params = RequestParams(max_tokens=50, ignore_eos=True)
    rows = [
        SliceInput("a", [10, 11, 12, 13, 14], [20, 21, 22], params),  # context 8, resumed
        SliceInput("b", [10, 11], [], params),  # context 2, new
        SliceInput("c", [10, 11, 12, 13, 14, 15, 16], [20], params),  # context 8, resumed
    ]
    outputs, stats = engine.run_slice(rows, slice_len=5)
    assert stats.batch_size == 3
    assert stats.padded_len == 8
    assert stats.pad_tokens == 3 * 8 - (8 + 2 + 8)
    assert stats.recomputed_tokens == 8 + 8
    assert stats.steps == 5
    assert stats.generated_tokens == 15 == sum(len(o.new_ids) for o in outputs)
    assert stats.invalid_tokens == 0
    assert stats.decode_rows == (3, 3, 3, 3)
    assert stats.peak_memory_bytes is None  # CPU
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert all(o.finish_reason is None for o in outputs)


def test_tiny_cache_dir_is_untouched(tmp_path: Path) -> None:
    # tiny-random is built in code: loading it writes nothing.
    load_model("tiny-random", tmp_path, device="cpu")
    assert list(tmp_path.iterdir()) == []
