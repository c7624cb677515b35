"""The KV figures both engines report alike: bytes per token held, the uncompressed rate, tokens in the budget."""

from __future__ import annotations


def kv_figures(bytes_per_token: float | None, full_bytes_per_token: float, budget_bytes: int) -> dict:
    """{bytes_per_token, full_bytes_per_token, ratio, capacity_tokens}; bytes None: not measured yet."""
    held = bytes_per_token if bytes_per_token is not None else None
    return {
        "bytes_per_token": round(held, 1) if held is not None else None,
        "full_bytes_per_token": full_bytes_per_token,
        "ratio": round(full_bytes_per_token / held, 2) if held else None,
        "capacity_tokens": int(budget_bytes // held) if held else None,
    }
