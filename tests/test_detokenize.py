"""Incremental detokenization of a stream (:class:`~services.ingest.streaming.TokenText`):
the text streamed token by token equals the text of all the ids decoded at once.

With the tiny-random byte codec (multi-byte characters cut between tokens), the real SmolLM2
tokenizer (byte-level BPE, special tokens, the chat template's text) and a SentencePiece-style
tokenizer built here (leading-space marker stripped at the start of the text, byte
fallback), fed one id per entry and in uneven batches, as a loaded ingest reads them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.ingest.streaming import TokenText
from shared.modeling.codec import FastCodec
from shared.modeling.registry import SMOLLM2, TextCodec, load_codec
from tests.test_codec import CHATS, PROMPTS, smol_cache  # noqa: F401 (a fixture)

BYTES = load_codec("tiny-random", Path("/nonexistent"))
TEXTS = [*PROMPTS, "a¥b東京🙂x", "🙂🚀👩‍💻", "¥" * 7, "mixed 1 ¥ 2 東 3 🙂 end"]


@pytest.fixture(scope="module")
def smol(smol_cache: Path) -> TextCodec:  # noqa: F811 (the imported fixture)
    return load_codec(SMOLLM2, smol_cache)


def streamed(codec: TextCodec, ids: Sequence[int], sizes: Sequence[int] = (1,)) -> list[str]:
    """The pieces TokenText hands out for ``ids`` arriving in entries of ``sizes`` ids
    (cycled), each entry flushed as it comes."""
    text = TokenText(codec.decode)
    out, pos, turn = [], 0, 0
    while pos < len(ids):
        size = sizes[turn % len(sizes)]
        piece = text.take({"kind": "tokens", "pos": str(pos),
                           "ids": ",".join(map(str, ids[pos:pos + size]))})
        assert piece is not None
        out.append(piece)
        pos, turn = pos + size, turn + 1
    assert text.sent == "".join(out)
    return out


def assert_streams_exactly(codec: TextCodec, ids: Sequence[int]) -> None:
    """Streamed one id at a time and in uneven batches, the text is the whole decode, and
    no piece carries the U+FFFD of a cut character. A decode ending in U+FFFD (ids that
    end inside a character) streams what it begins with: the stream's last chunk sends the
    rest from the final text."""
    whole = codec.decode(ids)
    for sizes in ((1,), (3, 1, 2), (len(ids) or 1,)):
        pieces = streamed(codec, ids, sizes)
        sent = "".join(pieces)
        if whole.endswith("\ufffd"):
            assert whole.startswith(sent), (sizes, ids)
        else:
            assert sent == whole, (sizes, ids)
        if "\ufffd" not in whole:
            assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_codec_streams_multi_byte_characters_whole(text: str) -> None:
    assert_streams_exactly(BYTES, BYTES.encode(text))


def test_a_cut_character_is_held_until_its_last_byte() -> None:
    ids = BYTES.encode("a🙂b")  # the emoji is four byte tokens
    assert streamed(BYTES, ids) == ["a", "", "", "", "🙂", "b"]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_streams_exactly(smol: TextCodec, text: str) -> None:
    assert_streams_exactly(smol, smol.encode(text))


@pytest.mark.parametrize("messages", CHATS)
def test_smollm2_chat_template_text_streams_exactly(
    smol: TextCodec, messages: list[dict[str, str]]
) -> None:
    """The rendered chat (special tokens, skipped when decoding, between the turns)."""
    assert_streams_exactly(smol, smol.encode_chat(messages))


def test_a_long_stream_equals_the_whole_decode(smol: TextCodec) -> None:
    text = " ".join(PROMPTS) * 40
    ids = smol.encode(text)
    assert len(ids) > 2000
    assert_streams_exactly(smol, ids)
    assert_streams_exactly(BYTES, BYTES.encode(text)[:3000])


def test_arbitrary_ids_stream_what_the_whole_decode_begins_with(smol: TextCodec) -> None:
    """Ids a model may emit in any order (cut UTF-8 sequences, special ids anywhere): the
    streamed text is the whole decode, but for a tail still waiting for its last byte
    (the stream's last chunk sends it from the final text)."""
    rng = random.Random(16)
    for _ in range(60):
        ids = [rng.randrange(49152) for _ in range(rng.randrange(1, 60))] + [0, 1, 2]
        rng.shuffle(ids)
        assert_streams_exactly(smol, ids)


def _sentencepiece_codec() -> FastCodec:
    """A Llama-2-style tokenizer: "▁" marks a space, byte-fallback tokens, the first space
    of the text stripped, ``<s>`` a special token."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁Hello", "▁world", "▁", ",", "!", "▁a", "b", "▁caf", "é", "\n", "▁▁"):
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                     byte_fallback=True))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    return FastCodec(tokenizer=tokenizer, chat_template=None, specials={})


def test_sentencepiece_leading_spaces_and_byte_fallback_stream_exactly() -> None:
    codec = _sentencepiece_codec()
    v = codec.tokenizer.get_vocab()
    words = ["▁Hello", ",", "▁world", "!", "\n", "▁", "▁a", "b", "▁▁", "▁caf", "é", "<s>",
             "▁Hello", "</s>", "▁world"]
    ids = [v[w] for w in words]
    ids[6:6] = [v[f"<0x{b:02X}>"] for b in "▁東".encode()[3:]]  # a character in bytes
    assert codec.decode(ids[:3]) == "Hello, world"  # the first space stripped, not others
    assert_streams_exactly(codec, ids)
    assert_streams_exactly(codec, ids[1:])  # the text starting with ","
    assert_streams_exactly(codec, ids[11:])  # starting with a special token
    # Byte runs are drawn whole: ByteFallback turns every byte of an invalid run into
    # U+FFFD, so a stray byte after a character would rewrite it (no stream can be exact).
    units = [[v[w]] for w in words] + [[v[f"<0x{b:02X}>"] for b in c.encode()] for c in "東é🙂"]
    rng = random.Random(3)
    for _ in range(40):
        drawn = [rng.choice(units) for _ in range(rng.randrange(1, 30))]
        assert_streams_exactly(codec, [i for unit in drawn for i in unit])
