"""Training on the CPU: pretraining a tiny Llama on world text, and LoRA patches on task examples."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from service.kit.config import ModelShape
from service.kit.tasks import Example, PatchSpec

OnStep = Callable[[int, float], None]


def new_base(shape: ModelShape, vocab_size: int, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of `shape`; the seed fixes its weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _lr_at(step: int, steps: int, lr: float, warmup: int = 20) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _optimise(model: torch.nn.Module, batches: Callable[[int], dict], steps: int, lr: float, on_step: OnStep) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = model(**batches(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        on_step(step, loss_value)
    model.eval()
    return loss_value


def pretrain(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, lines: list[str], *, steps: int, lr: float,
             batch: int, seq_len: int, seed: int, on_step: OnStep) -> float:
    """Train on random packs of whole lines; every pack starts with BOS, as a prompt does at inference."""
    encoded = [tok(line + "\n", add_special_tokens=False)["input_ids"] for line in lines]
    rng = random.Random(seed)
    torch.manual_seed(seed)

    def batches(_: int) -> dict:
        ids = torch.full((batch, seq_len), tok.pad_token_id)
        labels = torch.full((batch, seq_len), -100)
        for row in range(batch):
            seq = [tok.bos_token_id]
            while True:
                line = encoded[rng.randrange(len(encoded))]
                if len(seq) + len(line) + 1 > seq_len:
                    break
                seq += line
            seq.append(tok.eos_token_id)  # the base learns to end a text, which every patch's answer does
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, 1 : len(seq)] = torch.tensor(seq[1:])
        return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}

    return _optimise(model, batches, steps, lr, on_step)


def encode_example(tok: PreTrainedTokenizerFast, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt (with BOS) and of answer (reference + EOS), encoded as inference sees them."""
    prompt = tok(ex.prompt)["input_ids"]
    answer = tok(ex.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt, answer


def _answer_batch(tok: PreTrainedTokenizerFast, rows: list[tuple[list[int], list[int]]]) -> dict:
    """(prompt, answer) rows padded into one batch; the loss is on the answers only."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}


def train_patch(base: LlamaForCausalLM, tok: PreTrainedTokenizerFast, spec: PatchSpec, train: list[Example], *,
                batch: int, seed: int, on_step: OnStep):
    """Wrap `base` in a fresh LoRA of `spec` and train it on the answers only; returns the PEFT model."""
    torch.manual_seed(seed)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    encoded = [encode_example(tok, ex) for ex in train]
    rng = random.Random(seed)

    def batches(_: int) -> dict:
        return _answer_batch(tok, [encoded[rng.randrange(len(encoded))] for _ in range(batch)])

    _optimise(model, batches, spec.steps, spec.lr, on_step)
    return model


def finetune_linear(base: LlamaForCausalLM, tok: PreTrainedTokenizerFast, spec: PatchSpec, train: list[Example], *,
                    batch: int, seed: int, on_step: OnStep) -> LlamaForCausalLM:
    """Fine-tune only the linear layers a LoRA patch can carry, shortest examples first; returns `base`, tuned.

    For the recall patch: at rank 16, LoRA trained directly stayed at chance on in-context recall for as long as
    the kit can afford (it did not find the retrieval circuit), while a full fine-tune of the same layers finds
    it; the patch is then extracted from the difference by truncated SVD (service/lora/extract.py), as an
    operator's fine-tune would be. The curriculum widens the window of example lengths as training goes.
    """
    torch.manual_seed(seed)
    for name, param in base.named_parameters():
        param.requires_grad = any(f".{m}." in name for m in spec.target_modules)
    encoded = sorted((encode_example(tok, ex) for ex in train), key=lambda pa: len(pa[0]))
    rng = random.Random(seed)

    def batches(step: int) -> dict:
        # The window of lengths grows to all of them by 60 % of the steps; short ones first, as a curriculum.
        reach = max(batch, int(len(encoded) * min(1.0, (step + 1) / (0.6 * spec.steps))))
        return _answer_batch(tok, [encoded[rng.randrange(max(0, reach - len(encoded) // 2), reach)]
                                   for _ in range(batch)])

    _optimise(base, batches, spec.steps, spec.lr, on_step)
    return base
