"""What the registry keeps for judging versions: evaluation sets, gate thresholds, compatibility reports.

Evaluation sets (JSONL rows of prompt + reference) and the per-item rows of reports are blobs; Redis
holds small records pointing to them:
  evalsets            hash  alias → {digest, metric, n, updated_at, updated_by}
  distill             hash  alias → {digest, n, updated_at, updated_by}: prompts a repair distils on
  probe               str   {digest, n} of the probe set every version's perplexity is measured on
  gates               hash  alias → gate thresholds (missing: the defaults)
  patch:<name>:compat hash  version → report summary + items digest + gate verdict (latest evaluation)
"""

from __future__ import annotations

import json
import time

import redis

from adapters_store.blobs import BlobStore
from adapters_store.errors import Incompatible

METRICS = ("exact_match", "rouge_l")


def _jsonl_objects(data: bytes):
    """(line number, object) of each non-empty JSONL line; ValueError naming the first that is not a JSON object."""
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {n} is not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {n} is not a JSON object")
        yield n, row


def parse_rows(data: bytes) -> list[dict]:
    """JSONL rows of {prompt, reference}; ValueError naming the first bad line."""
    rows = []
    for n, row in _jsonl_objects(data):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("reference"), str):
            raise ValueError(f"line {n} needs string fields 'prompt' and 'reference'")
        rows.append({"prompt": row["prompt"], "reference": row["reference"]})
    if not rows:
        raise ValueError("the set has no rows")
    return rows


def parse_texts(data: bytes) -> list[str]:
    """JSONL rows of {text} (other fields ignored); ValueError naming the first bad line."""
    texts = []
    for n, row in _jsonl_objects(data):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"line {n} needs a non-empty string field 'text'")
        texts.append(row["text"])
    if not texts:
        raise ValueError("the set has no texts")
    return texts


def parse_prompts(data: bytes) -> list[str]:
    """JSONL rows of {prompt} (other fields ignored: no reference needed); ValueError naming the first bad line."""
    prompts = []
    for n, row in _jsonl_objects(data):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"line {n} needs a non-empty string field 'prompt'")
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError("the set has no prompts")
    return prompts


def _rows_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


class EvaluationStore:
    """Evaluation sets per alias, the probe set, gate thresholds per alias, and reports per version."""

    def __init__(self, client: redis.Redis, blobs: BlobStore, prefix: str = "ps:"):
        self.r, self.blobs, self.prefix = client, blobs, prefix

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(x) for x in parts)

    # -- sets -------------------------------------------------------------------------------------------
    def attach_evalset(self, alias: str, rows: list[dict], metric: str = "exact_match", actor: str = "system") -> dict:
        """Store `rows` as `alias`'s evaluation set (replacing any before); returns its record."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        digest = self.blobs.put_bytes(_rows_bytes(rows))
        record = {"digest": digest, "metric": metric, "n": len(rows), "updated_at": time.time(), "updated_by": actor}
        self.r.hset(self._k("evalsets"), alias, json.dumps(record))
        return record

    def evalset_record(self, alias: str) -> dict | None:
        raw = self.r.hget(self._k("evalsets"), alias)
        return json.loads(raw) if raw else None

    def evalset(self, alias: str) -> tuple[list[dict], str] | None:
        """(rows, metric) of `alias`'s evaluation set, or None if it has none."""
        record = self.evalset_record(alias)
        if record is None:
            return None
        with self.blobs.open(record["digest"]) as f:
            return parse_rows(f.read()), record["metric"]

    # -- distillation prompts (what a repair trains on; never the evaluation set) ----------------------
    def attach_prompts(self, alias: str, prompts: list[str], actor: str = "system") -> dict:
        """Store `prompts` as `alias`'s distillation set (replacing any before); its record.

        Refused (Incompatible) if any is an item of the alias's evaluation set: a repair trained on the
        items it is judged on would pass its gate by memory, not by keeping the patch's behaviour.
        """
        overlap = self.overlap(alias, prompts)
        if overlap:
            raise Incompatible(f"{len(overlap)} of the {len(prompts)} prompts are items of {alias!r}'s evaluation "
                               f"set (first: {overlap[0][:80]!r}); distillation prompts must be other prompts",
                               field="prompts")
        digest = self.blobs.put_bytes(_rows_bytes([{"prompt": p} for p in prompts]))
        record = {"digest": digest, "n": len(prompts), "updated_at": time.time(), "updated_by": actor}
        self.r.hset(self._k("distill"), alias, json.dumps(record))
        return record

    def prompts_record(self, alias: str) -> dict | None:
        raw = self.r.hget(self._k("distill"), alias)
        return json.loads(raw) if raw else None

    def prompts(self, alias: str) -> list[str] | None:
        """`alias`'s distillation prompts, or None if it has none."""
        record = self.prompts_record(alias)
        if record is None:
            return None
        with self.blobs.open(record["digest"]) as f:
            return parse_prompts(f.read())

    def overlap(self, alias: str, prompts: list[str]) -> list[str]:
        """The prompts that are also items of `alias`'s evaluation set."""
        found = self.evalset(alias)
        judged = {r["prompt"] for r in found[0]} if found else set()
        return [p for p in prompts if p in judged]

    def set_probe(self, texts: list[str]) -> dict:
        """The probe set (plain texts) every version's perplexity is measured on."""
        digest = self.blobs.put_bytes(_rows_bytes([{"text": t} for t in texts]))
        record = {"digest": digest, "n": len(texts)}
        self.r.set(self._k("probe"), json.dumps(record))
        return record

    def probe(self) -> list[str]:
        raw = self.r.get(self._k("probe"))
        if not raw:
            return []
        with self.blobs.open(json.loads(raw)["digest"]) as f:
            return [json.loads(line)["text"] for line in f.read().decode().splitlines() if line.strip()]

    # -- gates ------------------------------------------------------------------------------------------
    def set_gate(self, alias: str, thresholds: dict) -> None:
        self.r.hset(self._k("gates"), alias, json.dumps(thresholds))

    def gate(self, alias: str) -> dict | None:
        raw = self.r.hget(self._k("gates"), alias)
        return json.loads(raw) if raw else None

    # -- reports ----------------------------------------------------------------------------------------
    def save_report(self, patch: str, version: int, summary: dict, items: list[dict], verdict: dict) -> dict:
        """Keep the report of `patch@version` (its latest evaluation), the items as a blob."""
        digest = self.blobs.put_bytes(json.dumps(items, ensure_ascii=False).encode())
        record = {**summary, "items_digest": digest, "gate": verdict, "evaluated_at": time.time()}
        self.r.hset(self._k("patch", patch, "compat"), str(version), json.dumps(record))
        return record

    def report(self, patch: str, version: int, with_items: bool = True) -> dict | None:
        """The stored report of `patch@version`, with its per-item rows unless asked not to."""
        raw = self.r.hget(self._k("patch", patch, "compat"), str(version))
        if not raw:
            return None
        record = json.loads(raw)
        if with_items:
            with self.blobs.open(record["items_digest"]) as f:
                record["items"] = json.loads(f.read())
        return record

    def reports(self) -> list[dict]:
        """Every stored report's summary (for metrics)."""
        out = []
        for key in self.r.scan_iter(match=self._k("patch", "*", "compat")):
            for raw in self.r.hvals(key):
                out.append(json.loads(raw))
        return out
