"""What a worker process holds once: the model, the slice engine and its instance record.

:meth:`WorkerRuntime.run_batch` is the body of one RQ job: read the batch, run one slice,
and commit the results fenced. It is a plain method so tests can call it directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from redis.exceptions import RedisError

from services.worker.engine import SliceEngine, SliceInput, SliceOutput, SliceStats
from services.worker.kv_pool import KvPool
from services.worker.token_stream import TokenPublisher
from shared.core.records import BatchRecord, CommitItem, InstanceInfo, RequestRecord, now
from shared.core.states import RequestStatus
from shared.core.store import CommitRejected, Store
from shared.modeling.loading import LoadedModel
from shared.modeling.registry import TextCodec
from shared.obs.logging import bound, get_logger
from shared.obs.prometheus import WorkerMetrics
from shared.policy.costmodel import CostModel
from shared.policy.prefill import pass_tokens_of
from shared.policy.presets import SLICE_MODE
from shared.settings import Settings

log = get_logger(__name__)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """OpenAI semantics: the returned text ends before the first stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


_INCOMPLETE = "\ufffd"  # what decoding gives for the bytes of a character cut short


def text_delta(
    codec: TextCodec, before: Sequence[int], after: Sequence[int], final: bool = False
) -> str:
    """Text that ``after`` adds to ``before`` (both full generated-token lists), such that
    a request's deltas add up to its decoded text (what ``stream: true`` sends).

    A multi-byte character can be cut between two slices: its first bytes decode to
    U+FFFD, which the next slice's decode replaces by the character. So trailing U+FFFD is
    never sent before the request ends: it is counted as not yet sent, and a later slice
    (or the last one, which sends everything) delivers what it became.
    """
    sent = codec.decode(before).rstrip(_INCOMPLETE)
    new = codec.decode(after)
    if not final:
        new = new.rstrip(_INCOMPLETE)
    if new.startswith(sent):
        return new[len(sent):]
    # A decoder that rewrites earlier text (none of ours): send from where they differ.
    common = len(os.path.commonprefix([sent, new]))
    return new[common:]


