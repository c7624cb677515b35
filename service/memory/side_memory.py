"""The side memory inside the forward pass: a few preallocated slots of WISE memories for one FFN layer.

A memory version is a side copy W' of one layer's `down_proj`, kept as its difference ΔW = W' − W
from the main weight, and a threshold ε. For each token, with h the input of `down_proj`:

    d = ΔW·h;  the layer outputs W·h + d  if ‖d‖ ≥ ε  (routed to the side memory),  else W·h.

Routing is decided per token, on that token's own activation, not once per query. A token is
computed once (its keys and values are cached), so a per-query decision would need the whole prompt
before layer L of its first token, which chunked prefill and continuous batching do not give vLLM;
per token, the answer is the same however the scheduler splits a prompt, the engines agree token for
token, and a request's memory is fixed at admission (its slot). The edit job trains the memory the
same way (side output on the answer positions, main output elsewhere), so serving matches training.

`W·h` is whatever the layer computes (a LoRA patch on `down_proj` included): the memory adds to it
and never reads W, so it works on a repacked CPU weight and under any adapter.

Both engines use this module: vLLM inside its model class (service/memory/vllm_model.py), transformers
through a forward hook (service/memory/hf_hook.py). Slots are filled and emptied by the gateway's
memory pool, which frees a slot only after the last request admitted with it finished.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

NO_SLOT = -1


class SlotsFull(RuntimeError):
    """Every slot holds a memory version still in use."""


class SideMemory(nn.Module):
    """`slots` memory versions of one layer (`hidden` × `intermediate` each), addressed by a key like `facts@3`."""

    def __init__(self, hidden: int, intermediate: int, slots: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("deltas", torch.zeros(slots, hidden, intermediate, dtype=dtype), persistent=False)
        self.register_buffer("thresholds", torch.full((slots,), float("inf")), persistent=False)
        self.keys: list[str | None] = [None] * slots
        self.tokens = Counter()  # key → tokens that passed through its slot
        self.routed = Counter()  # key → tokens routed to its side memory

    def slot_of(self, key: str | None) -> int:
        """The slot holding `key`, or NO_SLOT (no memory, or not loaded: the request is served without one)."""
        if key is None:
            return NO_SLOT
        try:
            return self.keys.index(key)
        except ValueError:
            return NO_SLOT

    def load(self, key: str, delta: torch.Tensor, threshold: float) -> int:
        """Put a memory version into a free slot (or the one already holding `key`); returns the slot."""
        if tuple(delta.shape) != tuple(self.deltas.shape[1:]):
            raise ValueError(f"memory {key}: ΔW of shape {tuple(delta.shape)}, this layer takes "
                             f"{tuple(self.deltas.shape[1:])}")
        slot = self.slot_of(key)
        if slot == NO_SLOT:
            if None not in self.keys:
                raise SlotsFull(f"all {len(self.keys)} memory slots are in use")
            slot = self.keys.index(None)
        with torch.no_grad():
            self.deltas[slot].copy_(delta.to(self.deltas.dtype))
            self.thresholds[slot] = float(threshold)
        self.keys[slot] = key
        return slot

    def free(self, key: str) -> None:
        """Empty the slot of `key` (no-op when it is not loaded)."""
        slot = self.slot_of(key)
        if slot != NO_SLOT:
            self.keys[slot] = None
            with torch.no_grad():
                self.deltas[slot].zero_()
                self.thresholds[slot] = float("inf")

    def loaded(self) -> list[str]:
        return [k for k in self.keys if k is not None]

    def forward(self, h: torch.Tensor, out: torch.Tensor, token_slots: torch.Tensor | int) -> torch.Tensor:
        """`out` (the layer's output for inputs `h`, tokens flattened) with each token's memory added where routed.

        `token_slots` gives each token's slot (NO_SLOT: none), or is one slot for every token — the common
        case (one memory on the base), which skips the grouping: this runs at every step of every request,
        and on a small model its per-call overhead was a measurable share of decode time. Otherwise tokens
        are grouped by slot, so a batch that mixes memory versions costs one small matmul per version present.
        """
        if isinstance(token_slots, int):
            return out if token_slots == NO_SLOT else self._add(h, out, token_slots)
        if not bool((token_slots != NO_SLOT).any()):
            return out
        out = out.clone()
        for slot in torch.unique(token_slots[token_slots != NO_SLOT]).tolist():
            rows = torch.nonzero(token_slots == slot, as_tuple=True)[0]
            out[rows] = self._add(h[rows], out[rows], slot)
        return out

    def _add(self, h: torch.Tensor, out: torch.Tensor, slot: int) -> torch.Tensor:
        """`out` plus slot `slot`'s ΔW·h on the tokens whose ‖ΔW·h‖ reaches its threshold (all tokens in `slot`)."""
        d = h @ self.deltas[slot].T
        routed = torch.linalg.vector_norm(d, dim=-1) >= self.thresholds[slot]
        key = self.keys[slot]
        self.tokens[key] += len(routed)
        self.routed[key] += int(routed.sum())
        return out + d.to(out.dtype) * routed.unsqueeze(-1)
