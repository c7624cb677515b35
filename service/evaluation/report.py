"""Compatibility of a candidate version with the version it would replace (the gate on it: gate.py).

Per item x with reference y: S(old, y) and S(new, y) (exact match, or ROUGE-L F1 for free text) and
D(x) = S(new) − S(old). MUSCLE's negative flip rate NFR is the share of items with D < 0 (the new
version gets worse where the old one was better), the positive flip rate PFR the share with D > 0.
Mean gain and mean regression average D over the items that improved / regressed. Agreement is the
share of items on which both versions answer the same. The perplexity ratio new/old on the probe
set is a surrogate for collapse: a patch that wrecks the language model shows it there first. When
the two versions sit on different bases (an upgrade), each version's perplexity is taken relative to
its own base alone: the new base's drift on the probe set (reported as `perplexity_base_drift`) is the
base's, not the patch's, and is not charged to the candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from service.evaluation.scoring import item_score, normalize


@dataclass
class Item:
    prompt: str
    reference: str
    old: str
    new: str
    s_old: float
    s_new: float

    @property
    def d(self) -> float:
        return self.s_new - self.s_old


@dataclass
class Report:
    """The compatibility report of `candidate` against `incumbent` (what it would replace)."""

    candidate: str  # 'name@N'
    incumbent: str | None  # 'name@N', or None: the base alone
    base: str
    metric: str
    n: int
    score_old: float
    score_new: float
    nfr: float
    pfr: float
    mean_gain: float
    mean_regression: float
    agreement: float
    perplexity_old: float
    perplexity_new: float
    perplexity_ratio: float
    perplexity_base_drift: float = 1.0  # new base alone / old base alone on the probe set (1: same base)
    items: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the per-item rows."""
        out = asdict(self)
        out.pop("items")
        return out


def compare(candidate: str, incumbent: str | None, base: str, metric: str, rows: list[dict],
            old_outputs: list[str], new_outputs: list[str], perplexity_old: float, perplexity_new: float,
            base_drift: float = 1.0) -> Report:
    """The report from both versions' outputs on the evaluation rows ({prompt, reference})."""
    items = [Item(r["prompt"], r["reference"], o, n, item_score(metric, o, r["reference"]),
                  item_score(metric, n, r["reference"])) for r, o, n in zip(rows, old_outputs, new_outputs)]
    n = len(items)
    gains = [i.d for i in items if i.d > 0]
    losses = [-i.d for i in items if i.d < 0]
    return Report(
        candidate=candidate, incumbent=incumbent, base=base, metric=metric, n=n,
        score_old=_mean([i.s_old for i in items]), score_new=_mean([i.s_new for i in items]),
        nfr=len(losses) / n if n else 0.0, pfr=len(gains) / n if n else 0.0,
        mean_gain=_mean(gains), mean_regression=_mean(losses),
        agreement=_mean([float(normalize(i.old) == normalize(i.new)) for i in items]),
        perplexity_old=perplexity_old, perplexity_new=perplexity_new,
        perplexity_ratio=perplexity_new / perplexity_old / base_drift if perplexity_old else float("inf"),
        perplexity_base_drift=base_drift,
        items=[{**asdict(i), "d": i.d} for i in items])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
