"""vLLM plugin (entry point `vllm.general_plugins`): registers the memory model class in every vLLM process."""

from __future__ import annotations

ARCHITECTURE = "PatchserveLlamaForCausalLM"  # what `hf_overrides` names to load the memory model
EXTRA_ARG = "patchserve_memory"  # SamplingParams.extra_args key naming a request's memory version


def register() -> None:
    """Called by vLLM in each of its processes; idempotent, and imports no vLLM model code until needed."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "service.memory.vllm_model:PatchserveLlamaForCausalLM")
