"""The simulated ILS engines under both KV layouts: timelines and memory by hand.

``padded`` (the default) models our iteration-level engine on the slice engine's kernels:
the requests admitted at a boundary are prefilled in the slice engine's passes, then the
same iteration decodes every running row at the **longest** context (so a new row draws
two tokens in it), and the cache holds ``b x (width + 1)`` slots. ``ragged`` is vLLM's
paged cache: one ``Tp(1, l)`` per admitted request, decode at the **mean** context, KV in
16-token blocks. docs/simulator.md ("ILS instances") describes both.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.simulator import SimInstance, SimOptions, simulate
from services.simulator.ils import IlsInstance, VllmInstance
from services.simulator.instances import QueuedBatch
from services.simulator.state import RequestTable
from shared.bench.workload import WorkItem
from shared.policy.costmodel import PREFILL_BASE, CostModel
from tests.test_simulator import by_index, items, settings

# Tp(b, l) = 0.1 + 0.001 * b * l: a pass's overhead is 100 tokens' worth, so prompts of 100
# and 500 are prefilled in two passes (200 + 600 < 100 + 2 * 500) and 100 and 110 in one
# (100 + 2 * 110 < 200 + 210). Td(b, c) = 0.01 + 0.001 * b + 0.0001 * c: the context
# matters, so the longest and the mean price apart. One byte per cached token.
MODEL = CostModel(
    slice_length=4, prefill_features=PREFILL_BASE, prefill_coef=(0.1, 0.0, 0.0, 0.001),
    decode_coef=(0.01, 0.001, 0.0001, 0.0), kv_bytes_per_token=1,
    act_coef=(0.0, 0.0, 0.0, 0.0), mem_margin=1.0, source="test",
)


def tp(b: int, l: int) -> float:  # noqa: E741
    return 0.1 + 0.001 * b * l


def td(b: int, c: float) -> float:
    return 0.01 + 0.001 * b + 0.0001 * c


def tds(b: int, contexts: range) -> float:
    return sum(td(b, c) for c in contexts)


def drive(inst: IlsInstance, work: list[WorkItem], batches: list[tuple[float, list[int]]]
          ) -> tuple[dict[int, float], RequestTable]:
    """Run ``inst`` alone: each batch (request positions) delivered at its time, every
    event the engine asks for reached; returns each request's departure time."""
    reqs = RequestTable(work, None)  # forced lengths: a request draws its output exactly
    failed: list[int] = []
    finish: dict[int, float] = {}
    event = math.inf
    pending = sorted(batches)
    while pending or event < math.inf:
        if pending and pending[0][0] <= event:  # deliveries first at the same time
            t, idx = pending.pop(0)
            nxt = inst.deliver(QueuedBatch(np.array(idx), 1, 0.0, True), t, reqs,
                               lambda i, _t, _why: failed.append(i))
            event = nxt if nxt is not None else event
            continue
        departed, nxt = inst.boundary(event, reqs, lambda i, _t, _why: failed.append(i))
        finish.update(dict.fromkeys(departed, event))
        event = nxt if nxt is not None else math.inf
    assert not failed
    return finish, reqs


def engine(kind: str, layout: str, budget: int = 10**9) -> IlsInstance:
    if kind == "vllm":
        return VllmInstance(0, "a", MODEL, budget, 4096, layout)
    return IlsInstance(0, "a", MODEL, budget, 4096, 64, layout)


