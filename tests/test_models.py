"""Model registry and loading (shared/modeling): codecs, facts, the smollm2 cache, SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import shared.modeling.registry as models
from services.worker.engine import SliceEngine, SliceInput
from shared.core.records import RequestParams
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel, load_model
from shared.modeling.registry import (
    MODEL_NAMES,
    ByteCodec,
    load_codec,
    model_info,
    resolve_model_name,
)

# Not a tmp dir: converting the GGUF file takes about 20 s, so the cache is kept across runs.
SMOLLM2_CACHE = Path.home() / ".cache" / "scls-test-models"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# tiny-random
# ------------------------------------------------------------------------------------------


def test_byte_codec_round_trips_text() -> None:
    codec = ByteCodec()
    text = "Grüße, 東京! naïve café 🙂 \n\t end"
    ids = codec.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i <= 258 for i in ids)
    assert codec.decode(ids) == text
    assert codec.encode("A") == [ord("A") + 3]


def test_byte_codec_skips_special_ids_and_repairs_bytes() -> None:
    codec = ByteCodec()
    assert codec.decode([0, 1, ord("h") + 3, 2, 300, 511, ord("i") + 3]) == "hi"
    euro = codec.encode("€")  # three bytes: a cut-off prefix decodes to a replacement char
    assert codec.decode(euro[:2]) == "\ufffd"
    assert (codec.pad_id, codec.eos_ids) == (0, frozenset({2}))


def test_byte_codec_chat_format() -> None:
    codec = ByteCodec()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = codec.encode_chat(messages)
    assert codec.decode(ids) == "system: Be brief.\nuser: Hi\nassistant: "


def test_tiny_model_info(tmp_path: Path) -> None:
    info = model_info("tiny-random", tmp_path, device="cpu")
    assert info.name == "tiny-random"
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 heads x 16, fp32
    assert (info.context_limit, info.vocab_size) == (4096, 512)
    loaded = load_model("tiny-random", tmp_path, device="cpu")
    assert loaded.info == info  # config-only facts agree with the loaded weights
    assert info.weights_bytes == sum(p.numel() * 4 for p in loaded.model.parameters())
    assert isinstance(load_codec("tiny-random", tmp_path), ByteCodec)


def test_tiny_weights_identical_across_processes(tmp_path: Path) -> None:
    script = (
        "import torch; from pathlib import Path; from shared.modeling.loading import load_model;"
        "m = load_model('tiny-random', Path('.'), device='cpu').model;"
        "x = torch.tensor([[5, 6, 7, 8]]);"
        "print(repr(m(x).logits[0, -1, :8].tolist()))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    here = load_model("tiny-random", tmp_path, device="cpu").model
    with torch.inference_mode():
        logits = here(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :8].tolist()
    assert done.stdout.strip() == repr(logits)


def test_tiny_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    load_model("tiny-random", tmp_path, device="cpu")
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------


def test_resolve_model_name(tmp_path: Path) -> None:
    for name in MODEL_NAMES:
        assert resolve_model_name(name) == name
    assert resolve_model_name(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ValueError) as err:
        resolve_model_name("gpt-17")
    message = str(err.value)
    assert "gpt-17" in message
    assert all(name in message for name in MODEL_NAMES)
    assert "directory" in message
    with pytest.raises(ValueError):
        resolve_model_name(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------
# The smollm2 cache (locking logic, with a stand-in converter: the real one is below)
# ------------------------------------------------------------------------------------------


def test_concurrent_ensure_cached_converts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_convert(target: Path) -> None:
        calls.append(target)
        threading.Event().wait(0.3)  # long enough for the other thread to queue on the lock
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    threads = [
        threading.Thread(target=models.ensure_cached, args=("smollm2-135m", tmp_path))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (tmp_path / "smollm2-135m" / "config.json").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".smollm2-135m.tmp")]
    assert leftovers == []


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_convert(target: Path) -> None:
        (target / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_smollm2", broken_convert)
    with pytest.raises(OSError, match="disk full"):
        models.ensure_cached("smollm2-135m", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m.lock"]


def test_ensure_cached_is_a_no_op_for_tiny(tmp_path: Path) -> None:
    models.ensure_cached("tiny-random", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# SmolLM2-135M, for real
# ------------------------------------------------------------------------------------------


def test_smollm2_facts(smollm2: LoadedModel) -> None:
    info = smollm2.info
    assert info.name == "smollm2-135m"
    assert info.kv_bytes_per_token == 46080
    assert info.context_limit == 8192
    assert info.vocab_size == 49152
    assert 500 * 2**20 < info.weights_bytes < 530 * 2**20  # 134.5 M fp32 parameters
    assert smollm2.codec.pad_id == 2
    assert 2 in smollm2.codec.eos_ids
    assert model_info("smollm2-135m", SMOLLM2_CACHE, device="cpu") == info


def test_smollm2_answers_paris(smollm2: LoadedModel) -> None:
    codec = smollm2.codec
    prompt = codec.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    engine = SliceEngine(smollm2)
    row = SliceInput("paris", prompt, [], RequestParams(max_tokens=20))
    outputs, stats = engine.run_slice([row], slice_len=20)
    answer = codec.decode(outputs[0].new_ids)
    assert "Paris" in answer
    assert outputs[0].finish_reason is FinishReason.STOP  # it ends its answer with <|im_end|>
    assert stats.steps < 20


def test_smollm2_codec(smollm2: LoadedModel) -> None:
    codec = load_codec("smollm2-135m", SMOLLM2_CACHE)
    text = "Hello, world! Grüße 🙂"
    assert codec.decode(codec.encode(text)) == text
    assert codec.encode(text) == smollm2.codec.encode(text)
    assert codec.pad_id == 2 and 2 in codec.eos_ids
    chat = codec.decode(codec.encode_chat([{"role": "user", "content": "Hi"}]))
    assert chat.rstrip().endswith("assistant")  # generation prompt, special tokens skipped


def test_smollm2_second_load_reads_the_cache(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = SMOLLM2_CACHE / "smollm2-135m"
    assert (cached / "model.safetensors").is_file()
    assert (cached / "config.json").is_file()
    assert (cached / "tokenizer.json").is_file()

    def must_not_convert(target: Path) -> None:
        raise AssertionError("the cache exists: no conversion expected")

    monkeypatch.setattr(models, "_convert_smollm2", must_not_convert)
    again = load_model("smollm2-135m", SMOLLM2_CACHE, device="cpu")
    assert again.info == smollm2.info
    first = dict(smollm2.model.named_parameters())
    for name, param in again.model.named_parameters():
        assert torch.equal(param, first[name]), name
    # A local model directory loads the same model by path.
    by_path = model_info(str(cached), Path("/nonexistent"), device="cpu")
    assert by_path.kv_bytes_per_token == 46080
    assert by_path.name == str(cached.resolve())


def test_smollm2_codec_and_info_without_cache(smollm2: LoadedModel, tmp_path: Path) -> None:
    # Before the cache exists, the tokenizer and config come from the GGUF file, and
    # nothing is converted or written.
    codec = load_codec("smollm2-135m", tmp_path)
    messages = [{"role": "user", "content": "Grüße! What is 2+2?"}]
    assert codec.encode_chat(messages) == smollm2.codec.encode_chat(messages)
    assert (codec.pad_id, codec.eos_ids) == (smollm2.codec.pad_id, smollm2.codec.eos_ids)
    assert model_info("smollm2-135m", tmp_path, device="cpu") == smollm2.info
    assert list(tmp_path.iterdir()) == []
