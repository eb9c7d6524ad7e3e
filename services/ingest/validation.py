"""Request validation of the ingest: OpenAI-shaped errors, body parsing, request checks.

:class:`APIError` is answered as OpenAI's ``{"error": {...}}``; :func:`parse_body` validates
a JSON body against a schema of :mod:`services.ingest.schemas`; :class:`RequestChecks` checks
a request against the served model and the settings and builds its
:class:`~shared.core.records.RequestParams`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.ingest.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationParams,
    unknown_field_problem,
)
from shared.core.records import RequestParams
from shared.modeling.registry import ModelInfo
from shared.obs.logging import get_logger
from shared.policy.presets import HF_ENGINE, ils_engine
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


#: RequestParams fields the ``ils`` policy refuses unless at their default.
_ILS_UNSUPPORTED = ("stop", "top_k", "min_tokens", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "logit_bias", "logprobs")


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
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of 5,000 digits
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder's depth bound (about 1,000 in a non-main thread)
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, not {type(data).__name__}")
    problem = unknown_field_problem(model, data) if issubclass(model, GenerationParams) else None
    if problem is not None:
        raise APIError(400, problem[1], param=problem[0])
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

    def check_supported(self, body: GenerationParams, logprobs: int | None,
                        prompts: int = 1) -> None:
        """400 for what the server does not implement or allow: ``n``, ``best_of``, the
        number of prompts and of requests (prompts x choices) above the settings' bounds,
        ``logprobs`` above ``max_logprobs``, ``best_of`` below ``n`` or with ``stream``,
        ``echo`` with ``logprobs``."""
        max_n, n = self.settings.max_n, body.choices
        if n > max_n:
            raise APIError(400, f"n: at most {max_n} choices are supported (the server's "
                           f"max_n), got {n}", param="n")
        if prompts > self.settings.max_prompts:
            raise APIError(400, f"prompt: at most {self.settings.max_prompts} prompts per "
                           f"request (the server's max_prompts), got {prompts}", param="prompt")
        copies = max(n, getattr(body, "best_of", None) or 1)
        if prompts * copies > self.settings.max_choices:
            raise APIError(400, f"n: {prompts} prompt(s) x {copies} choices = {prompts * copies} "
                           f"requests, more than the server's max_choices "
                           f"({self.settings.max_choices})", param="n")
        if logprobs is not None and logprobs > self.settings.max_logprobs:
            param = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
            raise APIError(400, f"{param}: at most {self.settings.max_logprobs} alternatives "
                           f"per token are supported, got {logprobs}", param=param)
        if isinstance(body, CompletionRequest):
            self._check_completion_extras(body, n, max_n)
        elif isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None \
                and not body.logprobs:
            raise APIError(400, "top_logprobs: logprobs must be true when top_logprobs is "
                           "given", param="top_logprobs")

    def _check_completion_extras(self, body: CompletionRequest, n: int, max_n: int) -> None:
        best_of = body.best_of
        if best_of is not None:
            if best_of < n:
                raise APIError(400, f"best_of: must be at least n ({n}), got {best_of}",
                               param="best_of")
            if best_of > max_n:
                raise APIError(400, f"best_of: at most {max_n} is supported (the server's "
                               f"max_n), got {best_of}", param="best_of")
            if body.stream and best_of > 1:
                raise APIError(400, "best_of: not supported with stream", param="best_of")
            if best_of > n and ils_engine(self.settings.policy) == HF_ENGINE:
                raise APIError(400, "best_of: the ils-hf policy (transformers' continuous "
                               "batching) does not support best_of above n (it needs "
                               "logprobs)",
                               param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo: echo with logprobs is not supported", param="echo")

    def check_token_ids(self, ids: list[int]) -> None:
        """400 if a token id given by the client is outside the model's vocabulary."""
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )

    def check_logit_bias(self, pairs: tuple[tuple[int, float], ...]) -> None:
        """400 if a ``logit_bias`` key is not a token id of the model's vocabulary."""
        vocab = self.info.vocab_size
        bad = next((t for t, _ in pairs if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"logit_bias: token id {bad} is outside the vocabulary "
                           f"(0..{vocab - 1})", param="logit_bias")

    def build_params(
        self, body: GenerationParams, max_tokens: int | None, prompt_len: int, prompt_param: str,
        logprobs: int | None = None, grammar: str = "",
    ) -> RequestParams:
        """Generation parameters with defaults applied and the length limits checked;
        ``grammar`` is the key of the checked grammar the output must match ("": none)."""
        max_tokens = self._checked_max_tokens(max_tokens, prompt_len, prompt_param)
        min_tokens = body.min_tokens or 0
        if min_tokens > max_tokens:
            raise APIError(400, f"min_tokens: must not exceed max_tokens ({max_tokens}), got "
                           f"{min_tokens}", param="min_tokens")
        self.check_logit_bias(body.bias_pairs)
        params = RequestParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_strings,
            ignore_eos=bool(body.ignore_eos),
            top_k=self._top_k(body.top_k),
            min_tokens=min_tokens,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if body.repetition_penalty is None
                                else body.repetition_penalty),
            logit_bias=body.bias_pairs,
            logprobs=logprobs,
            stream=bool(body.stream),
            grammar=grammar,
        )
        self.check_policy_supports(params)
        if params.temperature > 0 and params.seed is None:
            # Stored with the request so every slice, on any worker, draws the same stream.
            params = replace(params, seed=secrets.randbits(63))
        return params

    def _top_k(self, top_k: int | None) -> int:
        # -1 (vLLM's "off") and 0 both keep every token, and so does any k >= the vocabulary.
        if top_k is None or top_k <= 0 or top_k >= self.info.vocab_size:
            return 0
        return top_k

    def _checked_max_tokens(self, max_tokens: int | None, prompt_len: int,
                            prompt_param: str) -> int:
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
        return max_tokens

    def check_policy_supports(self, params: RequestParams) -> None:
        """400 for what the ``ils-hf`` policy cannot do.

        That baseline runs transformers' continuous batching, which decodes greedily with
        no stop strings, no sampling extras and no log-probabilities here: refuse rather than
        silently ignore what was asked. (``ils`` and ``ils-vllm`` run our own engine and
        support everything the slice engine does.)
        """
        if ils_engine(self.settings.policy) != HF_ENGINE:
            return
        if params.grammar:
            raise APIError(400, "response_format: the ils-hf policy (transformers' continuous "
                           "batching) cannot constrain its output: structured outputs and "
                           "forced tool calls need another policy", param="response_format")
        if params.temperature > 0:
            raise APIError(400, "temperature: the ils-hf policy (transformers' continuous "
                           "batching) decodes greedily; send temperature 0",
                           param="temperature")
        defaults = RequestParams(max_tokens=params.max_tokens)
        for name in _ILS_UNSUPPORTED:
            if getattr(params, name) != getattr(defaults, name):
                raise APIError(400, f"{name}: the ils-hf policy (transformers' continuous "
                               f"batching) does not support {name}", param=name)

    def default_max_tokens(self, prompt_param: str, prompt_len: int) -> int:
        # Completions default to OpenAI's 16; chat (like OpenAI) to whatever room is left.
        if prompt_param == "prompt":
            return DEFAULT_COMPLETION_MAX_TOKENS
        return max(1, min(self.settings.max_gen_length, self.info.context_limit - prompt_len))
