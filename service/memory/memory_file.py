"""A memory version on disk: one safetensors file with ΔW and, in its header, the layer and the threshold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FILE_NAME = "memory.safetensors"


@dataclass(frozen=True)
class MemoryWeights:
    delta: torch.Tensor  # ΔW = W' − W of the layer's down_proj: (hidden, intermediate)
    threshold: float  # ε: a token whose ‖ΔW·h‖ reaches it is served by the side memory
    layer: int  # the decoder layer whose down_proj it sits beside


def write(directory: Path, weights: MemoryWeights) -> Path:
    """Write `weights` as `directory/memory.safetensors`; returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    save_file({"delta": weights.delta.detach().float().contiguous()}, str(path),
              metadata={"threshold": repr(float(weights.threshold)), "layer": str(int(weights.layer))})
    return path


def read(path: Path | str) -> MemoryWeights:
    """Read a memory file (a directory holding one, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        delta = f.get_tensor("delta")
    try:
        return MemoryWeights(delta=delta, threshold=float(meta["threshold"]), layer=int(meta["layer"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a memory file (header: {exc})") from None
