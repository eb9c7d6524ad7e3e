"""The processes a chaos run breaks: a redis-server with an append-only file, the ingest, two
schedulers and N workers, each ``scls <service>`` in a process group of its own.

It builds on :class:`services.launcher.LocalDeployment` (same child environment, spawning and
readiness wait) and adds what ``scls up`` never does: a Redis that survives ``kill -9``
(AOF with ``appendfsync always`` in a directory kept across restarts, same port), a standby
scheduler, and per-process kill / restart. Everything it starts is killed at exit, also on
Ctrl-C or an exception (``atexit`` and :meth:`ChaosDeployment.stop`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from services.launcher import LocalDeployment
from shared.core.connection import probe_client, sync_client
from shared.core.embedded_redis import free_port, redis_server_binary
from shared.core.keys import Keys
from shared.core.store import Store
from shared.obs.logging import get_logger
from shared.settings import Settings

log = get_logger(__name__)


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group ``proc`` leads (each child has its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class AofRedis:
    """A redis-server that persists every write to an append-only file and can be killed,
    frozen and restarted on the same port and file."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """redis:// URL of the server (the same across restarts)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start (or restart) the server on its port and AOF; wait until it answers PING
        (after loading the AOF)."""
        log_file = open(self.dir / "redis.log", "ab")  # noqa: SIM115 the child keeps it
        self.proc = subprocess.Popen(
            [
                str(redis_server_binary()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                # always: an accepted request is on disk before the client hears of it, so a
                # kill -9 can lose nothing that was acknowledged
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
                "--loglevel",
                "notice",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self.starts += 1
        if not self.wait_ping(timeout_s):
            raise RuntimeError(
                f"redis-server did not answer on port {self.port} (log: {self.dir / 'redis.log'})"
            )

    def wait_ping(self, timeout_s: float) -> bool:
        """True once the server answers PING (not while it loads its AOF)."""
        client = probe_client(self.url, timeout_s=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return True
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGKILL, SIGSTOP, SIGCONT) to the server."""
        if self.proc is not None:
            kill_group(self.proc, sig)
            if sig == signal.SIGKILL:
                self.proc.wait()

    def stop(self) -> None:
        """Kill the server (thawing it first: a stopped process ignores SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, signal.SIGCONT)
            kill_group(self.proc, signal.SIGKILL)
            self.proc.wait()


class ChaosDeployment(LocalDeployment):
    """Redis (AOF), ingest, ``schedulers`` schedulers and ``settings.workers`` workers."""

    def __init__(
        self, settings: Settings, workdir: Path | None = None, schedulers: int = 2
    ) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="scls-chaos-"))
        super().__init__(settings, log_dir=self.workdir / "logs")
        self.aof = AofRedis(self.workdir)
        self.schedulers = schedulers
        self.next_worker = settings.workers  # the id of the next new worker (w3, w4, ...)
        self.restarts: dict[str, int] = {}  # restarts by the supervisor, per child
        atexit.register(self.kill_all)

    def start(self, ready_timeout_s: float = 600.0) -> ChaosDeployment:
        """Start everything; wait until the ingest answers and every worker registered."""
        self.aof.start()
        self.settings = self._base.model_copy(
            update={"redis_url": self.aof.url, "port": free_port(), "metrics_port": 0}
        )
        from transformers.utils import logging as hf_logging

        from shared.modeling.registry import ensure_cached

        hf_logging.disable_progress_bar()
        ensure_cached(self.settings.model, self.settings.cache_dir)
        try:
            self._spawn("ingest", ["ingest"])
            for i in range(self.schedulers):
                self._spawn(f"scheduler-{i}", ["scheduler"])
            for i in range(self.settings.workers):
                self.spawn_worker(f"w{i}")
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.kill_all()
            raise
        return self

    def spawn_worker(self, instance_id: str) -> None:
        """Start ``scls worker --instance-id <id>`` (its child name is the id)."""
        self._spawn(instance_id, ["worker", "--instance-id", instance_id])

    def args_of(self, name: str) -> list[str]:
        """The ``scls`` arguments a child was started with."""
        if name == "ingest":
            return ["ingest"]
        if name.startswith("scheduler"):
            return ["scheduler"]
        return ["worker", "--instance-id", name]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a child's process group; for SIGKILL, reap it and forget it (so
        :meth:`supervise` does not restart it: the fault decides how it comes back)."""
        proc = self.children[name]
        kill_group(proc, sig)
        if sig == signal.SIGKILL:
            proc.wait()
            del self.children[name]

    def restart(self, name: str) -> None:
        """Start a child again with its arguments (the same instance id for a worker)."""
        self._spawn(name, self.args_of(name))

    def supervise(self) -> list[str]:
        """Restart every child that exited (what a container's restart policy does), and
        say which: a chaos run reports them, since a service should survive its faults."""
        restarted = []
        for name, proc in list(self.children.items()):
            if proc.poll() is not None:
                log.warning("chaos_child_exited", child=name, code=proc.returncode)
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.restart(name)
                restarted.append(name)
        return restarted

    def store(self) -> Store:
        """A new store client on the deployment's Redis (the caller closes it)."""
        # short timeouts: a frozen Redis must not hang the harness that froze it
        client = sync_client(
            self.aof.url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=1.0
        )
        return Store(client, Keys(self.settings.key_prefix))

    def scheduler_of(self, holder: str) -> str | None:
        """The child name of the scheduler whose holder id (``<host>-<pid>``) is given."""
        for name, proc in self.children.items():
            if name.startswith("scheduler") and holder.endswith(f"-{proc.pid}"):
                return name
        return None

    def worker_names(self) -> list[str]:
        """Names of the worker children."""
        return [n for n in self.children if n != "ingest" and not n.startswith("scheduler")]

    def log_paths(self) -> list[Path]:
        """Every log file of the run (children and Redis)."""
        logs = sorted(self.log_dir.glob("*.log")) if self.log_dir else []
        return [*logs, self.aof.dir / "redis.log"]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every child and wait (workers finish their slice), then kill what is left
        and Redis."""
        self.aof.signal(signal.SIGCONT)  # a frozen Redis would keep the children waiting
        self.redis = None
        try:
            super().stop(timeout_s)
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        """Kill every process group this deployment started (idempotent; for atexit)."""
        for proc in list(self.children.values()):
            kill_group(proc, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.aof.stop()

    def remove_files(self) -> None:
        """Delete the run's directory (AOF and logs)."""
        shutil.rmtree(self.workdir, ignore_errors=True)
