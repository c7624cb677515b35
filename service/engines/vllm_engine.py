"""The production engine: vLLM v1's AsyncLLM in this process, LoRA enabled, adapters added at run time."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from service import metrics
from service.engines.protocol import (
    AdapterRef,
    EngineHooks,
    GenerationEvent,
    GenerationRequest,
    MemoryRef,
    OutputDelta,
    RequestRefused,
    TokenLogprob,
)
from service.settings import Settings


class VLLMEngine:
    """One base model on vLLM; each adapter is a LoRARequest with an id that is never reused."""

    name = "vllm"

    def __init__(self, model_dir: str, settings: Settings, hooks: EngineHooks | None = None):
        self.model_dir = model_dir
        self.settings = settings
        self.max_model_len = settings.max_model_len
        # vLLM runs its forward pass in the engine-core process: the side memory reaches it through
        # a registered model class and a worker extension (service/memory/), never through these hooks.
        self.hooks = hooks or EngineHooks()
        self._llm = None
        self._tokenizer = None
        self._lora_ids = itertools.count(1)
        self._adapters: dict[str, object] = {}  # engine name → LoRARequest
        self._memories: set[str] = set()
        self.memory_layer: int | None = None

    @property
    def tokenizer(self):
        return self._tokenizer

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM's CPU-side LoRA cache holds max_loras adapters unless told otherwise: with more resident
        # versions (every alias's active and previous one) it would evict versions the adapter pool counts
        # as loaded, and reload them from disk inside an engine step when a request names one.
        max_cpu_loras = max(self.settings.max_loras, self.settings.max_cpu_loras)
        memory_args = self._memory_args()
        args = AsyncEngineArgs(
            model=self.model_dir, dtype="float32", enforce_eager=True, enable_lora=True,
            max_lora_rank=self.settings.max_lora_rank, max_loras=self.settings.max_loras,
            max_cpu_loras=max_cpu_loras, max_model_len=self.max_model_len, seed=0, disable_log_stats=True,
            use_tqdm_on_load=False, **memory_args,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if memory_args:
            self.memory_layer = (await self._llm.collective_rpc("patchserve_memory_layer"))[0]

    def _memory_args(self) -> dict:
        """Engine arguments that load the memory model class (a stock Llama checkpoint only); {} without memories."""
        from transformers import AutoConfig

        from service.memory.vllm_plugin import ARCHITECTURE

        config = AutoConfig.from_pretrained(self.model_dir)
        if self.settings.memory_slots <= 0 or list(getattr(config, "architectures", None) or []) != [
                "LlamaForCausalLM"]:
            return {}
        return {"hf_overrides": {"architectures": [ARCHITECTURE], "patchserve_memory_layer": self.settings.memory_layer,
                                 "patchserve_memory_slots": self.settings.memory_slots},
                "worker_extension_cls": "service.memory.vllm_worker.MemoryWorkerExtension"}

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def add_adapter(self, adapter: AdapterRef) -> None:
        from vllm.lora.request import LoRARequest

        if adapter.name in self._adapters:
            return
        request = LoRARequest(adapter.name, next(self._lora_ids), adapter.path)
        started = time.perf_counter()
        await self._llm.add_lora(request)
        metrics.adapter_operation_duration.labels(self.name, "load").observe(time.perf_counter() - started)
        self._adapters[adapter.name] = request

    async def remove_adapter(self, name: str) -> None:
        request = self._adapters.pop(name, None)
        if request is None:
            return
        started = time.perf_counter()
        await self._llm.remove_lora(request.lora_int_id)
        metrics.adapter_operation_duration.labels(self.name, "unload").observe(time.perf_counter() - started)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def add_memory(self, memory: MemoryRef) -> None:
        if memory.key in self._memories:
            return
        if self.memory_layer is None:
            raise RuntimeError("this engine holds no side memories (memory slots 0, or not a Llama checkpoint)")
        started = time.perf_counter()
        await self._llm.collective_rpc("patchserve_memory_load", args=(memory.key, memory.path))
        metrics.adapter_operation_duration.labels(self.name, "memory_load").observe(time.perf_counter() - started)
        self._memories.add(memory.key)

    async def remove_memory(self, key: str) -> None:
        if key not in self._memories:
            return
        await self._llm.collective_rpc("patchserve_memory_free", args=(key,))
        self._memories.discard(key)

    def memories(self) -> list[str]:
        return sorted(self._memories)

    async def memory_stats(self) -> dict[str, dict[str, int]]:
        if self.memory_layer is None:
            return {}
        return (await self._llm.collective_rpc("patchserve_memory_stats"))[0]

    def running(self) -> int:
        # vLLM's own count: an aborted request leaves it at once, whatever our generators do.
        return self._llm.output_processor.get_num_unfinished_requests() if self._llm else 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        from service.memory.vllm_plugin import EXTRA_ARG

        s = request.sampling
        memory = request.memory.key if request.memory else None
        try:
            params = SamplingParams(
                n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                stop=list(s.stop) or None, logprobs=s.logprobs, ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA, extra_args={EXTRA_ARG: memory} if memory else None,
            )
        except ValueError as exc:  # vLLM's VLLMValidationError is one: its own checks of the settings
            raise RequestRefused(str(exc)) from None
        lora = None
        if request.adapter is not None:
            await self.add_adapter(request.adapter)  # no-op when resident
            lora = self._adapters[request.adapter.name]
        # A memory changes layer L's output and so every later layer's keys and values: cached prefix
        # blocks are kept apart per memory version (the salt), as vLLM keeps them apart per LoRA.
        prompt = tokens_input(request.prompt_token_ids, cache_salt=memory)
        stream = self._llm.generate(prompt, params, request.request_id, lora_request=lora)
        # Closing this generator (client gone) closes vLLM's at once, which aborts the request there.
        async with aclosing(stream):
            async for out in stream:
                deltas = [
                    OutputDelta(index=o.index, text=o.text, token_ids=list(o.token_ids),
                                logprobs=self._logprobs(o.token_ids, o.logprobs) if s.logprobs is not None else None,
                                finish_reason=o.finish_reason)
                    for o in out.outputs
                ]
                yield GenerationEvent(deltas=deltas, prompt_tokens=len(request.prompt_token_ids),
                                      finished=out.finished)

    def _logprobs(self, token_ids, logprobs) -> list[TokenLogprob]:
        result = []
        decode = lambda tid: self._tokenizer.decode([tid])  # noqa: E731 — text, as OpenAI reports tokens
        for token_id, candidates in zip(token_ids, logprobs or []):
            chosen = candidates[token_id]
            top = {decode(tid): lp.logprob for tid, lp in candidates.items()}
            result.append(TokenLogprob(token=decode(token_id), logprob=chosen.logprob, top=top))
        return result
