"""Stop signals for long-running services, handled without taking a lock in the handler.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread
is, including inside ``threading.Event.wait`` while it holds the event's lock (entering or
leaving the wait). A handler that calls ``Event.set()`` then waits for that lock, which only
the interrupted frame below it can release: the process hangs. A scheduler whose Redis is
down spends nearly all its time in such waits, and a SIGTERM then hung it for good once in
a CI run (tests/test_faults.py::test_sigterm_ends_the_scheduler_while_redis_is_down).

:func:`on_stop_signals` runs the stop action on a thread of its own, which takes the lock
once the main thread lets it go.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(action: Callable[[], None],
                    signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Run ``action`` (on a new daemon thread) when one of ``signals`` arrives. Main thread
    only, as every ``signal.signal`` call."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=action, name="stop-signal", daemon=True).start()

    for signum in signals:
        signal.signal(signum, handler)
