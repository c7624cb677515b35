"""Runs versions on evaluation and probe sets for the worker: transformers + PEFT, the reference engine.

The worker evaluates with its own copy of the base (not the serving engine), so a report costs the
gateway nothing but CPU, and a standalone `patchserve worker` needs no gateway. Outputs are greedy
and batched without padding, so they are the same tokens the engines serve.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from adapters_store.blobs import BlobStore, materialize
from adapters_store.registry import PatchVersion
from service.evaluation.generation import greedy_generate, perplexity
from service.evaluation.scoring import answer_text
from service.kv.cache import QueryTap, cache_nbytes, compressed_cache, prefill
from service.kv.policy import KVPolicy
from service.memory.hf_hook import HFMemory
from service.memory.memory_file import MemoryWeights

hf_logging.disable_progress_bar()  # logs stay quiet by default; job progress is reported on the job


class Evaluator:
    """Greedy answers and probe perplexity of a base alone or with one of its patch versions."""

    def __init__(self, blobs: BlobStore, work_dir: Path, max_new_tokens: int = 24):
        self.blobs = blobs
        self.work_dir = Path(work_dir)
        self.max_new_tokens = max_new_tokens
        self._bases: dict[str, tuple] = {}  # base path → (model, tokenizer)
        self._lock = threading.Lock()  # one evaluation at a time: the model's adapters are shared state

    def _base(self, path: str):
        if path not in self._bases:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            QueryTap(model)  # eviction that scores with the prompt's queries (KV policies) needs it
            self._bases[path] = (model, tok)
        return self._bases[path]

    def _version_dir(self, version: PatchVersion) -> Path:
        return materialize(self.blobs, version.files, self.work_dir / version.ref)

    def run(self, base_path: str, version: PatchVersion | None, prompts: list[str],
            probe: list[str], kv_policy: KVPolicy | None = None) -> tuple[list[str], float]:
        """(answers to `prompts`, perplexity on `probe`) of the base with `version` (None: the base alone).

        With `kv_policy` its KV cache is kept under that policy, and the probe perplexity is the one a KV cache
        costs (each text's second half scored against its first half's cache), comparable between policies.
        """
        return self.with_model(base_path, version, lambda model, tok: self._measure(model, tok, prompts, probe,
                                                                                     kv_policy))

    def kv_bytes_per_token(self, base_path: str, version: PatchVersion | None, prompts: list[str],
                           kv_policy: KVPolicy) -> float:
        """KV bytes held per token after reading each prompt under `kv_policy` (measured on the cache's tensors)."""
        def measure(model, tok) -> float:
            held = tokens = 0
            with torch.inference_mode():
                for prompt in prompts:
                    ids = torch.tensor([tok(prompt)["input_ids"]])
                    out = prefill(model, ids, compressed_cache(kv_policy, model.config))
                    held += cache_nbytes(out.past_key_values)
                    tokens += ids.shape[1]
            return held / max(1, tokens)
        return self.with_model(base_path, version, measure)

    def with_model(self, base_path: str, version: PatchVersion | None, use):
        """`use(model, tokenizer)` on the base with `version` loaded (None: the base alone), one at a time."""
        with self._lock:
            model, tok = self._base(base_path)
            if version is None:
                return use(model, tok)
            peft = PeftModel.from_pretrained(model, str(self._version_dir(version)), adapter_name="candidate")
            try:
                return use(peft, tok)
            finally:
                # Take the LoRA layers out again, so the cached base stays the plain base.
                peft.unload()
                self._bases[base_path] = (model, tok)

    def run_memory(self, base_path: str, weights: MemoryWeights | None, prompts: list[str],
                   probe: list[str] = (), version: PatchVersion | None = None) -> tuple[list[str], float | None]:
        """(answers to `prompts`, perplexity on `probe` or None) of the base (with `version`, a patch on it) and a
        side memory (None: without one)."""
        def use(model, tok):
            hook = HFMemory(model, weights.layer, slots=1) if weights is not None else None
            try:
                if hook is not None:
                    hook.memory.load("candidate", weights.delta, weights.threshold)
                    hook.set_all("candidate")
                answers = self._answers(model, tok, prompts)
                return answers, (perplexity(model, tok, list(probe)) if probe else None)
            finally:
                if hook is not None:
                    hook.remove()
        return self.with_model(base_path, version, use)

    @contextmanager
    def base(self, base_path: str):
        """(model, tokenizer) of a base, held alone while the block runs (the edit job trains on it)."""
        with self._lock:
            yield self._base(base_path)

    def _answers(self, model, tok, prompts: list[str]) -> list[str]:
        return [answer_text(tok, t) for t in greedy_generate(model, tok, prompts, self.max_new_tokens)]
    def _measure(self, model, tok, prompts: list[str], probe: list[str], kv_policy: KVPolicy | None):
        cache = (lambda: compressed_cache(kv_policy, model.config)) if kv_policy is not None else None
        answers = [answer_text(tok, t) for t in greedy_generate(model, tok, prompts, self.max_new_tokens,
                                                                cache=cache)]
        return answers, perplexity(model, tok, probe, cache=cache)
