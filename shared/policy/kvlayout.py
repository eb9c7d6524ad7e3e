"""The KV-cache layout a cost is priced for: the engine's padded cache, or a ragged one.

The slice engine as built (``services/worker/engine.py``) runs a slice on one left-padded
``StaticCache``: every row holds as many positions as the longest, and attention reads
them all. So a slice's KV memory and its decode steps follow its *longest* context:
``width = max(contexts)``. A ragged (paged) layout, as vLLM's, holds each row's own
tokens: memory and attention follow the *summed* contexts, i.e. ``width = mean``
(rounded up) in the same ``b x width`` formulas. The simulator prices its slice engines
with :data:`PADDED` unless told otherwise (``--kv-layout ragged``: what a ragged engine
would gain, a question the simulator answers and the engine does not yet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PADDED = "padded"
RAGGED = "ragged"
LAYOUTS = (PADDED, RAGGED)


def cache_width(contexts: Sequence[int] | np.ndarray, layout: str = PADDED) -> int:
    """The width a slice of rows with these ``contexts`` is priced at under ``layout``
    (0 for no rows)."""
    ctx = np.asarray(contexts)
    if not len(ctx):
        return 0
    if layout == RAGGED:
        return int(math.ceil(float(ctx.mean())))
    if layout != PADDED:
        raise ValueError(f"unknown KV layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    return int(ctx.max())
