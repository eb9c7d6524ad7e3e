"""The iteration-level-scheduling (ILS) baseline: transformers' own continuous batching.

:class:`IlsEngine` wraps ``model.init_continuous_batching`` (transformers 5.23): a background
thread runs one forward pass per iteration over a paged KV cache, admitting new requests and
retiring finished ones between iterations. It is an independent peer implementation of
iteration-level scheduling on the same model and hardware as the slice engine, so it is kept
honest:

* **Sized explicitly.** The paged cache holds ``num_blocks`` blocks of ``page_size`` tokens,
  by default ``memory_budget_bytes // (page_size * kv_bytes_per_token)`` -- the same budget
  the slice scheduler plans with, spent on KV only (see :func:`num_blocks_for`), capped at
  ``max_concurrency`` full context windows (more can never be used). Without an explicit
  size transformers reserves 60% of system RAM on the CPU. On top of the cache, it
  preallocates per-iteration buffers that it sizes itself, chiefly an attention
  mask of ``max_batch_tokens x (cache tokens + max_batch_tokens)`` activation-dtype elements
  and SDPA's copy of the KV it reads; they are not counted in the budget.
* **Same kernels.** The model keeps its attention implementation (SDPA): transformers' switch
  to flash attention is turned off, and so is prefix sharing (a prefix cache the slice engine
  does not have; ``IlsConfig.prefix_sharing`` turns it back on).
* **Warmed up** by one real request through the whole path before :meth:`IlsEngine.start`
  returns.
* **Concurrency cap.** At most ``max_concurrency`` requests are inside transformers' engine at
  any time (waiting or decoding); further requests wait in a local FIFO (see
  :meth:`IlsEngine._admit`).

Decoding is greedy only (``do_sample=False``). Stop strings, seeds, temperature and top-p are
not supported in ILS mode: callers must not route such requests here, the engine ignores those
parameters. EOS handling is per request: transformers' ``add_request`` takes the request's own
EOS ids, and a request with ``ignore_eos`` gets none. A request runs in one go from its prompt:
tokens generated earlier (elsewhere) are not fed back.

A forward pass that raises inside transformers' loop is fatal to that loop in 5.23: every
request inside it comes back as an :class:`IlsResult` with ``error`` set, and the engine
restarts the loop for the requests still queued locally.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.core.records import TokenLogprob
from shared.core.states import FinishReason
from shared.modeling.loading import LoadedModel
from shared.obs.logging import get_logger

log = get_logger(__name__)

#: Tokens per forward pass when ``IlsConfig.max_batch_tokens`` is None: long prompts are
#: prefilled in chunks of this size while the other requests keep decoding.
DEFAULT_MAX_BATCH_TOKENS = 512

_WARMUP_TEXT = "Warm-up request for the continuous batching engine."
_WARMUP_NEW_TOKENS = 4
_WARMUP_TIMEOUT_S = 600.0
_POLL_S = 0.1  # how often the collector checks that transformers' loop is still alive
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IlsConfig:
    """Size and limits of the continuous-batching engine."""

    max_concurrency: int  # cap on requests inside the engine at once (its max batch)
    page_size: int = 32  # tokens per KV block
    num_blocks: int | None = None  # None: derived from memory_budget_bytes (see num_blocks_for)
    max_batch_tokens: int | None = None  # None: max(DEFAULT_MAX_BATCH_TOKENS, max_concurrency)
    memory_budget_bytes: int = 1 << 30  # KV cache budget used when num_blocks is None
    prefix_sharing: bool = False  # transformers' prefix cache (off: the other engines lack it)


@dataclass
class IlsResult:
    """A finished request."""

    request_id: str
    new_ids: list[int]  # generated tokens, EOS excluded (same convention as SliceEngine)
    finish_reason: FinishReason  # STOP (EOS), LENGTH (max_new_tokens), ERROR, NEVER_FITS
    error: str | None = None  # set (and new_ids empty) when the request failed
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per new id, when asked


@dataclass(frozen=True)
class _Request:
    """A request as added, after its token limit was capped at the context window."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    ignore_eos: bool


