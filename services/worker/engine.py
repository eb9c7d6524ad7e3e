"""The slice engine: run one bounded slice of generation for a static batch of requests.

A slice re-prefills every row's whole context (prompt + tokens generated in earlier slices),
left-padded into one batch, takes the first token from the prefill logits, then runs at most
``slice_len - 1`` decode steps against a preallocated ``StaticCache``. Nothing survives a
slice but the token ids, so any worker can run a request's next slice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

from services.worker.sampling import select_tokens
from shared.models import LoadedModel
from shared.states import FinishReason


@dataclass(frozen=True)
class SamplingParams:
    """How a request is generated; identical for every slice of the request."""

    max_tokens: int  # total tokens to generate for the request (not per slice)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # used when temperature > 0 (None means 0)
    stop: tuple[str, ...] = ()  # stop strings
    ignore_eos: bool = False  # benchmark extension: never stop on EOS


@dataclass
class SliceInput:
    """One row of a slice."""

    request_id: str
    prompt_ids: list[int]
    generated_ids: list[int]  # tokens generated in earlier slices (re-prefilled with the prompt)
    params: SamplingParams


@dataclass
class SliceOutput:
    """What one row produced in a slice."""

    request_id: str
    new_ids: list[int]  # tokens generated in THIS slice (an EOS token is never included)
    finish_reason: FinishReason | None  # None = unfinished; STOP or LENGTH otherwise


@dataclass
class SliceStats:
    """Measurements of one slice, for the scheduler's cost model and the benchmark."""

    batch_size: int  # rows prefilled
    padded_len: int  # L: longest context (prompt + generated) in the batch
    steps: int  # tokens produced per surviving row: 1 from prefill + decode steps run
    prefill_s: float
    decode_s: float
    pad_tokens: int  # B * L - sum(context lengths) computed in prefill
    invalid_tokens: int  # decode positions computed for rows that had already finished
    recomputed_tokens: int  # context tokens re-prefilled for rows that had generated_ids
    generated_tokens: int  # sum of len(new_ids)
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA, None on CPU
    # Rows in the batch at each decode step (finished rows may have been dropped): with
    # batch_size and padded_len, what the cost model needs to price the slice that ran.
    decode_rows: tuple[int, ...] = ()


@dataclass
class _Row:
    """Per-row state while a slice runs."""

    index: int  # position in the caller's list
    spec: SliceInput
    budget: int  # tokens this row may still produce in this slice
    new_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    done: bool = False  # finished, or its slice budget is used up

    @property
    def position(self) -> int:
        """Index, within the request's generated tokens, of the next token to draw."""
        return len(self.spec.generated_ids) + len(self.new_ids)


@dataclass
class _Batch:
    """Device tensors of the rows still being decoded, in the order of ``rows``."""

    rows: list[_Row]
    cache: StaticCache
    mask: torch.Tensor  # [b, columns so far] 1 = real token
    positions: torch.Tensor  # [b] position id of each row's last fed token


