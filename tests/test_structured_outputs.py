"""Structured outputs in the slice engine (docs/structured-outputs.md): every constrained
row's output matches its grammar, and is token for token the same whatever the slice
length, the KV pool and the batch it runs in, because each slice rebuilds the grammar's
state from the generated tokens. Real transformers code on tiny-random (byte codec) and
SmolLM2-135M, real llguidance, no mocks.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest

from services.worker.engine import SliceEngine, SliceInput
from services.worker.kv_pool import KvPool
from shared.core.records import RequestParams
from shared.core.states import FinishReason
from shared.grammar.spec import GrammarSpec
from shared.modeling.loading import LoadedModel
from tests.test_grammar import CHOICES, REGEXES, SCHEMAS

BIG = 1 << 30
#: The byte codec's ids (byte + 3) of the characters that close JSON values, and of those
#: that open one more level. A random model inside a string picks among ~250 allowed bytes
#: and rarely the quote, and greedy on a recursive schema may nest forever: a bias towards
#: closing makes its documents end within max_tokens (and checks that the mask composes
#: with logit_bias: a bias never lets a forbidden token through).
CLOSERS = tuple(sorted([(ord(c) + 3, 6.0) for c in '"}]'] + [(ord(",") + 3, 2.0)]
                       + [(ord(c) + 3, -6.0) for c in "{["]))

Outputs = dict[str, tuple[list[int], FinishReason]]


def run(engine: SliceEngine, rows: list[SliceInput], slice_len: int) -> Outputs:
    """Run ``rows`` slice by slice until each finishes, as the scheduler and the workers
    do: fences grow per slice, the K/V fence is the one the pool kept the row under."""
    generated = {r.request_id: list(r.generated_ids) for r in rows}
    kv_fence: dict[str, int | None] = {r.request_id: None for r in rows}
    done: Outputs = {}
    fence = 0
    while len(done) < len(rows):
        fence += 1
        live = [replace(r, generated_ids=list(generated[r.request_id]), fence=fence,
                        kv_fence=kv_fence[r.request_id])
                for r in rows if r.request_id not in done]
        outputs, _ = engine.run_slice(live, slice_len)
        for row, out in zip(live, outputs, strict=True):
            generated[out.request_id] += out.new_ids
            kv_fence[out.request_id] = row.fence if out.kv_retained else None
            if out.finish_reason is not None:
                done[out.request_id] = (generated[out.request_id], out.finish_reason)
    return done


def rows_for(loaded: LoadedModel, specs: list[GrammarSpec], params: RequestParams
             ) -> list[SliceInput]:
    """One row per spec, each with its own prompt (so the batch mixes lengths)."""
    return [SliceInput(f"r{i}", loaded.codec.encode(f"Answer {i} in the asked format: "),
                       [], replace(params, grammar=spec.key,
                                   seed=None if params.seed is None else params.seed + i))
            for i, spec in enumerate(specs)]


def check_output(spec: GrammarSpec, text: str) -> None:
    """``text`` is what ``spec`` asks for."""
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(spec.text))
    elif spec.kind == "regex":
        assert re.fullmatch(spec.text, text), (spec.text, text)
    elif spec.kind == "choice":
        assert text in json.loads(spec.text), (spec.text, text)


def specs_of_every_kind() -> list[GrammarSpec]:
    return ([GrammarSpec.json_schema(s, "schema") for s in SCHEMAS]
            + [GrammarSpec.regex(p, "regex") for p in REGEXES]
            + [GrammarSpec.choice(c, "choice") for c in CHOICES])


GREEDY = RequestParams(max_tokens=300, logit_bias=CLOSERS)
SAMPLED = replace(GREEDY, temperature=0.8, top_p=0.95, top_k=40, seed=11)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_every_output_matches_and_slicing_changes_nothing(
    tiny: LoadedModel, params: RequestParams
) -> None:
    """52 JSON schemas, 6 regexes and 3 choice lists in one batch: every output matches
    its grammar and ends with STOP; S = 1, 5, 64 and unsliced give the same tokens."""
    specs = specs_of_every_kind()
    assert len(SCHEMAS) >= 50
    rows = rows_for(tiny, specs, params)
    unsliced = run(SliceEngine(tiny), rows, 10_000)
    for spec, row in zip(specs, rows, strict=True):
        ids, finish = unsliced[row.request_id]
        assert finish is FinishReason.STOP, (spec, tiny.codec.decode(ids))
        check_output(spec, tiny.codec.decode(ids))
    for slice_len in (1, 5, 64):
        engine = SliceEngine(tiny, pool=KvPool(BIG))
        assert run(engine, rows, slice_len) == unsliced, slice_len


def test_constrained_rows_beside_free_ones_and_what_composes(tiny: LoadedModel) -> None:
    """A constrained row and free rows in one batch: the free rows generate what they
    generate alone; the constrained row's logprobs are the raw distribution's (the mask
    applies after them, as vLLM's raw_logprobs); a grammar that cannot finish within
    max_tokens ends with LENGTH; stop strings still apply under a grammar."""
    free = RequestParams(max_tokens=12, ignore_eos=True)
    alone = run(SliceEngine(tiny), [SliceInput("free", tiny.codec.encode("Hello"), [], free)],
                4)
    spec = GrammarSpec.regex("[0-9]{20}", "regex")
    rows = [SliceInput("free", tiny.codec.encode("Hello"), [], free),
            SliceInput("digits", tiny.codec.encode("Count: "), [],
                       RequestParams(max_tokens=8, grammar=spec.key, logprobs=2)),
            SliceInput("stopped", tiny.codec.encode("Count: "), [],
                       RequestParams(max_tokens=30, grammar=spec.key, stop=("7",),
                                     logit_bias=((ord("7") + 3, 50.0),)))]
    engine = SliceEngine(tiny)
    outputs, _ = engine.run_slice(rows, 30)
    assert (outputs[0].new_ids, outputs[0].finish_reason) == alone["free"]
    digits = outputs[1]
    assert digits.finish_reason is FinishReason.LENGTH and len(digits.new_ids) == 8
    assert tiny.codec.decode(digits.new_ids).isdigit()
    # raw logprobs: the chosen digit need not be the model's most likely token
    assert all(lp.logprob <= 0 for lp in digits.logprobs) and len(digits.logprobs) == 8
    stopped = outputs[2]
    assert stopped.finish_reason is FinishReason.STOP
    assert tiny.codec.decode(stopped.new_ids) == "7"


def test_a_grammar_that_ends_finishes_the_request(tiny: LoadedModel) -> None:
    """A grammar with nothing left to add ends the request with STOP at once, though
    max_tokens has room and EOS is ignored."""
    spec = GrammarSpec.choice(["yes", "no"], "choice")
    rows = [SliceInput("c", tiny.codec.encode("Well? "), [],
                       RequestParams(max_tokens=50, ignore_eos=True, grammar=spec.key))]
    outputs, _ = SliceEngine(tiny).run_slice(rows, 50)
    assert outputs[0].finish_reason is FinishReason.STOP
    assert tiny.codec.decode(outputs[0].new_ids) in ("yes", "no")


@pytest.mark.parametrize("params", [
    RequestParams(max_tokens=160), RequestParams(max_tokens=160, temperature=0.7, seed=5)],
    ids=["greedy", "sampled"])
def test_smollm2_outputs_match_and_slicing_changes_nothing(
    smollm2: LoadedModel, params: RequestParams
) -> None:
    """The same on SmolLM2-135M (no bias: a real model closes its strings): every output
    that ends is valid; sliced at S = 7 with the pool it is the same as unsliced."""
    specs = specs_of_every_kind()
    rows = rows_for(smollm2, specs, params)
    unsliced = run(SliceEngine(smollm2), rows, 10_000)
    finished = 0
    for spec, row in zip(specs, rows, strict=True):
        ids, finish = unsliced[row.request_id]
        if finish is FinishReason.STOP:
            check_output(spec, smollm2.codec.decode(ids))
            finished += 1
    assert finished >= 0.9 * len(specs), finished
    assert run(SliceEngine(smollm2, pool=KvPool(BIG)), rows, 7) == unsliced


@pytest.mark.parametrize("memory_bounded", [False, True], ids=["ils", "ils-vllm"])
def test_the_ils_engines_give_the_same_constrained_output(
    tiny: LoadedModel, memory_bounded: bool
) -> None:
    """Our iteration-level engines run the same grammar code: constrained rows admitted at
    staggered steps, capped at 3 running (and, memory-bounded, preempted by recompute on a
    tight budget), give the slice engine's unsliced tokens."""
    from tests.test_iteration_engine import drain, engine_for

    specs = specs_of_every_kind()[::6]
    rows = rows_for(tiny, specs, GREEDY)
    expected = run(SliceEngine(tiny), rows, 10_000)
    budget = 6 * 200 * tiny.info.kv_bytes_per_token if memory_bounded else 1 << 40
    engine = engine_for(tiny, cap=3, memory_bounded=memory_bounded, budget=budget)
    got = drain(engine, {2 * k: [row] for k, row in enumerate(rows)}, max_iterations=6000)
    assert got == expected
