"""The kit's reference scores: greedy exact match of a model on a task's examples."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from service.evaluation.generation import greedy_generate
from service.evaluation.scoring import answer_text, exact_match
from service.kit.tasks import Example


def score(model: PreTrainedModel, tok: PreTrainedTokenizerFast, examples: list[Example]) -> float:
    """Share of examples whose greedy answer equals the reference."""
    completions = greedy_generate(model, tok, [ex.prompt for ex in examples])
    hits = [exact_match(answer_text(tok, c), ex.reference) for c, ex in zip(completions, examples)]
    return sum(hits) / max(1, len(hits))
