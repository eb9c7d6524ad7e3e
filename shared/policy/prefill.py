"""How the slice engine splits a prefill into passes: a pure function the worker's engine,
the simulator and the cost estimates share (numpy only).

A batch's fresh rows are prefilled in left-padded passes; one pass padded to the longest
row wastes compute on short rows, many passes pay a fixed overhead each. The engine
(:mod:`services.worker.engine`) cuts the rows, sorted by length, where that minimises
``overhead + rows x longest`` summed over passes, and the simulator charges the same
passes (:func:`prefill_passes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Prefill passes cost a fixed overhead on top of their tokens; when the cost model does
#: not say how much (in tokens' worth), assume this.
DEFAULT_PASS_TOKENS = 32.0


def prefill_groups(lengths: Sequence[int], pass_tokens: float) -> list[list[int]]:
    """Split rows into left-padded prefill passes minimising computed work.

    Each pass costs ``pass_tokens`` (its fixed overhead, in tokens' worth) plus
    ``rows x longest`` tokens. Rows are taken by length and cut into contiguous runs by an
    exact dynamic programme (``n <= max batch``, so ``O(n^2)`` is nothing). Returns lists of
    indices into ``lengths``, each run ordered by length. ``pass_tokens = inf`` gives one
    pass (a single padded prefill).
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    if not np.isfinite(pass_tokens):
        return [order]
    sorted_lens = [lengths[i] for i in order]
    best = [0.0] + [np.inf] * n  # best[p]: cheapest cover of the p shortest rows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = sorted_lens[end - 1]
        for start in range(end):
            cost = best[start] + pass_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    groups.reverse()
    return groups


def chunk_groups(groups: list[list[int]], lengths: Sequence[int],
                 chunk_tokens: int) -> list[list[int]]:
    """``groups`` (of :func:`prefill_groups`) cut so that no pass holds more than
    ``chunk_tokens`` tokens (rows x its longest row; a row longer than that is a pass
    alone): chunked prefill, which bounds a pass's activations whatever the batch
    (:meth:`shared.policy.costmodel.CostModel.prefill_activation` prices that bound).
    ``chunk_tokens <= 0``: no limit, ``groups`` as given."""
    if chunk_tokens <= 0:
        return groups
    out = []
    for group in groups:
        rows = max(1, chunk_tokens // max(1, max(lengths[i] for i in group)))
        out += [group[k:k + rows] for k in range(0, len(group), rows)]
    return out


def pass_tokens_of(prefill_features: Sequence[str], prefill_coef: Sequence[float]) -> float:
    """A prefill pass's fixed cost in tokens' worth from a fitted ``Tp``: ``p_1 / p_bl``."""
    coef = dict(zip(prefill_features, prefill_coef, strict=True))
    fixed, per_token = coef.get("1", 0.0), coef.get("bl", 0.0)
    if fixed > 0 and per_token > 0:
        return fixed / per_token
    return DEFAULT_PASS_TOKENS


def prefill_passes(lengths: Sequence[int], pass_tokens: float,
                   chunk_tokens: int = 0) -> list[tuple[int, int]]:
    """``(rows, longest)`` of each pass :func:`prefill_groups` (cut by
    :func:`chunk_groups`) makes of ``lengths``."""
    groups = chunk_groups(prefill_groups(lengths, pass_tokens), lengths, chunk_tokens)
    return [(len(g), max(lengths[i] for i in g)) for g in groups]
