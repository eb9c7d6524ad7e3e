"""Profiling within the process's memory (issue 23): a worker was OOM-killed at its
container's 6 GiB limit while profiling the quick grid (every ``torch.profiler`` session
stayed resident until a full GC: 16 sessions grew it by 8 GB), restarted and profiled again.

Checked here on tiny-random: sessions no longer accumulate; the cgroup limit is read (v2
and v1, as inside a container); grid points that would not fit are skipped and recorded;
the CPU memory budget is capped by the limit; a worker waiting for another's profile says
whom it waits for, and a profiling one says how far it is.
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch

from services.worker import peaks, profile_cache, profiler
from services.worker.engine import SliceEngine
from services.worker.peaks import AllocatorPeak, MemoryLimit, cgroup_memory_limit
from shared.modeling.loading import LoadedModel, load_model
from shared.settings import Settings
from tests.test_profiler import SMALL_GRID

GIB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    torch.set_num_threads(2)
    return load_model("tiny-random", tmp_path_factory.mktemp("models"), device="cpu")


# --- profiler sessions --------------------------------------------------------------------


def test_allocator_sessions_do_not_accumulate(tiny: LoadedModel) -> None:
    """Each session's records are freed when it is measured (before the fix, six sessions of
    this slice grew the process by about 220 MiB, 0 after)."""
    engine = SliceEngine(tiny, pass_tokens=math.inf)
    rows = profiler._rows(2, 16, 32, tiny.info.vocab_size, np.random.default_rng(0))
    AllocatorPeak.measure(lambda: engine.run_slice(rows, 32))  # first-call allocations
    before = peaks.process_rss()
    for _ in range(6):
        assert AllocatorPeak.measure(lambda: engine.run_slice(rows, 32)) > 0
    assert peaks.process_rss() - before < 24 * 2**20


# --- the limit ----------------------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_limit_is_the_smallest_on_the_path(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    me.write_text("0::/kubepods/pod1/ctr\n")
    _tree(root, {"memory.max": "max\n", "kubepods/memory.max": str(8 * GIB),
                 "kubepods/pod1/memory.max": str(6 * GIB), "kubepods/pod1/ctr/memory.max": "max"})
    assert cgroup_memory_limit(root, me) == 6 * GIB
    _tree(root, {"kubepods/pod1/memory.max": "max", "kubepods/memory.max": "max"})
    assert cgroup_memory_limit(root, me) is None  # "max" everywhere: no limit


def test_cgroup_limit_inside_a_container(tmp_path: Path) -> None:
    """Docker mounts the container's own cgroup at /sys/fs/cgroup: the path /proc/self/cgroup
    names does not exist below it, the mount point's file is the container's limit."""
    root, me = tmp_path / "cg", tmp_path / "self"
    me.write_text("0::/\n")
    _tree(root, {"memory.max": str(6 * GIB)})
    assert cgroup_memory_limit(root, me) == 6 * GIB
    # cgroup v1 (this repository's CI host): the memory controller's hierarchy
    v1root, v1self = tmp_path / "v1", tmp_path / "self1"
    v1self.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    _tree(v1root, {"memory/memory.limit_in_bytes": str(6 * GIB)})
    assert cgroup_memory_limit(v1root, v1self) == 6 * GIB
    _tree(v1root, {"memory/memory.limit_in_bytes": "9223372036854771712"})  # v1's "none"
    assert cgroup_memory_limit(v1root, v1self) is None
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path / "missing-self") is None


def test_memory_limit_setting_wins_and_available_keeps_a_reserve() -> None:
    limit = peaks.memory_limit(6 * GIB)
    assert limit == MemoryLimit(6 * GIB, "setting")
    assert limit.reserve_bytes == int(0.6 * GIB)
    assert limit.available(rss=1 * GIB) == 6 * GIB - 1 * GIB - int(0.6 * GIB)
    assert limit.available(rss=7 * GIB) == 0
    assert MemoryLimit(GIB, "cgroup").reserve_bytes == peaks.MIN_RESERVE_BYTES
    found = peaks.memory_limit()  # this machine: its cgroup's limit or its memory
    assert found is None or (found.limit_bytes > 0 and found.source in ("cgroup", "machine"))


# --- the grid within the limit ------------------------------------------------------------


def test_points_that_do_not_fit_are_skipped_and_recorded(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    analytic = profiler.analytic_model_for(tiny, 8)
    points = SMALL_GRID.points(tiny.info.context_limit, 8)
    needs = {p: profiler.point_need_bytes(analytic, *p, session_bytes=1000) for p in points}
    assert needs[(4, 32)] == max(needs.values()) and needs[(1, 8)] == min(needs.values())
    assert needs[(1, 8)] > 1000  # the session plus the slice, times the heap overhead
    kept, skipped = profiler.fit_points(points, analytic, needs[(2, 16)], 1000)
    assert kept and skipped and sorted(kept + skipped) == sorted(points)
    assert all(needs[p] <= needs[(2, 16)] < needs[q] for p in kept for q in skipped)
    assert profiler.fit_points(points, analytic, None, 0) == (points, [])

    # A real run under a limit that leaves room for some points only: the rest are skipped
    # before anything is measured, and the profile says which. (tiny-random's points all
    # need about 128 MiB, 64 MiB of it the analytic bound's fixed slack: too close to pick
    # them apart with a real limit, so what is available is fixed here.)
    class Fixed(MemoryLimit):
        def available(self, rss: int | None = None) -> int:
            return needs[(2, 16)]

    monkeypatch.setattr(profiler, "_session_bytes", lambda *args: 1000)
    lines: list[str] = []
    memory = Fixed(8 * GIB, "cgroup")
    samples = profiler.run_profile(tiny, 8, SMALL_GRID, lines.append, memory=memory)
    measured = {(p.b, p.l) for p in samples.points}
    assert measured == set(kept)
    assert {tuple(p) for p in samples.meta["skipped_points"]} == set(skipped)
    assert samples.meta["memory_limit_bytes"] == 8 * GIB
    assert samples.meta["memory_limit_source"] == "cgroup"
    assert samples.meta["profiler_session_bytes"] == 1000
    # progress: each phase announced with the step count
    assert any("timing repeat 1/1" in line for line in lines), lines
    assert re.match(r"step (\d+)/\1: done", lines[-1]), lines[-1]


def test_nothing_fits_means_the_analytic_model(
    tiny: LoadedModel, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profiler, "QUICK_GRID", SMALL_GRID)
    tight = settings.model_copy(update={
        "cache_dir": tmp_path, "profile_mode": "quick",
        "memory_limit_bytes": peaks.process_rss() + peaks.MIN_RESERVE_BYTES + 1})
    with pytest.raises(ValueError, match="fits in memory"):
        profiler.run_profile(tiny, 8, SMALL_GRID, memory=MemoryLimit(
            tight.memory_limit_bytes or 0, "setting"))
    with structlog.testing.capture_logs() as logs:
        model = profile_cache.load_or_profile(tiny, tight)
    assert model.source == "analytic"
    assert any(e["event"] == "profile_failed" for e in logs), logs
    assert not list(tmp_path.rglob("*.json"))  # nothing cached: a larger limit profiles


# --- the budget ---------------------------------------------------------------------------


def test_cpu_budget_is_capped_by_the_memory_limit(
    tiny: LoadedModel, settings: Settings
) -> None:
    roomy = settings.model_copy(update={"memory_limit_bytes": 1 << 50})
    assert profile_cache.instance_memory_budget(tiny, roomy) == settings.memory_budget_bytes
    rss = peaks.process_rss()
    limit = rss + 2 * GIB  # 2 GiB beyond what is resident now, a 256 MiB reserve of it...
    tight = settings.model_copy(update={"memory_limit_bytes": limit,
                                        "memory_budget_bytes": 4 * GIB})
    with structlog.testing.capture_logs() as logs:
        budget = profile_cache.instance_memory_budget(tiny, tight)
    reserve = MemoryLimit(limit, "setting").reserve_bytes
    # ...over the assumed heap overhead (no measured profile): about (2 GiB - reserve) / 2
    expected = (2 * GIB - reserve) / profiler.ASSUMED_HEAP_OVERHEAD
    assert budget == pytest.approx(expected, rel=0.02)
    (capped,) = [e for e in logs if e["event"] == "memory_budget_capped"]
    assert capped["configured_budget_bytes"] == 4 * GIB and capped["limit_source"] == "setting"


# --- what a waiting or profiling worker says ----------------------------------------------


def test_a_waiter_names_who_holds_the_profile_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profile_cache, "LOCK_POLL_S", 0.01)
    path = tmp_path / "profiles" / "p.json"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with profile_cache.profile_lock(path, "worker-a (host1 pid 7)"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    with structlog.testing.capture_logs() as logs:
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        with profile_cache.profile_lock(path):
            waited = time.monotonic() - started
    thread.join(10)
    assert waited >= 0.25
    (wait,) = [e for e in logs if e["event"] == "profile_lock_wait"]
    assert wait["msg"].startswith("waiting for the profile lock held by worker-a (host1 pid 7)")
    assert any(e["event"] == "profile_lock_acquired" for e in logs)
    assert path.with_suffix(".lock").read_text() == ""  # released: no stale holder


def test_a_profiling_worker_logs_its_steps(
    tiny: LoadedModel, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profiler, "QUICK_GRID", SMALL_GRID)
    monkeypatch.setattr(profiler, "PROGRESS_EVERY_S", 0.0)  # every step, for the test
    quick = settings.model_copy(update={"cache_dir": tmp_path, "profile_mode": "quick",
                                        "memory_limit_bytes": 1 << 50})
    with structlog.testing.capture_logs() as logs:
        model = profile_cache.load_or_profile(tiny, quick)
    assert model.source == "profiled"
    steps = [e["msg"] for e in logs if e["event"] == "profiling_progress"]
    assert steps and all(s.startswith("profiling the hardware, ") for s in steps)
    total = int(steps[-1].split("/")[1].split(":")[0])
    assert f"step {total}/{total}: done" in steps[-1]
    assert model.meta["skipped_points"] == []
