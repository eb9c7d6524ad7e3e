"""The running ingest loads neither torch nor transformers (issue 14).

A fresh interpreter builds the ingest app (``create_app`` with the test settings and the
test Redis), runs its lifespan and serves a few requests, then reports ``sys.modules``:
for tiny-random, for a local model directory (config.json, safetensors weights,
tokenizer.json with a chat template), whose codec and facts come from its files, and for the
built-in SmolLM2 from its cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from shared.modeling.loading import LoadedModel
from shared.modeling.registry import SMOLLM2
from shared.settings import Settings
from tests.conftest import SMOLLM2_CACHE

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, json, sys
import httpx
from services.ingest.app import create_app
from shared.settings import Settings

async def main() -> dict:
    app = create_app(Settings.model_validate_json(sys.argv[1]))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://ingest") as http:
        tokens = (await http.post("/tokenize", json={"prompt": "hello world"})).json()
        chat = (await http.post("/tokenize", json={"messages": [
            {"role": "user", "content": "hello"}]})).json()
        text = (await http.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
        health = (await http.get("/health")).status_code
    return {"tokens": tokens, "chat": chat, "text": text, "health": health,
            "loaded": sorted({m.split(".")[0] for m in sys.modules})}

print(json.dumps(asyncio.run(main())))
"""


def run_ingest(settings: Settings) -> dict:
    """What the fresh interpreter's ingest answered and which packages it had loaded."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, settings.model_dump_json()],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama directory as Hugging Face saves one, with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("local-model")
    words = ["<unk>", "</s>", "hello", "world", "user", ":", "assistant"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} "
                "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
         "unk_token": "<unk>", "chat_template": template}))
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_the_ingest_loads_no_torch_for_tiny_random(settings: Settings) -> None:
    seen = run_ingest(settings)
    assert seen["tokens"]["count"] == len("hello world") and seen["health"] == 503
    assert seen["text"] == {"prompt": "hello world"}
    assert not {"torch", "transformers"} & set(seen["loaded"])


def test_the_ingest_loads_no_torch_for_a_local_model(
    settings: Settings, local_model: Path
) -> None:
    seen = run_ingest(settings.model_copy(update={"model": str(local_model)}))
    assert seen["tokens"] == {"count": 2, "max_model_len": 256, "tokens": [2, 3]}
    assert seen["chat"]["tokens"] == [4, 5, 2, 1, 6, 5]  # the template rendered, </s> = 1
    assert seen["text"] == {"prompt": "hello world"}
    assert "tokenizers" in seen["loaded"]  # the codec is real, not a stand-in
    assert not {"torch", "transformers"} & set(seen["loaded"])


def test_the_ingest_loads_no_torch_for_smollm2(settings: Settings, smollm2: LoadedModel) -> None:
    """The built-in SmolLM2 from its cache (what the image and `scls up` prepare): the same
    ids as the worker's codec, facts equal to the loaded model's, and no torch."""
    seen = run_ingest(settings.model_copy(update={"model": SMOLLM2, "cache_dir": SMOLLM2_CACHE}))
    assert seen["tokens"]["tokens"] == smollm2.codec.encode("hello world")
    assert seen["tokens"]["max_model_len"] == smollm2.info.context_limit
    hello = [{"role": "user", "content": "hello"}]
    assert seen["chat"]["tokens"] == smollm2.codec.encode_chat(hello)
    assert not {"torch", "transformers"} & set(seen["loaded"])
