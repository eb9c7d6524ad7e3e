"""``make compose-test``: the compose deployment against real containers (issue 23).

Builds the CPU image and brings up docker-compose.yml under a project name of its own (Redis
with AOF, the ingest, two schedulers and two workers, each a container on the project's
network), then:

1. waits for ``/health`` and times ``up`` -> ready -> first request served;
2. sends a fixed set of greedy requests over REST, undisturbed: the reference texts;
3. sends them again, over and over, while it scales the workers 2 -> 3, ``docker kill``s a
   worker in the middle of a slice (and starts it again), scales 3 -> 1 (SIGTERM: the
   workers drain) and restarts the Redis container (AOF on);
4. checks every accepted request in Redis with the checks of ``scls chaos``
   (:func:`services.chaos.workload.verify`): completed, not lost, not duplicated, the same
   greedy tokens as the undisturbed run; reads the state with ``redis-cli`` inside the
   Redis container as an operator would;
5. prints the report and always takes the project down with its volumes (``down -v``).

Exit status 0 when every accepted request completed once with the reference text, no server
error was seen and the Redis restart lost nothing; 1 otherwise; 2 when the deployment never
became ready (the build or the start failed).

Run from the repository root with the project's venv: ``.venv/bin/python
tests/compose/smoke.py`` (``--json FILE`` writes the report). The images and indexes come
from the environment as for ``docker compose``: PYTHON_IMAGE, REDIS_IMAGE, TORCH_INDEX_URL,
PIP_INDEX_URL, EXTRA_CA_CERTS; unset, the public ones. Not a pytest module: the normal suite
needs no Docker (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from services.chaos.faults import redis_outage  # noqa: E402
from services.chaos.report import passed, phase_dict, totals  # noqa: E402
from services.chaos.workload import (  # noqa: E402
    TERMINAL,
    Ledger,
    Spec,
    abandon_open,
    baseline_tokens,
    make_specs,
    run_workload,
    submit,
    verify,
)
from shared.core.embedded_redis import free_port  # noqa: E402
from shared.core.keys import Keys  # noqa: E402
from shared.core.states import BatchStatus, RequestStatus  # noqa: E402
from shared.core.store import Store, connect  # noqa: E402

OVERRIDE = Path(__file__).with_name("smoke.override.yml")
PREFIX = "scls:"


@dataclass(frozen=True)
class Plan:
    """How much the smoke test sends (small: smollm2-135m on a CPU)."""

    requests: int = 12  # distinct greedy requests (the faulted phase repeats them)
    max_tokens: int = 24
    slice_length: int = 8  # three slices per request: kills land mid-request
    concurrency: int = 4
    ready_timeout_s: float = 600.0  # up -> /health ready (a cold image start included)
    step_timeout_s: float = 240.0  # each scaling / recovery step
    settle_s: float = 300.0  # open requests may take this long after the last fault


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


class Compose:
    """``docker compose`` on one project (its own name, network and volumes)."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.project = project
        self.env = env
        self.files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(OVERRIDE)]

    def run(self, *args: str, timeout: float = 900, check: bool = True,
            quiet: bool = False) -> subprocess.CompletedProcess[str]:
        """``docker compose -p <project> -f ... <args>``; its output is captured."""
        cmd = ["docker", "compose", "-p", self.project, *self.files, *args]
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[5:])} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
        if not quiet and done.returncode == 0:
            say(f"  $ docker compose {' '.join(args)}")
        return done

    def redis_cli(self, *args: str) -> str:
        """``redis-cli <args>`` inside the Redis container, as an operator runs it."""
        return self.run("exec", "-T", "redis", "redis-cli", *args, timeout=60,
                        quiet=True).stdout.strip()

    def containers(self, service: str) -> list[str]:
        """Ids of the service's running containers."""
        out = self.run("ps", "-q", service, timeout=60, quiet=True).stdout
        return [line for line in out.split() if line]


def docker(*args: str, timeout: float = 300) -> str:
    """A plain ``docker`` command; its standard output."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def say(message: str) -> None:
    """One progress line (the report comes at the end)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# state, as an operator reads it
# --------------------------------------------------------------------------------------------


def request_keys(compose: Compose) -> set[str]:
    """The request hashes in Redis (``scls:req:<id>``), read with redis-cli."""
    keys = compose.redis_cli("--scan", "--pattern", f"{PREFIX}req:*").split()
    return {k for k in keys if not k.endswith(":events")}


