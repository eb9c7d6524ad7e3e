"""Structured outputs at the ingest: which grammar a request's fields ask for, checked and
compiled before anything is stored (docs/structured-outputs.md).

Three fields can constrain the output, at most one per request:

* OpenAI's ``response_format`` (``json_object``, ``json_schema``; ``text`` is no constraint);
* vLLM's ``structured_outputs`` extra (``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``);
* chat only: ``tools`` with ``tool_choice`` ``"required"`` or a named function, decoded
  under the schema of the function's parameters (:class:`ToolCallFormat` turns the output
  into OpenAI's ``tool_calls``).

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

from shared.grammar.compiler import GrammarCompiler
from shared.grammar.spec import GrammarError, GrammarSpec, tool_call_head
from shared.grammar.vocab import vocab_from_codec
from shared.modeling.registry import ModelInfo, TextCodec

#: Why ``tool_choice: "auto"`` is refused: what it would need.
AUTO_TOOLS = (
    'tool_choice: "auto" (the default when tools are given) needs a chat template that '
    "shows the tools to the model and a tool-call parser for its output; this server "
    'forces calls only: pass tool_choice "required" or {"type": "function", "function": '
    '{"name": ...}}, or "none"'
)


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
class Constraint:
    """What a request's grammar fields ask for: the spec the workers decode under (its
    ``key`` goes into ``RequestParams.grammar``) and, for a forced tool call, how to
    answer it."""

    spec: GrammarSpec
    tools: ToolCallFormat | None = None


class StructuredOutputs:
    """The ingest's grammar checks: parse the fields and compile (cached)."""

    def __init__(self, codec: TextCodec, info: ModelInfo, max_bytes: int,
                 cache_size: int) -> None:
        self.max_bytes = max_bytes
        self._codec, self._info, self._cache_size = codec, info, cache_size
        self._compiler: GrammarCompiler | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on first use: most deployments never see a grammar."""
        if self._compiler is None:
            vocab = vocab_from_codec(self._codec, model_vocab_size=self._info.vocab_size)
            self._compiler = GrammarCompiler(vocab, cache_size=self._cache_size)
        return self._compiler

    def constraint(self, response_format: Any, structured_outputs: Any, tools: Any = None,
                   tool_choice: Any = None, chat: bool = False) -> Constraint | None:
        """The request's constraint (None: free text), compiled.

        Raises:
            GrammarError: any problem, naming the field (the caller answers 400).
        """
        found = self._parse(response_format, structured_outputs, tools, tool_choice, chat)
        if found is not None:
            self.compiler.compile(found.spec)
        return found

    def _parse(self, response_format: Any, structured_outputs: Any, tools: Any,
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
        """The forced call's constraint; None for ``"none"`` (the tools are not shown to
        the model either: no template of ours renders them)."""
        if tool_choice is None and tools is not None:
            tool_choice = "auto"  # OpenAI's default when tools are given
        if tool_choice == "auto":
            raise GrammarError("tool_choice", AUTO_TOOLS)
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
