"""LocalDeployment's children (``scls up``, ``scls demo``): whatever ends the launcher, no child
it started, nor anything left in a child's process group, is still running. Shell scripts
stand in for the services (their command is the one thing replaced); the rest is real: the
test Redis, the model cache, signals delivered to this process, real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from services.launcher import LocalDeployment
from shared.settings import Settings
from tests.helpers import wait_for


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class ShellDeployment(LocalDeployment):
    """Every child runs ``sh -c <script>`` instead of ``scls <service>``; with
    ``signal_on_spawn``, that signal reaches this process right after each child is forked,
    before the launcher has registered it (the moment a SIGTERM to ``scls up`` hit once)."""

    def __init__(self, settings: Settings, script: str, signal_on_spawn: int | None = None):
        super().__init__(settings)
        self.script = script
        self.signal_on_spawn = signal_on_spawn
        self.started: list[subprocess.Popen[bytes]] = []

    def _command(self, args: list[str]) -> list[str]:
        return ["sh", "-c", self.script]

    def _popen(self, command: list[str], env: dict[str, str],
               out: IO[bytes] | None) -> subprocess.Popen[bytes]:
        proc = super()._popen(command, env, out)
        self.started.append(proc)
        if self.signal_on_spawn is not None:
            signal.raise_signal(self.signal_on_spawn)  # its Python handler runs right here
        return proc


def assert_all_ended(procs: list[subprocess.Popen[bytes]]) -> None:
    """Each process was reaped and nothing is left in its process group."""
    for proc in procs:
        assert proc.returncode is not None, f"{proc.pid} not reaped"
        assert not running(proc.pid), f"{proc.pid} left running"
        # the rest of a group is SIGKILLed (runs no more code), not ours to reap: moments
        wait_for(f"group {proc.pid} empty", lambda p=proc: not group_members(p.pid), 5)


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler, as in a terminal: a job started in the background (CI
    scripts, `make test &`) inherits SIGINT ignored, and the launcher leaves an ignored or
    foreign SIGINT alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGTERM, SystemExit),
                                                 (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_signal_while_a_child_is_being_spawned_stops_that_child(
    settings: Settings, signum: int, raised: type[BaseException], default_sigint: None
) -> None:
    """The signal lands between the child's fork and its registration: it is held until
    the child is registered, then start() stops it and raises as for any other moment."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    deployment = ShellDeployment(settings, "exec sleep 60", signal_on_spawn=signum)
    try:
        with pytest.raises(raised) as exc:
            deployment.start(ready_timeout_s=30)
        if raised is SystemExit:
            assert exc.value.code == 128 + signal.SIGTERM
        assert len(deployment.started) == 1  # nothing started after the signal
        assert deployment.children == {}
        assert_all_ended(deployment.started)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    finally:
        for proc in deployment.started:  # do not leak them into other tests
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_sigterm_while_start_waits_for_readiness_stops_every_child(settings: Settings) -> None:
    """Ingest, scheduler and two workers started, none ready: a SIGTERM stops all four."""
    deployment = ShellDeployment(settings.model_copy(update={"workers": 2, "port": 0}),
                                 "exec sleep 60")

    def terminate_when_started() -> None:
        wait_for("four children", lambda: len(deployment.started) == 4)
        time.sleep(0.3)  # into the readiness wait
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_when_started, daemon=True)
    sender.start()
    try:
        with pytest.raises(SystemExit) as exc:
            deployment.start(ready_timeout_s=60)
        assert exc.value.code == 128 + signal.SIGTERM
        assert_all_ended(deployment.started)
    finally:
        sender.join(timeout=30)
        for proc in deployment.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_stop_sigkills_a_child_that_ignores_sigterm_after_the_grace(
    settings: Settings, tmp_path: Path
) -> None:
    """A child that ignores SIGTERM (here with its own child, which does too) is SIGKILLed,
    group and all, once the grace is over; stop() returns only after reaping it."""
    ready = tmp_path / "ready"
    deployment = ShellDeployment(
        settings, f"trap '' TERM; sleep 60 & touch {ready}; wait"
    )
    deployment._spawn("stubborn", [])
    proc = deployment.started[0]
    try:
        wait_for("the trap set and the grandchild started", ready.exists)
        begin = time.monotonic()
        deployment.stop(timeout_s=1.0)
        took = time.monotonic() - begin
        assert 1.0 <= took < 10, took
        assert proc.returncode == -signal.SIGKILL
        assert_all_ended([proc])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def spawn_leaving_a_grandchild(
    settings: Settings, tmp_path: Path, name: str, then: str
) -> tuple[ShellDeployment, subprocess.Popen[bytes], int]:
    """A deployment with one child that starts ``sleep 60`` in its process group, then runs
    ``then``; returns the deployment, the child and the grandchild's pid."""
    pidfile = tmp_path / "grandchild.pid"
    deployment = ShellDeployment(settings, f"sleep 60 & echo $! > {pidfile}; {then}")
    deployment._spawn(name, [])
    wait_for("the grandchild's pid", lambda: pidfile.exists() and pidfile.read_text().strip())
    return deployment, deployment.started[0], int(pidfile.read_text())


