"""The whole system as a user runs it: child processes for ingest, scheduler and two
workers (``LocalDeployment``, as ``scls up`` starts them), real HTTP, real Redis."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from services.launcher import LocalDeployment
from shared.core.keys import Keys
from shared.core.store import Store, connect
from shared.modeling.loading import load_model
from shared.settings import Settings
from tests.helpers import greedy_reference


@pytest.fixture(scope="module")
def deployment(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDeployment]:
    base = tmp_path_factory.mktemp("e2e")
    settings = Settings(
        redis_url=redis_url,
        key_prefix="e2e:",  # the module shares the session Redis with flushed tests
        model="tiny-random",
        cache_dir=base / "cache",
        slice_length=4,
        max_gen_length=64,
        max_batch_size=4,
        max_queued_batches=1,
        workers=2,
        port=0,
        torch_threads=1,
        log_format="json",
    )
    with LocalDeployment(settings, log_dir=base / "logs") as running:
        yield running


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def test_two_workers_serve_one_run_over_http(deployment: LocalDeployment) -> None:
    prompts = [f"Request number {i} says" for i in range(12)]
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
              for p in prompts]
    store = Store(connect(deployment.settings.redis_url), Keys(deployment.settings.key_prefix))
    # the module's deployment is shared: count what this run adds to its counters
    before = {w: store.stats(w).get("slices", 0) for w in ("w0", "w1")}
    tokens_before = store.stats().get("generated_tokens", 0)
    responses = asyncio.run(_post_all(deployment.url, bodies))
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
    ids = {r.json()["scls"]["request_id"] for r in responses}
    assert len(ids) == 12
    for r in responses:
        body = r.json()
        assert body["usage"]["completion_tokens"] == 10
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["scls"]["slices"] >= 3
    assert all(store.stats(w).get("slices", 0) > before[w] for w in ("w0", "w1"))
    assert store.stats()["generated_tokens"] - tokens_before == 12 * 10
    assert store.pending_count() == 0 and store.inflight_batches() == []


def test_greedy_over_http_equals_generate(deployment: LocalDeployment, tmp_path: Path) -> None:
    """Invariant 5 end to end: the sliced, batched, multi-process answer equals
    ``model.generate`` on the same prompt."""
    torch.set_num_threads(1)
    tiny = load_model("tiny-random", tmp_path, "cpu")
    prompt = "Slicing must not change greedy output"
    resp = httpx.post(f"{deployment.url}/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": 13, "temperature": 0})
    assert resp.status_code == 200, resp.text
    expected = tiny.codec.decode(
        greedy_reference(tiny, tiny.codec.encode(prompt), 13, require_full=False)
    )
    assert resp.json()["choices"][0]["text"] == expected


def test_streamed_answer_arrives_slice_by_slice_and_equals_the_whole(
    deployment: LocalDeployment,
) -> None:
    """``stream: true`` over real HTTP: with S = 4 and 13 tokens (slices of 4, 4, 4, 1)
    the text comes in chunk by chunk as the slices commit, and joined it is the
    non-streamed answer. (A random model's bytes may leave a slice with no whole
    character to send, so at least 3 non-empty chunks, not 4.)"""
    body = {"prompt": "Stream me a story", "max_tokens": 13, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(f"{deployment.url}/v1/completions", timeout=120, json=body).json()
    chunks = []
    with httpx.stream("POST", f"{deployment.url}/v1/completions", timeout=120,
                      json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):])["choices"][0])
    assert len([c for c in chunks if c["text"]]) >= 3
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == "length"


def test_children_are_out_of_reach_of_a_terminal_ctrl_c(deployment: LocalDeployment) -> None:
    """Ctrl-C sends SIGINT to the terminal's foreground process group: the services and the
    embedded Redis are each in a group of their own, so only `scls up` gets it and stops
    them in order (workers drain, Redis last)."""
    groups = {os.getpgid(proc.pid) for proc in deployment.children.values()}
    assert len(deployment.children) == 4 and os.getpgrp() not in groups


def test_request_state_endpoint_and_health(deployment: LocalDeployment) -> None:
    assert httpx.get(f"{deployment.url}/healthz").status_code == 200
    resp = httpx.post(f"{deployment.url}/v1/completions", timeout=120,
                      json={"prompt": "state", "max_tokens": 5, "temperature": 0})
    rid = resp.json()["scls"]["request_id"]
    state = httpx.get(f"{deployment.url}/v1/requests/{rid}").json()
    assert state["status"] == "finished"


@pytest.mark.soak
def test_every_policy_gives_the_same_greedy_text(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 4 acceptance 3: one workload through the slice policies and the three ILS
    baselines, each with fresh services (2 workers); every request completes, with the
    same greedy text under all."""
    base = tmp_path_factory.mktemp("policies")
    prompts = [f"Policy check {i}: " + "abc " * (i * 3) for i in range(8)]
    bodies = [{"prompt": p, "max_tokens": 6 + 2 * i, "temperature": 0}
              for i, p in enumerate(prompts)]
    texts: dict[str, list[str]] = {}
    policies = ("scls", "sls", "ils", "ils-vllm", "ils-hf")
    for policy in policies:
        settings = Settings(
            redis_url=redis_url, key_prefix=f"pol-{policy}:", model="tiny-random",
            cache_dir=base / "cache", policy=policy, slice_length=4, max_gen_length=32,
            max_batch_size=4, workers=2, port=0, torch_threads=1, profile_mode="quick",
            ils_max_concurrency=4, log_format="json",
        )
        with LocalDeployment(settings, log_dir=base / f"logs-{policy}") as running:
            responses = asyncio.run(_post_all(running.url, bodies))
            assert [r.status_code for r in responses] == [200] * len(bodies), policy
            texts[policy] = [r.json()["choices"][0]["text"] for r in responses]
            store = Store(connect(redis_url), Keys(settings.key_prefix))
            assert store.pending_count() == 0 and store.inflight_batches() == []
            slices = [r.json()["scls"]["slices"] for r in responses]
            if policy == "scls":
                assert max(slices) >= 2  # long answers took several slices
            else:
                assert set(slices) == {1}  # sls and ils run each request in one go
            # every engine priced what it ran with its own cost model (slices, or ILS
            # iterations), so busy_s / model_busy_s compares it with its profile
            stats = store.stats()
            assert stats["model_busy_s"] > 0 and stats["busy_s"] > 0, (policy, stats)
    for policy in policies:
        assert texts[policy] == texts["scls"], policy
