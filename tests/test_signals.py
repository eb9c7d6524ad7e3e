"""Stop signals (shared/core/signals.py): the stop action never runs inside the signal
handler, where it could wait for a lock the interrupted main thread holds."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from shared.core.signals import on_stop_signals


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.timeout(30)
def test_a_stop_signal_inside_an_events_critical_section_does_not_hang(
    sigterm_restored: None,
) -> None:
    """The scheduler's loop waits on its stop event; a SIGTERM landing while that wait holds
    the event's lock (entering or leaving it) used to call ``Event.set()`` in the handler,
    which then waited forever for the lock its own thread held. Here the lock is held on
    purpose (the event's private condition: what ``Event.wait`` holds) when the signal
    arrives; the stop still happens once the lock is let go."""
    stopped = threading.Event()
    on_stop_signals(stopped.set, [signal.SIGTERM])
    with stopped._cond:  # as Event.wait holds it around the wait
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, in this thread
        assert not stopped.is_set()  # not yet: the action waits for the lock
    assert stopped.wait(5)
