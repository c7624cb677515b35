"""The KV policies this replica serves: the registry's records applied to the engine and the resolver.

A base's record is its deployments' default; an alias's record is its own (where the engine can). A request
takes its policy at admission (the resolver attaches it), so a change applies to requests admitted after it.
A record the engine refuses (vLLM: a dtype it lacks, eviction, a per-alias policy) is not served: the replica
keeps the policy it had, and says so in /admin/replica and on /metrics (`patchserve_kv_policy_refused`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from adapters_store.kv_policies import KVPolicies, KVPolicyRecord
from service import metrics
from service.kv.policy import IDENTITY, KVPolicy, KVPolicyInvalid, KVPolicyRefused
from service.replica.resolver import KVInForce, Resolver

log = logging.getLogger("patchserve.kv")


@dataclass
class _Refused:
    version: int
    reason: str


class KVState:
    """Applies KV policy records to one replica's engine and resolver."""

    def __init__(self, store: KVPolicies, engine, resolver: Resolver, base: str):
        self.store = store
        self.engine = engine
        self.resolver = resolver
        self.base = base
        self.refused: dict[str, _Refused] = {}
        self._none = KVPolicyRefused(f"the {engine.name} engine applies no KV policy")

    # An engine without KV support (a test double) keeps the default and refuses every other policy.
    def _caps(self) -> dict:
        caps = getattr(self.engine, "kv_capabilities", None)
        return caps() if caps else {"engine": self.engine.name, "per_alias": False, "quant": ["none"],
                                    "evict": ["none"]}

    def _report(self, policy: KVPolicy) -> dict:
        report = getattr(self.engine, "kv_report", None)
        return report(policy) if report else {}

    async def _engine_apply(self, policy: KVPolicy, per_alias: bool) -> None:
        if not hasattr(self.engine, "apply_kv_policy"):
            if not policy.is_identity:
                raise self._none
            return
        if not per_alias:
            await self.engine.apply_kv_policy(policy)
        elif not self._caps().get("per_alias"):
            if not policy.is_identity:
                raise KVPolicyRefused(f"the {self.engine.name} engine has one KV cache for every alias: set the "
                                      f"policy on the base {self.base}")
        else:
            await self.engine.check_kv_policy(policy)

    async def initial_policy(self) -> None:
        """Before the engine starts: the base's policy, so an engine with start-time settings (vLLM) starts with it."""
        try:
            record = await asyncio.to_thread(self.store.get, self.base)
        except Exception as exc:  # the registry away: start with the default; the reconcile applies it later
            log.warning("KV policy unreadable at start", extra={"fields": {"error": repr(exc)}})
            return
        if record is not None and hasattr(self.engine, "initial_kv_policy"):
            try:
                self.engine.initial_kv_policy(KVPolicy.from_dict(record.policy))
            except (KVPolicyInvalid, KVPolicyRefused) as exc:
                self._refuse(record, str(exc))

    def read(self) -> dict[str, KVPolicyRecord]:
        """Every scope's record (in a thread: Redis)."""
        return self.store.all()

    async def apply(self, records: dict[str, KVPolicyRecord]) -> None:
        """Serve `records` here: the base's on the engine first, then every alias's, then the resolver's table."""
        table: dict[str, KVInForce] = {}
        for scope, record in sorted(records.items(), key=lambda kv: kv[0] != self.base):
            if scope != self.base and scope not in self.resolver.aliases:
                continue
            current = self.resolver.kv.get(scope)
            if current is not None and current.version == record.version:
                table[scope] = current
                continue
            if (refused := self.refused.get(scope)) and refused.version == record.version:
                if current is not None:
                    table[scope] = current
                continue
            try:
                policy = KVPolicy.from_dict(record.policy)
                await self._engine_apply(policy, per_alias=scope != self.base)
            except (KVPolicyInvalid, KVPolicyRefused) as exc:
                self._refuse(record, str(exc))
                if current is not None:
                    table[scope] = current
                continue
            self.refused.pop(scope, None)
            table[scope] = KVInForce(scope, record.version, policy)
            log.info("KV policy applied", extra={"fields": {"scope": scope, "version": record.version,
                                                            "policy": policy.describe()}})
        self.resolver.kv = table
        self._export()

    def _refuse(self, record: KVPolicyRecord, reason: str) -> None:
        if self.refused.get(record.scope, _Refused(-1, "")).version != record.version:
            log.warning("KV policy refused", extra={"fields": {"scope": record.scope, "version": record.version,
                                                               "reason": reason}})
        self.refused[record.scope] = _Refused(record.version, reason)

    def describe(self) -> dict:
        """What /admin/replica shows: the policy in force per scope, its figures, refusals, what the engine can do."""
        scopes = {}
        for scope, kv in self._in_force().items():
            scopes[scope] = {"version": kv.version, "policy": kv.policy.as_dict(), "label": kv.policy.describe(),
                             **self._report(kv.policy)}
            if scope in self.refused:
                scopes[scope]["refused"] = {"version": self.refused[scope].version,
                                            "reason": self.refused[scope].reason}
        for scope, refused in self.refused.items():
            scopes.setdefault(scope, {"version": 0, "policy": IDENTITY.as_dict(), "label": "none",
                                      "refused": {"version": refused.version, "reason": refused.reason}})
        return {"capabilities": self._caps(), "scopes": scopes}

    def announcement(self) -> dict:
        """What the heartbeat says of KV policies: the engine's capabilities and the label in force per scope."""
        return {"capabilities": self._caps(),
                "in_force": {scope: kv.ref for scope, kv in self.resolver.kv.items()},
                "refused": {scope: r.version for scope, r in self.refused.items()}}

    def _in_force(self) -> dict[str, KVInForce]:
        return {self.base: self.resolver.kv.get(self.base) or KVInForce(self.base, 0, IDENTITY), **self.resolver.kv}

    def _export(self) -> None:
        for gauge in (metrics.kv_policy_info, metrics.kv_policy_refused, metrics.kv_bytes_per_token,
                      metrics.kv_capacity_tokens):
            gauge.clear()
        name = self.engine.name
        for scope, kv in self._in_force().items():
            metrics.kv_policy_info.labels(name, scope, kv.policy.describe(), str(kv.version)).set(1)
            # Read at scrape time: the figures follow each batch the engine measures.
            metrics.kv_bytes_per_token.labels(name, scope).set_function(
                lambda p=kv.policy: self._report(p).get("bytes_per_token") or float("nan"))
            metrics.kv_capacity_tokens.labels(name, scope).set_function(
                lambda p=kv.policy: self._report(p).get("capacity_tokens") or float("nan"))
        for scope in self.refused:
            metrics.kv_policy_refused.labels(name, scope).set(1)
