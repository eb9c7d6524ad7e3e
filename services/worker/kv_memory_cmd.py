"""``scls kv-memory`` (options and output); the measurement is in
:mod:`services.worker.kv_memory`, imported when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import Settings


def kv_memory_command(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-random or a model dir")]
    = "tiny-random",
    slice_length: Annotated[int, typer.Option(min=1, help="S")] = 16,
    pool_mib: Annotated[float, typer.Option(min=0.1, help="KV pool capacity, MiB")] = 32.0,
    profile_mode: Annotated[str, typer.Option(help="auto, full, quick, cached, analytic")]
    = "cached",
    points: Annotated[str, typer.Option(help="b:l grid points, comma-separated")]
    = "2:64,4:128,8:256,16:128",
    json_file: Annotated[Path | None, typer.Option("--json", help="write results here")]
    = None,
) -> None:
    """Check the memory model against measured slice peaks with the KV pool full."""
    try:
        grid = [(int(b), int(x)) for b, x in (p.split(":") for p in points.split(","))]
    except ValueError:
        raise typer.BadParameter("use b:l pairs, e.g. 2:64,8:256", param_hint="--points") from None
    # torch and transformers load only when the command runs, not for every `scls` call.
    from services.worker.kv_memory import measure
    from shared.modeling.loading import load_model

    settings = Settings(model=model, slice_length=slice_length, profile_mode=profile_mode)
    loaded = load_model(settings.model, settings.cache_dir, settings.device)
    result = measure(loaded, settings, int(pool_mib * 2**20), grid)
    typer.echo(f"{result['model']} on {result['device']}, S={slice_length}, pool "
               f"{pool_mib:g} MiB full ({result['evictions']} evictions, {result['hits']} hits)")
    typer.echo(f"{'b':>3} {'l':>5} {'kind':>8} {'measured MiB':>13} {'estimate MiB':>13} "
               f"{'ratio':>6}")
    for r in result["points"]:
        typer.echo(f"{r['b']:>3} {r['l']:>5} {r['kind']:>8} {r['measured_bytes'] / 2**20:>13.2f} "
                   f"{r['estimate_bytes'] / 2**20:>13.2f} {r['ratio']:>6.3f}")
    typer.echo(f"estimate/measured: min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}")
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2) + "\n")
