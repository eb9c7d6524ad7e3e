"""Helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from services.ingest.app import create_app
from shared.modeling.loading import LoadedModel
from shared.settings import Settings


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 30,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``check`` until it is truthy; fail with ``what`` after ``timeout_s``, or as soon
    as ``proc`` (a process the wait depends on) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting: {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s: {what}")


def greedy_reference(
    loaded: LoadedModel, prompt: list[int], max_new_tokens: int, require_full: bool = True
) -> list[int]:
    """Greedy tokens from transformers' own ``generate``, the prompt run alone: the output
    every engine and the whole system must reproduce (docs/design.md §6.5, invariant 5)."""
    ids = torch.tensor([prompt])
    out = loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=loaded.codec.pad_id,
    )
    tokens = out[0, len(prompt) :].tolist()
    if require_full:
        assert len(tokens) == max_new_tokens, "generate stopped early: pick other prompts"
    return tokens


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on a fresh ingest app whose lifespan runs around the block."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://ingest", timeout=60
    ) as client:
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


@contextmanager
def served_over_tcp(settings: Settings) -> Iterator[str]:
    """The ingest app under a real uvicorn server on a free port (a real client can hang
    up, the official openai client can connect); yields its base URL."""
    with served_app(create_app(settings)) as url:
        yield url


@contextmanager
def served_app(app: Any) -> Iterator[str]:
    """An ASGI ``app`` under a real uvicorn server on a free local port (lifespan
    included); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