# (prompts, outputs, delivery times, layout, each request's departure by hand)
TIMELINES = [
    # Two passes Tp(1,100) + Tp(1,500), one decode step of both at the longest context
    # (501: the long row fed its first token); request 0 has drawn 2 of 3 tokens, so one
    # more step (502); request 1 then runs alone from context 503.
    ([100, 500], [3, 5], [0.0, 0.0], "padded",
     [tp(1, 100) + tp(1, 500) + tds(2, range(501, 503)),
      tp(1, 100) + tp(1, 500) + tds(2, range(501, 503)) + tds(1, range(503, 505))]),
    # Ragged: the prefills draw one token each, then decode steps at the mean, 300 + k.
    ([100, 500], [3, 5], [0.0, 0.0], "ragged",
     [tp(1, 100) + tp(1, 500) + tds(2, range(301, 303)),
      tp(1, 100) + tp(1, 500) + tds(2, range(301, 303)) + tds(1, range(503, 505))]),
    # One padded pass Tp(2, 110), decode at 111: request 0 has its 2 tokens.
    ([100, 110], [2, 4], [0.0, 0.0], "padded",
     [tp(2, 110) + td(2, 111), tp(2, 110) + td(2, 111) + tds(1, range(112, 114))]),
    ([100, 110], [2, 4], [0.0, 0.0], "ragged",
     [tp(1, 100) + tp(1, 110) + td(2, 106),
      tp(1, 100) + tp(1, 110) + td(2, 106) + tds(1, range(112, 114))]),
    # A one-token request: its prefill draws it, it takes no decode step (the other row
    # decodes alone at 501) and leaves at the iteration's end.
    ([100, 500], [1, 3], [0.0, 0.0], "padded",
     [tp(1, 100) + tp(1, 500) + td(1, 501),
      tp(1, 100) + tp(1, 500) + td(1, 501) + td(1, 502)]),
    ([100, 500], [1, 3], [0.0, 0.0], "ragged",
     [tp(1, 100) + tp(1, 500), tp(1, 100) + tp(1, 500) + tds(1, range(501, 503))]),
    # A request joining mid-run at the boundary 0.6611 (request 0's first iteration):
    # padded, its prefill and a decode step of both at the long row's 502 draw its first
    # 2 tokens, one more step (503) ends both.
    ([500, 100], [4, 3], [0.0, 0.65], "padded",
     [tp(1, 500) + td(1, 501) + tp(1, 100) + tds(2, range(502, 504))] * 2),
    # Ragged: request 0 draws 1 token per iteration, so it has 2 at the join; the join's
    # iteration is Td(1, 502) + Tp(1, 100), the next is at the mean (502 + 100) / 2 + 1,
    # then request 1 draws its last token alone at 102.
    ([500, 100], [4, 3], [0.0, 0.65], "ragged",
     [tp(1, 500) + td(1, 501) + td(1, 502) + tp(1, 100) + td(2, 302),
      tp(1, 500) + td(1, 501) + td(1, 502) + tp(1, 100) + td(2, 302) + td(1, 102)]),
]


@pytest.mark.parametrize("kind", ["ils", "vllm"])
@pytest.mark.parametrize(("prompts", "outputs", "at", "layout", "want"), TIMELINES)
def test_ils_timeline_by_hand(kind: str, prompts: list[int], outputs: list[int],
                              at: list[float], layout: str, want: list[float]) -> None:
    """Ample memory, so the capped engine and the vLLM-like one run the same timeline."""
    work = items(prompts, outputs)
    batches: dict[float, list[int]] = {}
    for i, t in enumerate(at):
        batches.setdefault(t, []).append(i)
    inst = engine(kind, layout)
    finish, reqs = drive(inst, work, sorted(batches.items()))
    assert [finish[i] for i in range(len(prompts))] == pytest.approx(want, abs=1e-12)
    assert inst.busy_s == pytest.approx(max(want), abs=1e-12)
    assert list(reqs.generated) == outputs
    assert inst.oom_events == 0 and "preemptions" not in inst.counters


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_simulate_prices_the_ils_join_like_the_engine(layout: str) -> None:
    """The last two timelines through the whole simulator (the scheduler delivers request
    1 when it arrives): finish times and busy seconds as by hand."""
    want = {t[3]: t[4] for t in TIMELINES[-2:]}[layout]
    wl = items([500, 100], [4, 3], [0.0, 0.65])
    for policy in ("ils", "ils-vllm"):
        res = simulate(wl, [SimInstance("a", MODEL, 10**9, 4096)], settings(policy),
                       SimOptions(kv_layout=layout))
        out = by_index(res)
        assert [out[0].e2e_s, out[1].e2e_s + 0.65] == pytest.approx(want, abs=1e-9)
        assert res.metrics["busy_s_total"] == pytest.approx(max(want), abs=1e-9)


