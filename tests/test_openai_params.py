"""The OpenAI parameters through the official ``openai`` client, against the real system:
the ingest app under uvicorn, a scheduler and a worker (tiny-random, byte codec) in this
process, a real Redis. Supported parameters give the right results; unsupported ones a 400
naming the parameter (docs/openai.md).

The worker's RQ loop installs signal handlers, so it runs in the main thread: each client
call runs in a helper thread while the main thread drives the scheduler and the worker
(:meth:`System.call`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

from services.ingest.completion import choice_seed
from services.ingest.streaming import ChoiceStream, ChunkFormat, Finished, StopHoldback, TokenText
from services.scheduler.service import Scheduler, create_scheduler
from services.worker.service import WorkerService, create_worker
from shared.core.store import Store
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import load_codec
from shared.settings import Settings
from tests.helpers import served_over_tcp

T = TypeVar("T")
MODEL = "tiny-random"
A = 100  # token id of "a" in the byte codec (byte + 3)
EOS = 2


@dataclass
class System:
    """A served deployment and an official client on it."""

    client: openai.OpenAI
    scheduler: Scheduler
    worker: WorkerService
    pool: ThreadPoolExecutor

    def call(self, fn: Callable[[], T], timeout_s: float = 120) -> T:
        """Run ``fn`` (client calls) in a helper thread while serving its requests here."""
        future = self.pool.submit(fn)
        deadline = time.monotonic() + timeout_s
        while not future.done():
            assert time.monotonic() < deadline, "the call did not finish"
            self.scheduler.cycle()
            self.worker.serve(burst=True)
            time.sleep(0.005)
        return future.result()


@contextmanager
def running(settings: Settings, tiny: LoadedModel) -> Iterator[System]:
    """Ingest, scheduler and one worker for ``settings``."""
    scheduler = create_scheduler(settings)
    worker = create_worker(settings, instance_id="w0", loaded=tiny)
    worker.store.register_instance(worker.runtime.instance_info(), ttl_s=600)
    scheduler.cycle()  # takes the leader lock: the ingest's readiness check passes
    with served_over_tcp(settings) as url, ThreadPoolExecutor(1) as pool:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        yield System(client, scheduler, worker, pool)
        client.close()


@pytest.fixture()
def system(settings: Settings, tiny: LoadedModel, rclient: Any) -> Iterator[System]:
    with running(settings, tiny) as served:
        yield served


def complete(system: System, **kwargs: Any) -> Any:
    """``client.completions.create`` for the served model, served."""
    return system.call(lambda: system.client.completions.create(model=MODEL, **kwargs))


def chat(system: System, **kwargs: Any) -> Any:
    """``client.chat.completions.create`` with one user message, served."""
    messages = [{"role": "user", "content": kwargs.pop("content", "Hello")}]
    return system.call(lambda: system.client.chat.completions.create(
        model=MODEL, messages=messages, **kwargs))


GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


def extra(**fields: Any) -> dict[str, Any]:
    """GREEDY with more vLLM extras in the body."""
    return {**GREEDY, "extra_body": {**GREEDY["extra_body"], **fields}}


# --- supported parameters ----------------------------------------------------------------


def test_logit_bias_forces_a_token(system: System) -> None:
    resp = complete(system, prompt="Once upon", logit_bias={str(A): 100}, **GREEDY)
    assert resp.choices[0].text == "a" * 8
    assert resp.usage.completion_tokens == 8
    banned = complete(system, prompt="Once upon", logit_bias={str(A): -100}, **GREEDY)
    assert "a" not in banned.choices[0].text


def test_completion_logprobs_shape_and_greedy_picks_the_most_likely(system: System) -> None:
    resp = complete(system, prompt="The cat", logprobs=3, **GREEDY)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert n == 8 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == resp.choices[0].text  # byte tokens of ASCII text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 4  # the chosen token plus 3 alternatives
        assert top[token] == chosen and chosen == pytest.approx(max(top.values()))


def test_chat_logprobs_shape(system: System) -> None:
    resp = chat(system, logprobs=True, top_logprobs=2, **GREEDY)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.bytes == list(item.token.encode("utf-8"))
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs))
    plain = chat(system, **GREEDY)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == resp.choices[0].message.content


def test_n_choices_differ_when_sampled_and_repeat_with_the_seed(system: System) -> None:
    body = {"prompt": "Roll", "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 12,
            "extra_body": {"ignore_eos": True}}
    first, again = complete(system, **body), complete(system, **body)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3  # distinct per-choice seeds
    assert texts == [c.text for c in again.choices]
    alone = complete(system, **{**body, "n": 1})
    assert alone.choices[0].text == texts[0]  # choice 0 keeps the seed as given
    greedy = complete(system, prompt="Roll", n=3, **GREEDY)
    assert len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.prompt_tokens == 4 and greedy.usage.completion_tokens == 24


def test_chat_n(system: System) -> None:
    resp = chat(system, n=2, temperature=1.0, seed=3, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1]


def test_batched_prompts_come_back_in_openai_order(system: System) -> None:
    prompts = ["first prompt", "second", [70, 71, 72]]
    resp = complete(system, prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in resp.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        alone = complete(system, prompt=prompt, **GREEDY).choices[0].text
        assert [resp.choices[p * 2 + i].text for i in range(2)] == [alone, alone]
    assert resp.usage.prompt_tokens == len("first prompt") + len("second") + 3
    assert resp.usage.completion_tokens == 6 * 8


def test_echo_prepends_the_prompt(system: System) -> None:
    plain = complete(system, prompt="Echo me", **GREEDY).choices[0].text
    resp = complete(system, prompt=["Echo me", [72, 108]], echo=True, **GREEDY)
    assert resp.choices[0].text == "Echo me" + plain
    assert resp.choices[1].text.startswith("Ei")  # token ids 72, 108 are bytes "E", "i"


def test_min_tokens_holds_eos_back(system: System) -> None:
    body = {"prompt": "Stop", "temperature": 0, "max_tokens": 20, "logit_bias": {str(EOS): 100}}
    eager = complete(system, **body)
    assert eager.choices[0].finish_reason == "stop" and eager.usage.completion_tokens <= 1
    held = complete(system, **body, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop"
    assert 5 <= held.usage.completion_tokens <= 6


def test_penalties_change_a_repetitive_output(system: System) -> None:
    prompt = "ab" * 20
    base = complete(system, prompt=prompt, **{**GREEDY, "max_tokens": 24})
    ids = base.choices[0].text
    assert len(set(ids)) < len(ids), "the unpenalised output should repeat itself"
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                    {"extra_body": {"ignore_eos": True, "repetition_penalty": 1.8}}):
        out = complete(system, prompt=prompt, **{**GREEDY, "max_tokens": 24, **penalty})
        assert out.choices[0].text != base.choices[0].text, penalty


def test_top_k_1_is_greedy(system: System) -> None:
    greedy = complete(system, prompt="Pick", **GREEDY).choices[0].text
    sampled = complete(system, prompt="Pick", temperature=1.5, seed=11, max_tokens=8,
                       extra_body={"ignore_eos": True, "top_k": 1})
    assert sampled.choices[0].text == greedy
    body = {"prompt": "Pick", "temperature": 1.5, "seed": 11, "max_tokens": 8}
    free = complete(system, **body, extra_body={"ignore_eos": True})
    huge = complete(system, **body, extra_body={"ignore_eos": True, "top_k": 10**9})
    assert huge.choices[0].text == free.choices[0].text  # k >= the vocabulary keeps all


def test_best_of_returns_the_most_likely_of_its_samples(system: System) -> None:
    body = {"prompt": "Best", "temperature": 1.0, "seed": 5, "max_tokens": 10,
            "extra_body": {"ignore_eos": True}}
    best = complete(system, best_of=3, **body)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 30  # every sample is generated and counted
    # the same seeds (choice i's is derived from the seed), with logprobs to rank them
    samples = complete(system, n=3, logprobs=0, **body)
    scores = [math.fsum(c.logprobs.token_logprobs) for c in samples.choices]
    assert best.choices[0].text == samples.choices[scores.index(max(scores))].text
    assert choice_seed(5, 0) == 5 and choice_seed(5, 1) != choice_seed(5, 2)


def _stream_by_index(chunks: list[Any], chat_: bool) -> tuple[dict[int, str], dict[int, Any]]:
    texts: dict[int, str] = {}
    last: dict[int, Any] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text = (choice.delta.content or "") if chat_ else choice.text
            texts[choice.index] = texts.get(choice.index, "") + text
            if choice.finish_reason is not None:
                last[choice.index] = choice
    return texts, last


def _logprobs_by_index(chunks: list[Any], chat_: bool) -> dict[int, dict[str, list[Any]]]:
    """Each choice's streamed logprobs, its chunks' joined (chat: ``content``)."""
    keys = ("content",) if chat_ else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    out: dict[int, dict[str, list[Any]]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            joined = out.setdefault(choice.index, {k: [] for k in keys})
            for key in keys if choice.logprobs is not None else ():
                joined[key] += getattr(choice.logprobs, key)
    return out


def _assert_same_logprobs(streamed: dict[str, list[Any]], whole: Any, chat_: bool) -> None:
    """The streamed logprobs are the non-streamed ones, token for token. Values are equal
    to float noise: the two requests may run in different batches, whose different padding
    moves a logprob in its 7th digit."""

    def close(a: float, b: float) -> bool:
        return a == pytest.approx(b, rel=1e-5, abs=1e-5)

    if chat_:
        got, want = streamed["content"], whole.content
        assert [(c.token, c.bytes) for c in got] == [(c.token, c.bytes) for c in want]
        for g, w in zip(got, want, strict=True):
            assert close(g.logprob, w.logprob)
            assert [t.token for t in g.top_logprobs] == [t.token for t in w.top_logprobs]
            assert all(close(a.logprob, b.logprob)
                       for a, b in zip(g.top_logprobs, w.top_logprobs, strict=True))
        return
    assert streamed["tokens"] == whole.tokens and streamed["text_offset"] == whole.text_offset
    assert all(close(a, b) for a, b in zip(streamed["token_logprobs"], whole.token_logprobs,
                                           strict=True))
    for got, want in zip(streamed["top_logprobs"], whole.top_logprobs, strict=True):
        assert got.keys() == want.keys() and all(close(got[k], want[k]) for k in got)


def test_streamed_choices_interleave_and_equal_the_whole(system: System) -> None:
    body = {"prompt": ["one", "two"], "n": 2, "temperature": 1.0, "seed": 9, "max_tokens": 10,
            "logprobs": 1, "extra_body": {"ignore_eos": True}}
    whole = complete(system, **body)
    chunks = system.call(lambda: list(system.client.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True}, **body)))
    texts, last = _stream_by_index([c for c in chunks if c.choices], chat_=False)
    assert texts == {c.index: c.text for c in whole.choices}
    streamed = _logprobs_by_index([c for c in chunks if c.choices], chat_=False)
    for choice in whole.choices:  # the chunks' logprobs, joined, are the whole answer's
        _assert_same_logprobs(streamed[choice.index], choice.logprobs, chat_=False)
        assert last[choice.index].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 40


def test_continuous_usage_stats_counts_each_choice_as_it_streams(system: System) -> None:
    """vLLM's ``stream_options.continuous_usage_stats`` (GuideLLM sends it): every chunk
    carries its choice's usage so far, ending at the request's usage."""
    body = {"prompt": "Count with me", "max_tokens": 12, "temperature": 0.0,
            "extra_body": {"ignore_eos": True}}
    chunks = system.call(lambda: list(system.client.completions.create(
        model=MODEL, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **body)))
    counted = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counted == sorted(counted) and counted[-1] == 12
    prompt = {c.usage.prompt_tokens for c in chunks if c.choices}
    assert prompt == {chunks[-1].usage.prompt_tokens}


def test_a_streamed_stop_string_is_never_sent(system: System) -> None:
    """Per-token text goes through the stop-string holdback: the stream never shows the
    stop string (nor what follows), and joined equals the non-streamed answer."""
    free = complete(system, prompt="Stop here", **{**GREEDY, "max_tokens": 16}).choices[0].text
    # the first two characters that occur nowhere before: the stop string
    at = next(k for k in range(1, len(free) - 1)
              if "\ufffd" not in free[k:k + 2] and free[k:k + 2] not in free[:k + 1])
    stop = free[at:at + 2]
    body = {"prompt": "Stop here", "stop": [stop], **{**GREEDY, "max_tokens": 16}}
    whole = complete(system, **body).choices[0]
    assert whole.text == free[:at] and whole.finish_reason == "stop"
    chunks = system.call(lambda: list(system.client.completions.create(
        model=MODEL, stream=True, **body)))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == whole.text and not any(stop in t for t in texts)


def test_a_long_stream_equals_the_non_streamed_text(
    settings: Settings, tiny: LoadedModel, rclient: Any
) -> None:
    """Many slices of per-token entries, decoded incrementally (the tiny model's bytes cut
    multi-byte characters and leave invalid ones): the joined chunks are the non-streamed
    text, character for character, for both endpoints."""
    body = {**GREEDY, "max_tokens": 400}
    messages = [{"role": "user", "content": "Hello"}]
    longer = settings.model_copy(update={"max_gen_length": 400, "slice_length": 16})
    with running(longer, tiny) as system:
        whole = complete(system, prompt="Hello", **body).choices[0].text
        chunks = system.call(lambda: list(system.client.completions.create(
            model=MODEL, prompt="Hello", stream=True, **body)))
        texts = [c.choices[0].text for c in chunks]
        whole_chat = chat(system, **body).choices[0].message.content
        chat_chunks = system.call(lambda: list(system.client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, **body)))
    assert "".join(texts) == whole and len(whole) > 100
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == whole_chat


def test_chat_stream_with_n_and_logprobs(system: System) -> None:
    body = {"n": 2, "logprobs": True, "top_logprobs": 1, **GREEDY}
    whole = chat(system, **body)
    chunks = system.call(lambda: list(system.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True, **body)))
    texts, last = _stream_by_index(chunks, chat_=True)
    assert texts == {c.index: c.message.content for c in whole.choices}
    streamed = _logprobs_by_index(chunks, chat_=True)
    for choice in whole.choices:
        _assert_same_logprobs(streamed[choice.index], choice.logprobs, chat_=True)
        assert len(streamed[choice.index]["content"]) == 8


@pytest.mark.parametrize("chat_", [False, True], ids=["completions", "chat"])
def test_streamed_logprobs_come_with_their_text_and_equal_the_whole(
    system: System, store: Store, chat_: bool
) -> None:
    """Each text chunk carries the logprobs of the tokens it completes (the worker publishes
    them with the ids), not all in the last chunk; with a stop string, the tokens of the
    stop string (never sent) come in the last chunk: joined, the non-streamed logprobs (and
    exactly the streamed request's own, as its record holds them)."""
    prompt = "Stop here"
    asks: dict[str, Any] = {"logprobs": True, "top_logprobs": 2} if chat_ else {"logprobs": 2}

    def create(stream: bool, **body: Any) -> Any:
        """The answer, or the stream's chunks (read while the system serves them)."""
        body = {**GREEDY, "max_tokens": 32, "stream": stream, **body}

        def call() -> Any:
            if chat_:
                out = system.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}], **body)
            else:
                out = system.client.completions.create(model=MODEL, prompt=prompt, **body)
            return list(out) if stream else out

        return system.call(call)

    def text(choice: Any) -> str:
        return str(choice.message.content if chat_ else choice.text)

    free = text(create(False).choices[0])
    # the last two characters that occur nowhere before: the stop string
    at = max(k for k in range(1, len(free) - 1)
             if "\ufffd" not in free[k:k + 2] and free[k:k + 2] not in free[:k + 1])
    whole = create(False, stop=[free[at:at + 2]], **asks).choices[0]
    assert whole.finish_reason == "stop" and text(whole) == free[:at]
    chunks = create(True, stop=[free[at:at + 2]], **asks)
    assert _stream_by_index(chunks, chat_)[0][0] == text(whole)
    streamed = _logprobs_by_index(chunks, chat_)[0]
    _assert_same_logprobs(streamed, whole.logprobs, chat_)
    record = store.get_request(chunks[0].id.split("-", 1)[1])
    assert record is not None and record.generated_ids
    values = ([c.logprob for c in streamed["content"]] if chat_
              else streamed["token_logprobs"])
    assert values == [lp.logprob for lp in record.logprobs]
    carrying = [c for c in chunks[:-1] if c.choices and c.choices[0].logprobs is not None]
    assert carrying  # with the text, not all in the last chunk
    last = chunks[-1].choices[0].logprobs
    assert (len(last.content) if chat_ else len(last.tokens)) >= 1  # the stop string's


