"""RQ job entry points. RQ imports this module in the worker process and calls
:func:`run_slice`; the model stays loaded because the worker is a ``SimpleWorker`` (no
fork per job) and the process's :class:`WorkerRuntime` is installed once at start-up."""

from __future__ import annotations

from services.worker.runtime import WorkerRuntime

_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime | None) -> None:
    """Make ``runtime`` the one that serves this process's jobs."""
    global _runtime
    _runtime = runtime


def run_slice(batch_id: str) -> dict[str, float | int | str]:
    """RQ job: run one slice of ``batch_id`` on this process's model."""
    if _runtime is None:
        raise RuntimeError("no worker runtime in this process: start it with `scls worker`")
    return _runtime.run_batch(batch_id)