@dataclass(frozen=True)
class IterationShape:
    """What one forward pass of the continuous-batching loop computed: per request in it,
    the tokens it fed (1 for a decoding request, a prompt chunk for a prefilling one), and
    the keys attention read over all of them (each request's cached context plus its new
    tokens)."""

    query_lens: tuple[int, ...]
    keys_total: int


def iteration_shape(kwargs: dict[str, Any]) -> IterationShape | None:
    """The :class:`IterationShape` of a forward call of transformers' continuous batching
    (5.23: packed ``input_ids`` of shape ``[1, tokens]`` with ``cu_seq_lens_q`` the request
    boundaries, and an SDPA mask ``[1, 1, tokens, keys]``); None for any other call."""
    cu_q = kwargs.get("cu_seq_lens_q")
    mask = kwargs.get("attention_mask")
    if cu_q is None or mask is None or getattr(mask, "dim", lambda: 0)() != 4:
        return None
    # A few ints; on CUDA a small copy that waits for the queued host-to-device transfer.
    bounds = [int(v) for v in cu_q.tolist()]
    lens = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    return IterationShape(query_lens=lens, keys_total=int(mask.shape[-1]))


def num_blocks_for(memory_budget_bytes: int, page_size: int, kv_bytes_per_token: int) -> int:
    """KV blocks that fit the budget: ``budget // (page_size * kv_bytes_per_token)``."""
    return memory_budget_bytes // (page_size * kv_bytes_per_token)


