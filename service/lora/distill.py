"""Compatibility repair by distillation (MUSCLE, Echterhoff et al., arXiv 2407.09435).

A patch carried to a new base unchanged (PortLLM) often loses what it did. The repair trains it on
the new base to answer as the version it replaces: the teacher is the old base with the old patch,
the student the new base with a LoRA initialised from the carried patch. On each distillation prompt
the teacher's greedy answer is the sequence trained on (no references: the old version *is* the
behaviour to keep). MUSCLE's per-token mask decides the target of each answer token: where the
student as carried predicts another token than the teacher, the teacher's distribution (the new
model gets it wrong); elsewhere the carried student's own distribution (what the new model already
gets right is kept, not overwritten). Both are matched by KL at temperature T, plus cross-entropy on
the teacher's tokens, since users meet the greedy answer, plus KL toward the teacher on the prompt's
own tokens, so the old version's language model is kept along with its answers.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

OnStep = Callable[[int, int, float], None]  # (step, steps, loss)


@dataclass(frozen=True)
class DistillParams:
    steps: int = 600  # at most: training stops at `stop_at_agreement`
    lr: float = 5e-3
    batch: int = 16
    temperature: float = 2.0
    hard_weight: float = 1.0  # weight of the cross-entropy on the teacher's greedy tokens
    # Weight of the KL toward the teacher on the prompt's own tokens: the old version's language model,
    # not only its answers (measured on the kit's reverse repair: probe perplexity 5.7× the old version's
    # without it, 1.7× with it).
    prompt_weight: float = 1.0
    seed: int = 0
    # Stop once the student's next-token argmax matches the teacher's answers on this share of the
    # answer tokens (checked every `check_every` steps): the least change that reproduces the old
    # version leaves the rest of the new base's behaviour alone.
    stop_at_agreement: float = 0.99
    check_every: int = 5
    check_examples: int = 128  # the first examples, as a sample: a check costs a fraction of a step


@dataclass
class DistillResult:
    steps: int
    examples: int
    answer_tokens: int
    to_teacher: float  # share of answer tokens the mask sent to the teacher (the carried patch got them wrong)
    agreement: float  # share of answer tokens where the student's argmax is the teacher's token, at the end
    first_loss: float
    final_loss: float
    seconds: float


def load_patched(base_path: str | Path, adapter_dir: str | Path, trainable: bool = False):
    """A fresh copy of the base at `base_path` with the adapter in `adapter_dir` (fp32, eval mode)."""
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    return model if trainable else model.merge_and_unload().eval()


@dataclass
class Teaching:
    """One teacher and the (prompt ids, its answer ids) pairs it teaches."""
    teacher: object
    examples: list[tuple[list[int], list[int]]]


def distil(teacher, student, examples: list[tuple[list[int], list[int]]], pad_id: int,
           params: DistillParams = DistillParams(), on_step: OnStep | None = None) -> DistillResult:
    """Train `student`'s LoRA (a trainable PeftModel) on (prompt ids, teacher's answer ids) pairs; in place."""
    return distil_from([Teaching(teacher, examples)], student, pad_id, params, on_step)


def distil_from(teachings: list[Teaching], student, pad_id: int, params: DistillParams = DistillParams(),
                on_step: OnStep | None = None) -> DistillResult:
    """Train `student`'s LoRA on several teachers at once, each on its own examples; in place.

    With several, each step's batch draws a teacher uniformly and then one of its examples, so a
    teacher with few examples is learned as well as one with many (a merge's small task beside a large one).
    """
    started = time.monotonic()
    groups = [[(p, a) for p, a in t.examples if a] for t in teachings]
    if not any(groups):
        raise ValueError("no distillation example has an answer to learn")
    teachings = [t for t, g in zip(teachings, groups) if g]
    groups = [g for g in groups if g]
    # Targets are fixed before training: each teacher's and the carried student's distributions at T.
    student.eval()
    examples, targets, prompt_targets, owner, sent = [], [], [], [], 0
    for teaching, group in zip(teachings, groups):
        t_all, c_all = _all_logits(teaching.teacher, group, pad_id), _all_logits(student, group, pad_id)
        for (_, answer), t_logits, c_logits in zip(group, t_all, c_all):
            wrong = c_logits.argmax(-1) != torch.tensor(answer)
            sent += int(wrong.sum())
            source = torch.where(wrong[:, None], t_logits, c_logits)
            targets.append(F.softmax(source / params.temperature, dim=-1))
        if params.prompt_weight:
            prompt_targets += [F.softmax(t / params.temperature, dim=-1)
                               for t in _all_logits(teaching.teacher, group, pad_id, part="prompt")]
        owner.append(range(len(examples), len(examples) + len(group)))
        examples += group
    tokens = sum(len(a) for _, a in examples)
    # The agreement sample takes the teachers in turn, so each is checked.
    sample = [i for row in itertools.zip_longest(*owner) for i in row if i is not None][: params.check_examples]

    params_to_train = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params_to_train, lr=params.lr, weight_decay=0.0)
    rng = random.Random(params.seed)
    student.train()
    losses, agreement = [], 0.0
    for step in range(params.steps):
        # Never before the first steps: a repair is asked for because the carried patch failed its gate,
        # and a student that already agrees on the sample may still differ where the gate measured.
        # Checks every 5 steps took a third of a merge's time (each about two steps' worth): none when training
        # is never to stop early.
        if step and step % params.check_every == 0 and params.stop_at_agreement <= 1:
            agreement = _agreement(student, [examples[i] for i in sample], pad_id)
            if agreement >= params.stop_at_agreement:
                break
        for group in opt.param_groups:  # linear decay: the carried patch is a good start, end gently
            group["lr"] = params.lr * (1 - step / params.steps)
        if len(owner) == 1:
            chosen = [rng.randrange(len(examples)) for _ in range(params.batch)]
        else:
            chosen = [rng.choice(owner[rng.randrange(len(owner))]) for _ in range(params.batch)]
        rows = _answer_logits(student, [examples[i] for i in chosen], pad_id, grad=True, part="both")
        loss = _batch_loss(rows, [targets[i] for i in chosen], [examples[i][1] for i in chosen],
                           [prompt_targets[i] for i in chosen] if params.prompt_weight else None, params)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_to_train, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step, params.steps, losses[-1])
    else:
        agreement = _agreement(student, examples, pad_id)
    student.eval()
    return DistillResult(steps=len(losses), examples=len(examples), answer_tokens=tokens,
                         to_teacher=sent / tokens, agreement=agreement, first_loss=losses[0] if losses else 0.0,
                         final_loss=losses[-1] if losses else 0.0, seconds=time.monotonic() - started)


def _batch_loss(rows: list, targets: list, answers: list[list[int]], prompt_targets: list | None,
                params: DistillParams) -> torch.Tensor:
    """Mean over the batch of each row's KL to its targets and cross-entropy on its answer (each a mean over the
    row's answer tokens), plus the prompt KL (a mean over its prompt tokens): the rows' positions in one tensor,
    a few operations per batch instead of a few per row."""
    t2 = params.temperature ** 2

    def per_row_mean(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        weights = torch.cat([torch.full((n,), 1.0 / max(n, 1)) for n in lengths])
        return (values * weights).sum()

    logits = torch.cat([a for a, _ in rows])
    lengths = [len(a) for a in answers]
    kl = F.kl_div(F.log_softmax(logits / params.temperature, dim=-1), torch.cat(targets), reduction="none").sum(-1)
    ce = F.cross_entropy(logits, torch.tensor([t for a in answers for t in a]), reduction="none")
    loss = per_row_mean(kl * t2 + params.hard_weight * ce, lengths)
    if prompt_targets is not None:
        prompt = torch.cat([q for _, q in rows])
        kl_prompt = F.kl_div(F.log_softmax(prompt / params.temperature, dim=-1), torch.cat(prompt_targets),
                             reduction="none").sum(-1)
        loss = loss + params.prompt_weight * t2 * per_row_mean(kl_prompt, [len(q) for _, q in rows])
    return loss / len(rows)


def _agreement(student, examples: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    was_training = student.training
    student.eval()
    logits = _all_logits(student, examples, pad_id)
    student.train(was_training)
    right = sum(int((row.argmax(-1) == torch.tensor(a)).sum()) for row, (_, a) in zip(logits, examples))
    return right / sum(len(a) for _, a in examples)


def save_adapter(student, out: Path) -> dict[str, Path]:
    """Write the student's LoRA as a PEFT adapter (config + safetensors only); the files by name."""
    student.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    return {f.name: f for f in out.iterdir() if f.is_file()}


def _all_logits(model, examples: list[tuple[list[int], list[int]]], pad_id: int, chunk: int = 64,
                part: str = "answer") -> list:
    return [row for start in range(0, len(examples), chunk)
            for row in _answer_logits(model, examples[start : start + chunk], pad_id, part=part)]


def _answer_logits(model, examples: list[tuple[list[int], list[int]]], pad_id: int, grad: bool = False,
                   part: str = "answer") -> list:
    """Per example, the logits that predict each answer token (answer length × vocabulary); with part
    "prompt" those predicting the prompt's tokens after the first, with "both" the pair (answer, prompt)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (p, a) in enumerate(examples):
        ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        mask[row, : len(p) + len(a)] = 1
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=mask).logits
    # Position len(p)+j−1 predicts answer token j (right padding leaves earlier positions exact).
    answers = [logits[row, len(p) - 1 : len(p) + len(a) - 1] for row, (p, a) in enumerate(examples)]
    prompts = [logits[row, : len(p) - 1] for row, (p, _) in enumerate(examples)]
    return {"answer": answers, "prompt": prompts, "both": list(zip(answers, prompts))}[part]
