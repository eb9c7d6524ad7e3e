"""Request and response bodies of the ingest's OpenAI-compatible API.

Request models are strict (``"10"`` is not an integer, ``1`` is not a boolean). Unknown
fields are refused with a 400 naming them (:func:`unknown_field_problem`), except a short
allow-list of harmless OpenAI fields (:data:`IGNORED_FIELDS`) that are accepted and ignored;
see docs/openai.md. Limits that depend on the deployment (``max_tokens`` up to the server's
``max_gen_length``, prompt length against the model's context, ``n`` and ``logprobs`` bounds,
``logit_bias`` token ids) are checked by the app, which knows them; everything checkable
without settings is checked here.

Fields that accept several shapes (``prompt``, ``stop``, message ``content``) are typed
``Any`` and checked by a validator: a plain union would report one error per union member
(``prompt.str: ...; prompt.list[int]: ...``), which reads badly in an error message.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from shared.grammar.spec import tool_call_text

#: OpenAI's limit on stop sequences.
MAX_STOP_STRINGS = 4
#: ``max_tokens`` when a completion request gives none (OpenAI's default).
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: OpenAI's bound on a ``logit_bias`` value.
MAX_LOGIT_BIAS = 100.0

#: Top-level OpenAI fields accepted and ignored: they do not change what is generated.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})

#: The shapes of the grammar and tool fields, as /openapi.json documents them.
_OBJECT: dict[str, Any] = {"type": "object"}
RESPONSE_FORMAT_SHAPE: dict[str, Any] = {"oneOf": [
    {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}},
     "required": ["type"]},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "description": {"type": "string"},
            "schema": _OBJECT, "strict": {"type": "boolean"}}}}},
]}
STRUCTURED_OUTPUTS_SHAPE: dict[str, Any] = {
    "type": "object", "minProperties": 1, "maxProperties": 1, "properties": {
        "json": {"type": ["object", "string"]}, "regex": {"type": "string"},
        "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "grammar": {"type": "string"}, "json_object": {"type": "boolean"}}}
_FUNCTION: dict[str, Any] = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
    "description": {"type": "string"}, "parameters": _OBJECT}}
TOOLS_SHAPE: dict[str, Any] = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["type", "function"],
    "properties": {"type": {"const": "function"}, "function": _FUNCTION}}}
TOOL_CHOICE_SHAPE: dict[str, Any] = {"oneOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string"}}}}},
]}

#: Known OpenAI (and vLLM) fields this server does not implement: 400 with the reason.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "functions": "the deprecated functions field is not supported: use tools with "
                 "tool_choice",
    "function_call": "the deprecated function_call field is not supported: use tool_choice",
    "suffix": "insertion after a suffix is not supported",
    "prompt_logprobs": "log-probabilities of prompt tokens are not supported",
    "guided_json": 'vLLM\'s removed guided_* fields are not supported: send '
                   '"structured_outputs": {"json": ...}',
    "guided_regex": 'vLLM\'s removed guided_* fields are not supported: send '
                    '"structured_outputs": {"regex": ...}',
    "guided_choice": 'vLLM\'s removed guided_* fields are not supported: send '
                     '"structured_outputs": {"choice": [...]}',
    "guided_grammar": 'vLLM\'s removed guided_* fields are not supported: send '
                      '"structured_outputs": {"grammar": ...}',
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this server serves no reasoning model",
    "web_search_options": "web search is not supported",
}


def _is_token_id(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is not a token id.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unicode(text: str, where: str = "") -> str:
    """``text`` if it can be encoded (JSON's ``\\ud800`` escape gives a lone surrogate,
    which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}must be valid Unicode (it holds a lone surrogate)") from None
    return text


def unknown_field_problem(model: type[BaseModel], data: dict[str, Any]) -> tuple[str, str] | None:
    """``(param, message)`` for the first top-level field of ``data`` that ``model`` neither
    declares nor ignores (:data:`IGNORED_FIELDS`); None when every field is known."""
    unknown = [k for k in data if k not in model.model_fields and k not in IGNORED_FIELDS]
    if not unknown:
        return None
    first = unknown[0]
    if first in UNSUPPORTED_FIELDS:
        return first, f"{first}: {UNSUPPORTED_FIELDS[first]} by this server"
    names = ", ".join(repr(k) for k in unknown)
    return first, (
        f"unknown parameter{'s' if len(unknown) > 1 else ''} {names}: this server refuses "
        "parameters it does not implement rather than ignore them (see docs/openai.md)"
    )


