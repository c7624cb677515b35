"""A side memory in a transformers model: hooks on one layer's MLP, per row of a (possibly mixed) batch.

A forward pre-hook on the layer's `down_proj` Linear keeps its input h; a forward hook on the MLP adds
the memory to the MLP's output. The Linear is the module PEFT later wraps as `base_layer`, so the hooks
outlive adapters being loaded and unloaded, and the memory is added after `down_proj` and its LoRA, in
the same order as in vLLM's model (service/memory/vllm_model.py): the engines agree token for token.
"""

from __future__ import annotations

import torch
from torch import nn

from service.memory.side_memory import NO_SLOT, SideMemory


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (Llama, Qwen, Mistral), under PEFT wrapping or not."""
    inner = model
    for attr in ("base_model", "model"):
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            inner = getattr(inner, attr)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers this memory knows how to reach")
    return inner.layers


def default_layer(num_layers: int) -> int:
    """A mid-to-late layer, as WISE chooses (layer 27 of LLaMA-2-7B's 32): three quarters down, 0-based."""
    return max(0, round(num_layers * 0.75) - 1)


class HFMemory:
    """A SideMemory installed on layer `layer` of `model`; set `row_slots` before each forward pass."""

    def __init__(self, model: nn.Module, layer: int, slots: int):
        mlp = decoder_layers(model)[layer].mlp
        down = mlp.down_proj
        down = getattr(down, "base_layer", down)  # already wrapped by PEFT: hook the Linear it wraps
        self.layer = layer
        self.memory = SideMemory(down.out_features, down.in_features, slots, dtype=down.weight.dtype)
        self.row_slots: torch.Tensor | None = None  # slot of each row of the next forward pass
        self._h: torch.Tensor | None = None
        self._handles = [down.register_forward_pre_hook(self._keep_input),
                         mlp.register_forward_hook(self._add_memory)]

    def set_rows(self, keys: list[str | None]) -> None:
        """The memory key of each row of the coming batch (None: no memory)."""
        self.row_slots = torch.tensor([self.memory.slot_of(k) for k in keys], dtype=torch.long)

    def set_all(self, key: str | None) -> None:
        """One memory (or none) for every row of every batch from now on (evaluation, generate())."""
        self.row_slots = torch.tensor([self.memory.slot_of(key)], dtype=torch.long)

    def _keep_input(self, _module, args) -> None:
        self._h = args[0]

    def _add_memory(self, _module, _args, out: torch.Tensor) -> torch.Tensor:
        h, self._h = self._h, None
        if self.row_slots is None or h is None or not bool((self.row_slots != NO_SLOT).any()):
            return out
        batch, length = out.shape[0], out.shape[1]
        rows = self.row_slots.expand(batch) if self.row_slots.numel() == 1 else self.row_slots
        if rows.numel() != batch:
            raise RuntimeError(f"memory rows: {rows.numel()} slots given for a batch of {batch}")
        token_slots = rows.repeat_interleave(length)
        flat = self.memory(h.reshape(batch * length, -1), out.reshape(batch * length, -1), token_slots)
        return flat.view_as(out)

    def remove(self) -> None:
        """Take the hooks out: the model is the plain model again."""
        for handle in self._handles:
            handle.remove()
