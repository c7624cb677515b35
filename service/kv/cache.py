"""The compressed KV cache: one cache layer class plugged into transformers' own `DynamicCache` (not a fork).

A layer holds, per row and KV head: the sinks (first tokens) at 16 bits, a body of compressed tokens, and a tail
of the most recent tokens at 16 bits (KIVI's residual; keys are flushed to the body a group of tokens at a time,
since their scales span a group of tokens). "16 bits" is what the ratios are quoted against: a 16-bit model's own
precision, fp16 for a wider (fp32) model — the fp16 cache changes no answer on the kit — so a window token costs
4× an int4 one, not 8×. A policy that only evicts keeps the model's dtype: it changes nothing but which tokens.
A prompt is read in chunks (`prefill`): each chunk attends to what the cache kept of the earlier ones, then is
evicted to the budget and quantised — the cache never holds the prompt uncompressed, and what compression costs
shows in the prompt's own answer (read in one pass, a prompt would answer its first token from exact attention,
whatever the policy). The layer keeps the logical length apart from what it holds (as transformers'
sliding-window layer does: `get_seq_length` and `get_mask_sizes`), so new tokens keep their true positions.

Scores that need the queries (snapkv, expected_attention) come from a forward pre-hook on each attention
module (`QueryTap`): it recomputes the prompt's queries with the module's own q_proj (LoRA included) and hands
them to the layer before attention calls `update`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from service.kv import evict, quantize
from service.kv.policy import KVPolicy, KVPolicyRefused

_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CompressedLayer(DynamicLayer):
    """One attention layer's cache under a `KVPolicy`."""

    is_croppable = False  # held tokens are not a suffix of the sequence: cropping has no meaning
    supports_early_init = False

    def __init__(self, policy: KVPolicy, layer_idx: int):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.length = 0  # logical tokens seen (positions), whatever is held
        self.queries: evict.QueryInfo | None = None  # set by the tap for this prefill
        self.sink_k = self.sink_v = None  # [B, H, S, D] full precision
        # The quantised body: keys in segments of equal groups (whole `group`s, or what a flush left over as one
        # shorter group), values as one run; for fp8/fp16/bf16 one tensor each.
        self.key_segments: list = []
        self.body_v = None
        self.body_tokens = 0
        self.tail_k = self.tail_v = None  # [B, H, T, D] full precision: the residual window

    # -- transformers' layer interface ----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.hold_dtype = _hold_dtype(self.policy, self.dtype)
        d = key_states.shape[-1]
        if self.policy.rotate:
            try:
                self._rotation = quantize.hadamard(d).to(self.device, torch.float32)
            except ValueError as exc:
                raise KVPolicyRefused(str(exc)) from None
        if self.policy.quant.startswith("int") and d % min(self.policy.group, d):
            raise KVPolicyRefused(f"value groups of {self.policy.group} channels do not divide the head size {d}")
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens (compressed) and return every held token's keys and values for attention.

        A prompt arrives in chunks (`prefill`): the first attends to itself exactly; each later one attends to
        what the cache kept of the chunks before it, as a request does once its prompt is in a compressed cache.
        Each chunk is evicted to the budget once its attention is done, then quantised beyond the window.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        first = self.length == 0
        self.length += new
        if first:
            k, v = self._evict(key_states, value_states, first=True)
            s = min(self.policy.sinks, k.shape[2]) if self._keeps_sinks else 0
            k, v = k.to(self.hold_dtype), v.to(self.hold_dtype)
            self.sink_k, self.sink_v = k[:, :, :s], v[:, :, :s]
            self.tail_k, self.tail_v = k[:, :, s:], v[:, :, s:]
            self._flush(prefill=True)
            return key_states, value_states
        before = self.tail_k.shape[2]
        self.tail_k = torch.cat([self.tail_k, key_states.to(self.hold_dtype)], dim=-2)
        self.tail_v = torch.cat([self.tail_v, value_states.to(self.hold_dtype)], dim=-2)
        keys, values = self._held()
        if new > 1:  # a later chunk of the prompt: evicted to the budget, then flushed like the first
            k, v = self._evict(key_states, value_states, first=False)
            self.tail_k = torch.cat([self.tail_k[:, :, :before], k.to(self.hold_dtype)], dim=-2)
            self.tail_v = torch.cat([self.tail_v[:, :, :before], v.to(self.hold_dtype)], dim=-2)
            self._flush(prefill=True)
        else:
            self._flush()
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_tokens()
        return held + query_length, self.length - held

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = self.body_tokens = 0
        self.sink_k = self.sink_v = self.body_v = self.tail_k = self.tail_v = None
        self.key_segments = []
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a compressed cache keeps its batch (no beam search)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a compressed cache keeps its batch (no beam search)")

    # -- what it holds --------------------------------------------------------------------------------
    def held_tokens(self) -> int:
        """Tokens held per row and head (after eviction), whatever their precision."""
        if self.sink_k is None:
            return 0
        return self.sink_k.shape[2] + self.body_tokens + self.tail_k.shape[2]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (codes, scales, zero points, full-precision tokens)."""
        total = 0
        for part in (self.sink_k, self.sink_v, *self.key_segments, self.body_v, self.tail_k, self.tail_v):
            if isinstance(part, quantize.Codes):
                total += part.nbytes()
            elif part is not None:
                total += part.numel() * part.element_size()
        return total

    @property
    def _keeps_sinks(self) -> bool:
        return self.policy.quantised or self.policy.evict != "none"

    # -- eviction, flushing, reading back -------------------------------------------------------------
    def _evict(self, k: torch.Tensor, v: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of one prompt chunk the budget keeps (the sinks only in the first chunk)."""
        p = self.policy
        t = k.shape[2]
        sinks = p.sinks if first else 0
        keep = evict.keep_count(t, p.budget, sinks)
        if p.evict == "none" or keep >= t:
            return k, v
        if p.evict == "streaming":
            scores = evict.streaming_scores(k)
        elif self.queries is None:
            raise KVPolicyRefused(f"evict {p.evict} needs the prompt's queries: the model's attention modules have "
                                  f"no query tap (QueryTap)")
        elif p.evict == "snapkv":
            scores = evict.snapkv_scores(self.queries.window, k)
        else:
            scores = evict.expected_attention_scores(self.queries, k, v)
        self.queries = None
        index = evict.select(scores, keep, sinks).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        return k.gather(2, index), v.gather(2, index)

    def _flush(self, prefill: bool = False) -> None:
        """Move tail tokens beyond the residual window into the body: all of them after the prompt (its last key
        group may be short), then a whole key group at a time, so decoding re-quantises nothing."""
        p = self.policy
        if p.quant == "none":
            return
        step = 1 if prefill or not p.quant.startswith("int") else p.group
        n = (self.tail_k.shape[2] - p.residual) // step * step
        if n <= 0:
            return
        k, v = self.tail_k[:, :, :n].float(), self.tail_v[:, :, :n].float()
        self.tail_k, self.tail_v = self.tail_k[:, :, n:], self.tail_v[:, :, n:]
        if p.rotate:
            k, v = k @ self._rotation, v @ self._rotation
        self.body_tokens += n
        if not p.quant.startswith("int"):
            cast = quantize.to_fp8 if p.quant == "fp8" else (lambda x: x.to(_CAST[p.quant]))
            last = self.key_segments.pop() if self.key_segments else None
            self.key_segments.append(cast(k) if last is None else torch.cat([last, cast(k)], dim=2))
            self.body_v = cast(v) if self.body_v is None else torch.cat([self.body_v, cast(v)], dim=2)
            return
        bits = quantize_bits(p)
        whole = n // p.group * p.group
        # Whole groups, then what is left as one shorter group of its own: no padding is ever held.
        for part in ([k[:, :, :whole]] if whole else []) + ([k[:, :, whole:]] if n > whole else []):
            keys = quantize.quantize_keys(part, bits, min(p.group, part.shape[2]))
            last = self.key_segments[-1] if self.key_segments else None
            if last is not None and _group(last) == _group(keys) == p.group:
                self.key_segments[-1] = quantize.Codes(  # whole groups after whole groups: one segment
                    torch.cat([last.packed, keys.packed], dim=2), torch.cat([last.scale, keys.scale], dim=2),
                    torch.cat([last.zero, keys.zero], dim=2), bits, last.tokens + keys.tokens)
            else:
                self.key_segments.append(keys)
        values = quantize.quantize_values(v, bits, min(p.group, v.shape[-1]))
        self.body_v = values if self.body_v is None else quantize.append_values(self.body_v, values)

    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token's keys and values, written once into fresh buffers (dequantised in place)."""
        b, h, s, d = self.sink_k.shape
        body, tail = self.body_tokens, self.tail_k.shape[2]
        total = s + body + tail
        pad = max((seg.packed.shape[2] - seg.tokens for seg in self.key_segments
                   if isinstance(seg, quantize.Codes)), default=0)
        dtype = torch.float32 if body else self.dtype
        keys = torch.empty(b, h, total + pad, d, dtype=dtype, device=self.device)
        values = torch.empty(b, h, total, d, dtype=dtype, device=self.device)
        keys[:, :, :s] = self.sink_k
        values[:, :, :s] = self.sink_v
        at = s
        for seg in self.key_segments:  # a padded segment's padding is overwritten by what follows it
            if isinstance(seg, quantize.Codes):
                quantize.dequantize_keys_into(seg, keys[:, :, at : at + seg.packed.shape[2]])
                at += seg.tokens
            else:
                keys[:, :, at : at + seg.shape[2]] = seg
                at += seg.shape[2]
        if isinstance(self.body_v, quantize.Codes):
            quantize.dequantize_values_into(self.body_v, values[:, :, s : s + body])
        elif self.body_v is not None:
            values[:, :, s : s + body] = self.body_v
        if self.policy.rotate and body:  # the Hadamard is its own inverse
            keys[:, :, s : s + body] = keys[:, :, s : s + body] @ self._rotation
            values[:, :, s : s + body] = values[:, :, s : s + body] @ self._rotation
        keys[:, :, s + body : total] = self.tail_k
        values[:, :, s + body :] = self.tail_v
        keys = keys[:, :, :total]
        if keys.dtype != self.dtype:
            return keys.to(self.dtype), values.to(self.dtype)
        return keys, values


