"""The base of every request body the API accepts: text must be text.

JSON may carry lone UTF-16 surrogates ("\\ud800"); Python decodes them into a `str` that no tokenizer,
Redis client or JSON response can encode, so such a body is refused at the edge with a 400 naming the
field, before any part of the service sees it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator


def _first_unencodable(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_unencodable(key, path) or _first_unencodable(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class EdgeModel(BaseModel):
    """A request body: every string in it must be encodable as UTF-8 (no lone surrogates)."""

    @model_validator(mode="before")
    @classmethod
    def _text_is_text(cls, data: Any) -> Any:
        where = _first_unencodable(data, "")
        if where:
            raise ValueError(f"`{where}` holds text that is not valid Unicode (a lone surrogate)")
        return data
