"""Adapters come and go at run time: removing the last one leaves the base serving, and a re-added
version answers as before (transformers engine in-process; vLLM's is measured by
loadtests/bench_adapter_cycles.py and exercised through the gateway in test_api.py)."""

from __future__ import annotations

import asyncio

from service.engines.protocol import AdapterRef, GenerationRequest, SamplingConfig
from service.engines.transformers_engine import TransformersEngine
from service.settings import Settings


async def _answer(engine, prompt: str, adapter: AdapterRef | None) -> list[int]:
    ids = engine.tokenizer(prompt)["input_ids"]
    tokens = []
    request = GenerationRequest("t", ids, SamplingConfig(max_tokens=4, temperature=0), adapter)
    async for event in engine.generate(request):
        tokens += event.deltas[0].token_ids
    return tokens


def test_remove_last_adapter_and_add_again(kit_dir):
    async def scenario():
        engine = TransformersEngine(str(kit_dir / "base-v1"), Settings())
        await engine.start()
        prompt = "Review: good great kind\nSentiment:"
        patch = AdapterRef("sentiment@1", str(kit_dir / "patches" / "sentiment"))
        base_before = await _answer(engine, prompt, None)
        patched = await _answer(engine, prompt, patch)
        await engine.remove_adapter(patch.name)
        assert engine.adapters() == []
        assert await _answer(engine, prompt, None) == base_before
        again = AdapterRef("sentiment@2", patch.path)
        assert await _answer(engine, prompt, again) == patched != base_before
        await engine.stop()

    asyncio.run(scenario())