def redis_state(compose: Compose) -> dict[str, Any]:
    """Counts read with redis-cli inside the Redis container (docs/operations.md keys)."""
    keys = compose.redis_cli("--scan", "--pattern", f"{PREFIX}*").split()
    return {
        "scls_keys": len(keys),
        "requests": sum(1 for k in keys if k.startswith(f"{PREFIX}req:")
                        and not k.endswith(":events")),
        "pending": int(compose.redis_cli("ZCARD", f"{PREFIX}pending") or 0),
        "inflight": int(compose.redis_cli("ZCARD", f"{PREFIX}inflight") or 0),
        "instances": int(compose.redis_cli("SCARD", f"{PREFIX}instances") or 0),
        "leader": compose.redis_cli("GET", f"{PREFIX}scheduler:leader") or None,
        "aof_enabled": "aof_enabled:1" in compose.redis_cli("INFO", "persistence"),
    }


async def health(url: str) -> dict[str, Any] | None:
    """The /health body (200 or 503), None when the ingest does not answer."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            resp = await client.get("/health")
    except httpx.HTTPError:
        return None
    try:
        return dict(resp.json()) | {"http": resp.status_code}
    except ValueError:
        return None


async def wait_health(url: str, timeout_s: float, instances: int | None = None,
                      draining: int | None = None) -> float:
    """Seconds until /health is 200 (with exactly ``instances`` workers taking work and
    ``draining`` draining, when given); raises at ``timeout_s`` with the last answer."""
    started = time.monotonic()
    last: dict[str, Any] | None = None
    while time.monotonic() - started < timeout_s:
        last = await health(url)
        if (last is not None and last["http"] == 200
                and (instances is None or last.get("instances") == instances)
                and (draining is None or last.get("draining") == draining)):
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.5)
    raise TimeoutError(f"/health not as expected after {timeout_s:.0f}s "
                       f"(instances={instances}): last answer {last}")


@contextlib.contextmanager
def opened_store(url: str) -> Iterator[Store]:
    """A store on the published Redis port (closed after the block)."""
    store = Store(connect(url), Keys(PREFIX))
    try:
        yield store
    finally:
        store.close()


def running_batch(redis_url: str) -> tuple[str, str, list[str]] | None:
    """A batch whose slice is running now: (batch id, instance, request ids)."""
    with opened_store(redis_url) as store:
        for batch_id, _deadline in store.inflight_batches():
            batch = store.get_batch(batch_id)
            if batch is not None and batch.status == BatchStatus.RUNNING.value:
                return batch.id, batch.instance, batch.request_ids
    return None


def container_of(instance: str) -> str:
    """The container of a worker instance: its id is ``<hostname>-<pid>`` and a container's
    hostname is the start of its container id."""
    return docker("inspect", "-f", "{{.Id}}", instance.rsplit("-", 1)[0])


def peak_memory(container: str) -> int | None:
    """The container's peak memory use (cgroup v1 max_usage_in_bytes, v2 memory.peak)."""
    for path in ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"):
        with contextlib.suppress(RuntimeError, ValueError):
            return int(docker("exec", container, "cat", path))
    return None


