"""The gate: thresholds a candidate's compatibility report must meet before it replaces the active version."""

from __future__ import annotations

from dataclasses import dataclass, fields

from adapters_store.evaluation import EvaluationStore
from service.evaluation.report import Report


@dataclass(frozen=True)
class Gate:
    """Thresholds a candidate must meet to replace the incumbent (per alias; these are the defaults)."""

    max_nfr: float = 0.10  # at most 1 in 10 items may get worse …
    min_score_delta: float = -0.02  # … and the task score may not drop by more than 2 points
    max_perplexity_ratio: float = 1.25  # no collapse on the probe set
    # Live, after a move (service/replica/live_guard.py): off unless set (a version may be meant to answer otherwise).
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


def gate_for(evals: EvaluationStore, alias: str) -> Gate:
    """The alias's gate: its stored thresholds over the defaults."""
    known = {f.name for f in fields(Gate)}
    return Gate(**{k: v for k, v in (evals.gate(alias) or {}).items() if k in known})
