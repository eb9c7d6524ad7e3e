"""Loading a model's weights with torch, for the workers and the tools that run the model.

Names, facts and tokenizers, which need no torch, are :mod:`shared.modeling.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shared.modeling.registry import (
    ModelInfo,
    TextCodec,
    dtype_for,
    info_from,
    load_codec,
    model_dir_of,
    pick_device,
    resolve_model_name,
    tiny_config,
)


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, on ``device``."""

    info: ModelInfo
    model: torch.nn.Module
    codec: TextCodec
    device: torch.device


def _build_tiny(dtype: torch.dtype) -> torch.nn.Module:
    """The tiny random Llama; identical weights in every process."""
    from transformers import LlamaForCausalLM

    # Seed a private copy of the RNG so that callers' random streams are left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config())
    return model.to(dtype)




def load_model(name: str, cache_dir: Path, device: str | None = None) -> LoadedModel:
    """Load ``name`` in eval mode on ``device`` (None: CUDA if available, else CPU).

    Weights are fp32 on CPU and bf16 on CUDA. smollm2-135m is converted into ``cache_dir``
    on first use (see :func:`ensure_cached`).
    """
    from transformers import AutoModelForCausalLM

    canonical = resolve_model_name(name)
    dev = pick_device(device)
    dtype = dtype_for(dev)
    model_dir = model_dir_of(canonical, cache_dir)
    if model_dir is None:
        model = _build_tiny(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.to(dev).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info = info_from(canonical, model.config, weights, dtype)
    return LoadedModel(info=info, model=model, codec=load_codec(canonical, cache_dir), device=dev)