def _hold_dtype(policy: KVPolicy, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sinks and the window: 16 bits under any compression (bf16 for a bf16 policy), never wider
    than the model's own; the model's dtype when nothing is compressed (eviction alone)."""
    if policy.quant == "none" or model_dtype.itemsize <= 2:
        return model_dtype
    return torch.bfloat16 if policy.quant == "bf16" else torch.float16


def quantize_bits(policy: KVPolicy) -> int:
    return int(policy.quant.removeprefix("int"))


def _group(keys: quantize.Codes) -> int:
    """Tokens per key group of a segment (a segment's groups are all the same size)."""
    return keys.packed.shape[2] // keys.scale.shape[2]


def compressed_cache(policy: KVPolicy, config) -> Cache | None:
    """A transformers cache for one batch under `policy`; None (transformers' default) when it compresses nothing."""
    if policy.is_identity:
        return None
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[CompressedLayer(policy, i) for i in range(layers)])


PREFILL_CHUNK = 64  # prompt tokens read at a time into a compressed cache


def prefill(model, input_ids: torch.Tensor, cache, **kwargs):
    """Read a prompt into `cache` a chunk of PREFILL_CHUNK tokens at a time; the last chunk's output.

    With transformers' own cache (None) the prompt is read in one pass. With a compressed one, each chunk attends
    to what the cache kept of the earlier ones, so what compression costs shows in the prompt's own answer.
    """
    if cache is None:
        return model(input_ids=input_ids, use_cache=True, **kwargs)
    out = None
    for start in range(0, input_ids.shape[1], PREFILL_CHUNK):
        out = model(input_ids=input_ids[:, start : start + PREFILL_CHUNK], past_key_values=cache, use_cache=True,
                    **kwargs)
    return out


def cache_nbytes(cache) -> int:
    """Bytes held by any transformers cache: our layers' own accounting, else the keys' and values' tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, CompressedLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


class QueryTap:
    """Forward pre-hooks on every attention module: hand the prompt's queries to a compressed layer that scores
    eviction with them (snapkv: the last window after RoPE; expected_attention: statistics rotated to future
    positions). Installed once per model; a no-op for any other cache."""

    def __init__(self, model: torch.nn.Module):
        self.rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
        self.handles = [
            module.register_forward_pre_hook(self._before_attention, with_kwargs=True)
            for name, module in model.named_modules()
            if name.endswith("self_attn") and hasattr(module, "q_proj") and hasattr(module, "layer_idx")
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _before_attention(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        layers = getattr(cache, "layers", None)
        if not layers or module.layer_idx >= len(layers):
            return None
        layer = layers[module.layer_idx]
        if not isinstance(layer, CompressedLayer) or layer.policy.evict not in ("snapkv", "expected_attention"):
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        b, t, _ = hidden.shape
        if t == 1:
            return None  # decoding: nothing is evicted
        d = module.head_dim
        if layer.policy.evict == "snapkv":
            w = min(evict.WINDOW, t)
            q = module.q_proj(hidden[:, -w:]).view(b, w, -1, d).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            layer.queries = evict.QueryInfo(window=evict.rope(q, cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)))
        else:
            q = module.q_proj(hidden).view(b, t, -1, d).transpose(1, 2)
            start = layer.length + t  # the positions after this chunk
            positions = torch.arange(start, start + evict.FUTURE, device=hidden.device).unsqueeze(0)
            cos, sin = self.rotary(hidden, positions)
            mean, cov = evict.query_statistics(q, layer.policy.sinks, evict.mean_rotation(cos[0], sin[0]))
            layer.queries = evict.QueryInfo(mean=mean, cov=cov)
        return None
