"""Cost models for simulated instances: built-in GPU-class profiles, or ``scls profile --json``.

A built-in profile is derived from public datasheet figures and the model's shape
(docs/simulator.md lists every number and assumption):

* one decode step reads the weights once and each row's KV cache, and computes
  ``2 * params`` FLOPs per row: ``Td(b, c) = overhead + W / BW' + b * 2P / F'_dec
  + b * c * kv / BW'``,
* a prefill reads the weights once and computes ``2 * params`` FLOPs per token plus causal
  attention, ``2 * layers * hidden`` FLOPs per token pair:
  ``Tp(b, l) = overhead + W / BW' + b * l * 2P / F'_pre + b * l^2 * 2 * layers * hidden / F'_pre``,
* memory beyond the weights: the static KV cache plus a per-token activation bound and
  the per-row logits (the same shape bound as ``services/scheduler/bench.py``); a slice
  whose rows all resume feeds one token per row, so its activations are one token's per
  row (the resume envelope the profiler measures on a real worker),

where ``BW'`` and ``F'`` are the datasheet HBM bandwidth and dense fp16 tensor FLOPs
times the achievable fractions below. The budget is ``GPU memory * 0.9 - weights``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.policy.costmodel import ACT_FEATURES, PREFILL_QUADRATIC, CostModel

GIB = 1024**3
#: Share of the GPU's memory an instance may use (``Settings.gpu_memory_utilization``).
MEMORY_UTILIZATION = 0.9
#: Achievable fractions of the datasheet peaks (assumptions, see docs/simulator.md).
BANDWIDTH_EFFICIENCY = 0.75
PREFILL_FLOPS_EFFICIENCY = 0.5
DECODE_FLOPS_EFFICIENCY = 0.5
#: Fixed per-forward-pass overhead (kernel launches, sampling), seconds.
STEP_OVERHEAD_S = 0.003
#: Fixed per-prefill overhead beyond one step's (tokenised batch upload, mask), seconds.
PREFILL_OVERHEAD_S = 0.002
#: Per-row cost of a pass beyond its FLOPs (logits, sampling), seconds.
ROW_OVERHEAD_S = 2e-5


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU (SXM parts)."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    fp16_flops: float  # dense tensor-core peak


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only model served in fp16."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context_limit: int
    dtype_bytes: int = 2

    @property
    def weights_bytes(self) -> int:
        """Bytes of the weights."""
        return int(self.params * self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """``2 * layers * kv_heads * head_dim * dtype_bytes`` (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


GPUS = {
    # NVIDIA A100 80GB SXM datasheet: 2,039 GB/s HBM2e, 312 TFLOPS dense FP16 tensor.
    "a100": GpuSpec("A100-SXM4-80GB", 80 * GIB, 2.039e12, 312e12),
    # NVIDIA H100 SXM5 80GB datasheet: 3.35 TB/s HBM3, 989 TFLOPS dense FP16 tensor.
    "h100": GpuSpec("H100-SXM5-80GB", 80 * GIB, 3.35e12, 989e12),
}
MODELS = {
    # Llama-2 model cards / config.json (Touvron et al. 2023).
    "llama2-7b": ModelSpec("Llama-2-7B", 6.74e9, 32, 4096, 32, 128, 11008, 32000, 4096),
    "llama2-13b": ModelSpec("Llama-2-13B", 13.0e9, 40, 5120, 40, 128, 13824, 32000, 4096),
}


@dataclass(frozen=True)
class Profile:
    """A cost model with the instance facts a simulation needs beside it."""

    name: str
    cost: CostModel
    memory_budget_bytes: int
    context_limit: int
    source: str  # where the numbers come from


def gpu_cost_model(gpu: GpuSpec, model: ModelSpec, slice_length: int = 32) -> CostModel:
    """The analytic GPU-class :class:`CostModel` of ``model`` on ``gpu`` (module docstring)."""
    bandwidth = gpu.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY
    weights_s = model.weights_bytes / bandwidth
    flops_per_token = 2.0 * model.params
    pair_flops = 2.0 * model.layers * model.hidden  # causal: half of QK^T plus AV
    prefill_flops = gpu.fp16_flops * PREFILL_FLOPS_EFFICIENCY
    decode_flops = gpu.fp16_flops * DECODE_FLOPS_EFFICIENCY
    act_per_token = 2 * (6 * model.hidden + 3 * model.intermediate) * model.dtype_bytes
    logits_per_row = 6 * model.vocab * 8  # fp32 logits and sampling buffers
    return CostModel(
        slice_length=slice_length,
        prefill_features=PREFILL_QUADRATIC,  # 1, b, l, bl, bll
        prefill_coef=(STEP_OVERHEAD_S + PREFILL_OVERHEAD_S + weights_s, ROW_OVERHEAD_S, 0.0,
                      flops_per_token / prefill_flops, pair_flops / prefill_flops),
        decode_coef=(STEP_OVERHEAD_S + weights_s,
                     ROW_OVERHEAD_S + flops_per_token / decode_flops,
                     0.0,
                     model.kv_bytes_per_token / bandwidth),
        kv_bytes_per_token=model.kv_bytes_per_token,
        act_features=ACT_FEATURES,
        act_coef=(64.0 * 1024**2, float(logits_per_row), float(act_per_token), 0.0),
        # a slice whose rows all resume feeds one token per row: its activations are one
        # token's per row, whatever the context (the profiler measures this envelope)
        resume_act_coef=(64.0 * 1024**2, float(logits_per_row + act_per_token), 0.0, 0.0),
        mem_margin=1.0,
        resume_margin=1.0,
        model=model.name,
        device=gpu.name,
        dtype="float16",
        source="analytic-gpu",
        meta={"gpu": gpu.name, "weights_bytes": model.weights_bytes},
    )


def gpu_profile(gpu_key: str, model_key: str, slice_length: int = 32) -> Profile:
    """The built-in profile ``<gpu>-<model>``."""
    gpu, model = GPUS[gpu_key], MODELS[model_key]
    budget = int(gpu.memory_bytes * MEMORY_UTILIZATION) - model.weights_bytes
    return Profile(
        name=f"{gpu_key}-{model_key}",
        cost=gpu_cost_model(gpu, model, slice_length),
        memory_budget_bytes=budget,
        context_limit=model.context_limit,
        source=f"analytic: {gpu.name} datasheet, {model.name} shape (docs/simulator.md)",
    )


#: Built-in profile names.
BUILTIN = tuple(f"{g}-{m}" for g in GPUS for m in MODELS)


def load_profile(
    name_or_file: str,
    slice_length: int = 32,
    memory_budget_bytes: int | None = None,
    context_limit: int | None = None,
) -> Profile:
    """A built-in profile by name, or one read from a JSON file.

    The file is what ``scls profile --json`` writes (its ``cost_model`` entry is used) or a
    bare :meth:`CostModel.to_json`. A file carries no memory budget or context limit:
    ``memory_budget_bytes`` and ``context_limit`` then default to 2 GiB and 8,192 (the
    settings' default budget and SmolLM2's window); given, they override built-ins too.

    Raises:
        ValueError: neither a built-in name nor a readable profile file.
    """
    if name_or_file in BUILTIN:
        gpu_key, model_key = name_or_file.split("-", 1)
        prof = gpu_profile(gpu_key, model_key, slice_length)
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise ValueError(f"unknown profile {name_or_file!r}: not a file and not one of "
                             f"{', '.join(BUILTIN)}")
        prof = Profile(path.stem, _read_cost(path), 2 * GIB, 8192, f"file {path}")
    return Profile(
        prof.name, prof.cost,
        prof.memory_budget_bytes if memory_budget_bytes is None else memory_budget_bytes,
        prof.context_limit if context_limit is None else context_limit,
        prof.source,
    )


def _read_cost(path: Path) -> CostModel:
    """The cost model inside a ``scls profile --json`` file or a bare cost-model JSON."""
    try:
        data: Any = json.loads(path.read_text())
        return CostModel.from_dict(data.get("cost_model", data))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a profile JSON ({exc})") from None
