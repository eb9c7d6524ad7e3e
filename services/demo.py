"""``scls demo``: a whole deployment answering a few prompts over the REST endpoint."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.launcher import LocalDeployment
from shared.settings import Settings

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "At what temperature does water boil at sea level, in Celsius?",
    "Give one tip for sleeping better.",
)


@dataclass
class Answer:
    """One prompt's outcome."""

    prompt: str
    text: str = ""
    ok: bool = False
    latency_s: float = 0.0
    completion_tokens: int = 0
    slices: int = 0
    error: str = ""


async def _ask(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Answer:
    started = time.perf_counter()
    answer = Answer(prompt)
    try:
        resp = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}],
                  "max_tokens": max_tokens, "temperature": 0},
        )
        body = resp.json()
        if resp.status_code != 200:
            answer.error = body.get("error", {}).get("message", resp.text)
        else:
            answer.ok = True
            answer.text = body["choices"][0]["message"]["content"]
            answer.completion_tokens = body["usage"]["completion_tokens"]
            answer.slices = body.get("scls", {}).get("slices", 0)
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.latency_s = time.perf_counter() - started
    return answer


async def _ask_all(url: str, prompts: tuple[str, ...], max_tokens: int,
                   console: Console) -> tuple[list[Answer], float]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("requests completed", total=len(prompts))

            async def one(prompt: str) -> Answer:
                answer = await _ask(client, prompt, max_tokens)
                progress.advance(task)
                return answer

            started = time.perf_counter()
            answers = await asyncio.gather(*(one(p) for p in prompts))
            return list(answers), time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(answers: list[Answer], wall_s: float) -> Table:
    done = [a for a in answers if a.ok]
    latencies = [a.latency_s for a in done] or [0.0]
    tokens = sum(a.completion_tokens for a in done)
    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests sent / completed / failed",
         f"{len(answers)} / {len(done)} / {len(answers) - len(done)}"),
        ("wall time", f"{wall_s:.2f} s"),
        ("request throughput", f"{len(done) / wall_s:.3f} req/s"),
        ("output token throughput", f"{tokens / wall_s:.1f} tok/s"),
        ("latency mean", f"{statistics.fmean(latencies):.2f} s"),
        ("latency p99", f"{_percentile(latencies, 0.99):.2f} s"),
        ("slices per request", f"{statistics.fmean([a.slices for a in done] or [0]):.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def run_demo(settings: Settings, max_tokens: int, log_dir: Path,
             prompts: tuple[str, ...] = DEMO_PROMPTS) -> bool:
    """Run the demo; True when every prompt got an answer."""
    console = Console()
    console.print(f"starting scls: model [bold]{settings.model}[/], {settings.workers} workers, "
                  f"slice length {settings.slice_length} (logs in {log_dir}) ...")
    with LocalDeployment(settings, log_dir=log_dir) as deployment:
        console.print(f"ready at {deployment.url}; sending {len(prompts)} prompts")
        answers, wall_s = asyncio.run(_ask_all(deployment.url, prompts, max_tokens, console))
    for answer in answers:
        console.print(f"\n[bold cyan]Q:[/] {answer.prompt}")
        if answer.ok:
            console.print(f"[bold green]A:[/] {answer.text.strip()}", highlight=False)
        else:
            console.print(f"[bold red]error:[/] {answer.error}")
    console.print()
    console.print(_summary(answers, wall_s))
    return all(a.ok for a in answers)
