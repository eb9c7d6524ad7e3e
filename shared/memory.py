"""Memory estimate of one slice batch (DESIGN.md section 2), pure.

Until the profiled model of the serving-time/memory issue replaces the activation term,
the activation peak of prefill is bounded from the model's shape (see
:func:`activation_bytes_per_token`), which over-estimates on purpose: an estimate above the
real peak wastes a little batch size, one below it risks an out-of-memory crash.
"""

from __future__ import annotations


def activation_bytes_per_token(
    hidden_size: int, intermediate_size: int, dtype_bytes: int
) -> int:
    """Upper bound of prefill activation bytes per context token for a Llama-style layer.

    Per token a layer holds the residual stream, the normalised input, q/k/v/o projections
    (about 4 x hidden) and the gated MLP's up, gate and product (3 x intermediate); with
    ``logits_to_keep=1`` the logits are one row per sequence and do not scale with length.
    Layers run one after another, so one layer's worth is live at a time; x2 covers the
    allocator keeping the previous layer's buffers while the next is computed.
    """
    per_layer = 6 * hidden_size + 3 * intermediate_size
    return 2 * per_layer * dtype_bytes


def estimate_slice_bytes(
    batch_size: int,
    padded_len: int,
    slice_length: int,
    kv_bytes_per_token: int,
    act_bytes_per_token: int,
) -> int:
    """Bytes a slice batch needs beyond the weights: ``b * (l + S) * kv + b * l * act``.

    The static KV cache is allocated for every row at the padded length plus the slice, so
    the estimate uses the padded (longest) context length ``l`` for all ``b`` rows.
    """
    kv = batch_size * (padded_len + slice_length + 1) * kv_bytes_per_token
    return kv + batch_size * padded_len * act_bytes_per_token
