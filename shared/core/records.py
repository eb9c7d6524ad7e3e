"""The request and batch records as stored in Redis hashes, and their (de)serialisation.

Token id lists are stored as JSON arrays so that ``redis-cli HGET scls:req:<id> prompt_ids``
is readable; the commit script appends to ``generated_ids`` without decoding it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

from shared.core.states import FinishReason, RequestStatus


def new_request_id() -> str:
    """A short, unique, URL-safe request id."""
    return uuid.uuid4().hex[:24]


def new_batch_id() -> str:
    """A unique batch id (also the RQ job id)."""
    return "b" + uuid.uuid4().hex[:20]


@dataclass(frozen=True)
class RequestParams:
    """Generation parameters of one request: OpenAI's fields plus vLLM's extras.

    Every field only depends on the request's own tokens, so a request gives the same
    result however it is sliced and batched.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0  # keep the k most likely tokens before top-p; 0 keeps all
    min_tokens: int = 0  # EOS and stop strings are ignored before this many tokens
    presence_penalty: float = 0.0  # OpenAI: over the generated tokens
    frequency_penalty: float = 0.0  # OpenAI: over the generated tokens
    repetition_penalty: float = 1.0  # vLLM/HF: over prompt + generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # None: no log-probabilities; k >= 0: each generated token's log-probability (of the
    # model's raw distribution) plus the k most likely alternatives.
    logprobs: int | None = None
    stream: bool = False  # the worker publishes tokens to the event stream per decode step
    # The grammar the output must match (``GrammarSpec.key``: "<kind>:<canonical text>",
    # docs/structured-outputs.md); "" for free text. Each slice rebuilds the grammar's
    # state from the generated tokens, so the output does not depend on the slicing.
    grammar: str = ""

    def to_json(self) -> str:
        """Compact JSON for the request hash (fields at their default are left out)."""
        data = {k: v for k, v in asdict(self).items()
                if k == "max_tokens" or v != _PARAM_DEFAULTS[k]}
        if self.stop:
            data["stop"] = list(self.stop)
        if self.logit_bias:
            data["logit_bias"] = [list(pair) for pair in self.logit_bias]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> RequestParams:
        """Inverse of :meth:`to_json`."""
        data = json.loads(raw)
        data["stop"] = tuple(data.get("stop") or ())
        data["logit_bias"] = tuple((int(t), float(b)) for t, b in data.get("logit_bias") or ())
        return cls(**data)

    @property
    def needs_history(self) -> bool:
        """Whether token selection depends on the tokens so far (penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


_PARAM_DEFAULTS = {f.name: f.default for f in fields(RequestParams)}


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives.

    Stored in the request hash's ``logprobs`` field, a JSON array in generated order whose
    items are ``[logprob, [[token_id, logprob], ...]]`` (alternatives most likely first).
    """

    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> list[object]:
        """The stored form (rounded: 7 significant digits are more than clients use)."""
        return [_round(self.logprob), [[t, _round(lp)] for t, lp in self.top]]

    @classmethod
    def from_json(cls, item: list[object]) -> TokenLogprob:
        """Inverse of :meth:`to_json`."""
        chosen, top = item
        return cls(float(chosen), tuple((int(t), float(lp)) for t, lp in top))  # type: ignore[misc, arg-type, union-attr]


def _round(value: float) -> float:
    # -inf (a token masked by top-k/bias) has no JSON form: store the float minimum.
    return float(f"{max(value, -3.4e38):.7g}")


@dataclass
class RequestRecord:
    """One request as stored at ``<prefix>req:<id>``."""

    id: str
    prompt_ids: list[int]
    params: RequestParams
    arrival: float
    status: RequestStatus = RequestStatus.PENDING
    generated_ids: list[int] = field(default_factory=list)
    model: str = ""
    fence: int = 0
    batch: str = ""
    slices: int = 0
    retries: int = 0
    finish_reason: FinishReason | None = None
    error: str = ""
    text: str = ""
    first_claimed_at: float | None = None
    first_slice_at: float | None = None
    finished_at: float | None = None
    # Where this request's K/V is retained, written by the commit that left it there:
    # the instance, that slice's fence and the worker's boot (its ``started_at``).
    kv_instance: str = ""
    kv_fence: int = 0
    kv_boot: str = ""
    # One entry per generated token when ``params.logprobs`` is set (see TokenLogprob).
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def context_len(self) -> int:
        """Tokens a slice must (re-)prefill: prompt plus tokens generated so far."""
        return len(self.prompt_ids) + len(self.generated_ids)

    @property
    def remaining_tokens(self) -> int:
        """Tokens the request may still generate."""
        return self.params.max_tokens - len(self.generated_ids)

    def to_hash(self) -> dict[str, str | int | float]:
        """Fields for HSET at submission."""
        return {
            "id": self.id,
            "model": self.model,
            "prompt_ids": json.dumps(self.prompt_ids, separators=(",", ":")),
            "generated_ids": json.dumps(self.generated_ids, separators=(",", ":")),
            "params": self.params.to_json(),
            "arrival": repr(self.arrival),
            "status": self.status.value,
            "fence": self.fence,
            "batch": self.batch,
            "slices": self.slices,
            "retries": self.retries,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.generated_ids),
            # Duplicated out of ``params`` so the scheduler's per-cycle read is a small HMGET.
            "max_tokens": self.params.max_tokens,
            "constrained": int(bool(self.params.grammar)),
        }

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> RequestRecord:
        """Parse a request hash read with ``decode_responses=True``."""

        def opt_float(name: str) -> float | None:
            value = raw.get(name)
            return float(value) if value else None

        reason = raw.get("finish_reason")
        return cls(
            id=raw["id"],
            model=raw.get("model", ""),
            prompt_ids=json.loads(raw["prompt_ids"]),
            generated_ids=json.loads(raw.get("generated_ids") or "[]"),
            params=RequestParams.from_json(raw["params"]),
            arrival=float(raw["arrival"]),
            status=RequestStatus(raw["status"]),
            fence=int(raw.get("fence", 0)),
            batch=raw.get("batch", ""),
            slices=int(raw.get("slices", 0)),
            retries=int(raw.get("retries", 0)),
            finish_reason=FinishReason(reason) if reason else None,
            error=raw.get("error", ""),
            text=raw.get("text", ""),
            first_claimed_at=opt_float("first_claimed_at"),
            first_slice_at=opt_float("first_slice_at"),
            finished_at=opt_float("finished_at"),
            kv_instance=raw.get("kv_instance", ""),
            kv_fence=int(raw.get("kv_fence") or 0),
            kv_boot=raw.get("kv_boot", ""),
            logprobs=[TokenLogprob.from_json(x) for x in json.loads(raw.get("logprobs") or "[]")],
        )


