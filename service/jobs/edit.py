"""`edit` and `revoke`: the next version of a side memory, trained, measured, gated and activated.

`edit` trains on top of the version the memory serves now: its ΔW, its edits replayed, the new batch
added (service/memory/wise.py). `revoke` takes one edit back: no anchor can, so the new version is
trained from the newest ancestor that never held the edit, on every other edit the memory holds
now. Both then answer every edit greedily with and without the memory (Rel/Gen/Loc), measure the
probe perplexity against the base alone, register the version with its report (immutable), and
move the memory's pointer if the gate passes — a compare-and-set on the version trained on top of,
so a move made meanwhile is never overwritten. A retried job reuses the version it registered.

A memory reaches every alias it is attached to (its base: every alias on it without a memory of its own),
and those aliases are served under their LoRA patches, which move what the router reads. So the memory
is also trained quiet on half of each such alias's evaluation prompts (and the patch's own answers to
them), read under the alias's patch, and the report says, per alias, how many of the evaluation set's
answers the memory left as the patch alone gives them (`tasks`; `held_out`: the half not trained on).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from adapters_store.blobs import materialize, put_files
from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.memories import EditRecord, MemoryRecord, MemoryVersion
from adapters_store.registry import PatchVersion
from service.evaluation.generation import greedy_generate
from service.evaluation.memory_report import MemoryGate, edit_rows, probe_texts, prompts_of, summarize
from service.evaluation.scoring import answer_text
from service.jobs.context import JobContext
from service.jobs.worker import JobRefused, Progress
from service.memory import memory_file
from service.memory.hf_hook import decoder_layers, default_layer
from service.memory.memory_file import MemoryWeights
from service.memory.wise import Edit, WiseConfig, down_inputs, train_memory


def edit(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: memory, edits [{prompt, target, paraphrases?, locality?}], reason."""
    name = job.params["memory"]
    record, parent = _memory(ctx, name)
    if (done := ctx.memories.find_by_job(name, job.id)) is not None:
        return _finish(ctx, job, done, parent, progress)
    held = list(parent.edits) if parent else []
    added = _new_edits(ctx, name, job)
    return _train_and_register(ctx, job, record, parent, new=added, replay=held, keep=held + added,
                               parent=parent, added=[e.id for e in added], revoked=[], progress=progress)


