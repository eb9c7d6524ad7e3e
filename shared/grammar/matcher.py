"""One request's grammar state (:class:`RowGrammar`) and the batch bitmask helpers (torch).

A request is decoded over several slices, possibly on different workers: its grammar state
is never stored, it is rebuilt from the request's generated token ids with
:meth:`RowGrammar.replay`. The library's state is a function of the tokens consumed, so a
replayed row gives the same masks, token for token, as one advanced step by step -- which
is what keeps the output identical however the request is sliced.

Bitmask layout (llguidance's and xgrammar's): int32 words, bit ``i % 32`` of word
``i // 32`` set when token ``i`` is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import llguidance
import numpy as np
import torch

from shared.grammar.compiler import CompiledGrammar


class TokenRejected(ValueError):
    """A token the grammar does not allow was replayed (``index`` in the replayed ids)."""

    def __init__(self, index: int, token_id: int, reason: str) -> None:
        self.index = index
        self.token_id = token_id
        super().__init__(f"token {token_id} at position {index} is not allowed by the "
                         f"grammar: {reason}")


class RowGrammar:
    """The grammar state of one request (one batch row). Not thread-safe."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.compiled = compiled
        self._matcher = compiled.new_matcher()
        self.num_tokens = 0  # tokens consumed since the start state

    @classmethod
    def start(cls, compiled: CompiledGrammar, token_ids: Iterable[int] = ()) -> RowGrammar:
        """A row at the start state, then advanced over ``token_ids`` (a resumed request's
        generated tokens; see :meth:`replay`)."""
        row = cls(compiled)
        ids = list(token_ids)
        if ids:
            row.replay(ids)
        return row

    def replay(self, token_ids: Sequence[int]) -> RowGrammar:
        """Reset to the start state and consume ``token_ids``: the state a row advanced
        token by token over the same ids would have. Returns self.

        Raises:
            TokenRejected: one of the ids is not allowed where it stands (the stored tokens
                were not generated under this grammar); the row is left at the start state.
        """
        self._matcher = self.compiled.new_matcher()
        self.num_tokens = 0
        ids = [int(t) for t in token_ids]
        # One call consumes them all in the library (no Python per token): the fast path.
        if self._matcher.consume_tokens(ids):
            self.num_tokens = len(ids)
            return self
        error = self._matcher.get_error()
        # Find the offending position for the message, from a fresh matcher.
        probe = self.compiled.new_matcher()
        index = probe.try_consume_tokens(ids)
        self._matcher = self.compiled.new_matcher()
        bad = ids[index] if index < len(ids) else -1
        raise TokenRejected(index, bad, error or "rejected")

    def advance(self, token_id: int) -> bool:
        """Consume ``token_id``; False (and the state unchanged) when it is not allowed."""
        token_id = int(token_id)
        if token_id in self.compiled.vocab.eos_ids:
            # try_consume_tokens refuses EOS; consume_token takes it where the output may
            # end (and would enter the error state where it may not: check first).
            if not self._matcher.is_accepting() or not self._matcher.consume_token(token_id):
                return False
        # try_consume_tokens stops before a rejected token without entering the library's
        # sticky error state, so a refused token costs nothing but the answer.
        elif self._matcher.try_consume_tokens([token_id]) != 1:
            return False
        self.num_tokens += 1
        return True

    def is_finished(self) -> bool:
        """The output is complete: nothing but EOS may follow (or EOS was consumed)."""
        return bool(self._matcher.is_stopped())

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed), though it may go on."""
        return bool(self._matcher.is_accepting())

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask_row`` (one row of
        :func:`allocate_bitmask` for this grammar's vocabulary: int32, contiguous, CPU)."""
        _check_row(bitmask_row, self.compiled.vocab.mask_words)
        self._matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(),
                                              bitmask_row.numel() * 4)

    def allowed_bits(self) -> np.ndarray:
        """One bool per id of the vocabulary: True where the id may come next (for tests,
        walks and debugging; the decode loop uses bitmasks)."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: self.compiled.vocab.vocab_size]
        return bits.astype(bool)

    def allowed_ids(self) -> list[int]:
        """The ids that may come next, ascending."""
        return np.flatnonzero(self.allowed_bits()).tolist()


def _check_row(row: torch.Tensor, words: int) -> None:
    """A bitmask row the library may write ``words`` int32 words into (it writes raw)."""
    if (row.dtype != torch.int32 or row.device.type != "cpu" or not row.is_contiguous()
            or row.dim() != 1 or row.numel() != words):
        # the library writes exactly `words` words through a raw pointer: check first
        raise ValueError(f"a bitmask row must be a contiguous CPU int32 tensor of {words} "
                         f"words, got {row.dtype} {tuple(row.shape)} on {row.device}")


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 bitmask of ``rows`` rows for a ``vocab_size``-wide vocabulary, all
    tokens allowed (the library writes it; copy it to the logits' device to apply it)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_EXECUTOR: llguidance.LLExecutor | None = None


def fill_bitmask(rows: Sequence[RowGrammar | None], bitmask: torch.Tensor,
                 parallel: bool = False) -> None:
    """Fill ``bitmask`` row ``i`` from ``rows[i]``; a None row (no grammar) is all ones.

    ``bitmask`` is :func:`allocate_bitmask` for the rows' vocabulary (all grammar rows must
    share it: the library writes exactly one vocabulary's words per row). ``parallel``
    computes the rows' masks on the library's thread pool: measured on 2 CPU cores with 16
    rows (``scls grammar-bench``) the hand-off costs more than the ~10 us a row takes, so
    the default is one after the other (each call releases the GIL).
    """
    global _EXECUTOR
    if (bitmask.dtype != torch.int32 or bitmask.device.type != "cpu"
            or not bitmask.is_contiguous() or bitmask.dim() != 2
            or bitmask.shape[0] < len(rows)):
        raise ValueError("bitmask must be a contiguous CPU int32 tensor [rows, words] "
                         "(allocate_bitmask)")
    work: list[tuple[object, int]] = []
    first: dict[int, int] = {}  # a matcher may be in the batch once: copy repeats after
    repeats: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if row is None:
            bitmask[i].fill_(-1)
            continue
        if row.compiled.vocab.mask_words != bitmask.shape[1]:
            raise ValueError(f"bitmask rows have {bitmask.shape[1]} words, the grammar's "
                             f"vocabulary needs {row.compiled.vocab.mask_words}")
        if id(row) in first:
            repeats.append((i, first[id(row)]))
            continue
        first[id(row)] = i
        work.append((row._matcher, i))
    if work and not parallel:
        for matcher, i in work:
            row_words = bitmask[i]
            matcher.unsafe_compute_mask_ptr(row_words.data_ptr(), row_words.numel() * 4)
    elif work:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr(work, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                          bitmask.shape[0])
    for i, src in repeats:
        bitmask[i].copy_(bitmask[src])


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the disallowed tokens' logits to -inf, in place.

    ``logits``: [rows, width] (any float dtype, any device); ``bitmask``: [rows, words]
    int32 on the CPU (as :func:`allocate_bitmask` makes it). Ids at or past ``32 * words``
    (logits wider than the grammar's vocabulary) are disallowed too. The bits are unpacked
    by numpy on the CPU (one C pass, little-endian words: bit ``i % 32`` of word
    ``i // 32`` is byte ``i // 8``'s bit ``i % 8``), then one ``masked_fill_``.
    """
    if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} "
                         "must be [rows, vocab] and [rows, words]")
    width = logits.shape[1]
    packed = bitmask.cpu().contiguous().numpy().view(np.uint8)
    covered = min(width, 8 * packed.shape[1])
    allowed = np.unpackbits(packed, axis=1, count=covered, bitorder="little")
    forbidden = torch.from_numpy(allowed == 0).to(logits.device, non_blocking=True)
    logits[:, :covered].masked_fill_(forbidden, float("-inf"))
    if width > covered:
        logits[:, covered:] = float("-inf")
