"""Run a whole deployment on this machine: Redis (embedded unless a URL is set), ingest,
scheduler and N workers as child processes. Used by ``scls up``, ``scls demo`` and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from shared.core.embedded_redis import EmbeddedRedis, free_port
from shared.core.keys import Keys
from shared.core.lifeline import tied_to_this_process
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


#: Seconds :meth:`LocalDeployment.stop` gives its children after SIGTERM (a worker finishes
#: its slice, the scheduler hands back its lock) before it SIGKILLs the process group of each
#: one still running.
STOP_GRACE_S = 60.0

#: The stop signals :class:`_StopSignals` handles, and the exception each one raises.
_EXITS: dict[int, Callable[[int], BaseException]] = {
    signal.SIGTERM: lambda signum: SystemExit(128 + signum),
    signal.SIGINT: lambda _signum: KeyboardInterrupt(),
}
_DEFAULT_INT = signal.default_int_handler


class _StopSignals:
    """SIGTERM (and SIGINT, while Python's default handler has it) during a deployment's
    start: the first one raises (``SystemExit(143)``; ``KeyboardInterrupt``) so the start
    stops what it started, later ones are ignored so that clean-up is not cut short.

    Inside :meth:`deferred` the first one is only recorded and raised when the block ends:
    a child is started and registered there, and an exception between its fork and its
    registration would leave it running, unknown to :meth:`LocalDeployment.stop` (its own
    session keeps it out of reach of anything else)."""

    def __init__(self) -> None:
        self._deferring = 0
        self._pending: int | None = None
        self._raised = False

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self._raised or self._pending is not None:
            return
        if self._deferring:
            self._pending = signum
            return
        self._raised = True
        raise _EXITS[signum](signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the stop signals inside the block; the previous handlers are restored
        after. Signal handlers exist in the main thread only: elsewhere, nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pending, self._raised = None, False
        previous: dict[int, Any] = {}
        for signum in _EXITS:
            if signum == signal.SIGINT and signal.getsignal(signum) is not _DEFAULT_INT:
                continue  # someone else owns Ctrl-C (or ignores it)
            previous[signum] = signal.signal(signum, self._handler)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A stop signal inside the block is raised when it ends (at once if none is
        installed: then nothing is recorded)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._pending is not None and not self._raised:
                self._raised = True
                raise _EXITS[self._pending](self._pending)


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """``proc``'s return code (as Popen's: ``-N`` for signal N) once it exited, else None,
    without reaping it: while it is a zombie its process group id cannot be reused, so a
    ``killpg`` still reaches only what it left in its group."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere
        return proc.poll()
    if info is None:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def _end_child(proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait until ``proc`` exits or ``deadline`` passes, SIGKILL its process group (itself if
    still running, and whatever it started and left behind), then reap it."""
    if proc.returncode is None:
        while _exit_status(proc) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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
        self._signals = _StopSignals()

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

        A SIGTERM (or Ctrl-C) meanwhile stops what was started (:meth:`stop`) and exits
        (143; ``KeyboardInterrupt``): the children run in sessions of their own, so nothing
        else would stop them. Then the previous handlers are back.
        """
        with self._signals.installed():
            return self._start(ready_timeout_s)

    def _start(self, ready_timeout_s: float) -> LocalDeployment:
        try:
            self._start_redis()
            updates: dict[str, object] = {}
            if self.redis is not None:
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

    def _start_redis(self) -> None:
        """The embedded Redis, unless a URL is set; known to stop() before it runs."""
        if not self._base.redis_url:
            with self._signals.deferred():
                self.redis = EmbeddedRedis(die_with_parent=True)
                self.redis.start()

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
        # A stop signal between the fork and the registration below would leave the child
        # running unknown to stop(): it waits until the child is in self.children.
        with self._signals.deferred():
            out: IO[bytes] | None = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 closed in stop()
                self._logs.append(out)
            self.children[name] = self._popen(self._command(args), env, out)

    def _command(self, args: list[str]) -> list[str]:
        """The command line of a child: ``scls <args>`` with this interpreter."""
        return [sys.executable, "-m", "services.cli", *args]

    def _popen(self, command: list[str], env: dict[str, str],
               out: IO[bytes] | None) -> subprocess.Popen[bytes]:
        """Start one child process (its output to ``out``, else to ours). It gets SIGTERM
        when this process dies, however it dies (a SIGKILL runs no :meth:`stop`)."""
        return subprocess.Popen(
            tied_to_this_process(command), env=env, stdout=out,
            stderr=subprocess.STDOUT if out else None,
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
        """Raise if a child process has exited (left unreaped: stop() ends its group)."""
        for name, proc in self.children.items():
            if _exit_status(proc) is not None:
                where = f" (log: {self.log_dir / (name + '.log')})" if self.log_dir else ""
                raise RuntimeError(f"{name} exited with code {_exit_status(proc)}{where}")

    def stop(self, timeout_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every child (workers finish their slice) and wait; after ``timeout_s``
        SIGKILL the process group of each one still running. Every child's group is
        SIGKILLed once it exited too (nothing it started outlives it), and every child is
        reaped before Redis stops: none is left running when this returns."""
        with self._signals.deferred():  # a stop signal meanwhile must not cut it short
            procs = list(self.children.values())
            for proc in procs:
                if proc.returncode is None:  # not poll(): an exited child stays unreaped
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for proc in procs:
                _end_child(proc, deadline)
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
