"""The kit's settings and its content hash; light to import, so a cache hit costs no torch import."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

MANIFEST = "manifest.json"
# The files whose bytes decide the kit's bytes: change one and the cache is rebuilt.
_SOURCES = ["config.py", "world.py", "tasks.py", "tokenizer.py", "train.py", "evaluate.py", "build.py"]


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 128
    intermediate: int = 512
    layers: int = 4
    heads: int = 2
    head_dim: int = 64
    max_positions: int = 256


@dataclass(frozen=True)
class KitConfig:
    seed: int = 1234
    people: int = 64
    new_people: int = 16
    moved: int = 16
    vocab_size: int = 1024
    shape: ModelShape = field(default_factory=ModelShape)
    base_steps: int = 700
    base_lr: float = 3e-3
    v2_steps: int = 300
    v2_lr: float = 2e-3
    batch: int = 32
    seq_len: int = 64
    eval_size: int = 96
    edits: int = 128  # every city and job of the 64 people: the knowledge-edit world
    probes: int = 64
    threads: int = 2

    def digest(self) -> str:
        """Hash of the settings, the kit's code and the library versions that decide its bytes."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        here = Path(__file__).parent
        for name in _SOURCES:
            h.update((here / name).read_bytes())
        h.update(" ".join(version(lib) for lib in ("torch", "transformers", "peft", "tokenizers")).encode())
        return h.hexdigest()[:16]


def cached(out: Path, config: KitConfig) -> dict | None:
    """The manifest of a complete kit at `out` built from `config`, or None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("kit_hash") == config.digest() else None
