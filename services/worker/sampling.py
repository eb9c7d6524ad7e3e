"""Token selection: greedy, or seeded temperature + top-k + top-p sampling, slice-invariant.

A request is generated over several slices, each in a different batch, maybe on a different
worker. For a request to give the same tokens however it is sliced and batched, each choice
must depend only on the request's own state:

* the uniform number behind the draw of the token at generated position ``p`` is a hash of
  ``(seed, p)``, never a draw from a generator shared with other rows or advanced by
  earlier slices;
* logit adjustments (``min_tokens``, ``logit_bias``, presence / frequency / repetition
  penalties: :func:`adjust_logits`) read only the row's own prompt and generated tokens,
  which every slice receives whole.

Log-probabilities (:func:`token_logprobs`) are those of the model's raw distribution, before
any adjustment, temperature or truncation (vLLM's default, ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from shared.core.records import RequestParams, TokenLogprob

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


@dataclass(frozen=True)
class RowTokens:
    """What the logit adjustments of one row read: its parameters and its own tokens."""

    params: RequestParams
    prompt_ids: Sequence[int]
    generated_ids: Sequence[int]  # every token generated so far, earlier slices included


def adjusts_logits(params: RequestParams) -> bool:
    """Whether :func:`adjust_logits` changes anything for a request with ``params``."""
    return bool(params.min_tokens or params.logit_bias or params.needs_history)


def adjust_logits(
    logits: torch.Tensor, rows: Sequence[RowTokens], eos_ids: Collection[int]
) -> torch.Tensor:
    """``logits`` with each row's ``min_tokens``, ``logit_bias`` and penalties applied.

    In vLLM's order: EOS masked while fewer than ``min_tokens`` were generated (unless
    ``ignore_eos``: then EOS does not end the request anyway), the bias added, then the
    repetition penalty (over prompt and generated tokens: positive logits divided by it,
    negative ones multiplied, as Hugging Face and vLLM do) and OpenAI's presence and
    frequency penalties (over generated tokens: ``count * frequency + presence``
    subtracted). Returns ``logits`` itself when no row asks for any of them, so plain
    requests pay nothing; otherwise a float32 copy.
    """
    wanted = [i for i, row in enumerate(rows) if adjusts_logits(row.params)]
    if not wanted:
        return logits
    out = logits.float()  # a copy unless the logits are float32 already
    if out is logits:
        out = logits.clone()
    for i in wanted:
        _adjust_row(out[i], rows[i], eos_ids)
    return out


def _adjust_row(row: torch.Tensor, tokens: RowTokens, eos_ids: Collection[int]) -> None:
    """Adjust one row's logits in place (see :func:`adjust_logits`)."""
    params, device = tokens.params, row.device
    if len(tokens.generated_ids) < params.min_tokens and not params.ignore_eos and eos_ids:
        row[torch.tensor(sorted(eos_ids), device=device)] = float("-inf")
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=device)
        row.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], device=device))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*tokens.prompt_ids, *tokens.generated_ids], device=device).unique()
        scores = row[seen]
        penalty = params.repetition_penalty
        row[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    if (params.presence_penalty or params.frequency_penalty) and tokens.generated_ids:
        ids, counts = torch.tensor(list(tokens.generated_ids), device=device).unique(
            return_counts=True)
        row[ids] -= counts.float() * params.frequency_penalty + params.presence_penalty


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, wanted: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """Each row's chosen-token log-probability and its ``k`` most likely alternatives.

    ``wanted[i]`` is row ``i``'s ``k`` (``None``: the row wants none and gets ``None``).
    Computed from ``logits`` as given (the raw model output) in float32.
    """
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(wanted)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, index)[:, None]).squeeze(1).tolist()
    most = max(int(wanted[i] or 0) for i in rows)
    top_lp, top_ids = (logp.topk(most, dim=-1) if most else (logp[:, :0], logp[:, :0].long()))
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        k = int(wanted[i] or 0)
        out[i] = TokenLogprob(chosen[j], tuple(zip(top_ids[j][:k], top_lp[j][:k], strict=True)))
    return out


def _sample_rows(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    uniforms: torch.Tensor,
    top_ks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse-CDF draw per row over the temperature-scaled, top-k- and top-p-filtered
    distribution.

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
    if top_ks is not None:  # rank < k (k = vocabulary size for rows without top-k)
        ranks = torch.arange(keep.shape[-1], device=keep.device)
        keep &= ranks[None, :] < top_ks[:, None]
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
    top_ks: Sequence[int] | None = None,
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
        top_ks: per row number of most likely tokens kept before top-p (0: all).

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
        _top_k_tensor(top_ks, sampled, logits.shape[-1], device),
    )
    tokens[rows] = drawn
    return tokens


def _top_k_tensor(
    top_ks: Sequence[int] | None, sampled: list[int], vocab: int, device: torch.device
) -> torch.Tensor | None:
    """The sampled rows' k (vocabulary size where off), or None when no row uses top-k."""
    if top_ks is None or not any(0 < top_ks[i] < vocab for i in sampled):
        return None
    return torch.tensor([top_ks[i] if 0 < top_ks[i] < vocab else vocab for i in sampled],
                        device=device)
