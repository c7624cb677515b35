"""The merge methods and their parameters: plain data, checked where a request arrives and where a job runs."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("linear", "ties", "dare_ties", "breadcrumbs", "consensus", "orthogonal")


@dataclass(frozen=True)
class MergeParams:
    weights: tuple[float, ...] | None = None  # one per source; default 1 each
    density: float = 0.5  # ties, dare_ties: share of entries kept per source
    beta: float = 0.01  # breadcrumbs: share of the largest magnitudes dropped
    gamma: float = 0.5  # breadcrumbs: share of the smallest magnitudes dropped
    lam: float = 0.5  # consensus: λ of the TALL masks
    k: int = 2  # consensus: tasks that must use an entry for it to be kept
    seed: int = 0  # dare_ties' random drops

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
        if not 1 <= self.k <= sources:
            raise ValueError(f"k must be between 1 and the number of sources ({sources})")
