"""Structured outputs at the ingest: which grammar a request's fields ask for, checked and
compiled before anything is stored (docs/structured-outputs.md).

Three fields can constrain the output, at most one per request:

* OpenAI's ``response_format`` (``json_object``, ``json_schema``; ``text`` is no constraint);
* vLLM's ``structured_outputs`` extra (``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``);
* chat only: ``tools`` with ``tool_choice`` ``"required"`` or a named function, decoded
  under the schema of the function's parameters (:class:`ToolCallFormat` turns the output
  into OpenAI's ``tool_calls``).

``tool_choice: "auto"`` constrains nothing: the model may call a function in its template's
layout, and the parser ``SCLS_TOOL_CALL_PARSER`` names reads the calls back
(:class:`AutoToolFormat`). It needs that parser and a chat template that shows the model the
tools; it may come with a ``response_format``/``structured_outputs`` grammar, which then
shapes the text the parser reads.

Every problem is an HTTP 400 naming the field: a malformed spec, a schema keyword the
grammar library cannot enforce, a regex or grammar it cannot compile, a spec over
``SCLS_GRAMMAR_MAX_BYTES``. The ingest compiles the grammar itself (llguidance needs no
torch; compiled grammars are cached by their canonical text), so a request a worker could
not compile is never accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.ingest.tool_parsers import ToolAnswer, ToolCallParser
from shared.grammar.compiler import GrammarCompiler
from shared.grammar.spec import GrammarError, GrammarSpec, declared_functions, tool_call_head
from shared.grammar.vocab import vocab_from_codec
from shared.modeling.registry import ModelInfo, TextCodec

#: What ``tool_choice: "auto"`` needs, and what works without it.
_AUTO_NEEDS = (
    '"auto" (the default when tools are given) needs {missing}; without it, '
    'pass tool_choice "required" or {{"type": "function", "function": {{"name": ...}}}} '
    '(forced calls need neither), or "none"'
)
NO_PARSER = _AUTO_NEEDS.format(
    missing="a tool-call parser for the model's output, which this server was started "
            "without (set SCLS_TOOL_CALL_PARSER, e.g. hermes)")
NO_TOOLS_TEMPLATE = _AUTO_NEEDS.format(
    missing="a chat template that shows the model its tools, and this model's does not "
            "(set SCLS_CHAT_TEMPLATE to one that does, e.g. smollm2-tools)")


@dataclass(frozen=True)
class ToolCallFormat:
    """How a forced tool call's output (``{"name": ..., "arguments": {...}}``, that key
    order and layout, fixed by the grammar) becomes OpenAI's ``tool_calls``."""

    names: tuple[str, ...]  # the functions the call may name
    required: bool  # tool_choice "required" (any of them), not one named function

    @property
    def finish_reason(self) -> str:
        """A complete call's finish reason, as vLLM answers it: ``tool_calls`` for
        ``"required"``, ``stop`` for a named function (OpenAI's forced-call shape)."""
        return "tool_calls" if self.required else "stop"

    def answer(self, text: str, reason: str | None) -> ToolAnswer:
        """The call, when the grammar completed one (finish reason ``stop``); else the text
        (cut by ``max_tokens``) with its finish reason."""
        call = self.parse(text) if reason == "stop" else None
        if call is None:
            return ToolAnswer(text, (), reason)
        return ToolAnswer(None, (call,), self.finish_reason)

    def head(self, text: str) -> tuple[str, int] | None:
        """``(function name, length)`` of the ``{"name": "<name>", "arguments": `` head of
        ``text`` once it is complete (None before): the arguments' JSON follows, then
        ``}``."""
        for name in self.names:
            head = tool_call_head(name)
            if text.startswith(head):
                return name, len(head)
        return None

    def parse(self, text: str) -> tuple[str, str] | None:
        """``(name, arguments JSON text)`` of a complete call, exactly as generated (the
        arguments are not re-serialised); None when ``text`` is not one (cut by
        ``max_tokens``)."""
        head = self.head(text)
        if head is None or not text.endswith("}"):
            return None
        try:
            call = json.loads(text)
        except ValueError:
            return None
        if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
            return None
        return head[0], text[head[1]:-1]


@dataclass(frozen=True)
class AutoToolFormat:
    """``tool_choice: "auto"``: the calls the parser finds in free text become OpenAI's
    ``tool_calls`` (finish reason ``tool_calls``); text without a well-formed call is the
    answer as it is. ``parallel_tool_calls: false`` keeps the first call only, as vLLM
    does."""

    parser: ToolCallParser
    names: tuple[str, ...]  # the declared functions: a call naming another is text
    parallel: bool = True

    def answer(self, text: str, reason: str | None) -> ToolAnswer:
        """See the class; ``reason`` is the request's own finish reason."""
        found = self.parser.parse(text, self.names)
        if found is None:
            return ToolAnswer(text, (), reason)
        calls = found.calls if self.parallel else found.calls[:1]
        return ToolAnswer(found.content, calls, "tool_calls")


