"""Refusing new requests while the deployment cannot serve them (issue 15).

The check itself (Redis, the scheduler's leader lock, live workers; cached) is
:class:`shared.core.readiness.Readiness`; the app opens one for its lifespan.
"""

from __future__ import annotations

from fastapi import Request

from services.ingest.validation import APIError
from shared.core.readiness import Readiness

#: Seconds a client refused with 503 is told to wait (a scheduler failover takes a few).
RETRY_AFTER_S = 5


def readiness_of(request: Request) -> Readiness:
    """The app's :class:`Readiness` (it exists while the app's lifespan runs)."""
    readiness: Readiness | None = getattr(request.app.state, "readiness", None)
    if readiness is None:
        raise RuntimeError("the ingest app is not started: run it with its lifespan")
    return readiness


async def reject_when_unready(request: Request) -> None:
    """503 (``Retry-After``) before a new request is stored, while the deployment cannot
    serve it (``settings.reject_when_unready``); a no-op when ready or when disabled."""
    if not request.app.state.ingest.settings.reject_when_unready:
        return
    state = await readiness_of(request).state()
    if state.ready:
        return
    raise APIError(
        503,
        f"the deployment is not ready to serve requests: {state.missing()}; nothing was "
        f"stored: retry after {RETRY_AFTER_S} s (GET /health shows readiness)",
        headers={"Retry-After": str(RETRY_AFTER_S)}, code="not_ready",
    )
