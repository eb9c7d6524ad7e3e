"""Run a whole deployment on this machine: Redis (embedded unless a URL is set), ingest,
scheduler and N workers as child processes. Used by ``scls up``, ``scls demo`` and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

from shared.core.embedded_redis import EmbeddedRedis, free_port
from shared.core.keys import Keys
from shared.core.store import Store, connect
from shared.modeling.registry import ensure_cached
from shared.obs.logging import get_logger
from shared.settings import Settings

log = get_logger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``SCLS_*`` environment variables, for child processes."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[f"SCLS_{name.upper()}"] = str(value)
    return env


def default_threads(workers: int) -> int:
    """CPU threads per worker so that the workers together use every core once."""
    return max(1, (os.cpu_count() or 1) // workers)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Inside the block, the first SIGTERM raises ``SystemExit(143)`` (later ones are
    ignored, so the clean-up it triggers is not cut short); the handler before it is
    restored after. Signal handlers exist in the main thread only: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class LocalDeployment:
    """Start and stop every service locally; use as a context manager."""

    def __init__(self, settings: Settings, log_dir: Path | None = None) -> None:
        self._base = settings
        self.log_dir = log_dir
        self.redis: EmbeddedRedis | None = None
        self.settings: Settings = settings
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        #: Prometheus port of each child that has one ("scheduler", "worker-0", ...); the
        #: ingest serves its metrics at ``{url}/metrics``. Empty when metrics_port is 0.
        self.metrics_ports: dict[str, int] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        """Base URL of the ingest service."""
        return f"http://{self.settings.host}:{self.settings.port}"

    def metrics_url(self, name: str) -> str:
        """Prometheus URL of a child: ``ingest``, ``scheduler`` or ``worker-<i>``."""
        if name == "ingest":
            return f"{self.url}/metrics"
        return f"http://{self.settings.host}:{self.metrics_ports[name]}/metrics"

    def start(self, ready_timeout_s: float = 600.0) -> LocalDeployment:
        """Start everything and wait until ingest answers and every worker registered.

        A SIGTERM meanwhile stops what was started and exits (143): the children run in
        sessions of their own, so nothing else would stop them.
        """
        with _sigterm_exits():
            return self._start(ready_timeout_s)

    def _start(self, ready_timeout_s: float) -> LocalDeployment:
        updates: dict[str, object] = {}
        if not self._base.redis_url:
            self.redis = EmbeddedRedis().start()
            updates["redis_url"] = self.redis.url
        if self._base.port == 0:
            updates["port"] = free_port()
        if self._base.torch_threads is None:
            updates["torch_threads"] = default_threads(self._base.workers)
        self.settings = self._base.model_copy(update=updates)
        # Convert the model once here, not in N children at once (quietly: no tqdm bars).
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        ensure_cached(self.settings.model, self.settings.cache_dir)
        try:
            self._spawn("ingest", ["ingest"])
            self._spawn("scheduler", ["scheduler"], self._metrics_env("scheduler"))
            for i in range(self.settings.workers):
                name = f"worker-{i}"
                self._spawn(name, ["worker", "--instance-id", f"w{i}"], self._metrics_env(name))
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _metrics_env(self, name: str) -> dict[str, str]:
        """A metrics port of its own for one child (all of them share this machine), bound
        to the ingest's address (loopback by default) rather than every interface."""
        if not self._base.metrics_port:
            return {"SCLS_METRICS_PORT": "0"}
        self.metrics_ports[name] = free_port()
        return {"SCLS_METRICS_PORT": str(self.metrics_ports[name]),
                "SCLS_METRICS_HOST": self.settings.host}

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **settings_env(self.settings), **(extra_env or {})}
        out: IO[bytes] | int | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 closed in stop()
            self._logs.append(handle)
            out = handle
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
            # Own session and process group: a terminal's Ctrl-C (SIGINT to the foreground
            # group) reaches only `scls up`, whose stop() then drains the workers with
            # SIGTERM and stops Redis last; otherwise every child died at once, mid-drain.
            start_new_session=True,
        )

    def _wait_ready(self, timeout_s: float) -> None:
        store = Store(connect(self.settings.redis_url or ""), Keys(self.settings.key_prefix))
        deadline = time.monotonic() + timeout_s
        ingest_ok = False
        while time.monotonic() < deadline:
            self.check_children()
            if not ingest_ok:
                try:
                    ingest_ok = httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    ingest_ok = False
            if ingest_ok and len(store.live_instances()) >= self.settings.workers:
                store.close()
                return
            time.sleep(0.2)
        raise TimeoutError(f"deployment not ready after {timeout_s:.0f}s (see logs)")

    def check_children(self) -> None:
        """Raise if a child process has exited."""
        for name, proc in self.children.items():
            if proc.poll() is not None:
                where = f" (log: {self.log_dir / (name + '.log')})" if self.log_dir else ""
                raise RuntimeError(f"{name} exited with code {proc.returncode}{where}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM every child (workers finish their slice), wait, then stop Redis."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.children.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()
        self.metrics_ports.clear()
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
