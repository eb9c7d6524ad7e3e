"""The slice engine: run one bounded slice of generation for a static batch of requests.

A slice batch is one left-padded ``StaticCache``. Each row enters it one of two ways:

* **resumed**: the instance's KV pool (:mod:`services.worker.kv_pool`) holds the row's
  K/V from its previous slice, for exactly its context but the last token. It is moved
  in (layer by layer, each layer let go once copied) and the row feeds only that last
  token: no prefill.
* **prefilled**: everything else (a new request, or one whose cache was evicted, lives on
  another instance or is stale). Prefilled rows are grouped into passes of similar length
  (:func:`shared.policy.prefill.prefill_groups`), so padding is computed only where a
  shared pass is cheaper than another one; a pass yields the row's first token.

Then up to ``slice_len`` decode steps run with an explicit attention mask (zeros over the
padding) and explicit position ids (each row's true length + step): omitting either gives
wrong logits for left-padded rows. Finished rows leave the batch at once. Every unfinished
row's K/V moves back to the pool at exact length (layer by layer again, the cache's layer
released after each), for its next slice. Without a pool
(retention off) every slice re-prefills every row's whole context.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

from services.worker import kv_cache
from services.worker.kv_pool import KvEntry, KvPool
from services.worker.sampling import (
    RowTokens,
    adjust_logits,
    adjusts_logits,
    select_tokens,
    token_logprobs,
)
from shared.core.records import RequestParams, StepTokens, TokenLogprob
from shared.core.states import FinishReason
from shared.grammar.compiler import GrammarCompiler
from shared.grammar.matcher import RowGrammar, allocate_bitmask, apply_bitmask, fill_bitmask
from shared.grammar.spec import GrammarSpec
from shared.grammar.vocab import vocab_from_codec
from shared.modeling.loading import LoadedModel
from shared.policy.prefill import DEFAULT_PASS_TOKENS, chunk_groups, prefill_groups


@dataclass
class SliceInput:
    """One row of a slice."""

    request_id: str
    prompt_ids: list[int]
    generated_ids: list[int]  # tokens generated in earlier slices
    params: RequestParams  # how the request is generated; the same for every slice
    fence: int = 0  # this slice's fence for the request: stored with the K/V it leaves
    kv_fence: int | None = None  # fence of the retained K/V Redis names here (None: none)

    @property
    def context(self) -> list[int]:
        """Prompt plus tokens generated so far."""
        return self.prompt_ids + self.generated_ids


@dataclass
class SliceOutput:
    """What one row produced in a slice."""

    request_id: str
    new_ids: list[int]  # tokens generated in THIS slice (an EOS token is never included)
    finish_reason: FinishReason | None  # None = unfinished; STOP or LENGTH otherwise
    kv_retained: bool = False  # its K/V is in the pool, written at the input's fence
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per new id, if asked


# Called after each step with the tokens streaming rows took (see run_slice).
TokenSink = Callable[[list[StepTokens]], None]


@dataclass
class SliceStats:
    """Measurements of one slice, for the scheduler's cost model and the benchmark."""

    batch_size: int  # rows run (prefilled + resumed)
    padded_len: int  # L: longest context (prompt + generated) in the batch
    steps: int  # most tokens one row produced: prefill's first + decode steps run
    prefill_s: float  # prefill passes and cache assembly, until the first decode step
    decode_s: float
    pad_tokens: int  # padding computed by the prefill passes
    invalid_tokens: int  # decode positions computed for rows that had already finished
    recomputed_tokens: int  # context tokens re-prefilled for rows that had generated_ids
    generated_tokens: int  # sum of len(new_ids)
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA, None on CPU
    # Rows in the batch at each decode step (finished rows may have been dropped): with
    # the prefill passes, what the cost model needs to price the slice that ran.
    decode_rows: tuple[int, ...] = ()
    prefill_passes: tuple[tuple[int, int], ...] = ()  # (rows, padded length) per pass
    resumed_rows: int = 0  # rows that continued from the KV pool (no prefill)
    kv_misses: int = 0  # rows with generated tokens that the pool could not resume
    kv_stored: int = 0  # unfinished rows whose K/V is in the pool at the end
    kv_evicted: tuple[str, ...] = ()  # request ids evicted from the pool by this slice


