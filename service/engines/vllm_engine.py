"""The production engine: vLLM v1's AsyncLLM in this process, LoRA enabled, adapters added at run time.

A KV policy maps to vLLM's `kv_cache_dtype` at start (service/kv/vllm_mapping.py refuses what vLLM would not
honour on this machine). A new dtype needs a new engine: `apply_kv_policy` starts one beside the old, loads
every resident adapter into it, moves new requests to it, lets the old one finish what it holds, then stops
it — no request is dropped (memory: two KV caches while both run).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from service import metrics
from service.engines.kv_report import kv_figures
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
from service.kv import vllm_mapping
from service.kv.policy import IDENTITY, KVPolicy, KVPolicyRefused
from service.settings import Settings

log = logging.getLogger("patchserve.engine")


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
        self._memories: dict[str, str] = {}  # loaded memory key → its file (a KV swap reloads them)
        self.memory_layer: int | None = None
        self.kv_policy = IDENTITY
        self._kv_dtype = "auto"
        self._draining: list = []  # engines replaced by a KV change, finishing their requests
        self._swap = asyncio.Lock()

    @property
    def tokenizer(self):
        return self._tokenizer

    async def start(self) -> None:
        from transformers import AutoTokenizer

        self._llm = self._new_llm(self._kv_dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self._memory_args():
            self.memory_layer = (await self._llm.collective_rpc("patchserve_memory_layer"))[0]

    def _new_llm(self, kv_cache_dtype: str):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM's CPU-side LoRA cache holds max_loras adapters unless told otherwise: with more resident
        # versions (every alias's active and previous one) it would evict versions the adapter pool counts
        # as loaded, and reload them from disk inside an engine step when a request names one.
        max_cpu_loras = max(self.settings.max_loras, self.settings.max_cpu_loras)
        # vLLM's CPU backend otherwise reserves 92 % of the NUMA node's memory for its cache, and refuses to
        # start beside anything else; its engine processes read this at spawn. (`serve` sets it too, earlier.)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.vllm_kv_cache_gib))
        memory_args = self._memory_args()
        args = AsyncEngineArgs(
            model=self.model_dir, dtype="float32", enforce_eager=True, enable_lora=True,
            max_lora_rank=self.settings.max_lora_rank, max_loras=self.settings.max_loras,
            max_cpu_loras=max_cpu_loras, max_model_len=self.max_model_len, seed=0, disable_log_stats=True,
            use_tqdm_on_load=False, kv_cache_dtype=kv_cache_dtype, **memory_args,
        )
        return AsyncLLM.from_engine_args(args)

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
        for llm in [*self._draining, self._llm]:
            if llm is not None:
                llm.shutdown()
        self._draining = []
        self._llm = None

    # -- KV policies ----------------------------------------------------------------------------------
    def kv_capabilities(self) -> dict:
        """What this replica can apply (announced in its heartbeat; the policy job checks it)."""
        return {**vllm_mapping.capabilities(), "model_dtype": "float32"}

    def initial_kv_policy(self, policy: KVPolicy) -> None:
        """The policy to start with (before `start`); KVPolicyRefused if vLLM cannot honour it here."""
        self._kv_dtype = vllm_mapping.kv_cache_dtype(policy)
        self.kv_policy = policy

    async def check_kv_policy(self, policy: KVPolicy) -> None:
        """An alias's own policy: vLLM has one cache for every alias, so only the default is accepted."""
        if not policy.is_identity and policy != self.kv_policy:
            raise KVPolicyRefused("vLLM has one KV cache for every alias: set the policy on the base (the deployment)")

    async def apply_kv_policy(self, policy: KVPolicy) -> None:
        """Serve with `policy` from now on: a new engine when its dtype differs (old requests finish on the old)."""
        dtype = vllm_mapping.kv_cache_dtype(policy)
        async with self._swap:
            if dtype == self._kv_dtype or self._llm is None:
                self._kv_dtype, self.kv_policy = dtype, policy
                return
            started = time.perf_counter()
            new = await asyncio.to_thread(self._new_llm, dtype)
            try:
                for request in self._adapters.values():
                    await new.add_lora(request)
                for key, path in self._memories.items():
                    await new.collective_rpc("patchserve_memory_load", args=(key, path))
            except BaseException:
                new.shutdown()
                raise
            old, self._llm = self._llm, new  # requests admitted from here on run on the new engine
            self._kv_dtype, self.kv_policy = dtype, policy
            self._draining.append(old)
        log.info("vLLM engine replaced for a KV policy", extra={"fields": {
            "kv_cache_dtype": dtype, "seconds": round(time.perf_counter() - started, 1)}})
        await self._retire(old)

    async def _retire(self, old, timeout_s: float = 600.0) -> None:
        """Stop a replaced engine once the requests it holds are finished (or after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while old.output_processor.get_num_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        old.shutdown()
        self._draining.remove(old)

    def kv_report(self, policy: KVPolicy) -> dict:
        """vLLM's figures for the policy it serves: its dtype's bytes per token and its block pool's tokens."""
        config = self._llm.vllm_config if self._llm is not None else None
        full = _bytes_per_token(config, "auto") if config else None
        if config is None or full is None:
            return kv_figures(None, 0, 0)
        held = _bytes_per_token(config, self._kv_dtype)
        figures = kv_figures(held, full, int(self.settings.vllm_kv_cache_gib * (1 << 30)))
        cache = config.cache_config
        if cache.num_gpu_blocks:
            figures["capacity_tokens"] = cache.num_gpu_blocks * cache.block_size
        return figures

    async def add_adapter(self, adapter: AdapterRef) -> None:
        from vllm.lora.request import LoRARequest

        if adapter.name in self._adapters:
            return
        async with self._swap:  # never between a KV change's new engine and its switch: it would miss it
            if adapter.name in self._adapters:
                return
            request = LoRARequest(adapter.name, next(self._lora_ids), adapter.path)
            started = time.perf_counter()
            await self._llm.add_lora(request)
            metrics.adapter_operation_duration.labels(self.name, "load").observe(time.perf_counter() - started)
            self._adapters[adapter.name] = request

    async def remove_adapter(self, name: str) -> None:
        async with self._swap:
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
        async with self._swap:  # as adapters: never between a KV change's new engine and its switch
            if memory.key in self._memories:
                return
            started = time.perf_counter()
            await self._llm.collective_rpc("patchserve_memory_load", args=(memory.key, memory.path))
            metrics.adapter_operation_duration.labels(self.name, "memory_load").observe(time.perf_counter() - started)
            self._memories[memory.key] = memory.path

    async def remove_memory(self, key: str) -> None:
        async with self._swap:
            if self._memories.pop(key, None) is None:
                return
            await self._llm.collective_rpc("patchserve_memory_free", args=(key,))

    def memories(self) -> list[str]:
        return sorted(self._memories)

    async def memory_stats(self) -> dict[str, dict[str, int]]:
        if self.memory_layer is None:
            return {}
        return (await self._llm.collective_rpc("patchserve_memory_stats"))[0]

    def running(self) -> int:
        # vLLM's own count: an aborted request leaves it at once, whatever our generators do.
        return sum(llm.output_processor.get_num_unfinished_requests() for llm in [*self._draining, self._llm] if llm)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
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
        except (ValueError, VLLMValidationError) as exc:  # vLLM's own checks of the settings (0.32: not a ValueError)
            raise RequestRefused(str(exc)) from None
        lora = None
        if request.adapter is not None:
            await self.add_adapter(request.adapter)  # no-op when resident
            lora = self._adapters[request.adapter.name]
        # A memory changes layer L's output and so every later layer's keys and values: cached prefix
        # blocks are kept apart per memory version (the salt), as vLLM keeps them apart per LoRA.
        stream = self._llm.generate(tokens_input(request.prompt_token_ids, cache_salt=memory), params,
                                    request.request_id, lora_request=lora)  # bound to this moment's engine
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


def _bytes_per_token(config, kv_cache_dtype: str) -> int | None:
    """Bytes one token takes in vLLM's cache: keys and values of every layer in `kv_cache_dtype`."""
    model = config.model_config
    try:
        layers = model.get_num_layers(config.parallel_config)
        heads = model.get_num_kv_heads(config.parallel_config)
        head_dim = model.get_head_size()
    except Exception:  # a model config vLLM describes otherwise: no figure rather than a wrong one
        return None
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
    size = getattr(model.dtype, "itemsize", 4) if kv_cache_dtype == "auto" else sizes.get(kv_cache_dtype, 4)
    return 2 * layers * heads * head_dim * size
