"""``scls constrained-bench``: what constraining every row by a JSON schema costs the slice
engine (docs/structured-outputs.md; BENCHMARKS.md quotes it).

* **Decode throughput**: the same batch (``--rows`` rows of one prompt, ``--tokens`` decode
  steps each, one slice) free and with every row constrained by a JSON schema that cannot
  end before ``--tokens`` (an array of at least 256 strings), alternated ``--repeat``
  times; tokens per second of the decode phase, medians, and their ratio.
* **First-token latency**: one row, one token (prefill and the first draw), free, with a
  schema compiled on this request (a cold compiler, as a worker meets a new schema) and
  with the schema cached.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.core.records import RequestParams
from shared.grammar.spec import GrammarSpec
from shared.settings import Settings

if TYPE_CHECKING:  # the CLI imports this module: torch only when the command runs
    from services.worker.engine import SliceEngine, SliceInput
    from shared.modeling.loading import LoadedModel

#: An output that cannot end early: at least 256 strings.
LONG_SCHEMA = {"type": "object", "properties": {"notes": {
    "type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 256}},
    "required": ["notes"], "additionalProperties": False}


def _schema(i: int) -> dict[str, Any]:
    """A schema no cache holds yet (its property names differ per call)."""
    return {"type": "object", "properties": {f"field_{i}_{k}": {"type": "string",
                                                                "maxLength": 8}
                                             for k in range(6)},
            "required": [f"field_{i}_0"], "additionalProperties": False}


def _decode_tok_s(engine: SliceEngine, rows: list[SliceInput], tokens: int) -> float:
    """Decode-phase tokens per second of one slice of ``rows``."""
    outputs, stats = engine.run_slice(rows, tokens)
    decoded = sum(len(o.new_ids) for o in outputs) - len(rows)  # the first comes with prefill
    return decoded / stats.decode_s


def decode_throughput(loaded: LoadedModel, rows: int, tokens: int, repeat: int
                      ) -> dict[str, Any]:
    """Free and constrained decode throughput of one batch, alternated."""
    from services.worker.engine import SliceEngine, SliceInput

    engine = SliceEngine(loaded)
    prompt = loaded.codec.encode("Write down notes about slice-level scheduling, as JSON: ")
    key = GrammarSpec.json_schema(LONG_SCHEMA, "schema").key
    free = [SliceInput(f"f{i}", prompt, [], RequestParams(max_tokens=tokens, ignore_eos=True))
            for i in range(rows)]
    constrained = [SliceInput(f"c{i}", prompt, [],
                              RequestParams(max_tokens=tokens, ignore_eos=True, grammar=key))
                   for i in range(rows)]
    _decode_tok_s(engine, constrained[:2], 4)  # compile, warm up
    runs: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(repeat):
        runs["free"].append(_decode_tok_s(engine, free, tokens))
        runs["constrained"].append(_decode_tok_s(engine, constrained, tokens))
    free_med = statistics.median(runs["free"])
    constrained_med = statistics.median(runs["constrained"])
    return {"rows": rows, "tokens": tokens, "repeat": repeat, "runs_tok_s": runs,
            "free_tok_s": free_med, "constrained_tok_s": constrained_med,
            "ratio": constrained_med / free_med}


def _first_token_s(engine: SliceEngine, row: SliceInput) -> float:
    start = time.perf_counter()
    engine.run_slice([row], 1)
    return time.perf_counter() - start


def first_token(loaded: LoadedModel, repeat: int) -> dict[str, Any]:
    """Seconds to the first token of one row: free, schema compiled now, schema cached."""
    from services.worker.engine import SliceEngine, SliceInput

    prompt = loaded.codec.encode("Fill in the form: ")
    engine = SliceEngine(loaded)
    _ = engine.grammars  # the vocabulary is built once per worker, not per request
    free, cold, warm, compile_cold, compile_hit = [], [], [], [], []
    for i in range(repeat):
        free.append(_first_token_s(engine, SliceInput(
            "f", prompt, [], RequestParams(max_tokens=1))))
        spec = GrammarSpec.json_schema(_schema(i), "schema")
        row = SliceInput("c", prompt, [], RequestParams(max_tokens=1, grammar=spec.key))
        cold.append(_first_token_s(engine, row))
        warm.append(_first_token_s(engine, row))
        # the compile alone, new and cached (another new schema: the one above is cached)
        other = GrammarSpec.json_schema(_schema(10_000 + i), "schema")
        start = time.perf_counter()
        engine.grammars.compile(other)
        compile_cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.grammars.compile(other)
        compile_hit.append(time.perf_counter() - start)
    med = statistics.median
    return {"repeat": repeat, "free_s": med(free), "uncached_s": med(cold),
            "cached_s": med(warm), "added_uncached_ms": (med(cold) - med(free)) * 1e3,
            "added_cached_ms": (med(warm) - med(free)) * 1e3,
            "compile_uncached_ms": med(compile_cold) * 1e3,
            "compile_cached_ms": med(compile_hit) * 1e3}


def constrained_bench_command(
    model: Annotated[str, typer.Option(help="model to load")] = "smollm2-135m",
    rows: Annotated[int, typer.Option(min=1, help="rows in the batch")] = 16,
    tokens: Annotated[int, typer.Option(min=2, help="decode steps per row")] = 64,
    repeat: Annotated[int, typer.Option(min=1, help="alternated runs of each")] = 5,
    cache_dir: Annotated[Path | None, typer.Option(help="model cache (default: settings)")]
    = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="write results here")]
    = None,
) -> None:
    """Measure what constraining every row by a JSON schema costs decoding, and the first
    token's latency with a new and a cached schema."""
    import torch

    from shared.modeling.loading import load_model

    settings = Settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(model, cache_dir or settings.cache_dir, settings.device)
    decode = decode_throughput(loaded, rows, tokens, repeat)
    ttft = first_token(loaded, repeat)
    typer.echo(f"decode, {rows} rows x {tokens} steps, median of {repeat}: free "
               f"{decode['free_tok_s']:.1f} tok/s, every row under a JSON schema "
               f"{decode['constrained_tok_s']:.1f} tok/s: {decode['ratio']:.3f}x")
    typer.echo(f"first token, one row, median of {repeat}: free {ttft['free_s'] * 1e3:.1f} "
               f"ms, new schema {ttft['uncached_s'] * 1e3:.1f} ms, cached schema "
               f"{ttft['cached_s'] * 1e3:.1f} ms; the compile alone: new "
               f"{ttft['compile_uncached_ms']:.2f} ms, cached {ttft['compile_cached_ms']:.3f} ms")
    if json_file is not None:
        json_file.write_text(json.dumps({"model": model, "decode": decode,
                                         "first_token": ttft}, indent=2) + "\n")
