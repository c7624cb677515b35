"""The registry in Redis: bases, patch versions with lineage, aliases with their history, an audit log.

A patch version is written in one Lua script (number allocated, record stored, audit appended), so
a crash never leaves half a version; versions are immutable once written. An alias pointer moves
in one MULTI/EXEC under WATCH (pointer, history entry, audit entry, pub/sub event together), so
two concurrent moves never interleave and none is lost.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis

EVENTS_CHANNEL = "events"

_CREATE_VERSION = """
local v = redis.call('INCR', KEYS[1])
redis.call('SET', ARGV[1] .. v, ARGV[2])
redis.call('ZADD', KEYS[2], v, v)
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], '*', 'action', 'create_version', 'actor', ARGV[4], 'target', ARGV[3] .. '@' .. v,
           'from', '', 'to', tostring(v), 'reason', ARGV[5], 'at', ARGV[6])
return v
"""


class RegistryError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PatchVersionRecord:
    name: str
    version: int
    base: str
    files: dict[str, str]  # file name → blob digest
    origin: str = "upload"  # upload, port, merge, extract
    parent: int | None = None
    meta: dict = field(default_factory=dict)
    created_at: float = 0.0
    created_by: str = ""


@dataclass(frozen=True)
class AliasState:
    alias: str
    patch: str
    version: int
    base: str
    updated_at: float
    updated_by: str


class Registry:
    def __init__(self, client: redis.Redis, prefix: str = "ps:"):
        self.r = client
        self.p = prefix
        self._create_version = client.register_script(_CREATE_VERSION)

    # -- keys ----------------------------------------------------------------------------------------
    def _k(self, *parts: object) -> str:
        return self.p + ":".join(str(x) for x in parts)

    @property
    def channel(self) -> str:
        return self.p + EVENTS_CHANNEL

    # -- bases ---------------------------------------------------------------------------------------
    def register_base(self, name: str, path: str, meta: dict | None = None, actor: str = "system") -> None:
        """Record a base model (idempotent for the same name and path)."""
        record = {"name": name, "path": path, "meta": meta or {}, "created_at": time.time()}
        if not self.r.hsetnx(self._k("bases"), name, json.dumps(record)):
            existing = json.loads(self.r.hget(self._k("bases"), name))
            if existing["path"] != path:
                raise RegistryError(409, f"base {name!r} is already registered with another path")
            return
        self._audit("register_base", actor, name, "", name, "")

    def bases(self) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k("bases")).items()}

    # -- patch versions ------------------------------------------------------------------------------
    def create_version(self, name: str, base: str, files: dict[str, str], *, origin: str = "upload",
                       parent: int | None = None, meta: dict | None = None, actor: str = "system",
                       reason: str = "") -> PatchVersionRecord:
        """Register the next version of patch `name`; its number is allocated in the same atomic step."""
        if not self.r.hexists(self._k("bases"), base):
            raise RegistryError(422, f"unknown base {base!r}")
        body = {"name": name, "base": base, "files": files, "origin": origin, "parent": parent,
                "meta": meta or {}, "created_at": time.time(), "created_by": actor}
        version = int(self._create_version(
            keys=[self._k("patch", name, "next"), self._k("patch", name, "versions"), self._k("patches"),
                  self._k("audit")],
            args=[self._k("patch", name, "v", ""), json.dumps(body), name, actor, reason, str(time.time())]))
        return PatchVersionRecord(version=version, **body)

    def get_version(self, name: str, version: int) -> PatchVersionRecord | None:
        raw = self.r.get(self._k("patch", name, "v", version))
        return PatchVersionRecord(version=version, **json.loads(raw)) if raw else None

    def versions(self, name: str) -> list[int]:
        return [int(v) for v in self.r.zrange(self._k("patch", name, "versions"), 0, -1)]

    def patches(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self._k("patches")))

    def delete_version(self, name: str, version: int, actor: str, reason: str = "") -> None:
        """Delete a version no alias points to; the number is never reused."""
        for state in self.aliases().values():
            if state.patch == name and state.version == version:
                raise RegistryError(409, f"{name}@{version} is active on alias {state.alias!r}; move the alias first")
        if not self.r.delete(self._k("patch", name, "v", version)):
            raise RegistryError(404, f"no version {name}@{version}")
        self.r.zrem(self._k("patch", name, "versions"), version)
        self._audit("delete_version", actor, f"{name}@{version}", str(version), "", reason)

    # -- aliases -------------------------------------------------------------------------------------
    def activate(self, alias: str, patch: str, version: int, actor: str, reason: str = "",
                 action: str = "activate") -> AliasState:
        """Point `alias` at `patch@version` atomically, with history, audit entry and event."""
        record = self.get_version(patch, version)
        if record is None:
            raise RegistryError(404, f"no version {patch}@{version}")
        key = self._k("alias", alias)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    before = AliasState(**json.loads(raw)) if raw else None
                    state = AliasState(alias, patch, version, record.base, time.time(), actor)
                    entry = {"action": action, "actor": actor, "reason": reason, "at": state.updated_at,
                             "from": _label(before), "to": _label(state), "from_version": before and before.version,
                             "to_version": version}
                    pipe.multi()
                    pipe.set(key, json.dumps(asdict(state)))
                    pipe.sadd(self._k("aliases"), alias)
                    pipe.rpush(self._k("alias", alias, "history"), json.dumps(entry))
                    pipe.xadd(self._k("audit"), {"action": action, "actor": actor, "target": alias,
                                                 "from": entry["from"], "to": entry["to"], "reason": reason,
                                                 "at": str(state.updated_at)})
                    pipe.publish(self.channel, json.dumps({"type": "alias_moved", **asdict(state)}))
                    pipe.execute()
                    return state
                except redis.WatchError:
                    continue  # another move won the race; read again and go on top of it

    def rollback(self, alias: str, actor: str, reason: str = "", to_version: int | None = None,
                 action: str = "rollback") -> AliasState:
        """Move `alias` back to the version before the current one, or to `to_version`."""
        current = self.get_alias(alias)
        if current is None:
            raise RegistryError(404, f"no alias {alias!r}")
        if to_version is None:
            history = self.history(alias)
            to_version = history[-1]["from_version"] if history else None
            if to_version is None:
                raise RegistryError(409, f"alias {alias!r} has no previous version")
        return self.activate(alias, current.patch, to_version, actor, reason, action=action)

    def get_alias(self, alias: str) -> AliasState | None:
        raw = self.r.get(self._k("alias", alias))
        return AliasState(**json.loads(raw)) if raw else None

    def aliases(self) -> dict[str, AliasState]:
        """Every alias's pointer now: what a periodic reconcile compares with what it serves."""
        names = sorted(m.decode() for m in self.r.smembers(self._k("aliases")))
        states = self.r.mget([self._k("alias", n) for n in names]) if names else []
        return {n: AliasState(**json.loads(s)) for n, s in zip(names, states) if s}

    def history(self, alias: str) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self._k("alias", alias, "history"), 0, -1)]

    # -- audit ---------------------------------------------------------------------------------------
    def audit(self, count: int = 100) -> list[dict]:
        """The newest `count` audit entries, oldest first."""
        entries = self.r.xrevrange(self._k("audit"), count=count)
        return [{"id": i.decode(), **{k.decode(): v.decode() for k, v in f.items()}} for i, f in reversed(entries)]

    def _audit(self, action: str, actor: str, target: str, frm: str, to: str, reason: str) -> None:
        self.r.xadd(self._k("audit"), {"action": action, "actor": actor, "target": target, "from": frm, "to": to,
                                       "reason": reason, "at": str(time.time())})


def _label(state: AliasState | None) -> str:
    return f"{state.patch}@{state.version}" if state else ""
