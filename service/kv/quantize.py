"""Quantisers of the compressed cache: integer codes packed into bytes, fp16 scales and zero points, fp8, a Hadamard.

Keys are quantised per channel over a group of tokens and values per token over a group of channels (KIVI:
keys have outlier channels, values do not). Scales and zero points are stored in fp16 and the codes are
computed against the fp16-rounded values, so dequantising gives back exactly what was quantised against.

transformers' own QuantizedCache (quanto / HQQ backends) was tried and does not fit: quanto's per-channel keys
need the group to divide the length (short prompts fail), HQQ at 2 bits needs token counts divisible by 4, and
every flush re-quantises the whole history. These are a few tensor operations instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


@dataclass
class Codes:
    """Integer codes packed `8 // bits` to a byte along the last dimension, with fp16 scale and zero point."""

    packed: torch.Tensor  # uint8 [..., n * bits / 8]
    scale: torch.Tensor  # fp16: [B, H, groups, D] for keys, [B, H, T, D / group] for values
    zero: torch.Tensor  # fp16, as scale
    bits: int
    counts: torch.Tensor | None = None  # keys: tokens in each group (a prompt's last group may be short)

    def nbytes(self) -> int:
        """Bytes held: codes, scales and zero points (the group sizes are bookkeeping, one integer a group)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def append(self, other: Codes) -> Codes:
        """These tokens followed by `other`'s (along the token dimension)."""
        counts = None if self.counts is None else torch.cat([self.counts, other.counts])
        return Codes(torch.cat([self.packed, other.packed], dim=2), torch.cat([self.scale, other.scale], dim=2),
                     torch.cat([self.zero, other.zero], dim=2), self.bits, counts)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits along the last dimension → bytes holding 8 // bits codes each."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.to(torch.uint8)
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes, `8 // bits` per byte, along the last dimension."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], -1)


def _affine(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale fp16, zero fp16) quantising `x` asymmetrically with min/max taken along `dim`."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    zero = lo.to(torch.float16)
    scale = ((hi - lo) / levels).clamp_min(1e-6).to(torch.float16)
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels)
    return codes, scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> Codes:
    """Keys [B, H, T, D]: one scale per channel and group of `group` tokens (the last group may be shorter)."""
    b, h, t, d = k.shape
    groups = -(-t // group)
    pad = groups * group - t
    x = k.float()
    if pad:  # repeating the last token changes no group's min or max
        x = torch.cat([x, x[:, :, -1:].expand(b, h, pad, d)], dim=2)
    codes, scale, zero = _affine(x.reshape(b, h, groups, group, d), dim=3, bits=bits)
    codes = codes.reshape(b, h, groups * group, d)[:, :, :t]
    counts = torch.full((groups,), group, dtype=torch.long, device=k.device)
    counts[-1] = group - pad
    return Codes(pack(codes, bits), scale.squeeze(3), zero.squeeze(3), bits, counts)


def dequantize_keys(c: Codes, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(c.packed, c.bits).float()
    scale = c.scale.float().repeat_interleave(c.counts, dim=2)
    zero = c.zero.float().repeat_interleave(c.counts, dim=2)
    return (codes * scale + zero).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Codes:
    """Values [B, H, T, D]: one scale per token and group of `group` channels (D a multiple of it)."""
    b, h, t, d = v.shape
    x = v.float().reshape(b, h, t, d // group, group)
    codes, scale, zero = _affine(x, dim=4, bits=bits)
    return Codes(pack(codes.reshape(b, h, t, d), bits), scale.squeeze(4), zero.squeeze(4), bits)


def dequantize_values(c: Codes, group: int, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(c.packed, c.bits).float()
    b, h, t, d = codes.shape
    x = codes.reshape(b, h, t, d // group, group) * c.scale.float().unsqueeze(4) + c.zero.float().unsqueeze(4)
    return x.reshape(b, h, t, d).to(dtype)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """e4m3 without a scale, as vLLM's fp8 cache keeps it; saturates instead of overflowing to NaN."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


@lru_cache(maxsize=8)
def hadamard(d: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order `d` (a power of two): symmetric, its own inverse."""
    if d & (d - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head size, not {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)
