"""A copy of every kit built on this machine, by content hash, shared by all checkouts of the user.

The kit takes minutes to build and its bytes depend only on its hash (settings, code, library versions):
a second clone, a CI step that starts the quick start in a fresh directory, or a `git clean` should not
train the same models again. Like the Hugging Face hub cache, it lives under $XDG_CACHE_HOME (default
~/.cache) and can be moved or switched off (settings.kit_cache_dir, settings.kit_cache).

A kit is copied in and out whole, through a temporary directory renamed into place, and every file is
checked against the manifest's sha256 before it is used: a truncated or edited copy is rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from service.kit.config import MANIFEST, KitConfig


def default_dir() -> Path:
    """$XDG_CACHE_HOME/patchserve/kits, or ~/.cache/patchserve/kits."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchserve" / "kits"


def restore(cache_dir: Path, out: Path, config: KitConfig) -> dict | None:
    """Copy the cached kit of `config`'s hash to `out` and return its manifest; None if there is none."""
    source = cache_dir / config.digest()
    manifest = _verified(source)
    if manifest is None:
        return None
    _copy_into_place(source, out)
    return manifest


def keep(cache_dir: Path, kit: Path, manifest: dict) -> None:
    """Keep a copy of the complete kit at `kit` (a full disk or a read-only cache only costs a rebuild later)."""
    dest = cache_dir / manifest["kit_hash"]
    if _verified(dest) is not None:
        return
    try:
        _copy_into_place(kit, dest)
    except OSError:
        pass


def _verified(kit: Path) -> dict | None:
    try:
        manifest = json.loads((kit / MANIFEST).read_text())
        for name, digest in manifest["checksums"].items():
            if hashlib.sha256((kit / name).read_bytes()).hexdigest() != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _copy_into_place(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.copy-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            shutil.rmtree(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
