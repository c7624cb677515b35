"""KV-cache policies in Redis: one per scope (a base: the deployment's default; an alias: its own), versioned.

A policy is stored as a plain dict (the service validates it: service/kv/policy.py); the store only keeps
records, history and audit, like an alias pointer. Every change is one Lua script (record, history entry,
audit entry and event together), acknowledged once replicated; a change decided on what was read (a gated
apply, a rollback) passes `if_current`, a compare-and-set on the scope's version inside the script.

Keys, under the prefix:
  kv                     hash  scope → KVPolicyRecord JSON
  kv:<scope>:history     list  KVPolicyChange JSON, oldest first
  audit, events          the registry's (action kv_policy_set / kv_policy_rollback; event kv_policy_changed)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis

from adapters_store.errors import NotFound
from adapters_store.registry import Registry

# KEYS: kv, history, audit, bases, aliases.  ARGV: scope, policy, actor, reason, action, now, if_current, channel.
_SET_POLICY = """
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 0 and redis.call('HEXISTS', KEYS[5], ARGV[1]) == 0 then
  return redis.error_reply('NOT_FOUND no base or alias ' .. ARGV[1] .. ' to set a KV policy on')
end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local before = raw and cjson.decode(raw) or nil
local from_version = before and before.version or 0
if ARGV[7] ~= '*' and ARGV[7] ~= tostring(from_version) then
  return redis.error_reply('CONFLICT the KV policy of ' .. ARGV[1] .. ' is at version ' .. from_version ..
                           ', not ' .. ARGV[7] .. ': it changed meanwhile')
end
local at = tonumber(ARGV[6])
local policy = cjson.decode(ARGV[2])
local record = cjson.encode({scope=ARGV[1], version=from_version + 1, policy=policy, updated_at=at,
                             updated_by=ARGV[3], action=ARGV[5], reason=ARGV[4]})
redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('RPUSH', KEYS[2], cjson.encode({at=at, action=ARGV[5], actor=ARGV[3], reason=ARGV[4],
  from_version=from_version, from_policy=before and before.policy or cjson.null,
  to_version=from_version + 1, to_policy=policy}))
redis.call('XADD', KEYS[3], '*', 'action', ARGV[5], 'actor', ARGV[3], 'target', 'kv:' .. ARGV[1],
           'from', before and ('kv@' .. from_version) or '', 'to', 'kv@' .. (from_version + 1),
           'reason', ARGV[4], 'at', ARGV[6])
redis.call('PUBLISH', ARGV[8], cjson.encode({type='kv_policy_changed', scope=ARGV[1], version=from_version + 1,
                                             at=at}))
return record
"""


@dataclass(frozen=True)
class KVPolicyRecord:
    scope: str  # a base (its deployments' default) or an alias (its own)
    version: int
    policy: dict = field(default_factory=dict)  # {} is the default: the cache as the model computes it
    updated_at: float = 0.0
    updated_by: str = ""
    action: str = ""
    reason: str = ""

    @property
    def ref(self) -> str:
        return f"{self.scope}@{self.version}"


@dataclass(frozen=True)
class KVPolicyChange:
    at: float
    action: str
    actor: str
    reason: str
    from_version: int
    from_policy: dict | None
    to_version: int
    to_policy: dict


class KVPolicies:
    """Every scope's KV policy on the registry's Redis, its history and audit."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.r: redis.Redis = registry.r
        self._set = self.r.register_script(_SET_POLICY)

    def _k(self, *parts: object) -> str:
        return self.registry.prefix + ":".join(str(x) for x in parts)

    def set(self, scope: str, policy: dict, actor: str = "system", reason: str = "", *,
            if_version: int | None = None, action: str = "kv_policy_set") -> KVPolicyRecord:
        """Put `policy` in force on `scope` (a registered base or alias) as its next version.

        `if_version` makes it a compare-and-set: only if the scope is at that version now (0: never set), else 409.
        """
        raw = self.registry.run_script(self._set, [self._k("kv"), self._k("kv", scope, "history"), self._k("audit"),
                                              self._k("bases"), self._k("aliases")],
                                       [scope, json.dumps(policy, sort_keys=True), actor, reason, action,
                                        repr(time.time()), "*" if if_version is None else str(int(if_version)),
                                        self.registry.channel])
        return _record(json.loads(raw))

    def rollback(self, scope: str, actor: str = "system", reason: str = "") -> KVPolicyRecord:
        """Restore the policy `scope` had before its last change (the default before the first; twice: back where
        it started). 409 if the scope changes meanwhile."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hget(self._k("kv"), scope)
            pipe.lindex(self._k("kv", scope, "history"), -1)
            raw, last = pipe.execute()
        if raw is None:
            raise NotFound(f"the KV policy of {scope!r} was never set: there is nothing to roll back")
        current = _record(json.loads(raw))
        change = KVPolicyChange(**json.loads(last))
        # Undoing the first change restores the default ({}: the cache as the model computes it).
        return self.set(scope, change.from_policy or {}, actor, reason, if_version=current.version,
                        action="kv_policy_rollback")

    def get(self, scope: str) -> KVPolicyRecord | None:
        """The policy record of `scope`, or None (never set: the default)."""
        raw = self.r.hget(self._k("kv"), scope)
        return _record(json.loads(raw)) if raw else None

    def all(self) -> dict[str, KVPolicyRecord]:
        """Every scope's record, read in one command."""
        return {(s.decode() if isinstance(s, bytes) else s): _record(json.loads(raw))
                for s, raw in self.r.hgetall(self._k("kv")).items()}

    def history(self, scope: str) -> list[KVPolicyChange]:
        """Every change of `scope`'s policy, oldest first."""
        return [KVPolicyChange(**json.loads(x)) for x in self.r.lrange(self._k("kv", scope, "history"), 0, -1)]


def _record(d: dict) -> KVPolicyRecord:
    # cjson encodes an empty table as {} or [] alike: an empty policy may come back as a list.
    return KVPolicyRecord(**{**d, "policy": d.get("policy") or {}})


def as_json(record: KVPolicyRecord) -> dict:
    return asdict(record)
