"""Quantisers of the compressed cache: integer codes packed into bytes, fp16 scales and zero points, fp8, a Hadamard.

Keys are quantised per channel over a group of tokens and values per token over a group of channels (KIVI:
keys have outlier channels, values do not). Scales and zero points are stored in fp16 and the codes are
computed against the fp16-rounded values, so dequantising gives back exactly what was quantised against.
Dequantising writes straight into the caller's buffer (one fused multiply-add per element), because on a
small model the cache's memory traffic, not the matmuls, decides the decode speed.

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
    """Integer codes packed `8 // bits` to a byte along the channels, with fp16 scale and zero point.

    Keys are stored in whole groups of tokens: a prompt's last, shorter group is padded (with its own last
    token, which changes no min or max) and `tokens` says how many are real.
    """

    packed: torch.Tensor  # uint8 [B, H, T (padded for keys), D * bits / 8]
    scale: torch.Tensor  # fp16: [B, H, groups, D] for keys, [B, H, T, D / group] for values
    zero: torch.Tensor  # fp16, as scale
    bits: int
    tokens: int

    def nbytes(self) -> int:
        """Bytes held: codes (padding included), scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits → bytes; byte j holds channel j of each of the `8 // bits` slices of the channels,
    so unpacking writes whole slices (contiguous) instead of interleaved channels."""
    per_byte = 8 // bits
    c = codes.to(torch.uint8)
    if per_byte == 1:
        return c
    parts = c.chunk(per_byte, dim=-1)
    out = parts[0].clone()
    for i, part in enumerate(parts[1:], start=1):
        out |= part << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes [..., channels]."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask if i else packed & mask for i in range(per_byte)], dim=-1)


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
    """Keys [B, H, T, D]: one scale per channel and group of `group` tokens (the last group may be short)."""
    b, h, t, d = k.shape
    groups = -(-t // group)
    pad = groups * group - t
    x = k.float()
    if pad:
        x = torch.cat([x, x[:, :, -1:].expand(b, h, pad, d)], dim=2)
    codes, scale, zero = _affine(x.reshape(b, h, groups, group, d), dim=3, bits=bits)
    return Codes(pack(codes.reshape(b, h, groups * group, d), bits), scale.squeeze(3), zero.squeeze(3), bits, t)


def _slices(packed: torch.Tensor, bits: int):
    """(channel offset, codes) for each slice of the channels a byte holds: no interleaving, no concatenation."""
    width = packed.shape[-1]
    mask = (1 << bits) - 1
    for i in range(8 // bits):
        shifted = packed >> (bits * i) if i else packed
        yield i * width, shifted if bits * (i + 1) == 8 else shifted & mask


def _affine_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> None:
    """out = codes × scale + zero, `codes` uint8 (broadcast shapes). The codes are first cast into `out` and the
    multiply-add then runs in place in float: a mixed uint8 × float `addcmul` casts the codes into a temporary of
    its own and runs the slower mixed-dtype loop (the kit's shapes, int4 keys: 187–224 against 128–155 µs). A scale
    that is one number per row of `out` (values, a group as wide as the slice) is applied as `mul_` then `add_`:
    `addcmul` broadcasting it along the row took 90 µs, the two in-place ops 25."""
    out.copy_(codes)
    if scale.shape[-1] == 1:
        out.mul_(scale).add_(zero)
    else:
        torch.addcmul(zero, out, scale, out=out)


def dequantize_keys_into(c: Codes, out: torch.Tensor) -> None:
    """Write the keys [B, H, padded T, D] into `out` (a slice of the attention's buffer, padding included)."""
    b, h, t, width = c.packed.shape
    groups = c.scale.shape[2]
    shape = (b, h, groups, t // groups, width)
    scale, zero = c.scale.float().unsqueeze(3), c.zero.float().unsqueeze(3)
    for at, codes in _slices(c.packed, c.bits):
        _affine_into(codes.view(shape), scale[..., at : at + width], zero[..., at : at + width],
                     out[..., at : at + width].view(shape))


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Codes:
    """Values [B, H, T, D]: one scale per token and group of `group` channels (D a multiple of it)."""
    b, h, t, d = v.shape
    codes, scale, zero = _affine(v.float().reshape(b, h, t, d // group, group), dim=4, bits=bits)
    return Codes(pack(codes.reshape(b, h, t, d), bits), scale.squeeze(4), zero.squeeze(4), bits, t)


def dequantize_values_into(c: Codes, out: torch.Tensor) -> None:
    """Write the values [B, H, T, D] into `out`, one byte slice of the channels at a time."""
    b, h, t, width = c.packed.shape
    d = out.shape[-1]
    group = d // c.scale.shape[3]
    scale, zero = c.scale.float().unsqueeze(4), c.zero.float().unsqueeze(4)
    # A slice holds whole groups (width a multiple of the group) or lies inside one (the group a multiple of the
    # width: both are powers of two dividing D); either way its scales broadcast over a view, nothing is unpacked
    # whole (that took a concatenation and was the slowest part of a decode step: 373 of 843 µs a layer).
    if width % group and group % width:  # a head size that is not a power of two: unpack whole
        codes = unpack(c.packed, c.bits).view(b, h, t, d // group, group)
        _affine_into(codes, scale, zero, out.view(b, h, t, d // group, group))
        return
    per, size = (width // group, group) if width >= group else (1, width)
    for at, codes in _slices(c.packed, c.bits):
        g = at // group
        _affine_into(codes.view(b, h, t, per, size), scale[:, :, :, g : g + per], zero[:, :, :, g : g + per],
                     out[..., at : at + width].view(b, h, t, per, size))


def append_values(a: Codes, b: Codes) -> Codes:
    """Values of `a` followed by `b`'s (along the tokens)."""
    return Codes(torch.cat([a.packed, b.packed], dim=2), torch.cat([a.scale, b.scale], dim=2),
                 torch.cat([a.zero, b.zero], dim=2), a.bits, a.tokens + b.tokens)


def dequantize_keys(c: Codes, dtype: torch.dtype) -> torch.Tensor:
    """The keys (real tokens only) in a new tensor."""
    out = torch.empty(*c.packed.shape[:3], c.scale.shape[-1], dtype=torch.float32, device=c.packed.device)
    dequantize_keys_into(c, out)
    return out[:, :, : c.tokens].to(dtype)


def dequantize_values(c: Codes, dtype: torch.dtype) -> torch.Tensor:
    """The values in a new tensor."""
    out = torch.empty(*c.packed.shape[:3], c.packed.shape[-1] * 8 // c.bits, dtype=torch.float32,
                      device=c.packed.device)
    dequantize_values_into(c, out)
    return out.to(dtype)


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
