"""TALL-compressed storage of several patches: one merged ΔW plus one bit-mask per source.

TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging and
Compression"): for source t with ΔW τ_t and the multi-task ΔW τ_MTL (the sources merged),
m_t = |τ_t| ≥ λ·|τ_MTL − τ_t| marks the entries where τ_t matters more than what the other sources
add there. Source t is then rebuilt as m_t ⊙ τ_MTL: its own entries, without the others' interference
elsewhere. Keeping τ_MTL once and one bit per entry per source replaces keeping every ΔW.

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
