"""What a memory version does to its edits, as users meet it: greedy answers with and without the memory.

Per edit: Rel (the edit prompt is answered with the target), Gen (its paraphrases are), Loc (its locality
prompts are answered as before the first edit: the base without any memory). Summaries for the batch
the version added and for every edit the version holds, the probe perplexity ratio (a collapse
surrogate), and the gate that decides activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from adapters_store.memories import EditRecord
from service.evaluation.scoring import exact_match


def prompts_of(edits: Sequence[EditRecord]) -> tuple[list[str], list[str]]:
    """(prompts the memory must answer: edit prompts and paraphrases; locality prompts it must leave alone)."""
    asked = [p for e in edits for p in (e.prompt, *e.paraphrases)]
    kept = [loc["prompt"] for e in edits for loc in e.locality]
    return list(dict.fromkeys(asked)), list(dict.fromkeys(kept))


def edit_rows(edits: Sequence[EditRecord], answers: dict[str, str], before: dict[str, str]) -> list[dict]:
    """One row per edit: its Rel, Gen and Loc (None where it has no paraphrase or locality prompt)."""
    rows = []
    for e in edits:
        gen = [exact_match(answers[p], e.target) for p in e.paraphrases]
        loc = [float(answers[x["prompt"]] == before[x["prompt"]]) for x in e.locality]
        rows.append({"id": e.id, "prompt": e.prompt, "target": e.target, "answer": answers[e.prompt],
                     "rel": exact_match(answers[e.prompt], e.target),
                     "gen": sum(gen) / len(gen) if gen else None, "loc": sum(loc) / len(loc) if loc else None})
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Mean Rel, Gen and Loc over `rows` (each over the edits that have one)."""
    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {"edits": len(rows), "rel": mean("rel"), "gen": mean("gen"), "loc": mean("loc")}


def probe_texts(probe: Sequence[str], edits: Sequence[EditRecord]) -> list[str]:
    """The probe texts an edit is not about: a text that asks one of the edits (its prompt or a paraphrase)
    is expected to change, and would be charged to the memory as collapse."""
    asked = [p for e in edits for p in (e.prompt, *e.paraphrases)]
    return [t for t in probe if not any(a in t for a in asked)]


@dataclass(frozen=True)
class MemoryGate:
    """Thresholds a memory version must meet over every edit it holds (per memory; these are the defaults)."""

    min_rel: float = 0.9  # the edits took
    min_gen: float = 0.0  # reported; how far a fact must carry to other phrasings is the operator's call
    # Nothing else moved. Not 0.99: on the kit, Loc is 0.90-1.00 (README: the per-token router also speaks
    # where the base's own continuation of a task prompt states a fact of an edited relation).
    min_loc: float = 0.9
    max_perplexity_ratio: float = 1.1
    # Each patched alias the memory reaches keeps this share of its evaluation answers (the held-out half: the
    # edit job trains the memory quiet on the other half, read under the alias's patch).
    min_tasks: float = 0.9

    def check(self, summary: dict, perplexity_ratio: float | None, tasks: dict | None = None) -> list[str]:
        """The reasons the version fails (empty: it passes)."""
        reasons = []
        for key, floor in (("rel", self.min_rel), ("gen", self.min_gen), ("loc", self.min_loc)):
            if summary.get(key) is not None and summary[key] < floor:
                reasons.append(f"{key} {summary[key]:.3f} < {floor}")
        if perplexity_ratio is not None and perplexity_ratio > self.max_perplexity_ratio:
            reasons.append(f"probe perplexity ratio {perplexity_ratio:.3f} > {self.max_perplexity_ratio}")
        for alias, t in sorted((tasks or {}).items()):
            if t.get("held_out") is not None and t["held_out"] < self.min_tasks:
                reasons.append(f"{alias}: {t['held_out']:.3f} of its held-out evaluation answers unchanged "
                               f"< {self.min_tasks}")
        return reasons

    @classmethod
    def of(cls, stored: dict) -> MemoryGate:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def as_dict(self) -> dict:
        return asdict(self)
