"""The per-instance KV pool: each unfinished request's K/V kept between its slices.

A slice that ends with a request unfinished leaves that request's attention keys and
values (every layer, its exact length: no padding is stored) in the pool, under the
request id, with the token ids they were computed from and the fence of the slice that
wrote them. The request's next slice on this instance then feeds only its last token
instead of re-prefilling the whole context, as an iteration-level engine would.

Correctness never depends on the pool: :meth:`KvPool.take` returns an entry only if its
fence is the one Redis recorded for the request *and* its token ids are exactly the
request's current context; anything else (evicted, restarted worker, a slice run
elsewhere meanwhile) is a miss and the engine re-prefills.

Capacity is in bytes; a new entry that does not fit evicts the least recently used ones.
The pool is not thread-safe: the worker runs one slice at a time and drops stale entries
between slices.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class KvEntry:
    """One request's retained cache, one tensor per layer: a slice copies rows in and out
    of its batch cache layer by layer and lets each layer's tensors go once copied, so a
    row is never held twice for more than one layer (:mod:`services.worker.kv_cache`)."""

    keys: list[torch.Tensor]  # per layer [kv_heads, length, head_dim] (a stacked tensor
    values: list[torch.Tensor]  # [layers, ...] is accepted and split into its layers)
    tokens: list[int]  # the ``length`` token ids the cache was computed from, in order
    fence: int  # fence of the slice that wrote it (recorded in Redis at its commit)
    nbytes: int = field(init=False)  # bytes the entry's tensors hold

    def __post_init__(self) -> None:
        self.keys, self.values = list(self.keys), list(self.values)
        shapes = {tuple(t.shape) for t in self.keys + self.values}
        if len(self.keys) != len(self.values) or len(shapes) != 1 or any(
                len(shape) != 3 or shape[1] != len(self.tokens) for shape in shapes):
            raise ValueError(
                f"KV entry shapes {sorted(shapes)} over {len(self.keys)}/{len(self.values)} "
                f"layers do not hold {len(self.tokens)} tokens"
            )
        self.nbytes = sum(t.nbytes for t in self.keys + self.values)

    @property
    def length(self) -> int:
        """Tokens cached."""
        return len(self.tokens)


@dataclass
class PoolCounters:
    """Cumulative pool events since the worker started."""

    hits: int = 0  # a row resumed from its entry
    misses: int = 0  # a row that had to re-prefill although it had generated tokens
    stale: int = 0  # of the misses: an entry was there but did not match (dropped)
    evictions: int = 0  # entries dropped to make room (LRU)
    rejected: int = 0  # entries larger than the whole pool, never stored
    dropped: int = 0  # entries removed because their request ended or moved


@dataclass
class KvPool:
    """LRU store of request id -> :class:`KvEntry`, bounded by ``capacity_bytes``."""

    capacity_bytes: int
    counters: PoolCounters = field(default_factory=PoolCounters)
    _entries: OrderedDict[str, KvEntry] = field(default_factory=OrderedDict)
    _used: int = 0

    def __post_init__(self) -> None:
        if self.capacity_bytes < 0:
            raise ValueError(f"KV pool capacity must be >= 0 bytes, got {self.capacity_bytes}")

    # --- reading ------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        """Bytes held by the entries."""
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def request_ids(self) -> list[str]:
        """The requests whose K/V the pool holds, least recently stored first."""
        return list(self._entries)

    def take(self, request_id: str, fence: int | None, tokens: Sequence[int]) -> KvEntry | None:
        """Remove and return the request's entry if it is valid for ``tokens``.

        Valid means written by the slice with fence ``fence`` (what Redis recorded as the
        request's KV fence) over exactly ``tokens`` (the context before its last token).
        Counts a hit, or a miss (and drops a stale entry). The entry leaves the pool: the
        slice that resumes it will store a longer one.
        """
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._used -= entry.nbytes
            if fence is not None and entry.fence == fence and entry.tokens == list(tokens):
                self.counters.hits += 1
                return entry
            self.counters.stale += 1
        self.counters.misses += 1
        return None

    # --- writing ------------------------------------------------------------------
    def put(self, request_id: str, entry: KvEntry) -> list[str]:
        """Store ``entry`` (replacing the request's old one); returns the ids evicted for it.

        An entry larger than the whole capacity is not stored (counted as rejected);
        :meth:`holds` then says False and the caller records no location for it.
        """
        self.discard(request_id, count=False)
        evicted = self.make_room(entry.nbytes)
        if evicted is None:
            return []
        self._entries[request_id] = entry
        self._used += entry.nbytes
        return evicted

    def make_room(self, nbytes: int) -> list[str] | None:
        """Evict least recently used entries until ``nbytes`` more fit; the ids evicted,
        or None (nothing evicted, counted as rejected) when ``nbytes`` exceeds the whole
        capacity. Called before an entry's tensors are copied, so that the pool's memory
        never exceeds its capacity even for a moment."""
        if nbytes > self.capacity_bytes:
            self.counters.rejected += 1
            return None
        evicted = []
        while self._used + nbytes > self.capacity_bytes:
            victim, old = self._entries.popitem(last=False)
            self._used -= old.nbytes
            self.counters.evictions += 1
            evicted.append(victim)
        return evicted

    def holds(self, request_id: str, fence: int) -> bool:
        """Whether the pool holds the request's entry written at ``fence``."""
        entry = self._entries.get(request_id)
        return entry is not None and entry.fence == fence

    def discard(self, request_id: str, count: bool = True) -> bool:
        """Drop the request's entry if any (its request ended or moved elsewhere)."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        self._used -= entry.nbytes
        if count:
            self.counters.dropped += 1
        return True

    def discard_all(self, request_ids: Iterable[str]) -> int:
        """Drop several entries; returns how many were there."""
        return sum(self.discard(rid) for rid in request_ids)

    def clear(self) -> None:
        """Drop everything (counted as dropped)."""
        self.discard_all(list(self._entries))
