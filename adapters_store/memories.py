"""Side memories in the registry: knowledge edits, versioned like patches, with a pointer like an alias.

A memory belongs to one base and is attached to one target: a base (every alias on it) or an alias.
Its versions are immutable: each holds the whole set of edits it answers (with ids), its parent, the
edits it added or revoked, and its weights as a blob. The memory's pointer names the version served
(0: none, the state before the first edit); it moves like an alias's, with a history and an audit
entry, so rollback is a pointer move. Every change is one Lua script, sent with WAIT like the
registry's (adapters_store/replication.py), on the registry's prefix, audit stream and event channel.

Keys, under the prefix:
  memories                 hash  name → MemoryRecord JSON (base, target, layer)
  memory_targets           hash  target (base or alias) → memory name: one memory per target
  memory:<name>:next       int   last version number handed out
  memory:<name>:versions   hash  version → MemoryVersion JSON (written once)
  memory_pointers          hash  name → MemoryPointer JSON (one HGETALL is a consistent snapshot)
  memory:<name>:history    list  MemoryMove JSON, oldest first
  memory_gates             hash  name → gate thresholds (missing: the defaults)
  memory_irrelevant        hash  name → {digest, n}: texts the edit job keeps the memory quiet on
  memory:<name>:edit_next  int   last edit number handed out; memory:<name>:edit_jobs hash job → first number
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from adapters_store.errors import Conflict, Invalid, NotFound
from adapters_store.names import NAME_RULE, is_safe_name
from adapters_store.registry import Registry

# KEYS: memories, targets, pointers, bases, audit.  ARGV: name, record, pointer, target, actor, now, channel.
_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return redis.error_reply('CONFLICT a memory named ' .. ARGV[1] .. ' exists')
end
local record = cjson.decode(ARGV[2])
if redis.call('HEXISTS', KEYS[4], record.base) == 0 then
  return redis.error_reply('INCOMPATIBLE unknown base ' .. record.base)
end
local holder = redis.call('HGET', KEYS[2], ARGV[4])
if holder then
  return redis.error_reply('CONFLICT memory ' .. holder .. ' is attached to ' .. ARGV[4] .. ' already')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[5], '*', 'action', 'create_memory', 'actor', ARGV[5], 'target', ARGV[1],
           'from', '', 'to', ARGV[4], 'reason', '', 'at', ARGV[6])
redis.call('PUBLISH', ARGV[7], cjson.encode({type='memory_changed', memory=ARGV[1], at=tonumber(ARGV[6])}))
return 1
"""

# KEYS: memories, next, versions, audit.  ARGV: name, record JSON (no version), parent, actor, reason, now, channel.
_CREATE_VERSION = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return redis.error_reply('NOT_FOUND no memory ' .. ARGV[1])
end
if ARGV[3] ~= '0' and redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then
  return redis.error_reply('NOT_FOUND no version ' .. ARGV[1] .. '@' .. ARGV[3])
end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], v, ARGV[2])
local ref = ARGV[1] .. '@' .. v
redis.call('XADD', KEYS[4], '*', 'action', 'create_memory_version', 'actor', ARGV[4], 'target', ref,
           'from', ARGV[1] .. '@' .. ARGV[3], 'to', ref, 'reason', ARGV[5], 'at', ARGV[6])