def test_padded_memory_preempts_where_the_ragged_blocks_do_not() -> None:
    """Prompts 150 and 20, 20 tokens each, 320 bytes. Ragged: 10 + 2 blocks at first, at
    most 11 + 3 of the 20: no preemption. Padded: 2 x (150 + 1) = 302 slots admit both; the
    width grows by one per iteration (151 after the admission iteration) until 2 x (160 +
    1) > 320 at the 10th iteration: the younger row is preempted with 10 tokens, the older
    finishes alone, then the younger re-prefills its 30 tokens (recomputed) and draws its
    other 10 (2 in its admission iteration)."""
    work = items([150, 20], [20, 20])
    ragged = engine("vllm", "ragged", budget=320)
    finish, reqs = drive(ragged, work, [(0.0, [0, 1])])
    end = tp(1, 150) + tp(1, 20) + tds(2, range(86, 105))  # mean 85, 19 steps
    assert finish == pytest.approx({0: end, 1: end}, abs=1e-12)
    assert "preemptions" not in ragged.counters and list(reqs.generated) == [20, 20]

    padded = engine("vllm", "padded", budget=320)
    finish, reqs = drive(padded, work, [(0.0, [0, 1])])
    preempt = tp(1, 150) + tp(1, 20) + tds(2, range(151, 160))  # 9 iterations, 10 tokens
    first = preempt + tds(1, range(160, 170))
    second = first + tp(1, 30) + tds(1, range(31, 40))
    assert finish == pytest.approx({0: first, 1: second}, abs=1e-12)
    assert padded.counters == {"preemptions": 1.0, "recomputed_tokens": 30.0}
    assert list(reqs.generated) == [20, 20] and padded.max_running == 2


def test_padded_admission_counts_the_longest_row() -> None:
    """300 bytes: a 20-token prompt may join a 140-token one while 2 x (140 + 1) fits (282),
    not a 150-token one (302): it waits for the long one to leave. Ragged, 9 + 2 blocks of
    the 18 fit either way."""
    for long, joins in ((140, True), (150, False)):
        inst = engine("vllm", "padded", budget=300)
        finish, _ = drive(inst, items([long, 20], [2, 2]), [(0.0, [0, 1])])
        assert inst.max_running == (2 if joins else 1)
        assert (finish[1] == finish[0]) is joins
        ragged = engine("vllm", "ragged", budget=300)
        drive(ragged, items([long, 20], [2, 2]), [(0.0, [0, 1])])
        assert ragged.max_running == 2


@pytest.mark.parametrize(("layout", "ooms"), [("padded", 1), ("ragged", 0)])
def test_capped_ils_counts_oom_by_its_layout(layout: str, ooms: int) -> None:
    """The capped engine never preempts; it counts an OOM event when a segment's last
    iteration overruns the budget: padded 2 x (169 + 1) = 340 > 320 slots, ragged the summed
    contexts 170 + 40 = 210 fit."""
    inst = engine("ils", layout, budget=320)
    _, reqs = drive(inst, items([150, 20], [20, 20]), [(0.0, [0, 1])])
    assert inst.oom_events == ooms and list(reqs.generated) == [20, 20]


@pytest.mark.parametrize(("kind", "layout", "held"), [
    ("ils", "padded", 2 * 150),  # b x the longest context
    ("ils", "ragged", 150 + 20),  # the summed contexts
    ("vllm", "padded", 2 * 150),
    ("vllm", "ragged", (10 + 2) * 16),  # their blocks
])
def test_occupancy_follows_the_layout(kind: str, layout: str, held: int) -> None:
    inst = engine(kind, layout)
    reqs = RequestTable(items([150, 20], [20, 20]), None)
    inst.deliver(QueuedBatch(np.array([0, 1]), 1, 0.0, True), 0.0, reqs,
                 lambda *_: pytest.fail("nothing fails"))
    assert inst.occupancy() == (2, float(held))
