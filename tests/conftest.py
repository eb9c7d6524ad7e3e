"""Shared fixtures: one real Redis per test session (embedded unless SCLS_TEST_REDIS_URL),
flushed before every test, and one tiny model per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from shared.core.embedded_redis import EmbeddedRedis
from shared.core.keys import Keys
from shared.core.store import Store, connect
from shared.modeling.loading import LoadedModel, load_model
from shared.settings import Settings


@pytest.fixture()
def anyio_backend() -> str:
    """Async tests run on asyncio (the services' own loop), not also on trio."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server for the whole session."""
    url = os.environ.get("SCLS_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture()
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a freshly flushed database."""
    client = connect(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture()
def settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for tests: tiny model, the test Redis, short timers."""
    return Settings(
        redis_url=redis_url,
        model="tiny-random",
        cache_dir=tmp_path_factory.getbasetemp() / "scls-cache",
        slice_length=4,
        max_gen_length=64,
        max_batch_size=8,
        cycle_interval_s=0.02,
        heartbeat_interval_s=0.5,
        instance_ttl_s=3.0,
        torch_threads=1,
        profile_mode="analytic",  # measured profiles: tests/test_profiler.py
        log_format="console",
        # Most tests play the scheduler and worker through the store, with neither running:
        # tests/test_readiness.py covers refusing requests while the deployment is unready.
        reject_when_unready=False,
    )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """One tiny-random model for the whole session (imports dominate test time)."""
    torch.set_num_threads(1)
    return load_model("tiny-random", tmp_path_factory.mktemp("models"), device="cpu")


# Not a tmp dir: converting the GGUF file takes about 20 s, so the cache is kept across runs.
SMOLLM2_CACHE = Path.home() / ".cache" / "scls-test-models"


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M (float32 on CPU), converted into the shared test cache on first use."""
    torch.set_num_threads(2)
    return load_model("smollm2-135m", SMOLLM2_CACHE, device="cpu")


@pytest.fixture()
def store(rclient: redis.Redis, settings: Settings) -> Store:
    """A Store over the flushed test database."""
    return Store(rclient, Keys(settings.key_prefix))
