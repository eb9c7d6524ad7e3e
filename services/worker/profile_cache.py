"""Cached profiles and the memory budget of an instance (docs/design.md §2.2, §2.4).

:func:`load_or_profile` is what a worker calls at start: it reuses a cached profile of the
same model, device, dtype, slice length, thread count and grid, or profiles
(:func:`services.worker.profiler.profile_and_fit`) and caches it. What it waits for is in
its log: ``profile_lock_wait`` ("waiting for the profile lock held by <host> pid <pid>",
while another worker sharing the cache profiles), then ``profiling_progress`` ("profiling
the hardware, step i/n ...") every few seconds.

On CPU the process's memory limit (:func:`services.worker.peaks.memory_limit`: the
container's) bounds both the profile's grid and :func:`instance_memory_budget`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from services.worker.peaks import MemoryLimit, memory_limit
from services.worker.profiler import (
    ASSUMED_HEAP_OVERHEAD,
    PROFILER_VERSION,
    ProfileGrid,
    analytic_model_for,
    dtype_name,
    grid_for,
    profile_and_fit,
)
from shared.modeling.loading import LoadedModel
from shared.obs.logging import get_logger
from shared.policy.costmodel import CostModel
from shared.settings import Settings

log = get_logger(__name__)


def cache_key(loaded: LoadedModel, settings: Settings, grid: ProfileGrid) -> dict[str, Any]:
    """What a cached profile must match to be reused (JSON-normalised: tuples are lists)."""
    key = {
        "model": loaded.info.name,
        "device": str(loaded.device),
        "dtype": dtype_name(loaded),
        "slice_length": settings.slice_length,
        "torch_threads": torch.get_num_threads(),
        "grid": asdict(grid),
        "profiler_version": PROFILER_VERSION,
    }
    return json.loads(json.dumps(key))


def cache_path(loaded: LoadedModel, settings: Settings, grid: ProfileGrid) -> Path:
    """``cache_dir/profiles/<model>-<device>-S<S>-<grid>-<hash of the whole key>.json``."""
    key = cache_key(loaded, settings, grid)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", loaded.info.name).strip("_")[-60:]
    device = re.sub(r"[^A-Za-z0-9]+", "", str(loaded.device))
    name = f"{model}-{device}-S{settings.slice_length}-{grid.name}-{digest}.json"
    return Path(settings.cache_dir) / "profiles" / name


#: While another process holds the profile lock, say so this often.
LOCK_WAIT_LOG_EVERY_S = 30.0
#: How often a waiter tries the lock again.
LOCK_POLL_S = 0.5


def _lock_holder(handle: Any) -> str:
    """Who holds the lock, as its holder wrote it into the lock file ("" if unknown)."""
    try:
        handle.seek(0)
        data = json.loads(handle.read().decode() or "{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict) or "holder" not in data:
        return ""
    since = data.get("since")
    held = (f" (profiling for {time.time() - float(since):.0f}s)"
            if isinstance(since, int | float) else "")
    return f"{data['holder']}{held}"


@contextlib.contextmanager
def profile_lock(path: Path, holder: str | None = None) -> Iterator[None]:
    """Exclusive lock next to ``path``: workers starting together profile one at a time
    (concurrent runs would slow each other down and skew every timing).

    The holder writes who it is (``holder``, default "<hostname> pid <pid>") into the lock
    file; a process that has to wait logs ``profile_lock_wait`` naming it, at once and every
    :data:`LOCK_WAIT_LOG_EVERY_S` (in compose the hostname is the container id).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    me = holder or f"{socket.gethostname()} pid {os.getpid()}"
    with open(path.with_suffix(".lock"), "a+b") as handle:
        waited_from = time.monotonic()
        said_at: float | None = None
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if said_at is None or now - said_at >= LOCK_WAIT_LOG_EVERY_S:
                    held_by = _lock_holder(handle) or "another process"
                    log.info("profile_lock_wait",
                             msg=f"waiting for the profile lock held by {held_by}",
                             lock=str(path.with_suffix(".lock")),
                             waited_s=round(now - waited_from, 1))
                    said_at = now
                time.sleep(LOCK_POLL_S)
        if said_at is not None:
            log.info("profile_lock_acquired", waited_s=round(time.monotonic() - waited_from, 1))
        try:
            handle.truncate(0)
            handle.write(json.dumps({"holder": me, "since": time.time()}).encode())
            handle.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.truncate(0)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_cached(path: Path, key: dict[str, Any]) -> CostModel | None:
    """The cached model at ``path`` if it exists, parses and has the same key."""
    try:
        model = CostModel.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if path.exists():
            log.warning("profile_cache_unreadable", path=str(path), error=str(exc))
        return None
    return model if model.meta.get("cache_key") == key else None


