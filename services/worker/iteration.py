"""Iteration-level scheduling (ILS) on our own engine: the baselines ``ils`` and ``ils-vllm``.

:class:`IterationEngine` runs the slice engine's model code, kernels and KV layout (one
left-padded ``StaticCache``, SDPA, the same prefill passes and sampling), but schedules
at every decode step instead of every slice: between two steps it retires finished
requests at once and admits waiting ones, FCFS. It is the honest iteration-level peer of
slice-level scheduling: the two differ only in *when* the batch may change.

One iteration:

1. **Make room** (memory-bounded variant only). When the resident cache would outgrow the
   instance's memory budget by the memory model (:meth:`CostModel.mixed_memory`, the same
   formula the slice engine is planned with), the youngest running request is *preempted
   by recompute*: it leaves the batch, keeps its tokens and goes back to the head of the
   waiting queue; re-admitted, it re-prefills prompt + generated tokens. No admission
   happens in an iteration that preempted (as vLLM's scheduler).
2. **Admit** waiting requests FCFS while the cap allows (``ils``: at most
   ``max_concurrency`` running; ``ils-vllm``: while the memory model says the grown batch
   fits). Admitted requests are prefilled in the slice engine's grouped passes
   (:func:`shared.policy.prefill.prefill_groups`); each pass draws its rows' first token.
3. **Decode** one token for every running request.

The resident cache has fixed row *slots*. A finished request frees its slot at once (the
slot is masked and its output ignored); an admitted request shorter than the cache's
filled width is written into a free slot in place. The cache is rebuilt (live rows copied
into a fresh, tight allocation) only when an admission needs more slots or columns than
it has, when it runs out of columns, or when free slots or dead left columns pile up:
copying the whole cache at every admission would cost about half a decode step on a CPU
and make the baseline look worse than iteration-level scheduling is.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

from services.worker import kv_cache
from services.worker.engine import SliceEngine, SliceInput, TokenSink, _Row
from services.worker.ils import IlsResult, drain_results
from shared.core.records import RequestParams, TokenLogprob
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel
from shared.obs.logging import get_logger
from shared.policy.costmodel import CostModel
from shared.policy.prefill import DEFAULT_PASS_TOKENS, chunk_groups, prefill_groups

log = get_logger(__name__)

#: Decode columns a rebuilt cache gets beyond its filled width: a rebuild for lack of
#: columns happens at most once per this many steps.
GROWTH_COLUMNS = 32

_IDLE_WAIT_S = 0.05  # how long the loop sleeps when nothing runs or waits
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IterationLimits:
    """What bounds the running set: a request count (``ils``) or the memory model
    (``ils-vllm``, with preemption by recompute)."""

    max_concurrency: int  # most requests running at once (ils-vllm: a safety cap only)
    memory_bounded: bool = False  # admit and preempt by the memory model


@dataclass(frozen=True)
class IterationWork:
    """What one iteration computed, for the cost model: ``(rows, padded length)`` of each
    prefill pass, then one decode step of ``decode_rows`` slots at cache width ``width``
    (0 rows: no decode step)."""

    prefill_passes: tuple[tuple[int, int], ...]
    decode_rows: int
    width: int


@dataclass
class IterationStats:
    """Counters since the engine started (read by the runtime and the benchmark)."""

    iterations: int = 0
    rebuilds: int = 0
    in_place: int = 0  # admissions written into a free slot without a rebuild
    rebuild_s: float = 0.0
    preemptions: int = 0
    recomputed_tokens: int = 0  # context re-prefilled by preempted requests
    over_budget_steps: int = 0  # steps whose cache the memory model put over the budget
    running_sum: int = 0  # running requests summed over decode steps (mean = / iterations)


@dataclass(eq=False)
class _Request:
    """A request inside the engine; ``row`` is its current engine row (replaced when a
    preempted request is re-admitted)."""

    spec: SliceInput  # as added
    row: _Row
    admitted_at: int = 0  # admission order, for "youngest first" preemption
    earlier_ids: list[int] = field(default_factory=list)  # drawn before a preemption
    earlier_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def kv_len(self) -> int:
        """Tokens whose K/V the cache holds for this request (all but the last drawn)."""
        return len(self.row.spec.context) + len(self.row.new_ids) - 1


@dataclass
class _Resident:
    """The batch cache: fixed row slots (None = free) filled to column ``filled``."""

    cache: StaticCache
    slots: list[_Request | None]
    capacity: int  # columns allocated
    filled: int  # columns written (the next decode writes column ``filled``)
    mask: torch.Tensor  # [slots, filled] 1 = real token
    positions: torch.Tensor  # [slots] position id of each slot's last fed token

    @property
    def live(self) -> list[_Request]:
        return [r for r in self.slots if r is not None]


_IDLE_PARAMS = RequestParams(max_tokens=1)


class IterationEngine(SliceEngine):
    """Continuous batching on the slice engine's kernels (see the module docstring).

    Thread use: :meth:`add`, :meth:`results` and :meth:`stop` may be called from any thread;
    the model runs on the engine's own loop thread, started by :meth:`start`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        limits: IterationLimits,
        cost: CostModel,
        memory_budget_bytes: int,
        pass_tokens: float = DEFAULT_PASS_TOKENS,
        prefill_chunk_tokens: int = 0,
        grammar_cache_size: int = 256,
    ) -> None:
        super().__init__(loaded, drop_finished_rows=True, pool=None, pass_tokens=pass_tokens,
                         prefill_chunk_tokens=prefill_chunk_tokens,
                         grammar_cache_size=grammar_cache_size)
        self.limits = limits
        self.cost = cost
        self.memory_budget_bytes = memory_budget_bytes
        self.stats = IterationStats()
        #: called on the loop thread after each iteration with what it computed
        self.on_work: Callable[[IterationWork], None] | None = None
        #: called on the loop thread with the tokens streaming requests took
        self.on_stream: TokenSink | None = None
        self._waiting: deque[_Request] = deque()
        self._known: set[str] = set()
        self._resident: _Resident | None = None
        self._done: queue.Queue[IlsResult] = queue.Queue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._admissions = 0
        # Where each just-prefilled request's K/V is: (pass cache, row, end column).
        self._sources: dict[int, tuple[StaticCache, int, int]] = {}

    # ----------------------------------------------------------------------------------------
    # Public
    # ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="ils-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the iteration in progress; every request not finished comes back
        from :meth:`results` with ``error`` set. Idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=_STOP_TIMEOUT_S)
            self._thread = None
        with self._lock:
            left = list(self._waiting) + (self._resident.live if self._resident else [])
            self._waiting.clear()
            self._resident = None
        for request in left:
            self._fail(request, "engine stopped")

    def add(self, spec: SliceInput) -> None:
        """Queue a request (prompt plus any tokens generated elsewhere); its
        :class:`IlsResult` comes back from :meth:`results` exactly once. A request with
        nothing left to generate comes back at once with LENGTH.

        Raises:
            ValueError: the request id is already inside the engine, or it has no tokens.
        """
        with self._lock:
            if spec.request_id in self._known:
                raise ValueError(f"request {spec.request_id!r} is already in the ILS engine")
            row = self._row_state(0, spec, slice_len=1 << 30)
            if row.done:
                self._done.put(IlsResult(spec.request_id, [], FinishReason.LENGTH))
                return
            if self._stopping.is_set():
                self._done.put(IlsResult(spec.request_id, [], FinishReason.ERROR,
                                         error="engine stopped"))
                return
            self._known.add(spec.request_id)
            self._waiting.append(_Request(spec, row))
        self._wake.set()

    def results(self, timeout: float) -> list[IlsResult]:
        """Requests finished since the last call; waits up to ``timeout`` s for the first."""
        return drain_results(self._done, timeout)

    def active(self) -> int:
        """Requests added and not yet finished."""
        with self._lock:
            return len(self._known)

    def running(self) -> int:
        """Requests in the batch now."""
        resident = self._resident
        return 0 if resident is None else len(resident.live)

    def cache_bytes(self) -> int:
        """Bytes of K/V the batch cache holds now (slots x columns allocated)."""
        resident = self._resident
        if resident is None:
            return 0
        return len(resident.slots) * resident.capacity * self.loaded.info.kv_bytes_per_token

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self._waiting and self._resident is None:
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                self.iterate()
            except Exception as exc:  # a failed step fails its batch, not the engine
                log.exception("ils_iteration_failed")
                with self._lock:
                    failed = self._resident.live if self._resident else []
                    self._resident = None
                for request in failed:
                    self._fail(request, f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def iterate(self) -> IterationWork:
        """Run one iteration (make room, admit, decode one step); returns what it
        computed. Called by the loop thread; tests call it directly (without :meth:`start`)."""
        self._on_tokens = self.on_stream
        preempted = self._make_room()
        fresh = [] if preempted else self._admit()
        passes = self._prefill_fresh(fresh)
        self._retire([r for r in fresh if r.row.done])
        self._place([r for r in fresh if not r.row.done])
        work = IterationWork(tuple(passes), 0, 0)
        if self._resident is not None and self._resident.live:
            resident = self._step()
            work = IterationWork(tuple(passes), len(resident.slots), resident.filled)
            self._retire([r for r in resident.live if r.row.done])
        self._compact()
        self.stats.iterations += 1
        if self.on_work is not None:
            self.on_work(work)
        return work

    # ----------------------------------------------------------------------------------------
    # Admission and preemption
    # ----------------------------------------------------------------------------------------

    def _admit(self) -> list[_Request]:
        """Take waiting requests FCFS while the limits allow."""
        resident = self._resident
        live = resident.live if resident is not None else []
        taken: list[_Request] = []
        with self._lock:
            while self._waiting and len(live) + len(taken) < self.limits.max_concurrency:
                candidate = self._waiting[0]
                if self.limits.memory_bounded and (live or taken) and not self._fits(
                        live, taken + [candidate]):
                    break
                taken.append(self._waiting.popleft())
        for request in taken:
            self._admissions += 1
            request.admitted_at = self._admissions
        return taken

    def _fits(self, live: list[_Request], fresh: list[_Request], steps: int = 1) -> bool:
        """Whether a cache holding ``live`` plus ``fresh`` (to prefill), with room for
        ``steps`` more decode steps, fits the budget by the memory model."""
        contexts = [r.kv_len for r in live] + [len(self._context(r)) for r in fresh]
        fresh_len = max(len(self._context(r)) for r in fresh) if fresh else 0
        need = self.cost.mixed_memory(len(contexts), max(contexts), steps, len(fresh),
                                      fresh_len)
        return float(need) <= self.memory_budget_bytes

    def _growth(self, live: list[_Request]) -> int:
        """Free columns a rebuilt cache gets: :data:`GROWTH_COLUMNS`, fewer when the
        memory-bounded variant's budget allows fewer (at least one)."""
        growth = GROWTH_COLUMNS
        if self.limits.memory_bounded:
            while growth > 1 and not self._fits(live, [], growth):
                growth //= 2
        return growth

    def _make_room(self) -> bool:
        """Preempt the youngest running requests while the batch would not fit (memory-
        bounded variant; the capped one only counts such steps). Whether it preempted."""
        resident = self._resident
        if resident is None or not resident.live:
            return False
        live = resident.live
        if self._fits(live, []):
            return False
        if not self.limits.memory_bounded:
            self.stats.over_budget_steps += 1
            return False
        preempted = False
        while len(live) > 1 and not self._fits(live, []):
            youngest = max(live, key=lambda r: r.admitted_at)
            live.remove(youngest)
            self._preempt(resident, youngest)
            preempted = True
        return preempted

    def _preempt(self, resident: _Resident, request: _Request) -> None:
        """Take ``request`` out of the batch, keeping its tokens, to the head of the queue."""
        self._free_slot(resident, resident.slots.index(request))
        row = request.row
        request.earlier_ids += row.new_ids
        request.earlier_logprobs += row.new_logprobs
        spec = request.spec
        resumed = SliceInput(spec.request_id, spec.prompt_ids,
                             spec.generated_ids + request.earlier_ids, spec.params, spec.fence)
        request.row = self._row_state(0, resumed, slice_len=1 << 30)
        self.stats.preemptions += 1
        with self._lock:
            self._waiting.appendleft(request)

    @staticmethod
    def _context(request: _Request) -> list[int]:
        return request.row.spec.context

    # ----------------------------------------------------------------------------------------
    # Prefill and placement
    # ----------------------------------------------------------------------------------------

    def _prefill_fresh(self, fresh: list[_Request]) -> list[tuple[int, int]]:
        """Prefill ``fresh`` in grouped passes, each into its own small cache (kept on the
        request as ``source``); each row draws its first token."""
        lengths = [len(self._context(r)) for r in fresh]
        shapes = []
        for group in chunk_groups(prefill_groups(lengths, self.pass_tokens), lengths,
                                  self.prefill_chunk_tokens):
            rows = [fresh[i] for i in group]
            padded = max(lengths[i] for i in group)
            cache = StaticCache(config=self.model.config, max_cache_len=padded)
            self._prefill([r.row for r in rows], padded, cache)
            for j, request in enumerate(rows):
                self._sources[id(request)] = (cache, j, padded)
            shapes.append((len(rows), padded))
            # A preempted request re-prefills what it had generated: recomputed work.
            self.stats.recomputed_tokens += sum(len(self._context(r)) for r in rows
                                                if r.earlier_ids)
        return shapes

    def _place(self, fresh: list[_Request]) -> None:
        """Put prefilled requests into the batch: into free slots in place when they fit
        the filled width, else by rebuilding the cache with every live request."""
        if not fresh:
            return
        resident = self._resident
        free = [] if resident is None else [i for i, r in enumerate(resident.slots) if r is None]
        fits_width = resident is not None and all(
            r.kv_len <= resident.filled for r in fresh) and resident.filled < resident.capacity
        if resident is not None and fits_width and len(free) >= len(fresh):
            for slot, request in zip(free, fresh, strict=False):
                self._write_slot(resident, slot, request)
            self.stats.in_place += len(fresh)
            self._sources.clear()
            return
        live = (resident.live if resident is not None else []) + fresh
        self._rebuild(live)

    def _write_slot(self, resident: _Resident, slot: int, request: _Request) -> None:
        """Copy a prefilled request's K/V into free ``slot``, right-aligned at ``filled``."""
        cache, row, end = self._sources.pop(id(request))
        n = request.kv_len
        keys, values = kv_cache.read_row(cache, row, end - n, end)
        kv_cache.write_row(resident.cache, slot, keys, values, resident.filled)
        resident.slots[slot] = request
        resident.mask[slot] = 0
        resident.mask[slot, resident.filled - n:] = 1
        resident.positions[slot] = n - 1

    def _rebuild(self, live: list[_Request]) -> None:
        """A fresh cache holding exactly ``live``, filled to their longest K/V plus
        :data:`GROWTH_COLUMNS` free columns."""
        started = time.perf_counter()
        old = self._resident
        self._resident = None
        if not live:
            self._sources.clear()
            return
        filled = max(r.kv_len for r in live)
        capacity = filled + self._growth(live) + 1
        cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        kv_cache.allocate(cache, len(live), self.kv_heads, self.head_dim, self.dtype,
                          self.device, filled)
        mask = torch.zeros((len(live), filled), dtype=torch.long)
        for slot, request in enumerate(live):
            source = self._sources.pop(id(request), None)
            if source is None:
                assert old is not None
                source = (old.cache, old.slots.index(request), old.filled)
            src_cache, row, end = source
            n = request.kv_len
            keys, values = kv_cache.read_row(src_cache, row, end - n, end)
            kv_cache.write_row(cache, slot, keys, values, filled)
            mask[slot, filled - n:] = 1
        mask = mask.to(self.device)
        positions = torch.tensor([r.kv_len - 1 for r in live], dtype=torch.long,
                                 device=self.device)
        self._resident = _Resident(cache, list(live), capacity, filled, mask, positions)
        self._sources.clear()
        self.stats.rebuilds += 1
        self.stats.rebuild_s += time.perf_counter() - started

    # ----------------------------------------------------------------------------------------
    # Decode and retirement
    # ----------------------------------------------------------------------------------------

    def _step(self) -> _Resident:
        """One decode step over every slot (free slots compute an ignored token), after a
        rebuild when the cache has no column left; returns the batch it ran."""
        resident = self._resident
        assert resident is not None
        if resident.filled + 1 > resident.capacity:
            self._rebuild(resident.live)
            resident = self._resident
            assert resident is not None
        rows = [r.row if r is not None else self._idle_row() for r in resident.slots]
        pending = torch.tensor([row.new_ids[-1] if row.new_ids else 0 for row in rows],
                               dtype=torch.long, device=self.device)
        ones = torch.ones((len(rows), 1), dtype=resident.mask.dtype, device=self.device)
        resident.mask = torch.cat([resident.mask, ones], dim=-1)
        resident.positions = resident.positions + 1
        out = self.model(
            input_ids=pending[:, None],
            attention_mask=resident.mask,
            position_ids=resident.positions[:, None],
            past_key_values=resident.cache,
            use_cache=True,
        )
        resident.filled += 1
        logits = out.logits[:, -1, :]
        self._accept(rows, self._select(rows, logits), logits)
        self.stats.running_sum += len(resident.live)
        return resident

    def _idle_row(self) -> _Row:
        """A placeholder row for a free slot: done, so its token is never taken."""
        return _Row(index=-1, spec=SliceInput("", [0], [], _IDLE_PARAMS), budget=0,
                    done=True)

    def _retire(self, finished: list[_Request]) -> None:
        """Hand finished requests back and free their slots."""
        resident = self._resident
        for request in finished:
            if resident is not None and request in resident.slots:
                self._free_slot(resident, resident.slots.index(request))
            self._sources.pop(id(request), None)
            row = request.row
            finish = row.finish or FinishReason.LENGTH
            with self._lock:
                self._known.discard(request.spec.request_id)
            self._done.put(IlsResult(request.spec.request_id, request.earlier_ids + row.new_ids,
                                     finish, logprobs=request.earlier_logprobs
                                     + row.new_logprobs))

    def _free_slot(self, resident: _Resident, slot: int) -> None:
        """Mark ``slot`` free: masked but for its last column (an all-zero mask row would
        make attention NaN for the ignored row)."""
        resident.slots[slot] = None
        resident.mask[slot] = 0
        resident.mask[slot, -1] = 1

    def _compact(self) -> None:
        """Rebuild tight when free slots or dead left columns cost more than a copy:
        slots free with nobody waiting to fill them, or a filled width a quarter wider
        than the longest live request."""
        resident = self._resident
        if resident is None:
            return
        live = resident.live
        if not live:
            self._resident = None
            return
        free = len(resident.slots) - len(live)
        idle_slots = free > 0 and not self._waiting and free * 4 >= len(live)
        longest = max(r.kv_len for r in live)
        dead_columns = resident.filled - longest > max(GROWTH_COLUMNS, resident.filled // 4)
        if idle_slots or dead_columns:
            self._rebuild(live)

    def _fail(self, request: _Request, reason: str) -> None:
        with self._lock:
            self._known.discard(request.spec.request_id)
        self._done.put(IlsResult(request.spec.request_id, [], FinishReason.ERROR, error=reason))
