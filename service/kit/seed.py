"""The kit's models in the registry: base-v1 registered, each kit patch uploaded once as version 1 of an alias.

Run at every start on embedded defaults; it changes nothing once done, so a restarted gateway keeps
whatever the operators did since (later versions, rollbacks). Seeding runs under a Redis lock so two
replicas starting together do not both create version 1.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters_store.blobs import BlobStore, put_files
from adapters_store.evaluation import EvaluationStore
from adapters_store.memories import Memories
from adapters_store.registry import Registry
from adapters_store.validation import base_module_shapes

KIT_BASE = "base-v1"
KIT_MEMORY = "facts"  # the kit's side memory, attached to base-v1, with no edit yet


def register_kit_base(registry: Registry, kit: Path, manifest: dict, name: str = KIT_BASE) -> None:
    """Record a kit base (its directory and module shapes) in the registry; idempotent."""
    path = kit / name
    config = json.loads((path / "config.json").read_text())
    # The kit's hash goes in meta, not in the compared details: a rebuilt kit in the same data dir is the
    # same base to the registry (its patches were rebuilt with it).
    registry.register_base(name, "kit", path=str(path), module_shapes=base_module_shapes(config),
                           meta={"source": "kit", "kit_hash": manifest["kit_hash"]}, actor="kit")


def seed_registry(registry: Registry, blobs: BlobStore, evals: EvaluationStore, kit: Path, manifest: dict,
                  memories: Memories | None = None) -> None:
    """Register base-v1 and, for each kit patch never seeded, version 1 from the kit's files and its alias.

    Each kit alias gets the kit's evaluation set and distillation prompts of its task, and the kit's probe
    set becomes the probe set, unless they were set before (an operator's choice stays). The side memory
    `facts` is created once on base-v1, with the kit's irrelevant texts and no edit.
    """
    with registry.r.lock(registry.prefix + "lock:seed", timeout=60, blocking_timeout=60):
        register_kit_base(registry, kit, manifest)
        if not evals.probe():
            evals.set_probe([row["text"] for row in _jsonl(kit / manifest["probe_set"])])
        for name, patch in manifest["patches"].items():
            if evals.evalset_record(name) is None and name in manifest["eval_sets"]:
                evals.attach_evalset(name, _jsonl(kit / manifest["eval_sets"][name]), actor="kit")
            if evals.prompts_record(name) is None and name in manifest.get("distill_sets", {}):
                evals.attach_prompts(name, [r["prompt"] for r in _jsonl(kit / manifest["distill_sets"][name])],
                                     actor="kit")
            if registry.list_versions(name) or registry.get_alias(name):
                continue  # seeded before: whatever happened since is the operators' to keep
            files = put_files(blobs, {path.name: path for path in (kit / patch["path"]).iterdir()})
            version = registry.create_version(name, patch["base"], files, {"source": "kit"}, actor="kit",
                                              reason="seeded from the kit")
            registry.activate(name, name, version.version, actor="kit", reason="seeded from the kit")
        if memories is not None and "memory" in manifest and memories.get(KIT_MEMORY) is None:
            memories.create(KIT_MEMORY, KIT_BASE, KIT_BASE, actor="kit")
            data = (kit / manifest["memory"]["irrelevant_set"]).read_bytes()
            memories.set_irrelevant(KIT_MEMORY, blobs.put_bytes(data), data.count(b"\n"), actor="kit")
            # Its Loc floor is the kit's, below the default 0.9: half its locality prompts are task prompts,
            # which the bare base continues with a sentence about someone's job, and the per-token router
            # speaks there once a job is edited (measured Loc 0.8-1.0 on the kit; README).
            memories.set_gate(KIT_MEMORY, {"min_loc": 0.7})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