def test_the_ignored_fields_are_accepted(system: System) -> None:
    resp = chat(system, user="u1", store=False, metadata={"k": "v"}, service_tier="auto",
                **GREEDY)
    assert resp.choices[0].message.content is not None and resp.usage.completion_tokens == 8


# --- refused parameters ------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

REFUSED = [
    # (id, endpoint, extra arguments, the param named, a fragment of the message)
    # tools are served when a call is forced (tests/test_openai_structured.py); "auto",
    # the default with tools, needs a tool-call parser this deployment was started without
    # (tests/test_openai_tools_auto.py serves it)
    ("tools", "chat", {"tools": [TOOL]}, "tool_choice", '"auto"'),
    ("tool_choice", "chat", {"tools": [TOOL], "tool_choice": "auto"}, "tool_choice",
     "SCLS_TOOL_CALL_PARSER"),
    ("parallel_tool_calls", "chat", {"parallel_tool_calls": "sometimes"},
     "parallel_tool_calls", "boolean"),
    ("functions", "chat", {"functions": [TOOL["function"]]}, "functions", "not supported"),
    ("function_call", "chat", {"function_call": "none"}, "function_call", "not supported"),
    ("response_format", "chat", {"response_format": {"type": "xml"}},
     "response_format.type", "unknown type 'xml'"),
    ("suffix", "completions", {"suffix": "end"}, "suffix", "not supported"),
    ("unknown", "completions", {"extra_body": {"frobnicate": 1}}, "frobnicate",
     "unknown parameter 'frobnicate'"),
    ("best_of-stream", "completions", {"best_of": 2, "stream": True}, "best_of",
     "not supported with stream"),
    ("best_of-below-n", "completions", {"best_of": 1, "n": 2}, "best_of", "at least n"),
    ("echo-logprobs", "completions", {"echo": True, "logprobs": 1}, "echo",
     "echo with logprobs is not supported"),
    ("logprobs-21", "completions", {"logprobs": 21}, "logprobs", "at most 20"),
    ("top_logprobs-21", "chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "less than or equal to 20"),
    ("top_logprobs-alone", "chat", {"top_logprobs": 2}, "top_logprobs",
     "logprobs must be true"),
    ("logit_bias-vocab", "completions", {"logit_bias": {"512": 1}}, "logit_bias",
     "outside the vocabulary"),
    ("logit_bias-range", "completions", {"logit_bias": {"5": 101}}, "logit_bias",
     "between -100 and 100"),
    ("logit_bias-key", "completions", {"logit_bias": {"a": 1}}, "logit_bias",
     "not a token id"),
    ("logit_bias-superscript", "completions", {"logit_bias": {"²": 1}}, "logit_bias",
     "not a token id"),
    ("logit_bias-5000-digits", "completions", {"logit_bias": {"9" * 5000: 1}}, "logit_bias",
     "not a token id"),
    ("min_tokens", "completions", {"max_tokens": 4, "extra_body": {"min_tokens": 5}},
     "min_tokens", "must not exceed max_tokens (4)"),
    ("n-17", "completions", {"n": 17}, "n", "at most 16"),
    ("max_choices", "completions", {"prompt": ["a"] * 5, "n": 13}, "n",
     "5 prompt(s) x 13 choices = 65 requests, more than the server's max_choices (64)"),
    ("max_prompts", "completions", {"prompt": ["a"] * 65}, "prompt", "at most 64 prompts"),
    ("presence_penalty", "completions", {"presence_penalty": 2.5}, "presence_penalty",
     "less than or equal to 2"),
    ("frequency_penalty", "chat", {"frequency_penalty": -3}, "frequency_penalty",
     "greater than or equal to -2"),
    ("repetition_penalty", "completions", {"extra_body": {"repetition_penalty": 0}},
     "repetition_penalty", "greater than 0"),
    ("top_k", "completions", {"extra_body": {"top_k": -2}}, "top_k",
     "greater than or equal to -1"),
    ("best_of-chat", "chat", {"extra_body": {"best_of": 2}}, "best_of", "unknown parameter"),
]


def _refused(system: System, endpoint: str, args: dict[str, Any]) -> openai.BadRequestError:
    def call() -> Any:
        if endpoint == "chat":
            return system.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], **args)
        return system.client.completions.create(model=MODEL, **{"prompt": "hi", **args})

    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


