"""The registry in Redis: bases, patch versions with lineage, aliases with their history, an audit log.

Every change is one Lua script, so Redis runs it atomically and writes it to the AOF as one
MULTI/EXEC block: a crash never leaves half of it. Creating a version allocates its number, stores
the (immutable) record and appends the audit entry in one step. Moving an alias sets the pointer,
appends to the alias's history and to the audit stream, and publishes an event in one step; two
concurrent moves are serialised by Redis and never interleave. Callers that decided a move on what
they read (rollback) pass `if_current`, a compare-and-set checked inside the same script.

Keys, under the prefix (default `ps:`):
  bases                  hash  base name → BaseRecord JSON
  patches                set   patch names
  patch:<name>:next      int   last version number handed out (never reused)
  patch:<name>:versions  hash  version → PatchVersion JSON (written once, never changed)
  aliases                hash  alias → AliasPointer JSON (one HGETALL is a consistent snapshot)
  alias:<alias>:history  list  HistoryEntry JSON, oldest first
  audit                  stream  who, when, action, target, from, to, why
  events                 pub/sub channel: version_created, version_deleted, alias_moved, base_registered
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import redis

from adapters_store.blobs import check_digest
from adapters_store.errors import BY_KIND, Conflict, Invalid, NotFound
from adapters_store.names import NAME_RULE, is_safe_name
from adapters_store.replication import Acks

ORIGINS = ("upload", "port", "merge", "extract", "repair")
_ANY = "*"  # if_current sentinel inside the scripts: no compare-and-set
# A script's refusal: '<KIND> <message>', which redis-py prefixes with the command's place when it ran in a
# pipeline (every change does: replication.py sends it with WAIT).
_ERROR = re.compile(r"(?:^|caused error: )([A-Z_]+) (.*)$", re.S)

# KEYS: bases, audit, aliases.  ARGV: name, record, actor, now, channel.
_REGISTER_BASE = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  return existing
end
-- One name, one meaning: `model: "<name>"` must not mean an alias on one gateway and a base on another.
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return redis.error_reply('CONFLICT ' .. ARGV[1] .. ' is the name of an alias; choose another name for the base')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'action', 'register_base', 'actor', ARGV[3], 'target', ARGV[1],
           'from', '', 'to', ARGV[1], 'reason', '', 'at', ARGV[4])
redis.call('PUBLISH', ARGV[5], cjson.encode({type='base_registered', base=ARGV[1], at=tonumber(ARGV[4])}))
return false
"""

# KEYS: bases, next, versions, patches, audit, then one versions hash per parent.
# ARGV: name, base, record, actor, reason, now, channel, then one 'name@version' per parent.
_CREATE_VERSION = """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then
  return redis.error_reply('INCOMPATIBLE unknown base ' .. ARGV[2])
end
for i = 6, #KEYS do
  local ref = ARGV[i + 2]
  if redis.call('HEXISTS', KEYS[i], string.match(ref, '@(%d+)$')) == 0 then
    return redis.error_reply('NOT_FOUND no parent version ' .. ref)
  end
end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], v, ARGV[3])
redis.call('SADD', KEYS[4], ARGV[1])
local ref = ARGV[1] .. '@' .. v
redis.call('XADD', KEYS[5], '*', 'action', 'create_version', 'actor', ARGV[4], 'target', ref,
           'from', '', 'to', ref, 'reason', ARGV[5], 'at', ARGV[6])
redis.call('PUBLISH', ARGV[7], cjson.encode({type='version_created', patch=ARGV[1], version=v,
                                              at=tonumber(ARGV[6])}))
return v
"""

# KEYS: versions, aliases, audit.  ARGV: name, version, actor, reason, now, channel.
_DELETE_VERSION = """
local ref = ARGV[1] .. '@' .. ARGV[2]
local record = redis.call('HGET', KEYS[1], ARGV[2])
if not record then
  return redis.error_reply('NOT_FOUND no version ' .. ref)
end
local aliases = redis.call('HGETALL', KEYS[2])
for i = 1, #aliases, 2 do
  local p = cjson.decode(aliases[i + 1])
  if p.patch == ARGV[1] and tostring(p.version) == ARGV[2] then
    return redis.error_reply('CONFLICT alias ' .. aliases[i] .. ' points to ' .. ref .. '; move the alias first')
  end
end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'action', 'delete_version', 'actor', ARGV[3], 'target', ref,
           'from', ref, 'to', '', 'reason', ARGV[4], 'at', ARGV[5])
redis.call('PUBLISH', ARGV[6], cjson.encode({type='version_deleted', patch=ARGV[1], version=tonumber(ARGV[2]),
                                              at=tonumber(ARGV[5])}))
return record
"""

