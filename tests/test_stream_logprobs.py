"""Log-probabilities in a stream travel with the text (issue 16): the worker publishes each
token's with its id, and each chunk carries those of the tokens whose text it completes;
held-back text (a possible stop string) holds its tokens' back, and what never came with
the ids (a commit entry filled a gap; an old worker) travels in the last chunk from the
record. Joined, the chunks' logprobs are the non-streamed answer's.

The stream is played here entry by entry (byte codec of tiny-random); over HTTP with real
workers, tests/test_openai_params.py compares with the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.completion import (
    StreamedLogprobs,
    TokenStrings,
    chat_block,
    completion_block,
)
from services.ingest.streaming import ChoiceStream, ChunkFormat, Finished, StopHoldback, TokenText
from services.worker.engine import SliceEngine, SliceInput
from shared.core.records import RequestParams, StepTokens, TokenLogprob
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import load_codec
from tests.test_token_stream import running

CODEC = load_codec("tiny-random", Path("/nonexistent"))


def logprob(i: int, token: int) -> TokenLogprob:
    """Token ``i``'s logprob: -(i + 1) / 100, so that a value names its token."""
    value = -(i + 1) / 100
    return TokenLogprob(value, ((token, value), (token + 1, value - 1)))


def tokens_entry(pos: int, ids: list[int], lps: list[TokenLogprob] | None) -> dict[str, str]:
    entry = {"kind": "tokens", "pos": str(pos), "ids": ",".join(map(str, ids))}
    if lps is not None:
        entry["logprobs"] = json.dumps([lp.to_json() for lp in lps])
    return entry


async def play(entries: list[dict[str, str]], done: Finished, stops: tuple[str, ...] = (),
               chat: bool = False) -> list[dict[str, Any]]:
    """The choices of the chunks a stream sends for ``entries`` (each read on its own, as
    a worker publishing step by step), then its final entry (``done`` the record)."""
    events: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    fmt = ChunkFormat(chat=chat, id="x", created=0, model="tiny-random")

    async def finish() -> Finished:
        return done

    choice = ChoiceStream(index=0, events=events, holdback=StopHoldback(stops),
                          text=TokenText(CODEC.decode, per_token=True), finish=finish,
                          timeout_error=lambda: TimeoutError("late"),
                          logprobs=StreamedLogprobs(TokenStrings(CODEC), chat))
    out: list[dict[str, Any]] = []

    async def consume() -> None:
        async for chunk in choice.chunks(fmt, asyncio.get_running_loop().time() + 10):
            out.append(chunk["choices"][0])

    task = asyncio.create_task(consume())
    for entry in [*entries, {"kind": "final", "pos": str(len(done.generated_ids)), "ids": ""}]:
        await events.put(entry)
        for _ in range(5):  # the consumer takes it alone
            await asyncio.sleep(0)
    await asyncio.wait_for(task, 10)
    return out


def finished(text: str, ids: list[int], lps: list[TokenLogprob]) -> Finished:
    return Finished(text, "stop", {"prompt_tokens": 1, "completion_tokens": len(ids),
                                   "total_tokens": 1 + len(ids)}, {}, ids, lps)