#: How a chat choice with tools is answered.
ToolFormat = ToolCallFormat | AutoToolFormat


@dataclass(frozen=True)
class Constraint:
    """What a request's grammar and tool fields ask for: the spec the workers decode under
    (its ``key`` goes into ``RequestParams.grammar``; None: free text) and, with tools, how
    to answer (a forced call, or calls parsed under ``"auto"``)."""

    spec: GrammarSpec | None
    tools: ToolFormat | None = None


class StructuredOutputs:
    """The ingest's grammar checks: parse the fields and compile (cached)."""

    def __init__(self, codec: TextCodec, info: ModelInfo, max_bytes: int,
                 cache_size: int, tool_parser: ToolCallParser | None = None) -> None:
        self.max_bytes = max_bytes
        self._codec, self._info, self._cache_size = codec, info, cache_size
        self._parser = tool_parser
        self._compiler: GrammarCompiler | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on first use: most deployments never see a grammar."""
        if self._compiler is None:
            vocab = vocab_from_codec(self._codec, model_vocab_size=self._info.vocab_size)
            self._compiler = GrammarCompiler(vocab, cache_size=self._cache_size)
        return self._compiler

    def constraint(self, response_format: Any, structured_outputs: Any, tools: Any = None,
                   tool_choice: Any = None, chat: bool = False,
                   parallel_tool_calls: bool | None = None) -> Constraint | None:
        """The request's constraint (None: free text, no tools), compiled.

        Raises:
            GrammarError: any problem, naming the field (the caller answers 400).
        """
        found = self._grammar(response_format, structured_outputs, tools, tool_choice, chat)
        if found is not None and found.spec is not None:
            self.compiler.compile(found.spec)
        if chat and _is_auto(tools, tool_choice):
            auto = self._auto(tools, parallel_tool_calls)
            return Constraint(found.spec if found is not None else None, auto)
        return found

    def _auto(self, tools: Any, parallel_tool_calls: bool | None) -> AutoToolFormat:
        """``"auto"``'s format, or a 400 saying what it lacks."""
        if self._parser is None:
            raise GrammarError("tool_choice", NO_PARSER)
        if not self._codec.renders_tools:
            raise GrammarError("tool_choice", NO_TOOLS_TEMPLATE)
        names = tuple(declared_functions(tools))
        return AutoToolFormat(self._parser, names, parallel_tool_calls is not False)

    def _grammar(self, response_format: Any, structured_outputs: Any, tools: Any,
                 tool_choice: Any, chat: bool) -> Constraint | None:
        given: list[tuple[str, Constraint]] = []
        if response_format is not None:
            spec = GrammarSpec.from_response_format(response_format, self.max_bytes)
            if spec is not None:
                given.append(("response_format", Constraint(spec)))
        if structured_outputs is not None:
            spec = GrammarSpec.from_structured_outputs(structured_outputs, self.max_bytes)
            given.append(("structured_outputs", Constraint(spec)))
        if chat and (tools is not None or tool_choice is not None):
            call = self._tool_call(tools, tool_choice)
            if call is not None:
                given.append(("tool_choice", call))
        if len(given) > 1:
            raise GrammarError(given[1][0], f"give at most one of response_format, "
                                            f"structured_outputs and a forced tool call "
                                            f"(got {given[0][0]} and {given[1][0]})")
        return given[0][1] if given else None

    def _tool_call(self, tools: Any, tool_choice: Any) -> Constraint | None:
        """The forced call's constraint; None for ``"auto"`` (see :meth:`_auto`) and
        ``"none"`` (the tools are not shown to the model either)."""
        if _is_auto(tools, tool_choice):
            return None
        if tool_choice == "none":
            if tools is not None and not isinstance(tools, list):
                raise GrammarError("tools", 'must be a list of {"type": "function", ...}')
            return None
        spec = GrammarSpec.for_tool_call(tools, tool_choice, self.max_bytes)
        if spec is None:  # pragma: no cover - for_tool_call only returns None for the above
            return None
        names = tuple(t["function"]["name"] for t in tools)
        if isinstance(tool_choice, dict):
            return Constraint(spec, ToolCallFormat((tool_choice["function"]["name"],), False))
        return Constraint(spec, ToolCallFormat(names, True))


def _is_auto(tools: Any, tool_choice: Any) -> bool:
    """Whether the request's tool choice is ``"auto"`` (OpenAI's default beside tools)."""
    return tool_choice == "auto" or (tool_choice is None and tools is not None)


def shows_tools(tools: Any, tool_choice: Any) -> bool:
    """Whether the chat template is given the request's tools: whenever it has some, except
    under ``tool_choice: "none"`` (as vLLM's ``--exclude-tools-when-tool-choice-none``:
    a model shown tools it may not call tends to call them anyway)."""
    return isinstance(tools, list) and bool(tools) and tool_choice != "none"