class _StrictBody(BaseModel):
    """Base of the request bodies: strict types; unknown fields of nested objects are refused
    (the top level is checked by :func:`unknown_field_problem` first, with its allow-list)."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_StrictBody):
    """``stream_options``: with ``include_usage`` the stream ends with a usage chunk."""

    include_usage: bool | None = None
    # vLLM's extension (GuideLLM sends it): every chunk carries the usage so far.
    continuous_usage_stats: bool | None = None


class GenerationParams(_StrictBody):
    """Sampling fields shared by ``/v1/completions`` and ``/v1/chat/completions``.

    ``None`` means "use the default" for every optional field, as clients that send explicit
    nulls expect.
    """

    # Top-level: unknown fields were refused before validation; the allow-listed ones remain.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Any = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    # vLLM's extras: -1 (vLLM's "off") and 0 both keep every token.
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: Any = None
    # Checked (and compiled) by services.ingest.structured, which knows the vocabulary: the
    # schemas only document the shapes in /openapi.json (for clients and schemathesis).
    response_format: Any = Field(None, json_schema_extra=RESPONSE_FORMAT_SHAPE)
    # vLLM's extra: json, regex, choice, grammar
    structured_outputs: Any = Field(None, json_schema_extra=STRUCTURED_OUTPUTS_SHAPE)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> tuple[str, ...]:
        """Normalise ``stop`` to a tuple of up to four non-empty strings."""
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return tuple(_check_unicode(s) for s in items)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``{"<token id>": bias}`` as sorted ``(id, bias)`` pairs, bias -100..100
        (whether the ids are in the vocabulary is checked by the app)."""
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise ValueError('must be an object {"<token id>": bias}')
        pairs = []
        for key, bias in value.items():
            # ASCII digits of a plausible length: int() of "²" or of 5,000 digits raises.
            if not re.fullmatch(r"-?[0-9]{1,18}", key.strip()):
                raise ValueError(f"key {key[:40]!r} is not a token id")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool):
                raise ValueError(f"the bias of token {key} must be a number")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} must be between -100 and 100")
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The validated stop strings (the validator has turned ``stop`` into a tuple)."""
        return tuple(self.stop or ())

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """The validated ``logit_bias`` as ``(token id, bias)`` pairs."""
        return tuple(self.logit_bias or ())

    @property
    def choices(self) -> int:
        """Choices asked per prompt (``n``)."""
        return self.n or 1


class CompletionRequest(GenerationParams):
    """Body of ``POST /v1/completions``."""

    prompt: Any = Field(..., description="a string, a list of token ids, or a batch of either")
    # The chosen token's log-probability plus this many alternatives per token.
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str | list[int]]:
        """The prompts: a string, a list of token ids, or a non-empty list of either (a
        batch); each prompt non-empty."""
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            return [_one_prompt(v, f"prompt {i}: ") for i, v in enumerate(value)]
        return [_one_prompt(value, "")]

    @property
    def prompts(self) -> list[str | list[int]]:
        """The validated prompts, in order (one unless the request is a batch)."""
        return list(self.prompt)


def _one_prompt(value: Any, where: str) -> str | list[int]:
    """One non-empty prompt: a string or a list of token ids."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where}must not be empty")
        return _check_unicode(value, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}must be a string or a list of token ids")
    if not value:
        raise ValueError(f"{where}must not be empty")
    if not all(_is_token_id(v) for v in value):
        raise ValueError(f"{where}must be a string or a list of token ids (integers)")
    return list(value)


def _is_text_part(part: Any) -> bool:
    # Only text parts are supported: images and audio have no meaning for a text model.
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


class MessageToolCallFunction(_StrictBody):
    """The function of a tool call an earlier assistant turn made."""

    name: str
    arguments: str  # its arguments' JSON, as the call gave them


