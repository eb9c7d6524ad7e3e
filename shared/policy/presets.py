"""The named scheduling presets and the traits derived from them once (docs/design.md §3.5).

Dependency-free so that every service can ask what its preset implies (the ingest, the
worker) without importing the policy algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Batching policies that run the whole generation in one go (``S = G``).
WHOLE_GENERATION = frozenset({"fcfs-fixed", "single"})

#: The preset whose instances run continuous batching (iteration-level scheduling).
ILS_PRESET = "ils"

#: ``InstanceInfo.mode`` of an instance that runs slices, and of one that runs continuous
#: batching (it serves the ILS preset).
SLICE_MODE = "slice"
CONTINUOUS_MODE = "ils"


@dataclass(frozen=True)
class Preset:
    """A named policy: its batching and offloading, and what follows from them.

    ``continuous``: instances run continuous batching (ILS), one request per batch, capped
    in requests rather than batches and invisible to the horizon rule.
    ``whole_generation`` (derived): a batch runs its whole generation (``S = G``).
    """

    name: str
    batching: str
    offloading: str
    continuous: bool = False
    whole_generation: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "whole_generation", self.batching in WHOLE_GENERATION)

    def retains_kv(self, batching: str | None = None) -> bool:
        """Whether instances keep requests' K/V between slices (with ``batching``
        overriding the preset's): only slice batching does; whole-generation batches (SLS)
        and continuous batching (ILS) leave nothing unfinished to keep."""
        return (batching or self.batching) not in WHOLE_GENERATION


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("scls", "scls", "max-min"),
    Preset("sls", "fcfs-fixed", "round-robin"),
    Preset("scls-rr", "scls", "round-robin"),
    Preset("fcfs-maxmin", "fcfs", "max-min"),
    Preset(ILS_PRESET, "single", "least-requests", continuous=True),
)}

#: Named presets: ``(batching, offloading)``.
POLICIES: dict[str, tuple[str, str]] = {n: (p.batching, p.offloading) for n, p in PRESETS.items()}


def policy_of_mode(modes: set[str]) -> str | None:
    """The preset implied by the modes of a deployment's instances: ILS when every one
    runs continuous batching; None when the modes do not tell (slice instances serve any
    slice preset)."""
    return ILS_PRESET if modes == {CONTINUOUS_MODE} else None


def is_continuous(policy: str) -> bool:
    """Whether preset ``policy`` runs continuous batching (ILS); False for unknown names."""
    preset = PRESETS.get(policy)
    return preset is not None and preset.continuous


def retains_kv(policy: str, batching: str | None = None) -> bool:
    """Whether instances serving preset ``policy`` (or its ``batching`` override) keep
    requests' K/V between slices (:meth:`Preset.retains_kv`); False for unknown names."""
    preset = PRESETS.get(policy)
    return preset is not None and preset.retains_kv(batching)


def expected_busy(policy: str, estimated_s: float) -> float:
    """An instance's expected outstanding work as the policy should see it.

    ``estimated_s`` sums the estimates of the batches queued or running on the instance.
    ILS instances batch continuously, so a request's whole-generation estimate says
    nothing about when the next one can join: they are paced by their request cap alone
    (:class:`shared.policy.config.DispatchCaps`) and look idle to the horizon rule.
    """
    return 0.0 if is_continuous(policy) else estimated_s
