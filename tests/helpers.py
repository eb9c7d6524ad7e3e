"""Helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.ingest.app import create_app
from shared.modeling.loading import LoadedModel
from shared.settings import Settings


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
