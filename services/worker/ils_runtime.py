"""ILS worker mode: a continuous-batching engine fed request by request.

The scheduler (presets ``ils``, ``ils-vllm``, ``ils-hf``) claims each request into a batch
of one and enqueues it on an instance's queue like any slice job. Here the RQ job only
*admits* the request into the engine and returns at once; a collector thread commits each
request, fenced like a slice commit, when the engine finishes it. Requests run to
completion in one go (no slicing), which is what iteration-level scheduling means.

The engine is the preset's: our own iteration engine (:mod:`services.worker.iteration`,
capped for ``ils``, memory-bounded for ``ils-vllm``; it streams token by token, samples,
honours stop strings and logprobs as the slice engine does) or transformers' continuous
batching (:mod:`services.worker.ils`, ``ils-hf``: greedy only, no per-token streaming).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from services.worker.ils import IlsConfig, IlsEngine, IlsResult, IterationShape
from services.worker.iteration import IterationEngine, IterationLimits, IterationWork
from services.worker.runtime import WorkerRuntime, text_delta, to_slice_input, truncate_at_stop
from shared.core.records import BatchRecord, CommitItem, RequestRecord, StepTokens, now
from shared.core.store import CommitRejected, Store
from shared.modeling.loading import LoadedModel
from shared.obs.logging import bound, get_logger
from shared.policy.costmodel import CostModel
from shared.policy.prefill import pass_tokens_of
from shared.policy.presets import HF_ENGINE, MEMORY_ENGINE, ils_engine
from shared.settings import Settings

log = get_logger(__name__)


@dataclass
class _Admitted:
    batch: BatchRecord
    record: RequestRecord
    admitted_at: float


class IlsRuntime(WorkerRuntime):
    """A worker runtime whose jobs feed a continuous-batching engine."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        loaded: LoadedModel,
        instance_id: str,
        cost: CostModel,
        memory_budget_bytes: int,
    ) -> None:
        super().__init__(settings, store, loaded, instance_id, cost, memory_budget_bytes)
        self.mode = settings.policy  # the instance publishes which ILS it runs
        engine = ils_engine(settings.policy)
        self.ils: IlsEngine | IterationEngine
        if engine == HF_ENGINE:
            self.ils = IlsEngine(loaded, IlsConfig(max_concurrency=settings.ils_max_concurrency,
                                                   memory_budget_bytes=memory_budget_bytes))
            self.ils.on_iteration = self._price
        else:
            memory = engine == MEMORY_ENGINE
            # Memory bounds the memory-bounded variant; max_running only guards it.
            cap = settings.max_running if memory else settings.ils_max_concurrency
            self.ils = IterationEngine(
                loaded, IterationLimits(cap, memory), cost, memory_budget_bytes,
                pass_tokens_of(cost.prefill_features, cost.prefill_coef),
                cost.prefill_chunk_tokens, settings.grammar_cache_size)
            self.ils.on_work = self._price_work
            self.ils.on_stream = self._publish
        self._admitted: dict[str, _Admitted] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._collector: threading.Thread | None = None
        self._busy_since: float | None = None
        # Seconds the cost model gives the iterations run since the last commit's counters
        # (model_busy_s: the engine's time against its profile).
        self._priced_s = 0.0
        self._engine_counts: dict[str, int] = {}  # engine stats at the last account
        self._uncommitted: list[IlsResult] = []  # finished, commit refused by Redis
        self._busy_carry = 0.0  # busy seconds of commits Redis refused

    def start(self) -> None:
        """Start the engine (with its warm-up) and the collector thread."""
        self.ils.start()
        self._stop.clear()
        self._collector = threading.Thread(target=self._collect_loop, name="ils-collector",
                                           daemon=True)
        self._collector.start()

    def stop(self) -> None:
        """Stop collecting and shut the engine down."""
        self._stop.set()
        if self._collector is not None:
            self._collector.join(timeout=30)
        self.ils.stop()

    def heartbeat_fields(self) -> dict[str, int]:
        """Rows running in the engine and, for our engine, the KV bytes its cache holds
        (transformers' paged cache does not say: no ``kv_in_use_bytes``)."""
        if isinstance(self.ils, IterationEngine):
            return {"kv_pool_used_bytes": 0, "running_rows": self.ils.running(),
                    "kv_in_use_bytes": self.ils.cache_bytes()}
        return {"kv_pool_used_bytes": 0, "running_rows": self.ils.active()}

    def in_progress(self) -> int:
        """Requests admitted and not yet committed."""
        with self._lock:
            return len(self._admitted)

    # --- admission (the RQ job) ----------------------------------------------------------
    def run_batch(self, batch_id: str) -> dict[str, float | int | str]:
        """Admit the batch's request(s) into the engine; the commit comes later."""
        with bound(batch_id=batch_id, instance=self.instance_id):
            batch = self.store.get_batch(batch_id)
            deadline = now() + self.settings.slice_timeout_s
            if batch is None or not self.store.start_batch(batch_id, deadline):
                return {"status": "skipped"}
            records = self._held_records(batch)
            with self._lock:
                for rec in records:
                    self._admitted[rec.id] = _Admitted(batch, rec, time.perf_counter())
                    if self._busy_since is None:
                        self._busy_since = time.perf_counter()
            for rec in records:
                if isinstance(self.ils, IterationEngine):
                    self.ils.add(to_slice_input(rec, batch.fences[rec.id]))
                else:
                    self.ils.add(rec.id, rec.prompt_ids, rec.remaining_tokens,
                                 ignore_eos=rec.params.ignore_eos)
            return {"status": "admitted", "requests": len(records)}

    # --- completion (the collector thread) -------------------------------------------------
    def _collect_loop(self) -> None:
        while not self._stop.is_set():
            try:
                results = self.ils.results(timeout=0.2)
            except Exception:  # keep collecting: the engine's queue never raises, but
                log.exception("ils_collect_failed")  # a dead collector loses everything
                continue
            self._commit_all(results)

    def _commit_all(self, results: list[IlsResult]) -> None:
        """Commit ``results`` and the ones whose commit Redis refused before; a result is
        kept (and its request stays admitted) until Redis takes it: a finished request
        must not be lost to an outage (the engine has already forgotten it)."""
        retry, self._uncommitted = self._uncommitted + results, []
        for k, result in enumerate(retry):
            try:
                self._commit(result)
            except RedisError as exc:
                # Redis is away: keep this result and the rest untried (each try would
                # wait out a timeout), log once per round, retry at a calm pace.
                log.warning("ils_commit_deferred", request_id=result.request_id,
                            waiting=len(retry) - k, error=f"{type(exc).__name__}: {exc}")
                self._uncommitted = retry[k:]
                self._stop.wait(0.5)
                return
            except Exception:  # one bad commit must not stall the rest
                log.exception("ils_commit_failed", request_id=result.request_id)

    def _commit(self, result: IlsResult) -> None:
        """Commit one finished request, fenced. Raises RedisError with nothing consumed:
        the request stays admitted and its counters wait for the retry."""
        with self._lock:
            entry = self._admitted.get(result.request_id)
        if entry is None:
            return
        batch, rec = entry.batch, entry.record
        if result.error:
            self.store.requeue_batch(batch, f"ILS engine: {result.error}",
                                     self.settings.max_retries, self.settings.result_ttl_s)
            with self._lock:
                self._busy_carry += self._account_busy()  # the next commit reports it
                self._admitted.pop(result.request_id, None)
            return
        with self._lock:
            busy = self._account_busy()
            priced = self._account_priced()
            engine_counts = self._account_engine()
        codec = self.loaded.codec
        generated = rec.generated_ids + result.new_ids
        self.publisher.flush()  # a stream's token entries come before its commit entry
        item = CommitItem(
            request_id=rec.id, fence=batch.fences[rec.id], new_ids=result.new_ids,
            finish_reason=result.finish_reason,
            delta_text=text_delta(codec, rec.generated_ids, generated, final=True),
            final_text=truncate_at_stop(codec.decode(generated), rec.params.stop),
            logprobs=tuple(result.logprobs),
        )
        counters = {
            "slices": 1, "batch_size_sum": 1, "generated_tokens": len(result.new_ids),
            "busy_s": busy, "first_slice_finishes": int(rec.slices == 0),
            # request-seconds in the engine: summed over requests and divided by busy time,
            # the mean size of the running batch (shared.obs.metrics.average_batch_size)
            "concurrency_s": time.perf_counter() - entry.admitted_at,
            "model_busy_s": priced,
            **engine_counts,
        }
        try:
            finished = self.store.commit_slice(
                batch, [item], counters, self.settings.result_ttl_s
            )
        except CommitRejected as exc:
            log.warning("commit_rejected", batch_id=batch.id, reason=str(exc))
            self.metrics.rejected.inc()
            with self._lock:
                self._admitted.pop(result.request_id, None)
            return
        except RedisError:
            with self._lock:  # give the counters back: the retry commits them
                self._priced_s += priced
                self._busy_carry += busy
                self._engine_counts = {k: v - engine_counts.get(k, 0)
                                       for k, v in self._engine_counts.items()}
            raise
        with self._lock:
            self._admitted.pop(result.request_id, None)
        # ILS has no slices: the observed duration is the request's time in the engine.
        self.metrics.observe_commit(counters, finished, time.perf_counter() - entry.admitted_at,
                                    batch.estimated_s)

    def _price(self, shape: IterationShape) -> None:
        """transformers' loop thread, before each forward pass: add what the cost model
        gives that iteration (the same pricing as the simulator's ILS engine)."""
        seconds = self.cost.iteration_time(shape.query_lens, shape.keys_total)
        with self._lock:
            self._priced_s += seconds

    def _price_work(self, work: IterationWork) -> None:
        """Our engine's loop thread, after each iteration: its prefill passes plus one
        decode step of its slots at its cache width, as the cost model prices them."""
        seconds = sum(float(self.cost.prefill_time(n, width)) for n, width in
                      work.prefill_passes)
        if work.decode_rows:
            seconds += float(self.cost.decode_step_time(work.decode_rows, work.width))
        with self._lock:
            self._priced_s += seconds

    def _publish(self, steps: list[StepTokens]) -> None:
        """Our engine's loop thread: queue streaming requests' tokens, each under the
        batch (of one) that holds its request."""
        with self._lock:
            batches = {s.request_id: self._admitted.get(s.request_id) for s in steps}
        for step in steps:
            entry = batches[step.request_id]
            if entry is not None:
                self.publisher.submit(entry.batch.id, [step])

    def _account_engine(self) -> dict[str, int]:
        """Our engine's preemptions and recomputed tokens since the last account (call
        with the lock held); none for transformers' engine."""
        if not isinstance(self.ils, IterationEngine):
            return {}
        stats = self.ils.stats
        now_counts = {"preemptions": stats.preemptions,
                      "recomputed_tokens": stats.recomputed_tokens}
        delta = {k: v - self._engine_counts.get(k, 0) for k, v in now_counts.items()}
        self._engine_counts = now_counts
        return delta

    def _account_priced(self) -> float:
        """Priced seconds since the last account (call with the lock held)."""
        priced, self._priced_s = self._priced_s, 0.0
        return priced

    def _account_busy(self) -> float:
        """Wall time the engine had work since the last account (call with the lock held)."""
        carry, self._busy_carry = self._busy_carry, 0.0
        if self._busy_since is None:
            return carry
        t = time.perf_counter()
        busy = t - self._busy_since
        # the request being committed still counts as admitted here
        self._busy_since = t if len(self._admitted) > 1 else None
        return busy + carry

