"""vLLM's auxiliary endpoints and readiness (issues 15, 16).

``GET /health`` (readiness: Redis, a scheduler leader, a live worker; 503 naming what is
missing), ``GET /version``, ``GET /v1/models/{model_id}``, ``POST /tokenize`` and
``POST /detokenize`` in vLLM's shapes, so clients and benchmarks written for vLLM work
unchanged. They only read: nothing is stored and no model runs (the codec is the ingest's).
``/health`` and ``/version`` stay open like ``/healthz``; ``/v1/models/{id}`` follows
:func:`services.ingest.routes.require_api_key` (the app includes this router with it), and
``/tokenize`` and ``/detokenize``, outside ``/v1/``, require the key too
(:func:`require_key`): they are API work, not probes.
"""

from __future__ import annotations

import secrets
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from services.ingest.completion import ingest_of
from services.ingest.readiness import readiness_of
from services.ingest.schemas import ChatMessage, ErrorResponse, ModelCard
from services.ingest.validation import APIError, parse_body

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404)
}


def package_version() -> str:
    """The installed scls package's version ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("scls")
    except metadata.PackageNotFoundError:
        return "unknown"


def _has_key(request: Request, api_key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), api_key.encode())


async def require_key(request: Request) -> None:
    """401 unless ``Authorization: Bearer <settings.api_key>`` (when one is set), whatever
    the path (``require_api_key`` guards only ``/v1/*``)."""
    api_key = ingest_of(request).settings.api_key
    if api_key and not _has_key(request, api_key):
        raise APIError(
            401, "missing or invalid API key: send the header 'Authorization: Bearer <key>' "
            "with the key the server was given (SCLS_API_KEY)",
            headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key",
        )


# --- bodies ----------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model (optional)")


class TokenizePrompt(_Body):
    """``POST /tokenize`` with a prompt (vLLM's TokenizeCompletionRequest)."""

    prompt: str
    # Accepted for vLLM clients; this server adds no special tokens to a prompt (neither do
    # its completions), so the ids are exactly those a completion of ``prompt`` would use.
    add_special_tokens: bool = True


class TokenizeChat(_Body):
    """``POST /tokenize`` with messages (vLLM's TokenizeChatRequest)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the chat template writes its own special tokens


class TokenizeResponse(BaseModel):
    """vLLM's tokenize answer."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Body):
    """``POST /detokenize``: token ids to text."""

    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """vLLM's detokenize answer."""

    prompt: str


# --- readiness and version ----------------------------------------------------------------


@router.get("/health", responses={503: {"description": "not ready: what is missing"}})
async def health(request: Request) -> JSONResponse:
    """Readiness: 200 while Redis answers, a scheduler holds the leader lock and a worker
    instance is alive; 503 with the missing parts otherwise (checked about once a second)."""
    state = await readiness_of(request).state()
    return JSONResponse(state.body(), status_code=200 if state.ready else 503)


@router.get("/version")
async def version() -> dict[str, str]:
    """The scls package version, as vLLM's ``/version``."""
    return {"version": package_version()}


# --- models, tokenize, detokenize ----------------------------------------------------------


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    """One model in OpenAI's Model shape; 404 unless it is the served one (ids may hold
    '/', e.g. a local model directory)."""
    ingest = ingest_of(request)
    if model_id not in ingest.served_names:
        raise APIError(404, f"the model {model_id!r} does not exist: this server serves "
                       f"{ingest.info.name!r} (GET /v1/models)", param="model_id",
                       code="model_not_found")
    return ModelCard(id=model_id, created=ingest.started_at,
                     max_model_len=ingest.info.context_limit)


async def _tokenize_body(request: Request) -> TokenizePrompt | TokenizeChat:
    """The body as a prompt or a chat request (vLLM tells them apart by ``messages``)."""
    raw = await parse_body(request, _Peek)
    return await parse_body(request, TokenizeChat if raw.messages is not None else TokenizePrompt)


class _Peek(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: Any = None


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS,
             dependencies=[Depends(require_key)])
async def tokenize(request: Request) -> TokenizeResponse:
    """Token ids of a prompt or of chat messages through the model's chat template, as
    the completion endpoints would submit them."""
    body = await _tokenize_body(request)
    ingest = ingest_of(request)
    ingest.check_model(body.model)
    codec = ingest.codec
    if isinstance(body, TokenizeChat):
        messages = [m.as_dict(codec.renders_tools) for m in body.messages]
        try:
            ids = await run_in_threadpool(
                codec.encode_chat, messages, add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # a template may reject a conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template rejected them: {exc}",
                           param="messages") from None
    else:
        ids = await run_in_threadpool(codec.encode, body.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=ingest.info.context_limit,
                            tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS,
             dependencies=[Depends(require_key)])
async def detokenize(request: Request) -> DetokenizeResponse:
    """Text of token ids (special tokens skipped, as in completions); 400 for an id
    outside the vocabulary."""
    body = await parse_body(request, DetokenizeRequest)
    ingest = ingest_of(request)
    ingest.check_model(body.model)
    vocab = ingest.info.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is outside the vocabulary "
                       f"(0..{vocab - 1})", param="tokens")
    text = await run_in_threadpool(ingest.codec.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
