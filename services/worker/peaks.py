"""Peak memory of one slice beyond what was allocated before it (the profiler's meters).

:class:`PeakMeter` reads CUDA's allocator peak, or on CPU the growth of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``); :class:`AllocatorPeak`
is the largest running sum of torch's CPU allocator events under ``torch.profiler``. See
:mod:`services.worker.profiler` for how the figures are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable, Iterator
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


def _release_free_heap() -> None:
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
            _release_free_heap()
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
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        start = next(i for i, (_, d) in enumerate(deltas) if d == -_MARKER_BYTES) + 1
        running = base = sum(d for _, d in deltas[:start])  # the level when block starts
        peak = 0
        for _, delta in deltas[start:]:
            running += delta
            peak = max(peak, running - base)
        return peak




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
