"""Fine-tuning transfer: a full fine-tuned checkpoint of a base, turned into a LoRA patch of that base.

For every linear layer LoRA can carry, ΔW = W_tuned − W_base is factored by truncated SVD,
ΔW ≈ U_r diag(S_r) V_rᵀ, and stored as B = U_r diag(S_r), A = V_rᵀ with lora_alpha = r (scaling 1),
so the patch adds exactly the rank-r part of the difference. "Energy kept" is Σ S_r² / Σ S² — the
share of the difference's squared Frobenius norm the patch keeps. Parameters LoRA cannot carry
(embeddings, norms, the LM head) are reported with their relative change, not silently dropped.
The adapter is written by PEFT itself, so it is loaded like any uploaded patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from adapters_store.validation import LORA_MODULES
from service.lora.factors import write_adapter

_UNCHANGED = 1e-7  # relative change below which a layer counts as untouched by the fine-tune


@dataclass
class Extraction:
    rank: int
    energy_kept: float  # over every carried layer
    modules: dict[str, float] = field(default_factory=dict)  # layer → energy kept
    not_carried: dict[str, float] = field(default_factory=dict)  # parameter → ‖ΔW‖ / ‖W‖


def extract_lora(base_dir: Path, tuned_dir: Path, rank: int, out_dir: Path,
                 progress: Callable[[float, str], None] = lambda p, s: None) -> Extraction:
    """Write to `out_dir` the rank-`rank` LoRA patch of base_dir that best approximates tuned_dir."""
    if rank < 1:
        raise ValueError("rank must be at least 1")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).state_dict()
    own = base.state_dict()
    if set(own) != set(tuned) or any(own[k].shape != tuned[k].shape for k in own):
        raise ValueError("the checkpoint is not a fine-tune of this base: parameter names or shapes differ")

    linear = {name: m for name, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_MODULES}
    deltas, not_carried = {}, {}
    for i, (name, module) in enumerate(linear.items()):
        delta = tuned[f"{name}.weight"] - module.weight.detach()
        if delta.norm() > _UNCHANGED * module.weight.norm():
            deltas[name] = delta
        progress(40 * (i + 1) / len(linear), f"difference of {name}")
    for key, value in own.items():
        is_carried = key.endswith(".weight") and key[: -len(".weight")] in deltas
        change = (tuned[key] - value).norm() / value.norm().clamp_min(1e-12)
        if not is_carried and change > _UNCHANGED:
            not_carried[key] = round(change.item(), 6)
    if not deltas:
        raise ValueError("the checkpoint does not differ from the base in any layer a LoRA patch can carry")
    progress(50, "truncated SVD of each layer's difference, writing the patch")
    found = write_adapter(base_dir, deltas, rank, out_dir)
    return Extraction(rank=rank, energy_kept=found.energy_kept, modules=found.modules, not_carried=not_carried)
