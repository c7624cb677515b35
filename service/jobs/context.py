"""What every update job works with: the registry, evaluation store, blobs, an evaluator, limits, a work dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_store.blobs import BlobStore
from adapters_store.errors import StoreError
from adapters_store.evaluation import EvaluationStore
from adapters_store.memories import Memories
from adapters_store.registry import PatchVersion, Registry
from adapters_store.replicas import ReplicaDirectory
from adapters_store.validation import Limits
from service.evaluation.evaluator import Evaluator
from service.jobs.worker import JobRefused


@dataclass
class JobContext:
    registry: Registry
    evals: EvaluationStore
    evaluator: Evaluator
    blobs: BlobStore
    limits: Limits
    work_dir: Path
    replicas: ReplicaDirectory
    memories: Memories
    memory_layer: int | None = None  # the layer side memories sit in (settings.memory_layer; None: WISE's default)

    def move(self, alias: str, version: PatchVersion, if_current: str, actor: str, reason: str,
             force_host: bool = False) -> str | None:
        """Move `alias` to `version` if it still points to `if_current`; None when moved, else why not.

        Not to a base no live replica hosts (unless `force_host`): every request would be refused.
        """
        try:
            if not force_host:
                self.replicas.require_host(version.base)
            self.registry.activate(alias, version.name, version.version, actor=actor, reason=reason,
                                   if_current=if_current)
        except StoreError as exc:
            return exc.message
        return None

    def version(self, patch: str, version: int) -> PatchVersion:
        """A registered version, or the job is refused (no retry can make it exist)."""
        record = self.registry.get_version(patch, version)
        if record is None:
            raise JobRefused(f"no version {patch}@{version}")
        return record

    def base_path(self, base: str) -> str:
        """The directory of a registered base, or the job is refused."""
        record = self.registry.get_base(base)
        if record is None or not record.path:
            raise JobRefused(f"base {base!r} has no local path to evaluate on")
        return record.path

    def distillation_prompts(self, alias: str) -> list[str]:
        """The alias's distillation prompts; the job is refused if it has none or one is an evaluation item
        (a repair or a merge by distillation must not train on what judges it)."""
        prompts = self.evals.prompts(alias)
        if not prompts:
            raise JobRefused(f"alias {alias!r} has no distillation prompts (PUT /admin/aliases/{alias}/prompts)")
        overlap = self.evals.overlap(alias, prompts)
        if overlap:
            raise JobRefused(f"{len(overlap)} of {alias!r}'s distillation prompts are items of its evaluation set "
                             f"(first: {overlap[0][:80]!r}): a job must not train on what judges it")
        return prompts
