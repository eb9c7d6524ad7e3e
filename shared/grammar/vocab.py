"""The grammar library's view of a model's vocabulary, built from our codec objects.

llguidance needs each token's bytes (to know what text a token adds) and the EOS ids. Three
codecs exist (shared/modeling): :class:`~shared.modeling.codec.FastCodec` (a
``tokenizers.Tokenizer``), :class:`~shared.modeling.registry.HFCodec` (a transformers fast
tokenizer, which wraps the same Rust tokenizer) and the tiny model's
:class:`~shared.modeling.registry.ByteCodec`. No torch: the ingest builds one too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance

from shared.modeling.registry import ByteCodec

_BYTE_OFFSET = 3  # ByteCodec: ids 0, 1, 2 are pad, bos, eos; byte b is id b + 3


@dataclass(frozen=True)
class GrammarVocab:
    """A tokenizer as the grammar library sees it.

    ``vocab_size`` is the model's logits width, which may exceed the tokenizer's own size
    (embedding matrices are padded to a multiple of 64 or 128): ids at or past
    ``tokenizer_size`` have no text, so every mask disallows them.
    """

    tokenizer: Any  # llguidance.LLTokenizer
    vocab_size: int
    tokenizer_size: int
    eos_ids: frozenset[int]

    @property
    def mask_words(self) -> int:
        """int32 words in one row of a token bitmask (one bit per id)."""
        return (self.vocab_size + 31) // 32


class _ByteTokenizer:
    """ByteCodec in the shape ``llguidance.TokenizerWrapper`` reads."""

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        self.eos_token_id = eos_id
        self.bos_token_id = 1
        # Special and unused ids get names llguidance marks as special: plain text can never
        # produce them, so a grammar allows them only as EOS (or by name, in Lark).
        names = {0: b"<pad>", 1: b"<bos>", 2: b"<eos>"}
        self.tokens: list[bytes] = [
            bytes([i - _BYTE_OFFSET]) if _BYTE_OFFSET <= i < _BYTE_OFFSET + 256
            else names.get(i, f"<unused_{i}>".encode())
            for i in range(vocab_size)
        ]
        self.special_token_ids = [i for i in range(vocab_size)
                                  if not _BYTE_OFFSET <= i < _BYTE_OFFSET + 256]

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return [b + _BYTE_OFFSET for b in data]


def _rust_tokenizer_json(codec: Any) -> str | None:
    """The ``tokenizer.json`` text of a codec backed by a Rust ``tokenizers.Tokenizer``."""
    tok = getattr(codec, "tokenizer", None)
    tok = getattr(tok, "backend_tokenizer", tok)  # transformers fast tokenizer -> Rust one
    if tok is None or not hasattr(tok, "to_str"):
        return None
    # A copy without padding/truncation: those would change how llguidance tokenizes text.
    tok = copy.copy(tok)
    tok.no_padding()
    tok.no_truncation()
    return str(tok.to_str())


def vocab_from_codec(codec: Any, model_vocab_size: int | None = None,
                     eos_ids: Sequence[int] | None = None) -> GrammarVocab:
    """The grammar vocabulary of ``codec``.

    ``model_vocab_size``: the model's logits width (default: the tokenizer's size); ids past
    the tokenizer's are padding and never allowed. ``eos_ids``: the ids that end a request
    (default: ``codec.eos_ids``); a grammar allows them where the output may end.
    Building it costs about 0.2 s for a 49k-token BPE vocabulary: build one per process.

    Raises:
        ValueError: the codec is of a kind this module cannot read, or has no EOS id.
    """
    eos = sorted(int(i) for i in (codec.eos_ids if eos_ids is None else eos_ids))
    if not eos:
        raise ValueError("the codec has no EOS id: a grammar needs one to end the output")
    if isinstance(codec, ByteCodec):
        size = max(model_vocab_size or 0, _BYTE_OFFSET + 256, max(eos) + 1)
        wrapper = llguidance.TokenizerWrapper(_ByteTokenizer(size, eos[0]))
        tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=size, eos_token=eos)
        return GrammarVocab(tokenizer, size, _BYTE_OFFSET + 256, frozenset(eos))
    text = _rust_tokenizer_json(codec)
    if text is None:
        raise ValueError(f"cannot build a grammar vocabulary from {type(codec).__name__}: "
                         "it needs a tokenizers.Tokenizer or a fast transformers tokenizer")
    own = llguidance.LLTokenizer(text, eos_token=eos)
    size = max(model_vocab_size or 0, own.vocab_size)
    tokenizer = own if size == own.vocab_size else llguidance.LLTokenizer(
        text, n_vocab=size, eos_token=eos)
    return GrammarVocab(tokenizer, size, own.vocab_size, frozenset(eos))
