"""Shared fixtures: one kit per test session, built (or taken from its cache) through the real build code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kit_dir() -> Path:
    """The kit directory: PATCHSERVE_KIT_DIR if set, else <repo>/.patchserve/kit, built if missing."""
    from service.kit.build import build

    path = Path(os.environ.get("PATCHSERVE_KIT_DIR", REPO / ".patchserve" / "kit"))
    build(path, show_progress=False)
    return path


@pytest.fixture(scope="session")
def manifest(kit_dir: Path) -> dict:
    return json.loads((kit_dir / "manifest.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
