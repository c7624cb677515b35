"""The models the gateway serves from the kit's files, until the store registers them."""

from __future__ import annotations

from pathlib import Path

from service.resolver import PatchVersion, Resolver


def kit_resolver(kit: Path, manifest: dict) -> Resolver:
    """base-v1 as `tiny` (and `base-v1`); each kit patch as version 1 under an alias of its name."""
    resolver = Resolver(bases={"tiny": "base-v1", "base-v1": "base-v1"})
    for name, patch in manifest["patches"].items():
        version = PatchVersion(patch=name, version=1, base=patch["base"], path=str(kit / patch["path"]))
        resolver.versions[name] = {1: version}
        resolver.aliases[name] = (name, 1)
    return resolver