def save_profile(model: CostModel, path: Path) -> None:
    """Write ``model`` to ``path`` atomically (rename of a temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(model.to_dict(), indent=1, sort_keys=True))
    os.replace(tmp, path)


def with_cache_key(model: CostModel, key: dict[str, Any]) -> CostModel:
    """``model`` with ``key`` recorded in its metadata (what :func:`load_or_profile` checks)."""
    return replace(model, meta={**model.meta, "cache_key": key})


def load_or_profile(
    loaded: LoadedModel, settings: Settings, reprofile: bool = False
) -> CostModel:
    """The instance's cost model: cached if a matching profile exists, measured otherwise.

    ``settings.profile_mode`` (default ``auto``) picks the grid
    (:func:`~services.worker.profiler.grid_for`); ``analytic`` skips measurement.
    ``reprofile`` measures even when a cache exists. On CPU only the grid points that fit
    in the process's memory limit are measured; when too few fit to fit a model, the
    analytic model is used (and nothing is cached).
    """
    mode = getattr(settings, "profile_mode", "auto")
    if mode == "cached":
        return _cached_or_analytic(loaded, settings)
    grid = grid_for(mode, loaded.info.name)
    if grid is None:
        log.info("cost_model", source="analytic", profile_mode=mode)
        return analytic_model_for(loaded, settings.slice_length)
    key = cache_key(loaded, settings, grid)
    path = cache_path(loaded, settings, grid)
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    if settings.instance_id:
        holder = f"{settings.instance_id} ({holder})"
    with profile_lock(path, holder):
        cached = None if reprofile else read_cached(path, key)
        if cached is not None:
            log.info("profile_cached", path=str(path))
            return cached
        memory = profile_memory_limit(loaded, settings)
        log.info("profiling", grid=grid.name, model=loaded.info.name, device=str(loaded.device),
                 msg="profiling the hardware before serving (SCLS_PROFILE_MODE="
                     f"{mode}); SCLS_PROFILE_MODE=cached serves at once",
                 memory_limit_bytes=memory and memory.limit_bytes,
                 limit_source=memory and memory.source)
        started = time.monotonic()
        try:
            model, report, _ = profile_and_fit(
                loaded, settings.slice_length, grid, progress=_log_progress, memory=memory)
        except ValueError as exc:  # no grid point fits in memory, or too few to fit
            log.warning("profile_failed", error=str(exc), fallback="analytic")
            return analytic_model_for(loaded, settings.slice_length)
        model = with_cache_key(model, key)
        save_profile(model, path)
        model = CostModel.from_json(model.to_json())  # exactly what a later load returns
    log.info("profiled", path=str(path), seconds=round(time.monotonic() - started, 1),
             **report.errors())
    return model


def _log_progress(message: str) -> None:
    """The profiler's progress lines, as the worker's log lines."""
    log.info("profiling_progress", msg=f"profiling the hardware, {message}")


def profile_memory_limit(loaded: LoadedModel, settings: Settings) -> MemoryLimit | None:
    """The memory limit profiling must stay within: on CPU the process's
    (:func:`~services.worker.peaks.memory_limit`); None on CUDA (slices live in device
    memory, which the profiler's own peak counter watches)."""
    if loaded.device.type == "cuda":
        return None
    return memory_limit(getattr(settings, "memory_limit_bytes", None))


def _cached_or_analytic(loaded: LoadedModel, settings: Settings) -> CostModel:
    """``profile_mode="cached"``: the ``auto`` grid's cached profile if this machine has
    one, else the analytic model; never measures (a full grid takes minutes on a CPU)."""
    grid = grid_for("auto", loaded.info.name)
    assert grid is not None
    path = cache_path(loaded, settings, grid)
    cached = read_cached(path, cache_key(loaded, settings, grid))
    if cached is not None:
        log.info("profile_cached", path=str(path))
        return cached
    log.info("profile_not_cached", fallback="analytic", expected=str(path),
             hint="run `scls profile` once with the worker's settings (same cache "
                  "directory, threads and slice length)")
    return analytic_model_for(loaded, settings.slice_length)


def instance_memory_budget(
    loaded: LoadedModel, settings: Settings, cost: CostModel | None = None
) -> int:
    """Bytes this instance may spend on slices (KV cache + activations), beyond the weights.

    CUDA: ``utilisation * (free + reserved) - allocated``, read after the model is loaded.
    ``free + reserved`` is what the device had free for this process before it allocated
    anything through torch (the weights now sit in ``reserved``); ``allocated`` is the
    weights (plus anything else still live). So this is "free memory at start times
    ``gpu_memory_utilization`` minus the weights"; the remaining fraction covers the CUDA
    context, allocator fragmentation and other processes' growth. CPU:
    ``settings.memory_budget_bytes / cost.heap_overhead``: the memory model estimates what
    torch allocates, and the profile measured how much more the process grows by (glibc's
    heap), so that the process itself stays within the configured budget. The CPU budget is
    also capped by what the process may still grow by under its memory limit (a container's
    limit: :func:`_capped_by_memory_limit`).
    """
    if loaded.device.type != "cuda":
        overhead = 1.0 if cost is None else cost.heap_overhead
        budget = int(settings.memory_budget_bytes / overhead)
        return _capped_by_memory_limit(budget, settings, cost)
    utilisation = float(getattr(settings, "gpu_memory_utilization", 0.9))
    free, _total = torch.cuda.mem_get_info(loaded.device)
    reserved = torch.cuda.memory_reserved(loaded.device)
    allocated = torch.cuda.memory_allocated(loaded.device)
    return max(0, int(utilisation * (free + reserved)) - int(allocated))


def _capped_by_memory_limit(budget: int, settings: Settings, cost: CostModel | None) -> int:
    """``budget`` (what slices may use by the memory model's estimate), or less when the
    process's memory limit leaves less: what it may still grow by now (weights loaded)
    divided by the heap overhead (measured by the profile; :data:`ASSUMED_HEAP_OVERHEAD`
    when it was not). Logs ``memory_budget_capped`` when it cuts."""
    memory = memory_limit(getattr(settings, "memory_limit_bytes", None))
    if memory is None:
        return budget
    measured = cost is not None and cost.source != "analytic" and cost.heap_overhead > 1.0
    overhead = cost.heap_overhead if measured and cost is not None else ASSUMED_HEAP_OVERHEAD
    available = memory.available()
    cap = int(available / overhead)
    if cap >= budget:
        return budget
    log.warning("memory_budget_capped", budget_bytes=cap, configured_budget_bytes=budget,
                memory_limit_bytes=memory.limit_bytes, limit_source=memory.source,
                available_bytes=available, heap_overhead=round(overhead, 3),
                hint="raise the container's memory limit or lower SCLS_MEMORY_BUDGET_BYTES")
    return cap
