"""Peak memory of one slice beyond what was allocated before it (the profiler's meters), and
the memory the process may use at all.

:class:`PeakMeter` reads CUDA's allocator peak, or on CPU the growth of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``); :class:`AllocatorPeak`
is the largest running sum of torch's CPU allocator events under ``torch.profiler``. See
:mod:`services.worker.profiler` for how the figures are used.

:func:`memory_limit` is what the process may hold in all: the ``memory_limit_bytes``
setting, else its cgroup's limit (a container's ``mem_limit``, a pod's memory limit: v2
``memory.max``, v1 ``memory.limit_in_bytes``), else the machine's memory. The profiler skips
grid points that would not fit in it and the CPU memory budget is capped by it, so a worker
is never OOM-killed for profiling or serving beyond its container.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_PEAK_RESET = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def release_free_heap() -> None:
    """Collect garbage and hand free heap back to the OS, so RSS counts only live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only; elsewhere RSS stays higher


class PeakMeter:
    """Peak memory of a block of work beyond what was allocated before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.available = self.cuda or self._can_reset_cpu_peak()
        self._before = 0

    @staticmethod
    def _can_reset_cpu_peak() -> bool:
        """Whether this process may reset its own ``VmHWM`` (Linux, not forbidden)."""
        try:
            _PEAK_RESET.write_text("5")
            _status_bytes("VmHWM")
        except (OSError, KeyError):
            return False
        return True

    def start(self) -> None:
        """Reset the peak and remember the current level."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.available:
            release_free_heap()
            self._before = _status_bytes("VmRSS")
            _PEAK_RESET.write_text("5")  # VmHWM := current RSS

    def peak(self) -> int | None:
        """Peak bytes since :meth:`start` beyond the level at start (None if unavailable)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device)) - self._before
        if self.available:
            return max(0, _status_bytes("VmHWM") - self._before)
        return None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints two log lines at every profiler start/stop
    that no setting turns off); only wrapped around those calls, never around a slice."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_MARKER_BYTES = 7_777_777  # an allocation size nothing else makes


class AllocatorPeak:
    """Peak bytes held by torch's CPU allocator while a block runs, beyond the level at its
    start: the CPU counterpart of ``torch.cuda.max_memory_allocated``.

    ``torch.profiler`` with ``profile_memory=True`` records one event per allocation
    (positive bytes) and free (negative); the peak is the largest running sum in time
    order. ``available`` is False where the profiler gives no events (then memory falls
    back to the process figure).
    """

    def __init__(self) -> None:
        self.available = self._probe()

    @staticmethod
    def _probe() -> bool:
        """Whether a known allocation shows up as allocator events."""
        try:
            peak = AllocatorPeak.measure(lambda: torch.ones(1 << 18, dtype=torch.float32))
        except (AttributeError, RuntimeError):  # profiler internals differ in this torch
            return False
        return peak >= 1 << 20

    @staticmethod
    def measure(block: Callable[[], Any]) -> int:
        """Run ``block`` under the profiler; its allocator peak in bytes."""
        return AllocatorPeak.measure_after(lambda: None, block)

    @staticmethod
    def measure_after(before: Callable[[], Any], block: Callable[[], Any]) -> int:
        """Run ``before`` then ``block`` under one profiler session; ``block``'s peak beyond
        the level at its start.

        The profiler sees no free of a block allocated before it started, so tensors that
        ``block`` frees must be allocated inside the session to be counted as freed: make
        them in ``before``. A marker allocation of an odd size separates the two parts.
        """
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        with _quiet_stderr():
            prof.__enter__()
        try:
            before()
            marker = torch.empty(_MARKER_BYTES, dtype=torch.uint8)
            del marker
            block()
        finally:
            with _quiet_stderr():
                prof.__exit__(None, None, None)
        deltas = _memory_deltas(prof)
        # The session's records (hundreds of MB for one slice of a 30-layer model) sit in
        # reference cycles: without a collection now, each session stayed resident until a
        # full GC, and the 16 sessions of the quick grid grew a worker by 8 GB (issue 23).
        del prof
        release_free_heap()
        start = next(i for i, (_, d) in enumerate(deltas) if d == -_MARKER_BYTES) + 1
        running = base = sum(d for _, d in deltas[:start])  # the level when block starts
        peak = 0
        for _, delta in deltas[start:]:
            running += delta
            peak = max(peak, running - base)
        return peak


def _memory_deltas(prof: Any) -> list[tuple[int, int]]:
    """(time, bytes) of every allocator event of a finished profiler session, in order."""
    events = prof.profiler.kineto_results.events()
    return sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")




def measure_after(device: torch.device, before: Callable[[], Any],
                  block: Callable[[], Any]) -> int:
    """Peak bytes ``block`` allocates beyond the level before it, ``before`` run first:
    CUDA's peak counter, or on CPU torch's allocator events in one session with
    ``before`` (:meth:`AllocatorPeak.measure_after`), so that ``block``'s frees of what
    ``before`` allocated are seen."""
    if device.type == "cuda":
        before()
        meter = PeakMeter(device)
        meter.start()
        block()
        return int(meter.peak() or 0)
    return AllocatorPeak.measure_after(before, block)


# --------------------------------------------------------------------------------------------
# What the process may use
# --------------------------------------------------------------------------------------------

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")
_MEMINFO = Path("/proc/meminfo")
#: cgroup v1 writes "no limit" as a huge page-aligned number (9223372036854771712).
_NO_LIMIT = 1 << 60
#: Kept free of slices and profiling: Python objects, tokenizer, Redis buffers, allocator
#: fragmentation. A share of the limit, at least :data:`MIN_RESERVE_BYTES`.
RESERVE_SHARE = 0.10
MIN_RESERVE_BYTES = 256 * 2**20


def process_rss() -> int:
    """The process's resident set now, in bytes."""
    return _status_bytes("VmRSS")