redis.call('PUBLISH', ARGV[7], cjson.encode({type='memory_changed', memory=ARGV[1], at=tonumber(ARGV[6])}))
return v
"""

# KEYS: versions, pointers, history, audit.  ARGV: name, version, actor, reason, action, now, if_current, channel.
_MOVE = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then
  return redis.error_reply('NOT_FOUND no memory ' .. ARGV[1])
end
if ARGV[2] ~= '0' and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then
  return redis.error_reply('NOT_FOUND no version ' .. ARGV[1] .. '@' .. ARGV[2])
end
local before = cjson.decode(raw)
if ARGV[7] ~= '*' and tostring(before.version) ~= ARGV[7] then
  return redis.error_reply('CONFLICT memory ' .. ARGV[1] .. ' serves version ' .. before.version ..
                           ', not ' .. ARGV[7] .. ': it moved meanwhile')
end
if tostring(before.version) == ARGV[2] then
  return redis.error_reply('CONFLICT memory ' .. ARGV[1] .. ' already serves version ' .. ARGV[2])
end
local at = tonumber(ARGV[6])
local pointer = cjson.encode({name=ARGV[1], version=tonumber(ARGV[2]), updated_at=at, updated_by=ARGV[3],
                              action=ARGV[5]})
redis.call('HSET', KEYS[2], ARGV[1], pointer)
redis.call('RPUSH', KEYS[3], cjson.encode({at=at, action=ARGV[5], actor=ARGV[3], reason=ARGV[4],
                                            from_version=before.version, to_version=tonumber(ARGV[2])}))
redis.call('XADD', KEYS[4], '*', 'action', 'memory_' .. ARGV[5], 'actor', ARGV[3], 'target', ARGV[1],
           'from', ARGV[1] .. '@' .. before.version, 'to', ARGV[1] .. '@' .. ARGV[2], 'reason', ARGV[4], 'at', ARGV[6])
redis.call('PUBLISH', ARGV[8], cjson.encode({type='memory_changed', memory=ARGV[1], at=at}))
return pointer
"""

# KEYS: edit_next, edit_jobs.  ARGV: job id, count.
_RESERVE_EDITS = """
local first = redis.call('HGET', KEYS[2], ARGV[1])
if first then
  return tonumber(first)
end
local last = redis.call('INCRBY', KEYS[1], tonumber(ARGV[2]))
first = last - tonumber(ARGV[2]) + 1
redis.call('HSET', KEYS[2], ARGV[1], first)
return first
"""

# KEYS: memories, targets, bases, aliases, audit.  ARGV: name, target, actor, reason, now, channel.
_ATTACH = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return redis.error_reply('NOT_FOUND no memory ' .. ARGV[1])
end
local record = cjson.decode(raw)
if record.target == ARGV[2] then
  return raw
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 and redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 then
  return redis.error_reply('NOT_FOUND ' .. ARGV[2] .. ' is neither a base nor an alias')
end
local holder = redis.call('HGET', KEYS[2], ARGV[2])
if holder then
  return redis.error_reply('CONFLICT memory ' .. holder .. ' is attached to ' .. ARGV[2] .. ' already')
end
redis.call('HDEL', KEYS[2], record.target)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
local before = record.target
record.target = ARGV[2]
local encoded = cjson.encode(record)
redis.call('HSET', KEYS[1], ARGV[1], encoded)
redis.call('XADD', KEYS[5], '*', 'action', 'attach_memory', 'actor', ARGV[3], 'target', ARGV[1],
           'from', before, 'to', ARGV[2], 'reason', ARGV[4], 'at', ARGV[5])
