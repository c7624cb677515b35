"""Completions and chat completions: resolve the model, admit, submit to the engine, shape the answer.

Every request is measured here, from engine events, the same way whatever the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from service import metrics
from service.api.errors import APIError
from service.api.openai import protocol as p
from service.engines.protocol import Engine, GenerationEvent, GenerationRequest, SamplingConfig
from service.kv.policy import IDENTITY
from service.replica.adapter_pool import AdapterPool, MemoryPool
from service.replica.resolver import HostedElsewhere, Resolved, Resolver, UnknownModel


@dataclass
class _Meter:
    """Timing of one request, turned into metrics once it ends."""

    resolved: Resolved
    started: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def on_event(self, event: GenerationEvent) -> None:
        self.prompt_tokens = event.prompt_tokens
        new = sum(len(d.token_ids) for d in event.deltas)
        if not new:
            return
        now = time.perf_counter()
        labels = self._labels()
        if self.last_token is None:
            metrics.time_to_first_token.labels(*labels).observe(now - self.started)
        else:
            # A delta may carry several tokens; spread the gap evenly over them.
            for _ in range(new):
                metrics.inter_token_latency.labels(*labels).observe((now - self.last_token) / new)
        self.last_token = now
        self.completion_tokens += new

    def finish(self, status: int) -> None:
        labels = self._labels()
        metrics.requests_total.labels(*labels, str(status)).inc()
        metrics.request_duration.labels(*labels).observe(time.perf_counter() - self.started)
        metrics.prompt_tokens.labels(*labels).inc(self.prompt_tokens)
        metrics.generation_tokens.labels(*labels).inc(self.completion_tokens)

    def usage(self) -> p.Usage:
        return p.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                       total_tokens=self.prompt_tokens + self.completion_tokens)

    def _labels(self) -> tuple[str, str, str]:
        return self.resolved.model, self.resolved.version_label, self.resolved.base


@dataclass
class Submission:
    """A request ready for the engine: what serves it and how to meter it."""

    resolved: Resolved
    request: GenerationRequest
    meter: _Meter
    echo: str = ""  # completions with `echo`: the prompt's text, put before each choice's text


class OpenAIServing:
    def __init__(self, engine: Engine, resolver: Resolver, pool: AdapterPool, max_in_flight: int, guard=None,
                 memories: MemoryPool | None = None):
        self.engine = engine
        self.resolver = resolver
        self.pool = pool
        self.memories = memories
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.guard = guard  # a LiveGuard (service/replica/live_guard.py): told of every request that finished

    # -- building a submission ------------------------------------------------------------------------
    def resolve(self, model: str, user: str | None = None) -> Resolved:
        try:
            return self.resolver.resolve(model, user)
        except UnknownModel:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found") from None
        except HostedElsewhere as exc:
            # 421 Misdirected Request: right name, wrong server; a router sends it to a gateway of that base.
            raise APIError(421, f"`{model}` is served on base {exc.base}, which this gateway does not host.",
                           param="model", code="base_not_hosted") from None

    def submit_completion(self, req: p.CompletionRequest) -> Submission:
        resolved = self.resolve(req.model, req.user)
        tokenizer = self.engine.tokenizer
        if isinstance(req.prompt, str):
            ids = tokenizer(req.prompt)["input_ids"]
        else:
            ids = list(req.prompt)
            vocab = len(tokenizer)
            if bad := [t for t in ids if not 0 <= t < vocab]:
                raise APIError(400, f"prompt: token id {bad[0]} is outside this model's vocabulary "
                                    f"(0 to {vocab - 1})", param="prompt")
        if req.echo and req.logprobs is not None:
            # vLLM answers this with the prompt's own logprobs; no engine here computes them yet.
            raise APIError(400, "echo with logprobs is not supported: send one or the other", param="echo")
        sub = self._submission(resolved, ids, req, req.max_tokens or 16, req.logprobs, "cmpl")
        if req.echo:
            sub.echo = req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids, skip_special_tokens=True)
        return sub

    def submit_chat(self, req: p.ChatCompletionRequest) -> Submission:
        resolved = self.resolve(req.model, req.user)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its BOS
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, self.engine.max_model_len - len(ids))
        return self._submission(resolved, ids, req, max_tokens, logprobs, "chatcmpl")

    def _submission(self, resolved: Resolved, ids: list[int], req, max_tokens: int, logprobs: int | None,
                    prefix: str) -> Submission:
        limit = self.engine.max_model_len
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the "
                                f"completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        sampling = SamplingConfig(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                  stop=req.stop_list(), n=req.n, logprobs=logprobs, ignore_eos=req.ignore_eos)
        adapter = self.pool.ref(resolved.patch) if resolved.patch else None
        memory = self.memories.ref(resolved.memory) if resolved.memory and self.memories else None
        kv = resolved.kv.policy if resolved.kv is not None else IDENTITY
        request = GenerationRequest(f"{prefix}-{uuid.uuid4().hex}", ids, sampling, adapter, memory, kv_policy=kv)
        return Submission(resolved, request, _Meter(resolved))

    # -- running it -----------------------------------------------------------------------------------
    async def admit(self, sub: Submission) -> None:
        """Count the request in and hold its patch version until `release`; 503 when the gateway is full.

        Called right after resolving, with no await in between: the lease is taken before any alias
        move or unload can run, so the request is served by the version it was admitted with.
        """
        if self.in_flight >= self.max_in_flight:
            raise APIError(503, "The server is overloaded; retry shortly.", type_="server_overloaded",
                           code="overloaded", headers={"Retry-After": "1"})
        self.in_flight += 1
        patch, memory = sub.resolved.patch, sub.request.memory
        if patch is not None:
            self.pool.acquire(patch.ref)
        if memory is not None:
            self.memories.acquire(memory.key)
            metrics.memory_requests.labels(sub.resolved.memory.name, str(sub.resolved.memory.version)).inc()
        try:
            if patch is not None:
                await self.pool.ensure(patch)  # resident already unless pinned to an old version
            if memory is not None:
                await self.memories.ensure(sub.resolved.memory)  # resident: only active versions are resolved
        except Exception as exc:
            self.release(sub)
            what = patch.ref if patch is not None else memory.key
            raise APIError(503, f"The version {what} could not be loaded: {exc}",
                           type_="server_error", code="adapter_unavailable", headers={"Retry-After": "1"}) from exc

    def release(self, sub: Submission) -> None:
        """The request is over: its slot and its leases on the patch and memory versions are given back."""
        self.in_flight -= 1
        if sub.resolved.patch is not None:
            self.pool.release(sub.resolved.patch.ref)
        if sub.request.memory is not None:
            self.memories.release(sub.request.memory.key)

    def waiting(self) -> int:
        """Requests admitted but not yet running in the engine."""
        return max(0, self.in_flight - self.engine.running())

    async def events(self, sub: Submission) -> AsyncIterator[GenerationEvent]:
        # aclosing: a cancelled consumer closes the engine's stream at once, which aborts the request.
        text = ""
        async with aclosing(self.engine.generate(sub.request)) as stream:
            async for event in stream:
                sub.meter.on_event(event)
                text += "".join(d.text for d in event.deltas if d.index == 0)
                yield event
        if self.guard is not None:  # finished normally: the live guard may compare it
            self.guard.observe(sub.resolved, sub.request, text)

    async def complete(self, sub: Submission, chat: bool) -> dict:
        """Run a request to its end and return the whole response body."""
        n = sub.request.sampling.n
        texts, finish = [sub.echo] * n, [None] * n
        logprobs: list[list] = [[] for _ in range(n)]
        async with aclosing(self.events(sub)) as events:  # a cancelled caller aborts the engine's request now
            async for event in events:
                for d in event.deltas:
                    texts[d.index] += d.text
                    finish[d.index] = d.finish_reason or finish[d.index]
                    logprobs[d.index] += d.logprobs or []
        want_logprobs = sub.request.sampling.logprobs is not None
        model = sub.resolved.model
        if chat:
            choices = [p.ChatChoice(index=i, message=p.ChatResponseMessage(content=texts[i]), finish_reason=finish[i],
                                    logprobs=_chat_logprobs(logprobs[i]) if want_logprobs else None)
                       for i in range(n)]
            body = p.ChatCompletionResponse(id=sub.request.request_id, model=model, choices=choices,
                                            usage=sub.meter.usage())
        else:
            choices = [p.CompletionChoice(index=i, text=texts[i], finish_reason=finish[i],
                                          logprobs=_completion_logprobs(logprobs[i]) if want_logprobs else None)
                       for i in range(n)]
            body = p.CompletionResponse(id=sub.request.request_id, model=model, choices=choices,
                                        usage=sub.meter.usage())
        return body.model_dump(exclude_none=False)

    async def stream(self, sub: Submission, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per engine event, then usage if asked, then [DONE]."""
        # Chunks are plain dicts on this hot path (one per token): the shapes are those of
        # OpenAI's completion and chat.completion.chunk objects, without a model object per token.
        head = {"id": sub.request.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": sub.resolved.model}
        want_logprobs = sub.request.sampling.logprobs is not None
        if chat:
            yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}
                                            for i in range(sub.request.sampling.n)]})
        elif sub.echo:
            yield _sse({**head, "choices": [{"index": i, "text": sub.echo, "finish_reason": None}
                                            for i in range(sub.request.sampling.n)]})
        async with aclosing(self.events(sub)) as events:  # closing this stream aborts the engine's request now
            async for event in events:
                choices = []
                for d in event.deltas:
                    choice = {"index": d.index, "finish_reason": d.finish_reason}
                    if chat:
                        choice["delta"] = {"content": d.text}
                        if want_logprobs:
                            choice["logprobs"] = _chat_logprobs(d.logprobs or []).model_dump()
                    else:
                        choice["text"] = d.text
                        if want_logprobs:
                            choice["logprobs"] = _completion_logprobs(d.logprobs or []).model_dump()
                    choices.append(choice)
                yield _sse({**head, "choices": choices})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": sub.meter.usage().model_dump()})
        yield "data: [DONE]\n\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _completion_logprobs(entries: list) -> p.CompletionLogprobs:
    out = p.CompletionLogprobs()
    offset = 0
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append(e.top)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def _chat_logprobs(entries: list) -> p.ChatChoiceLogprobs:
    return p.ChatChoiceLogprobs(content=[
        p.ChatLogprobEntry(token=e.token, logprob=e.logprob,
                           top_logprobs=[{"token": t, "logprob": lp} for t, lp in e.top.items()])
        for e in entries])
