"""tool_choice "auto": the hermes parser, its stream, the chat template that shows tools
(docs/structured-outputs.md). Pure text: no model, no Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.streaming import AutoToolStream
from services.ingest.structured import AutoToolFormat, shows_tools
from services.ingest.tool_parsers import HermesParser, ToolAnswer, tool_call_parser
from shared.modeling.codec import chat_template_source
from shared.modeling.registry import ByteCodec, load_codec
from tests.conftest import SMOLLM2_CACHE

NAMES = ("get_weather", "get_time")
ROME = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
ZONE = '{"name": "get_time", "arguments": {"zone": 1}}'
R, Z = ("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": 1}')

# text -> (content, calls) the parser finds; None: no call, the text is the answer.
PARSED: list[tuple[str, tuple[str | None, tuple[tuple[str, str], ...]] | None]] = [
    ("Just text.", None),
    (f"<tool_call>{ROME}</tool_call>", (None, (R,))),
    (f"<tool_call>\n{ROME}\n</tool_call>", (None, (R,))),
    (f"<tool_call>[{ROME}, {ZONE}]</tool_call>", (None, (R, Z))),  # SmolLM2's list
    (f"<tool_call>{ROME}</tool_call>\n<tool_call>{ZONE}</tool_call>", (None, (R, Z))),
    (f"Let me look.\n\n<tool_call>{ROME}</tool_call>", ("Let me look.", (R,))),
    (f"<tool_call>{ROME}</tool_call> and after", (None, (R,))),  # after the last: dropped
    (f"<tool_call>{ROME}", (None, (R,))),  # unclosed (a stop string ended it)
    ('<tool_call>{"name": "get_weather"}</tool_call>', (None, (("get_weather", "{}"),))),
    ('<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": 2}"}</tool_call>',
     (None, (("get_time", '{"zone": 2}'),))),  # arguments as a JSON string
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>',
     (None, (("get_weather", '{"city": "Zürich"}'),))),
    # Malformed: the whole output is text.
    ('<tool_call>{"name": "launch_missiles", "arguments": {}}</tool_call>', None),
    ('<tool_call>[{"temperature": 18}]</tool_call>', None),  # what SmolLM2 wrote once
    ("<tool_call>{not json}</tool_call>", None),
    ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', None),
    (f"<tool_call>{ROME}</tool_call><tool_call>oops</tool_call>", None),
    ("<tool_call>[]</tool_call>", None),  # an empty list: no call
    (f"<tool_call>{ROME[:-5]}", None),  # cut by max_tokens
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_hermes_parser(text: str, expected: Any) -> None:
    found = HermesParser().parse(text, NAMES)
    if expected is None:
        assert found is None
    else:
        assert found == ToolAnswer(expected[0], expected[1])


def test_auto_answers_and_parallel_tool_calls() -> None:
    both = f"Sure.<tool_call>[{ROME}, {ZONE}]</tool_call>"
    assert AutoToolFormat(HermesParser(), NAMES).answer(both, "stop") == ToolAnswer(
        "Sure.", (R, Z), "tool_calls")
    # parallel_tool_calls: false keeps the first call, as vLLM does.
    assert AutoToolFormat(HermesParser(), NAMES, parallel=False).answer(both, "stop") == \
        ToolAnswer("Sure.", (R,), "tool_calls")
    # A call naming a function this request did not declare is text, reason kept.
    assert AutoToolFormat(HermesParser(), ("get_time",)).answer(both, "length") == \
        ToolAnswer(both, (), "length")
    # A complete call followed by text cut by max_tokens is still a call.
    assert AutoToolFormat(HermesParser(), NAMES).answer(
        f"<tool_call>{ROME}</tool_call> and then", "length").calls == (R,)


def test_parser_names() -> None:
    assert isinstance(tool_call_parser("hermes"), HermesParser)
    assert tool_call_parser("none") is None
    with pytest.raises(ValueError, match="choose one of none, hermes"):
        tool_call_parser("llama3_json")


STREAMED = [text for text, _ in PARSED] + [
    "Sure <tool", "Hello <tool_cal", "a  \n ", "<tool_call", "Weather: <tool_call>{",
    f"Two lines\n\n  <tool_call>[{ROME}]</tool_call>",
]


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
@pytest.mark.parametrize("reason", ["stop", "length"])
def test_auto_stream_joins_to_the_answer(text: str, piece: int, reason: str) -> None:
    """Streamed in any pieces, content and calls join to the non-streamed answer; content
    never shows a byte of the start tag."""
    fmt = AutoToolFormat(HermesParser(), NAMES)
    stream = AutoToolStream(fmt, lambda i: f"call_{i}")
    content = ""
    for at in range(0, len(text), piece):
        part, deltas = stream.feed(text[at:at + piece])
        assert deltas == []
        content += part
        assert "<tool_call>" not in content
    part, deltas, finish = stream.finish("", reason)
    content += part
    answer = fmt.answer(text, reason)
    assert (content or None) == (answer.content or None)
    assert finish == answer.finish_reason
    assert [(d["function"]["name"], d["function"]["arguments"]) for d in deltas] == \
        list(answer.calls)
    assert [(d["index"], d["id"]) for d in deltas] == [(i, f"call_{i}")
                                                       for i in range(len(deltas))]


def test_tools_are_shown_except_under_none() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert shows_tools(tools, "auto") and shows_tools(tools, None)
    assert shows_tools(tools, "required")
    assert not shows_tools(tools, "none") and not shows_tools(None, "auto")
    assert not shows_tools([], "auto")


# --- chat templates ---------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "more"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def test_smollm2_tools_template_is_the_models_own_without_tools() -> None:
    own = load_codec("smollm2-135m", SMOLLM2_CACHE)
    tools = load_codec("smollm2-135m", SMOLLM2_CACHE, chat_template_source("smollm2-tools"))
    assert not own.renders_tools and tools.renders_tools
    for chat in CONVERSATIONS:
        for generation_prompt in (True, False):
            assert own.encode_chat(chat, generation_prompt) == \
                tools.encode_chat(chat, generation_prompt)


def test_smollm2_tools_template_shows_tools_calls_and_results() -> None:
    codec = ByteCodec(chat_template=chat_template_source("smollm2-tools"))
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"}]
    text = codec.decode(codec.encode_chat(chat, True, TOOLS))
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou have access to the "
                           "following tools:\n<tools>[")
    shown = text[text.index("<tools>") + 7:text.index("</tools>")]
    assert json.loads(shown) == [TOOLS[0]["function"]]
    assert ('<|im_start|>assistant\n<tool_call>[{"name": "get_weather", "arguments": '
            '{"city": "Rome"}}]</tool_call><|im_end|>\n') in text
    assert '<|im_start|>tool\n{"temp": 21}<|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1  # the system turn is not repeated


def test_chat_template_source_names_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a file nor a built-in template "
                                         r"\(smollm2-tools\)"):
        chat_template_source("no-such-template")
    broken = tmp_path / "t.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        chat_template_source(str(broken))
    good = tmp_path / "g.jinja"
    good.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert chat_template_source(str(good)) == good.read_text()
    codec = ByteCodec(chat_template=good.read_text())
    assert not codec.renders_tools  # it ignores tools
    assert codec.decode(codec.encode_chat([{"role": "user", "content": "x"}], True, TOOLS)) \
        == "x"