redis.call('PUBLISH', ARGV[6], cjson.encode({type='memory_changed', memory=ARGV[1], at=tonumber(ARGV[5])}))
return encoded
"""


@dataclass(frozen=True)
class MemoryRecord:
    name: str
    base: str  # the base its versions are trained on (and only served with)
    target: str  # what it is attached to: the base (every alias on it) or one alias
    created_at: float = 0.0
    created_by: str = ""


@dataclass(frozen=True)
class EditRecord:
    """One knowledge edit of a memory; `id` is `<version that added it>.<index in its batch>`."""

    id: str
    prompt: str
    target: str
    paraphrases: tuple[str, ...] = ()
    locality: tuple[dict, ...] = ()  # {"prompt", "reference"?}: answers that must not change


@dataclass(frozen=True)
class MemoryVersion:
    name: str
    version: int
    base: str
    files: dict[str, str]  # file name → blob digest
    parent: int  # 0: trained from nothing
    edits: tuple[EditRecord, ...]  # every edit this version answers
    added: tuple[str, ...] = ()  # edit ids new in this version
    revoked: tuple[str, ...] = ()  # edit ids its parent had and this version drops
    meta: dict = field(default_factory=dict)  # layer, threshold, training figures, the report's summary
    created_at: float = 0.0
    created_by: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class MemoryPointer:
    name: str
    version: int  # 0: no version served (before the first edit, or rolled back to it)
    updated_at: float
    updated_by: str
    action: str = "create"  # create, activate, rollback, auto_rollback


@dataclass(frozen=True)
class MemoryMove:
    at: float
    action: str
    actor: str
    reason: str
    from_version: int
    to_version: int


class Memories:
    """Memories, their versions and pointers, on the registry's Redis, prefix, audit log and events."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.r = registry.r
        self._create = self.r.register_script(_CREATE)
        self._create_version = self.r.register_script(_CREATE_VERSION)
        self._move = self.r.register_script(_MOVE)
        self._attach = self.r.register_script(_ATTACH)
        self._reserve = self.r.register_script(_RESERVE_EDITS)

    def _k(self, *parts: object) -> str:
        return self.registry.prefix + ":".join(str(x) for x in parts)

    def create(self, name: str, base: str, target: str | None = None, actor: str = "system") -> MemoryRecord:
        """A new memory of `base`, attached to `target` (default: the base itself), serving no version yet."""
        _check_name(name, "memory")
        target = target or base
        _check_name(target, "target")
        now = time.time()
        record = MemoryRecord(name, base, target, now, actor)
        pointer = MemoryPointer(name, 0, now, actor)
        if target != base and self.registry.get_alias(target) is None:
            raise NotFound(f"{target!r} is neither the memory's base nor an alias")
        self.registry.run_script(self._create, [self._k("memories"), self._k("memory_targets"),
                                                self._k("memory_pointers"), self._k("bases"), self._k("audit")],
                                 [name, json.dumps(asdict(record)), json.dumps(asdict(pointer)), target, actor,
                                  repr(now), self.registry.channel])
        return record

    def get(self, name: str) -> MemoryRecord | None:
        raw = self.r.hget(self._k("memories"), name)
        return MemoryRecord(**json.loads(raw)) if raw else None

    def list(self) -> list[MemoryRecord]:
        return sorted((MemoryRecord(**json.loads(v)) for v in self.r.hvals(self._k("memories"))), key=lambda m: m.name)

    def attach(self, name: str, target: str, actor: str = "system", reason: str = "") -> MemoryRecord:
        """Attach the memory to another target (a base or an alias); 409 if another memory holds it."""
        _check_name(target, "target")
        raw = self.registry.run_script(self._attach, [self._k("memories"), self._k("memory_targets"),
                                                      self._k("bases"), self._k("aliases"), self._k("audit")],
                                       [name, target, actor, reason, repr(time.time()), self.registry.channel])
        return MemoryRecord(**json.loads(raw))

    def targets(self) -> dict[str, str]:
        """Target (base or alias) → the memory attached to it."""
        return {_s(k): _s(v) for k, v in self.r.hgetall(self._k("memory_targets")).items()}

    # -- versions ------------------------------------------------------------------------------------
    def create_version(self, name: str, files: dict[str, str], parent: int, edits: list[EditRecord],
                       added: list[str], revoked: list[str], meta: dict, actor: str = "system",
                       reason: str = "") -> MemoryVersion:
        """Register the next version of memory `name` (its number allocated in the same atomic step)."""
        record = self.get(name)
        if record is None:
            raise NotFound(f"no memory {name!r}")
        now = time.time()
        body = {"name": name, "base": record.base, "files": dict(files), "parent": int(parent),
                "edits": [asdict(e) for e in edits], "added": list(added), "revoked": list(revoked),
                "meta": dict(meta), "created_at": now, "created_by": actor}
        version = self.registry.run_script(
            self._create_version,
            [self._k("memories"), self._k("memory", name, "next"), self._k("memory", name, "versions"),
             self._k("audit")],
            [name, json.dumps(body), str(int(parent)), actor, reason, repr(now), self.registry.channel])
        return _version_from(int(version), body)

    def get_version(self, name: str, version: int) -> MemoryVersion | None:
        raw = self.r.hget(self._k("memory", name, "versions"), version)
        return _version_from(int(version), json.loads(raw)) if raw else None

    def list_versions(self, name: str) -> list[MemoryVersion]:
        raw = self.r.hgetall(self._k("memory", name, "versions"))
        return sorted((_version_from(int(v), json.loads(b)) for v, b in raw.items()), key=lambda m: m.version)

    def reserve_edit_ids(self, name: str, count: int, job_id: str) -> int:
        """The first of `count` edit numbers reserved for `job_id` (the same numbers when the job asks again)."""
        return int(self.registry.run_script(self._reserve, [self._k("memory", name, "edit_next"),
                                                            self._k("memory", name, "edit_jobs")], [job_id, count]))

    def find_by_job(self, name: str, job_id: str) -> MemoryVersion | None:
        """The version a job registered already (a retried job reuses it instead of training again)."""
        return next((v for v in self.list_versions(name) if v.meta.get("job") == job_id), None)

    # -- the pointer ---------------------------------------------------------------------------------
    def pointer(self, name: str) -> MemoryPointer | None:
        raw = self.r.hget(self._k("memory_pointers"), name)
        return MemoryPointer(**json.loads(raw)) if raw else None

    def pointers(self) -> dict[str, MemoryPointer]:
        """Every memory's pointer, read in one command."""
        return {_s(n): MemoryPointer(**json.loads(p)) for n, p in self.r.hgetall(self._k("memory_pointers")).items()}

    def activate(self, name: str, version: int, actor: str = "system", reason: str = "", *,
                 if_current: int | None = None) -> MemoryPointer:
        """Serve `version` of memory `name` (0: none); `if_current` makes it a compare-and-set."""
        return self._move_to(name, version, actor, reason, "activate", if_current)

    def rollback(self, name: str, to_version: int | None = None, actor: str = "system", reason: str = "",
                 automatic: bool = False) -> MemoryPointer:
        """Back to the version served before the last move (or `to_version`); 409 if it moved meanwhile."""
        current = self.pointer(name)
        if current is None:
            raise NotFound(f"no memory {name!r}")
        if to_version is None:
            last = self.r.lindex(self._k("memory", name, "history"), -1)
            if last is None:
                raise Conflict(f"memory {name!r} has no previous version to roll back to")
            to_version = MemoryMove(**json.loads(last)).from_version
        return self._move_to(name, int(to_version), actor, reason, "auto_rollback" if automatic else "rollback",
                             current.version)

    def _move_to(self, name: str, version: int, actor: str, reason: str, action: str,
                 if_current: int | None) -> MemoryPointer:
        raw = self.registry.run_script(
            self._move, [self._k("memory", name, "versions"), self._k("memory_pointers"),
                         self._k("memory", name, "history"), self._k("audit")],
            [name, str(int(version)), actor, reason, action, repr(time.time()),
             "*" if if_current is None else str(int(if_current)), self.registry.channel])
        return MemoryPointer(**json.loads(raw))

    def history(self, name: str) -> list[MemoryMove]:
        return [MemoryMove(**json.loads(x)) for x in self.r.lrange(self._k("memory", name, "history"), 0, -1)]

    # -- what the edit job works with ----------------------------------------------------------------
    def set_gate(self, name: str, thresholds: dict) -> None:
        self.r.hset(self._k("memory_gates"), name, json.dumps(thresholds))

    def gate(self, name: str) -> dict:
        raw = self.r.hget(self._k("memory_gates"), name)
        return json.loads(raw) if raw else {}

    def set_irrelevant(self, name: str, digest: str, n: int, actor: str = "system") -> dict:
        record = {"digest": digest, "n": n, "updated_at": time.time(), "updated_by": actor}
        self.r.hset(self._k("memory_irrelevant"), name, json.dumps(record))
        return record

    def irrelevant(self, name: str) -> dict | None:
        raw = self.r.hget(self._k("memory_irrelevant"), name)
        return json.loads(raw) if raw else None


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _check_name(name: str, what: str) -> None:
    if not is_safe_name(name):
        raise Invalid(f"{what} name {name!r} must be {NAME_RULE}")


def _version_from(version: int, d: dict) -> MemoryVersion:
    edits = tuple(EditRecord(**{**e, "paraphrases": tuple(e.get("paraphrases", ())),
                                "locality": tuple(e.get("locality", ()))}) for e in d["edits"])
    return MemoryVersion(version=version, **{**d, "edits": edits, "added": tuple(d.get("added", ())),
                                             "revoked": tuple(d.get("revoked", ()))})
