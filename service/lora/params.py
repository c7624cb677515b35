"""The merge methods and their parameters: plain data, checked where a request arrives and where a job runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Methods that merge the sources' ΔWs entry by entry (service/lora/merge.py)...
DELTA_METHODS = ("linear", "ties", "dare_ties", "breadcrumbs", "consensus", "orthogonal")
# ... and one that trains the merged adapter to answer as each source (service/lora/merge_by_distillation.py).
METHODS = (*DELTA_METHODS, "distill")
_REF = re.compile(r"[a-z0-9][a-z0-9-]*@[0-9]{1,9}")


@dataclass(frozen=True)
class MergeParams:
    weights: tuple[float, ...] | None = None  # one per source; default 1 each
    density: float = 0.5  # ties, dare_ties: share of entries kept per source
    beta: float = 0.01  # breadcrumbs: share of the largest magnitudes dropped
    gamma: float = 0.5  # breadcrumbs: share of the smallest magnitudes dropped
    lam: float = 0.5  # consensus: λ of the TALL masks
    k: int = 2  # consensus: tasks that must use an entry for it to be kept
    seed: int = 0  # dare_ties' random drops; distill's sampling
    # distill: where the student starts — "auto" (the sum of the sources the rank holds exactly, fewest
    # distillation prompts first: those keep what they generalised), a delta method's merge, or a source ref
    init: str = "auto"
    steps: int = 1000  # distill: training steps
    lr: float = 4e-3  # distill: learning rate

    def check(self, sources: int) -> None:
        """Raise ValueError naming the parameter that is out of range for `sources` sources."""
        if self.weights is not None and len(self.weights) != sources:
            raise ValueError(f"weights: {len(self.weights)} given for {sources} sources")
        for name in ("density", "beta", "gamma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.density == 0:
            raise ValueError("density must be above 0")
        if self.beta + self.gamma >= 1:
            raise ValueError("beta + gamma must be below 1: nothing would be left")
        if self.lam < 0:
            raise ValueError("lam must be at least 0")
        if self.init != "auto" and self.init not in DELTA_METHODS and not _REF.fullmatch(self.init):
            raise ValueError(f"init must be auto, one of {', '.join(DELTA_METHODS)} or a source like 'qa@1'")
        if not 1 <= self.steps <= 20_000:
            raise ValueError("steps must be between 1 and 20000")
        if not 0 < self.lr <= 1:
            raise ValueError("lr must be above 0 and at most 1")
        if not 1 <= self.k <= sources:
            raise ValueError(f"k must be between 1 and the number of sources ({sources})")
