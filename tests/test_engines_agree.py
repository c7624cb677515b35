"""The kit loads in both engines, and their greedy outputs agree token for token.

transformers+PEFT is the reference; vLLM (CPU build, in-process LLM with LoRA enabled) must
produce the same token ids for every evaluation prompt, with and without each patch.
"""

from __future__ import annotations

import copy

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.evaluation.generation import greedy_generate
from tests.conftest import read_jsonl

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hf_base(kit_dir):
    tok = AutoTokenizer.from_pretrained(kit_dir / "base-v1")
    model = AutoModelForCausalLM.from_pretrained(kit_dir / "base-v1", dtype="float32").eval()
    return model, tok


@pytest.fixture(scope="module")
def vllm_llm(kit_dir):
    from vllm import LLM

    llm = LLM(model=str(kit_dir / "base-v1"), dtype="float32", enforce_eager=True, enable_lora=True,
              max_lora_rank=16, max_loras=4, max_model_len=256, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()  # stop the engine-core process before pytest closes its logs


def _vllm_greedy(llm, prompts, lora=None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2)
    return llm.generate(prompts, params, lora_request=lora, use_tqdm=False)


@pytest.mark.vllm
@pytest.mark.parametrize("patch", [None, "sentiment", "reverse", "qa"])
def test_vllm_matches_transformers(kit_dir, manifest, hf_base, vllm_llm, patch):
    from vllm.lora.request import LoRARequest

    model, tok = hf_base
    tasks = [patch] if patch else list(manifest["patches"])
    prompts = [row["prompt"] for t in tasks for row in read_jsonl(kit_dir / "eval" / f"{t}.jsonl")]
    lora = None
    if patch:
        lora = LoRARequest(patch, list(manifest["patches"]).index(patch) + 1, str(kit_dir / "patches" / patch))
        model = PeftModel.from_pretrained(copy.deepcopy(model), kit_dir / "patches" / patch).eval()

    reference = greedy_generate(model, tok, prompts, max_new_tokens=MAX_TOKENS)
    outputs = _vllm_greedy(vllm_llm, prompts, lora)

    mismatches = []
    for prompt, ref, out in zip(prompts, reference, outputs):
        got = list(out.outputs[0].token_ids)
        if got != ref:
            # Where they part, a near-tie between the top two logprobs explains a float-order flip.
            at = next(i for i, (a, b) in enumerate(zip(got + [-1], ref + [-2])) if a != b)
            top = sorted(out.outputs[0].logprobs[at].values(), key=lambda lp: -lp.logprob)[:2] if at < len(got) else []
            mismatches.append((prompt, at, [round(t.logprob, 4) for t in top]))
    assert not mismatches, f"{len(mismatches)}/{len(prompts)} prompts differ: {mismatches[:5]}"
    # The patch changes what the model says: it is really applied in vLLM, not silently ignored.
    if patch:
        assert reference != greedy_generate(hf_base[0], tok, prompts, max_new_tokens=MAX_TOKENS)
