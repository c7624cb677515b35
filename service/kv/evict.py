"""Which prompt tokens a compressed cache keeps at prefill: a score per (row, head, token), then the top ones.

Every method keeps the attention sinks (the first tokens) and the last `WINDOW` prompt tokens (the question
that usually ends a prompt, and SnapKV's observation window), then fills the budget by its score:
- streaming (StreamingLLM): recency alone;
- snapkv (SnapKV): attention the window's queries pay to each key, summed and pooled over neighbours;
- expected_attention (kvpress's ExpectedAttention): the attention future queries are expected to pay, from the
  prompt queries' mean and covariance rotated to the next positions, scaled by the value's norm.
Scores are per KV head, so heads keep different tokens (the same number of each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WINDOW = 8  # last prompt tokens always kept; SnapKV's observation window
POOL = 5  # SnapKV pools scores over neighbouring tokens: a kept token brings its neighbours
FUTURE = 32  # ExpectedAttention: positions of future queries the rotation is averaged over


@dataclass
class QueryInfo:
    """What a layer's prompt queries tell eviction, taken by the tap (cache.py) before attention runs."""

    window: torch.Tensor | None = None  # [B, Hq, W, D] the last queries, after RoPE (snapkv)
    mean: torch.Tensor | None = None  # [B, Hq, D] expected future query (expected_attention)
    cov: torch.Tensor | None = None  # [B, Hq, D, D]


def keep_count(length: int, budget: float, sinks: int) -> int:
    """Tokens kept of a `length`-token prompt at `budget`: never fewer than the sinks and the window."""
    return min(length, max(sinks + WINDOW, round(budget * length)))


def select(scores: torch.Tensor, keep: int, sinks: int) -> torch.Tensor:
    """Indices [B, H, keep], ascending, of the best-scoring tokens; sinks and the last WINDOW always in."""
    scores = scores.float().clone()
    scores[..., :sinks] = math.inf
    scores[..., -WINDOW:] = math.inf
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def streaming_scores(keys: torch.Tensor) -> torch.Tensor:
    """Recency: a later token scores higher."""
    b, h, t, _ = keys.shape
    return torch.arange(t, dtype=torch.float32, device=keys.device).expand(b, h, t)


def snapkv_scores(window: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention of the window's queries [B, Hq, W, D] to the prompt's keys [B, H, T, D], per KV head."""
    b, hq, w, d = window.shape
    h, t = keys.shape[1], keys.shape[2]
    groups = hq // h
    q = window.float().reshape(b, h, groups * w, d)
    logits = q @ keys.float().transpose(-1, -2) / math.sqrt(d)  # [B, H, G*W, T]
    # Causal inside the window: query i of the window sees keys up to its own position.
    pos = torch.arange(t - w, t, device=keys.device).repeat(groups)
    logits = logits.masked_fill(torch.arange(t, device=keys.device)[None, :] > pos[:, None], -math.inf)
    attn = logits.softmax(dim=-1).sum(dim=-2)  # [B, H, T]
    return F.avg_pool1d(attn.reshape(b * h, 1, t), POOL, stride=1, padding=POOL // 2,
                        count_include_pad=False).reshape(b, h, t)


def expected_attention_scores(info: QueryInfo, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """E[softmax(q·k/√d)] under q ~ N(mean, cov), to second order, times ‖v‖ (kvpress's ExpectedAttention)."""
    b, h, t, d = keys.shape
    groups = info.mean.shape[1] // h
    k = keys.float().repeat_interleave(groups, dim=1)  # [B, Hq, T, D]
    logits = torch.einsum("bhd,bhtd->bht", info.mean, k) / math.sqrt(d)
    logits = logits + torch.einsum("bhtd,bhde,bhte->bht", k, info.cov, k) / (2 * d)
    attn = logits.softmax(dim=-1).reshape(b, h, groups, t).mean(dim=2)
    return attn * values.float().norm(dim=-1)


def query_statistics(queries: torch.Tensor, sinks: int, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of pre-RoPE queries [B, Hq, T, D] past the sinks, rotated by the mean future RoPE."""
    q = queries.float()[:, :, sinks:] if queries.shape[2] > sinks + 1 else queries.float()
    mean = q.mean(dim=2)
    centred = q - mean.unsqueeze(2)
    cov = centred.transpose(-1, -2) @ centred / q.shape[2]
    r = rotation.float()
    return mean @ r.T, r @ cov @ r.T


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The RoPE rotation [D, D] averaged over positions whose cos/sin [N, D] are given (rotate-half layout)."""
    d = cos.shape[-1]
    half = d // 2
    swap = torch.zeros(d, d, dtype=cos.dtype, device=cos.device)
    swap[half:, :half] = torch.eye(half)
    swap[:half, half:] = -torch.eye(half)
    eye = torch.eye(d, dtype=cos.dtype, device=cos.device)
    return (cos.unsqueeze(-1) * eye + sin.unsqueeze(-1) * swap).mean(dim=0)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout (Llama's): x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