@dataclass(eq=False)  # rows are compared by identity
class _Row:
    """Per-row state while a slice runs."""

    index: int  # position in the caller's list
    spec: SliceInput
    budget: int  # tokens this row may still produce in this slice
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    done: bool = False  # finished, or its slice budget is used up
    entry: KvEntry | None = None  # retained K/V it resumes from
    cached: int = 0  # context tokens in the cache before the first decode step
    retained: bool = False  # its K/V went to the pool at the end
    grammar: RowGrammar | None = None  # the state of the grammar its output must match

    @property
    def position(self) -> int:
        """Index, within the request's generated tokens, of the next token to draw."""
        return len(self.spec.generated_ids) + len(self.new_ids)


@dataclass
class _Batch:
    """Device tensors of the rows still being decoded, in the order of ``rows``."""

    rows: list[_Row]
    cache: StaticCache
    width: int  # columns before the first decode step
    mask: torch.Tensor  # [b, columns so far] 1 = real token
    positions: torch.Tensor  # [b] position id of each row's last fed token
    fed: int = 0  # decode steps fed so far


class SliceEngine:
    """Runs slices of generation on one loaded model (not thread-safe: one slice at a time)."""

    def __init__(
        self,
        loaded: LoadedModel,
        drop_finished_rows: bool = True,
        pool: KvPool | None = None,
        pass_tokens: float = DEFAULT_PASS_TOKENS,
        prefill_chunk_tokens: int = 0,
        grammar_cache_size: int = 256,
    ) -> None:
        """Wrap ``loaded``.

        Args:
            drop_finished_rows: finished rows leave the batch at once; without it they keep
                being computed (and counted as ``invalid_tokens``), as static batching does.
            pool: where unfinished rows' K/V is kept between slices (None: retention off).
            pass_tokens: a prefill pass's fixed cost in tokens' worth; ``inf`` prefills
                every row in one padded pass (the profiler's shape).
            prefill_chunk_tokens: most tokens (rows x padded length) in one prefill pass,
                which bounds its activations (0: no limit; the profiler's shape).
            grammar_cache_size: compiled grammars kept (structured outputs).
        """
        self.loaded = loaded
        self.model = loaded.model
        self.codec = loaded.codec
        self.device = loaded.device
        self.drop_finished_rows = drop_finished_rows
        self.context_limit = loaded.info.context_limit
        self.pool = pool
        self.pass_tokens = pass_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._on_tokens: TokenSink | None = None  # the running slice's (run_slice sets it)
        # Called after each cache layer moves in or out (tests measure what is held then).
        self.on_layer: kv_cache.LayerHook | None = None
        config = self.model.config.get_text_config(decoder=True)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None)
                          or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                             or config.hidden_size // config.num_attention_heads)
        self.dtype = next(self.model.parameters()).dtype
        self.vocab_size = int(config.vocab_size)  # the logits' width
        self.grammar_cache_size = grammar_cache_size
        self._grammars: GrammarCompiler | None = None
        # What masking has cost since the engine was built: seconds in computing and
        # applying masks and advancing grammars, and the tokens masked (the profiler fits
        # CostModel.grammar_token_s from them).
        self.mask_s = 0.0
        self.masked_tokens = 0

    @property
    def grammars(self) -> GrammarCompiler:
        """This engine's grammar compiler and cache (built on the first grammar: about
        0.2 s for a 49k-token vocabulary)."""
        if self._grammars is None:
            vocab = vocab_from_codec(self.codec, model_vocab_size=self.vocab_size)
            self._grammars = GrammarCompiler(vocab, cache_size=self.grammar_cache_size)
        return self._grammars

    # ----------------------------------------------------------------------------------------
    # Public
    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_slice(
        self, rows: list[SliceInput], slice_len: int, on_tokens: TokenSink | None = None
    ) -> tuple[list[SliceOutput], SliceStats]:
        """Generate up to ``slice_len`` tokens for every row; outputs follow the input order.

        ``on_tokens``, if given, is called after every step (each prefill pass and each
        decode step) with the tokens taken by rows whose request streams
        (``params.stream``); it is not called for steps where none did.

        A row finishes with STOP when it emits an EOS id (unless ``ignore_eos``; the EOS token
        is not returned) or when its generated text so far contains a stop string (the token
        is kept; the caller truncates the text). It finishes with LENGTH when its generated
        tokens reach ``max_tokens``, or the context reaches the model's context limit. The
        slice returns early once every row has finished.

        Raises:
            ValueError: ``slice_len < 1``, or a row to run has no context tokens at all.
        """
        if slice_len < 1:
            raise ValueError(f"slice_len must be >= 1, got {slice_len}")
        self._on_tokens = on_tokens
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        states = [self._row_state(i, r, slice_len) for i, r in enumerate(rows)]
        live = [s for s in states if not s.done]
        stats = self._empty_stats()
        if live:
            stats = self._run(live)
        stats.generated_tokens = sum(len(s.new_ids) for s in states)
        # Asked after every row was stored: a later row's entry may have evicted an earlier.
        for s in states:
            s.retained = s.retained and self.pool is not None and self.pool.holds(
                s.spec.request_id, s.spec.fence)
        stats.kv_stored = sum(s.retained for s in states)
        outputs = [SliceOutput(s.spec.request_id, s.new_ids, s.finish, s.retained,
                               s.new_logprobs) for s in states]
        return outputs, stats

    # ----------------------------------------------------------------------------------------
    # Slice steps
    # ----------------------------------------------------------------------------------------

    def _row_state(self, index: int, row: SliceInput, slice_len: int) -> _Row:
        """Slice state of ``row``; rows with nothing left to generate are done at once."""
        context = len(row.prompt_ids) + len(row.generated_ids)
        remaining = row.params.max_tokens - len(row.generated_ids)
        # Positions beyond the context window are never valid: stop there with LENGTH.
        remaining = min(remaining, self.context_limit - context)
        state = _Row(index=index, spec=row, budget=min(slice_len, remaining))
        if row.params.grammar and state.budget > 0:
            # Rebuilt from the tokens generated so far: the same state whatever slices,
            # instances or restarts came before (docs/structured-outputs.md).
            compiled = self.grammars.compile(GrammarSpec.from_key(row.params.grammar))
            state.grammar = RowGrammar.start(compiled, row.generated_ids)
        if state.budget <= 0:
            state.done, state.finish = True, FinishReason.LENGTH
            if self.pool is not None:
                self.pool.discard(row.request_id)
        elif context == 0:
            raise ValueError(f"request {row.request_id}: no prompt tokens to prefill")
        return state

    def _resume_from_pool(self, live: list[_Row]) -> int:
        """Attach each row's retained K/V when the pool holds a valid one; count misses."""
        misses = 0
        for row in live:
            context = row.spec.context
            if self.pool is not None and row.spec.generated_ids:
                row.entry = self.pool.take(row.spec.request_id, row.spec.kv_fence, context[:-1])
                misses += row.entry is None
            row.cached = len(context) - 1 if row.entry is not None else len(context)
        return misses

    def _run(self, live: list[_Row]) -> SliceStats:
        """Assemble the batch, decode until each row is done; return the slice's stats."""
        misses = self._resume_from_pool(live)
        fresh = [r for r in live if r.entry is None]
        resumed = [r for r in live if r.entry is not None]
        start = time.perf_counter()
        batch, passes = self._assemble(live, fresh)
        self._sync()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        # A resumed row's first decode feeds its last generated token; a prefilled row's
        # feeds the token its prefill drew (already taken).
        pending = torch.tensor(
            [r.spec.context[-1] if r.entry is not None else r.new_ids[-1] if r.new_ids else 0
             for r in batch.rows], dtype=torch.long, device=self.device)
        for row in resumed:
            row.entry = None  # moved into the batch (its layers are already gone)
        invalid, decode_rows = 0, []
        while any(not r.done for r in batch.rows):
            batch, pending = self._shrink(batch, pending)
            invalid += sum(r.done for r in batch.rows)
            decode_rows.append(len(batch.rows))
            logits = self._decode(batch, pending)
            pending = self._select(batch.rows, logits)
            self._accept(batch.rows, pending, logits)
        evicted = self._retain(batch, batch.rows, keep=None)  # the cache is done
        self._sync()
        contexts = [len(r.spec.context) for r in live]
        return SliceStats(
            batch_size=len(live),
            padded_len=max(contexts),
            steps=len(decode_rows) + (1 if fresh else 0),
            prefill_s=prefill_s,
            decode_s=time.perf_counter() - start,
            pad_tokens=sum(n * width for n, width in passes)
            - sum(len(r.spec.context) for r in fresh),
            invalid_tokens=invalid,
            recomputed_tokens=sum(len(r.spec.context) for r in fresh if r.spec.generated_ids),
            generated_tokens=0,  # filled in by run_slice
            peak_memory_bytes=self._peak_memory(),
            decode_rows=tuple(decode_rows),
            prefill_passes=tuple(passes),
            resumed_rows=len(resumed),
            kv_misses=misses,
            kv_evicted=tuple(evicted),
        )

    def _assemble(
        self, live: list[_Row], fresh: list[_Row]
    ) -> tuple[_Batch, list[tuple[int, int]]]:
        """The batch's cache with every row in place, and the prefill passes run.

        Rows are ordered pass by pass, then the resumed ones, so each pass's rows are
        contiguous: a pass prefills straight into its window of the batch cache (its rows,
        its last ``padded`` columns), and nothing but the batch cache ever holds K/V. With
        one pass and no resumed row that window is the whole cache.
        """
        lengths = [r.cached for r in fresh]
        groups = chunk_groups(prefill_groups(lengths, self.pass_tokens), lengths,
                              self.prefill_chunk_tokens)
        passes = [[fresh[i] for i in group] for group in groups]
        rows = [r for rows in passes for r in rows] + [r for r in live if r.entry is not None]
        width = max(r.cached for r in rows)
        # Decode steps: a resumed row feeds one per token, a prefilled row one fewer.
        steps = max(r.budget - (r.entry is None) for r in rows)
        cache = StaticCache(config=self.model.config, max_cache_len=width + steps + 1)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            mask[i, width - row.cached:] = 1
        mask = mask.to(self.device)
        batch = _Batch(rows=rows, cache=cache, width=width, mask=mask,
                       positions=(mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -1])
        if len(passes) == 1 and len(fresh) == len(live):
            self._prefill(rows, width, cache)  # the cache allocates itself, as generate's
            return batch, [(len(rows), width)]
        if not kv_cache.supports_assembly(cache):
            raise RuntimeError("this model's cache layers cannot be assembled by hand: run "
                               "it with SCLS_KV_RETENTION=false")
        first = sum(len(p) for p in passes)
        # The resumed rows move in before any prefill pass: no activation is allocated
        # while a layer is held twice.
        incoming = []
        for i in range(first, len(rows)):
            entry = rows[i].entry
            assert entry is not None
            incoming.append((i, entry.keys, entry.values))
        kv_cache.allocate_with_rows(cache, len(rows), self.kv_heads, self.head_dim,
                                    self.dtype, self.device, width, incoming, self.on_layer)
        shapes, first = [], 0
        for pass_rows in passes:
            padded = max(r.cached for r in pass_rows)
            window = kv_cache.window(cache, self.model.config, first, first + len(pass_rows),
                                     width - padded, width)
            self._prefill(pass_rows, padded, window)
            shapes.append((len(pass_rows), padded))
            first += len(pass_rows)
        return batch, shapes

    def _prefill(self, rows: list[_Row], width: int, cache: StaticCache) -> int:
        """One left-padded prefill pass of ``rows`` into ``cache``; takes each row's first
        token. Returns the pass's padded length."""
        ids = torch.full((len(rows), width), self.codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            context = row.spec.context
            # The mask comes from real lengths: pad == eos for some models, so ids can't tell.
            ids[i, width - len(context):] = torch.tensor(context, dtype=torch.long)
            mask[i, width - len(context):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position: full prefill logits cost gigabytes
        )
        logits = out.logits[:, -1, :]
        self._accept(rows, self._select(rows, logits), logits)
        return width

    def _decode(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns next-token logits ``[b, vocab]``."""
        ones = torch.ones((batch.mask.shape[0], 1), dtype=batch.mask.dtype, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=-1)
        batch.positions = batch.positions + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.fed += 1
        return out.logits[:, -1, :]

    def _select(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Next token of every batch row (done rows too: their tokens are ignored)."""
        params = [r.spec.params for r in rows]
        if any(adjusts_logits(p) for p in params):  # plain batches build no token lists
            logits = adjust_logits(
                logits,
                [RowTokens(r.spec.params, r.spec.prompt_ids, r.spec.generated_ids + r.new_ids)
                 for r in rows],
                self.codec.eos_ids,
            )
        logits = self._constrain(rows, logits)
        return select_tokens(
            logits,
            temperatures=[p.temperature for p in params],
            top_ps=[p.top_p for p in params],
            seeds=[p.seed if p.seed is not None else 0 for p in params],
            positions=[r.position for r in rows],
            top_ks=[p.top_k for p in params],
        )

    def _constrain(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every token a row's grammar forbids at -inf (after logit_bias,
        penalties and min_tokens, before temperature, top-k and top-p). A copy when any
        row has a grammar: the raw logits stay for the reported logprobs (vLLM's
        ``raw_logprobs``)."""
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None and not r.done]
        if not constrained:
            return logits
        start = time.perf_counter()
        bitmask = allocate_bitmask(len(constrained), self.grammars.vocab.vocab_size)
        fill_bitmask([rows[i].grammar for i in constrained], bitmask)
        index = torch.tensor(constrained, dtype=torch.long, device=logits.device)
        picked = logits.index_select(0, index)
        apply_bitmask(picked, bitmask)
        masked = logits.index_copy(0, index, picked)
        self.mask_s += time.perf_counter() - start
        self.masked_tokens += len(constrained)
        return masked

    def _accept(self, rows: list[_Row], tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Record each live row's token (and its log-probabilities when the row asks)."""
        wanted = [None if r.done else r.spec.params.logprobs for r in rows]
        logprobs = token_logprobs(logits, tokens, wanted)
        taken: list[StepTokens] = []
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs, strict=True):
            if row.done:
                continue
            before = len(row.new_ids)
            self._take(row, int(token), logprob)
            if row.spec.params.stream and len(row.new_ids) > before:
                # The logprob goes with its token, so a chunk carries its tokens' logprobs;
                # None (the row did not ask) adds nothing to the entry.
                taken.append(StepTokens(row.spec.request_id, row.spec.fence,
                                        row.position - 1, [int(token)],
                                        () if logprob is None else (logprob,)))
        if taken and self._on_tokens is not None:
            self._on_tokens(taken)

    def _take(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> None:
        """Append ``token`` to ``row`` and decide whether the row is finished or done."""
        params = row.spec.params
        if token in self.codec.eos_ids and not params.ignore_eos:
            row.done, row.finish = True, FinishReason.STOP
            return
        row.new_ids.append(token)
        if logprob is not None:
            row.new_logprobs.append(logprob)
        if row.grammar is not None:
            start = time.perf_counter()
            advanced = row.grammar.advance(token)
            self.mask_s += time.perf_counter() - start
            if not advanced:  # the mask allowed it: a bug if refused
                raise RuntimeError(f"request {row.spec.request_id}: token {token} was drawn "
                                   "outside its grammar")
            if row.grammar.is_finished():  # nothing but the end may follow
                row.done, row.finish = True, FinishReason.STOP
                return
        if params.stop and row.position >= params.min_tokens and self._hit_stop(row):
            row.done, row.finish = True, FinishReason.STOP
        elif len(row.new_ids) >= row.budget:
            row.done = True
            if self._out_of_tokens(row):
                row.finish = FinishReason.LENGTH

    def _hit_stop(self, row: _Row) -> bool:
        """Whether the row's whole generated text contains one of its stop strings."""
        # Decoding everything (not just the new token) catches stop strings spanning tokens
        # and slices; it is cheap next to a forward pass.
        text = self.codec.decode(row.spec.generated_ids + row.new_ids)
        return any(s and s in text for s in row.spec.params.stop)

    def _out_of_tokens(self, row: _Row) -> bool:
        """Whether the request may generate nothing more (max_tokens or context limit)."""
        generated = len(row.spec.generated_ids) + len(row.new_ids)
        context = len(row.spec.prompt_ids) + generated
        return generated >= row.spec.params.max_tokens or context >= self.context_limit

    def _shrink(self, batch: _Batch, tokens: torch.Tensor) -> tuple[_Batch, torch.Tensor]:
        """Drop done rows from the batch (cache, mask, positions, tokens) if configured to;
        the unfinished ones among them move their K/V to the pool on the way out."""
        keep = [i for i, r in enumerate(batch.rows) if not r.done]
        if not self.drop_finished_rows or len(keep) == len(batch.rows):
            return batch, tokens
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._retain(batch, [r for r in batch.rows if r.done], keep=index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask.index_select(0, index)
        batch.positions = batch.positions.index_select(0, index)
        return batch, tokens.index_select(0, index)

    def _retain(self, batch: _Batch, rows: list[_Row], keep: torch.Tensor | None) -> list[str]:
        """Move the K/V of the unfinished ones of ``rows`` into the pool, and reduce the
        batch cache to its rows ``keep`` (None: release it); returns the ids evicted from
        the pool to make room. Room is made before anything is copied, so the pool never
        holds more than its capacity, and the move goes layer by layer
        (:func:`kv_cache.move_out`)."""
        taken: list[tuple[_Row, list[int]]] = []
        if self.pool is not None:
            reserved = 0
            for row in rows:
                if row.finish is not None or row.retained or not row.new_ids:
                    continue
                tokens = row.spec.context + row.new_ids[:-1]  # the last drawn token is unfed
                need = len(tokens) * self.loaded.info.kv_bytes_per_token
                if reserved + need > self.pool.capacity_bytes:
                    self.pool.counters.rejected += 1
                    continue  # no room even with the pool emptied: it will re-prefill
                reserved += need
                taken.append((row, tokens))
        if not taken and keep is None:
            return []
        evicted = (self.pool.make_room(reserved) or []) if taken and self.pool else []
        spans = []
        for row, tokens in taken:
            start, end = batch.width - row.cached, batch.width + batch.fed
            assert end - start == len(tokens), "cache columns and tokens disagree"
            spans.append((batch.rows.index(row), start, end))
        moved = kv_cache.move_out(batch.cache, spans, keep, self.on_layer)
        for (row, tokens), (keys, values) in zip(taken, moved, strict=True):
            assert self.pool is not None
            evicted += self.pool.put(row.spec.request_id,
                                     KvEntry(keys, values, tokens, row.spec.fence))
            row.retained = True  # if it is still there at the end (run_slice checks)
        return evicted

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Wait for queued device work so that timings are real."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak_memory(self) -> int | None:
        """Peak allocated device memory during the slice (CUDA only)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def _empty_stats(self) -> SliceStats:
        """Stats of a slice that ran no model step."""
        return SliceStats(
            batch_size=0,
            padded_len=0,
            steps=0,
            prefill_s=0.0,
            decode_s=0.0,
            pad_tokens=0,
            invalid_tokens=0,
            recomputed_tokens=0,
            generated_tokens=0,
            peak_memory_bytes=self._peak_memory(),
        )

