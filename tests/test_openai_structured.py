"""Structured outputs and forced tool calls through the official ``openai`` client, against
the real system (ingest under uvicorn, a scheduler and a worker on tiny-random, a real
Redis): docs/structured-outputs.md and docs/openai.md.

tiny-random's weights are random: a bias towards the bytes that close JSON values (through
``logit_bias``, which the grammar's mask composes with) makes its documents end within
``max_tokens``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from shared.modeling.loading import LoadedModel
from shared.settings import Settings
from tests.test_openai_params import MODEL, System, running

CLOSE = {str(ord(c) + 3): 6 for c in '"}]'} | {str(ord(",") + 3): 2}
BASE: dict[str, Any] = {"temperature": 0, "max_tokens": 200, "logit_bias": CLOSE}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


class Review(BaseModel):
    """What ``chat.completions.parse`` turns into a strict json_schema."""

    title: str
    stars: int
    recommended: bool


@pytest.fixture()
def system(settings: Settings, tiny: LoadedModel, rclient: Any) -> Iterator[System]:
    with running(settings.model_copy(update={"max_gen_length": 256}), tiny) as served:
        yield served


def chat(system: System, **kwargs: Any) -> Any:
    messages = [{"role": "user", "content": kwargs.pop("content", "Hello")}]
    return system.call(lambda: system.client.chat.completions.create(
        model=MODEL, messages=messages, **{**BASE, **kwargs}))


def test_parse_with_a_pydantic_model_returns_the_object(system: System) -> None:
    messages = [{"role": "user", "content": "Review the film."}]
    for temperature in (0, 1):
        resp = system.call(lambda t=temperature: system.client.chat.completions.parse(
            model=MODEL, messages=messages, response_format=Review,
            **{**BASE, "temperature": t, "seed": 3}))
        parsed = resp.choices[0].message.parsed
        assert isinstance(parsed, Review), resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0, 1])
def test_json_schema_and_json_object(system: System, temperature: float) -> None:
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 10}},
        "required": ["name", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                  "strict": True}}
    resp = chat(system, response_format=fmt, temperature=temperature, seed=7)
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    obj = chat(system, response_format={"type": "json_object"}, temperature=temperature,
               seed=7)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_regex_choice_and_grammar_extras(system: System) -> None:
    pattern = r"[0-9]{3}-[A-Z]{2}"
    resp = chat(system, extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, resp.choices[0].message.content)
    choices = ["red", "green", "blue"]
    resp = chat(system, extra_body={"structured_outputs": {"choice": choices}})
    assert resp.choices[0].message.content in choices
    lark = 'start: "ok" | "fine" | NUMBER\nNUMBER: /[1-9][0-9]?/'
    resp = system.call(lambda: system.client.completions.create(
        model=MODEL, prompt="Status:", **BASE,
        extra_body={"structured_outputs": {"grammar": lark}}))
    assert re.fullmatch(r"ok|fine|[1-9][0-9]?", resp.choices[0].text)


def _check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_parse_streamed_and_not(system: System, tool_choice: Any) -> None:
    resp = chat(system, tools=[WEATHER, CLOCK], tool_choice=tool_choice)
    choice = resp.choices[0]
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    _check_call(call.function.name, call.function.arguments)
    assert call.id.startswith("call_") and call.type == "function"
    named = isinstance(tool_choice, dict)
    assert choice.finish_reason == ("stop" if named else "tool_calls")
    if named:
        assert call.function.name == "get_time"

    def streamed() -> list[Any]:
        stream = system.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}],
            tools=[WEATHER, CLOCK], tool_choice=tool_choice, stream=True, **BASE)
        return list(stream)

    chunks = system.call(streamed)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == call.function.name
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == call.function.arguments  # the same greedy call, in pieces
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}},
     "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
     "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: undefined_rule"}}},
     "structured_outputs.grammar"),
    ({"response_format": {"type": "json_object"},
      "extra_body": {"structured_outputs": {"regex": "a"}}}, "structured_outputs"),
    ({"tools": [WEATHER]}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}],
      "tool_choice": "required"}, "tools[0].function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}}}}},
     "response_format.json_schema.schema"),
])
def test_bad_grammars_are_a_400_naming_the_field(system: System, kwargs: dict[str, Any],
                                                 param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(system, **kwargs)
    error = info.value.body
    assert error["param"] == param, error
    assert error["message"].startswith(param), error


def test_a_tool_round_trip_goes_back_to_the_model(system: System, tiny: LoadedModel) -> None:
    """An agent's loop: a forced call, then the conversation with the assistant's call and
    the tool's result sent back. The template shows the call as the text the model wrote
    under the call's grammar, and the result as a ``tool`` turn."""
    first = chat(system, content="Weather in Paris?", tools=[WEATHER],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = first.choices[0].message.tool_calls
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    second = system.call(lambda: system.client.chat.completions.create(
        model=MODEL, messages=messages, **{**BASE, "max_tokens": 4}))
    shown = [messages[0],
             {"role": "assistant", "content": '{"name": "get_weather", "arguments": '
                                              f"{call.function.arguments}}}"},
             {"role": "tool", "content": '{"temp": 21}'}]
    assert second.usage.prompt_tokens == len(tiny.codec.encode_chat(shown))
    assert first.usage.completion_tokens == len(tiny.codec.encode(
        shown[1]["content"]))  # the call, exactly as generated


@pytest.mark.parametrize(("message", "fragment"), [
    ({"role": "tool", "content": "42"}, "tool_call_id"),
    ({"role": "assistant", "content": None}, "content: required"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "only a tool message"),
    ({"role": "user", "content": "x", "tool_calls": []}, "only an assistant message"),
])
def test_malformed_tool_turns_are_a_400(system: System, message: dict[str, Any],
                                        fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        system.call(lambda: system.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}, message], **BASE))
    assert fragment in info.value.body["message"], info.value.body
