"""TALL-compressed storage of several patches: one shared ΔW plus one bit-mask per source.

TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging and
Compression"): for source t with ΔW τ_t and the multi-task ΔW τ_MTL (the sources merged),
m_t = |τ_t| ≥ λ·|τ_MTL − τ_t| marks the entries where τ_t matters more than what the other sources
add there. Source t is then rebuilt as m_t ⊙ τ_MTL: its own entries, without the others' interference
elsewhere. Keeping τ_MTL once and one bit per entry per source replaces keeping every ΔW.

`fitted_storage` keeps the same stored form (one shared ΔW, one bit per entry per source) but chooses
both to rebuild the sources best, not from a merge: per entry, the set of sources whose bit is on and the
shared value (their weighted mean) that minimise Σ_t w_t·(rebuilt_t − τ_t)², exactly, over every subset.
The source weights start at 1/‖τ_t‖² (relative error, so a small patch is not drowned by a large one)
and are re-balanced until every source is rebuilt with the same relative error. Why: with the paper's
masks over a merge, a source whose entries are dominated by a larger patch loses them (on the kit,
sentiment's mask kept 5–9 % of the entries and ~40 % relative error); fitted, every source's error is ~27 %.

The stored form is two kinds of safetensors files (never pickle), each a content-addressed blob:
the merged ΔW (one tensor per layer, float32) and, per source, its masks packed eight entries to a
byte (np.packbits order) under the same layer names; the merged ΔW's shapes unpack them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load, save


@dataclass
class TallMasks:
    masks: list[dict[str, torch.Tensor]]  # per source: layer → bool mask
    density: list[float]  # per source: share of the merged ΔW's non-zero entries its mask keeps


def tall_masks(taus: Sequence[Mapping[str, torch.Tensor]], merged: Mapping[str, torch.Tensor],
               lam: float) -> TallMasks:
    """Each source's TALL mask over every merged layer (a layer a source lacks is zero for it)."""
    masks, density = [], []
    for tau in taus:
        mask, kept, total = {}, 0, 0
        for layer, mtl in merged.items():
            own = tau.get(layer, torch.zeros_like(mtl))
            mask[layer] = own.abs() >= lam * (mtl - own).abs()
            # Density counts the entries the merge changes: where τ_MTL is 0 a mask keeps nothing whatever its bit.
            changed = mtl != 0
            kept, total = kept + int((mask[layer] & changed).sum()), total + int(changed.sum())
        masks.append(mask)
        density.append(kept / total if total else 0.0)
    return TallMasks(masks, density)


@dataclass
class Fitted:
    shared: dict[str, torch.Tensor]  # layer → the stored ΔW
    masks: TallMasks
    relative_error: list[float]  # per source: ‖rebuilt − τ‖ / ‖τ‖ over every layer
    weights: list[float]  # per source, the final balance (1 = its 1/‖τ‖² start)


MAX_FITTED_SOURCES = 8  # 2^T − 1 subsets are tried per entry


def fitted_storage(taus: Sequence[Mapping[str, torch.Tensor]], rounds: int = 5) -> Fitted:
    """The shared ΔW and masks that rebuild every source with the least, balanced, relative error."""
    if not 1 <= len(taus) <= MAX_FITTED_SOURCES:
        raise ValueError(f"fitted TALL storage takes 1 to {MAX_FITTED_SOURCES} sources, not {len(taus)}")
    layers = sorted({layer for tau in taus for layer in tau})
    norms = [max(sum(float(t.double().pow(2).sum()) for t in tau.values()), 1e-30) for tau in taus]
    balance = [1.0] * len(taus)
    for _ in range(rounds):
        shared, masks, errors = _fit(taus, layers, [b / n for b, n in zip(balance, norms)])
        relative = [(e / n) ** 0.5 for e, n in zip(errors, norms)]
        mean = sum(relative) / len(relative)
        if mean == 0 or max(relative) - min(relative) < 1e-3 * mean:
            break
        balance = [b * (r / mean) ** 2 for b, r in zip(balance, relative)]
    density = []
    for mask in masks:
        kept = sum(int((mask[layer] & (shared[layer] != 0)).sum()) for layer in layers)
        total = sum(int((shared[layer] != 0).sum()) for layer in layers)
        density.append(kept / total if total else 0.0)
    return Fitted(shared, TallMasks(masks, density), [round(r, 6) for r in relative], balance)


def _fit(taus, layers, weights) -> tuple[dict, list[dict], list[float]]:
    """One exact per-entry fit for fixed weights: (shared ΔW, masks, each source's squared error)."""
    count = len(taus)
    shared, masks, errors = {}, [{} for _ in taus], [0.0] * count
    for layer in layers:
        shape = next(tau[layer].shape for tau in taus if layer in tau)
        t = torch.stack([tau[layer].float() if layer in tau else torch.zeros(shape) for tau in taus])
        w = torch.tensor(weights).view(-1, *[1] * len(shape))
        best = (w * t * t).sum(0)  # every bit off: each source loses all of its entry
        value, chosen = torch.zeros(shape), torch.zeros(shape, dtype=torch.long)
        for subset in range(1, 1 << count):
            on = torch.tensor([bool(subset >> i & 1) for i in range(count)])
            mean = (w[on] * t[on]).sum(0) / w[on].sum()
            error = (w[~on] * t[~on] ** 2).sum(0) + (w[on] * (t[on] - mean) ** 2).sum(0)
            better = error < best
            best, value, chosen = torch.where(better, error, best), torch.where(better, mean, value), \
                torch.where(better, subset, chosen)
        shared[layer] = value
        for i in range(count):
            bit = (chosen >> i & 1).bool()
            masks[i][layer] = bit
            errors[i] += float(torch.where(bit, t[i] - value, t[i]).double().pow(2).sum())
    return shared, masks, errors


def reconstruct(merged: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A source's ΔW rebuilt from the stored form: m_t ⊙ τ_MTL, without the layers its mask leaves empty."""
    out = {}
    for layer, mtl in merged.items():
        rebuilt = mtl * mask[layer]
        if rebuilt.abs().sum() > 0:
            out[layer] = rebuilt
    return out


def merged_bytes(merged: Mapping[str, torch.Tensor]) -> bytes:
    """The merged ΔW as a safetensors file."""
    return save({layer: t.float().contiguous() for layer, t in merged.items()})


def mask_bytes(mask: Mapping[str, torch.Tensor]) -> bytes:
    """One source's masks as a safetensors file of packed bits (1 bit per entry)."""
    return save({layer: torch.from_numpy(np.packbits(m.flatten().numpy())) for layer, m in mask.items()})


def read_merged(data: bytes) -> dict[str, torch.Tensor]:
    """The merged ΔW from its safetensors bytes."""
    return load(data)


def read_mask(data: bytes, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One source's masks from their packed bytes, shaped like the merged ΔW's layers."""
    packed = load(data)
    if set(packed) != set(merged):
        raise ValueError("the mask does not cover the merged layers")
    return {layer: torch.from_numpy(np.unpackbits(packed[layer].numpy(), count=mtl.numel()).astype(bool))
            .view(mtl.shape) for layer, mtl in merged.items()}