def joined(choices: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The completions logprobs of every chunk, joined."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for choice in choices:
        for key in out:
            out[key] += (choice["logprobs"] or {}).get(key, [])
    return out


@pytest.mark.anyio
async def test_each_chunk_carries_the_logprobs_of_the_tokens_it_completes() -> None:
    """ "¥" is two byte tokens: the first brings no text and rides with the second. The
    stop string "\\n\\n" is held back, then cut: its tokens travel in the last chunk."""
    ids = CODEC.encode("Hi ¥ there\n\n")
    lps = [logprob(i, t) for i, t in enumerate(ids)]
    entries = [tokens_entry(i, [t], [lps[i]]) for i, t in enumerate(ids)]
    got = await play(entries, finished("Hi ¥ there", ids, lps), stops=("\n\n",))
    assert "".join(c["text"] for c in got) == "Hi ¥ there"
    for chunk in got[:-1]:  # a text chunk's tokens are exactly its text's
        carried = [ids[round(-v * 100) - 1] for v in chunk["logprobs"]["token_logprobs"]]
        assert CODEC.decode(carried) == chunk["text"]
    assert [c["text"] for c in got].count(" ¥") == 0  # one character per chunk: "¥" alone
    assert got[-1]["text"] == "" and got[-1]["logprobs"]["tokens"] == ["\n", "\n"]
    whole = completion_block(TokenStrings(CODEC), ids, lps).model_dump()
    assert joined(got) == whole  # text_offset runs on across the chunks


@pytest.mark.anyio
async def test_entries_without_logprobs_leave_them_all_to_the_last_chunk() -> None:
    ids = CODEC.encode("abc")
    lps = [logprob(i, t) for i, t in enumerate(ids)]
    got = await play([tokens_entry(i, [t], None) for i, t in enumerate(ids)],
                     finished("abc", ids, lps))
    assert [c["logprobs"] for c in got[:-1]] == [None, None, None]
    assert got[-1]["logprobs"] == completion_block(TokenStrings(CODEC), ids, lps).model_dump()


@pytest.mark.anyio
async def test_a_gap_filled_by_the_commit_entry_holds_the_rest_for_the_last_chunk() -> None:
    """Token 2's entry was lost: the slice's commit entry brings it without logprobs, so
    chunks carry those of tokens 0-1 only; the last chunk carries 2 onwards, in order."""
    ids = CODEC.encode("abcdef")
    lps = [logprob(i, t) for i, t in enumerate(ids)]
    entries = [tokens_entry(i, [ids[i]], [lps[i]]) for i in (0, 1, 3)]
    entries.append({"kind": "slice", "pos": "0", "ids": ",".join(map(str, ids[:4]))})
    entries += [tokens_entry(i, [ids[i]], [lps[i]]) for i in (4, 5)]
    got = await play(entries, finished("abcdef", ids, lps))
    assert "".join(c["text"] for c in got) == "abcdef"
    sent = [c["logprobs"]["tokens"] for c in got[:-1] if c["logprobs"]]
    assert sent == [["a"], ["b"]]
    assert got[-1]["logprobs"]["tokens"] == list("cdef")
    assert joined(got) == completion_block(TokenStrings(CODEC), ids, lps).model_dump()


@pytest.mark.anyio
async def test_chat_chunks_carry_their_tokens_content() -> None:
    ids = CODEC.encode("ok 🙂!")
    lps = [logprob(i, t) for i, t in enumerate(ids)]
    got = await play([tokens_entry(i, [t], [lps[i]]) for i, t in enumerate(ids)],
                     finished("ok 🙂!", ids, lps), chat=True)
    text = [c["delta"].get("content", "") for c in got]
    assert "".join(text) == "ok 🙂!" and "🙂" in text  # its four tokens in one chunk
    emoji = got[text.index("🙂")]["logprobs"]["content"]
    assert [item["bytes"] for item in emoji] == [[0xEF, 0xBF, 0xBD]] * 4  # U+FFFD each
    content = [item for c in got if c["logprobs"] for item in c["logprobs"]["content"]]
    assert content == chat_block(TokenStrings(CODEC), ids, lps).model_dump()["content"]
    assert got[-1]["logprobs"] is None  # everything went with the text


def test_token_entries_carry_logprobs_only_when_the_request_asks(store: Store) -> None:
    fence = running(store, "r", "b1")
    lp = TokenLogprob(-0.123456789, ((11, -0.123456789), (4, -2.5)))
    assert store.publish_tokens("b1", [StepTokens("r", fence, 0, [11], (lp,)),
                                       StepTokens("r", fence, 1, [12])]) == 2
    first, second = store.events("r")
    assert [TokenLogprob.from_json(item) for item in json.loads(first["logprobs"])] == [
        TokenLogprob.from_json(lp.to_json())]  # rounded as the record stores them
    assert "logprobs" not in second


def test_the_engine_publishes_each_streamed_tokens_logprobs(tiny: LoadedModel) -> None:
    prompt = tiny.codec.encode("Logprobs, streamed")
    seen: list[StepTokens] = []
    rows = [SliceInput("lp", prompt, [], RequestParams(max_tokens=6, stream=True, logprobs=2)),
            SliceInput("plain", prompt, [], RequestParams(max_tokens=6, stream=True))]
    outputs, _ = SliceEngine(tiny).run_slice(rows, 6, seen.extend)
    asked = [s for s in seen if s.request_id == "lp"]
    assert [lp for s in asked for lp in s.logprobs] == outputs[0].logprobs
    assert all(len(s.logprobs) == len(s.ids) == 1 for s in asked)
    assert all(s.logprobs == () for s in seen if s.request_id == "plain")
