"""Helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from shared.models import LoadedModel


def greedy_reference(
    loaded: LoadedModel, prompt: list[int], max_new_tokens: int, require_full: bool = True
) -> list[int]:
    """Greedy tokens from transformers' own ``generate``, the prompt run alone: the output
    every engine and the whole system must reproduce (DESIGN.md invariant 5)."""
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