class SliceEngine:
    """Runs slices of generation on one loaded model (not thread-safe: one slice at a time)."""

    def __init__(self, loaded: LoadedModel, drop_finished_rows: bool = True) -> None:
        """Wrap ``loaded``. With ``drop_finished_rows`` finished rows leave the batch at once;
        without it they keep being computed (and counted as ``invalid_tokens``)."""
        self.loaded = loaded
        self.model = loaded.model
        self.codec = loaded.codec
        self.device = loaded.device
        self.drop_finished_rows = drop_finished_rows
        self.context_limit = loaded.info.context_limit

    # ----------------------------------------------------------------------------------------
    # Public
    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_slice(
        self, rows: list[SliceInput], slice_len: int
    ) -> tuple[list[SliceOutput], SliceStats]:
        """Generate up to ``slice_len`` tokens for every row; outputs follow the input order.

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
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        states = [self._row_state(i, r, slice_len) for i, r in enumerate(rows)]
        live = [s for s in states if not s.done]
        stats = self._empty_stats()
        if live:
            stats = self._run(live)
        stats.generated_tokens = sum(len(s.new_ids) for s in states)
        outputs = [SliceOutput(s.spec.request_id, s.new_ids, s.finish) for s in states]
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
        if state.budget <= 0:
            state.done, state.finish = True, FinishReason.LENGTH
        elif context == 0:
            raise ValueError(f"request {row.request_id}: no prompt tokens to prefill")
        return state

    def _run(self, live: list[_Row]) -> SliceStats:
        """Prefill then decode ``live`` rows until each is done; return the slice's stats."""
        contexts = [r.spec.prompt_ids + r.spec.generated_ids for r in live]
        padded_len = max(len(c) for c in contexts)
        steps_needed = max(r.budget for r in live)
        start = time.perf_counter()
        batch, logits = self._prefill(live, contexts, padded_len, steps_needed)
        tokens = self._select(batch.rows, logits)
        self._sync()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        steps, invalid, decode_rows = 1, 0, []
        while self._accept(batch.rows, tokens):
            batch, tokens = self._shrink(batch, tokens)
            invalid += sum(r.done for r in batch.rows)
            decode_rows.append(len(batch.rows))
            logits = self._decode(batch, tokens)
            tokens = self._select(batch.rows, logits)
            steps += 1
        self._sync()
        return SliceStats(
            batch_size=len(live),
            padded_len=padded_len,
            steps=steps,
            prefill_s=prefill_s,
            decode_s=time.perf_counter() - start,
            pad_tokens=len(live) * padded_len - sum(len(c) for c in contexts),
            invalid_tokens=invalid,
            recomputed_tokens=sum(
                len(c) for r, c in zip(live, contexts, strict=True) if r.spec.generated_ids
            ),
            generated_tokens=0,  # filled in by run_slice
            peak_memory_bytes=self._peak_memory(),
            decode_rows=tuple(decode_rows),
        )

    def _prefill(
        self, live: list[_Row], contexts: list[list[int]], padded_len: int, steps_needed: int
    ) -> tuple[_Batch, torch.Tensor]:
        """Left-padded prefill of every context; returns the batch and last-position logits."""
        ids = torch.full((len(live), padded_len), self.codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(live), padded_len), dtype=torch.long)
        for i, context in enumerate(contexts):
            # The mask comes from real lengths: pad == eos for some models, so ids can't tell.
            ids[i, padded_len - len(context) :] = torch.tensor(context, dtype=torch.long)
            mask[i, padded_len - len(context) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = StaticCache(config=self.model.config, max_cache_len=padded_len + steps_needed + 1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position: full prefill logits cost gigabytes
        )
        batch = _Batch(rows=list(live), cache=cache, mask=mask, positions=position_ids[:, -1])
        return batch, out.logits[:, -1, :]

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
        return out.logits[:, -1, :]

    def _select(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Next token of every batch row (done rows too: their tokens are ignored)."""
        params = [r.spec.params for r in rows]
        return select_tokens(
            logits,
            temperatures=[p.temperature for p in params],
            top_ps=[p.top_p for p in params],
            seeds=[p.seed if p.seed is not None else 0 for p in params],
            positions=[r.position for r in rows],
        )

    def _accept(self, rows: list[_Row], tokens: torch.Tensor) -> bool:
        """Record each live row's token; True while some row still needs another step."""
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if not row.done:
                self._take(row, int(token))
        return any(not r.done for r in rows)

    def _take(self, row: _Row, token: int) -> None:
        """Append ``token`` to ``row`` and decide whether the row is finished or done."""
        params = row.spec.params
        if token in self.codec.eos_ids and not params.ignore_eos:
            row.done, row.finish = True, FinishReason.STOP
            return
        row.new_ids.append(token)
        if params.stop and self._hit_stop(row):
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
        """Drop done rows from the batch (cache, mask, positions, tokens) if configured to."""
        keep = [i for i, r in enumerate(batch.rows) if not r.done]
        if not self.drop_finished_rows or len(keep) == len(batch.rows):
            return batch, tokens
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        _select_cache_rows(batch.cache, index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask.index_select(0, index)
        batch.positions = batch.positions.index_select(0, index)
        return batch, tokens.index_select(0, index)

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


def _select_cache_rows(cache: StaticCache, index: torch.Tensor) -> None:
    """Keep only batch rows ``index`` of every cache layer.

    ``StaticCache.batch_select_indices`` does not work in transformers 5.23: its StaticLayer
    does not implement it (only the dynamic layers do). The fill level (``cumulative_length``)
    is shared by all rows, so it stays as it is.
    """
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
            layer.batch_size = int(index.numel())