def _cgroup_paths(self_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's memory hierarchy."""
    v2 = v1 = None
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _limits_along(base: Path, cgroup: str, name: str) -> list[int]:
    """Limits in ``name`` files from ``base/cgroup`` up to ``base`` (those that exist and are
    numbers below "no limit"). Inside a container its own cgroup is mounted at ``base``, so
    the deeper directories do not exist there and ``base`` itself is the container's."""
    found = []
    parts = [p for p in cgroup.strip("/").split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        try:
            text = (base.joinpath(*parts[:depth]) / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _NO_LIMIT:
            found.append(int(text))
    return found


def cgroup_memory_limit(root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> int | None:
    """The memory limit of this process's cgroup in bytes (the smallest along its path to
    the root: a parent's limit binds too), or None when there is none. cgroup v2
    ``memory.max`` ("max" = none), v1 ``memory/memory.limit_in_bytes``."""
    v2, v1 = _cgroup_paths(self_cgroup)
    found: list[int] = []
    if v2 is not None:
        found += _limits_along(root, v2, "memory.max")
    if v1 is not None:
        found += _limits_along(root / "memory", v1, "memory.limit_in_bytes")
    return min(found) if found else None


def machine_memory(meminfo: Path = _MEMINFO) -> int | None:
    """``MemTotal`` of ``/proc/meminfo`` in bytes (None where unreadable)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class MemoryLimit:
    """What the whole process may hold (weights included), and where that figure came from
    (``setting``, ``cgroup`` or ``machine``)."""

    limit_bytes: int
    source: str

    @property
    def reserve_bytes(self) -> int:
        """Kept free for everything that is not a slice or a profiling session."""
        return max(MIN_RESERVE_BYTES, int(self.limit_bytes * RESERVE_SHARE))

    def available(self, rss: int | None = None) -> int:
        """Bytes the process may still grow by: the limit minus its resident set (``rss``,
        default now) minus the reserve; never negative."""
        used = process_rss() if rss is None else rss
        return max(0, self.limit_bytes - used - self.reserve_bytes)


def memory_limit(setting: int | None = None) -> MemoryLimit | None:
    """The process's memory limit: ``setting`` (``SCLS_MEMORY_LIMIT_BYTES``) when given,
    else the cgroup's limit, else the machine's memory; None where none can be read."""
    if setting is not None:
        return MemoryLimit(int(setting), "setting")
    limit = cgroup_memory_limit()
    machine = machine_memory()
    if limit is not None and (machine is None or limit <= machine):
        return MemoryLimit(limit, "cgroup")
    return None if machine is None else MemoryLimit(machine, "machine")
