"""API keys in the registry's Redis: only their sha256 is stored, and a presented key is checked in constant time.

A key is 32 random bytes (`psk_…`), so a plain sha256 is enough to make the stored form useless to a
reader of Redis (no slow hash is needed against guessing). Checking compares the presented key's hash
with every stored hash by `hmac.compare_digest`, without stopping at the first match, so the time
taken says nothing about which keys exist or how much of one was right.

Keys, under the registry prefix:
  apikeys  hash  key id → ApiKey JSON (id, name, role, sha256, created_at, created_by)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass

import redis

from adapters_store.names import NAME_RULE, is_safe_name
from adapters_store.replication import Acks

ROLES = ("admin", "inference")
_CACHE_SECONDS = 1.0  # how stale a replica's view of the keys may be (a revoked key dies within it)
log = logging.getLogger("patchserve.keys")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    sha256: str
    created_at: float
    created_by: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    """Create, list, revoke and check API keys with roles (admin may change things, inference may only infer)."""

    def __init__(self, client: redis.Redis, prefix: str = "ps:", acks: Acks = Acks()):
        self.r = client
        self.acks = acks
        self.key = prefix + "apikeys"
        self._cache: tuple[float, list[ApiKey]] = (0.0, [])
        self._loaded = False  # whether the copy was ever read from Redis

    def create(self, role: str, name: str, actor: str = "system", secret: str | None = None) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself, which is shown to the caller once and never stored.

        `secret` registers a key that already exists elsewhere (the admin key file) instead of a new one.
        """
        if role not in ROLES:
            raise ValueError(f"role {role!r} must be one of {', '.join(ROLES)}")
        if not is_safe_name(name):
            raise ValueError(f"key name {name!r} must be {NAME_RULE}")
        secret = secret or f"psk_{secrets.token_urlsafe(32)}"
        record = ApiKey(id=secrets.token_hex(6), name=name, role=role, sha256=_digest(secret),
                        created_at=time.time(), created_by=actor)
        self.acks.write(self.r, lambda pipe: pipe.hset(self.key, record.id, json.dumps(asdict(record))))
        self._cache = (0.0, self._cache[1])  # re-read at the next check, the old copy kept until then
        return record, secret

    def list(self) -> list[ApiKey]:
        """Every key's record (never a secret), oldest first."""
        keys = [ApiKey(**json.loads(v)) for v in self.r.hvals(self.key)]
        return sorted(keys, key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> bool:
        """Delete a key; whether it existed."""
        found = bool(self.acks.write(self.r, lambda pipe: pipe.hdel(self.key, key_id))[0])
        self._cache = (0.0, self._cache[1])
        return found

    def _keys(self) -> list[ApiKey]:
        """This process's copy of every key's hash, re-read at most once a second.

        Redis is needed to change keys, never to check them: while it is unreachable the last copy
        stands (re-tried once a second), so inference keeps answering on the keys it knew.
        """
        at, keys = self._cache
        if time.monotonic() - at > _CACHE_SECONDS:
            try:
                keys = self.list()
            except redis.RedisError as exc:
                if not self._loaded:
                    raise  # never read once: nothing to stand on
                log.warning("registry unreachable; checking keys against the last copy",
                            extra={"fields": {"error": str(exc)}})
            else:
                self._loaded = True
            self._cache = (time.monotonic(), keys)
        return keys

    def check(self, presented: str) -> ApiKey | None:
        """The key record `presented` belongs to, or None; constant time in the key's content."""
        digest = _digest(presented)
        found = None
        for key in self._keys():
            if hmac.compare_digest(key.sha256, digest) and found is None:
                found = key
        return found

    def any_with_role(self, role: str) -> bool:
        """Whether any key has `role` (the inference API is open until one inference key exists)."""
        return any(k.role == role for k in self._keys())

    def has_secret(self, secret: str) -> bool:
        """Whether `secret` is a stored key (so a key file can be re-registered idempotently)."""
        return self.check(secret) is not None
