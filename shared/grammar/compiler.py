"""Compile a :class:`~shared.grammar.spec.GrammarSpec` for one vocabulary, with an LRU cache.

No torch: the ingest compiles a request's grammar to refuse a bad one with an HTTP 400
before storing it; a worker compiles it again (usually a cache hit) to decode with it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance

from shared.grammar.spec import GrammarError, GrammarSpec
from shared.grammar.vocab import GrammarVocab

#: JSON layout forced on every JSON grammar, whatever the schema's ``x-guidance`` says:
#: one space after ``,`` and ``:`` and no other whitespace. Free whitespace lets a small
#: model loop on newlines or spaces until max_tokens (vLLM's ``disable-any-whitespace``
#: exists for that failure); one fixed layout also makes output text depend on the tokens
#: alone. ``lenient: False``: a keyword the grammar cannot enforce is a compile error, not
#: silently ignored (the server refuses what it does not implement).
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
    "coerce_one_of": False,
}


@dataclass(frozen=True)
class CompiledGrammar:
    """A spec compiled for one vocabulary; shared by every request that uses the spec.

    ``template`` is a matcher at the start state: a request's state begins as a copy of it
    (microseconds), not as a new compile (milliseconds).
    """

    spec: GrammarSpec
    vocab: GrammarVocab
    serialized: str  # the library's grammar description (what the matcher was built from)
    template: Any  # llguidance.LLMatcher at the start state; never advanced
    compile_s: float

    def new_matcher(self) -> Any:
        """A fresh llguidance matcher at the start state."""
        return self.template.deep_copy()


def _library_grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar text of ``spec`` (not yet checked)."""
    if spec.kind in ("json_schema", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, overrides=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        # Lark string literals take JSON's escapes, so any choice text is one literal.
        choices = json.loads(spec.text)
        lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    if spec.kind == "grammar":
        # "grammar" format: Lark as is, GBNF (has ::=) converted to Lark first.
        return llguidance.grammar_from("grammar", spec.text)
    raise GrammarError(spec.field or "grammar", f"unknown grammar kind {spec.kind!r}")


def compile_spec(spec: GrammarSpec, vocab: GrammarVocab) -> CompiledGrammar:
    """Compile ``spec`` for ``vocab`` (uncached; see :class:`GrammarCompiler`).

    Raises:
        GrammarError: the library refuses it (invalid schema, unsupported keyword, bad
            regex or grammar); ``field`` is the spec's field.
    """
    field = spec.field or spec.kind
    start = time.perf_counter()
    try:
        serialized = _library_grammar(spec)
    except (ValueError, RuntimeError) as exc:  # grammar_from_* raise on malformed input
        raise GrammarError(field, f"cannot be compiled: {exc}") from None
    # log_level 0: errors come back through is_error()/get_error(), not printed to stderr.
    matcher = llguidance.LLMatcher(vocab.tokenizer, serialized, log_level=0)
    if matcher.is_error():
        raise GrammarError(field, f"cannot be compiled: {_first_line(matcher.get_error())}")
    return CompiledGrammar(spec, vocab, serialized, matcher, time.perf_counter() - start)


def _first_line(error: str) -> str:
    """The library's message, trimmed to its meaningful lines (it may append a long
    dump of the grammar)."""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return " ".join(lines[:4]) if lines else "unknown error"


class GrammarCompiler:
    """Compiles specs for one vocabulary and keeps the ``cache_size`` most recently used.

    Thread-safe: the cache is guarded by a lock; compiling happens outside it, so two
    threads missing the same spec at once may both compile it (the second result is
    dropped) rather than one waiting behind the other's unrelated compile.
    """

    def __init__(self, vocab: GrammarVocab, cache_size: int = 256) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.vocab = vocab
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec``, from the cache when an equal spec was compiled.

        Raises:
            GrammarError: the spec does not compile (errors are not cached).
        """
        key = spec.key
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        compiled = compile_spec(spec, self.vocab)
        with self._lock:
            if self.cache_size:
                compiled = self._cache.setdefault(key, compiled)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