# KEYS: versions (of the target patch), aliases, history, audit, bases.
# ARGV: alias, patch, version, base ('' = the version's own), actor, reason, action, now, if_current, channel.
_MOVE_ALIAS = """
local to_ref = ARGV[2] .. '@' .. ARGV[3]
local record = redis.call('HGET', KEYS[1], ARGV[3])
if not record then
  return redis.error_reply('NOT_FOUND no version ' .. to_ref)
end
local base = cjson.decode(record).base
if ARGV[4] ~= '' and ARGV[4] ~= base then
  return redis.error_reply('INCOMPATIBLE ' .. to_ref .. ' is built on base ' .. base .. ', not ' .. ARGV[4])
end
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw and redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then
  return redis.error_reply('CONFLICT ' .. ARGV[1] .. ' is the name of a base; choose another name for the alias')
end
local before = raw and cjson.decode(raw) or nil
local from_ref = before and (before.patch .. '@' .. before.version) or ''
if ARGV[9] ~= '*' and ARGV[9] ~= from_ref then
  return redis.error_reply('CONFLICT alias ' .. ARGV[1] .. ' points to ' ..
    (from_ref == '' and 'nothing' or from_ref) ..
                           ', not ' .. (ARGV[9] == '' and 'nothing' or ARGV[9]) .. ': it moved meanwhile')
end
local at = tonumber(ARGV[8])
local pointer = cjson.encode({alias=ARGV[1], patch=ARGV[2], version=tonumber(ARGV[3]), base=base,
                              updated_at=at, updated_by=ARGV[5], action=ARGV[7]})
redis.call('HSET', KEYS[2], ARGV[1], pointer)
redis.call('RPUSH', KEYS[3], cjson.encode({
  at=at, action=ARGV[7], actor=ARGV[5], reason=ARGV[6],
  from_patch=before and before.patch or cjson.null, from_version=before and before.version or cjson.null,
  from_base=before and before.base or cjson.null,
  to_patch=ARGV[2], to_version=tonumber(ARGV[3]), to_base=base}))
redis.call('XADD', KEYS[4], '*', 'action', ARGV[7], 'actor', ARGV[5], 'target', ARGV[1],
           'from', from_ref, 'to', to_ref, 'reason', ARGV[6], 'at', ARGV[8])
redis.call('PUBLISH', ARGV[10], cjson.encode({type='alias_moved', action=ARGV[7], alias=ARGV[1], patch=ARGV[2],
                                               version=tonumber(ARGV[3]), base=base, from=from_ref, at=at}))
return pointer
"""


@dataclass(frozen=True)
class BaseRecord:
    name: str
    version: str  # the base's own version string, e.g. a checkpoint revision
    path: str | None = None  # a directory the engines load from …
    files: dict[str, str] = field(default_factory=dict)  # … or file name → blob digest
    module_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module → (in, out)
    meta: dict = field(default_factory=dict)
    created_at: float = 0.0
    created_by: str = ""


@dataclass(frozen=True)
class PatchVersion:
    name: str
    version: int
    base: str
    files: dict[str, str]  # file name → blob digest
    origin: str = "upload"  # how it was made: upload, port, merge, extract, repair
    parents: tuple[str, ...] = ()  # 'name@version' it was made from (a port has one, a merge several)
    meta: dict = field(default_factory=dict)
    created_at: float = 0.0
    created_by: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AliasPointer:
    alias: str
    patch: str
    version: int
    base: str
    updated_at: float
    updated_by: str
    action: str = "activate"  # the move that set it: activate, rollback, auto_rollback

    @property
    def ref(self) -> str:
        return f"{self.patch}@{self.version}"


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    action: str  # activate, rollback
    actor: str
    reason: str
    from_patch: str | None
    from_version: int | None
    from_base: str | None
    to_patch: str
    to_version: int
    to_base: str

    @property
    def from_ref(self) -> str:
        return f"{self.from_patch}@{self.from_version}" if self.from_patch else ""

    @property
    def to_ref(self) -> str:
        return f"{self.to_patch}@{self.to_version}"


