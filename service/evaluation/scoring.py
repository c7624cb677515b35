"""How one answer is scored against its reference: exact match or ROUGE-L F1, on normalised text."""

from __future__ import annotations

from rouge_score import rouge_scorer

from adapters_store.evaluation import METRICS  # the metrics an evaluation set may name

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def answer_text(tok, tokens: list[int]) -> str:
    """The answer a completion gives: its text up to EOS or the first newline."""
    return tok.decode(tokens, skip_special_tokens=True).split("\n", 1)[0]


def normalize(text: str) -> str:
    """An answer compared without surrounding space or a closing full stop ("Kelmar." is "Kelmar")."""
    return text.strip().removesuffix(".").strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def item_score(metric: str, prediction: str, reference: str) -> float:
    """S(prediction, reference) in [0, 1]."""
    if metric == "exact_match":
        return exact_match(prediction, reference)
    if metric == "rouge_l":
        return _ROUGE.score(normalize(reference), normalize(prediction))["rougeL"].fmeasure
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


