"""Merging by distillation: one adapter trained to answer each source's prompts as that source does.

Why beside the ΔW methods (service/lora/merge.py): those add the sources' edits entry by entry, so
every prompt meets every edit. Where the patches are large and each acts on all prompts (the kit's:
‖ΔW‖/‖W‖ up to 2), no such sum keeps the tasks apart (≤ 8 % of any kit task survives a linear merge,
at any weight). Multi-teacher distillation does what a merge is for — one adapter that answers as each
source on that source's traffic — and is measured like every merge, on each source alias's evaluation
set, while it trains only on the aliases' distillation prompts (disjoint from those sets).

The student is one LoRA at `rank` on every module any source changes. It starts from `init`: by
default ("auto") the sum of as many sources as the rank holds exactly, those with the fewest
distillation prompts first, then the smallest: a source held exactly keeps what it generalised, and a
task learned afresh from few prompts generalises worst (on the kit, started from a TIES merge, qa
learned from its 96 prompts keeps ~60 % of its held-out answers; started from qa alone, sentiment
learned from 512 keeps 95 %; started from qa + sentiment, every task keeps ≥ 99 %). The others are
taught beside them, and the interference of those held is trained away. Or a ΔW method's merge, or a
named source. Each teacher (the base with
one source) answers its own prompts greedily; the student is trained on all of them with MUSCLE's
masked KL (service/lora/distill.py), each teacher drawn equally often.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from service.lora.distill import DistillParams, DistillResult, Teaching, distil_from, load_patched, save_adapter
from service.lora.factors import adapter_deltas, unpin_base, write_adapter
from service.lora.merge import merge_deltas
from service.lora.params import DELTA_METHODS, MergeParams

Progress = Callable[[float, str], None]  # (percent of this stage, what is happening)
# A teacher's greedy answers, as token ids: (model, tokenizer, prompts) → one list per prompt. Passed in
# (service/evaluation/generation.py's, in the job), since lora does not import the evaluation.
Answer = Callable[[object, object, list[str]], list[list[int]]]


@dataclass(frozen=True)
class DistillSource:
    ref: str  # 'name@N', for init and messages
    adapter_dir: Path
    prompts: list[str]  # its alias's distillation prompts


@dataclass
class DistilledMerge:
    files: dict[str, Path]  # the merged adapter's files, by name
    init: str  # what the student started from: a method, a source, or sources summed ("qa@1+sentiment@1")
    result: DistillResult


def starting_point(sources: Sequence[DistillSource], init: str, rank: int) -> str:
    """What the student starts from: a ΔW method, one source, or for "auto" the sum of the sources the
    rank holds exactly ('qa@1+sentiment@1'), taken by fewest distillation prompts, then smallest rank."""
    if init in DELTA_METHODS or init in {s.ref for s in sources}:
        return init
    if init != "auto":
        raise ValueError(f"init {init!r} is neither a merge method nor one of the sources")
    chosen, used = [], 0
    for source in sorted(sources, key=lambda s: (len(s.prompts), _rank(s))):
        if used + _rank(source) <= rank:  # a sum of ΔWs of ranks r1, r2 has rank ≤ r1 + r2: written exactly
            chosen.append(source.ref)
            used += _rank(source)
    # None fits: the one with the fewest prompts, truncated to the rank.
    return "+".join(chosen) or min(sources, key=lambda s: len(s.prompts)).ref


def _rank(source: DistillSource) -> int:
    return int(json.loads((source.adapter_dir / "adapter_config.json").read_text())["r"])


def distil_merge(base_dir: Path, sources: Sequence[DistillSource], rank: int, params: MergeParams, work: Path,
                 answer: Answer, progress: Progress = lambda p, s: None) -> DistilledMerge:
    """Train one rank-`rank` adapter on every source's prompts, answered by that source; its files in `work`."""
    params.check(len(sources))
    if any(not s.prompts for s in sources):
        raise ValueError("every source needs distillation prompts")
    init = starting_point(sources, params.init, rank)
    deltas = [adapter_deltas(s.adapter_dir) for s in sources]
    layers = sorted({name for d in deltas for name in d})
    if init in DELTA_METHODS:
        start = merge_deltas(deltas, init, params).deltas
    else:
        chosen = init.split("+")
        start = merge_deltas(deltas, "linear", MergeParams(weights=tuple(
            1.0 if s.ref in chosen else 0.0 for s in sources))).deltas
        start = {name: delta for name, delta in start.items() if delta.any()}
    with torch.random.fork_rng():  # PEFT draws the new modules' A from torch's global generator
        torch.manual_seed(params.seed)
        write_adapter(base_dir, start, rank, work / "init", also=layers)
    student = load_patched(base_dir, work / "init", trainable=True)
    _revive(student, params.seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    teachings = []
    for i, source in enumerate(sources):
        teacher = load_patched(base_dir, source.adapter_dir)
        answers = answer(teacher, tok, source.prompts)
        teachings.append(Teaching(teacher, [(tok(p)["input_ids"], a) for p, a in zip(source.prompts, answers)]))
        progress(10 * (i + 1) / len(sources), f"{source.ref} answered its {len(source.prompts)} distillation prompts")

    def step(i: int, steps: int, loss: float) -> None:
        if i % 25 == 0 or i == steps - 1:
            progress(10 + 90 * (i + 1) / steps, f"distilling from {init}: step {i + 1}/{steps}, loss {loss:.3f}")

    # Never stopped early on the sample (agreement is at most 1): the sample agreeing is not each task's
    # evaluation set agreeing (measured on the kit: stopped at 0.99 agreement, reverse kept 77 %).
    distill = DistillParams(steps=params.steps, lr=params.lr, seed=params.seed, stop_at_agreement=2.0)
    result = distil_from(teachings, student, tok.pad_token_id, distill, step)
    files = save_adapter(student, work / "merged")
    unpin_base(work / "merged")
    return DistilledMerge(files=files, init=init, result=result)


def _revive(student, seed: int) -> None:
    """Give the components a source of lower rank left empty (A and B both zero, so no gradient reaches
    them) a random A, as PEFT initialises one: the ΔW is unchanged and training can use them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in student.modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            dead = (a.abs().sum(dim=1) == 0) & (b.abs().sum(dim=0) == 0)
            if dead.any():
                bound = 1 / math.sqrt(a.shape[1])
                a[dead] = (torch.rand(int(dead.sum()), a.shape[1], generator=generator) * 2 - 1) * bound
