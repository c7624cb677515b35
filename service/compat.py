"""Compatibility of a candidate version with the version it would replace, and the gate on it.

Per item x with reference y: S(old, y) and S(new, y) (exact match, or ROUGE-L F1 for free text) and
D(x) = S(new) − S(old). MUSCLE's negative flip rate NFR is the share of items with D < 0 (the new
version gets worse where the old one was better), the positive flip rate PFR the share with D > 0.
Mean gain and mean regression average D over the items that improved / regressed. Agreement is the
share of items on which both versions answer the same. The perplexity ratio new/old on the probe
set is a surrogate for collapse: a patch that wrecks the language model shows it there first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rouge_score import rouge_scorer

from adapters_store.evaluation import METRICS
from service.kit.evaluate import exact_match, normalize
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def item_score(metric: str, prediction: str, reference: str) -> float:
    """S(prediction, reference) in [0, 1]."""
    if metric == "exact_match":
        return exact_match(prediction, reference)
    if metric == "rouge_l":
        return _ROUGE.score(normalize(reference), normalize(prediction))["rougeL"].fmeasure
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


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
    items: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the per-item rows."""
        out = asdict(self)
        out.pop("items")
        return out


def compare(candidate: str, incumbent: str | None, base: str, metric: str, rows: list[dict],
            old_outputs: list[str], new_outputs: list[str], perplexity_old: float, perplexity_new: float) -> Report:
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
        perplexity_ratio=perplexity_new / perplexity_old if perplexity_old else float("inf"),
        items=[{**asdict(i), "d": i.d} for i in items])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Gate:
    """Thresholds a candidate must meet to replace the incumbent (per alias; these are the defaults)."""

    max_nfr: float = 0.10  # at most 1 in 10 items may get worse …
    min_score_delta: float = -0.02  # … and the task score may not drop by more than 2 points
    max_perplexity_ratio: float = 1.25  # no collapse on the probe set
    # Live, after a move (service/live_guard.py): off unless set, as a version may be meant to answer differently.
    min_live_agreement: float | None = None
    live_window: int = 20

    def check(self, report: Report | dict) -> list[str]:
        """The reasons the candidate fails (empty: it passes)."""
        r = report if isinstance(report, dict) else report.summary()
        reasons = []
        if r["nfr"] > self.max_nfr:
            reasons.append(f"negative flip rate {r['nfr']:.3f} > {self.max_nfr}")
        if r["score_new"] - r["score_old"] < self.min_score_delta:
            reasons.append(f"score {r['score_old']:.3f} → {r['score_new']:.3f} "
                           f"(change {r['score_new'] - r['score_old']:+.3f} < {self.min_score_delta:+})")
        if r["perplexity_ratio"] > self.max_perplexity_ratio:
            reasons.append(f"probe perplexity ratio {r['perplexity_ratio']:.3f} > {self.max_perplexity_ratio}")
        return reasons