def drained(logs: Path) -> list[dict[str, Any]]:
    """The ``instance_drained`` lines of a worker's captured log."""
    out = []
    for line in logs.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "instance_drained":
                out.append(event)
    return out


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the run measured, for the report."""

    plan: Plan
    ledgers: dict[str, Ledger] = field(default_factory=lambda: {
        "first": Ledger(), "undisturbed": Ledger(), "faulted": Ledger()})
    timings: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)
    redis: dict[str, Any] = field(default_factory=dict)
    peaks: dict[str, int | None] = field(default_factory=dict)


async def first_request(url: str, ledger: Ledger, spec: Spec, timeout_s: float) -> None:
    """Send ``spec`` until it is accepted and ended (the deployment's first request)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        sent = await submit(client, spec, ledger, time.monotonic() + timeout_s)
    if sent is None or not sent.seen_end:
        raise TimeoutError("the first request was not served")


async def faults(compose: Compose, run: Run, url: str, redis_url: str, ledger: Ledger,
                 logdir: Path) -> None:
    """Scale 2 -> 3, kill a worker mid-slice and start it again, scale 3 -> 1, restart
    Redis; each step waits until /health shows it done."""
    plan = run.plan
    step = plan.step_timeout_s

    say("scaling workers 2 -> 3 ...")
    started = time.monotonic()
    await asyncio.to_thread(compose.run, "up", "-d", "--no-build", "--scale", "worker=3")
    await wait_health(url, step, instances=3)
    run.faults["scale_up_to_3_s"] = round(time.monotonic() - started, 2)

    say("docker kill of a worker in the middle of a slice ...")
    deadline = time.monotonic() + step
    victim = None
    while victim is None and time.monotonic() < deadline:
        victim = await asyncio.to_thread(running_batch, redis_url)
        if victim is None:
            await asyncio.sleep(0.05)
    if victim is None:
        raise TimeoutError("no slice was running to interrupt")
    batch_id, instance, members = victim
    container = await asyncio.to_thread(container_of, instance)
    killed_at = time.time()
    started = time.monotonic()
    await asyncio.to_thread(docker, "kill", container)
    # kill -> the interrupted requests completed (their batch is requeued once the
    # instance's heartbeat is SCLS_INSTANCE_TTL_S old, then served elsewhere)
    while time.monotonic() - started < step:
        with opened_store(redis_url) as store:
            records = await asyncio.to_thread(store.get_requests, members)
        if all(r is not None and r.status in TERMINAL for r in records):
            break
        await asyncio.sleep(0.2)
    else:
        raise TimeoutError(f"the requests of killed batch {batch_id} did not complete")
    run.faults["worker_kill"] = {
        "instance": instance, "batch": batch_id, "requests_in_slice": len(members),
        "killed_at": killed_at,
        "killed_slice_requests_completed_s": round(time.monotonic() - started, 2),
    }
    # `docker kill` counts as a manual stop: no restart policy brings it back; an operator
    # (or an orchestrator) starts it, under the same hostname: the same instance id when its
    # pid repeats, and then it hands the previous run's batches back at once.
    started = time.monotonic()
    await asyncio.to_thread(docker, "start", container)
    await wait_health(url, step, instances=3)
    run.faults["worker_kill"]["restarted_and_registered_s"] = round(
        time.monotonic() - started, 2)

    say("scaling workers 3 -> 1 (SIGTERM: the removed workers drain) ...")
    for cid in compose.containers("worker"):
        run.peaks[cid[:12]] = await asyncio.to_thread(peak_memory, cid)
    # the removed containers' logs, followed from now on (they are gone after the scale-down)
    followers = {}
    for cid in compose.containers("worker"):
        with (logdir / f"{cid[:12]}.scale-down.log").open("w") as out:
            followers[cid] = subprocess.Popen(["docker", "logs", "-f", "--since", "0s", cid],
                                              stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    await asyncio.to_thread(compose.run, "up", "-d", "--no-build", "--scale", "worker=1")
    scaled_s = round(time.monotonic() - started, 2)
    survivors = set(compose.containers("worker"))
    await wait_health(url, step, instances=1, draining=0)
    for cid, follower in followers.items():
        if cid in survivors:
            follower.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            follower.wait(timeout=30)
        if follower.poll() is None:
            follower.kill()
    drains = {e.get("instance"): e for cid in followers if cid not in survivors
              for e in drained(logdir / f"{cid[:12]}.scale-down.log")}
    run.faults["scale_down_to_1"] = {
        "compose_s": scaled_s, "ready_with_1_s": round(time.monotonic() - started, 2),
        "removed": len(followers) - len(survivors & set(followers)),
        "drained": sorted(str(i) for i in drains),
        "batches_handed_back": sum(int(e.get("handed_back") or 0) for e in drains.values()),
    }

    say("restarting the Redis container (AOF) ...")
    before = await asyncio.to_thread(request_keys, compose)
    with redis_outage(ledger):
        started = time.monotonic()
        await asyncio.to_thread(compose.run, "restart", "redis")
        restarted_s = round(time.monotonic() - started, 2)
        ready_s = await wait_health(url, step)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            probe = make_specs(1, plan.max_tokens)[0]
            sent = await submit(client, probe, ledger, time.monotonic() + step)
        served_s = round(time.monotonic() - started, 2)
    after = await asyncio.to_thread(request_keys, compose)
    run.faults["redis_restart"] = {
        "restart_command_s": restarted_s,
        "restart_to_health_ready_s": round(restarted_s + ready_s, 2),
        "restart_to_request_served_s": served_s if sent is not None and sent.seen_end else None,
        # every request stored before the restart is there after it (the AOF was replayed)
        "requests_before": len(before), "requests_missing_after": len(before - after),
        "aof_enabled": (await asyncio.to_thread(redis_state, compose))["aof_enabled"],
    }


async def scenario(compose: Compose, run: Run, url: str, redis_url: str, logdir: Path) -> None:
    """Everything between ``up`` and the checks."""
    plan = run.plan
    specs = make_specs(plan.requests, plan.max_tokens)

    say("docker compose up (redis, ingest, 2 schedulers, 2 workers) ...")
    started = time.monotonic()
    await asyncio.to_thread(compose.run, "up", "-d", "--no-build")
    run.timings["up_command_s"] = round(time.monotonic() - started, 2)
    run.timings["up_to_health_ready_s"] = round(
        run.timings["up_command_s"] + await wait_health(url, plan.ready_timeout_s), 2)
    await first_request(url, run.ledgers["first"], specs[0], plan.step_timeout_s)
    run.timings["up_to_first_request_served_s"] = round(time.monotonic() - started, 2)
    run.redis["after_start"] = await asyncio.to_thread(redis_state, compose)

    say(f"undisturbed run: {len(specs)} greedy requests ...")
    started = time.monotonic()
    await run_workload(url, specs, run.ledgers["undisturbed"], plan.concurrency, plan.settle_s)
    run.timings["undisturbed_run_s"] = round(time.monotonic() - started, 2)
    run.redis["after_undisturbed"] = await asyncio.to_thread(redis_state, compose)

    say("faulted run: the same requests again while workers scale and die and Redis restarts")
    keep_going = asyncio.Event()
    keep_going.set()
    ledger = run.ledgers["faulted"]
    workload = asyncio.create_task(run_workload(
        url, specs, ledger, plan.concurrency, 4 * plan.step_timeout_s + plan.settle_s,
        keep_going))
    started = time.monotonic()
    try:
        await faults(compose, run, url, redis_url, ledger, logdir)
    finally:
        keep_going.clear()
    done, _ = await asyncio.wait({workload}, timeout=plan.settle_s)
    if not done:
        workload.cancel()
        await asyncio.gather(workload, return_exceptions=True)
        run.faults["abandoned_at_deadline"] = abandon_open(ledger)
    run.timings["faulted_run_s"] = round(time.monotonic() - started, 2)
    run.redis["at_end"] = await asyncio.to_thread(redis_state, compose)
    for cid in compose.containers("worker"):
        run.peaks[cid[:12]] = await asyncio.to_thread(peak_memory, cid)


def check(run: Run, redis_url: str) -> dict[str, Any]:
    """Every accepted request checked in Redis; the report's figures."""
    with opened_store(redis_url) as store:
        reference = baseline_tokens(store, run.ledgers["undisturbed"])
        phases = {name: phase_dict(ledger, verify(store, ledger, reference))
                  for name, ledger in run.ledgers.items()}
        kill = run.faults.get("worker_kill")
        if kill:  # kill -> the first request any worker finished after it
            ids = [s.request_id for ledger in run.ledgers.values() for s in ledger.accepted]
            done = [r.finished_at for r in store.get_requests(ids) if r is not None
                    and r.status is RequestStatus.FINISHED and r.finished_at
                    and r.finished_at > kill["killed_at"]]
            kill["kill_to_next_request_served_s"] = (
                round(min(done) - kill["killed_at"], 2) if done else None)
    report = totals(phases, 0)
    report["reference_texts"] = len(reference)
    report["phases"] = phases
    return report


def git_describe() -> str:
    """The commit and whether the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{commit}{' + working tree' if dirty else ''} at {when}"


def print_report(report: dict[str, Any]) -> None:
    """The report, as plain lines."""
    t, f = report["timings"], report["faults"]
    kill, down, rr = f.get("worker_kill", {}), f.get("scale_down_to_1", {}), f.get(
        "redis_restart", {})
    lines = [
        "",
        f"scls compose smoke test: {report['source']}",
        f"images: {report['images']}",
        f"build {t.get('build_s')} s; up -> /health ready {t.get('up_to_health_ready_s')} s; "
        f"up -> first request served {t.get('up_to_first_request_served_s')} s",
        "requests: " + ", ".join(f"{k} {report[k]}" for k in (
            "sent", "accepted", "completed", "failed", "lost", "duplicated", "mismatched",
            "server_errors", "unavailable_503", "not_ready_503", "rejected_429")),
        "  per phase: " + "; ".join(
            f"{name} {p['accepted']} accepted / {p['completed']} completed"
            for name, p in report["phases"].items()),
        f"scale 2 -> 3 workers: 3 live after {f.get('scale_up_to_3_s')} s",
        f"worker kill mid-slice ({kill.get('requests_in_slice')} requests in the slice): "
        f"next request served {kill.get('kill_to_next_request_served_s')} s after the kill, "
        f"the slice's requests completed {kill.get('killed_slice_requests_completed_s')} s "
        f"after it; restarted and registered in {kill.get('restarted_and_registered_s')} s",
        f"scale 3 -> 1 workers: compose {down.get('compose_s')} s, {down.get('removed')} "
        f"removed, {len(down.get('drained', []))} logged their drain, "
        f"{down.get('batches_handed_back')} queued batches handed back; ready with 1 after "
        f"{down.get('ready_with_1_s')} s",
        f"Redis restart: /health ready {rr.get('restart_to_health_ready_s')} s after the "
        f"restart, a request served {rr.get('restart_to_request_served_s')} s after it; "
        f"of the {rr.get('requests_before')} requests in Redis before it, "
        f"{rr.get('requests_missing_after')} missing after it "
        f"(AOF {'on' if rr.get('aof_enabled') else 'off'})",
        "redis-cli: " + "; ".join(
            f"{when}: {s['scls_keys']} scls:* keys, {s['requests']} requests, "
            f"{s['pending']} pending, {s['inflight']} in flight, {s['instances']} instances"
            for when, s in report["redis"].items()),
        "peak worker memory (cgroup): " + ", ".join(
            f"{cid} {v / 2**30:.2f} GiB" if v else f"{cid} n/a"
            for cid, v in report["peak_worker_memory_bytes"].items()),
        f"undisturbed run {t.get('undisturbed_run_s')} s, faulted run "
        f"{t.get('faulted_run_s')} s, wall {report['wall_s']} s; load average "
        f"{report['load_average']} ({os.cpu_count()} cores: the timings are CPU-bound)",
        ("PASS" if report["ok"] else "FAIL") + " (lost, duplicated, mismatched, server_errors "
        "must be 0, every accepted request completed, none missing after the Redis restart)",
    ]
    print("\n".join(lines), flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    parser.add_argument("--requests", type=int, default=Plan.requests)
    parser.add_argument("--keep", action="store_true", help="leave the project up at the end")
    args = parser.parse_args()
    plan = Plan(requests=args.requests)
    project = f"scls-smoke-{os.getpid()}"
    ingest_port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "DOCKER_BUILDKIT": "1", "COMPOSE_DOCKER_CLI_BUILD": "1",
        "INGEST_HOST_PORT": str(ingest_port), "SMOKE_REDIS_PORT": str(redis_port),
        "SCLS_SLICE_LENGTH": str(plan.slice_length),
    }
    compose = Compose(project, env)
    url, redis_url = f"http://127.0.0.1:{ingest_port}", f"redis://127.0.0.1:{redis_port}/0"
    logdir = Path(f"/tmp/{project}")
    logdir.mkdir(parents=True, exist_ok=True)
    run = Run(plan)
    images = {k: os.environ.get(k) for k in ("PYTHON_IMAGE", "REDIS_IMAGE", "TORCH_INDEX_URL",
                                            "PIP_INDEX_URL") if k in os.environ}
    say(f"project {project}: ingest on :{ingest_port}, Redis on 127.0.0.1:{redis_port}; "
        f"images {images or 'public defaults'}")
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: `down -v` still runs
    started = time.monotonic()
    report: dict[str, Any] = {}
    status = 1
    try:
        say("building the CPU image (docker compose build) ...")
        built = time.monotonic()
        compose.run("build", timeout=3600)
        run.timings["build_s"] = round(time.monotonic() - built, 1)
        asyncio.run(scenario(compose, run, url, redis_url, logdir))
        report = check(run, redis_url)
        missing = run.faults.get("redis_restart", {}).get("requests_missing_after")
        report.update(
            ok=passed(report) and report["accepted"] == report["completed"] and missing == 0,
            source=git_describe(), images=images or "public defaults", timings=run.timings,
            faults=run.faults, redis=run.redis, peak_worker_memory_bytes=run.peaks,
            wall_s=round(time.monotonic() - started, 1), plan=plan.__dict__,
            load_average=" ".join(f"{v:.1f}" for v in os.getloadavg()),
        )
        print_report(report)
        status = 0 if report["ok"] else 1
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        status = 2 if "up_to_health_ready_s" not in run.timings else 1
    finally:
        if status != 0 or args.keep:
            logs = compose.run("logs", "--no-color", "--timestamps", check=False, quiet=True)
            (logdir / "compose.log").write_text(logs.stdout + logs.stderr)
            say(f"logs: {logdir}")
        if status == 0 and not args.keep:
            shutil.rmtree(logdir, ignore_errors=True)
        if not args.keep:
            down = compose.run("down", "-v", "--remove-orphans", "-t", "60", check=False,
                               quiet=True)
            say(f"docker compose down -v: {'done' if down.returncode == 0 else down.stderr}")
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
