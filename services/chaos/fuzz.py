"""Malformed input against the running ingest: schemathesis cases generated from the app's own
``/openapi.json`` (valid and invalid ones), and hand-made nasty bodies. Any 5xx is a
server error: bad input must get a 4xx with a message, and nothing may crash the ingest.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Share of the schemathesis cases per operation without a body; the completion bodies,
#: where input is richest, share what is left.
_WEIGHTS = {
    "GET /v1/requests/{request_id}": 0.1,
    "POST /v1/requests/{request_id}/cancel": 0.1,
    "POST /tokenize": 0.1,
    "POST /detokenize": 0.05,
}
_BODY_OPERATIONS = ("POST /v1/completions", "POST /v1/chat/completions")
#: Seconds one fuzzed call may take (a valid generated completion is served for real).
_CALL_TIMEOUT_S = 60.0


@dataclass
class FuzzResult:
    """Statuses per source and a few samples of what answered 5xx."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    transport_errors: int = 0
    samples: list[str] = field(default_factory=list)
    by_operation: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # generations hypothesis gave up on
    seconds: float = 0.0

    def note(self, status: int, what: str) -> None:
        """Count one answer; keep a sample of a 5xx."""
        self.cases += 1
        self.statuses[status] += 1
        if status >= 500:
            self.server_errors += 1
            if len(self.samples) < 20:
                self.samples.append(f"{status} {what}"[:400])

    def as_dict(self) -> dict[str, Any]:
        """The report's view."""
        return {
            "cases": self.cases,
            "server_errors": self.server_errors,
            "transport_errors": self.transport_errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "by_operation": self.by_operation,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 1),
            "samples": self.samples,
        }