def test_stop_sigkills_what_a_child_left_in_its_process_group(
    settings: Settings, tmp_path: Path
) -> None:
    """A child that exits on SIGTERM but leaves a process of its own behind (only the child
    gets the SIGTERM: a worker's drain must not be cut short by its helpers dying first):
    stop() SIGKILLs the rest of the group without waiting out the grace."""
    deployment, proc, grandchild = spawn_leaving_a_grandchild(
        settings, tmp_path, "leaky", "exec sleep 60")
    try:
        assert running(grandchild) and grandchild in group_members(proc.pid)
        begin = time.monotonic()
        deployment.stop(timeout_s=30)
        assert time.monotonic() - begin < 10
        assert proc.returncode == -signal.SIGTERM
        # SIGKILLed (it runs no more code), not ours to reap: it dies within moments
        wait_for("the grandchild gone", lambda: not running(grandchild), timeout_s=5)
        assert_all_ended([proc])
    finally:
        if running(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_a_child_that_died_is_reported_and_stop_ends_what_it_left(
    settings: Settings, tmp_path: Path
) -> None:
    """check_children() reports a child that exited (as during the readiness wait) without
    reaping it, so stop() still SIGKILLs the process it left in its group."""
    deployment, proc, grandchild = spawn_leaving_a_grandchild(
        settings, tmp_path, "crashing", "exit 3")
    try:
        with pytest.raises(RuntimeError, match="crashing exited with code 3"):
            wait_for("the child exits", lambda: deployment.check_children())
        assert running(grandchild)
        deployment.stop(timeout_s=30)
        assert proc.returncode == 3
        wait_for("the grandchild gone", lambda: not running(grandchild), timeout_s=5)
        assert_all_ended([proc])
    finally:
        if running(grandchild):
            os.kill(grandchild, signal.SIGKILL)


LAUNCHER_SCRIPT = """
import json, sys, time
from services.launcher import LocalDeployment
from shared.settings import Settings

class SleepingDeployment(LocalDeployment):
    def _command(self, args):
        return ["sleep", "120"]

    def _wait_ready(self, timeout_s):
        pass

settings = Settings.model_validate_json(sys.argv[1])
deployment = SleepingDeployment(settings).start()
pids = [proc.pid for proc in deployment.children.values()] + [deployment.redis._proc.pid]
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


def test_nothing_outlives_a_sigkilled_launcher(settings: Settings) -> None:
    """`scls up` SIGKILLed (no handler, no stop() runs): its embedded Redis, ingest,
    scheduler and workers, each in a session of its own, still end within moments."""
    own = settings.model_copy(update={"redis_url": None, "workers": 2, "port": 0})
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER_SCRIPT, own.model_dump_json()],
        stdout=subprocess.PIPE, text=True,
    )
    pids: list[int] = []
    try:
        assert launcher.stdout is not None
        pids = json.loads(launcher.stdout.readline())
        assert len(pids) == 5 and all(running(pid) for pid in pids)
        launcher.kill()
        launcher.wait()
        for pid in pids:
            wait_for(f"child {pid} gone after the launcher's SIGKILL",
                     lambda p=pid: not running(p), timeout_s=10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
