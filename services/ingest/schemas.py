"""Request and response bodies of the ingest's OpenAI-compatible API.

Request models are strict (``"10"`` is not an integer, ``1`` is not a boolean) and ignore
unknown fields, like OpenAI's API. Limits that depend on the deployment (``max_tokens`` up to
the server's ``max_gen_length``, prompt length against the model's context) are checked by
the app, which knows them; everything checkable without settings is checked here.

Fields that accept several shapes (``prompt``, ``stop``, message ``content``) are typed
``Any`` and checked by a validator: a plain union would report one error per union member
(``prompt.str: ...; prompt.list[int]: ...``), which reads badly in an error message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: OpenAI's limit on stop sequences.
MAX_STOP_STRINGS = 4
#: ``max_tokens`` when a completion request gives none (OpenAI's default).
DEFAULT_COMPLETION_MAX_TOKENS = 16

BATCHED_PROMPT_MESSAGE = "batched prompts are not supported: send one request per prompt"


def _is_token_id(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is not a token id.
    return isinstance(value, int) and not isinstance(value, bool)


class _StrictBody(BaseModel):
    """Base of the request bodies: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_StrictBody):
    """``stream_options``: with ``include_usage`` the stream ends with a usage chunk."""

    include_usage: bool | None = None


class GenerationParams(_StrictBody):
    """Sampling fields shared by ``/v1/completions`` and ``/v1/chat/completions``.

    ``None`` means "use the default" for every optional field, as clients that send explicit
    nulls expect.
    """

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
        return tuple(items)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The validated stop strings (the validator has turned ``stop`` into a tuple)."""
        return tuple(self.stop or ())


class CompletionRequest(GenerationParams):
    """Body of ``POST /v1/completions``."""

    prompt: Any = Field(..., description="a string, or a list of token ids")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> str | list[int]:
        """One non-empty prompt: a string or a list of token ids, never a batch."""
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be empty")
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of token ids")
        if not value:
            raise ValueError("must not be empty")
        if any(isinstance(v, (str, list)) for v in value):
            raise ValueError(BATCHED_PROMPT_MESSAGE)
        if not all(_is_token_id(v) for v in value):
            raise ValueError("must be a string or a list of token ids (integers)")
        return list(value)


def _is_text_part(part: Any) -> bool:
    # Only text parts are supported: images and audio have no meaning for a text model.
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


class ChatMessage(_StrictBody):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: Any = Field(..., description="a string, or a list of text parts")

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str:
        """Content as one string; a list of ``{"type": "text", "text": ...}`` is joined."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(_is_text_part(part) for part in value):
            return "".join(part["text"] for part in value)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')


class ChatCompletionRequest(GenerationParams):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    # OpenAI's newer name for max_tokens in chat; max_tokens wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)

    def as_dicts(self) -> list[dict[str, str]]:
        """Messages in the shape :meth:`TextCodec.encode_chat` takes."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


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


class CompletionChoice(BaseModel):
    """The single choice of a text completion."""

    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Body answered by ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    scls: SclsInfo


class AssistantMessage(BaseModel):
    """The generated chat message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """The single choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


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