class MessageToolCall(_StrictBody):
    """A tool call of an earlier assistant turn, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: MessageToolCallFunction

    def as_text(self) -> str:
        """The call as the model wrote it under a forced tool call's grammar
        (docs/structured-outputs.md): what a chat template without tools shows it."""
        return tool_call_text(self.function.name, self.function.arguments)

    def as_template_dict(self) -> dict[str, Any]:
        """The call as a template that renders tools takes it (transformers' shape: the
        arguments as an object when they parse as one, else the text as sent)."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_StrictBody):
    """One chat message: a turn of a role, an assistant's tool calls, or a tool's result."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Any = Field(None, description="a string, or a list of text parts")
    name: str | None = None  # OpenAI's participant name: accepted, not shown to the model
    tool_calls: list[MessageToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str | None:
        """Content as one string; a list of ``{"type": "text", "text": ...}`` is joined."""
        if value is None:
            return None  # allowed only beside tool calls (checked below)
        if isinstance(value, str):
            return _check_unicode(value)
        if isinstance(value, list) and all(_is_text_part(part) for part in value):
            return _check_unicode("".join(part["text"] for part in value))
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')

    @model_validator(mode="after")
    def _check_turn(self) -> ChatMessage:
        """Tool calls only on an assistant turn, a result only on a tool's; content is
        required except beside tool calls."""
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message makes tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only a tool message answers a tool call")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError("content: required (it may be null only beside tool_calls)")
        return self

    def as_dict(self, structured_calls: bool = False) -> dict[str, Any]:
        """The message as a chat template takes it. An assistant's tool calls are shown as
        the text a forced call generates, after its content if any; or, with
        ``structured_calls`` (a template that renders tools, hence their calls too), given
        as transformers' ``tool_calls`` (arguments as an object where they are JSON), with
        a tool result's ``tool_call_id``."""
        if structured_calls:
            out: dict[str, Any] = {"role": self.role, "content": self.content}
            if self.tool_calls:
                out["tool_calls"] = [call.as_template_dict() for call in self.tool_calls]
            if self.tool_call_id is not None:
                out["tool_call_id"] = self.tool_call_id
            return out
        parts = [self.content] if self.content else []
        parts += [call.as_text() for call in self.tool_calls or ()]
        return {"role": self.role, "content": "\n".join(parts)}


class ChatCompletionRequest(GenerationParams):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    # OpenAI's newer name for max_tokens in chat; max_tokens wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Tool calls (services.ingest.structured checks them; the shapes are documentation).
    tools: Any = Field(None, json_schema_extra=TOOLS_SHAPE)
    tool_choice: Any = Field(None, json_schema_extra=TOOL_CHOICE_SHAPE)
    # false: at most one call per answer (tool_choice "auto"; a forced call is one anyway)
    parallel_tool_calls: bool | None = None

    def as_dicts(self, structured_calls: bool = False) -> list[dict[str, Any]]:
        """Messages in the shape :meth:`TextCodec.encode_chat` takes (see
        :meth:`ChatMessage.as_dict`)."""
        return [m.as_dict(structured_calls) for m in self.messages]


# --- responses --------------------------------------------------------------------------


class Usage(BaseModel):
    """Token counts, as in OpenAI's ``usage``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SclsInfo(BaseModel):
    """How the request was served (scls extension of the response)."""

    request_id: str
    slices: int
    queue_time_s: float | None = Field(None, description="first claim minus arrival")
    ttft_s: float | None = Field(None, description="first slice committed minus arrival")
    e2e_s: float | None = Field(None, description="finished minus arrival")
    request_ids: list[str] | None = Field(
        None, description="with several choices or prompts: every request run, in choice "
        "order (best_of: all of them, best first per prompt); the fields above are the first's")


class CompletionLogprobs(BaseModel):
    """``logprobs`` of a text completion choice (OpenAI's legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TopLogprob(BaseModel):
    """One token and its log-probability (chat)."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A generated token with its most likely alternatives (chat)."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """``logprobs`` of a chat choice."""

    content: list[ChatTokenLogprob]


class CompletionChoice(BaseModel):
    """One choice of a text completion."""

    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """Body answered by ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    scls: SclsInfo


class ToolCallFunction(BaseModel):
    """The function a tool call names and its arguments (a JSON text, as OpenAI sends)."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One call of a declared function."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    """The generated chat message: text, or (forced tool call) ``tool_calls``."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``tool_calls`` only when there are some (OpenAI leaves the key out)."""
        out: dict[str, Any] = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    """Body answered by ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    scls: SclsInfo


class CancelResponse(BaseModel):
    """Answer of ``POST /v1/requests/{id}/cancel``."""

    id: str
    status: Literal["cancelled", "cancelling"]
    message: str


class RequestStatusResponse(BaseModel):
    """Body of ``GET /v1/requests/{id}``: where a request is and what it produced."""

    id: str
    object: Literal["scls.request"] = "scls.request"
    model: str
    status: str
    finish_reason: str | None
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    slices: int
    fence: int
    batch: str | None
    retries: int
    text: str | None = Field(None, description="the completion, once finished")
    arrival: float
    first_claimed_at: float | None
    first_slice_at: float | None
    finished_at: float | None
    queue_time_s: float | None
    ttft_s: float | None
    e2e_s: float | None


class ModelCard(BaseModel):
    """One served model, as in OpenAI's model list."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "scls"
    max_model_len: int = Field(..., description="context limit in tokens (vLLM's field)")


class ModelList(BaseModel):
    """Body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the ingest answers: ``{"error": {...}}``."""

    error: ErrorDetail