class IlsEngine:
    """Continuous batching over one loaded model, fed request by request.

    Thread-safe: :meth:`add` and :meth:`results` may be called from different threads. Two
    threads run while the engine is started: transformers' generation loop and a collector
    that moves finished requests to :meth:`results` and admits queued ones. Always call
    :meth:`stop`: transformers' loop thread is not a daemon and keeps a process alive.
    """

    def __init__(self, loaded: LoadedModel, config: IlsConfig) -> None:
        """Wrap ``loaded``; nothing runs until :meth:`start`.

        Raises:
            ValueError: a non-positive cap or page size, or a budget too small for one block.
        """
        if config.max_concurrency < 1 or config.page_size < 4:
            raise ValueError(f"need max_concurrency >= 1 and page_size >= 4, got {config}")
        self.loaded = loaded
        self.config = config
        self.num_blocks = self._derive_num_blocks()
        self.max_batch_tokens = config.max_batch_tokens or max(
            DEFAULT_MAX_BATCH_TOKENS, config.max_concurrency
        )
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()  # added, not yet inside transformers' engine
        self._inside: dict[str, _Request] = {}  # engine id -> request inside the engine
        self._done: queue.Queue[IlsResult] = queue.Queue()
        self._outstanding = 0  # added and not yet returned by results()
        self._counter = 0
        self._manager: Any = None
        self._collector: threading.Thread | None = None
        self._closing = False
        self._hook: Any = None
        # Called from transformers' loop thread before every forward pass after the warm-up
        # with the iteration's shape (see iteration_shape).
        self.on_iteration: Callable[[IterationShape], None] | None = None

    # ----------------------------------------------------------------------------------------
    # Public
    # ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start transformers' loop, run one warm-up request to the end, start the collector.

        Raises:
            RuntimeError: already started, or the warm-up failed (the loop is stopped again).
        """
        if self._manager is not None:
            raise RuntimeError("IlsEngine.start() called twice")
        self._manager = self._build_manager()
        self._manager.start()
        try:
            self._warm_up()
        except BaseException:
            self._manager.stop(block=True, hard_stop=True, timeout=_STOP_TIMEOUT_S)
            raise
        self._hook = self.loaded.model.register_forward_pre_hook(self._observe, with_kwargs=True)
        self._collector = threading.Thread(target=self._collect, name="ils-collector", daemon=True)
        self._collector.start()

    def _observe(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: hand the iteration's shape to ``on_iteration``."""
        callback = self.on_iteration
        if callback is None:
            return
        shape = iteration_shape(kwargs)
        if shape is not None:
            callback(shape)

    def add(
        self, request_id: str, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False
    ) -> None:
        """Queue a request; its :class:`IlsResult` comes back from :meth:`results` exactly once.

        Requests that cannot run (empty prompt, token ids outside the vocabulary, more KV than
        the whole cache) come back at once with ``error`` set; one with nothing to generate
        (``max_new_tokens <= 0`` or a prompt filling the context window) at once with LENGTH.
        After :meth:`stop`, requests come back at once with ``error`` set.

        Raises:
            RuntimeError: :meth:`start` was never called.
            ValueError: ``request_id`` is already added and not yet returned by the engine.
        """
        if self._manager is None:
            raise RuntimeError("IlsEngine.add() before start()")
        request = self._capped(request_id, list(prompt_ids), max_new_tokens, ignore_eos)
        with self._lock:
            if self._is_known(request_id):
                raise ValueError(f"request {request_id!r} is already in the ILS engine")
            self._outstanding += 1
            early = self._early_result(request)
            if early is not None:
                self._done.put(early)
                return
            self._waiting.append(request)
            self._admit()

    def results(self, timeout: float) -> list[IlsResult]:
        """Requests finished since the last call; waits up to ``timeout`` s for the first one."""
        found = drain_results(self._done, timeout)
        with self._lock:
            self._outstanding -= len(found)
        return found

    def active(self) -> int:
        """Requests added and not yet returned by :meth:`results`."""
        with self._lock:
            return self._outstanding

    def stop(self) -> None:
        """Stop at once: unfinished requests come back from :meth:`results` with ``error`` set.

        Joins transformers' loop (which finishes the forward pass in progress first) and the
        collector. Idempotent.
        """
        with self._lock:
            if self._manager is None or self._closing:
                return
            self._closing = True  # from now on nothing is admitted and the loop is not restarted
        # A hard stop fails the requests inside the loop instead of running them to the end.
        self._manager.stop(block=True, hard_stop=True, timeout=_STOP_TIMEOUT_S)
        if self._collector is not None:
            self._collector.join(timeout=_STOP_TIMEOUT_S)
        if self._hook is not None:
            self._hook.remove()

    # ----------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------

    def _derive_num_blocks(self) -> int:
        """Blocks of the paged cache: explicit, or the budget's share capped at what can be used.

        The cap is ``max_concurrency`` requests at the full context window: more blocks can
        never be used, and transformers preallocates an attention mask that grows with the
        cache (a 2 GiB budget would give tiny-random 4 M cache tokens and a 4 GiB mask).
        """
        config, info = self.config, self.loaded.info
        if config.num_blocks is not None:
            blocks = config.num_blocks
        else:
            budget = num_blocks_for(
                config.memory_budget_bytes, config.page_size, info.kv_bytes_per_token
            )
            usable = config.max_concurrency * math.ceil(info.context_limit / config.page_size)
            blocks = min(budget, usable)
        if blocks < 1:
            raise ValueError(f"KV budget too small for one block of {config.page_size} tokens")
        return blocks

    def _build_manager(self) -> Any:
        """transformers' ContinuousBatchingManager, sized explicitly (not started)."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        generation = GenerationConfig(
            do_sample=False,  # CB reads do_sample with a default of True: greedy must be explicit
            max_new_tokens=1,  # every request passes its own
            eos_token_id=self._eos_ids(ignore_eos=False),
            pad_token_id=self.loaded.codec.pad_id,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=self.config.page_size,
            num_blocks=self.num_blocks,
            max_batch_tokens=self.max_batch_tokens,
            # Also a per-iteration limit inside transformers; the local FIFO is what bounds the
            # requests inside the engine (see _admit).
            max_requests_per_batch=self.config.max_concurrency,
            allow_block_sharing=self.config.prefix_sharing,
            auto_switch_to_flash=False,  # same attention kernels as the other engines
            cpu_offload_space=0.0,  # preempted requests are recomputed, never swapped to RAM
        )
        return self.loaded.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=cb_config
        )

    def _warm_up(self) -> None:
        """Run one short request through the loop and wait for it (prefill and decode paths)."""
        prompt = self.loaded.codec.encode(_WARMUP_TEXT) or [self.loaded.codec.pad_id]
        engine_id = "ils-warmup"
        self._manager.add_request(
            prompt, request_id=engine_id, max_new_tokens=_WARMUP_NEW_TOKENS, eos_token_id=-1
        )
        deadline = time.monotonic() + _WARMUP_TIMEOUT_S
        while time.monotonic() < deadline:
            output = self._manager.get_result(timeout=_POLL_S)
            if output is not None and output.request_id == engine_id:
                if output.error is not None:
                    raise RuntimeError(f"ILS warm-up request failed: {output.error}")
                return
            if output is None and not self._manager.is_running():
                fatal = self._manager.background_thread_status.fatal_error
                raise RuntimeError(f"ILS engine died during warm-up: {fatal}")
        raise RuntimeError(f"ILS warm-up did not finish in {_WARMUP_TIMEOUT_S:.0f} s")

    # ----------------------------------------------------------------------------------------
    # Admission (callers hold self._lock)
    # ----------------------------------------------------------------------------------------

    def _capped(
        self, request_id: str, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool
    ) -> _Request:
        """The request with its token limit capped at the context window, like SliceEngine."""
        room = self.loaded.info.context_limit - len(prompt_ids)
        return _Request(request_id, prompt_ids, min(max_new_tokens, room), ignore_eos)

    def _is_known(self, request_id: str) -> bool:
        """Whether ``request_id`` is queued locally or inside transformers' engine."""
        queued = any(r.request_id == request_id for r in self._waiting)
        return queued or any(r.request_id == request_id for r in self._inside.values())

    def _early_result(self, request: _Request) -> IlsResult | None:
        """The result of a request that must not enter the engine, or None if it may."""
        rid, prompt = request.request_id, request.prompt_ids
        if self._closing:
            return _failed(rid, "ILS engine stopped")
        if not prompt:
            return _failed(rid, "empty prompt: nothing to prefill")
        vocab = self.loaded.info.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            # An out-of-range id would raise inside the forward pass, which kills the whole loop.
            return _failed(rid, f"prompt token id outside the vocabulary [0, {vocab})")
        if request.max_new_tokens <= 0:
            return IlsResult(rid, [], FinishReason.LENGTH)
        blocks = math.ceil((len(prompt) + request.max_new_tokens) / self.config.page_size)
        if blocks > self.num_blocks:
            # Alone in the cache it would still run out of blocks: transformers then raises
            # "no requests can be scheduled" and the whole loop dies.
            reason = f"needs {blocks} KV blocks, the cache has {self.num_blocks}"
            return IlsResult(rid, [], FinishReason.NEVER_FITS, error=reason)
        return None

    def _admit(self) -> None:
        """Move queued requests into transformers' engine while fewer than the cap are inside.

        This local FIFO is what enforces the cap. transformers' ``max_requests_per_batch`` only
        limits the requests of one forward pass: it does not bound the requests admitted into
        its scheduler (holding KV blocks, or preempted and requeued), and ``num_blocks`` /
        ``max_batch_tokens`` bound tokens, not requests.
        """
        while self._waiting and len(self._inside) < self.config.max_concurrency:
            if self._closing or not self._manager.is_running():
                return  # the collector restarts a dead loop and calls _admit again
            request = self._waiting.popleft()
            self._counter += 1
            engine_id = f"ils-{self._counter}"  # own ids: no clash with re-added request ids
            self._inside[engine_id] = request
            added = self._manager.add_request(
                request.prompt_ids,
                request_id=engine_id,
                max_new_tokens=request.max_new_tokens,
                eos_token_id=self._eos_ids(request.ignore_eos),
            )
            if added is None:  # refused: the loop is stopping or died after the check above
                del self._inside[engine_id]
                self._done.put(_failed(request.request_id, "ILS engine refused the request"))

    def _eos_ids(self, ignore_eos: bool) -> list[int]:
        """EOS ids for transformers; [-1] means none (it drops negative ids)."""
        eos = sorted(self.loaded.codec.eos_ids)
        return [-1] if ignore_eos or not eos else eos

    # ----------------------------------------------------------------------------------------
    # Collector thread
    # ----------------------------------------------------------------------------------------

    def _collect(self) -> None:
        """Move finished requests to the results queue until the engine is stopped."""
        while True:
            output = self._manager.get_result(timeout=_POLL_S)
            if output is not None:
                self._finish(output)
            elif not self._manager.is_running():
                self._drain()  # every output of the dead loop is queued before it exits
                with self._lock:
                    if self._closing:
                        self._fail_all("ILS engine stopped")
                        return
                    if not self._restart():
                        return

    def _finish(self, output: Any) -> None:
        """Turn one transformers output into an IlsResult and admit the next request."""
        with self._lock:
            request = self._inside.pop(output.request_id, None)
            if request is None:
                return  # not ours (warm-up), or already failed by a restart
            self._done.put(_to_result(request, output, self.loaded.codec.eos_ids))
            self._admit()

    def _drain(self) -> None:
        """Finish every output left in transformers' output queue (its loop has exited)."""
        while True:
            output = self._manager.get_result(timeout=0)
            if output is None:
                return
            self._finish(output)

    def _restart(self) -> bool:
        """Restart transformers' loop after a fatal error (lock held); False if that failed.

        Requests that were inside it and got no output (put on its input queue after it
        drained it while dying) are failed, then the local FIFO is admitted again. If the
        restart itself fails, the engine closes: every request comes back with an error.
        """
        fatal = self._manager.background_thread_status.fatal_error
        log.error("ils_loop_died", error=str(fatal), lost=len(self._inside))
        while not self._manager.input_queue.empty():
            self._manager.input_queue.get_nowait()  # lost requests are failed just below
        for request in self._inside.values():
            self._done.put(_failed(request.request_id, f"ILS engine loop died: {fatal}"))
        self._inside.clear()
        try:
            self._manager.start()
        except Exception as exc:  # a loop that cannot restart must not strand requests
            log.exception("ils_restart_failed")
            self._closing = True
            self._fail_all(f"ILS engine loop could not restart: {exc}")
            return False
        self._admit()
        return True

    def _fail_all(self, reason: str) -> None:
        """Fail every request still inside the engine or queued locally (lock held)."""
        pending: Iterable[_Request] = [*self._inside.values(), *self._waiting]
        for request in pending:
            self._done.put(_failed(request.request_id, reason))
        self._inside.clear()
        self._waiting.clear()


def drain_results(done: queue.Queue[IlsResult], timeout: float) -> list[IlsResult]:
    """Everything in ``done``, waiting up to ``timeout`` s for the first item."""
    try:
        found = [done.get(timeout=max(0.0, timeout))]
    except queue.Empty:
        return []
    while True:
        try:
            found.append(done.get_nowait())
        except queue.Empty:
            return found


def _failed(request_id: str, error: str) -> IlsResult:
    """An error result (no tokens)."""
    return IlsResult(request_id, [], FinishReason.ERROR, error=error)


def _to_result(request: _Request, output: Any, eos_ids: frozenset[int]) -> IlsResult:
    """IlsResult of a transformers GenerationOutput for ``request``.

    transformers keeps the EOS token at the end of the output; SliceEngine never returns it.
    """
    if output.error is not None:
        return _failed(request.request_id, str(output.error))
    tokens = [int(t) for t in output.generated_tokens]
    if not request.ignore_eos and tokens and tokens[-1] in eos_ids:
        return IlsResult(request.request_id, tokens[:-1], FinishReason.STOP)
    return IlsResult(request.request_id, tokens, FinishReason.LENGTH)
