"""The reference engine: transformers + PEFT, several adapters resident, mixed adapters in one batch.

Requests that wait together are decoded together, one forward pass per step over the whole
batch with a KV cache; each row names its adapter (PEFT's `adapter_names`), so one batch can mix
patches and the base. Limit (documented): batching is static — a request that arrives while a
batch runs waits for the next one — and a batch holds prompts of one token length, so no row is
padded and each row computes exactly what it would alone (the token-for-token reference). A batch
also holds one KV policy (service/kv): the policy is part of the batching key, so requests of aliases
under different policies never share a cache.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from service import metrics
from service.engines.kv_report import kv_figures
from service.engines.protocol import (
    AdapterRef,
    EngineHooks,
    GenerationEvent,
    GenerationRequest,
    MemoryRef,
    OutputDelta,
    TokenLogprob,
)
from service.kv.cache import QueryTap, cache_nbytes, compressed_cache, prefill
from service.kv.policy import EVICTIONS, IDENTITY, QUANTS, KVPolicy
from service.settings import Settings

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def post(self, event: GenerationEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    """One output sequence (a request with n=2 has two rows)."""

    job: _Job
    index: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    finish: str | None = None


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: str, settings: Settings, hooks: EngineHooks | None = None,
                 max_batch: int = 32):
        self.model_dir = model_dir
        self.max_model_len = settings.max_model_len
        self.hooks = hooks or EngineHooks()
        self.max_batch = max_batch
        self.model = None
        self._tokenizer = None
        self._pending: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._lock = threading.Lock()  # adapters change only between forward passes
        self._adapters: dict[str, str] = {}
        self._running = 0
        self.settings = settings
        self._memory = None  # service.memory.hf_hook.HFMemory once started (None: no memories)
        self.memory_layer: int | None = None
        self.kv_budget_bytes = int(settings.vllm_kv_cache_gib * (1 << 30))  # the capacity figures' budget
        self.kv_policy = IDENTITY  # the deployment's default (requests carry their own)
        self._kv_bytes: dict[KVPolicy, float] = {}  # policy → KV bytes per token held, last measured

    @property
    def tokenizer(self):
        return self._tokenizer

    async def start(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # logs stay quiet by default
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self._query_tap = QueryTap(self.model)  # on the attention modules, which PEFT keeps when it wraps them
        for hook in self.hooks.forward_pre:
            hook(self.model)
        self._install_memory()
        self._probe_kv(IDENTITY)  # the uncompressed cache's figures, measured like every policy's
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._serve_batches())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            self._worker = None

    async def add_adapter(self, adapter: AdapterRef) -> None:
        if adapter.name in self._adapters:
            return
        started = time.perf_counter()
        await asyncio.to_thread(self._load, adapter)
        metrics.adapter_operation_duration.labels(self.name, "load").observe(time.perf_counter() - started)

    def _load(self, adapter: AdapterRef) -> None:
        from peft import PeftModel

        with self._lock:
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.name).eval()
            else:
                self.model.load_adapter(adapter.path, adapter_name=adapter.name)
            self._adapters[adapter.name] = adapter.path

    async def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            return
        started = time.perf_counter()
        with self._lock:
            if len(self._adapters) == 1:
                # PEFT cannot run with no adapter left: unwrap back to the plain base model.
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self._adapters[name]
        metrics.adapter_operation_duration.labels(self.name, "unload").observe(time.perf_counter() - started)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def _install_memory(self) -> None:
        from service.memory.hf_hook import HFMemory, decoder_layers, default_layer

        if self.settings.memory_slots <= 0:
            return
        try:
            layers = decoder_layers(self.model)
        except ValueError:
            return  # an architecture the memory does not cover: served without memories
        layer = self.settings.memory_layer
        layer = default_layer(len(layers)) if layer is None else layer
        self._memory = HFMemory(self.model, layer, self.settings.memory_slots)
        self.memory_layer = layer

    async def add_memory(self, memory: MemoryRef) -> None:
        from service.memory import memory_file

        if memory.key in self.memories():
            return
        if self._memory is None:
            raise RuntimeError("this engine holds no side memories (memory slots 0, or an architecture without them)")
        started = time.perf_counter()
        weights = await asyncio.to_thread(memory_file.read, memory.path)
        if weights.layer != self.memory_layer:
            raise ValueError(f"memory {memory.key} was trained for layer {weights.layer}; this engine's memory is "
                             f"at layer {self.memory_layer}")
        await asyncio.to_thread(self._locked, self._memory.memory.load, memory.key, weights.delta, weights.threshold)
        metrics.adapter_operation_duration.labels(self.name, "memory_load").observe(time.perf_counter() - started)

    async def remove_memory(self, key: str) -> None:
        if self._memory is not None:
            await asyncio.to_thread(self._locked, self._memory.memory.free, key)

    def _locked(self, change, *args):
        """Run `change` between two forward passes (slots never change during one)."""
        with self._lock:
            return change(*args)

    def memories(self) -> list[str]:
        return sorted(self._memory.memory.loaded()) if self._memory is not None else []

    async def memory_stats(self) -> dict[str, dict[str, int]]:
        if self._memory is None:
            return {}
        m = self._memory.memory
        return {key: {"tokens": m.tokens[key], "routed": m.routed[key]} for key in set(m.tokens) | set(m.loaded())}
    # -- KV policies ----------------------------------------------------------------------------------
    def kv_capabilities(self) -> dict:
        """Every policy, per alias, applied at run time (announced to the policy job)."""
        return {"engine": self.name, "per_alias": True, "quant": list(QUANTS), "evict": list(EVICTIONS)}

    async def check_kv_policy(self, policy: KVPolicy) -> None:
        """Run one prompt under `policy` (KVPolicyRefused if the model cannot take it) and measure its bytes."""
        await asyncio.to_thread(self._probe_kv, policy)

    async def apply_kv_policy(self, policy: KVPolicy) -> None:
        """Make `policy` the deployment's default: here nothing restarts, requests carry their policy."""
        await self.check_kv_policy(policy)
        self.kv_policy = policy

    def kv_report(self, policy: KVPolicy) -> dict:
        """KV bytes per token held under `policy` (its last batch, else a probe) and the tokens the budget holds."""
        return kv_figures(self._kv_bytes.get(policy), self._full_bytes_per_token(), self.kv_budget_bytes)

    @torch.inference_mode()
    def _probe_kv(self, policy: KVPolicy) -> None:
        # A prompt of the evaluation's length (192 tokens): what a compressed cache holds depends on the length.
        ids = torch.full((1, min(192, self.max_model_len - 1)), self._tokenizer.bos_token_id)
        with self._lock:
            cache = compressed_cache(policy, self.model.config)
            extra = {"adapter_names": [BASE]} if self._adapters else {}
            if self._memory is not None:
                self._memory.set_all(None)  # the probe is the base's: no side memory
            out = prefill(self.model, ids, cache, **extra)
        self._measured(policy, out.past_key_values, rows=1)

    def _measured(self, policy: KVPolicy, cache, rows: int) -> None:
        length = cache.get_seq_length() if cache is not None else 0
        if length:
            self._kv_bytes[policy] = cache_nbytes(cache) / (rows * length)

    def _full_bytes_per_token(self) -> int:
        c = self.model.config.get_text_config(decoder=True)
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * heads * head_dim * torch.finfo(torch.float32).bits // 8

    def running(self) -> int:
        return self._running

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.adapter is not None:
            await self.add_adapter(request.adapter)
        job = _Job(request, asyncio.get_running_loop())
        self._pending.append(job)
        self._wake.set()
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finished:
                    return
        finally:
            job.cancelled = True  # the batch loop drops the row at its next step

    async def _serve_batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._take_batch()
                self._running += len(batch)
                try:
                    await asyncio.to_thread(self._decode, batch)
                except Exception as exc:  # a failed batch fails its requests, not the engine
                    for job in batch:
                        job.post(exc)
                finally:
                    self._running -= len(batch)

    def _take_batch(self) -> list[_Job]:
        """The oldest waiting request and every other waiting one with a prompt of its length and its KV policy."""
        by_key: dict[tuple[int, KVPolicy], list[_Job]] = defaultdict(list)
        for job in self._pending:
            by_key[_batch_key(job)].append(job)
        first = _batch_key(self._pending[0])
        batch, rows = [], 0
        for job in by_key[first]:
            if rows + job.request.sampling.n > self.max_batch and batch:
                break
            batch.append(job)
            rows += job.request.sampling.n
        self._pending = [j for j in self._pending if j not in batch]
        return [j for j in batch if not j.cancelled]

    @torch.inference_mode()
    def _decode(self, batch: list[_Job]) -> None:
        rows = [_Row(job, i, self._generator(job.request.sampling.seed, i))
                for job in batch for i in range(job.request.sampling.n)]
        ids = torch.tensor([r.job.request.prompt_token_ids for r in rows])
        names = [r.job.request.adapter.name if r.job.request.adapter else BASE for r in rows]
        memories = [r.job.request.memory.key if r.job.request.memory else None for r in rows]
        max_steps = max(r.job.request.sampling.max_tokens for r in rows)
        policy = batch[0].request.kv_policy
        past = compressed_cache(policy, self.model.config)
        for step in range(max_steps):
            # The lock is taken per step, not per batch: an adapter can be loaded (or an idle one removed)
            # between two steps, so an activation never waits for a long batch to end.
            with self._lock:
                extra = {"adapter_names": names} if self._adapters else {}
                if self._memory is not None:
                    self._memory.set_rows(memories)  # under the lock: slots do not change during the pass
                if step == 0:  # the prompt: a compressed cache reads it chunk by chunk
                    out = prefill(self.model, ids, past, **extra)
                else:
                    out = self.model(input_ids=ids, past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            if step == 0:
                self._measured(policy, past, len(rows))  # after prefill: what the prompt's cache holds
            logits = out.logits[:, -1, :].float()
            next_ids = []
            for b, row in enumerate(rows):
                token = self._pick(row, logits[b]) if row.finish is None else self._tokenizer.pad_token_id
                next_ids.append(token)
                if row.finish is None:
                    row.tokens.append(token)
            self._emit(rows, logits)
            if all(r.finish is not None for r in rows):
                break
            ids = torch.tensor(next_ids).unsqueeze(1)

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        s = row.job.request.sampling
        if s.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Finish rows that hit EOS, a stop string, max_tokens or cancellation; post each job's deltas."""
        eos = self._tokenizer.eos_token_id
        per_job: dict[int, list[OutputDelta]] = defaultdict(list)
        for b, row in enumerate(rows):
            job, s = row.job, row.job.request.sampling
            if row.finish is not None:
                continue
            if job.cancelled:
                row.finish = "abort"  # nobody listens: decode no further for it
                continue
            token = row.tokens[-1]
            text = self._tokenizer.decode(row.tokens, skip_special_tokens=True)
            if token == eos and not s.ignore_eos:
                row.finish = "stop"
            hit = min((text.find(stop) for stop in s.stop if stop in text), default=-1)
            if hit >= 0:
                text, row.finish = text[:hit], "stop"
            if row.finish is None and len(row.tokens) >= s.max_tokens:
                row.finish = "length"
            if row.finish is None and s.stop:
                # Hold back what could be the start of a stop string.
                text = text[: max(len(row.emitted), len(text) - max(len(x) for x in s.stop) + 1)]
            delta = OutputDelta(index=row.index, text=text[len(row.emitted):], token_ids=[token],
                                finish_reason=row.finish)
            if s.logprobs is not None:
                delta.logprobs = [self._logprob(logits[b], token, s.logprobs)]
            row.emitted = text
            per_job[id(job)].append(delta)
        jobs = {id(r.job): r.job for r in rows}
        for key, deltas in per_job.items():
            job = jobs[key]
            done = all(r.finish is not None for r in rows if r.job is job)
            job.post(GenerationEvent(deltas=deltas, prompt_tokens=len(job.request.prompt_token_ids), finished=done))

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)
        values, indices = torch.topk(logp, max(1, top))
        decode = self._tokenizer.decode
        return TokenLogprob(token=decode([token]), logprob=float(logp[token]),
                            top={decode([int(i)]): float(v) for v, i in zip(values, indices)})

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        g = torch.Generator()
        base = seed if seed is not None else random.getrandbits(40)
        g.manual_seed((base * 1000 + index) % (1 << 62))
        return g


def _batch_key(job: _Job) -> tuple[int, KVPolicy]:
    return len(job.request.prompt_token_ids), job.request.kv_policy
