"""``scls stream-overhead`` (options and output); the measurement is in
:mod:`services.worker.stream_bench`, imported when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from services.config import build_settings


def stream_overhead_command(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-random or a model dir")]
    = "smollm2-135m",
    batch: Annotated[int, typer.Option(min=1, help="rows in the slice batch")] = 8,
    prompt_len: Annotated[int, typer.Option(min=1, help="prompt tokens per row")] = 128,
    slice_length: Annotated[int, typer.Option(min=2, help="decode steps per slice (S)")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="runs of each kind")] = 10,
    json_file: Annotated[Path | None, typer.Option("--json", help="write results here")]
    = None,
) -> None:
    """Measure what per-token streaming costs decode throughput (target: at most 3%)."""
    # torch and transformers load only when the command runs, not for every `scls` call.
    from services.worker.stream_bench import measure, summary_lines
    from shared.core.embedded_redis import EmbeddedRedis
    from shared.core.keys import Keys
    from shared.core.store import Store, connect
    from shared.modeling.loading import load_model

    settings = build_settings(model=model)
    if settings.torch_threads:  # as a worker does (`scls up`: cores / workers)
        import torch

        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(settings.model, settings.cache_dir, settings.device)
    # Its own throw-away Redis: the runs write requests and streams nobody should see.
    with EmbeddedRedis() as redis_server:
        store = Store(connect(redis_server.url), Keys())
        result = measure(store, loaded, batch, prompt_len, slice_length, repeats)
    for line in summary_lines(result):
        typer.echo(line)
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2) + "\n")