@pytest.fixture(scope="module")
def idle_ingest(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An ingest nobody serves: refused requests never reach a worker."""
    settings = Settings(redis_url=redis_url, model=MODEL, key_prefix="refused:",
                        cache_dir=tmp_path_factory.getbasetemp() / "scls-cache",
                        max_gen_length=64, log_format="console")
    with served_over_tcp(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield System(client, None, None, None)  # type: ignore[arg-type]
        client.close()


@pytest.mark.parametrize(("endpoint", "args", "param", "fragment"),
                         [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_unsupported_parameters_are_refused_by_name(
    idle_ingest: System, endpoint: str, args: dict[str, Any], param: str, fragment: str
) -> None:
    err = _refused(idle_ingest, endpoint, args)
    assert err.status_code == 400
    assert err.param == param, err.body
    assert fragment in err.message, err.message


ILS_REFUSED = [
    ({"logprobs": 1}, "logprobs"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"extra_body": {"min_tokens": 2}}, "min_tokens"),
    ({"best_of": 2}, "best_of"),
]


def test_the_ils_hf_policy_refuses_the_sampling_extras(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = Settings(redis_url=redis_url, model=MODEL, key_prefix="ils-refused:",
                        policy="ils-hf", cache_dir=tmp_path_factory.getbasetemp() / "scls-cache",
                        max_gen_length=64, log_format="console")
    with served_over_tcp(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        served = System(client, None, None, None)  # type: ignore[arg-type]
        for args, param in ILS_REFUSED:
            err = _refused(served, "completions", {"temperature": 0, "max_tokens": 4, **args})
            assert err.param == param and "ils-hf" in err.message, err.message
        client.close()


# --- slicing does not change results -----------------------------------------------------


def test_results_do_not_depend_on_the_slice_length(
    settings: Settings, tiny: LoadedModel, rclient: Any
) -> None:
    """Penalties, top-k, logit bias and seeded sampling read only the request's own tokens:
    one slice per token or one slice for all gives the same text and logprobs."""
    body = {"prompt": "abcabcabc", "temperature": 0.9, "seed": 1234, "max_tokens": 20,
            "n": 2, "presence_penalty": 0.5, "frequency_penalty": 0.3, "logprobs": 2,
            "logit_bias": {str(A): 3.0},
            "extra_body": {"ignore_eos": True, "top_k": 20, "repetition_penalty": 1.2}}
    results = []
    for slice_length in (1, 64):
        rclient.flushdb()
        with running(settings.model_copy(update={"slice_length": slice_length}), tiny) as sys_:
            resp = complete(sys_, **body)
        results.append([(c.text, c.logprobs.tokens, c.logprobs.token_logprobs)
                        for c in resp.choices])
        assert resp.scls["slices"] == (20 if slice_length == 1 else 1)  # type: ignore[attr-defined]
    for (text, tokens, logprobs), (text_1, tokens_1, logprobs_1) in zip(*results, strict=True):
        assert (text, tokens) == (text_1, tokens_1)
        # the same tokens; the logprobs up to float noise (cached K/V vs one prefill)
        assert logprobs == pytest.approx(logprobs_1, abs=1e-4)
    assert results[0][0][0] != results[0][1][0]  # two choices, two samples


# --- per-token stream text -----------------------------------------------------------------


def test_token_text_extends_skips_repeats_and_waits_over_gaps() -> None:
    """``pos``/``ids`` entries: a retried slice's repeats add nothing, a gap waits for the
    slice commit that covers it, and a character cut between tokens is held back."""
    codec = load_codec(MODEL, Path("/nonexistent"))
    ids = codec.encode("ab¥c")  # "¥" is two byte tokens
    text = TokenText(codec.decode)

    def entry(pos: int, new: list[int]) -> dict[str, str]:
        return {"kind": "tokens", "pos": str(pos), "ids": ",".join(map(str, new))}

    assert text.take({"kind": "slice", "delta": "x"}) is None  # no pos: the delta path
    assert text.take(entry(0, ids[:2])) == "ab"
    assert text.take(entry(0, ids[:2])) == ""  # republished by a retried slice
    assert text.take(entry(3, ids[3:4])) == ""  # beyond what is held: missed one, wait
    assert text.take(entry(2, ids[2:3])) == ""  # half of "¥": held back
    assert text.take({"kind": "slice", "pos": "0", "ids": ",".join(map(str, ids))}) == "¥c"
    assert text.ids == ids and text.sent == "ab¥c"


@pytest.mark.anyio
async def test_a_choice_streams_each_decode_step_before_its_slice_commits() -> None:
    """Per-step ``tokens`` entries become a chunk each as they come (the slice's commit
    entry repeats them and adds nothing); the final entry ends with the record's text."""
    codec = load_codec(MODEL, Path("/nonexistent"))
    events: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    fmt = ChunkFormat(chat=False, id="cmpl-x", created=0, model=MODEL)

    async def finish() -> Finished:
        return Finished("Hi!", "length", {"prompt_tokens": 1, "completion_tokens": 3,
                                          "total_tokens": 4})

    choice = ChoiceStream(index=1, events=events, holdback=StopHoldback(()),
                          text=TokenText(codec.decode), finish=finish,
                          timeout_error=lambda: TimeoutError("late"))
    chunks = choice.chunks(fmt, asyncio.get_running_loop().time() + 10)
    ids = codec.encode("Hi!")
    for pos, token in enumerate(ids):
        await events.put({"kind": "tokens", "pos": str(pos), "ids": str(token)})
        chunk = await anext(chunks)
        assert chunk["choices"][0] == {"index": 1, "text": "Hi!"[pos], "logprobs": None,
                                       "finish_reason": None}
    await events.put({"kind": "slice", "pos": "0", "ids": ",".join(map(str, ids)),
                      "delta": "Hi!"})
    await events.put({"kind": "final", "pos": "3", "ids": "", "delta": ""})
    last = await anext(chunks)
    assert last["choices"][0]["text"] == "" and last["choices"][0]["finish_reason"] == "length"
    assert choice.done


def test_choices_are_submitted_all_or_none(
    settings: Settings, rclient: Any, store: Store
) -> None:
    """n=3 against a pending pool with room for 2: 429, and the 2 submitted are withdrawn."""
    bounded = settings.model_copy(update={"max_pending": 2, "reject_when_unready": False})
    with served_over_tcp(bounded) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="hi", n=3, max_tokens=4)
        client.close()
        deadline = time.monotonic() + 5
        while store.pending_count() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert store.pending_count() == 0
    prefix = store.keys.request("")
    records = [store.get_request(k[len(prefix):]) for k in rclient.scan_iter(f"{prefix}*")
               if ":" not in k[len(prefix):]]
    assert [r.status.value for r in records] == ["cancelled", "cancelled"]


@pytest.mark.parametrize(("body", "param", "fragment"), [
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
    (b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", None, "not valid JSON"),
    (b'{"prompt": "\\ud800"}', "prompt", "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content",
     "lone surrogate"),
], ids=["nested-100k", "5000-digit-int", "surrogate-prompt", "surrogate-content"])
def test_bodies_that_json_or_the_tokenizer_cannot_take_are_a_400(
    idle_ingest: System, body: bytes, param: str | None, fragment: str
) -> None:
    path = "chat/completions" if b"messages" in body else "completions"
    resp = httpx.post(f"{idle_ingest.client.base_url}{path}", content=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
