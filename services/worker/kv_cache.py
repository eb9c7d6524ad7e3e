"""Moving rows of K/V in and out of a slice's ``StaticCache``, and grouping prefills.

A slice batch is one left-padded ``StaticCache``: row ``i``'s real tokens occupy the
columns ``[width - cached_i, width + steps)``, where ``width`` is the longest cached
context of the batch and ``steps`` the decode steps fed so far (every row in the batch is
fed at every step). Rows come from a prefill (computed here) or from the KV pool (computed
by an earlier slice); rows leave as exact-length copies for the pool.

Rows move in and out **layer by layer**: a layer of the batch cache is allocated (or
released) right after the rows' tensors of that layer are copied, and the copied layer
of each row is let go at once. A row's K/V is then held twice for at most one layer's
worth, which is what lets retained rows and the running slice share one memory budget
(docs/design.md, memory model).

Measured on transformers 5.23: a ``StaticLayer`` writes each update at its
``cumulative_length`` (shared by all rows), so a cache assembled by hand must set that to
``width``; attention masks and position ids then come from the caller, per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer


def supports_assembly(cache: StaticCache) -> bool:
    """Whether every layer is a plain full-attention ``StaticLayer`` (sliding-window or
    indexed layers keep other state and are never assembled by hand)."""
    return all(type(layer) is StaticLayer for layer in cache.layers)


def allocate(
    cache: StaticCache, rows: int, heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, width: int,
) -> None:
    """Allocate every layer's tensors for ``rows`` and mark ``width`` columns as filled."""
    probe = torch.empty((rows, heads, 1, head_dim), dtype=dtype, device=device)
    for layer in cache.layers:
        layer.lazy_initialization(probe, probe)
        layer.cumulative_length.fill_(width)


#: Called after each layer is moved, with the layer's index and the cache (tests check
#: what is held at that moment).
LayerHook = Callable[[int, StaticCache], None]


def allocate_with_rows(
    cache: StaticCache, rows: int, heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, width: int,
    incoming: Sequence[tuple[int, list[torch.Tensor | None], list[torch.Tensor | None]]],
    on_layer: LayerHook | None = None,
) -> None:
    """Allocate every layer for ``rows`` (``width`` columns filled) and write each
    ``(row, keys, values)`` of ``incoming`` right-aligned at column ``width``, one layer at
    a time: a layer is allocated, every incoming row's tensors of that layer are copied in
    and then dropped from the given per-layer lists (set to None), so the memory of a row
    moves into the cache instead of being held twice."""
    probe = torch.empty((rows, heads, 1, head_dim), dtype=dtype, device=device)
    for i, layer in enumerate(cache.layers):
        layer.lazy_initialization(probe, probe)
        layer.cumulative_length.fill_(width)
        for row, keys, values in incoming:
            k, v = keys[i], values[i]
            assert k is not None and v is not None, "a layer was moved twice"
            n = k.shape[1]
            layer.keys[row, :, width - n:width] = k
            layer.values[row, :, width - n:width] = v
            keys[i] = values[i] = None
        if on_layer is not None:
            on_layer(i, cache)


def move_out(
    cache: StaticCache, rows: Sequence[tuple[int, int, int]], keep: torch.Tensor | None,
    on_layer: LayerHook | None = None,
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Exact-length copies of each ``(row, start, end)`` of ``rows``, per layer, and then
    each layer reduced to the batch rows ``keep`` (None: the layer is released, the cache
    is done), one layer at a time, so at most one layer is held twice. Returns one
    ``(keys, values)`` list pair per row, in order.

    The rows are kept by hand: ``StaticCache.batch_select_indices`` does not work in
    transformers 5.23 (its StaticLayer does not implement it). The fill level
    (``cumulative_length``) is shared by all rows, so it stays as it is."""
    out: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in rows]
    for i, layer in enumerate(cache.layers):
        if not getattr(layer, "is_initialized", False):
            continue  # never filled (a cache no step used): nothing to move or release
        for (row, start, end), (keys, values) in zip(rows, out, strict=True):
            keys.append(layer.keys[row, :, start:end].clone())
            values.append(layer.values[row, :, start:end].clone())
        if keep is None:
            layer.keys = layer.values = torch.empty(0, dtype=layer.keys.dtype,
                                                    device=layer.keys.device)
        else:
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            layer.batch_size = int(keep.numel())
        if on_layer is not None:
            on_layer(i, cache)
    return out


def write_row(
    cache: StaticCache, row: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
    width: int,
) -> None:
    """Put one request's K/V (per layer ``[heads, n, dim]``, or one stacked tensor)
    right-aligned at column ``width``."""
    n = keys[0].shape[1]
    for i, layer in enumerate(cache.layers):
        layer.keys[row, :, width - n:width] = keys[i]
        layer.values[row, :, width - n:width] = values[i]


def window(
    cache: StaticCache, config: Any, first: int, last: int, start: int, end: int
) -> StaticCache:
    """A cache whose layers are views of rows ``first..last-1`` and columns ``start..end-1``
    of ``cache``'s (allocated) layers, empty: a prefill pass of those rows writes its K/V
    straight into the batch cache, left-padded to ``end``."""
    view = StaticCache(config=config, max_cache_len=end - start)
    for big, small in zip(cache.layers, view.layers, strict=True):
        small.keys = big.keys[first:last, :, start:end]
        small.values = big.values[first:last, :, start:end]
        small.dtype, small.device = big.keys.dtype, big.keys.device
        small.batch_size, small.num_heads = last - first, big.keys.shape[1]
        small.k_head_dim, small.v_head_dim = big.keys.shape[3], big.values.shape[3]
        small.cumulative_length = torch.zeros((), dtype=torch.long, device=big.keys.device)
        small.is_initialized = True
    return view


def read_row(cache: StaticCache, row: int, start: int, end: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Exact-length copies ``[layers, heads, end - start, dim]`` of one row's K and V."""
    keys = torch.stack([layer.keys[row, :, start:end] for layer in cache.layers])
    values = torch.stack([layer.values[row, :, start:end] for layer in cache.layers])
    return keys, values
