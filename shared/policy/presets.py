"""The named scheduling presets and the traits derived from them once (docs/design.md §3.5).

Dependency-free so that every service can ask what its preset implies (the ingest, the
worker) without importing the policy algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Batching policies that run the whole generation in one go (``S = G``).
WHOLE_GENERATION = frozenset({"fcfs-fixed", "single"})

#: The presets whose instances run continuous batching (iteration-level scheduling):
#: on our own engine capped at ``ils_max_concurrency`` requests (the paper's ILS), on our
#: own engine bounded by KV memory with preemption by recompute (vLLM's behaviour), and
#: transformers' own continuous batching (an independent peer on its paged cache).
ILS_PRESET = "ils"
ILS_VLLM_PRESET = "ils-vllm"
ILS_HF_PRESET = "ils-hf"

#: ``Preset.ils_engine`` values: which iteration-level engine an instance runs.
CAPPED_ENGINE = "capped"
MEMORY_ENGINE = "memory"
HF_ENGINE = "hf"

#: ``InstanceInfo.mode`` of an instance that runs slices; one that runs continuous
#: batching publishes the name of the ILS preset it serves (``ils``, ``ils-vllm``...).
SLICE_MODE = "slice"


@dataclass(frozen=True)
class Preset:
    """A named policy: its batching and offloading, and what follows from them.

    ``ils_engine``: set for continuous-batching presets, the engine their instances run
    (:data:`CAPPED_ENGINE`, :data:`MEMORY_ENGINE` or :data:`HF_ENGINE`); such instances
    take one request per batch, are capped in requests rather than batches and are
    invisible to the horizon rule.
    ``continuous`` (derived): ``ils_engine`` is set.
    ``whole_generation`` (derived): a batch runs its whole generation (``S = G``).
    """

    name: str
    batching: str
    offloading: str
    ils_engine: str = ""
    continuous: bool = field(init=False)
    whole_generation: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "continuous", bool(self.ils_engine))
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
    Preset(ILS_PRESET, "single", "least-requests", ils_engine=CAPPED_ENGINE),
    Preset(ILS_VLLM_PRESET, "single", "least-requests", ils_engine=MEMORY_ENGINE),
    Preset(ILS_HF_PRESET, "single", "least-requests", ils_engine=HF_ENGINE),
)}

#: Named presets: ``(batching, offloading)``.
POLICIES: dict[str, tuple[str, str]] = {n: (p.batching, p.offloading) for n, p in PRESETS.items()}


def policy_of_mode(modes: set[str]) -> str | None:
    """The preset implied by the modes of a deployment's instances: an ILS preset when
    every one runs that continuous batching; None when the modes do not tell (slice
    instances serve any slice preset)."""
    if len(modes) == 1:
        (mode,) = modes
        return mode if is_continuous(mode) else None
    return None


def ils_engine(policy: str) -> str:
    """The iteration-level engine preset ``policy`` runs ("" for slice presets and
    unknown names)."""
    preset = PRESETS.get(policy)
    return "" if preset is None else preset.ils_engine


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
