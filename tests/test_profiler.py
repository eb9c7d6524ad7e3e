"""The profiler on tiny-random: real slices, real peak memory, the cache, Redis, the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
import typer
from typer.testing import CliRunner

from services.worker import profile_cache, profiler
from services.worker.engine import SliceEngine
from services.worker.fit import grammar_token_s
from services.worker.profile_cmd import profile_command
from services.worker.samples import ProfileSamples
from shared.core.store import Store
from shared.modeling.loading import LoadedModel, load_model
from shared.policy.costmodel import CostModel
from shared.settings import Settings

# Small enough for a test, large enough to fit 5 prefill features and hold 2 points out.
SMALL_GRID = profiler.ProfileGrid("test", (1, 2, 4), (8, 16, 32), max_batch_tokens=128,
                                  repeats=1, warmup=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """One tiny-random model for the module."""
    torch.set_num_threads(2)
    return load_model("tiny-random", tmp_path_factory.mktemp("models"), device="cpu")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``scls profile --model tiny-random --quick --json out.json``, once for the module."""
    cache = tmp_path_factory.mktemp("profile-cache")
    out = cache / "out.json"
    app = typer.Typer()
    app.command("profile")(profile_command)
    app.command("noop")(lambda: None)  # two commands: Typer then expects the command name
    result = CliRunner().invoke(
        app, ["profile", "--model", "tiny-random", "--quick", "--json", str(out)],
        env={"SCLS_CACHE_DIR": str(cache), "SCLS_SLICE_LENGTH": "8", "SCLS_TORCH_THREADS": "2"},
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    data["stdout"] = result.output
    return data


def test_profile_command_writes_the_errors_and_prints_them(quick_run: dict[str, Any]) -> None:
    for key in ("time_mape", "time_max_err", "mem_ratio_min", "mem_ratio_max"):
        assert isinstance(quick_run[key], float) and np.isfinite(quick_run[key]), key
    assert quick_run["model"] == "tiny-random" and quick_run["device"] == "cpu"
    assert quick_run["grid"]["name"] == "quick" and quick_run["slice_length"] == 8
    assert quick_run["prefill_features"] in (["1", "b", "l", "bl"], ["1", "b", "l", "bl", "bll"])
    assert set(quick_run["coefficients"]) >= {"prefill", "decode", "activation", "mem_margin"}
    assert quick_run["n_heldout"] == len(quick_run["heldout"]) > 0
    assert "MAPE" in quick_run["stdout"] and "held-out" in quick_run["stdout"]
    # The command also left the cache a worker with the same settings will reuse.
    assert Path(quick_run["cache_file"]).is_file()


def test_quick_profile_memory_estimate_covers_every_measured_point(
    quick_run: dict[str, Any], tiny: LoadedModel
) -> None:
    samples = ProfileSamples.from_dict(quick_run["samples"])
    model = CostModel.from_dict(quick_run["cost_model"])
    analytic = profiler.analytic_model_for(tiny, samples.slice_length)
    assert len(samples.points) == len(profiler.QUICK_GRID.points(4096, 8))
    for p in samples.points:
        assert p.peak_bytes is not None and p.peak_bytes > 0
        assert float(model.slice_memory(p.b, p.l)) >= p.peak_bytes, (p.b, p.l)
        assert float(analytic.slice_memory(p.b, p.l)) >= p.peak_bytes, (p.b, p.l)
        assert len(p.step_s) == 7 and min(p.step_s) > 0 and p.prefill_s > 0
    # Resumed slices (rows from the KV pool) were measured at every point with l > 1 (not
    # only l > S: a quick grid at S = 32 then had too few points to fit an envelope) and
    # fitted apart: their bound covers every measured resumed peak, below the fresh one.
    resumed = [p for p in samples.points if p.resume_peak_bytes is not None]
    assert len(resumed) == len(samples.points) and all(p.l > 1 for p in resumed)
    assert model.resume_act_coef
    for p in resumed:
        assert float(model.resume_memory(p.b, p.l)) >= p.resume_peak_bytes, (p.b, p.l)
        assert p.resume_peak_bytes < p.peak_bytes, (p.b, p.l)  # no prefill activations


def test_slice_is_split_into_prefill_and_steps_that_add_up(tiny: LoadedModel) -> None:
    engine = SliceEngine(tiny)
    meter = profiler.PeakMeter(tiny.device)
    rows = profiler._rows(3, 20, 6, tiny.info.vocab_size, np.random.default_rng(0))
    timing = profiler.measure_slice(engine, rows, 6, meter)
    assert len(timing.step_s) == 5
    assert timing.prefill_s + sum(timing.step_s) == pytest.approx(timing.slice_s, rel=1e-9)
    assert {len(r.prompt_ids) for r in rows} != {20}  # uneven rows: a real padding mask
    assert max(len(r.prompt_ids) for r in rows) == 20


def test_peak_meter_sees_a_known_allocation(tiny: LoadedModel) -> None:
    meter = profiler.PeakMeter(tiny.device)
    assert meter.available
    size = 64 * 2**20
    meter.start()
    block = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
    del block
    peak = meter.peak()
    # Growth of the resident set: heap pages still resident before may be reused (a little
    # less), the interpreter and allocator add a little (a little more).
    assert peak is not None and size - 2**20 <= peak < size + 16 * 2**20


def test_allocator_peak_is_the_largest_sum_of_live_tensors() -> None:
    meter = profiler.AllocatorPeak()
    assert meter.available
    mib8 = 8 * 2**20

    def block() -> None:
        a = torch.ones(mib8 // 4)  # 8 MiB live
        b = torch.ones(mib8 // 4)  # 16 MiB live: the peak
        del a
        c = torch.ones(mib8 // 8)  # 12 MiB live
        del b, c

    assert 2 * mib8 <= meter.measure(block) <= 2 * mib8 + 64 * 1024  # allocator alignment
    assert meter.measure(lambda: None) < 64 * 1024


def test_quick_profile_fits_allocator_peaks_and_bounds_the_process_growth(
    quick_run: dict[str, Any], tiny: LoadedModel
) -> None:
    """CPU: the model is fitted to exact allocator peaks; the resident-set growth of the
    timed repeats becomes the heap overhead, by which the CPU budget is divided."""
    samples = ProfileSamples.from_dict(quick_run["samples"])
    model = CostModel.from_dict(quick_run["cost_model"])
    assert samples.meta["memory_method"] == quick_run["memory_method"] == "cpu_allocator_events"
    # measured everywhere; a small slice may grow the process by nothing (its few tensors
    # fit in heap pages already resident), the largest ones do grow it
    assert all(p.process_peak_bytes is not None for p in samples.points)
    assert max(p.process_peak_bytes or 0 for p in samples.points) > 0
    assert model.heap_overhead == quick_run["heap_overhead"] >= 1.0
    for p in samples.points:
        assert float(model.slice_memory(p.b, p.l)) * model.heap_overhead >= p.process_peak_bytes
    # memory_limit_bytes: room enough that the container's limit does not cap the budget
    # (tests/test_profile_memory.py covers the cap)
    settings = Settings(memory_budget_bytes=3 * 2**30, memory_limit_bytes=1 << 50)
    budget = profile_cache.instance_memory_budget(tiny, settings, model)
    assert budget == int(3 * 2**30 / model.heap_overhead)
    assert "heap overhead" in quick_run["stdout"]


def test_quick_profile_measures_what_a_mask_costs(quick_run: dict[str, Any]) -> None:
    """One row and the grid's largest batch under a JSON schema, timed by the engine: every
    row masks each of its S tokens in every timed slice (3 repeats), and the fitted
    per-token cost is the slope of the seconds over the tokens."""
    samples = ProfileSamples.from_dict(quick_run["samples"])
    model = CostModel.from_dict(quick_run["cost_model"])
    assert [(rows, masked) for rows, _, masked in samples.grammar] == [
        (1, 1 * 8 * 3), (8, 8 * 8 * 3)]
    assert all(seconds > 0 for _, seconds, _ in samples.grammar)
    assert model.grammar_token_s > 0
    assert model.grammar_token_s == grammar_token_s(samples.grammar)
    assert quick_run["coefficients"]["grammar_token_s"] == model.grammar_token_s
    assert "per constrained token" in quick_run["stdout"]


def test_cost_model_round_trips_through_redis(
    rclient: redis.Redis, store: Store, tiny: LoadedModel
) -> None:
    model = profiler.analytic_model_for(tiny, 4)
    key = store.keys.instance("profiled-instance")
    rclient.hset(key, mapping={"id": "profiled-instance", "profile": model.to_json()})
    back = CostModel.from_json(rclient.hget(key, "profile"))
    assert back == model
    assert float(back.slice_time(3, 40)) == float(model.slice_time(3, 40))


def test_load_or_profile_reuses_its_cache_and_reprofile_forces_a_run(
    tiny: LoadedModel, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    rclient: redis.Redis,
) -> None:
    monkeypatch.setattr(profiler, "QUICK_GRID", SMALL_GRID)
    settings = settings.model_copy(update={"cache_dir": tmp_path, "profile_mode": "quick"})
    first = profile_cache.load_or_profile(tiny, settings)
    path = profile_cache.cache_path(tiny, settings, SMALL_GRID)
    assert path.is_file() and first.source == "profiled" and first.grid == "test"
    assert profile_cache.load_or_profile(tiny, settings) == first  # from the file, not measured
    forced = profile_cache.load_or_profile(tiny, settings, reprofile=True)
    assert forced.created_at > first.created_at
    assert CostModel.from_json(path.read_text()) == forced
    # A different slice length is a different profile: the cached one is not reused.
    other = settings.model_copy(update={"slice_length": settings.slice_length + 1})
    assert profile_cache.cache_path(tiny, other, SMALL_GRID) != path
    assert profile_cache.load_or_profile(tiny, other).slice_length == settings.slice_length + 1
    # A stored file whose key does not match (e.g. other threads) is measured again.
    stale = forced.to_dict()
    stale["meta"]["cache_key"]["torch_threads"] = -1
    path.write_text(json.dumps(stale))
    assert profile_cache.load_or_profile(tiny, settings).created_at > forced.created_at


def test_analytic_mode_measures_nothing(tiny: LoadedModel, settings: Settings) -> None:
    analytic = settings.model_copy(
        update={"cache_dir": Path("/nonexistent"), "profile_mode": "analytic"}
    )
    model = profile_cache.load_or_profile(tiny, analytic)
    assert model.source == "analytic" and model.slice_length == settings.slice_length


def test_grid_choice_and_cpu_budget(tiny: LoadedModel, settings: Settings) -> None:
    assert profiler.grid_for("auto", "tiny-random") is profiler.QUICK_GRID
    assert profiler.grid_for("auto", "smollm2-135m") is profiler.FULL_GRID
    assert profiler.grid_for("quick", "smollm2-135m") is profiler.QUICK_GRID
    assert profiler.grid_for("full", "tiny-random") is profiler.FULL_GRID
    assert profiler.grid_for("analytic", "tiny-random") is None
    with pytest.raises(ValueError, match="profile_mode"):
        profiler.grid_for("fast", "tiny-random")
    roomy = settings.model_copy(update={"memory_limit_bytes": 1 << 50})  # no cap by the limit
    assert profile_cache.instance_memory_budget(tiny, roomy) == settings.memory_budget_bytes
    full = profiler.FULL_GRID.points(8192, 32)
    assert (32, 512) not in full and (1, 512) in full and (32, 128) in full


def test_cached_mode_uses_a_cached_profile_or_the_analytic_model(
    tiny: LoadedModel, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``profile_mode="cached"`` (the demo's) never measures: cache hit or analytic."""
    monkeypatch.setattr(profiler, "QUICK_GRID", SMALL_GRID)
    cached = settings.model_copy(update={"cache_dir": tmp_path, "profile_mode": "cached"})
    assert profile_cache.load_or_profile(tiny, cached).source == "analytic"
    assert not list(tmp_path.rglob("*.json"))  # nothing was measured or written
    measured = profile_cache.load_or_profile(
        tiny, cached.model_copy(update={"profile_mode": "auto"})  # auto = quick for tiny
    )
    assert profile_cache.load_or_profile(tiny, cached) == measured
