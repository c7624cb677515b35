"""The compressed KV cache (service/kv) inside transformers' own generation, on a small Llama.

No kit needed: a randomly initialised Llama (seeded) shows the mechanics — what is held, at which positions,
and how many bytes — exactly; answer quality under each policy is the benchmark's (loadtests/bench_kv.py) and
the policy job's business.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.kv import quantize
from service.kv.cache import PREFILL_CHUNK, QueryTap, cache_nbytes, compressed_cache, prefill
from service.kv.policy import KVPolicy, KVPolicyInvalid, KVPolicyRefused
from service.kv.vllm_mapping import cpu_flags, fp8_supported, kv_cache_dtype, refusal

LAYERS, HEADS, HEAD_DIM = 2, 2, 64
FP32_BYTES_PER_TOKEN = 2 * LAYERS * HEADS * HEAD_DIM * 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=HEADS * HEAD_DIM, intermediate_size=256, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=512)
    m = LlamaForCausalLM(config).eval()
    QueryTap(m)
    return m


def decode(model, ids: torch.Tensor, policy: KVPolicy, steps: int = 6):
    """Greedy decode with our own loop (as the engine does): (tokens, logits per step, final cache)."""
    with torch.inference_mode():
        out = prefill(model, ids, compressed_cache(policy, model.config))
        logits, tokens = [out.logits[:, -1]], [out.logits[:, -1].argmax(-1)]
        for _ in range(steps):
            out = model(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1), out.past_key_values


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 97, (3, 150), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model, prompt):
    return decode(model, prompt, KVPolicy())


def test_the_default_policy_is_transformers_own_cache(model):
    assert compressed_cache(KVPolicy(), model.config) is None


@pytest.mark.parametrize("evict", ["streaming", "snapkv", "expected_attention"])
def test_an_eviction_that_keeps_every_token_changes_no_logit(model, prompt, reference, evict):
    # A budget that rounds to every token goes through the same layer: positions and masks must be right (the
    # prompt read in chunks sums in another order: equal to float precision, the same tokens).
    tokens, logits, cache = decode(model, prompt, KVPolicy(evict=evict, budget=0.999))
    assert torch.allclose(logits, reference[1], atol=1e-4) and torch.equal(tokens, reference[0])
    assert cache.get_seq_length() == prompt.shape[1] + 6


@pytest.mark.parametrize("evict", ["streaming", "snapkv", "expected_attention"])
def test_eviction_holds_the_budget_and_keeps_true_positions(model, prompt, reference, evict):
    policy = KVPolicy(evict=evict, budget=0.5)
    _, logits, cache = decode(model, prompt, policy)
    layer = cache.layers[0]
    assert layer.held_tokens() == 75 + 6  # half of each prompt chunk, then every decoded token
    assert cache.get_seq_length() == 150 + 6  # the logical length: the next token's position
    assert layer.get_mask_sizes(1) == (75 + 6 + 1, 150 - 75)
    assert not torch.equal(logits, reference[1])  # something was dropped, and it shows
    # bytes per token: what is held, over the tokens seen; eviction alone keeps the model's own dtype
    assert layer.tail_k.dtype == layer.sink_k.dtype == torch.float32
    assert cache_nbytes(cache) == (75 + 6) * FP32_BYTES_PER_TOKEN * 3


def test_streaming_keeps_the_sinks_and_the_most_recent_tokens(model, prompt):
    policy = KVPolicy(evict="streaming", budget=0.5, sinks=4)
    short = prompt[:, :PREFILL_CHUNK]  # one chunk: the sinks and its most recent tokens
    with torch.inference_mode():
        full = model(input_ids=short, use_cache=True).past_key_values
        kept = prefill(model, short, compressed_cache(policy, model.config)).past_key_values
    layer = kept.layers[1]
    held = torch.cat([layer.sink_k, layer.tail_k], dim=2)
    expected = torch.cat([full.layers[1].keys[:, :, :4], full.layers[1].keys[:, :, -28:]], dim=2)
    assert torch.equal(held, expected)


@pytest.mark.parametrize("quant,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_integer_caches_hold_packed_codes_and_fp16_scales(model, prompt, reference, quant, bits):
    policy = KVPolicy(quant=quant, group=32, residual=16, sinks=4)
    _, logits, cache = decode(model, prompt, policy)
    layer = cache.layers[0]
    # 150 prompt tokens read as chunks of 64, 64, 22: 4 sinks, 16 in the residual window, 130 quantised — 44, 64
    # and 22 keys flushed after each chunk, in whole groups of 32 and one shorter group for what is left (no
    # padding held); 6 decoded tokens wait in the window.
    segments = layer.key_segments
    shapes = [(k.tokens, k.packed.shape[2], k.scale.shape[2]) for k in segments]
    assert shapes == [(32, 32, 1), (12, 12, 1), (64, 64, 2), (22, 22, 1)]
    assert all(k.packed.dtype == torch.uint8 and k.packed.shape[-1] == HEAD_DIM * bits // 8 for k in segments)
    assert all(k.scale.dtype == torch.float16 for k in segments)
    assert layer.body_v.scale.shape == (3, HEADS, 130, HEAD_DIM // 32)
    assert (layer.sink_k.shape[2], layer.tail_k.shape[2], layer.held_tokens()) == (4, 22, 156)
    # The measured bytes are the sum of the parts: a check of the accounting, not of a formula.
    codes = (130 + 130) * HEADS * HEAD_DIM * bits // 8
    scales = 2 * 2 * HEADS * (5 * HEAD_DIM + 130 * HEAD_DIM // 32)  # scale and zero point, fp16
    assert layer.sink_k.dtype == layer.tail_v.dtype == torch.float16  # the fp32 model's sinks and window at 16 bits
    full_precision = (4 + 22) * FP32_BYTES_PER_TOKEN // LAYERS // 2
    assert cache_nbytes(cache) == 3 * LAYERS * (codes + scales + full_precision)
    if bits == 8:
        assert (logits - reference[1]).abs().max() < 0.05  # 8 bits: close to exact


def test_decoding_flushes_whole_key_groups(model, prompt):
    _, _, cache = decode(model, prompt, KVPolicy(quant="int4", group=32, residual=16, sinks=4), steps=40)
    layer = cache.layers[0]
    # 26 + 40 tokens reached the window: one whole group of 32 left it, as a segment of its own (no padding)
    assert [(s.tokens, s.packed.shape[2]) for s in layer.key_segments][-1] == (32, 32)
    assert layer.tail_k.shape[2] == 16 + 40 + 1 - 32 - 1 and layer.held_tokens() == 150 + 40


def test_a_hadamard_rotation_is_its_own_inverse_and_lowers_2_bit_error():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 64)
    x[..., 3] *= 20  # an outlier channel, as keys have
    h = quantize.hadamard(64)
    assert torch.allclose(x @ h @ h, x, atol=1e-5)
    plain = quantize.dequantize_values(quantize.quantize_values(x, 2, 32), torch.float32)
    rotated = quantize.dequantize_values(quantize.quantize_values(x @ h, 2, 32), torch.float32) @ h
    assert (rotated - x).pow(2).mean() < (plain - x).pow(2).mean()


def test_keys_quantise_in_groups_whatever_the_length():
    x = torch.randn(2, 2, 45, 64)  # not a multiple of the group: the last group is shorter
    codes = quantize.quantize_keys(x, 4, 16)
    assert codes.tokens == 45 and codes.packed.shape[2] == 48 and codes.scale.shape[2] == 3
    back = quantize.dequantize_keys(codes, torch.float32)
    assert back.shape == x.shape and (back - x).abs().max() < (x.max() - x.min()) / 15


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d, group", [(64, 16), (64, 64), (96, 32)])  # groups inside a byte slice, across, neither
def test_values_dequantise_to_the_nearest_level_of_their_group(bits, d, group):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, d)
    codes = quantize.quantize_values(x, bits, group)
    back = quantize.dequantize_values(codes, torch.float32)
    rows = x.reshape(2, 2, 7, d // group, group)
    step = ((rows.amax(-1) - rows.amin(-1)) / ((1 << bits) - 1)).unsqueeze(-1)
    # Within half a level of the fp16-rounded scale of its own group (plus fp16's rounding of the zero point).
    assert ((back.reshape_as(rows) - rows).abs() <= step * 0.51 + 2e-3).all()


def test_fp8_stores_one_byte_per_value(model, prompt):
    _, _, cache = decode(model, prompt, KVPolicy(quant="fp8", residual=0, sinks=0))
    layer = cache.layers[0]
    assert layer.key_segments[0].dtype == torch.float8_e4m3fn and layer.tail_k.shape[2] == 0
    assert cache_nbytes(cache) == 3 * 156 * FP32_BYTES_PER_TOKEN / 4


def test_greedy_generation_reads_the_prompt_as_the_engine_does(model, prompt):
    from service.evaluation.generation import greedy_generate

    class Tok:  # greedy_generate's tokenizer: the prompt ids are the text here
        eos_token_id, pad_token_id = 96, 0

        def __call__(self, text):
            return {"input_ids": [int(x) for x in text.split()]}

    policy = KVPolicy(quant="int4", evict="snapkv", budget=0.5)
    texts = [" ".join(map(str, row.tolist())) for row in prompt]
    got = greedy_generate(model, Tok(), texts, max_new_tokens=5, cache=lambda: compressed_cache(policy, model.config))
    ours, _, _ = decode(model, prompt, policy, steps=4)
    assert [g[:5] for g in got] == [row[: len(g[:5])].tolist() for row, g in zip(ours, got)]


def test_a_prompt_is_read_in_chunks_each_attending_to_what_was_kept(model, prompt):
    # 150 tokens: chunks of 64, 64, 22; at budget 0.5 each keeps half of itself (the sinks in the first).
    _, _, cache = decode(model, prompt, KVPolicy(evict="streaming", budget=0.5), steps=0)
    assert PREFILL_CHUNK == 64 and cache.layers[0].held_tokens() == 32 + 32 + 11


@pytest.mark.parametrize("bad,why", [
    ({"quant": "int3"}, "quant"), ({"group": 24}, "group"), ({"budget": 0.5}, "needs an eviction"),
    ({"evict": "snapkv"}, "evicts nothing"), ({"rotate": True}, "rotate applies"), ({"budget": 0}, "budget"),
    ({"sinks": -1}, "sinks"), ({"colour": 1}, "unknown"),
])
def test_malformed_policies_are_refused_with_their_reason(bad, why):
    with pytest.raises(KVPolicyInvalid, match=why):
        KVPolicy.from_dict(bad)


def test_vllm_maps_what_it_can_and_refuses_the_rest_with_a_reason():
    assert kv_cache_dtype(KVPolicy()) == "auto"
    for policy, why in [(KVPolicy(quant="int4"), "no int4"), (KVPolicy(evict="streaming", budget=0.5), "every token"),
                        (KVPolicy(quant="bf16"), "answers wrongly"), (KVPolicy(quant="fp16"), "answers wrongly"),
                        (KVPolicy(quant="fp8"), "residual 0")]:
        with pytest.raises(KVPolicyRefused, match=why):
            kv_cache_dtype(policy, flags=frozenset({"avx512f"}))
    fp8 = KVPolicy(quant="fp8", residual=0, sinks=0)
    assert kv_cache_dtype(fp8, flags=frozenset({"avx512f"})) == "fp8"
    with pytest.raises(KVPolicyRefused, match="AVX-512"):
        kv_cache_dtype(fp8, flags=frozenset({"avx2"}))
    # This machine, detected: the supported path where the CPU has AVX-512 or AMX, the refusal where not.
    assert fp8_supported() == bool({"avx512f", "amx_tile"} & cpu_flags())
    if fp8_supported():
        assert kv_cache_dtype(fp8) == "fp8"
    else:
        with pytest.raises(KVPolicyRefused, match="AVX-512"):
            kv_cache_dtype(fp8)
    assert refusal(KVPolicy(quant="int4"), {"engine": "transformers"}, per_alias=True) is None
    assert "on the base" in refusal(fp8, {"engine": "vllm", "fp8_hardware": True}, per_alias=True)