@dataclass(frozen=True)
class BatchRecord:
    """One slice batch as stored at ``<prefix>batch:<id>``."""

    id: str
    instance: str
    status: str
    fences: dict[str, int]  # request id -> fence, in batch order
    slice_length: int
    created_at: float
    deadline: float
    estimated_s: float = 0.0
    drop_finished: bool = True  # False for SLS: finished rows keep computing (invalid tokens)

    @property
    def request_ids(self) -> list[str]:
        """Request ids in batch order."""
        return list(self.fences)

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> BatchRecord:
        """Parse a batch hash read with ``decode_responses=True``."""
        fences: dict[str, int] = {}
        for member in filter(None, raw.get("members", "").split(",")):
            rid, fence = member.split("=")
            fences[rid] = int(fence)
        return cls(
            id=raw["id"],
            instance=raw["instance"],
            status=raw["status"],
            fences=fences,
            slice_length=int(raw["slice_length"]),
            created_at=float(raw["created_at"]),
            deadline=float(raw["deadline"]),
            estimated_s=float(raw.get("estimated_s", 0.0)),
            drop_finished=raw.get("drop_finished", "1") != "0",
        )


@dataclass(frozen=True)
class CommitItem:
    """One request's outcome of a slice, as the worker commits it."""

    request_id: str
    fence: int
    new_ids: list[int]
    finish_reason: FinishReason | None
    delta_text: str
    final_text: str = ""
    kv_retained: bool = False  # the worker's pool keeps its K/V, written at ``fence``
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new id when the request asks


@dataclass(frozen=True)
class StepTokens:
    """Tokens one streaming request took in one decode step (per-token streaming)."""

    request_id: str
    fence: int  # the slice's fence for the request: publishing is fenced like the commit
    position: int  # index within the request's generated tokens of the first of ``ids``
    ids: list[int]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per id when the request asks


@dataclass(frozen=True)
class InstanceInfo:
    """A live worker instance, as registered at ``<prefix>instance:<id>``."""

    id: str
    queue: str
    device: str
    model: str
    memory_budget_bytes: int
    kv_bytes_per_token: int
    context_limit: int
    started_at: float
    heartbeat_at: float
    profile: str  # the instance's CostModel as JSON (shared.policy.costmodel)
    mode: str = "slice"  # slice, or the ILS preset it runs (ils, ils-vllm, ils-hf)
    state: str = "ready"  # ready | draining
    kv_pool_bytes: int = 0  # its KV pool: beside memory_budget_bytes, or (running sets) sharing it
    kv_pool_used_bytes: int = 0  # held by retained K/V at the last heartbeat

    @property
    def boot(self) -> str:
        """Identifies this run of the worker: a restart under the same id has an empty
        pool, so K/V locations recorded under another boot are void."""
        return repr(self.started_at)

    def to_hash(self) -> dict[str, str | int | float]:
        """Fields for HSET."""
        return {k: (v if not isinstance(v, float) else repr(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> InstanceInfo:
        """Parse an instance hash read with ``decode_responses=True``."""
        return cls(
            id=raw["id"],
            queue=raw["queue"],
            device=raw["device"],
            model=raw["model"],
            memory_budget_bytes=int(raw["memory_budget_bytes"]),
            kv_bytes_per_token=int(raw["kv_bytes_per_token"]),
            context_limit=int(raw["context_limit"]),
            started_at=float(raw["started_at"]),
            heartbeat_at=float(raw["heartbeat_at"]),
            profile=raw.get("profile", ""),
            mode=raw.get("mode", "slice"),
            state=raw.get("state", "ready"),
            kv_pool_bytes=int(raw.get("kv_pool_bytes") or 0),
            kv_pool_used_bytes=int(raw.get("kv_pool_used_bytes") or 0),
        )


def now() -> float:
    """Wall-clock seconds; every timestamp stored in Redis uses this clock."""
    return time.time()
