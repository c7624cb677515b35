"""Greedy generation and perplexity with transformers: the reference numbers every evaluation is made of."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast


@torch.inference_mode()
def greedy_generate(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompts: list[str],
                    max_new_tokens: int = 12, batch: int = 64) -> list[list[int]]:
    """Greedy completions as token ids (up to and including EOS).

    Prompts are batched by token length, so no row is padded and each row computes exactly
    what it would alone: the reference an engine's output is compared with token for token.
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
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            for row, i in enumerate(chunk):
                tokens = gen[row, ids.shape[1] :].tolist()
                if tok.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
                out[i] = tokens
    return out


@torch.inference_mode()
def perplexity(model: PreTrainedModel, tok: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Token-level perplexity over `texts`, each scored on its own."""
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.shape[1] - 1
        total_nll += loss.item() * n
        total_tokens += n
    return math.exp(total_nll / max(1, total_tokens))
