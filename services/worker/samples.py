"""What a profiling run measured: one :class:`PointSample` per grid point, gathered in
:class:`ProfileSamples` with what the fit (:mod:`services.worker.fit`) needs to know."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PointSample:
    """Measurements of one grid point ``(b, l)`` at slice length ``s`` (medians of repeats).

    ``step_s[j-1]`` is decode step ``j`` (context ``l + j``), ``j = 1..s-1``; ``slice_s`` is
    the measured whole slice (prefill + every step); ``peak_bytes`` is the largest measured
    peak beyond the weights over the repeats (None when it could not be measured).
    """

    b: int
    l: int  # noqa: E741
    s: int
    prefill_s: float
    step_s: tuple[float, ...]
    slice_s: float
    peak_bytes: int | None = None
    process_peak_bytes: int | None = None
    # Peak of a slice of the same shape whose rows all resume from retained K/V (context
    # ``l``, their entries made before it), beyond the level before it; None: not measured.
    resume_peak_bytes: int | None = None

    def __post_init__(self) -> None:
        if len(self.step_s) != self.s - 1:
            raise ValueError(f"point ({self.b}, {self.l}): {len(self.step_s)} steps, s={self.s}")


@dataclass(frozen=True)
class ProfileSamples:
    """Everything a profiling run measured, plus what the fit needs to know about the model."""

    points: tuple[PointSample, ...]
    slice_length: int
    kv_bytes_per_token: int
    model: str = ""
    device: str = ""
    dtype: str = ""
    grid: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    # Slices of ``slice_length`` tokens per row decoded under a JSON schema: (rows, seconds
    # the engine spent masking, tokens it masked) per batch size; () = not measured.
    grammar: tuple[tuple[int, float, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        out = asdict(self)
        out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileSamples:
        """Inverse of :meth:`to_dict` (a profile cached before ``grammar`` has none)."""
        points = tuple(
            PointSample(**{**p, "step_s": tuple(p["step_s"])}) for p in d["points"]
        )
        grammar = tuple((int(b), float(f), float(c)) for b, f, c in d.get("grammar", ()))
        return cls(**{**d, "points": points, "grammar": grammar})