@dataclass(frozen=True)
class AuditEntry:
    id: str  # the stream entry id (milliseconds-sequence), usable as `since`
    at: float
    action: str
    actor: str
    target: str
    from_ref: str
    to_ref: str
    reason: str


class Subscription:
    """The registry's events, in publication order. Subscribed once constructed, so act after creating it."""

    def __init__(self, client: redis.Redis, channel: str):
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(channel)
        # Wait for the server's confirmation: only then is every later PUBLISH guaranteed to reach us.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self._pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "subscribe":
                break

    def get(self, timeout: float = 1.0) -> dict | None:
        """The next event, or None if none arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._pubsub.get_message(timeout=left)
            if msg and msg["type"] == "message":
                return json.loads(msg["data"])
        return None

    def __iter__(self) -> Iterator[dict]:
        while True:
            event = self.get(timeout=1.0)
            if event is not None:
                yield event

    def close(self) -> None:
        self._pubsub.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _check_name(name: str, what: str) -> None:
    if not is_safe_name(name):
        raise Invalid(f"{what} name {name!r} must be {NAME_RULE}")


def _is_digest(digest: object) -> bool:
    try:
        check_digest(digest)
        return True
    except ValueError:
        return False


def _parse_ref(ref: str) -> tuple[str, int]:
    name, _, version = ref.rpartition("@")
    if not is_safe_name(name) or not version.isdigit():
        raise Invalid(f"{ref!r} is not a version reference like 'name@3'")
    return name, int(version)


class Registry:
    """Bases, patch versions, aliases and the audit log under one key prefix of one Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "ps:", acks: Acks = Acks()):
        self.r = client
        self.prefix = prefix
        self.acks = acks  # every change goes through a script, acknowledged once replicated
        self._register_base = client.register_script(_REGISTER_BASE)
        self._create_version = client.register_script(_CREATE_VERSION)
        self._delete_version = client.register_script(_DELETE_VERSION)
        self._move_alias = client.register_script(_MOVE_ALIAS)

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(x) for x in parts)

    @property
    def channel(self) -> str:
        """The pub/sub channel every change is announced on."""
        return self._k("events")

    def run_script(self, script, keys: list[str], args: list[object]):
        """Run one of this registry's Lua scripts (or a sibling store's, on the same Redis), acknowledged once
        replicated; a refusal it signals is raised as the store's own error."""
        # The scripts signal refusals as '<KIND> <message>' errors (errors.BY_KIND); anything else is a real failure.
        try:
            return self.acks.write(self.r, lambda pipe: script(keys=keys, args=args, client=pipe))[0]
        except redis.ResponseError as exc:
            m = _ERROR.search(str(exc))
            if m and m[1] in BY_KIND:
                raise BY_KIND[m[1]](m[2]) from None
            raise

    # -- bases ---------------------------------------------------------------------------------------
    def register_base(self, name: str, version: str, *, path: str | None = None, files: dict[str, str] | None = None,
                      module_shapes: dict[str, tuple[int, int]] | None = None, meta: dict | None = None,
                      actor: str = "system") -> BaseRecord:
        """Record a base model; idempotent for identical details, 409 if the name is taken by different ones."""
        _check_name(name, "base")
        record = BaseRecord(name=name, version=version, path=path, files=dict(files or {}),
                            module_shapes={m: tuple(s) for m, s in (module_shapes or {}).items()},
                            meta=dict(meta or {}), created_at=time.time(), created_by=actor)
        body = asdict(record)
        existing = self.run_script(self._register_base, [self._k("bases"), self._k("audit"), self._k("aliases")],
                             [name, json.dumps(body), actor, repr(record.created_at), self.channel])
        if existing is None:
            return record
        old = _base_from(json.loads(existing))
        if (old.version, old.path, old.files, old.module_shapes) != (version, path, record.files, record.module_shapes):
            raise Conflict(f"base {name!r} is already registered with other details")
        return old

    def get_base(self, name: str) -> BaseRecord | None:
        """The base called `name`, or None."""
        raw = self.r.hget(self._k("bases"), name)
        return _base_from(json.loads(raw)) if raw else None

    def list_bases(self) -> list[BaseRecord]:
        """Every registered base, by name."""
        return sorted((_base_from(json.loads(v)) for v in self.r.hvals(self._k("bases"))), key=lambda b: b.name)

    # -- patch versions ------------------------------------------------------------------------------
    def create_version(self, name: str, base: str, files: dict[str, str], meta: dict | None = None, *,
                       origin: str = "upload", parents: list[str] | tuple[str, ...] = (), actor: str = "system",
                       reason: str = "") -> PatchVersion:
        """Register the next version (1, 2, 3 …) of patch `name`, numbered inside the same atomic step.

        `files` maps file names to blob digests (the blobs are stored first); `origin` and `parents`
        ('name@version' refs, which must exist) record the lineage.
        """
        _check_name(name, "patch")
        if origin not in ORIGINS:
            raise Invalid(f"origin {origin!r} must be one of {', '.join(ORIGINS)}")
        if not files or not all(isinstance(f, str) and "/" not in f and _is_digest(d) for f, d in files.items()):
            raise Invalid("files must map plain file names to sha256 blob digests")
        refs = [_parse_ref(p) for p in parents]
        created_at = time.time()
        body = {"name": name, "base": base, "files": dict(files), "origin": origin, "parents": list(parents),
                "meta": dict(meta or {}), "created_at": created_at, "created_by": actor}
        version = self.run_script(
            self._create_version,
            [self._k("bases"), self._k("patch", name, "next"), self._k("patch", name, "versions"),
             self._k("patches"), self._k("audit")] + [self._k("patch", n, "versions") for n, _ in refs],
            [name, base, json.dumps(body), actor, reason, repr(created_at), self.channel] + list(parents))
        return _version_from(int(version), body)

    def get_version(self, name: str, version: int) -> PatchVersion | None:
        """Version `version` of patch `name`, or None."""
        raw = self.r.hget(self._k("patch", name, "versions"), version)
        return _version_from(int(version), json.loads(raw)) if raw else None

    def list_versions(self, name: str) -> list[PatchVersion]:
        """Every version of patch `name` still registered, oldest first."""
        raw = self.r.hgetall(self._k("patch", name, "versions"))
        return sorted((_version_from(int(v), json.loads(body)) for v, body in raw.items()), key=lambda p: p.version)

    def list_patches(self) -> list[str]:
        """The name of every patch that was ever given a version."""
        return sorted(_s(m) for m in self.r.smembers(self._k("patches")))

    def delete_version(self, name: str, version: int, actor: str = "system", reason: str = "") -> PatchVersion:
        """Delete a version no alias points to (409 otherwise); its number is never reused.

        Returns the deleted record; its blobs stay (other versions may share them).
        """
        raw = self.run_script(self._delete_version,
                        [self._k("patch", name, "versions"), self._k("aliases"), self._k("audit")],
                        [name, str(int(version)), actor, reason, repr(time.time()), self.channel])
        return _version_from(int(version), json.loads(raw))

    # -- aliases -------------------------------------------------------------------------------------
    def activate(self, alias: str, patch: str, version: int, base: str | None = None, actor: str = "system",
                 reason: str = "", *, if_current: str | None = None, forced: bool = False) -> AliasPointer:
        """Point `alias` at `patch@version` atomically: pointer, history entry, audit entry and event together.

        `base`, if given, must be the version's base (422 otherwise). `if_current` makes it a
        compare-and-set: the move happens only if the alias points to that 'patch@version' now
        ('' = not yet created), else 409. `forced` records the move as `force_activate` (the gate skipped).
        """
        _check_name(alias, "alias")
        return self._move(alias, patch, version, base or "", actor, reason, "force_activate" if forced else "activate",
                          if_current)

    def rollback(self, alias: str, to_version: int | None = None, actor: str = "system",
                 reason: str = "", *, automatic: bool = False, expected: str | None = None) -> AliasPointer:
        """Move `alias` back to the version it pointed to before its last move, or to `to_version` of its patch.

        Rolling back twice returns to where it started, as the last move is what a rollback undoes.
        `automatic` records it as `auto_rollback`; `expected` refuses (409) unless the alias points there now.
        If the alias moves between the read and the move, 409 (nothing is changed).
        """
        with self.r.pipeline(transaction=True) as pipe:  # pointer and last move read together
            pipe.hget(self._k("aliases"), alias)
            pipe.lindex(self._k("alias", alias, "history"), -1)
            raw, last = pipe.execute()
        if raw is None:
            raise NotFound(f"no alias {alias!r}")
        current = _pointer_from(json.loads(raw))
        if expected is not None and current.ref != expected:
            raise Conflict(f"alias {alias!r} points to {current.ref}, not {expected}: it moved meanwhile")
        if to_version is not None:
            patch, version = current.patch, int(to_version)
        else:
            entry = _history_from(json.loads(last)) if last else None
            if entry is None or entry.from_patch is None:
                raise Conflict(f"alias {alias!r} has no previous version to roll back to")
            patch, version = entry.from_patch, entry.from_version
        if (patch, version) == (current.patch, current.version):
            raise Conflict(f"alias {alias!r} already points to {current.ref}")
        return self._move(alias, patch, version, "", actor, reason, "auto_rollback" if automatic else "rollback",
                          current.ref)

    def _move(self, alias: str, patch: str, version: int, base: str, actor: str, reason: str, action: str,
              if_current: str | None) -> AliasPointer:
        raw = self.run_script(self._move_alias,
                        [self._k("patch", patch, "versions"), self._k("aliases"), self._k("alias", alias, "history"),
                         self._k("audit"), self._k("bases")],
                        [alias, patch, str(int(version)), base, actor, reason, action, repr(time.time()),
                         _ANY if if_current is None else if_current, self.channel])
        return _pointer_from(json.loads(raw))

    def get_alias(self, alias: str) -> AliasPointer | None:
        """Where `alias` points now, or None."""
        raw = self.r.hget(self._k("aliases"), alias)
        return _pointer_from(json.loads(raw)) if raw else None

    def snapshot(self) -> dict[str, AliasPointer]:
        """Every alias's pointer, read in one command: what a periodic reconcile compares with what it serves."""
        return {_s(a): _pointer_from(json.loads(p)) for a, p in self.r.hgetall(self._k("aliases")).items()}

    def list_aliases(self) -> list[AliasPointer]:
        """Every alias's pointer, by alias name."""
        return sorted(self.snapshot().values(), key=lambda p: p.alias)

    def alias_history(self, alias: str) -> list[HistoryEntry]:
        """Every move of `alias`, oldest first."""
        return [_history_from(json.loads(x)) for x in self.r.lrange(self._k("alias", alias, "history"), 0, -1)]

    def last_move(self, alias: str) -> HistoryEntry | None:
        """The latest move of `alias` (what a rollback would undo), or None."""
        raw = self.r.lindex(self._k("alias", alias, "history"), -1)
        return _history_from(json.loads(raw)) if raw else None

    # -- audit and events ----------------------------------------------------------------------------
    def audit(self, limit: int = 100, since: str | float | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first: the newest `limit`, or the first `limit` after `since`.

        `since` is an entry id (entries after it) or a Unix time in seconds (entries from then on).
        """
        key = self._k("audit")
        if since is None:
            entries = list(reversed(self.r.xrevrange(key, count=limit)))
        else:
            # An entry id is exclusive (what you read last); a time is inclusive (from that moment on).
            start = f"({since}" if isinstance(since, str) else str(int(since * 1000))
            entries = self.r.xrange(key, min=start, count=limit)
        return [_audit_from(_s(i), {_s(k): _s(v) for k, v in f.items()}) for i, f in entries]

    def record(self, action: str, target: str, actor: str = "system", reason: str = "", from_ref: str = "",
               to_ref: str = "") -> None:
        """Append an audit entry for a decision that changed nothing in the registry (a refused gate, say)."""
        self.r.xadd(self._k("audit"), {"action": action, "actor": actor, "target": target, "from": from_ref,
                                        "to": to_ref, "reason": reason, "at": repr(time.time())})

    def subscribe(self) -> Subscription:
        """A subscription to this registry's events (alias moves, new and deleted versions, new bases)."""
        return Subscription(self.r, self.channel)


def _base_from(d: dict) -> BaseRecord:
    return BaseRecord(**{**d, "module_shapes": {m: tuple(s) for m, s in d.get("module_shapes", {}).items()}})


def _version_from(version: int, d: dict) -> PatchVersion:
    return PatchVersion(version=version, **{**d, "parents": tuple(d.get("parents", ()))})


def _pointer_from(d: dict) -> AliasPointer:
    return AliasPointer(**{**d, "version": int(d["version"])})


def _history_from(d: dict) -> HistoryEntry:
    def opt_int(x):
        return None if x is None else int(x)

    return HistoryEntry(**{**d, "from_version": opt_int(d.get("from_version")), "to_version": int(d["to_version"])})


def _audit_from(entry_id: str, f: dict) -> AuditEntry:
    return AuditEntry(id=entry_id, at=float(f["at"]), action=f["action"], actor=f["actor"], target=f["target"],
                      from_ref=f["from"], to_ref=f["to"], reason=f["reason"])
