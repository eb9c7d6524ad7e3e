"""Grammar-constrained decoding (structured outputs): the library layer.

One concept per module; only :mod:`shared.grammar.matcher` imports torch, so the ingest
(which has no torch) can parse and compile-check a request's grammar with the rest:

* :mod:`shared.grammar.spec` -- :class:`GrammarSpec` from request fields, :class:`GrammarError`.
* :mod:`shared.grammar.vocab` -- the grammar library's view of a codec's vocabulary.
* :mod:`shared.grammar.compiler` -- :class:`GrammarCompiler`, an LRU cache of compiled grammars.
* :mod:`shared.grammar.matcher` -- :class:`RowGrammar` (one request's state, rebuilt from its
  generated token ids) and the torch bitmask helpers.

The library underneath is llguidance (docs/structured-outputs.md says why).
"""

from shared.grammar.spec import GrammarError, GrammarSpec

__all__ = ["GrammarError", "GrammarSpec"]
