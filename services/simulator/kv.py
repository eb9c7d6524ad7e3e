"""The simulated KV pool of a slice instance: request K/V kept between slices, by bytes.

The same policy as :class:`services.worker.kv_pool.KvPool`, without tensors: an entry is
one request's K/V for its context but the last (unfed) token, ``(context - 1) *
kv_bytes_per_token`` bytes; a new entry that does not fit evicts the least recently stored
ones (entries are never read in place: a resuming slice *takes* its entry out, so the
least recently used entry is the least recently stored one); an entry larger than the
whole capacity is not stored. Requests are the simulator's integer positions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class SimKvPool:
    """LRU store of request position -> entry bytes, bounded by ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"KV pool capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0  # entries dropped to make room
        self.rejected = 0  # entries larger than the whole pool, never stored
        self._entries: OrderedDict[int, int] = OrderedDict()

    def __contains__(self, request: object) -> bool:
        return request in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def order(self) -> list[int]:
        """Requests held, least recently stored first (the eviction order)."""
        return list(self._entries)

    def take(self, request: int) -> bool:
        """Remove the request's entry; whether it was there (the slice resumes from it)."""
        return self.discard(request)

    def discard(self, request: int) -> bool:
        """Drop the request's entry if any (it ended, moved, or is being resumed)."""
        nbytes = self._entries.pop(request, None)
        if nbytes is None:
            return False
        self.used_bytes -= nbytes
        return True

    def put(self, request: int, nbytes: int) -> list[int]:
        """Store ``nbytes`` for ``request`` (replacing its old entry); the requests evicted
        to make room, oldest first. Too large for the whole pool: not stored."""
        self.discard(request)
        if nbytes > self.capacity_bytes:
            self.rejected += 1
            return []
        evicted = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            victim, old = self._entries.popitem(last=False)
            self.used_bytes -= old
            self.evictions += 1
            evicted.append(victim)
        self._entries[request] = nbytes
        self.used_bytes += nbytes
        return evicted


class KvDirectory:
    """Which instance's pool holds each request's K/V (what Redis records per request as
    ``kv_instance``), kept consistent with the pools: -1 for none."""

    def __init__(self, n: int, pools: Sequence[SimKvPool | None]) -> None:
        self.home = np.full(n, -1, np.int32)
        self.pools = list(pools)

    def claimed(self, idx: np.ndarray, k: int) -> None:
        """Requests claimed onto instance ``k``: any other instance holding their K/V
        drops the stale entry (the real one does between its slices, told by the claim)."""
        homes = self.home[idx]
        for i, home in zip(idx.tolist(), homes.tolist(), strict=True):
            if home >= 0 and home != k:
                self.forget(i)

    def forget(self, i: int) -> None:
        """Request ``i`` ended or moved: its entry, wherever it is, goes."""
        home = int(self.home[i])
        if home >= 0:
            pool = self.pools[home]
            if pool is not None:
                pool.discard(i)
            self.home[i] = -1

    def after_slice(self, k: int, idx: np.ndarray, stored: Sequence[int],
                    evicted: Sequence[int]) -> list[int]:
        """A slice of requests ``idx`` ended on instance ``k``: its rows took their entries
        out at its start and ``stored`` put new ones; ``evicted`` lost theirs. Returns the
        requests outside the batch that lost their home (their candidates change)."""
        lost = [i for i in evicted if self.home[i] == k]
        self.home[np.array(lost, dtype=np.int64)] = -1
        self.home[idx] = -1
        self.home[np.array(stored, dtype=np.int64)] = k
        return lost
