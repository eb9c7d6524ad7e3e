"""``stream: true``: server-sent events from the ingest, against a real Redis.

As in test_ingest.py, the test plays the worker's part through the real store API; the
end-to-end test with real workers over HTTP is in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis

from services.ingest.streaming import StopHoldback
from services.worker.runtime import text_delta
from shared.core.states import FinishReason, RequestStatus
from shared.core.store import Store
from shared.settings import Settings
from tests.helpers import serve, served_over_tcp
from tests.test_ingest import CHAT, CODEC, COMPLETIONS, play_worker, run_slice, wait_pending

pytestmark = pytest.mark.anyio


@pytest.fixture()
async def client(settings: Settings, rclient: redis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as http:
        yield http


def events(resp: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of an event stream, JSON-decoded (``[DONE]`` kept as is)."""
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
    out = []
    for block in resp.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_completion_streams_one_chunk_per_slice(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(COMPLETIONS, json={
        "prompt": "Once", "max_tokens": 20, "stream": True,
        "stream_options": {"include_usage": True}}))
    rid = await play_worker(store, "Hello there", FinishReason.STOP)  # "Hell" | "o there"
    resp = await call
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == rid
    got = events(resp)
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    for chunk in chunks:
        assert chunk["id"] == f"cmpl-{rid}" and chunk["object"] == "text_completion"
        assert chunk["model"] == "tiny-random" and chunk["usage"] is None
    assert [c["choices"][0]["text"] for c in chunks] == ["Hell", "o there"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]
    # the last chunk carries the scls block of the non-streamed body (server timings)
    assert "scls" not in chunks[0] and chunks[-1]["scls"]["request_id"] == rid
    assert chunks[-1]["scls"]["slices"] == 2 and chunks[-1]["scls"]["e2e_s"] >= 0
    n_prompt, n_gen = len(CODEC.encode("Once")), len(CODEC.encode("Hello there"))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": n_prompt, "completion_tokens": n_gen,
        "total_tokens": n_prompt + n_gen}
    # the same request, read back, has the streamed text
    assert (await client.get(f"/v1/requests/{rid}")).json()["text"] == "Hello there"


async def test_chat_streams_the_role_then_content_then_the_finish(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(CHAT, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}))
    rid = await play_worker(store, "Hello!", FinishReason.LENGTH)
    got = events(await call)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == f"chatcmpl-{rid}"
               and "usage" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "Hello!"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_a_stop_string_split_over_slices_is_never_streamed(
    client: httpx.AsyncClient, store: Store
) -> None:
    """The worker stops at "END"; its first slice ended in "E", which the stream holds back
    until the final text shows it was the start of the stop string."""
    call = asyncio.create_task(client.post(COMPLETIONS, json={
        "prompt": "x", "stop": ["END"], "stream": True}))
    (rid,) = await wait_pending(store)
    run_slice(store, rid, "abc E", None, "")
    run_slice(store, rid, "ND", FinishReason.STOP, "abc ")
    got = events(await call)
    texts = [c["choices"][0]["text"] for c in got[:-1]]
    assert texts == ["abc ", ""] and got[-1] == "[DONE]"
    assert "".join(texts) == "abc "


async def test_a_failed_request_ends_its_stream_with_the_reason(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "big", "stream": True}))
    (rid,) = await wait_pending(store)
    assert store.fail_pending(rid, FinishReason.NEVER_FITS, "needs 9 GiB, budget 2 GiB", 60)
    got = events(await call)
    assert got[-1] == "[DONE]"
    error = got[-2]["error"]
    assert rid in error["message"] and "9 GiB" in error["message"]
    assert error["type"] == "server_error"


async def test_a_stream_that_outlives_the_timeout_says_where_the_result_will_be(
    settings: Settings, store: Store
) -> None:
    async with serve(settings.model_copy(update={"request_timeout_s": 0.5})) as http:
        got = events(await http.post(COMPLETIONS, json={"prompt": "slow", "stream": True}))
    (rid,) = store.pending_ids(10)  # nothing served it, and it was kept
    assert got[-1] == "[DONE]"
    assert f"GET /v1/requests/{rid}" in got[-2]["error"]["message"]


@pytest.mark.parametrize(("deltas", "final", "sent"), [
    (["abc\n", "d"], "abc\nd", ["abc", "\nd", ""]),  # a held "\n" released by "d"
    (["abc\n", "\n"], "abc", ["abc", "", ""]),  # the stop string itself is never sent
    (["ab", "c\n\nzz"], "abc", ["ab", "c", ""]),  # a whole stop inside one delta
    (["no stop here"], "no stop here", ["no stop here", ""]),
])
def test_stop_holdback(deltas: list[str], final: str, sent: list[str]) -> None:
    hold = StopHoldback(("\n\n", "STOP"))
    out = [hold.feed(d) for d in deltas] + [hold.finish(final)]
    assert out == sent
    assert "".join(out) == final


def test_slice_deltas_add_up_to_the_text_when_a_character_is_cut_between_slices() -> None:
    """The worker's per-slice text: "¥" is two bytes; cut after the first, the slice does
    not send the U+FFFD its half decodes to, and the next slice sends the character."""
    ids = CODEC.encode("a¥b")
    assert len(ids) == 4 and CODEC.decode(ids[:2]) == "a\ufffd"
    first = text_delta(CODEC, [], ids[:2])
    second = text_delta(CODEC, ids[:2], ids, final=True)
    assert (first, second) == ("a", "¥b") and first + second == "a¥b"
    # the request's last slice sends everything, even a character that stays incomplete
    assert text_delta(CODEC, ids[:1], ids[:2], final=True) == "\ufffd"
    assert text_delta(CODEC, ids[:1], ids[:2]) == ""


async def test_a_cancelled_stream_ends_with_what_was_generated(
    client: httpx.AsyncClient, store: Store
) -> None:
    call = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": "x", "stream": True}))
    (rid,) = await wait_pending(store)
    run_slice(store, rid, "Hell", None, "")  # one slice streamed, back to pending
    await wait_pending(store)
    assert (await client.post(f"/v1/requests/{rid}/cancel")).status_code == 200
    got = events(await call)
    texts = [c["choices"][0]["text"] for c in got[:-1]]
    assert texts == ["Hell", ""] and got[-1] == "[DONE]"
    assert got[-2]["choices"][0]["finish_reason"] == "cancelled"


def test_a_stream_whose_client_hangs_up_is_cancelled(settings: Settings, store: Store) -> None:
    """A streaming client that leaves mid-stream stops the request's generation: it is
    cancelled (here while pending between two slices), not served to the end."""
    with served_over_tcp(settings) as url, httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/v1/completions",
                         json={"prompt": "x", "max_tokens": 64, "stream": True}) as resp:
            rid = resp.headers["X-Request-Id"]
            run_slice(store, rid, "Hell", None, "")  # back to pending after one slice
            first = next(line for line in resp.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"][0]["text"] == "Hell"
        # the connection is closed here, mid-stream
        deadline = time.monotonic() + 10
        while (rec := store.get_request(rid)).status is not RequestStatus.CANCELLED:
            assert time.monotonic() < deadline, rec.status
            time.sleep(0.05)
    assert rec.error == "the streaming client disconnected" and rec.generated_ids
    assert store.pending_ids(10) == []
