"""Request validation of the ingest: OpenAI-shaped errors, body parsing, request checks.

:class:`APIError` is answered as OpenAI's ``{"error": {...}}``; :func:`parse_body` validates
a JSON body against a schema of :mod:`services.ingest.schemas`; :class:`RequestChecks` checks
a request against the served model and the settings and builds its
:class:`~shared.core.records.RequestParams`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.ingest.schemas import DEFAULT_COMPLETION_MAX_TOKENS, GenerationParams
from shared.core.records import RequestParams
from shared.modeling.registry import ModelInfo
from shared.obs.logging import get_logger
from shared.policy.presets import is_continuous
from shared.settings import Settings

B = TypeVar("B", bound=BaseModel)


def _log() -> structlog.stdlib.BoundLogger:
    # Fetched per use: get_logger binds at call time, and a module-level logger would keep
    # the structlog configuration of import time, before the CLI configures logging.
    return get_logger("services.ingest")


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.code = code


class ClientDisconnected(Exception):
    """The HTTP client went away while its request was being served (which goes on)."""


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    body = {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message (``"max_tokens: Input should be ..."``) and the first bad field."""
    parts = []
    for err in errors[:3]:
        where = _loc(err.get("loc", ()))
        parts.append(f"{where}: {_error_text(err)}" if where else _error_text(err))
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more errors")
    first = _loc(errors[0].get("loc", ())) if errors else ""
    return "; ".join(parts), first or None


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    # FastAPI prefixes locations with where the value came from ("body", "path"): drop it.
    parts = list(loc)
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def _error_text(err: dict[str, Any]) -> str:
    # pydantic words our own ValueErrors as "Value error, <text>": keep only the text.
    if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return str(err.get("msg", "invalid value"))


def register_error_handlers(app: FastAPI) -> None:
    """Answer every error, including FastAPI's own, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        log = _log()
        level = log.warning if exc.status >= 500 else log.info
        level("error response", status=exc.status, error=exc.message, path=request.url.path)
        return error_response(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        _log().info("client disconnected; the request goes on", request_id=str(exc))
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        _log().error("redis error", error=str(exc), path=request.url.path)
        return error_response(503, f"the request store (Redis) is unavailable: {exc}")


async def parse_body(request: Request, model: type[B]) -> B:
    """The request's JSON body validated as ``model``, or a 400 :class:`APIError`.

    Parsed by hand rather than by FastAPI so that a missing or wrong Content-Type still
    works (as with OpenAI) and every failure gets its own clear message.
    """
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()))
        raise APIError(400, message, param=param) from None


@dataclass
class RequestChecks:
    """Checks of a request against the served model (``info``) and the ``settings``."""

    settings: Settings
    info: ModelInfo

    @property
    def served_names(self) -> frozenset[str]:
        """Names a request's ``model`` may give: the canonical one and the configured one."""
        return frozenset({self.info.name, self.settings.model})

    def check_model(self, requested: str | None) -> None:
        """404 unless ``requested`` is absent or names the served model."""
        if requested is None or requested in self.served_names:
            return
        raise APIError(
            404,
            f"model {requested!r} is not served here: this server serves {self.info.name!r}",
            param="model",
        )

    def check_supported(self, body: GenerationParams) -> None:
        """400 for OpenAI options the server does not implement."""
        if body.n not in (None, 1):
            raise APIError(400, f"n: only n=1 is supported, got {body.n}", param="n")

    def check_token_ids(self, ids: list[int]) -> None:
        """400 if a token id given by the client is outside the model's vocabulary."""
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )

    def build_params(
        self, body: GenerationParams, max_tokens: int | None, prompt_len: int, prompt_param: str
    ) -> RequestParams:
        """Generation parameters with defaults applied and the length limits checked."""
        limit, max_gen = self.info.context_limit, self.settings.max_gen_length
        if max_tokens is None:
            max_tokens = self.default_max_tokens(prompt_param, prompt_len)
        if max_tokens > max_gen:
            raise APIError(
                400,
                f"max_tokens: Input should be less than or equal to {max_gen} "
                "(the server's max_gen_length)",
                param="max_tokens",
            )
        if prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"this model's context limit is {limit} tokens, but the request needs "
                f"{prompt_len + max_tokens}: {prompt_len} prompt tokens + {max_tokens} "
                "max_tokens; shorten the prompt or lower max_tokens",
                param=prompt_param,
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        self.check_policy_supports(temperature, body.stop_strings)
        seed = body.seed
        if temperature > 0 and seed is None:
            # Stored with the request so every slice, on any worker, draws the same stream.
            seed = secrets.randbits(63)
        return RequestParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=seed,
            stop=body.stop_strings,
            ignore_eos=bool(body.ignore_eos),
        )

    def check_policy_supports(self, temperature: float, stop: tuple[str, ...]) -> None:
        # The ILS baseline runs transformers' continuous batching, which decodes greedily
        # with no stop strings here: refuse rather than silently ignore what was asked.
        if not is_continuous(self.settings.policy):
            return
        if temperature > 0:
            raise APIError(400, "temperature: the ils policy (continuous-batching baseline) "
                           "decodes greedily; send temperature 0", param="temperature")
        if stop:
            raise APIError(400, "stop: the ils policy does not support stop strings",
                           param="stop")

    def default_max_tokens(self, prompt_param: str, prompt_len: int) -> int:
        # Completions default to OpenAI's 16; chat (like OpenAI) to whatever room is left.
        if prompt_param == "prompt":
            return DEFAULT_COMPLETION_MAX_TOKENS
        return max(1, min(self.settings.max_gen_length, self.info.context_limit - prompt_len))
