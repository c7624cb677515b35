"""A KV policy: how an engine keeps the KV cache (quantised, evicted, or both), validated once, here.

The same record is stored in the registry (a plain dict), proposed through the admin API and applied by the
engines; `KVPolicy.from_dict` is the one place a stored or proposed dict becomes a policy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

QUANTS = ("none", "fp16", "bf16", "fp8", "int8", "int4", "int2")
EVICTIONS = ("none", "streaming", "snapkv", "expected_attention")
BITS = {"fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}
GROUPS = (8, 16, 32, 64, 128)


class KVPolicyInvalid(ValueError):
    """A policy that is malformed in itself (the API answers 422 with the message)."""


class KVPolicyRefused(ValueError):
    """A well-formed policy this engine, model or machine cannot apply (never applied silently wrong)."""


@dataclass(frozen=True)
class KVPolicy:
    """How the KV cache is kept. The default keeps it as the model computes it (nothing compressed).

    quant: storage of keys and values. int8/int4/int2: keys quantised per channel over `group` tokens,
      values per token over `group` channels (KIVI), min/zero-point and scale in fp16; fp8: e4m3, unscaled
      (as vLLM's fp8 cache); fp16/bf16: a cast.
    group: tokens (keys) and channels (values) sharing one scale.
    residual: the most recent tokens kept at 16 bits (KIVI's window; keys are flushed a group at a time).
    rotate: a Hadamard rotation of keys and values before quantising (RotateKV): outliers spread over channels.
    sinks: the first tokens, always kept and at 16 bits (StreamingLLM's attention sinks). "16 bits": the model's
      dtype where it is 16-bit, fp16 for an fp32 model (bf16 under a bf16 policy).
    evict: which prompt tokens are dropped at prefill: streaming (sinks + most recent), snapkv (attention of
      the prompt's last queries), expected_attention (attention expected of future queries; kvpress).
    budget: the share of the prompt's tokens kept when evicting (0.5: 50 % eviction).
    """

    quant: str = "none"
    group: int = 32
    residual: int = 32
    rotate: bool = False
    sinks: int = 4
    evict: str = "none"
    budget: float = 1.0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise KVPolicyInvalid("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the policy in itself (empty: nothing)."""
        out = []
        if self.quant not in QUANTS:
            out.append(f"quant {self.quant!r} is not one of {', '.join(QUANTS)}")
        if self.evict not in EVICTIONS:
            out.append(f"evict {self.evict!r} is not one of {', '.join(EVICTIONS)}")
        if self.group not in GROUPS:
            out.append(f"group {self.group} is not one of {', '.join(map(str, GROUPS))}")
        if not 0 <= self.residual <= 4096:
            out.append(f"residual {self.residual} is not between 0 and 4096 tokens")
        if not 0 <= self.sinks <= 64:
            out.append(f"sinks {self.sinks} is not between 0 and 64 tokens")
        if not 0 < self.budget <= 1:
            out.append(f"budget {self.budget} is not a share of the prompt in (0, 1]")
        if self.evict == "none" and self.budget != 1:
            out.append("budget < 1 needs an eviction method (evict: streaming, snapkv or expected_attention)")
        if self.evict != "none" and self.budget == 1:
            out.append(f"evict {self.evict} with budget 1 evicts nothing: give a budget < 1")
        if self.rotate and self.quant not in ("fp8", "int8", "int4", "int2"):
            out.append("rotate applies to quantised caches (quant fp8, int8, int4 or int2)")
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> KVPolicy:
        """A policy from a stored or proposed dict (unknown fields refused); None or {} is the default."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise KVPolicyInvalid(f"unknown policy field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        """True when the cache is kept exactly as the model computes it."""
        return self.quant == "none" and self.evict == "none"

    @property
    def quantised(self) -> bool:
        return self.quant in ("fp8", "int8", "int4", "int2")

    def describe(self) -> str:
        """A short label: 'int4 g32 r32 +rot sinks4 snapkv@0.5', 'none'."""
        if self.is_identity:
            return "none"
        parts = []
        if self.quant != "none":
            parts.append(self.quant)
            if self.quant.startswith("int"):
                parts.append(f"g{self.group}")
            if self.quantised:
                parts.append(f"r{self.residual}")
            if self.rotate:
                parts.append("rot")
        if self.evict != "none":
            parts.append(f"{self.evict}@{self.budget:g}")
        if self.sinks and (self.quantised or self.evict != "none"):
            parts.append(f"sinks{self.sinks}")
        return " ".join(parts)

    def ideal_ratio(self, model_bits: int = 16) -> float:
        """Bytes of a `model_bits` cache over this policy's, ignoring windows and sinks: 16/(b + 32/g)/budget."""
        bits = BITS.get(self.quant, model_bits)
        overhead = 32 / self.group if self.quant.startswith("int") else 0
        return model_bits / (bits + overhead) / self.budget


IDENTITY = KVPolicy()
