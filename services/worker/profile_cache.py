"""Cached profiles and the memory budget of an instance (docs/design.md §2.2, §2.4).

:func:`load_or_profile` is what a worker calls at start: it reuses a cached profile of the
same model, device, dtype, slice length, thread count and grid, or profiles
(:func:`services.worker.profiler.profile_and_fit`) and caches it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from services.worker.profiler import (
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


@contextlib.contextmanager
def profile_lock(path: Path) -> Iterator[None]:
    """Exclusive lock next to ``path``: workers starting together profile one at a time
    (concurrent runs would slow each other down and skew every timing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
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
    ``reprofile`` measures even when a cache exists.
    """
    mode = getattr(settings, "profile_mode", "auto")
    if mode == "cached":
        return _cached_or_analytic(loaded, settings)
    grid = grid_for(mode, loaded.info.name)
    if grid is None:
        return analytic_model_for(loaded, settings.slice_length)
    key = cache_key(loaded, settings, grid)
    path = cache_path(loaded, settings, grid)
    with profile_lock(path):
        cached = None if reprofile else read_cached(path, key)
        if cached is not None:
            log.info("profile_cached", path=str(path))
            return cached
        log.info("profiling", grid=grid.name, model=loaded.info.name, device=str(loaded.device))
        model, report, _ = profile_and_fit(loaded, settings.slice_length, grid)
        model = with_cache_key(model, key)
        save_profile(model, path)
        model = CostModel.from_json(model.to_json())  # exactly what a later load returns
    log.info("profiled", path=str(path), **report.errors())
    return model


def _cached_or_analytic(loaded: LoadedModel, settings: Settings) -> CostModel:
    """``profile_mode="cached"``: the ``auto`` grid's cached profile if this machine has
    one, else the analytic model; never measures (a full grid takes minutes on a CPU)."""
    grid = grid_for("auto", loaded.info.name)
    assert grid is not None
    cached = read_cached(cache_path(loaded, settings, grid), cache_key(loaded, settings, grid))
    if cached is not None:
        return cached
    log.info("profile_not_cached", fallback="analytic", hint="run `scls profile` once")
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
    heap), so that the process itself stays within the configured budget.
    """
    if loaded.device.type != "cuda":
        overhead = 1.0 if cost is None else cost.heap_overhead
        return int(settings.memory_budget_bytes / overhead)
    utilisation = float(getattr(settings, "gpu_memory_utilization", 0.9))
    free, _total = torch.cuda.mem_get_info(loaded.device)
    reserved = torch.cuda.memory_reserved(loaded.device)
    allocated = torch.cuda.memory_allocated(loaded.device)
    return max(0, int(utilisation * (free + reserved)) - int(allocated))
