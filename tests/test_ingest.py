"""The ingest API against a real Redis and the real tiny-random codec.

No worker runs here: where a request must finish, the test plays the worker's part through
the real store API (claim a batch, commit its slices), as the worker would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import structlog

from services.ingest.app import create_app
from shared.core.records import CommitItem, RequestParams, RequestRecord, new_batch_id, now
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import Store
from shared.modeling.registry import load_codec
from shared.settings import Settings
from tests.helpers import serve

pytestmark = pytest.mark.anyio

CODEC = load_codec("tiny-random", Path("/nonexistent"))  # byte codec: built in code


@pytest.fixture()
async def client(settings: Settings, rclient: redis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as http:
        yield http


async def wait_pending(store: Store, count: int = 1, timeout_s: float = 5.0) -> list[str]:
    """Ids in the pending pool once it holds ``count`` requests."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = store.pending_ids(100)
        if len(ids) >= count:
            return ids
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} requests reached pending")


def run_slice(store: Store, rid: str, text: str, reason: FinishReason | None, final: str) -> None:
    """Claim ``rid`` alone into a batch and commit one slice that generated ``text``."""
    bid = new_batch_id()
    fences = store.claim_batch(bid, "w0", [rid], 4, now() + 60)
    item = CommitItem(rid, fences[rid], CODEC.encode(text), reason, text, final)
    store.commit_slice(store.get_batch(bid), [item], {}, 60)


async def play_worker(
    store: Store, text: str = "Hello there", reason: FinishReason = FinishReason.STOP
) -> str:
    """Serve the first pending request in two slices, as the worker would; returns its id."""
    rid = (await wait_pending(store))[0]
    run_slice(store, rid, text[:4], None, "")
    run_slice(store, rid, text[4:], reason, text)
    return rid