def _run_operation(operation: Any, url: str, examples: int, result: FuzzResult, seed: int) -> None:
    """Draw ``examples`` cases of one operation (half valid, half invalid) and call each."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from schemathesis.generation import GenerationMode

    def call(case: Any) -> None:
        try:
            response = case.call(base_url=url, timeout=_CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 a refused or cut connection is counted
            result.transport_errors += 1
            result.note(599, f"{operation.label}: {type(exc).__name__}: {exc}")
            return
        body = case.body if not isinstance(case.body, bytes) else repr(case.body)
        result.note(
            response.status_code,
            f"{operation.label} body={str(body)[:200]} -> {response.text[:200]}",
        )

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        runner = given(case=operation.as_strategy(generation_mode=mode))(call)
        runner = settings(
            max_examples=max(1, -(-examples // 2)),
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )(runner)
        try:
            hseed(seed)(runner)()
        except Exception as exc:  # noqa: BLE001 e.g. Unsatisfiable: no invalid input exists
            result.skipped.append(f"{operation.label} {mode.value}: {type(exc).__name__}")


def schemathesis_fuzz(url: str, cases: int, seed: int = 0) -> FuzzResult:
    """About ``cases`` schemathesis cases against ``url``'s OpenAPI schema."""
    import schemathesis

    result = FuzzResult()
    started = time.monotonic()
    spec = httpx.get(f"{url}/openapi.json", timeout=30).raise_for_status().json()
    # the app documents its hand-parsed bodies (services.ingest.openapi)
    schema = schemathesis.openapi.from_dict(spec)
    operations = [item.ok() for item in schema.get_all_operations()]
    # the operations with little input first: whatever they cannot use goes to the bodies
    operations.sort(key=lambda op: op.label in _BODY_OPERATIONS)
    for n, operation in enumerate(operations):
        left = len(operations) - n
        share = (
            max(2, round(cases * _WEIGHTS.get(operation.label, 0.05)))
            if operation.label not in _BODY_OPERATIONS
            else max(2, -(-(cases - result.cases) // left))
        )
        before = result.cases
        _run_operation(operation, url, share, result, seed)
        result.by_operation[operation.label] = result.cases - before
    result.seconds = time.monotonic() - started
    return result


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


def nasty_bodies() -> list[tuple[str, str, str, bytes, dict[str, str]]]:
    """(name, method, path, body, headers) of hand-made bad requests."""
    js = {"content-type": "application/json"}
    comp, chat = "/v1/completions", "/v1/chat/completions"

    def body(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    cases = [
        ("huge prompt (8 MB)", comp, body({"prompt": "a" * 8_000_000, "max_tokens": 2})),
        ("deeply nested JSON (100k)", comp, _nested(100_000)),
        ("nested JSON (1k)", comp, _nested(1_000)),
        ("prompt is a number", comp, body({"prompt": 123})),
        ("max_tokens is a string", comp, body({"prompt": "a", "max_tokens": "10"})),
        ("temperature is a string", comp, body({"prompt": "a", "temperature": "hot"})),
        ("stream is a string", comp, body({"prompt": "a", "stream": "yes"})),
        ("invalid UTF-8", comp, b'{"prompt": "\xff\xfe\xfd"}'),
        ("lone surrogate escape", comp, b'{"prompt": "\\ud800", "max_tokens": 2}'),
        ("NUL in prompt", comp, b'{"prompt": "a\\u0000b", "max_tokens": 2}'),
        ("negative max_tokens", comp, body({"prompt": "a", "max_tokens": -1})),
        ("huge max_tokens", comp, body({"prompt": "a", "max_tokens": 10**30})),
        ("5000-digit max_tokens", comp, b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"),
        ("huge temperature", comp, body({"prompt": "a", "temperature": 1e308})),
        ("NaN temperature", comp, b'{"prompt": "a", "temperature": NaN}'),
        ("Infinity top_p", comp, b'{"prompt": "a", "top_p": Infinity}'),
        ("seed below int64", comp, body({"prompt": "a", "seed": -(2**70)})),
        ("seed above uint64", comp, body({"prompt": "a", "seed": 2**70})),
        ("empty prompt", comp, body({"prompt": ""})),
        ("empty token list", comp, body({"prompt": []})),
        ("token id out of range", comp, body({"prompt": [10**9], "max_tokens": 2})),
        ("negative token id", comp, body({"prompt": [-1], "max_tokens": 2})),
        ("batched prompts", comp, body({"prompt": ["a", "b"]})),
        ("empty body", comp, b""),
        ("JSON null", comp, b"null"),
        ("JSON array", comp, b"[]"),
        ("not JSON", comp, b"prompt=a"),
        ("truncated JSON", comp, b'{"prompt": "a"'),
        ("stop list of 1000", comp, body({"prompt": "a", "stop": ["x"] * 1000})),
        ("n = 1000", comp, body({"prompt": "a", "n": 1000})),
        ("chat: messages a string", chat, body({"messages": "hi"})),
        ("chat: no messages", chat, body({"messages": []})),
        ("chat: bad role", chat, body({"messages": [{"role": "root", "content": "x"}]})),
        (
            "chat: image part",
            chat,
            body(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                        }
                    ]
                }
            ),
        ),
        ("chat: content null", chat, body({"messages": [{"role": "user", "content": None}]})),
        # structured outputs and tools (docs/structured-outputs.md): a 400, never a 5xx
        ("response_format a string", comp, body({"prompt": "a", "response_format": "json"})),
        ("json_schema not a schema", comp, body({"prompt": "a", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}})),
        ("json_schema with $ref loop", comp, body({"prompt": "a", "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}})),
        ("json_schema 10k-deep", comp, b'{"prompt": "a", "response_format": {"type": '
            b'"json_schema", "json_schema": {"name": "x", "schema": '
            + b'{"items": ' * 10_000 + b"{}" + b"}" * 10_000 + b"}}}"),
        ("json_schema 1 MB", comp, body({"prompt": "a", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {f"p{i}": {"type": "string"}
                                                 for i in range(50_000)}}}}})),
        ("regex catastrophic", comp, body({"prompt": "a", "max_tokens": 4,
            "structured_outputs": {"regex": "(a+)+" * 200}})),
        ("regex invalid", comp, body({"prompt": "a", "structured_outputs": {"regex": "(["}})),
        ("grammar garbage", comp, body({"prompt": "a", "structured_outputs": {
            "grammar": "::= ::= start"}})),
        ("choice of numbers", comp, body({"prompt": "a", "structured_outputs": {"choice": [1]}})),
        ("two structured kinds", comp, body({"prompt": "a", "structured_outputs": {
            "regex": "a", "json": {}}})),
        ("tools not a list", chat, body({"messages": [{"role": "user", "content": "x"}],
                                          "tools": "all", "tool_choice": "required"})),
        ("tool_choice auto", chat, body({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]})),
        ("parallel_tool_calls not a bool", chat, body({
            "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": "both",
            "tools": [{"type": "function", "function": {"name": "f"}}]})),
        ("auto with tools not a list", chat, body({
            "messages": [{"role": "user", "content": "x"}], "tools": {"f": 1},
            "tool_choice": "auto"})),
        ("tool_choice unknown name", chat, body({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}})),
        ("tool parameters not a schema", chat, body({
            "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": 7}}]})),
        (
            "chat: 10k messages",
            chat,
            body({"messages": [{"role": "user", "content": "x"}] * 10_000, "max_tokens": 2}),
        ),
    ]
    rows = [(name, "POST", path, data, js) for name, path, data in cases]
    rows += [
        ("text/plain body", "POST", comp, body({"prompt": "a"}), {"content-type": "text/plain"}),
        ("request id with a colon", "GET", "/v1/requests/x:events", b"", {}),
        ("request id 10k chars", "GET", "/v1/requests/" + "a" * 10_000, b"", {}),
        ("request id traversal", "GET", "/v1/requests/..%2F..%2Fpending", b"", {}),
        ("cancel unknown id", "POST", "/v1/requests/nope/cancel", b"", {}),
        ("unknown route", "POST", "/v1/embeddings", body({"input": "a"}), js),
        ("wrong method", "DELETE", comp, b"", {}),
    ]
    return rows


def nasty_fuzz(url: str) -> FuzzResult:
    """Send every :func:`nasty_bodies` request once."""
    result = FuzzResult()
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=_CALL_TIMEOUT_S) as client:
        for name, method, path, data, headers in nasty_bodies():
            try:
                # a fresh connection each: after a 500 the server may close the one it used
                resp = client.request(
                    method, path, content=data, headers={**headers, "connection": "close"}
                )
            except httpx.HTTPError as exc:
                result.transport_errors += 1
                result.note(599, f"{name}: {type(exc).__name__}: {exc}")
                continue
            result.note(resp.status_code, f"{name}: {resp.text[:200]}")
            result.by_operation[name] = resp.status_code
    result.seconds = time.monotonic() - started
    return result
