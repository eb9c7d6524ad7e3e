"""Tool calls read back from free text: ``tool_choice: "auto"`` (docs/structured-outputs.md).

Under ``"auto"`` the output is not constrained: the model decides whether to call a function,
in the layout its chat template taught it, and a *tool-call parser* chosen by
``SCLS_TOOL_CALL_PARSER`` (as vLLM's ``--tool-call-parser``) finds the calls in the text.

``hermes`` reads calls written between ``<tool_call>`` and ``</tool_call>``: one JSON object
``{"name": ..., "arguments": {...}}`` (Hermes, Qwen) or a JSON list of them (SmolLM2), one or
more blocks. What comes before the first block is the message's content; what comes after
the last is dropped, as vLLM's hermes parser does. A block that is not valid JSON, names a
function the request did not declare, or gives arguments that are not an object makes the
whole output plain text: a client never sees a call it cannot dispatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

#: ``SCLS_TOOL_CALL_PARSER`` values; ``none`` refuses ``"auto"``.
TOOL_CALL_PARSERS = ("none", "hermes")


@dataclass(frozen=True)
class ToolAnswer:
    """A chat choice's answer: its content, its tool calls (``(name, arguments JSON)``,
    in order) and its finish reason."""

    content: str | None
    calls: tuple[tuple[str, str], ...] = ()
    finish_reason: str | None = None


class ToolCallParser(Protocol):
    """Finds tool calls in generated text."""

    #: Text that opens a call: a stream holds back what could be its beginning.
    start: str

    def parse(self, text: str, names: tuple[str, ...]) -> ToolAnswer | None:
        """The content and calls of ``text`` (finish reason unset); None when it makes no
        call (or a malformed one: then it is plain text)."""
        ...


class HermesParser:
    """``<tool_call>{...}</tool_call>`` blocks (a JSON object or a list of them in each)."""

    start = "<tool_call>"
    end = "</tool_call>"

    def parse(self, text: str, names: tuple[str, ...]) -> ToolAnswer | None:
        """See :class:`ToolCallParser`; a last block without its closing tag (the request
        ended on a stop string, or ``max_tokens``) is read to the end of the text."""
        first = text.find(self.start)
        if first < 0:
            return None
        calls: list[tuple[str, str]] = []
        at = first
        while at >= 0:
            body_at = at + len(self.start)
            close = text.find(self.end, body_at)
            found = _calls_in(text[body_at:close if close >= 0 else len(text)], names)
            if found is None:
                return None
            calls += found
            if close < 0:
                break
            at = text.find(self.start, close + len(self.end))
        if not calls:  # an empty list: the model chose not to call
            return None
        return ToolAnswer(text[:first].rstrip() or None, tuple(calls))


def _calls_in(block: str, names: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """The calls in one block's JSON; None when any of it is malformed."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def _call(item: Any, names: tuple[str, ...]) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of one ``{"name": ..., "arguments": {...}}``."""
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return str(item["name"]), json.dumps(arguments, ensure_ascii=False)


def tool_call_parser(name: str) -> ToolCallParser | None:
    """The parser ``SCLS_TOOL_CALL_PARSER`` names; None for ``none``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name == "hermes":
        return HermesParser()
    if name == "none":
        return None
    raise ValueError(f"SCLS_TOOL_CALL_PARSER={name!r} is unknown: choose one of "
                     f"{', '.join(TOOL_CALL_PARSERS)}")
