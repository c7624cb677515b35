"""A fake engine for the fast test tier: the engine protocol (service/engines/protocol.py) with no model behind it.

It stands in for the real engines (transformers, vLLM), which run in the slow tier, so that the replica's
own logic (resolver, adapter pool, registry sync, serving, live guard) can be tested against a real Redis
in under a minute. It is deterministic: a request's output depends only on its prompt ids, its sampling
and the *voice* of the adapter that serves it, which is the adapter's engine name (`patch@N`) unless a
test gives it another (`engine.voices["p@2"] = "p@1"`: p@2 then answers exactly as p@1 does). Each
token's text names the voice, so a test can read which version served a request from its answer.

It is stricter than the real engines where that finds bugs in the layers above it:
- `generate` with an adapter that is not loaded fails (the transformers engine would load it on the
  fly and hide a request admitted on a version the pool never loaded);
- `add_adapter` needs the adapter's directory to exist with an `adapter_config.json` in it (what the
  pool's `materialize` lays out);
- `remove_adapter` of an adapter that a running request uses is a violation: recorded in
  `violations` (the fixtures assert it stays empty) and raised.

Hooks for tests:
- `hold`: an asyncio.Event; while it is not set, every request stops after its first token (so a test
  can look at leases while requests are in flight) and resumes once it is set;
- `add_gate`: an asyncio.Event; while it is not set, `add_adapter` waits before loading (so a test can
  look at what is visible while a version is being loaded); `adding` names the loads waiting on it;
- `remove_gate`: the same for `remove_adapter` (`removing` names the removals waiting on it);
- `fail_add`: True, or a set of adapter names, whose `add_adapter` raises `AdapterLoadError`;
- `eos_after`: the "model" says EOS after that many tokens (finish "stop") unless `ignore_eos`;
- `token_delay_s`: a pause before every token;
- counters and logs: `add_calls`, `remove_calls` (Counters by adapter name), `requests` (every
  GenerationRequest given to `generate`), `served` ((request id, adapter name or None) per request).

Side memories are held like adapters, in `memory_slots` slots: a request's voice is its adapter's voice
followed by `+<memory key>` when it has a memory, so an answer names the memory version that served it;
freeing a memory a running request uses, or generating with one not loaded, is a violation.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from service.engines.protocol import (
    AdapterRef,
    GenerationEvent,
    GenerationRequest,
    MemoryRef,
    OutputDelta,
    RequestRefused,
    TokenLogprob,
)
from service.memory.side_memory import SlotsFull

BASE_VOICE = "base"


class AdapterLoadError(RuntimeError):
    """What `add_adapter` raises for the names in `FakeEngine.fail_add`."""


class FakeTokenizer:
    """Bytes are tokens: ids 0-255 are the UTF-8 bytes of the text, then BOS and EOS.

    Enough of a Hugging Face tokenizer for service/api/openai/serving.py: called on text (with or
    without special tokens), `len`, `decode`, `apply_chat_template`, `bos_token_id`.
    """

    BOS, EOS = "<s>", "</s>"
    bos_token_id, eos_token_id = 256, 257
    pad_token_id = eos_token_id

    def __len__(self) -> int:
        return 258

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = []
        if text.startswith(self.BOS):  # a chat template's own BOS
            ids.append(self.bos_token_id)
            text = text[len(self.BOS):]
        elif add_special_tokens:
            ids.append(self.bos_token_id)
        ids += list(text.encode("utf-8"))
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out, chunk = [], bytearray()
        for i in ids:
            if i < 256:
                chunk.append(i)
                continue
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if not skip_special_tokens:
                out.append(self.BOS if i == self.bos_token_id else self.EOS)
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **_):
        text = self.BOS + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text


class FakeEngine:
    """The engine protocol, deterministic and instant; see the module's docstring for its hooks."""

    name = "fake"

    def __init__(self, max_model_len: int = 256, *, eos_after: int | None = None, token_delay_s: float = 0.0):
        self.max_model_len = max_model_len
        self.eos_after = eos_after
        self.token_delay_s = token_delay_s
        self.voices: dict[str, str] = {}
        self.hold: asyncio.Event | None = None
        self.add_gate: asyncio.Event | None = None
        self.remove_gate: asyncio.Event | None = None
        self.fail_add: bool | set[str] = False
        self.add_calls: Counter[str] = Counter()
        self.remove_calls: Counter[str] = Counter()
        self.requests: list[GenerationRequest] = []
        self.served: list[tuple[str, str | None]] = []
        self.adding: set[str] = set()
        self.removing: set[str] = set()
        self.violations: list[str] = []
        self.started = False
        self._tokenizer = FakeTokenizer()
        self._adapters: dict[str, str] = {}  # name → path
        self._in_use: Counter[str] = Counter()  # adapter name (or memory key) → running requests on it
        self._running = 0
        self.memory_layer: int | None = 0
        self.memory_slots = 4
        self._memories: dict[str, str] = {}  # memory key → path

    # -- the protocol ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def add_adapter(self, adapter: AdapterRef) -> None:
        self.add_calls[adapter.name] += 1
        if self.add_gate is not None and not self.add_gate.is_set():
            self.adding.add(adapter.name)
            try:
                await self.add_gate.wait()
            finally:
                self.adding.discard(adapter.name)
        if self.fail_add is True or (isinstance(self.fail_add, set) and adapter.name in self.fail_add):
            raise AdapterLoadError(f"cannot load {adapter.name} (told to fail)")
        if not (Path(adapter.path) / "adapter_config.json").is_file():
            raise AdapterLoadError(f"{adapter.path} has no adapter_config.json")
        await asyncio.sleep(0)  # a load yields to the loop, as a real one (in a thread) does
        self._adapters[adapter.name] = adapter.path

    async def remove_adapter(self, name: str) -> None:
        self.remove_calls[name] += 1
        if self.remove_gate is not None and not self.remove_gate.is_set():
            self.removing.add(name)
            try:
                await self.remove_gate.wait()
            finally:
                self.removing.discard(name)
        if self._in_use[name]:
            self.violations.append(f"{name} removed while {self._in_use[name]} request(s) ran on it")
            raise RuntimeError(self.violations[-1])
        self._adapters.pop(name, None)

    def running(self) -> int:
        return self._running

    async def add_memory(self, memory: MemoryRef) -> None:
        if memory.key in self._memories:
            return
        if len(self._memories) >= self.memory_slots:
            raise SlotsFull(f"all {self.memory_slots} memory slots are in use")
        if not Path(memory.path).is_file():
            raise AdapterLoadError(f"{memory.path} is not a file")
        await asyncio.sleep(0)
        self._memories[memory.key] = memory.path

    async def remove_memory(self, key: str) -> None:
        if self._in_use[key]:
            self.violations.append(f"memory {key} freed while {self._in_use[key]} request(s) ran on it")
            raise RuntimeError(self.violations[-1])
        self._memories.pop(key, None)

    def memories(self) -> list[str]:
        return sorted(self._memories)

    async def memory_stats(self) -> dict[str, dict[str, int]]:
        return {key: {"tokens": 0, "routed": 0} for key in self._memories}

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        s = request.sampling
        adapter = request.adapter.name if request.adapter else None
        if adapter is not None and adapter not in self._adapters:
            self.violations.append(f"{request.request_id} asked for {adapter}, which is not loaded")
            raise RuntimeError(self.violations[-1])
        if s.n < 1 or s.max_tokens < 1:
            raise RequestRefused("n and max_tokens must be at least 1")
        if len(request.prompt_token_ids) + s.max_tokens > self.max_model_len:
            raise RequestRefused(f"{len(request.prompt_token_ids)} + {s.max_tokens} tokens exceed "
                                 f"{self.max_model_len}")
        memory = request.memory.key if request.memory else None
        if memory is not None and memory not in self._memories:
            self.violations.append(f"{request.request_id} asked for memory {memory}, which is not loaded")
            raise RuntimeError(self.violations[-1])
        self.served.append((request.request_id, adapter))
        voice = self.voice(adapter) + (f"+{memory}" if memory else "")
        self._running += 1
        if adapter is not None:
            self._in_use[adapter] += 1
        if memory is not None:
            self._in_use[memory] += 1
        try:
            texts = [""] * s.n
            done = [False] * s.n
            for k in range(s.max_tokens):
                if k == 1 and self.hold is not None:
                    await self.hold.wait()
                await asyncio.sleep(self.token_delay_s)
                deltas = []
                for i in range(s.n):
                    if done[i]:
                        continue
                    piece = self.token_text(request.prompt_token_ids, voice, k, i if s.temperature else 0, s.seed)
                    finish = None
                    new = texts[i] + piece
                    hit = min((new.find(x) for x in s.stop if x in new), default=-1)
                    if hit >= 0:
                        piece, finish = new[:hit][len(texts[i]):], "stop"
                    elif self.eos_after is not None and k + 1 >= self.eos_after and not s.ignore_eos:
                        finish = "stop"
                    elif k + 1 == s.max_tokens:
                        finish = "length"
                    texts[i] += piece
                    done[i] = finish is not None
                    logprobs = None
                    if s.logprobs is not None:
                        logprobs = [TokenLogprob(token=piece, logprob=-0.5, top={piece: -0.5})]
                    deltas.append(OutputDelta(index=i, text=piece, token_ids=[self.token_id(piece)],
                                              logprobs=logprobs, finish_reason=finish))
                yield GenerationEvent(deltas=deltas, prompt_tokens=len(request.prompt_token_ids),
                                      finished=all(done))
                if all(done):
                    return
        finally:
            self._running -= 1
            if adapter is not None:
                self._in_use[adapter] -= 1
            if memory is not None:
                self._in_use[memory] -= 1

    # -- what tests compute answers with ---------------------------------------------------------------
    def voice(self, adapter: str | None) -> str:
        """Whose answers `adapter` gives: its own name unless `voices` says otherwise; `base` for none."""
        if adapter is None:
            return BASE_VOICE
        return self.voices.get(adapter, adapter)

    @staticmethod
    def token_text(prompt_ids: list[int], voice: str, k: int, index: int = 0, seed: int | None = None) -> str:
        """The text of token `k` of output `index`: the voice, and a digit string from everything else."""
        key = f"{voice}|{','.join(map(str, prompt_ids))}|{k}|{index}|{seed}".encode()
        return f" {voice}:{int(hashlib.sha256(key).hexdigest()[:6], 16) % 1000:03d}"

    def answer(self, prompt_ids: list[int], adapter: str | None, max_tokens: int, index: int = 0,
               seed: int | None = None) -> str:
        """The whole text a greedy request gets (no stop strings, no EOS)."""
        voice = self.voice(adapter)
        return "".join(self.token_text(prompt_ids, voice, k, index, seed) for k in range(max_tokens))

    @staticmethod
    def token_id(piece: str) -> int:
        return int(hashlib.sha256(piece.encode()).hexdigest()[:4], 16) % 256
