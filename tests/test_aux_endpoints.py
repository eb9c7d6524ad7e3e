"""vLLM's auxiliary endpoints (issue 16): /v1/models/{id}, /tokenize, /detokenize, /version,
against the real app (real Redis, the real tiny-random codec)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import redis

from services.ingest.app import create_app
from shared.core.store import Store
from shared.modeling.registry import load_codec, model_info
from shared.settings import Settings
from tests.helpers import serve
from tests.test_ingest import assert_error

pytestmark = pytest.mark.anyio

CODEC = load_codec("tiny-random", Path("/nonexistent"))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße 🙂"}]


@pytest.fixture()
async def client(settings: Settings, rclient: redis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as http:
        yield http


@asynccontextmanager
async def serve_as(settings: Settings, name: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app serving tiny-random under the model id ``name``."""
    info = dataclasses.replace(model_info("tiny-random", settings.cache_dir, "cpu"), name=name)
    app = create_app(settings, info=info)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://ingest"
    ) as http:
        yield http


async def test_version_is_the_package_version(client: httpx.AsyncClient) -> None:
    resp = await client.get("/version")
    assert resp.status_code == 200
    assert resp.json() == {"version": metadata.version("scls")}


async def test_model_by_id(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/models/tiny-random")
    assert resp.status_code == 200
    card = resp.json()
    assert card["id"] == "tiny-random" and card["object"] == "model"
    assert card["max_model_len"] == 4096 and card["owned_by"] == "scls"
    assert card == (await client.get("/v1/models")).json()["data"][0]
    resp = await client.get("/v1/models/gpt-4")
    assert_error(resp, 404, "the model 'gpt-4' does not exist", "tiny-random")
    assert resp.json()["error"]["code"] == "model_not_found"


async def test_model_ids_may_hold_slashes(settings: Settings, rclient: redis.Redis) -> None:
    async with serve_as(settings, "org/tiny-model") as http:
        resp = await http.get("/v1/models/org/tiny-model")
        assert resp.status_code == 200, resp.text
        assert resp.json()["id"] == "org/tiny-model"
        assert_error(await http.get("/v1/models/org/other"), 404, "'org/other' does not exist")


async def test_tokenize_a_prompt(client: httpx.AsyncClient) -> None:
    resp = await client.post("/tokenize", json={"prompt": "Grüße, world", "model": "tiny-random",
                                                 "add_special_tokens": True})
    assert resp.status_code == 200, resp.text
    ids = CODEC.encode("Grüße, world")
    assert resp.json() == {"count": len(ids), "max_model_len": 4096, "tokens": ids}


async def test_tokenized_chat_counts_what_a_chat_completion_stores(
    settings: Settings, store: Store
) -> None:
    """The count of /tokenize with messages is the prompt_tokens of the chat completion."""
    async with serve(settings.model_copy(update={"request_timeout_s": 0.3})) as http:
        resp = await http.post("/tokenize", json={"messages": CHAT})
        assert resp.status_code == 200, resp.text
        assert resp.json()["tokens"] == CODEC.encode_chat(CHAT)
        plain = await http.post("/tokenize", json={"messages": CHAT,
                                                    "add_generation_prompt": False})
        assert plain.json()["tokens"] == CODEC.encode_chat(CHAT, add_generation_prompt=False)
        assert plain.json()["count"] < resp.json()["count"]
        done = await http.post("/v1/chat/completions", json={"messages": CHAT})
        assert done.status_code == 504  # accepted; no worker runs here
    record = store.get_request(store.pending_ids(1)[0])
    assert record is not None and record.prompt_ids == resp.json()["tokens"]


@pytest.mark.parametrize(("body", "status", "fragment", "param"), [
    ({}, 400, "prompt: Field required", "prompt"),
    ({"prompt": 42}, 400, "prompt: Input should be a valid string", "prompt"),
    ({"prompt": "hi", "temperature": 1}, 400, "temperature: Extra inputs", "temperature"),
    ({"messages": []}, 400, "messages: List should have at least 1 item", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' is not served here", "model"),
])
async def test_tokenize_bad_input(
    client: httpx.AsyncClient, body: dict, status: int, fragment: str, param: str | None
) -> None:
    resp = await client.post("/tokenize", json=body)
    if param is None:
        assert_error(resp, status, fragment)
    else:
        assert_error(resp, status, fragment, param=param)


async def test_detokenize(client: httpx.AsyncClient) -> None:
    text = "Grüße 🙂"
    resp = await client.post("/detokenize", json={"tokens": [1, *CODEC.encode(text), 2]})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"prompt": text}  # special tokens skipped, as in completions
    assert_error(await client.post("/detokenize", json={"tokens": [5, 512]}), 400,
                 "token id 512 is outside the vocabulary (0..511)", param="tokens")
    assert_error(await client.post("/detokenize", json={"tokens": [-1]}), 400,
                 "token id -1", param="tokens")
    assert_error(await client.post("/detokenize", json={"tokens": "abc"}), 400,
                 "tokens: Input should be a valid list", param="tokens")


async def test_api_key_guards_all_but_health_and_version(
    settings: Settings, rclient: redis.Redis
) -> None:
    async with serve(settings.model_copy(update={"api_key": "sesame"})) as http:
        for method, path, body in (("POST", "/tokenize", {"prompt": "hi"}),
                                   ("POST", "/detokenize", {"tokens": [5]}),
                                   ("GET", "/v1/models/tiny-random", None)):
            resp = await http.request(method, path, json=body)
            assert_error(resp, 401, "missing or invalid API key")
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            ok = await http.request(method, path, json=body,
                                    headers={"Authorization": "Bearer sesame"})
            assert ok.status_code == 200, (path, ok.text)
        assert (await http.get("/version")).status_code == 200
        assert (await http.get("/health")).status_code == 503  # open: not ready, not 401


def _refs(node: object) -> list[str]:
    """Every ``$ref`` in a JSON document."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_lists_the_request_bodies(client: httpx.AsyncClient) -> None:
    """The endpoints read their bodies by hand; /openapi.json still says what they take
    (schema-driven clients and fuzzers send real bodies), and every $ref resolves."""
    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, names in (("/v1/completions", ["CompletionRequest"]),
                        ("/v1/chat/completions", ["ChatCompletionRequest"]),
                        ("/tokenize", ["TokenizePrompt", "TokenizeChat"]),
                        ("/detokenize", ["DetokenizeRequest"])):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        refs = [body["schema"]] if "$ref" in body["schema"] else body["schema"]["oneOf"]
        assert [r["$ref"].rsplit("/", 1)[-1] for r in refs] == names, path
    assert {"prompt", "max_tokens", "logprobs"} <= set(schemas["CompletionRequest"]["properties"])
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    missing = {r for r in _refs(doc) if r.rsplit("/", 1)[-1] not in schemas}
    assert not missing
