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
        # vLLM runs its forward pass in the engine-core process; hooks there arrive with the
        # side-memory and KV-compression issues (via vLLM's model-runner extension points).
        self.hooks = hooks or EngineHooks()
        self._llm = None
        self._tokenizer = None
        self._lora_ids = itertools.count(1)
        self._adapters: dict[str, object] = {}  # engine name → LoRARequest

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
        args = AsyncEngineArgs(
            model=self.model_dir, dtype="float32", enforce_eager=True, enable_lora=True,
            max_lora_rank=self.settings.max_lora_rank, max_loras=self.settings.max_loras,
            max_cpu_loras=max_cpu_loras, max_model_len=self.max_model_len, seed=0, disable_log_stats=True,
            use_tqdm_on_load=False,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)

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

    def running(self) -> int:
        # vLLM's own count: an aborted request leaves it at once, whatever our generators do.
        return self._llm.output_processor.get_num_unfinished_requests() if self._llm else 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        try:
            params = SamplingParams(
                n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                stop=list(s.stop) or None, logprobs=s.logprobs, ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:  # vLLM's VLLMValidationError is one: its own checks of the settings
            raise RequestRefused(str(exc)) from None
        lora = None
        if request.adapter is not None:
            await self.add_adapter(request.adapter)  # no-op when resident
            lora = self._adapters[request.adapter.name]
        stream = self._llm.generate(tokens_input(request.prompt_token_ids), params, request.request_id,
                                    lora_request=lora)
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
