"""Token selection: greedy, or seeded temperature + top-p sampling that is slice-invariant.

A request is generated over several slices, each in a different batch, maybe on a different
worker. For a seeded request to give the same tokens however it is sliced and batched, each
draw must depend only on the request's own state: the uniform number behind the draw of the
token at generated position ``p`` is a hash of ``(seed, p)``, never a draw from a generator
shared with other rows or advanced by earlier slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 step: a well-mixed 64-bit value from a 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_for(seed: int, position: int) -> float:
    """The uniform number in [0, 1) used to draw the token at ``position`` of a request.

    A pure function of ``(seed, position)``; the seed is hashed before the position is mixed
    in so that nearby seeds give unrelated streams.
    """
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))  # top 53 bits: exactly representable in a double


def _sample_rows(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF draw per row over the temperature-scaled, top-p-filtered distribution.

    All arguments have one row per sampled request; float64 throughout so that the cumulative
    sums are as stable as the logits allow.
    """
    probs = torch.softmax(logits.double() / temperatures[:, None], dim=-1)
    # Stable sort: equal probabilities keep vocabulary order, so ties break the same way
    # whatever else is in the batch.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept when the mass before
    # it is still short of top_p. The most likely token is always kept.
    keep = (cumulative - sorted_probs) < top_ps[:, None]
    keep[:, 0] = True
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    cdf = kept.cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]  # renormalise the kept mass to 1
    # First index whose cdf exceeds u; clamp against rounding so we never pick a dropped token.
    picked = torch.searchsorted(cdf, uniforms[:, None], right=True).squeeze(-1)
    picked = torch.minimum(picked, keep.sum(dim=-1) - 1)
    return order.gather(-1, picked[:, None]).squeeze(-1)


def select_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    seeds: Sequence[int],
    positions: Sequence[int],
) -> torch.Tensor:
    """Pick one token per row of ``logits``.

    Args:
        logits: ``[B, vocab]`` next-token logits, any float dtype, any device.
        temperatures: per row; ``<= 0`` means greedy (argmax), otherwise the softmax
            temperature.
        top_ps: per row nucleus mass in (0, 1]; 1 keeps the whole distribution.
        seeds: per row seed of the request (ignored for greedy rows).
        positions: per row index of the token being generated within the request's
            generated tokens (0 for the first), so a draw never depends on slicing.

    Returns:
        ``[B]`` int64 token ids on ``logits.device``.
    """
    batch = logits.shape[0]
    if not (len(temperatures) == len(top_ps) == len(seeds) == len(positions) == batch):
        raise ValueError("one temperature, top_p, seed and position is needed per logits row")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i in range(batch) if temperatures[i] > 0]
    if not sampled:
        return tokens
    device = logits.device
    rows = torch.tensor(sampled, device=device)
    as_f64 = {"dtype": torch.float64, "device": device}
    drawn = _sample_rows(
        logits.index_select(0, rows),
        torch.tensor([float(temperatures[i]) for i in sampled], **as_f64),
        torch.tensor([float(top_ps[i]) for i in sampled], **as_f64),
        torch.tensor([uniform_for(int(seeds[i]), int(positions[i])) for i in sampled], **as_f64),
    )
    tokens[rows] = drawn
    return tokens
