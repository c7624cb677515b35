"""Request and response bodies of the admin API (`/admin`). Requests refuse unknown fields."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.edge_model import EdgeModel


class _Request(EdgeModel):
    model_config = ConfigDict(extra="forbid")


class ActivateRequest(_Request):
    version: int = Field(ge=1)
    patch: str | None = None  # default: the patch named like the alias
    reason: str = Field("", max_length=1000)
    force: bool = False  # skip the gate (needs a reason; audited as force_activate)


class EvaluateRequest(_Request):
    version: int = Field(ge=1)
    patch: str | None = None  # default: the patch named like the alias
    against: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]*@[0-9]+$")  # default: the alias's active version


class BaseRequest(_Request):
    name: str
    version: str = Field(min_length=1, max_length=200)  # the release's own version string
    path: str = Field(min_length=1, max_length=4096)  # an HF checkpoint directory the engines can load
    move: bool = False  # move each alias whose carried patch passes its gate (else: reports only)
    repair: bool = False  # repair each carried patch that fails its gate (distillation prompts needed)
    # With move: aliases move only to a base some live replica hosts, unless forced (with a reason).
    force: bool = False
    reason: str = Field("", max_length=1000)


class RepairRequest(_Request):
    base: str  # the new base the alias's patch is repaired for
    reason: str = Field("", max_length=1000)


class ExtractRequest(_Request):
    checkpoint: str = Field(min_length=1, max_length=4096)  # a directory on the server: a full fine-tune of `base`
    base: str | None = None  # default: the base this gateway serves
    rank: int = Field(ge=1)
    reason: str = Field("", max_length=1000)


class MergeParamsRequest(_Request):
    weights: list[float] | None = None  # one per source; default 1 each
    density: float | None = Field(None, gt=0, le=1)  # ties, dare_ties
    beta: float | None = Field(None, ge=0, lt=1)  # breadcrumbs: share of largest magnitudes dropped
    gamma: float | None = Field(None, ge=0, lt=1)  # breadcrumbs: share of smallest magnitudes dropped
    lam: float | None = Field(None, ge=0, le=100)  # consensus: λ of the TALL masks
    k: int | None = Field(None, ge=1, le=64)  # consensus: tasks that must use an entry
    seed: int | None = Field(None, ge=0, le=2**31 - 1)  # dare_ties, distill
    # distill: the student's start ("auto": the sources the rank holds exactly, fewest prompts first; a method;
    # a source)
    init: str | None = Field(None, max_length=200)
    steps: int | None = Field(None, ge=1, le=20_000)  # distill: training steps
    lr: float | None = Field(None, gt=0, le=1)  # distill: learning rate


class MergeRequest(_Request):
    sources: list[str] = Field(min_length=2, max_length=16)  # 'name@N' versions of one base
    method: Literal["linear", "ties", "dare_ties", "breadcrumbs", "consensus", "orthogonal", "distill"]
    params: MergeParamsRequest = MergeParamsRequest()
    rank: int = Field(ge=1)
    name: str  # the patch the merged version is registered under
    tall: bool = False  # also keep the merge as TALL storage and rebuild each source from it as its next version
    # fitted: the stored ΔW and masks fitted to rebuild each source (service/lora/tall.py); masks: the paper's
    # λ-masks over this merge's ΔW
    tall_store: Literal["fitted", "masks"] = "fitted"
    reason: str = Field("", max_length=1000)


class RolloutRequest(_Request):
    version: int = Field(ge=1)
    patch: str | None = None  # default: the patch named like the alias
    mode: Literal["canary", "shadow"]
    percent: float = Field(0.0, ge=0, le=100)  # canary: the share of users (sticky by `user`) given the candidate
    min_agreement: float | None = Field(None, ge=0, le=1)  # stop by itself below this live agreement …
    min_requests: int = Field(20, ge=1, le=100_000)  # … once this many answers were compared
    reason: str = Field("", max_length=1000)


class GateRequest(_Request):
    max_nfr: float | None = Field(None, ge=0, le=1)
    min_score_delta: float | None = Field(None, ge=-1, le=1)
    max_perplexity_ratio: float | None = Field(None, gt=0)
    min_live_agreement: float | None = Field(None, ge=0, le=1)
    live_window: int | None = Field(None, ge=1, le=10_000)


class JobView(BaseModel):
    id: str
    type: str
    params: dict
    state: str
    attempts: int
    max_attempts: int
    progress: float
    stage: str
    result: dict | None
    error: str | None
    created_at: float
    updated_at: float
    actor: str

    @classmethod
    def of(cls, job) -> JobView:
        return cls(**asdict(job))


class RollbackRequest(_Request):
    version: int | None = Field(None, ge=1)  # default: the version before the last move
    reason: str = Field("", max_length=1000)


class KeyRequest(_Request):
    role: str
    name: str


class Version(BaseModel):
    name: str
    version: int
    ref: str
    base: str
    files: dict[str, str]
    origin: str
    parents: list[str]
    meta: dict
    created_at: float
    created_by: str

    @classmethod
    def of(cls, record) -> Version:
        return cls(**{**asdict(record), "parents": list(record.parents)}, ref=record.ref)


class Patch(BaseModel):
    name: str
    versions: list[Version]
    aliases: list[str]  # aliases pointing at one of its versions now


class Alias(BaseModel):
    alias: str
    patch: str
    version: int
    ref: str
    base: str
    updated_at: float
    updated_by: str
    action: str

    @classmethod
    def of(cls, pointer) -> Alias:
        return cls(**asdict(pointer), ref=pointer.ref)


class AliasMove(BaseModel):
    at: float
    action: str
    actor: str
    reason: str
    from_ref: str
    to_ref: str
    to_base: str


class AliasDetail(Alias):
    history: list[AliasMove]


class AuditEntry(BaseModel):
    id: str
    at: float
    action: str
    actor: str
    target: str
    from_ref: str
    to_ref: str
    reason: str


class Base(BaseModel):
    name: str
    version: str
    path: str | None
    module_shapes: dict[str, tuple[int, int]]
    meta: dict
    created_at: float


class Key(BaseModel):
    id: str
    name: str
    role: str
    created_at: float
    created_by: str


class NewKey(Key):
    key: str  # shown once, never stored


class ReplicaView(BaseModel):
    """A live replica as its last heartbeat announced it."""

    id: str
    url: str
    base: str
    names: list[str]
    engine: str
    ready: bool
    draining: bool
    versions: list[str]
    in_flight: int
    started_at: float
    heartbeat_at: float
    heartbeat_age_s: float

    @classmethod
    def of(cls, info, now: float) -> ReplicaView:
        return cls(**vars(info), heartbeat_age_s=round(max(0.0, now - info.heartbeat_at), 3))


class Cluster(BaseModel):
    replicas: list[ReplicaView]
    bases: dict[str, list[str]]  # base → ids of the live replicas that take requests for it
    unserved_bases: list[str]  # bases aliases point to that no live replica serves
    aliases_unserved: list[str]  # aliases on those bases: every request for them is refused


# -- side memories ----------------------------------------------------------------------------------------
class LocalityPrompt(_Request):
    prompt: str = Field(min_length=1, max_length=2000)
    reference: str | None = Field(None, max_length=200)  # informative: Loc compares with the answer before the edits


class EditRequest(_Request):
    prompt: str = Field(min_length=1, max_length=2000)
    target: str = Field(min_length=1, max_length=200)  # the answer the prompt must get (a short fact)
    paraphrases: list[str] = Field(default_factory=list, max_length=16)  # measured (Gen), never trained on
    locality: list[LocalityPrompt | str] = Field(default_factory=list, max_length=16)  # measured (Loc)


class EditsRequest(_Request):
    edits: list[EditRequest] = Field(min_length=1, max_length=100)
    reason: str = Field("", max_length=1000)


class MemoryCreateRequest(_Request):
    name: str
    base: str | None = None  # default: the base this gateway hosts
    target: str | None = None  # a base (every alias on it) or an alias; default: the base
    reason: str = Field("", max_length=1000)


class MemoryAttachRequest(_Request):
    target: str
    reason: str = Field("", max_length=1000)


class MemoryActivateRequest(_Request):
    version: int = Field(ge=0)  # 0: no memory served
    reason: str = Field("", max_length=1000)
    force: bool = False  # a version whose report failed its gate (needs a reason)


class MemoryRollbackRequest(RollbackRequest):
    version: int | None = Field(None, ge=0)  # 0: back to no memory at all (a patch has no version 0)


class MemoryRevokeRequest(_Request):
    edit: str = Field(pattern=r"^e[0-9]+$")
    reason: str = Field("", max_length=1000)


class MemoryGateRequest(_Request):
    min_rel: float | None = Field(None, ge=0, le=1)
    min_gen: float | None = Field(None, ge=0, le=1)
    min_loc: float | None = Field(None, ge=0, le=1)
    max_perplexity_ratio: float | None = Field(None, gt=0)
    min_tasks: float | None = Field(None, ge=0, le=1)


class Memory(BaseModel):
    name: str
    base: str
    target: str
    version: int  # served now (0: none)
    ref: str | None
    edits: int
    updated_at: float
    updated_by: str


class MemoryVersionView(BaseModel):
    name: str
    version: int
    ref: str
    base: str
    parent: int
    added: list[str]
    revoked: list[str]
    edits: int
    report: dict | None  # Rel/Gen/Loc of the batch and of every edit, the probe perplexity ratio, the gate
    created_at: float
    created_by: str

    @classmethod
    def of(cls, v) -> MemoryVersionView:
        report = {k: v.meta.get(k) for k in ("perplexity_ratio", "gate", "threshold", "layer", "training")}
        report |= {k: val for k, val in (v.meta.get("report") or {}).items() if k != "items"}
        return cls(name=v.name, version=v.version, ref=v.ref, base=v.base, parent=v.parent, added=list(v.added),
                   revoked=list(v.revoked), edits=len(v.edits), report=report, created_at=v.created_at,
                   created_by=v.created_by)


class MemoryMoveView(BaseModel):
    at: float
    action: str
    actor: str
    reason: str
    from_version: int
    to_version: int


class MemoryDetail(Memory):
    versions: list[MemoryVersionView]
    history: list[MemoryMoveView]
class KVPolicyBody(_Request):
    """A KV-cache policy (service/kv/policy.py says what each field means); fields left out take the defaults."""

    quant: Literal["none", "fp16", "bf16", "fp8", "int8", "int4", "int2"] = "none"
    group: Literal[8, 16, 32, 64, 128] = 32
    residual: int = Field(32, ge=0, le=4096)
    rotate: bool = False
    sinks: int = Field(4, ge=0, le=64)
    evict: Literal["none", "streaming", "snapkv", "expected_attention"] = "none"
    budget: float = Field(1.0, gt=0, le=1)


class KVProposal(_Request):
    policy: KVPolicyBody
    reason: str = Field("", max_length=1000)
    # The alias whose evaluation set is the in-context task, evaluated as well (the kit's: recall).
    context_alias: str | None = Field("recall", max_length=200)
    force: bool = False  # apply at once, without the evaluation (needs a reason; audited as kv_policy_force_set)


class KVRollbackRequest(_Request):
    reason: str = Field("", max_length=1000)
