"""Engines: one protocol (protocol.py), two implementations chosen by settings.engine."""

from __future__ import annotations

import importlib.util

from service.engines.protocol import Engine, EngineHooks
from service.settings import Settings


def engine_kind(settings: Settings) -> str:
    """`vllm` when asked for or, on `auto`, when vLLM is importable; else `transformers`."""
    if settings.engine != "auto":
        return settings.engine
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def create_engine(settings: Settings, model_dir: str, hooks: EngineHooks | None = None) -> Engine:
    """The configured engine for the base model at `model_dir` (not started yet)."""
    if engine_kind(settings) == "vllm":
        from service.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, settings, hooks)
    from service.engines.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir, settings, hooks)
