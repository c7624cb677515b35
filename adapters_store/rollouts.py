"""Rollouts: an alias trying a candidate version on part of its traffic (canary) or on a copy of it (shadow).

One rollout per alias, in the `rollouts` hash. Starting or stopping one writes the record, an audit
entry and the `rollout_changed` event in one MULTI/EXEC transaction, on the registry's prefix and
channel, so replicas follow it as they follow alias moves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from adapters_store.errors import Conflict, Incompatible, Invalid, NotFound
from adapters_store.registry import Registry

MODES = ("canary", "shadow")


@dataclass(frozen=True)
class Rollout:
    alias: str
    patch: str
    version: int
    mode: str  # canary: `percent` of users get the candidate; shadow: every request is mirrored to it
    percent: float
    min_agreement: float | None  # below it, over `min_requests` compared answers, the rollout stops itself
    min_requests: int
    started_at: float
    started_by: str

    @property
    def ref(self) -> str:
        return f"{self.patch}@{self.version}"


class Rollouts:
    """Start, read and stop the rollouts of a registry's aliases."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.r = registry.r
        self._key = registry.prefix + "rollouts"

    def start(self, alias: str, patch: str, version: int, mode: str, percent: float = 0.0,
              min_agreement: float | None = None, min_requests: int = 20, actor: str = "system",
              reason: str = "") -> Rollout:
        """Begin (or replace) `alias`'s rollout of `patch@version`; the candidate must be on the alias's base."""
        if mode not in MODES:
            raise Invalid(f"mode must be one of {', '.join(MODES)}")
        pointer = self.registry.get_alias(alias)
        if pointer is None:
            raise NotFound(f"no alias {alias!r}")
        record = self.registry.get_version(patch, version)
        if record is None:
            raise NotFound(f"no version {patch}@{version}")
        if record.base != pointer.base:
            raise Incompatible(f"{record.ref} is built on {record.base}; {alias} is served on {pointer.base}")
        if record.ref == pointer.ref:
            raise Conflict(f"{alias} already serves {record.ref}")
        rollout = Rollout(alias, patch, version, mode, float(percent), min_agreement, int(min_requests),
                          time.time(), actor)
        self._write(alias, rollout, f"rollout_{mode}", actor, reason, pointer.ref, rollout.ref)
        return rollout

    def stop(self, alias: str, actor: str = "system", reason: str = "", automatic: bool = False,
             expected: str | None = None) -> Rollout:
        """End `alias`'s rollout (404 if none; 409 if `expected` names another candidate)."""
        current = self.get(alias)
        if current is None:
            raise NotFound(f"alias {alias!r} has no rollout")
        if expected is not None and current.ref != expected:
            raise Conflict(f"{alias}'s rollout is of {current.ref} now, not {expected}")
        self._write(alias, None, "rollout_stopped_automatically" if automatic else "rollout_stopped", actor, reason,
                    current.ref, "")
        return current

    def get(self, alias: str) -> Rollout | None:
        raw = self.r.hget(self._key, alias)
        return Rollout(**json.loads(raw)) if raw else None

    def all(self) -> dict[str, Rollout]:
        """Every alias's rollout, read in one command."""
        return {(a.decode() if isinstance(a, bytes) else a): Rollout(**json.loads(v))
                for a, v in self.r.hgetall(self._key).items()}

    def _write(self, alias: str, rollout: Rollout | None, action: str, actor: str, reason: str, from_ref: str,
               to_ref: str) -> None:
        now = time.time()
        with self.r.pipeline(transaction=True) as pipe:
            if rollout is None:
                pipe.hdel(self._key, alias)
            else:
                pipe.hset(self._key, alias, json.dumps(asdict(rollout)))
            pipe.xadd(self.registry.prefix + "audit", {"action": action, "actor": actor, "target": alias,
                                                       "from": from_ref, "to": to_ref, "reason": reason,
                                                       "at": repr(now)})
            pipe.publish(self.registry.channel, json.dumps({"type": "rollout_changed", "alias": alias, "at": now}))
            pipe.execute()
