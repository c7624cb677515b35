"""Merging patches: several LoRA adapters of one base folded into one, layer by layer, on their full ΔW.

Each source's ΔW = scale·B·A is formed per layer (sources may differ in rank and target modules; a
layer a source does not touch is zero for it), the ΔWs are merged by the chosen method, and the merged
ΔW is written back as one adapter by truncated SVD (service/lora/factors.py), with the energy kept.
Merging A and B separately, as PEFT's `add_weighted_adapter` does for its non-SVD types, is not the
merged ΔW (the cross terms B_i·A_j appear), so it is not used here.

Methods (τ_t: source t's ΔW of one layer, w_t its weight):
- linear: Σ w_t τ_t (task arithmetic; PEFT's `task_arithmetic`).
- ties: trim each τ_t to its `density` largest magnitudes, elect a sign per entry, average the entries
  that agree with it (Yadav et al. 2023; PEFT's `ties`).
- dare_ties: drop entries at random with probability 1 − `density`, rescale, then TIES' sign election
  (Yu et al. 2024; PEFT's `dare_ties`).
- breadcrumbs: per τ_t, drop the `beta` share of largest and the `gamma` share of smallest magnitudes,
  then Σ w_t τ_t (Model Breadcrumbs, Davari & Belilovsky 2023).
- consensus: τ_MTL = Σ w_t τ_t; TALL mask m_t = |τ_t| ≥ λ·|τ_MTL − τ_t|; keep the entries of τ_MTL that
  at least `k` tasks use (Wang et al. 2024, "Localizing Task Information"): drops selfish and
  catastrophic weights.
- orthogonal: sources in order; each τ_t is projected off the column space of what is merged so far
  (its top singular directions) before it is added, so a later patch does not overwrite an earlier
  one's directions (merging on the fly as patches arrive).

The other method, `distill`, trains the merged adapter instead (service/lora/merge_by_distillation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from peft.utils import merge_utils

from service.lora.params import DELTA_METHODS, MergeParams


@dataclass
class Merged:
    deltas: dict[str, torch.Tensor]
    kept_by_consensus: dict[str, float] = field(default_factory=dict)  # consensus: share of entries kept


def merge_deltas(sources: Sequence[dict[str, torch.Tensor]], method: str, params: MergeParams = MergeParams(),
                 progress: Callable[[float, str], None] = lambda p, s: None) -> Merged:
    """The merged ΔW of every layer any source changes (module path → tensor)."""
    if method not in DELTA_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(DELTA_METHODS)}")
    params.check(len(sources))
    weights = torch.tensor(params.weights or [1.0] * len(sources))
    layers = sorted({name for source in sources for name in source})
    generator = torch.Generator().manual_seed(params.seed)
    out = Merged({})
    for i, layer in enumerate(layers):
        shape = next(s[layer].shape for s in sources if layer in s)
        taus = [s.get(layer, torch.zeros(shape)) for s in sources]
        if method == "linear":
            merged = merge_utils.task_arithmetic(taus, weights)
        elif method == "ties":
            merged = merge_utils.ties(taus, weights, params.density)
        elif method == "dare_ties":
            merged = _seeded(generator, merge_utils.dare_ties, taus, weights, params.density)
        elif method == "breadcrumbs":
            merged = sum(w * _breadcrumbs(t, params.beta, params.gamma) for w, t in zip(weights, taus))
        elif method == "consensus":
            merged, share = _consensus(taus, weights, params.lam, params.k)
            out.kept_by_consensus[layer] = share
        else:
            merged = _orthogonal(taus, weights)
        out.deltas[layer] = merged
        progress(100 * (i + 1) / len(layers), f"{method} of {layer}")
    return out


def _seeded(generator: torch.Generator, run: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    # PEFT's random pruning draws from torch's global generator: seed it from ours, so a merge is repeatable.
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return run(*args)


def _breadcrumbs(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """τ without its `beta` share of largest and `gamma` share of smallest magnitudes."""
    flat = tau.abs().flatten()
    n = flat.numel()
    order = flat.argsort()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[int(gamma * n): n - int(beta * n)]] = True
    return tau * keep.view_as(tau)


def _consensus(taus: list[torch.Tensor], weights: torch.Tensor, lam: float, k: int) -> tuple[torch.Tensor, float]:
    """τ_MTL kept where at least k TALL masks agree; and the share of entries kept."""
    mtl = sum(w * t for w, t in zip(weights, taus))
    masks = torch.stack([(w * t).abs() >= lam * (mtl - w * t).abs() for w, t in zip(weights, taus)])
    # An entry no task changes is zero in every τ, so it passes every mask: count only entries some task uses.
    used = torch.stack([t != 0 for t in taus])
    votes = (masks & used).sum(dim=0)
    keep = votes >= k
    changed = used.any(dim=0)
    share = (keep & changed).sum().item() / max(1, changed.sum().item())
    return mtl * keep, share


def _orthogonal(taus: list[torch.Tensor], weights: torch.Tensor, energy: float = 0.99) -> torch.Tensor:
    """Σ of each w_t τ_t after projecting it off the column space holding `energy` of what came before."""
    merged = torch.zeros_like(taus[0])
    for w, tau in zip(weights, taus):
        update = w * tau
        if merged.abs().sum() > 0:
            u, s, _ = torch.linalg.svd(merged, full_matrices=False)
            cumulative = (s**2).cumsum(0) / (s**2).sum()
            r = int((cumulative < energy).sum().item()) + 1
            basis = u[:, :r]
            update = update - basis @ (basis.T @ update)
        merged = merged + update
    return merged
