"""What every update job works with: the registry, evaluation store, blobs, an evaluator, limits, a work dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_store.blobs import BlobStore
from adapters_store.evaluation import EvaluationStore
from adapters_store.registry import PatchVersion, Registry
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
