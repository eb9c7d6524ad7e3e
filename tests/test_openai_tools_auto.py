"""``tool_choice: "auto"`` through the official ``openai`` client, against the real system
(ingest under uvicorn, a scheduler and a worker, a real Redis): docs/structured-outputs.md.

On tiny-random (random weights) a ``structured_outputs`` regex writes the text, so what the
hermes parser reads is known; on SmolLM2-135M a few-shot conversation makes the model call
the function itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from shared.modeling.loading import LoadedModel
from shared.settings import Settings
from tests.conftest import SMOLLM2_CACHE
from tests.test_openai_params import MODEL, System, running
from tests.test_openai_structured import BASE, CLOCK, WEATHER

AUTO = {"chat_template": "smollm2-tools", "tool_call_parser": "hermes",
        "max_gen_length": 256}
ROME = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}'
ZONE = '{"name": "get_time", "arguments": {"zone": 1}}'


def written(text: str) -> dict[str, Any]:
    """Request arguments that make tiny-random write exactly ``text``, then stop."""
    return {"temperature": 0, "max_tokens": 200,
            "extra_body": {"structured_outputs": {"regex": re.escape(text)}}}


@pytest.fixture()
def system(settings: Settings, tiny: LoadedModel, rclient: Any) -> Iterator[System]:
    with running(settings.model_copy(update=AUTO), tiny) as served:
        yield served


def chat(system: System, **kwargs: Any) -> Any:
    """One chat with the two tools; a stream is read to its end while served."""
    messages = kwargs.pop("messages", [{"role": "user", "content": "Weather in Rome?"}])

    def call() -> Any:
        out = system.client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER, CLOCK], **kwargs)
        return list(out) if kwargs.get("stream") else out
    return system.call(call)


def streamed(system: System, **kwargs: Any) -> tuple[str, list[dict[str, Any]], str]:
    """A streamed answer joined: content, calls (id, name, arguments) and finish reason."""
    content, calls, finish = "", [], ""
    for chunk in chat(system, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            if delta.index == len(calls):
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_auto_answers_the_calls_the_output_makes(system: System, stream: bool) -> None:
    text = f"Let me check.\n<tool_call>[{ROME}, {ZONE}]</tool_call>"
    if stream:
        content, calls, finish = streamed(system, **written(text))
    else:
        resp = chat(system, **written(text))
        message, finish = resp.choices[0].message, resp.choices[0].finish_reason
        content = message.content
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in message.tool_calls]
        assert resp.usage.completion_tokens == len(text.encode())  # the text, generated
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Rome", "unit": "c"}), ("get_time", {"zone": 1})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_")
                                                       for c in calls)


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_keeps_the_first(system: System, stream: bool) -> None:
    text = f"<tool_call>{ROME}</tool_call><tool_call>{ZONE}</tool_call>"
    args = {**written(text), "parallel_tool_calls": False}
    if stream:
        content, calls, finish = streamed(system, **args)
        names = [c["name"] for c in calls]
    else:
        resp = chat(system, **args)
        content, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        names = [c.function.name for c in resp.choices[0].message.tool_calls]
    assert names == ["get_weather"] and finish == "tool_calls" and not content


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("text", [
    "No call needed: it is sunny.",
    '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',  # not declared
    "Hello <tool_call>{oops}</tool_call>",  # not JSON
])
def test_auto_without_a_well_formed_call_is_text(system: System, stream: bool,
                                                text: str) -> None:
    if stream:
        content, calls, finish = streamed(system, **written(text))
        assert calls == []
    else:
        resp = chat(system, **written(text))
        content, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert resp.choices[0].message.tool_calls is None
    assert content == text and finish == "stop"


def test_the_template_shows_the_tools_and_the_calls_made(system: System) -> None:
    """Under "auto" and "required" the template is given the tools; under "none" it is
    not. An earlier turn's calls go back in the template's own layout."""
    free = {"temperature": 0, "max_tokens": 1}
    shown = chat(system, tool_choice="auto", **free).usage.prompt_tokens
    hidden = chat(system, tool_choice="none", **free).usage.prompt_tokens
    forced = chat(system, tool_choice="required", **free).usage.prompt_tokens
    assert shown == forced > hidden + 100  # the functions' JSON
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "c"}'}}
    loop = [{"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    resp = chat(system, messages=loop, tool_choice="none", **free)
    template_text = ('<|im_start|>assistant\n<tool_call>[{"name": "get_weather", '
                     '"arguments": {"city": "Rome", "unit": "c"}}]</tool_call><|im_end|>\n'
                     '<|im_start|>tool\n{"temp": 21}<|im_end|>\n')
    assert resp.usage.prompt_tokens == hidden + len(template_text.encode())


def test_auto_is_a_400_without_a_parser_or_a_template_that_shows_tools(
    settings: Settings, tiny: LoadedModel, rclient: Any
) -> None:
    for update, fragment in [({"tool_call_parser": "none", "max_gen_length": 256},
                               "SCLS_TOOL_CALL_PARSER"),
                             ({"tool_call_parser": "hermes", "max_gen_length": 256},
                              "SCLS_CHAT_TEMPLATE")]:
        with running(settings.model_copy(update=update), tiny) as served:
            for choice in ("auto", None):  # None: auto is the default beside tools
                extra = {} if choice is None else {"tool_choice": choice}
                with pytest.raises(openai.BadRequestError) as info:
                    chat(served, temperature=0, max_tokens=4, **extra)
                body = info.value.body
                assert body["param"] == "tool_choice" and fragment in body["message"], body
            # Forced calls need neither.
            forced = chat(served, tool_choice="required", **BASE)
            assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_smollm2_calls_the_function_itself(settings: Settings, smollm2: LoadedModel,
                                           rclient: Any) -> None:
    """SmolLM2-135M, shown one earlier call in the conversation, calls the function for a
    new city by itself (greedy); told hello, it answers in text."""
    update = {**AUTO, "model": "smollm2-135m", "cache_dir": SMOLLM2_CACHE}
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    shots = [{"role": "user", "content": "What is the weather in London?"},
             {"role": "assistant", "content": None, "tool_calls": [{
                 "id": "c1", "type": "function", "function": {
                     "name": "get_weather", "arguments": '{"city": "London"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 12}'},
             {"role": "assistant", "content": "It is 12 degrees in London."}]
    with running(settings.model_copy(update=update), smollm2) as served:
        def ask(question: str) -> Any:
            messages = [*shots, {"role": "user", "content": question}]
            return served.call(lambda: served.client.chat.completions.create(
                model="smollm2-135m", messages=messages, tools=[weather], temperature=0,
                max_tokens=40))
        called = ask("What is the weather in Rome?").choices[0]
        assert called.finish_reason == "tool_calls", called.message
        (call,) = called.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Rome"}
        hello = ask("Hello!").choices[0]
        assert hello.message.tool_calls is None and hello.message.content
