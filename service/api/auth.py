"""Who may call what: admin keys for /admin, inference keys (or none configured) for /v1.

`/admin` is never open: on first start an admin key is generated, written to `<data_dir>/admin.key`
(mode 0600) and printed once. `/v1` is open until the first inference key is created.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import Request

from adapters_store.keys import ApiKey, ApiKeyStore
from service.api.errors import APIError

ADMIN_KEY_FILE = "admin.key"


def ensure_admin_key(keys: ApiKeyStore, data_dir: Path) -> str | None:
    """Make sure an admin key exists; returns the secret only when it was created now (to print it once)."""
    path = Path(data_dir) / ADMIN_KEY_FILE
    if path.exists():
        secret = path.read_text().strip()
        if not keys.has_secret(secret):  # a fresh Redis behind an old data dir: the file's key stays valid
            keys.create("admin", "admin", actor=ADMIN_KEY_FILE, secret=secret)
        return None
    if keys.any_with_role("admin"):
        return None  # another replica made the first one; its operator holds it
    record, secret = keys.create("admin", "admin", actor="first-start")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def _authenticate(keys: ApiKeyStore, request: Request) -> ApiKey:
    presented = _bearer(request)
    if presented is None:
        raise APIError(401, "Missing API key: send it as `Authorization: Bearer <key>`.",
                       type_="authentication_error", code="missing_api_key")
    key = keys.check(presented)
    if key is None:
        raise APIError(401, "Invalid API key.", type_="authentication_error", code="invalid_api_key")
    return key


def require_admin(request: Request) -> ApiKey:
    """FastAPI dependency for /admin: an admin key, else 401 (none or unknown) or 403 (not admin)."""
    key = _authenticate(request.app.state.keys, request)
    if key.role != "admin":
        raise APIError(403, f"This key has the role `{key.role}`; /admin needs an admin key.",
                       type_="permission_error", code="forbidden")
    return key


def require_inference(request: Request) -> ApiKey | None:
    """FastAPI dependency for /v1: open until an inference key exists, then any valid key (admin included)."""
    keys: ApiKeyStore = request.app.state.keys
    if not keys.any_with_role("inference"):
        return None
    return _authenticate(keys, request)
