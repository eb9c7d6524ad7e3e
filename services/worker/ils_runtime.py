"""ILS worker mode: transformers' continuous batching fed request by request.

The scheduler (preset ``ils``) claims each request into a batch of one and enqueues it on
an instance's queue like any slice job. Here the RQ job only *admits* the request into the
continuous-batching engine and returns at once; a collector thread commits each request,
fenced like a slice commit, when the engine finishes it. Requests run to completion in one
go (no slicing), which is what iteration-level scheduling means.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from services.worker.ils import IlsConfig, IlsEngine, IlsResult, IterationShape
from services.worker.runtime import WorkerRuntime
from shared.core.records import BatchRecord, CommitItem, RequestRecord, now
from shared.core.store import CommitRejected, Store
from shared.modeling.loading import LoadedModel
from shared.obs.logging import bound, get_logger
from shared.policy.costmodel import CostModel
from shared.policy.presets import CONTINUOUS_MODE
from shared.settings import Settings

log = get_logger(__name__)


@dataclass
class _Admitted:
    batch: BatchRecord
    record: RequestRecord
    admitted_at: float


class IlsRuntime(WorkerRuntime):
    """A worker runtime whose jobs feed a continuous-batching engine."""

    mode = CONTINUOUS_MODE

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
        self.ils = IlsEngine(
            loaded,
            IlsConfig(
                max_concurrency=settings.ils_max_concurrency,
                memory_budget_bytes=memory_budget_bytes,
            ),
        )
        self._admitted: dict[str, _Admitted] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._collector: threading.Thread | None = None
        self._busy_since: float | None = None
        # Seconds the cost model gives the iterations run since the last commit's counters
        # (model_busy_s: the engine's time against its profile).
        self._priced_s = 0.0
        self.ils.on_iteration = self._price

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
                self.ils.add(rec.id, rec.prompt_ids, rec.remaining_tokens,
                             ignore_eos=rec.params.ignore_eos)
            return {"status": "admitted", "requests": len(records)}

    # --- completion (the collector thread) -------------------------------------------------
    def _collect_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for result in self.ils.results(timeout=0.2):
                    self._commit(result)
            except Exception:  # keep collecting: one bad commit must not stall the rest
                log.exception("ils_collect_failed")

    def _commit(self, result: IlsResult) -> None:
        with self._lock:
            entry = self._admitted.pop(result.request_id, None)
            busy = self._account_busy()
            priced = self._account_priced()
        if entry is None:
            return
        batch, rec = entry.batch, entry.record
        if result.error:
            self.store.requeue_batch(batch, f"ILS engine: {result.error}",
                                     self.settings.max_retries, self.settings.result_ttl_s)
            return
        generated = rec.generated_ids + result.new_ids
        item = CommitItem(
            request_id=rec.id, fence=batch.fences[rec.id], new_ids=result.new_ids,
            finish_reason=result.finish_reason,
            delta_text=self.loaded.codec.decode(result.new_ids),
            final_text=self.loaded.codec.decode(generated),
        )
        counters = {
            "slices": 1, "batch_size_sum": 1, "generated_tokens": len(result.new_ids),
            "busy_s": busy, "first_slice_finishes": int(rec.slices == 0),
            # request-seconds in the engine: summed over requests and divided by busy time,
            # the mean size of the running batch (shared.obs.metrics.average_batch_size)
            "concurrency_s": time.perf_counter() - entry.admitted_at,
            "model_busy_s": priced,
        }
        try:
            finished = self.store.commit_slice(
                batch, [item], counters, self.settings.result_ttl_s
            )
        except CommitRejected as exc:
            log.warning("commit_rejected", batch_id=batch.id, reason=str(exc))
            self.metrics.rejected.inc()
            return
        # ILS has no slices: the observed duration is the request's time in the engine.
        self.metrics.observe_commit(counters, finished, time.perf_counter() - entry.admitted_at,
                                    batch.estimated_s)

    def _price(self, shape: IterationShape) -> None:
        """transformers' loop thread, before each forward pass: add what the cost model
        gives that iteration (the same pricing as the simulator's ILS engine)."""
        seconds = self.cost.iteration_time(shape.query_lens, shape.keys_total)
        with self._lock:
            self._priced_s += seconds

    def _account_priced(self) -> float:
        """Priced seconds since the last account (call with the lock held)."""
        priced, self._priced_s = self._priced_s, 0.0
        return priced

    def _account_busy(self) -> float:
        """Wall time the engine had work since the last account (call with the lock held)."""
        if self._busy_since is None:
            return 0.0
        t = time.perf_counter()
        busy = t - self._busy_since
        self._busy_since = t if self._admitted else None
        return busy

