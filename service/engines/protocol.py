"""What every engine takes and reports, so the gateway serves and measures them identically."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from service.kv.policy import IDENTITY, KVPolicy


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter as engines know it: a unique engine-side name (`patch@version`) and its directory."""

    name: str
    path: str


@dataclass(frozen=True)
class MemoryRef:
    """A side-memory version as engines know it: a unique key (`memory@version`) and its file."""

    key: str
    path: str


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # how many top alternatives to report per token; None: none
    ignore_eos: bool = False  # generate max_tokens whatever the model says (load tests, as in vLLM)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    adapter: AdapterRef | None = None
    memory: MemoryRef | None = None  # loaded by the memory pool before the request is submitted
    kv_policy: KVPolicy = IDENTITY  # how this request's KV cache is kept (resolved with its alias at admission)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class OutputDelta:
    """What one of a request's `n` outputs added since the last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" or "length" once this output is finished


@dataclass
class GenerationEvent:
    deltas: list[OutputDelta]
    prompt_tokens: int
    finished: bool  # every output of the request is finished


@dataclass
class EngineHooks:
    """Places inside the forward pass for later layers (side-memory router, KV-cache compression).

    Engines accept them at construction; today both lists are empty.
    """

    forward_pre: list[Callable[[torch.nn.Module], None]] = field(default_factory=list)
    kv_cache: list[Callable[[object], object]] = field(default_factory=list)


class RequestRefused(ValueError):
    """The engine will not run this request as asked (a sampling setting it refuses); the gateway answers 400."""


class Engine(Protocol):
    name: str
    max_model_len: int

    @property
    def tokenizer(self): ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events until every output is finished; closing the iterator aborts the request."""
        ...

    async def add_adapter(self, adapter: AdapterRef) -> None: ...

    async def remove_adapter(self, name: str) -> None: ...

    def running(self) -> int:
        """Requests the engine is generating for now."""
        ...

    def adapters(self) -> list[str]: ...

    # Side memories (knowledge edits): `memory_layer` is the layer they sit in, None when this engine
    # has none (memories disabled, or an architecture the memory model does not cover).
    memory_layer: int | None

    async def add_memory(self, memory: MemoryRef) -> None:
        """Load a memory version into a free slot (raises SlotsFull when every slot is taken)."""
        ...

    async def remove_memory(self, key: str) -> None: ...

    def memories(self) -> list[str]: ...

    async def memory_stats(self) -> dict[str, dict[str, int]]:
        """Per memory key: tokens through its slot and tokens routed to the side memory."""
        ...
