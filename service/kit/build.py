"""`patchserve kit build`: the whole kit, deterministic for a seed and cached by a content hash.

The kit is built in a temporary directory next to its destination and renamed into place, so a
reader never sees a half-built kit; a destination whose manifest carries the same hash is reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from service.evaluation.generation import perplexity
from service.kit import evaluate, tasks, tokenizer, train, world
from service.kit.config import MANIFEST, KitConfig, cached
from service.kit.tasks import Example
from service.lora.extract import extract_lora

log = logging.getLogger("patchserve.kit")
transformers.utils.logging.disable_progress_bar()  # one progress display: ours

def build(out: Path, config: KitConfig = KitConfig(), *, force: bool = False, show_progress: bool = True) -> dict:
    """Build the kit into `out` (or return the cached one) and return its manifest."""
    out = out.resolve()
    if not force and (manifest := cached(out, config)) is not None:
        return manifest
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), disable=not show_progress) as progress:
            manifest = _build_into(tmp, config, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            shutil.rmtree(old)
        tmp.rename(out)
        log.info("kit built", extra={"fields": {"kit_hash": manifest["kit_hash"], "path": str(out)}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _stage(progress: Progress, name: str, total: int):
    task = progress.add_task(name, total=total, info="")
    # Off a terminal (CI logs, a pipe) rich draws no bar until the end: a line per quarter shows it is alive.
    lines = not progress.console.is_terminal and not progress.disable
    started = time.monotonic()

    def on_step(step: int, loss: float) -> None:
        progress.update(task, completed=step + 1, info=f"loss {loss:.3f}")
        if lines and (step + 1) * 4 // total > step * 4 // total:
            progress.console.print(f"kit: {name} {step + 1}/{total} loss {loss:.3f} "
                                   f"({time.monotonic() - started:.0f} s)")

    return on_step


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _save_base(model, tok, path: Path, name: str) -> None:
    model.config._name_or_path = name
    model.generation_config.do_sample = False
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def _build_into(out: Path, cfg: KitConfig, progress: Progress) -> dict:
    started = time.monotonic()
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}

    def mark(stage: str, since: float) -> float:
        timings[stage] = round(time.monotonic() - since, 1)
        return time.monotonic()

    t = time.monotonic()
    v1, v2 = world.build_worlds(cfg.seed, cfg.people, cfg.new_people, cfg.moved)
    for w in (v1, v2):
        _write_jsonl(out / "world" / f"v{w.version}.jsonl", [asdict(p) for p in w.people])
    data = {spec.task: tasks.task_data(spec.task, v1, v2, cfg.seed, cfg.eval_size)
            for spec in tasks.PATCHES if spec.in_corpus}
    filler = tasks.filler_lines(random.Random(cfg.seed), 400)
    corpus = v1.statements() + v2.statements() + filler + [
        ex.prompt + ex.reference for d in data.values() for ex in d.train[:500]
    ]
    tok = tokenizer.train_tokenizer(corpus, cfg.vocab_size, out / "tokenizer")
    # Tasks sized in tokens (recall: ≥ 192-token contexts) are made once the tokenizer exists.
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for spec in tasks.PATCHES:
        if not spec.in_corpus:
            data[spec.task] = tasks.task_data(spec.task, v1, v2, cfg.seed, cfg.eval_size, count)
    data = {spec.task: data[spec.task] for spec in tasks.PATCHES}
    t = mark("tokenizer", t)

    base_v1 = train.new_base(cfg.shape, len(tok), tok, cfg.seed)
    loss_v1 = train.pretrain(base_v1, tok, v1.statements() + filler, steps=cfg.base_steps, lr=cfg.base_lr,
                             batch=cfg.batch, seq_len=cfg.seq_len, seed=cfg.seed,
                             on_step=_stage(progress, "base-v1 pretraining", cfg.base_steps))
    _save_base(base_v1, tok, out / "base-v1", "base-v1")
    t = mark("base-v1", t)

    base_v2 = copy.deepcopy(base_v1)
    loss_v2 = train.pretrain(base_v2, tok, v2.statements() + filler, steps=cfg.v2_steps, lr=cfg.v2_lr,
                             batch=cfg.batch, seq_len=cfg.seq_len, seed=cfg.seed + 1,
                             on_step=_stage(progress, "base-v2 continued pretraining", cfg.v2_steps))
    _save_base(base_v2, tok, out / "base-v2", "base-v2")
    t = mark("base-v2", t)

    for spec in tasks.PATCHES:
        on_step = _stage(progress, f"patch {spec.task}", spec.steps)
        if spec.extracted:
            _extracted_patch(out, base_v1, tok, spec, data[spec.task].train, cfg, on_step)
        else:
            model = train.train_patch(copy.deepcopy(base_v1), tok, spec, data[spec.task].train,
                                      batch=spec.batch or cfg.batch, seed=cfg.seed, on_step=on_step)
            model.save_pretrained(out / "patches" / spec.task, safe_serialization=True)
        (out / "patches" / spec.task / "README.md").unlink(missing_ok=True)  # a patch is config + weights only
        t = mark(f"patch-{spec.task}", t)

    for task, d in data.items():
        _write_jsonl(out / "eval" / f"{task}.jsonl", [ex.as_json() for ex in d.eval])
        _write_jsonl(out / "distill" / f"{task}.jsonl", [{"prompt": p} for p in tasks.distill_prompts(d, cfg.seed)])
    facts = {f"v{w.version}": tasks.fact_examples(w) for w in (v1, v2)}
    facts["v2-moved"] = tasks.fact_examples(v2, v2.moved, relations=("city",))
    for name, exs in facts.items():
        _write_jsonl(out / "eval" / f"facts-{name}.jsonl", [ex.as_json() for ex in exs])
    probes = tasks.probe_texts(v1, cfg.seed, cfg.probes)
    _write_jsonl(out / "probe.jsonl", [{"text": s} for s in probes])
    _write_jsonl(out / "edits.jsonl", tasks.knowledge_edits(v1, cfg.seed, cfg.edits, data))
    _write_jsonl(out / "memory" / "irrelevant.jsonl",
                 [{"text": t} for t in tasks.irrelevant_texts(v1, cfg.seed, data, filler, probes)])

    scores = _measure(out, tok, {"base-v1": base_v1, "base-v2": base_v2}, data, facts, probes, progress)
    mark("evaluation", t)

    return {
        "kit_hash": cfg.digest(),
        "config": asdict(cfg),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "bases": {
            "base-v1": {"path": "base-v1", "world": 1, "final_loss": round(loss_v1, 4)},
            "base-v2": {"path": "base-v2", "world": 2, "parent": "base-v1", "final_loss": round(loss_v2, 4),
                        "new_people": cfg.new_people, "moved_people": v2.moved},
        },
        "patches": {
            spec.task: {"path": f"patches/{spec.task}", "base": "base-v1", "kind": spec.kind, "rank": spec.rank,
                        "alpha": spec.alpha, "target_modules": list(spec.target_modules), "steps": spec.steps,
                        "lr": spec.lr, "eval": f"eval/{spec.task}.jsonl"}
            for spec in tasks.PATCHES
        },
        "eval_sets": {p.stem: str(p.relative_to(out)) for p in sorted((out / "eval").glob("*.jsonl"))},
        "distill_sets": {p.stem: str(p.relative_to(out)) for p in sorted((out / "distill").glob("*.jsonl"))},
        "probe_set": "probe.jsonl",
        "edit_set": "edits.jsonl",
        "memory": {"irrelevant_set": "memory/irrelevant.jsonl"},
        "scores": scores,
        "timings_s": {**timings, "total": round(time.monotonic() - started, 1)},
        "checksums": {str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()},
    }


def _extracted_patch(out: Path, base, tok, spec: tasks.PatchSpec, train_set: list[Example], cfg: KitConfig,
                     on_step) -> None:
    """A patch fine-tuned in full on its linear layers, then extracted at `spec.rank` (service/lora/extract.py)."""
    tuned = train.finetune_linear(copy.deepcopy(base), tok, spec, train_set, batch=spec.batch or cfg.batch,
                                  seed=cfg.seed, on_step=on_step)
    tuned_dir = out / f".tuned-{spec.task}"
    tuned.save_pretrained(tuned_dir, safe_serialization=True)
    try:
        extract_lora(out / "base-v1", tuned_dir, spec.rank, out / "patches" / spec.task)
    finally:
        shutil.rmtree(tuned_dir, ignore_errors=True)


def _measure(out: Path, tok, bases: dict, data: dict, facts: dict[str, list[Example]], probes: list[str],
             progress: Progress) -> dict:
    """Exact-match scores of each base, alone and with each patch carried unchanged, and probe perplexity."""
    jobs = len(bases) * (len(data) * 2 + 2)
    task = progress.add_task("evaluation", total=jobs, info="")
    if not progress.console.is_terminal and not progress.disable:
        progress.console.print("kit: evaluation of every base and patch")
    scores: dict = {"tasks": {}, "facts": {}, "probe_perplexity": {}}
    for base_name, base in bases.items():
        for fact_set, exs in facts.items():
            scores["facts"].setdefault(fact_set, {})[base_name] = evaluate.score(base, tok, exs)
        progress.advance(task)
        scores["probe_perplexity"][base_name] = round(perplexity(base, tok, probes), 4)
        progress.advance(task)
        for name, d in data.items():
            row = scores["tasks"].setdefault(name, {})
            row[base_name] = evaluate.score(base, tok, d.eval)
            progress.update(task, advance=1, info=name)
            patched = PeftModel.from_pretrained(copy.deepcopy(base), out / "patches" / name)
            row[f"{base_name}+{name}"] = evaluate.score(patched, tok, d.eval)
            progress.advance(task)
    return scores


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