def assert_error(resp: httpx.Response, status: int, *fragments: str, param: Any = ...) -> None:
    """``resp`` is an OpenAI-shaped error with ``status`` whose message has ``fragments``."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    if param is not ...:
        assert error["param"] == param, error


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

BAD_INPUTS = [
    # (id, path, body (bytes are sent verbatim), status, message fragments, param)
    ("missing-prompt", COMPLETIONS, {"max_tokens": 4}, 400, ["prompt: Field required"], "prompt"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, 400, ["prompt: must not be empty"], "prompt"),
    ("empty-ids", COMPLETIONS, {"prompt": []}, 400, ["prompt: must not be empty"], "prompt"),
    ("max-tokens-0", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400,
     ["max_tokens: Input should be greater than or equal to 1"], "max_tokens"),
    ("max-tokens-above-G", COMPLETIONS, {"prompt": "hi", "max_tokens": 65}, 400,
     ["max_tokens: Input should be less than or equal to 64"], "max_tokens"),
    ("context-limit", COMPLETIONS, {"prompt": "a" * 4090, "max_tokens": 10}, 400,
     ["4090 prompt tokens", "10 max_tokens", "context limit is 4096"], "prompt"),
    ("max-tokens-str", COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400,
     ["max_tokens: Input should be a valid integer"], "max_tokens"),
    ("max-tokens-float", COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, 400,
     ["max_tokens: Input should be a valid integer"], "max_tokens"),
    ("temperature-str", COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400,
     ["temperature: Input should be a valid number"], "temperature"),
    ("temperature-high", COMPLETIONS, {"prompt": "hi", "temperature": 2.5}, 400,
     ["temperature: Input should be less than or equal to 2"], "temperature"),
    ("top-p-0", COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400,
     ["top_p: Input should be greater than 0"], "top_p"),
    ("ignore-eos-int", COMPLETIONS, {"prompt": "hi", "ignore_eos": 1}, 400,
     ["ignore_eos: Input should be a valid boolean"], "ignore_eos"),
    ("malformed-json", COMPLETIONS, b'{"prompt": "hi",', 400,
     ["request body is not valid JSON: "], None),
    ("empty-body", COMPLETIONS, b"", 400, ["request body is not valid JSON: "], None),
    ("list-body", COMPLETIONS, b'[{"prompt": "hi"}]', 400, ["must be a JSON object"], None),
    ("batched-empty-member", COMPLETIONS, {"prompt": ["a", ""]}, 400,
     ["prompt: prompt 1: must not be empty"], "prompt"),
    ("batched-bad-ids", COMPLETIONS, {"prompt": [[5, 6], [7, "x"]]}, 400,
     ["prompt 1: must be a string or a list of token ids"], "prompt"),
    ("prompt-number", COMPLETIONS, {"prompt": 42}, 400, ["prompt: must be a string"], "prompt"),
    ("token-out-of-vocab", COMPLETIONS, {"prompt": [5, 512]}, 400,
     ["token id 512 is outside the vocabulary"], "prompt"),
    ("stream-not-bool", COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400,
     ["stream: Input should be a valid boolean"], "stream"),
    ("stream-options-type", COMPLETIONS,
     {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     ["stream_options.include_usage: Input should be a valid boolean"],
     "stream_options.include_usage"),
    ("n-above-max-n", COMPLETIONS, {"prompt": "hi", "n": 17}, 400,
     ["n: at most 16 choices"], "n"),
    ("stop-too-many", COMPLETIONS, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400,
     ["at most 4 stop strings"], "stop"),
    ("stop-number", COMPLETIONS, {"prompt": "hi", "stop": 7}, 400,
     ["stop: must be a string or a list of strings"], "stop"),
    ("wrong-model", COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, 404,
     ["'gpt-4' is not served", "'tiny-random'"], "model"),
    ("chat-missing-messages", CHAT, {"max_tokens": 4}, 400, ["messages: Field required"],
     "messages"),
    ("chat-empty-messages", CHAT, {"messages": []}, 400,
     ["messages: List should have at least 1 item"], "messages"),
    ("chat-bad-role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     ["messages.0.role: Input should be 'system', 'user', 'assistant' or 'tool'"],
     "messages.0.role"),
    ("chat-content-number", CHAT, {"messages": [{"role": "user", "content": 3}]}, 400,
     ["messages.0.content: must be a string"], "messages.0.content"),
    ("chat-stream-bad-prompt", CHAT, {"messages": [], "stream": True}, 400,
     ["messages: List should have at least 1 item"], "messages"),
    ("chat-context-limit", CHAT,
     {"messages": [{"role": "user", "content": "a" * 4080}], "max_tokens": 64}, 400,
     ["context limit is 4096", "64 max_tokens"], "messages"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragments", "param"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
async def test_bad_input_is_rejected_and_writes_nothing(
    client: httpx.AsyncClient, rclient: redis.Redis, path: str, body: Any, status: int,
    fragments: list[str], param: str | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(path, content=content)
    assert_error(resp, status, *fragments, param=param)
    assert rclient.dbsize() == 0  # no request hash, no pending entry, no wake-up


async def test_bad_input_loses_nothing_accepted(
    client: httpx.AsyncClient, store: Store
) -> None:
    good = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "keep me"}))
    (rid,) = await wait_pending(store)
    bad = await client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 0})
    assert bad.status_code == 400
    assert store.pending_ids(10) == [rid]  # the accepted request is untouched
    await play_worker(store, "kept")
    resp = await good
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "kept"


async def test_completion_answers_the_committed_text(
    client: httpx.AsyncClient, store: Store
) -> None:
    prompt = "Once upon a time"
    call = asyncio.create_task(client.post(
        COMPLETIONS, json={"model": "tiny-random", "prompt": prompt, "max_tokens": 20,
                           "stop": "\n", "user": "ignored"}))
    rid = await play_worker(store, "Hello there", FinishReason.STOP)
    resp = await call
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Request-Id"] == rid
    body = resp.json()
    assert body["id"] == f"cmpl-{rid}" and body["object"] == "text_completion"
    assert body["model"] == "tiny-random" and isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": "Hello there", "finish_reason": "stop", "logprobs": None}
    ]
    n_prompt, n_gen = len(CODEC.encode(prompt)), len(CODEC.encode("Hello there"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                             "total_tokens": n_prompt + n_gen}
    scls = body["scls"]
    assert scls["request_id"] == rid and scls["slices"] == 2
    assert 0 <= scls["queue_time_s"] <= scls["ttft_s"] <= scls["e2e_s"]
    # what was written: the codec's tokens, OpenAI defaults, and a seed chosen for sampling
    rec = store.get_request(rid)
    assert rec.prompt_ids == CODEC.encode(prompt) and rec.model == "tiny-random"
    assert rec.params.max_tokens == 20 and rec.params.stop == ("\n",)
    assert rec.params.temperature == 1.0 and rec.params.top_p == 1.0
    assert rec.params.seed is not None and 0 <= rec.params.seed < 2**63
    assert rec.params.ignore_eos is False


async def test_token_id_prompt_and_greedy_params_are_stored_as_given(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(COMPLETIONS, json={
        "prompt": [5, 6, 7], "temperature": 0, "ignore_eos": True, "max_tokens": 64}))
    rid = await play_worker(store, "abcdefgh", FinishReason.LENGTH)
    resp = await call
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    rec = store.get_request(rid)
    assert rec.prompt_ids == [5, 6, 7]
    assert rec.params == RequestParams(max_tokens=64, temperature=0.0, ignore_eos=True)


async def test_chat_completion_uses_the_chat_template(
    client: httpx.AsyncClient, store: Store
) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    call = asyncio.create_task(client.post(
        CHAT, json={"messages": messages, "max_completion_tokens": 8, "temperature": 0.5,
                    "seed": 7}))
    rid = await play_worker(store, "Hello!", FinishReason.STOP)
    resp = await call
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == f"chatcmpl-{rid}" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    expected = CODEC.encode_chat([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi!"}])
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert body["usage"]["completion_tokens"] == len(CODEC.encode("Hello!"))
    rec = store.get_request(rid)
    assert rec.prompt_ids == expected
    assert (rec.params.max_tokens, rec.params.temperature, rec.params.seed) == (8, 0.5, 7)


async def test_full_pending_pool_answers_429_and_writes_nothing(
    settings: Settings, store: Store, rclient: redis.Redis
) -> None:
    store.submit(RequestRecord(id="r0", prompt_ids=[5], params=RequestParams(max_tokens=1),
                               arrival=now()))
    before = sorted(rclient.keys("*"))
    async with serve(settings.model_copy(update={"max_pending": 1})) as http:
        resp = await http.post(COMPLETIONS, json={"prompt": "hi"})
    assert_error(resp, 429, "1 requests pending, limit 1")
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert int(resp.headers["Retry-After"]) >= 1
    assert sorted(rclient.keys("*")) == before and store.pending_ids(10) == ["r0"]


async def test_the_pending_bound_is_exact_under_a_concurrent_burst(
    settings: Settings, store: Store
) -> None:
    """Twelve requests at once against room for three: exactly three are accepted (and
    kept, answered 504 here since no worker runs), nine get 429 and write nothing."""
    limited = settings.model_copy(update={"max_pending": 3, "request_timeout_s": 1.0})
    async with serve(limited) as http:
        responses = await asyncio.gather(*(
            http.post(COMPLETIONS, json={"prompt": f"burst {i}"}) for i in range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [429] * 9 + [504] * 3, statuses
    accepted = {r.headers["X-Request-Id"] for r in responses if r.status_code == 504}
    assert set(store.pending_ids(100)) == accepted and len(accepted) == 3


async def test_store_submit_refuses_beyond_its_bound_and_writes_nothing(
    store: Store, rclient: redis.Redis
) -> None:
    def record(rid: str) -> RequestRecord:
        return RequestRecord(id=rid, prompt_ids=[5], params=RequestParams(max_tokens=1),
                             arrival=now())

    assert store.submit(record("a"), max_pending=2) and store.submit(record("b"), 2)
    before = sorted(rclient.keys("*"))
    assert not store.submit(record("c"), max_pending=2)
    assert sorted(rclient.keys("*")) == before
    assert store.submit(record("c"))  # no bound: always written
    assert sorted(store.pending_ids(10)) == ["a", "b", "c"]
    stored = store.get_request("c")
    assert stored is not None and stored.prompt_ids == [5]
    assert stored.status is RequestStatus.PENDING


async def test_request_status_pending_finished_and_unknown(
    client: httpx.AsyncClient, store: Store
) -> None:
    store.submit(RequestRecord(id="r0", prompt_ids=[5, 6], params=RequestParams(max_tokens=4),
                               arrival=now(), model="tiny-random"))
    pending = (await client.get("/v1/requests/r0")).json()
    assert pending["status"] == "pending" and pending["text"] is None
    assert (pending["prompt_tokens"], pending["completion_tokens"]) == (2, 0)
    assert pending["finish_reason"] is None and pending["first_claimed_at"] is None

    call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "hi"}))
    # r0 stays pending: serve only the new request
    rid = next(i for i in await wait_pending(store, 2) if i != "r0")
    run_slice(store, rid, "done", FinishReason.LENGTH, "done")
    assert (await call).status_code == 200
    for ref in (rid, f"cmpl-{rid}"):
        done = (await client.get(f"/v1/requests/{ref}")).json()
        assert done["id"] == rid and done["status"] == "finished" and done["text"] == "done"
        assert done["finish_reason"] == "length" and done["slices"] == 1 and done["fence"] == 1
        assert done["completion_tokens"] == 4 and done["e2e_s"] >= 0

    for unknown in ("nope", "r0:events"):
        assert_error(await client.get(f"/v1/requests/{unknown}"), 404, "unknown or has expired")


async def test_failed_request_answers_its_reason(client: httpx.AsyncClient, store: Store) -> None:
    for reason, status in ((FinishReason.NEVER_FITS, 503), (FinishReason.ERROR, 500)):
        call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "big"}))
        (rid,) = await wait_pending(store)
        assert store.fail_pending(rid, reason, "needs 9 GiB, budget 2 GiB", 60)
        resp = await call
        assert_error(resp, status, rid, reason.value, "needs 9 GiB, budget 2 GiB")
        assert resp.headers["X-Request-Id"] == rid
        status_body = (await client.get(f"/v1/requests/{rid}")).json()
        assert status_body["status"] == "failed" and "9 GiB" in status_body["error"]


async def test_timeout_answers_504_and_keeps_the_request(
    settings: Settings, store: Store
) -> None:
    async with serve(settings.model_copy(update={"request_timeout_s": 0.5})) as http:
        started = time.monotonic()
        resp = await http.post(COMPLETIONS, json={"prompt": "slow"})
        elapsed = time.monotonic() - started
    rid = resp.headers["X-Request-Id"]
    assert_error(resp, 504, rid, f"GET /v1/requests/{rid}")
    assert 0.4 <= elapsed < 3
    assert store.pending_ids(10) == [rid]  # not lost: still waiting for a worker
    assert store.get_request(rid).status is RequestStatus.PENDING


async def test_healthz_and_models(client: httpx.AsyncClient, settings: Settings) -> None:
    resp = await client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [
        ("tiny-random", "model", 4096)
    ]
    # Redis gone: port 1 refuses connections
    async with serve(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})) as down:
        resp = await down.get("/healthz")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"


async def test_unknown_route_answers_openai_error(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404, "Not Found")


async def test_log_lines_carry_the_request_id(
    client: httpx.AsyncClient, store: Store
) -> None:
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "log me"}))
        rid = await play_worker(store)
        assert (await call).status_code == 200
    finally:
        structlog.reset_defaults()
    events = {e["event"]: e for e in capture.entries if e.get("request_id") == rid}
    assert {"request accepted", "request finished"} <= set(events)
    assert events["request finished"]["finish_reason"] == "stop"


async def test_client_disconnect_stops_waiting_but_keeps_the_request(
    settings: Settings, store: Store
) -> None:
    app = create_app(settings)
    body = json.dumps({"prompt": "bye"}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await wait_pending(store)  # the client hangs up once its request is accepted
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": COMPLETIONS, "raw_path": b"",
             "query_string": b"", "root_path": "", "headers": [], "server": ("t", 80),
             "client": ("c", 1)}
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert sent[0]["status"] == 499
    (rid,) = store.pending_ids(10)  # the request is still pending, for a worker to serve
    assert store.get_request(rid).status is RequestStatus.PENDING


@pytest.mark.parametrize(
    ("extra", "param"), [({"temperature": 0.7}, "temperature"), ({"stop": ["x"]}, "stop")]
)
async def test_ils_hf_policy_refuses_what_it_cannot_do(
    settings: Settings, rclient: redis.Redis, extra: dict, param: str
) -> None:
    """The ILS baseline decodes greedily without stop strings: say so instead of ignoring."""
    async with serve(settings.model_copy(update={"policy": "ils-hf"})) as http:
        body = {"prompt": "hi", "max_tokens": 4, "temperature": 0, **extra}
        resp = await http.post(COMPLETIONS, json=body)
    assert_error(resp, 400, "ils-hf", param=param)
    assert rclient.zcard("scls:pending") == 0


async def test_cancel_a_pending_request_answers_its_waiting_client(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "never mind"}))
    (rid,) = await wait_pending(store)
    resp = await client.post(f"/v1/requests/cmpl-{rid}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": rid, "status": "cancelled",
                           "message": "it was pending: ended now"}
    answer = await call
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("", "cancelled")
    assert store.pending_ids(10) == []
    state = (await client.get(f"/v1/requests/{rid}")).json()
    assert state["status"] == "cancelled" and state["finish_reason"] == "cancelled"
    assert_error(await client.post(f"/v1/requests/{rid}/cancel"), 409,
                 "already ended (cancelled)")
    for unknown in ("nope", "bad id!"):
        assert_error(await client.post(f"/v1/requests/{unknown}/cancel"), 404,
                     "unknown or has expired")


async def test_cancel_a_running_request_ends_it_after_its_slice(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "go on"}))
    (rid,) = await wait_pending(store)
    bid = new_batch_id()
    fences = store.claim_batch(bid, "w0", [rid], 4, now() + 60)
    resp = await client.post(f"/v1/requests/{rid}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
    item = CommitItem(rid, fences[rid], CODEC.encode("Hell"), None, "Hell", "")
    store.commit_slice(store.get_batch(bid), [item], {}, 60)
    choice = (await call).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("Hell", "cancelled")
    assert store.pending_ids(10) == []  # not handed back for another slice
