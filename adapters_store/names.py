"""Names of bases, patches and aliases: safe slugs, because they become Redis keys, URLs and directory names."""

from __future__ import annotations

import re

SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NAME_RULE = "1-63 lower-case letters, digits or dashes, starting with a letter or digit"


def is_safe_name(name: object) -> bool:
    """Whether `name` is a slug: no dots, slashes, colons or upper case, so never a path or a key fragment."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None
