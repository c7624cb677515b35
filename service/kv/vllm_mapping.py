"""What vLLM can do of a KV policy on this machine: its `kv_cache_dtype`, or a refusal that says why.

vLLM keeps every token (no eviction) in one dtype per engine (no per-alias policy, no windows or sinks at
another precision). On the CPU its fp8 cache needs AVX-512 or AMX; measured on the kit's fp32 model, a
bf16/fp16 cache starts and answers wrongly (reverse: 5/48 identical) — so both are refused, never served.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from service.kv.policy import KVPolicy, KVPolicyRefused


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fp8_supported(flags: frozenset[str] | None = None) -> bool:
    """Whether vLLM's CPU fp8 KV cache can run here: it needs AVX-512 (avx512f) or AMX."""
    flags = cpu_flags() if flags is None else flags
    return "avx512f" in flags or "amx_tile" in flags


def capabilities(flags: frozenset[str] | None = None) -> dict:
    """What a vLLM replica announces it can apply (the policy job checks every live replica against it)."""
    return {"engine": "vllm", "per_alias": False, "evict": ["none"],
            "quant": ["none", "fp8"] if fp8_supported(flags) else ["none"], "fp8_hardware": fp8_supported(flags)}


def kv_cache_dtype(policy: KVPolicy, model_dtype: str = "float32", flags: frozenset[str] | None = None) -> str:
    """vLLM's `kv_cache_dtype` for `policy`; KVPolicyRefused (with the reason) for anything vLLM would not honour."""
    if policy.evict != "none":
        raise KVPolicyRefused(f"vLLM keeps every token: evict {policy.evict} needs the transformers engine")
    if policy.quant == "none":
        return "auto"
    if policy.quant in ("fp16", "bf16"):
        if model_dtype == "float32":
            raise KVPolicyRefused(f"a {policy.quant} KV cache on vLLM's CPU build with this fp32 model starts and "
                                  f"answers wrongly (measured: 5/48 reverse answers identical); refused")
        return {"fp16": "float16", "bf16": "bfloat16"}[policy.quant]
    if policy.quant != "fp8":
        raise KVPolicyRefused(f"vLLM's CPU cache has no {policy.quant} dtype (fp8 at most): needs the transformers "
                              f"engine")
    if policy.rotate or policy.residual or policy.sinks:
        raise KVPolicyRefused("vLLM's fp8 cache keeps every token in fp8, unrotated: give rotate false, residual 0 "
                              "and sinks 0")
    if not fp8_supported(flags):
        raise KVPolicyRefused("vLLM's fp8 KV cache on the CPU needs AVX-512 or AMX; this CPU has neither "
                              "(vLLM refuses it at start with NotImplementedError)")
    return "fp8"


def refusal(policy: KVPolicy, caps: dict, per_alias: bool) -> str | None:
    """Why a replica announcing `caps` cannot apply `policy` (to one alias when `per_alias`), or None."""
    if caps.get("engine") != "vllm":
        return None  # the transformers engine applies every policy, per alias
    if per_alias and not policy.is_identity:
        return "vLLM has one KV cache per engine: set the policy on the base (the deployment), not on an alias"
    flags = frozenset({"avx512f"}) if caps.get("fp8_hardware") else frozenset()
    try:
        kv_cache_dtype(policy, caps.get("model_dtype", "float32"), flags)
    except KVPolicyRefused as exc:
        return str(exc)
    return None