class WorkerRuntime:
    """One instance: a loaded model serving slice batches from its own queue."""

    mode = SLICE_MODE

    def __init__(
        self,
        settings: Settings,
        store: Store,
        loaded: LoadedModel,
        instance_id: str,
        cost: CostModel,
        memory_budget_bytes: int,
        kv_pool_bytes: int = 0,
    ) -> None:
        """``memory_budget_bytes`` is what batches may use; ``kv_pool_bytes`` (retention on,
        0 off) is kept beside it for requests' K/V between their slices."""
        self.settings = settings
        self.store = store
        self.loaded = loaded
        self.instance_id = instance_id
        self.cost = cost
        self.memory_budget_bytes = memory_budget_bytes
        self.pool = KvPool(kv_pool_bytes) if kv_pool_bytes > 0 else None
        # One KV memory (running sets): between slices the pool holds only the running
        # set, and what a slice does not continue is dropped before it runs.
        self.one_kv_memory = settings.running_set and self.pool is not None
        pass_tokens = pass_tokens_of(cost.prefill_features, cost.prefill_coef)
        # SCLS drops finished rows at once and keeps unfinished rows' K/V; SLS batches
        # (drop_finished=0) run whole generations, keep computing finished rows as static
        # batching does (counted as invalid tokens) and have nothing to retain.
        chunk = cost.prefill_chunk_tokens
        grammars = settings.grammar_cache_size
        self.engines = {True: SliceEngine(loaded, pool=self.pool, pass_tokens=pass_tokens,
                                          prefill_chunk_tokens=chunk,
                                          grammar_cache_size=grammars),
                        False: SliceEngine(loaded, False, pass_tokens=pass_tokens,
                                           prefill_chunk_tokens=chunk,
                                           grammar_cache_size=grammars)}
        self.started_at = now()
        self.publisher = TokenPublisher(store)
        # batch id -> (batch, reason): failed slices whose hand-back Redis refused
        self.unreturned: dict[str, tuple[BatchRecord, str]] = {}
        # This runtime's own registry: several workers may live in one (test) process.
        self.metrics = WorkerMetrics(loaded.device)
        self._occupancy = (0, 0)  # (rows, cache bytes) of the slice running now
        if self.pool is not None:
            pool = self.pool
            self.metrics.watch_pool(lambda: pool.used_bytes, pool.capacity_bytes)

    def start(self) -> None:
        """Start background parts (none for slices; the ILS engine overrides this)."""

    def stop(self) -> None:
        """Stop background parts."""
        self.publisher.close()

    def in_progress(self) -> int:
        """Requests started and not yet committed. A slice runs inside its RQ job, so none
        once the job has returned; the ILS engine overrides this."""
        return 0

    @property
    def queue_name(self) -> str:
        """This instance's RQ queue."""
        return self.store.keys.queue_name(self.instance_id)

    def instance_info(self, state: str = "ready") -> InstanceInfo:
        """The record published at ``<prefix>instance:<id>``."""
        return InstanceInfo(
            id=self.instance_id,
            queue=self.queue_name,
            device=str(self.loaded.device),
            model=self.loaded.info.name,
            memory_budget_bytes=self.memory_budget_bytes,
            kv_bytes_per_token=self.loaded.info.kv_bytes_per_token,
            context_limit=self.loaded.info.context_limit,
            started_at=self.started_at,
            heartbeat_at=now(),
            profile=self.cost.to_json(),
            mode=self.mode,
            state=state,
            kv_pool_bytes=self.pool.capacity_bytes if self.pool is not None else 0,
            kv_pool_used_bytes=self.pool.used_bytes if self.pool is not None else 0,
        )

    @property
    def boot(self) -> str:
        """This run of the worker (K/V locations recorded under another are void)."""
        return repr(self.started_at)

    def heartbeat_fields(self) -> dict[str, int]:
        """What each heartbeat refreshes besides liveness: the KV pool's use, the rows of
        the slice running now and the KV bytes held (that slice's cache by the memory
        model, plus the pool), which ``scls bench`` samples."""
        pool = self.pool.used_bytes if self.pool is not None else 0
        rows, cache = self._occupancy
        return {"kv_pool_used_bytes": pool, "running_rows": rows,
                "kv_in_use_bytes": cache + pool}

    # --- one job ----------------------------------------------------------------------
    def run_batch(self, batch_id: str) -> dict[str, float | int | str]:
        """Run one slice of a batch and commit it. Returns a summary (the job's result)."""
        with bound(batch_id=batch_id, instance=self.instance_id):
            self.retry_hand_backs()
            batch = self.store.get_batch(batch_id)
            deadline = now() + self.settings.slice_timeout_s
            self._drop_released_kv()
            if batch is None or not self.store.start_batch(batch_id, deadline):
                log.warning("batch_gone", reason="swept or expired before it started")
                return {"status": "skipped"}
            try:
                return self._serve(batch)
            except Exception as exc:
                reason = f"{type(exc).__name__} on {self.instance_id}: {exc}"
                log.exception("slice_failed", reason=reason)
                if self.pool is not None:  # whatever it stored is under a dead fence
                    self.pool.discard_all(batch.request_ids)
                self._hand_back(batch, reason)
                raise

    def _hand_back(self, batch: BatchRecord, reason: str) -> None:
        """Requeue a failed slice's batch (fenced). When Redis itself is what failed, the
        hand-back waits in :attr:`unreturned` for :meth:`retry_hand_backs`: the batch
        stays ``running`` on this live instance meanwhile, which nothing else would
        notice before the slice timeout (minutes)."""
        try:
            self.store.requeue_batch(
                batch, reason, self.settings.max_retries, self.settings.result_ttl_s)
        except RedisError as exc:
            self.unreturned[batch.id] = (batch, reason)
            log.warning("hand_back_deferred", batch_id=batch.id, error=str(exc))

    def retry_hand_backs(self) -> int:
        """Hand back the batches whose hand-back failed on a Redis error (called by the
        heartbeat once a beat succeeds, and before each slice); returns how many went."""
        done = 0
        for batch_id, (batch, reason) in list(self.unreturned.items()):
            try:
                self.store.requeue_batch(
                    batch, reason, self.settings.max_retries, self.settings.result_ttl_s)
            except RedisError:
                break  # still away: the next beat tries again
            del self.unreturned[batch_id]
            done += 1
            log.info("hand_back_done", batch_id=batch_id)
        return done

    def _serve(self, batch: BatchRecord) -> dict[str, float | int | str]:
        records = self._held_records(batch)
        if not records:
            return {"status": "empty"}
        records, handed_back = self._shed_misses(records, batch)
        self._drop_discontinued_kv(records)
        rows = [to_slice_input(rec, batch.fences[rec.id], self._kv_fence(rec))
                for rec in records]
        started = time.perf_counter()
        width = max(len(r.context) for r in rows)
        self._occupancy = (len(rows), int(self.cost.kv_cache_bytes(len(rows), width,
                                                                   batch.slice_length)))
        try:
            outputs, stats = self.engines[batch.drop_finished].run_slice(
                rows, batch.slice_length, lambda steps: self.publisher.submit(batch.id, steps))
        finally:
            self._occupancy = (0, 0)
        busy = time.perf_counter() - started
        self.publisher.flush()  # a stream's token entries come before its commit entry
        items = [self._commit_item(rec, out, batch) for rec, out in zip(records, outputs,
                                                                         strict=True)]
        items += [CommitItem(rec.id, batch.fences[rec.id], [], None, "") for rec in handed_back]
        counters = slice_counters(stats, busy, self.cost)
        counters["kv_miss_handbacks"] = len(handed_back)
        counters["kv_evictions"] = len(stats.kv_evicted)
        # docs/design.md §7 early-return ratio: requests that finish within their first slice.
        counters["first_slice_finishes"] = sum(
            1 for rec, out in zip(records, outputs, strict=True)
            if out.finish_reason is not None and rec.slices == 0
        )
        try:
            finished = self.store.commit_slice(
                batch, items, counters, self.settings.result_ttl_s, self.boot
            )
        except CommitRejected as exc:
            log.warning("commit_rejected", reason=str(exc))
            self.metrics.rejected.inc()
            if self.pool is not None:  # kept under fences Redis no longer holds
                self.pool.discard_all(batch.request_ids)
            return {"status": "rejected", "reason": str(exc)}
        # Evictions are cleared after the commit, which may itself have recorded (or
        # forgotten) the location of an evicted request of this very batch.
        self.store.forget_kv(self.instance_id, stats.kv_evicted)
        # Counted only once committed, so the exporter agrees with the stats hashes.
        self.metrics.observe_commit(counters, finished, busy, batch.estimated_s)
        log.info("slice_committed", size=len(items), finished=finished, steps=stats.steps,
                 resumed=stats.resumed_rows, busy_s=round(busy, 4))
        return {"status": "committed", "finished": finished, "busy_s": busy}

    def _shed_misses(self, records: list[RequestRecord], batch: BatchRecord
                     ) -> tuple[list[RequestRecord], list[RequestRecord]]:
        """``(rows to run, rows handed back)``. A row the scheduler planned to resume
        from this pool whose entry has been evicted since (a *miss*) must prefill, and a
        prefill needs more memory than the resumed row it was priced as. While the slice
        would then exceed the batch budget, the youngest missed row is handed back: it is
        committed with no tokens (back to pending, fenced, no retry counted) instead of
        running past the memory the scheduler planned for."""
        if self.pool is None or not batch.drop_finished:
            return records, []
        resumes = {rec.id: self._resumes(rec) for rec in records}
        missed = [rec for rec in records if self._kv_fence(rec) is not None
                  and not resumes[rec.id]]
        kept, shed = list(records), []
        for rec in sorted(missed, key=lambda r: -r.arrival):  # youngest first
            if len(kept) == 1 or self._fits(kept, resumes, batch.slice_length):
                break
            kept.remove(rec)
            shed.append(rec)
        if shed:
            log.warning("kv_miss_handback", requests=[r.id for r in shed],
                        reason="evicted since the batch was planned; the slice would not fit")
        return kept, shed

    def _resumes(self, rec: RequestRecord) -> bool:
        """Whether ``rec``'s K/V is in this pool at the fence Redis names."""
        fence = self._kv_fence(rec)
        return fence is not None and self.pool is not None and self.pool.holds(rec.id, fence)

    def _fits(self, records: list[RequestRecord], resumes: dict[str, bool], s: int) -> bool:
        """Whether a slice of ``records`` (those not in ``resumes`` prefill) fits the
        batch budget by the instance's own memory model."""
        ctx = [len(r.prompt_ids) + len(r.generated_ids) for r in records]
        fresh = [c for r, c in zip(records, ctx, strict=True) if not resumes[r.id]]
        need = self.cost.mixed_memory(len(records), max(ctx), s, len(fresh), max(fresh, default=0))
        return float(need) <= self.memory_budget_bytes

    def _kv_fence(self, rec: RequestRecord) -> int | None:
        """The fence of the K/V Redis says this worker keeps for ``rec`` (None: none)."""
        if self.pool is None or rec.kv_instance != self.instance_id or rec.kv_boot != self.boot:
            return None
        return rec.kv_fence

    def _drop_discontinued_kv(self, records: list[RequestRecord]) -> None:
        """With one KV memory, drop the pool's entries of requests this slice does not
        run: the scheduler priced the slice against the whole batch budget, so nothing
        else may stay beside it (those requests were preempted: they re-prefill wherever
        they go next). Their locations are forgotten in Redis first, so no later plan
        counts on them."""
        if not self.one_kv_memory or self.pool is None:
            return
        running = {rec.id for rec in records}
        gone = [rid for rid in self.pool.request_ids() if rid not in running]
        if gone:
            self.store.forget_kv(self.instance_id, gone)
            self.pool.discard_all(gone)

    def _drop_released_kv(self) -> None:
        """Drop the K/V of requests that ended or moved since the last slice."""
        if self.pool is not None:
            dropped = self.store.take_kv_drops(self.instance_id)
            self.pool.discard_all(dropped)

    def _held_records(self, batch: BatchRecord) -> list[RequestRecord]:
        """The batch's requests that this batch still holds (same batch id and fence)."""
        records = self.store.get_requests(batch.request_ids)
        return [
            rec for rec in records
            if rec is not None and rec.status is RequestStatus.RUNNING
            and rec.batch == batch.id and rec.fence == batch.fences[rec.id]
        ]

    def _commit_item(
        self, rec: RequestRecord, out: SliceOutput, batch: BatchRecord
    ) -> CommitItem:
        codec = self.loaded.codec
        generated = rec.generated_ids + out.new_ids
        final_text = ""
        if out.finish_reason is not None:
            final_text = truncate_at_stop(codec.decode(generated), rec.params.stop)
        return CommitItem(
            request_id=rec.id,
            fence=batch.fences[rec.id],
            new_ids=out.new_ids,
            finish_reason=out.finish_reason,
            delta_text=text_delta(codec, rec.generated_ids, generated,
                                  final=out.finish_reason is not None),
            final_text=final_text,
            kv_retained=out.kv_retained,
            logprobs=tuple(out.logprobs),
        )


