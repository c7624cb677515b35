"""Resolves a request's `model` to what serves it: a base, a patch version or none, a memory version or none.

`model` is a base (`tiny`, `base-v1`), an alias (`sentiment` → its active version), or a pinned
version (`sentiment@1`). The memory is the one attached to the alias, else the one attached to the base
(a pinned version or the base itself: the base's), if its active version serves on this base. The
resolver holds plain data, this replica's view of the registry:
`registry_sync` keeps it current, and moves an alias here only once its version is loaded.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from adapters_store.memories import MemoryVersion
from adapters_store.registry import PatchVersion
from adapters_store.rollouts import Rollout
from service.kv.policy import IDENTITY, KVPolicy


class UnknownModel(LookupError):
    pass


class HostedElsewhere(LookupError):
    """The alias is active on a base this gateway does not host (during a base upgrade)."""

    def __init__(self, model: str, base: str):
        super().__init__(model)
        self.model, self.base = model, base


@dataclass(frozen=True)
class Trial:
    """An alias's rollout (its record in the store) with the candidate version this replica serves for it."""

    rollout: Rollout
    candidate: PatchVersion


def _bucket(alias: str, user: str | None) -> float:
    """Where a user falls in [0, 100): the same for every request of that user, so a canary is sticky."""
    if user is None:
        return random.random() * 100
    return int(hashlib.sha256(f"{alias}:{user}".encode()).hexdigest()[:8], 16) % 10_000 / 100


@dataclass(frozen=True)
class KVInForce:
    """A KV policy record as this replica serves it: its scope (a base or an alias), version and policy."""

    scope: str
    version: int
    policy: KVPolicy = IDENTITY

    @property
    def ref(self) -> str:
        return f"{self.scope}@{self.version}"


@dataclass(frozen=True)
class Resolved:
    model: str  # the name as registered (the metrics' `alias` label)
    base: str
    patch: PatchVersion | None
    memory: MemoryVersion | None = None
    kv: KVInForce | None = None  # the KV policy in force for it (None: the default, nothing compressed)

    @property
    def served_by(self) -> str:
        """The `x-patchserve-served-by` header: the versions that served the request (a memory and a KV policy only
        if one did)."""
        served = f"base={self.base}; patch={self.patch.ref if self.patch else 'none'}"
        served += f"; memory={self.memory.ref}" if self.memory else ""
        return served + (f"; kv={self.kv.ref}" if self.kv is not None else "")

    @property
    def version_label(self) -> str:
        return str(self.patch.version) if self.patch else "none"


@dataclass
class Resolver:
    bases: dict[str, str] = field(default_factory=dict)  # served name → base version
    versions: dict[str, dict[int, PatchVersion]] = field(default_factory=dict)  # patch → version → it
    aliases: dict[str, tuple[str, int]] = field(default_factory=dict)  # alias → (patch, version)
    elsewhere: dict[str, str] = field(default_factory=dict)  # alias → the base it is on, not hosted here
    rollouts: dict[str, Trial] = field(default_factory=dict)  # alias → its canary or shadow candidate
    memory_targets: dict[str, str] = field(default_factory=dict)  # base or alias → the memory attached to it
    memories: dict[str, MemoryVersion] = field(default_factory=dict)  # memory → its active version, loaded here
    kv: dict[str, KVInForce] = field(default_factory=dict)  # scope (base or alias) → KV policy in force

    def resolve(self, model: str, user: str | None = None) -> Resolved:
        """The versions that serve `model` now (for `user`, under a canary); raises UnknownModel, HostedElsewhere."""
        resolved = self._resolve(model, user)
        kv = self.kv.get(resolved.model) if resolved.patch is not None else None
        kv = kv or self.kv.get(resolved.base)
        if kv is None or kv.policy.is_identity:  # the default: nothing to say (the header stays as it was)
            return resolved
        return Resolved(resolved.model, resolved.base, resolved.patch, resolved.memory, kv)

    def _resolve(self, model: str, user: str | None) -> Resolved:
        if model in self.elsewhere:
            raise HostedElsewhere(model, self.elsewhere[model])
        if model in self.bases:
            base = self.bases[model]
            return Resolved(model=model, base=base, patch=None, memory=self.memory_of(base))
        if model in self.aliases:
            patch, version = self.aliases[model]
            pv = self.versions[patch][version]
            trial = self.rollouts.get(model)
            if (trial and trial.rollout.mode == "canary" and trial.candidate != pv
                    and _bucket(model, user) < trial.rollout.percent):
                pv = trial.candidate
            return Resolved(model=model, base=pv.base, patch=pv, memory=self.memory_of(pv.base, model))
        name, sep, number = model.partition("@")
        if sep and number.isdigit() and int(number) in self.versions.get(name, {}):
            pv = self.versions[name][int(number)]
            # the label stays bounded: no "@N"
            return Resolved(model=name, base=pv.base, patch=pv, memory=self.memory_of(pv.base))
        raise UnknownModel(model)

    def memory_of(self, base: str, alias: str | None = None) -> MemoryVersion | None:
        """The memory version serving `alias` (its own memory, else its base's) on `base`, or None."""
        name = self.memory_targets.get(alias) if alias else None
        name = name or self.memory_targets.get(base)
        version = self.memories.get(name) if name else None
        return version if version is not None and version.base == base else None

    def pointer(self, alias: str) -> PatchVersion | None:
        """The version `alias` serves now, or None."""
        if alias not in self.aliases:
            return None
        patch, version = self.aliases[alias]
        return self.versions[patch][version]

    def models(self) -> list[str]:
        """Names `GET /v1/models` lists: bases and aliases."""
        return sorted(self.bases) + sorted(self.aliases)
