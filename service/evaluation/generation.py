"""Greedy generation and perplexity with transformers: the reference numbers every evaluation is made of."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from service.kv.cache import PREFILL_CHUNK, prefill


@torch.inference_mode()
def greedy_generate(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompts: list[str],
                    max_new_tokens: int = 12, batch: int = 64, cache: Callable[[], object] | None = None,
                    ) -> list[list[int]]:
    """Greedy completions as token ids (up to and including EOS).

    Prompts are batched by token length, so no row is padded and each row computes exactly
    what it would alone: the reference an engine's output is compared with token for token.
    `cache` makes each batch's KV cache (a compressed one: service/kv); None is transformers' own.
    """
    encoded = [tok(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            ids = torch.tensor([encoded[i] for i in chunk])
            extra = {}
            if cache is not None and (made := cache()) is not None:
                # All but the prompt's last chunk read into the compressed cache; generate reads the rest.
                prefill(model, ids[:, : (ids.shape[1] - 1) // PREFILL_CHUNK * PREFILL_CHUNK], made)
                extra = {"past_key_values": made}
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **extra)
            for row, i in enumerate(chunk):
                tokens = gen[row, ids.shape[1] :].tolist()
                if tok.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
                out[i] = tokens
    return out


@torch.inference_mode()
def perplexity(model: PreTrainedModel, tok: PreTrainedTokenizerFast, texts: list[str],
               cache: Callable[[], object] | None = None) -> float:
    """Token-level perplexity over `texts`, each scored on its own.

    With `cache` (a KV cache's factory: a compressed one, or None for transformers' own), each text's first half is
    read into the cache and its second half is scored against what the cache kept — compare two policies this
    way, both with a factory, so both score the same tokens.
    """
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        if cache is None or ids.shape[1] < 4:
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[1] - 1
        else:
            half = ids.shape[1] // 2
            first = prefill(model, ids[:, :half], cache())
            rest = model(input_ids=ids[:, half:], past_key_values=first.past_key_values, use_cache=True)
            logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1)
            n = ids.shape[1] - half
            loss = torch.nn.functional.cross_entropy(logits.reshape(n, -1).float(), ids[0, half:])
        total_nll += loss.item() * n
        total_tokens += n
    return math.exp(total_nll / max(1, total_tokens))
