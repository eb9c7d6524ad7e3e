"""Per-token streaming: publish what streaming rows generate, step by step, off the decode path.

The engine hands each step's tokens to :meth:`TokenPublisher.submit`, which only queues them;
a background thread writes whatever has queued in one fenced script call
(:meth:`shared.core.store.Store.publish_tokens`), so a decode step never waits for Redis.
:meth:`TokenPublisher.flush` waits until everything queued is written: the worker calls it
before committing the slice, so a stream's token entries always come before the slice's
commit entry.

Publishing is best effort: the commit entry carries the slice's tokens too, so an entry lost
to a Redis error only delays the client's text until the commit.
"""

from __future__ import annotations

import queue
import threading
import time

from redis.exceptions import RedisError

from shared.core.records import StepTokens
from shared.core.store import Store
from shared.obs.logging import get_logger

log = get_logger(__name__)

_STOP = object()


class TokenPublisher:
    """Writes streaming rows' tokens to their event streams from one background thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failing = False  # log a Redis failure once, not once per step
        # CPU the publisher thread spent writing, and its script calls: what streaming
        # takes from the decode loop's cores (`scls stream-overhead` reports it).
        self.cpu_s = 0.0
        self.writes = 0

    def submit(self, batch_id: str, steps: list[StepTokens]) -> None:
        """Queue one step's tokens of ``batch_id`` (returns at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="token-publisher",
                                            daemon=True)
            self._thread.start()
        self._queue.put((batch_id, steps))

    def flush(self) -> None:
        """Wait until every queued step is written (or given up)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                self._queue.task_done()
                return
            # Everything queued meanwhile goes in the same round trip, per batch.
            items = [first]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in items
            started = time.thread_time()
            self._write([item for item in items if item is not _STOP])
            self.cpu_s += time.thread_time() - started
            for _ in items:
                self._queue.task_done()
            if stop:
                return

    def _write(self, items: list[object]) -> None:
        by_batch: dict[str, list[StepTokens]] = {}
        for batch_id, steps in items:  # type: ignore[misc]
            by_batch.setdefault(batch_id, []).extend(steps)
        for batch_id, steps in by_batch.items():
            try:
                self.writes += 1
                self.store.publish_tokens(batch_id, steps)
                if self._failing:
                    log.info("token_stream_recovered")
                self._failing = False
            except RedisError as exc:
                if not self._failing:
                    log.warning("token_stream_failed", error=str(exc),
                                note="clients get these tokens with the slice's commit")
                self._failing = True
