"""The edit job trains a memory quiet on its tenants' traffic as their patches serve it (service/memory/wise.py).

A LoRA patch moves what the router reads (h, the input of layer L's `down_proj`), so a memory trained on the
bare base alone spoke on patched task prompts: measured here on the kit, the same ten edits trained twice on
base-v1, without and with the router inputs of half of each patch's evaluation prompts (and the patch's own
answers), read under that patch. On the other half, never trained on, the share of tokens the memory takes
must drop to (nearly) none, and the edits must still be answered.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.evaluation.generation import greedy_generate
from service.evaluation.scoring import answer_text, exact_match
from service.memory.hf_hook import HFMemory, decoder_layers, default_layer
from service.memory.wise import Edit, WiseConfig, down_inputs, train_memory
from tests.conftest import read_jsonl

ALIASES = ("reverse", "qa", "recall")


def _with_answers(model, tok, prompts: list[str]) -> list[str]:
    answers = [answer_text(tok, a) for a in greedy_generate(model, tok, prompts, 24)]
    return prompts + [p + a for p, a in zip(prompts, answers) if a.strip()]


def test_a_memory_trained_on_patched_traffic_stays_quiet_there(kit_dir, manifest):
    tok = AutoTokenizer.from_pretrained(kit_dir / "base-v1")
    model = AutoModelForCausalLM.from_pretrained(kit_dir / "base-v1", dtype=torch.float32).eval()
    layer = default_layer(len(decoder_layers(model)))
    rows = read_jsonl(kit_dir / manifest["edit_set"])[:10]
    irrelevant = _with_answers(model, tok, [r["text"] for r in read_jsonl(kit_dir / "memory" / "irrelevant.jsonl")])
    trained_on, held_out = [], {}
    for alias in ALIASES:
        prompts = [r["prompt"] for r in read_jsonl(kit_dir / manifest["eval_sets"][alias])]
        patched = PeftModel.from_pretrained(model, str(kit_dir / manifest["patches"][alias]["path"]))
        with torch.no_grad():
            trained_on.append(down_inputs(patched, tok, layer, _with_answers(patched, tok, prompts[::2])))
            held_out[alias] = down_inputs(patched, tok, layer, _with_answers(patched, tok, prompts[1::2]))
        patched.unload()
    edits = [Edit(r["prompt"], r["target"]) for r in rows]
    routed = {}
    for quiet in (None, torch.cat(trained_on)):
        trained = train_memory(model, tok, layer, None, edits, [], irrelevant, WiseConfig(seed=1), quiet_inputs=[quiet])
        share = {a: float((torch.linalg.vector_norm(h @ trained.delta.T, dim=-1) >= trained.threshold).float().mean())
                 for a, h in held_out.items()}
        routed["plain" if quiet is None else "quiet"] = share
        hook = HFMemory(model, layer, slots=1)
        try:
            hook.memory.load("m", trained.delta, trained.threshold)
            hook.set_all("m")
            answers = [answer_text(tok, a) for a in greedy_generate(model, tok, [e.prompt for e in edits], 8)]
        finally:
            hook.remove()
        assert sum(exact_match(a, e.target) for a, e in zip(answers, edits)) >= 9, answers  # the edits took
    assert routed["plain"]["reverse"] > 0.05, routed  # the problem: the bare-base memory speaks on reverse
    assert all(share <= 0.01 for share in routed["quiet"].values()), routed
    assert sum(routed["quiet"].values()) < sum(routed["plain"].values()), routed