def revoke(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: memory, edit (an edit id the served version holds), reason."""
    name, edit_id = job.params["memory"], job.params["edit"]
    record, parent = _memory(ctx, name)
    if (done := ctx.memories.find_by_job(name, job.id)) is not None:
        return _finish(ctx, job, done, parent, progress)
    if parent is None or edit_id not in {e.id for e in parent.edits}:
        raise JobRefused(f"memory {name} serves no edit {edit_id!r}")
    ancestor = parent
    while ancestor is not None and edit_id in {e.id for e in ancestor.edits}:
        ancestor = ctx.memories.get_version(name, ancestor.parent) if ancestor.parent else None
    base_edits = {e.id for e in ancestor.edits} if ancestor else set()
    keep = [e for e in parent.edits if e.id != edit_id]
    gone = next(e for e in parent.edits if e.id == edit_id)
    new = [e for e in keep if e.id not in base_edits]
    replay = [e for e in keep if e.id in base_edits]
    # Training without the edit is not enough: the other edits' relation ("works as a") still reaches the
    # router on the revoked prompt, and it answered with another edit's target (measured on the kit). So the
    # revoked prompt and its paraphrases join the texts the memory must stay quiet on.
    return _train_and_register(ctx, job, record, ancestor, new=new, replay=replay, keep=keep,
                               parent=parent, added=[], revoked=[edit_id], progress=progress,
                               quiet=[gone.prompt, *gone.paraphrases])


def _memory(ctx: JobContext, name: str):
    record = ctx.memories.get(name)
    if record is None:
        raise JobRefused(f"no memory {name!r}")
    pointer = ctx.memories.pointer(name)
    parent = ctx.memories.get_version(name, pointer.version) if pointer and pointer.version else None
    return record, parent


def _new_edits(ctx: JobContext, name: str, job: Job) -> list[EditRecord]:
    # Ids reserved once per job, so a retry names the same edits the same way.
    first = ctx.memories.reserve_edit_ids(name, len(job.params["edits"]), job.id)
    return [EditRecord(id=f"e{first + i}", prompt=e["prompt"], target=e["target"],
                       paraphrases=tuple(e.get("paraphrases") or ()), locality=tuple(
                           {"prompt": loc} if isinstance(loc, str) else dict(loc) for loc in e.get("locality") or ()))
            for i, e in enumerate(job.params["edits"])]


def _train_and_register(ctx: JobContext, job: Job, record: MemoryRecord, train_from: MemoryVersion | None, *,
                        new: list[EditRecord], replay: list[EditRecord], keep: list[EditRecord],
                        parent: MemoryVersion | None, added: list[str], revoked: list[str],
                        progress: Progress, quiet: list[str] | None = None) -> dict:
    name = record.name
    base_path = ctx.base_path(record.base)
    asked = [p for e in keep for p in (e.prompt, *e.paraphrases)]
    candidates = [*(quiet or []), *_irrelevant(ctx, name)]
    start = _weights(ctx, train_from) if train_from else None
    served = _served_with(ctx, record)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
        with ctx.evaluator.base(base_path) as (model, _):
            layer = start.layer if start else _layer(ctx, model)
        held = None  # read between two holds of the base: loading each patch takes the evaluator's lock itself
        if keep and served:
            progress(1, f"reading {len(served)} patched aliases' prompts under their patches")
            held = torch.cat([_patched_inputs(ctx, base_path, layer, version, prompts[::2], asked)
                              for _, version, prompts in served])
        with ctx.evaluator.base(base_path) as (model, tok):
            if not keep:
                weights = None  # every edit revoked: the version is the empty memory
            else:
                # A text that asks one of the memory's edits is where it must speak, not stay quiet.
                said = _with_own_answers(model, tok, candidates, ctx.evaluator.max_new_tokens)
                irrelevant = [t for t in said if not any(a in t for a in asked)]
                # Every irrelevant text's router inputs, in every step: sampled as negatives, each text is met a
                # few times a job, and the base's near-identical answers after held-out task prompts are where the
                # memory spoke (on the kit at T = 100, served Loc on task prompts 0.82 → 0.89).
                bare = down_inputs(model, tok, layer, irrelevant)
                progress(2, f"training on {len(new)} new and {len(replay)} earlier edits")
                trained = train_memory(model, tok, layer, start.delta if start else None,
                                       [Edit(e.prompt, e.target) for e in new],
                                       [Edit(e.prompt, e.target) for e in replay], irrelevant,
                                       # a shard's own mask and sampling per version (WISE's knowledge shards)
                                       WiseConfig(seed=(parent.version if parent else 0) + 1),
                                       progress=lambda f, stage: progress(2 + 58 * f, stage),
                                       always_quiet=quiet or (), quiet_inputs=[held, bare])
                weights = MemoryWeights(trained.delta, trained.threshold, layer)
        progress(60, f"answering {len(keep)} edits with and without the memory")
        report, perplexity_ratio = _report(ctx, base_path, keep, new, weights, progress)
        report["tasks"] = _task_agreement(ctx, base_path, weights, served) if weights is not None else {}
        if weights is None:  # an empty memory still needs a file: a ΔW of zeros that nothing reaches
            with ctx.evaluator.base(base_path) as (model, _):
                down = decoder_layers(model)[layer].mlp.down_proj
                weights = MemoryWeights(torch.zeros(down.out_features, down.in_features), float("inf"), layer)
        path = memory_file.write(Path(tmp), weights)
        files = put_files(ctx.blobs, {path.name: path})
    gate = MemoryGate.of(ctx.memories.gate(name))
    reasons = gate.check(report["all"], perplexity_ratio, report.get("tasks"))
    verdict = {"passed": not reasons, "reasons": reasons, "thresholds": gate.as_dict()}
    meta = {"job": job.id, "layer": layer, "threshold": weights.threshold, "report": report,
            "perplexity_ratio": perplexity_ratio, "gate": verdict,
            "training": trained.stats | {"steps": trained.steps} if keep else {}}
    progress(95, "registering the version")
    version = ctx.memories.create_version(name, files, parent.version if parent else 0, keep, added, revoked, meta,
                                          actor=job.actor, reason=job.params.get("reason", ""))
    return _finish(ctx, job, version, parent, progress)


def _finish(ctx: JobContext, job: Job, version: MemoryVersion, parent: MemoryVersion | None,
            progress: Progress) -> dict:
    """Move the pointer if the version passed its gate (and the memory still serves its parent)."""
    verdict = version.meta["gate"]
    result = {"memory": version.name, "version": version.version, "report": version.meta["report"],
              "perplexity_ratio": version.meta["perplexity_ratio"], "gate": verdict, "activated": False}
    pointer = ctx.memories.pointer(version.name)
    if pointer is not None and pointer.version == version.version:
        return result | {"activated": True}
    if not verdict["passed"]:
        ctx.registry.record("memory_gate_refused", version.name, actor=job.actor, reason="; ".join(verdict["reasons"]),
                            from_ref=f"{version.name}@{parent.version if parent else 0}", to_ref=version.ref)
        return result
    progress(98, "activating")
    try:
        ctx.memories.activate(version.name, version.version, actor=job.actor,
                              reason=job.params.get("reason") or "gate passed",
                              if_current=parent.version if parent else 0)
    except StoreError as exc:
        raise JobRefused(exc.message) from None
    return result | {"activated": True}


def _report(ctx: JobContext, base_path: str, keep: list[EditRecord], new: list[EditRecord],
            weights: MemoryWeights | None, progress: Progress) -> tuple[dict, float | None]:
    asked, kept = prompts_of(keep)
    probe = probe_texts(ctx.evals.probe(), keep)
    before, base_ppl = ctx.evaluator.run_memory(base_path, None, kept, probe)
    progress(75, "answering with the memory")
    answers, ppl = ctx.evaluator.run_memory(base_path, weights, asked + kept, probe)
    rows = edit_rows(keep, dict(zip(asked + kept, answers)), dict(zip(kept, before)))
    new_ids = {e.id for e in new}
    report = {"batch": summarize([r for r in rows if r["id"] in new_ids]), "all": summarize(rows), "items": rows,
              "probe_texts": len(probe)}
    ratio = round(ppl / base_ppl, 4) if ppl is not None and base_ppl else None
    return report, ratio


def _with_own_answers(model, tok, texts: list[str], max_new_tokens: int) -> list[str]:
    """`texts`, and each followed by what the model without a memory answers after it (greedy, one line).

    The memory must stay quiet on what the model says, not only on what it reads: a locality prompt is judged
    by its answer, and on the kit the base answers task prompts with sentences about someone's job, on whose
    tokens a memory trained only on the prompts spoke.
    """
    answers = [answer_text(tok, a) for a in greedy_generate(model, tok, texts, max_new_tokens)]
    return texts + [t + a for t, a in zip(texts, answers) if a.strip()]


def _served_with(ctx: JobContext, record: MemoryRecord) -> list[tuple[str, PatchVersion, list[str]]]:
    """(alias, the patch version it serves, its evaluation prompts) for each patched alias the memory reaches."""
    targets = ctx.memories.targets()
    out = []
    for alias, pointer in sorted(ctx.registry.snapshot().items()):
        own = targets.get(alias)
        reaches = own == record.name or (own is None and record.target == record.base)
        if pointer.base != record.base or not reaches:
            continue
        evalset = ctx.evals.evalset(alias)
        version = ctx.registry.get_version(pointer.patch, pointer.version)
        if evalset is not None and version is not None:
            out.append((alias, version, [row["prompt"] for row in evalset[0]]))
    return out


def _patched_inputs(ctx: JobContext, base_path: str, layer: int, version: PatchVersion, prompts: list[str],
                    asked: list[str]) -> torch.Tensor:
    """The router's inputs on `prompts` and on each followed by the patch's own answer, under `version`."""
    def read(model, tok):
        texts = [t for t in _with_own_answers(model, tok, prompts, ctx.evaluator.max_new_tokens)
                 if not any(a in t for a in asked)]
        return down_inputs(model, tok, layer, texts)
    return ctx.evaluator.with_model(base_path, version, read)


def _task_agreement(ctx: JobContext, base_path: str, weights: MemoryWeights,
                    served: list[tuple[str, PatchVersion, list[str]]]) -> dict:
    """Per patched alias: the share of its evaluation answers the memory leaves as the patch alone gives them.

    `held_out`: over the odd half of the prompts, never among the texts the memory was trained quiet on. A prompt
    that asks about an edited fact in the tenant's own format (qa's "Where does … live?") counts as a change too:
    the memory is trained to leave a tenant's traffic alone, not to carry its edits into the tenant's formats.
    """
    out = {}
    for alias, version, prompts in served:
        alone, _ = ctx.evaluator.run_memory(base_path, None, prompts, version=version)
        with_memory, _ = ctx.evaluator.run_memory(base_path, weights, prompts, version=version)
        same = [a == b for a, b in zip(alone, with_memory)]
        held_out = same[1::2]
        out[alias] = {"patch": version.ref, "prompts": len(same), "agreement": round(sum(same) / len(same), 4),
                      "held_out": round(sum(held_out) / len(held_out), 4) if held_out else None}
    return out


def _irrelevant(ctx: JobContext, name: str) -> list[str]:
    """Texts the memory must stay quiet on: the memory's own set, else the probe set."""
    record = ctx.memories.irrelevant(name)
    if record is not None:
        with ctx.blobs.open(record["digest"]) as f:
            return [json.loads(line)["text"] for line in f.read().decode().splitlines() if line.strip()]
    texts = ctx.evals.probe()
    if not texts:
        raise JobRefused(f"memory {name} has no irrelevant texts and the registry no probe set: "
                         f"PUT /admin/memories/{name}/irrelevant first")
    return texts


def _weights(ctx: JobContext, version: MemoryVersion) -> MemoryWeights:
    directory = materialize(ctx.blobs, version.files, ctx.work_dir / "memories" / version.ref)
    return memory_file.read(directory)


def _layer(ctx: JobContext, model) -> int:
    configured = ctx.memory_layer
    return default_layer(len(decoder_layers(model))) if configured is None else configured