def to_slice_input(rec: RequestRecord, fence: int = 0, kv_fence: int | None = None) -> SliceInput:
    """The engine's view of a stored request, run at ``fence``; ``kv_fence`` is the fence
    of the K/V this worker keeps for it (None: none)."""
    return SliceInput(
        request_id=rec.id,
        prompt_ids=rec.prompt_ids,
        generated_ids=rec.generated_ids,
        params=rec.params,
        fence=fence,
        kv_fence=kv_fence,
    )


def slice_counters(
    stats: SliceStats, busy_s: float, cost: CostModel | None = None
) -> dict[str, float]:
    """Counters a commit adds to the global and per-instance stats hashes (docs/design.md §7).

    ``model_busy_s`` is what the instance's own cost model gives the slice that ran (its
    batch size, padded length and the rows of every decode step): ``busy_s / model_busy_s``
    is how much slower (or faster) the engine runs in service than when it was profiled.
    """
    model_busy = 0.0 if cost is None else cost.run_time(
        stats.batch_size, stats.padded_len, stats.decode_rows, stats.prefill_passes
    )
    return {
        "slices": 1,
        "batch_size_sum": stats.batch_size,
        "generated_tokens": stats.generated_tokens,
        "pad_tokens": stats.pad_tokens,
        "invalid_tokens": stats.invalid_tokens,
        "recomputed_tokens": stats.recomputed_tokens,
        "kv_hits": stats.resumed_rows,
        "kv_misses": stats.kv_misses,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "busy_s": busy_s,
        "model_busy_s": model_busy,
    }
