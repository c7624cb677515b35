"""An HTTP client for the admin API; every failure becomes one `OperatorError` with a one-line message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings


class OperatorError(Exception):
    """A failure the operator reads as one line (the server's refusal, or why the server was not reached)."""


class AdminClient:
    """The admin API at `url`, called with the admin key `key`."""

    def __init__(self, url: str, key: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None, key: str | None = None) -> AdminClient:
        """The client for `url`/`key`, else PATCHSERVE_URL/PATCHSERVE_ADMIN_KEY, else the local server's own."""
        url = url or settings.url or f"http://{_dialable(settings.host)}:{settings.port}"
        key = key or settings.admin_key or _key_file(settings.data_dir / "admin.key")
        return cls(url, key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None, **kwargs: Any) -> Any:
        return self._call("POST", path, json=body, **kwargs)

    def put(self, path: str, body: dict | None = None, **kwargs: Any) -> Any:
        return self._call("PUT", path, json=body, **kwargs)

    def delete(self, path: str, **params: Any) -> Any:
        return self._call("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, "/admin" + path, **kwargs)
        except httpx.ConnectError:
            raise OperatorError(f"cannot reach {self.url} (is `patchserve serve` running there? "
                                f"set PATCHSERVE_URL or --url)") from None
        except httpx.TimeoutException:
            raise OperatorError(f"{self.url} did not answer {method} /admin{path} in time") from None
        except httpx.HTTPError as exc:
            raise OperatorError(f"{method} {self.url}/admin{path} failed: {exc}") from None
        if response.status_code >= 400:
            raise OperatorError(_refusal(response))
        return response.json() if response.content else None


def _refusal(response: httpx.Response) -> str:
    """"404 not_found: no alias 'x'" from the API's OpenAI-shaped error body (else the body's first line)."""
    status = response.status_code
    if status == 401:
        return "401 the server refused the admin key (set PATCHSERVE_ADMIN_KEY or --key)"
    try:
        error = response.json()["error"]
        return f"{status} {error.get('code') or error.get('type')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status} {(response.text.strip().splitlines() or [response.reason_phrase])[0]}"


def _key_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        raise OperatorError(f"no admin key: set PATCHSERVE_ADMIN_KEY or --key (no key file at {path})") from None


def _dialable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
