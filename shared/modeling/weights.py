"""Parameter counts without loading weights or importing torch: from a Llama config's
shapes, or from the headers of a model directory's safetensors files (8-byte length, then
JSON naming every tensor's shape). The ingest sizes a model this way
(:func:`shared.modeling.registry.model_info`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def llama_param_count(config: dict[str, Any]) -> int:
    """Parameters of a Llama without biases, from its shapes (tied embeddings once)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    layer = attention + 3 * hidden * inter + 2 * hidden  # gate, up, down; two norms
    embed = config["vocab_size"] * hidden
    head = 0 if config.get("tie_word_embeddings") else embed
    return embed + config["num_hidden_layers"] * layer + hidden + head  # + the final norm


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from one safetensors file's header (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def safetensors_param_count(model_dir: Path, config: dict[str, Any]) -> int | str:
    """Parameters stored in the directory's safetensors files (headers only, no weights),
    the tied output embedding counted once; or why they cannot be counted so."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return "it has no safetensors weights to count parameters from"
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update(_safetensors_shapes(model_dir / name))
    if any(k.endswith("inv_freq") for k in shapes):
        return "its weights hold buffers besides parameters"
    if "lm_head.weight" in shapes and len(shapes) > 1:
        tied = config.get("tie_word_embeddings")
        if tied is None:
            return "its config does not say whether the output embedding is tied"
        if tied:  # saved twice, one parameter
            del shapes["lm_head.weight"]
    count = 0
    for shape in shapes.values():
        n = 1
        for dim in shape:
            n *= int(dim)
        count += n
    return count
