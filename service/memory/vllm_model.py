"""vLLM's Llama with a side memory beside one layer's `down_proj`: registered as `PatchserveLlamaForCausalLM`.

The engine loads it for a stock Llama checkpoint through `hf_overrides` (architectures, plus the memory's
layer and slot count as config attributes), after `service/memory/vllm_plugin.py` registered it in every
vLLM process (vLLM on CPU runs the model in spawned processes: a registration in the gateway process
would never reach them). Only the `mlp` container of layer L is replaced, keeping its children
(`gate_up_proj`, `down_proj`) under the same names, so vLLM still wraps them for LoRA and still loads
their weights; subclassing the linear layer instead silently loses the LoRA wrapping.

Each token's memory comes from its request's `SamplingParams.extra_args["patchserve_memory"]` (a key
like `facts@3`), read from the model runner's batch at each forward pass; the runner is given to the
model by the worker extension (service/memory/vllm_worker.py) when the gateway attaches.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP

from service.memory.hf_hook import default_layer
from service.memory.side_memory import NO_SLOT, SideMemory
from service.memory.vllm_plugin import EXTRA_ARG


class MemoryMLP(nn.Module):
    """Layer L's MLP: the same projections, then the side memory of each token's request."""

    def __init__(self, mlp: LlamaMLP, slots: int):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = mlp.gate_up_proj, mlp.down_proj, mlp.act_fn
        hidden = self.down_proj.output_size
        intermediate = self.down_proj.input_size
        self.side_memory = SideMemory(hidden, intermediate, slots, dtype=self.down_proj.params_dtype)
        self.runner = None  # the model runner, set by the worker extension

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        h = self.act_fn(x)
        out, _ = self.down_proj(h)
        slots = self._token_slots(out.shape[0])
        return out if slots is None else self.side_memory(h, out, slots)

    def _token_slots(self, num_tokens: int) -> torch.Tensor | int | None:
        """Each token's slot in this forward pass, from the runner's batch (one int when every request has the
        same); None when no token has a memory."""
        runner = self.runner
        if runner is None or not self.side_memory.loaded():
            return None
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.cpu[: n + 1]
        if n == 0 or int(starts[n]) != num_tokens:
            return None  # a warm-up or profiling pass, not a batch of requests
        slots = []
        for req_id in batch.req_ids[:n]:
            state = runner.requests.get(req_id)
            extra = (state.sampling_params.extra_args or {}) if state and state.sampling_params else {}
            slots.append(self.side_memory.slot_of(extra.get(EXTRA_ARG)))
        first = slots[0]
        if all(slot == first for slot in slots):
            return None if first == NO_SLOT else first
        slots = torch.tensor(slots, dtype=torch.long)
        return slots.repeat_interleave((starts[1:] - starts[:-1]).long())


class PatchserveLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose layer `patchserve_memory_layer` holds `patchserve_memory_slots` side memories."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        layer = getattr(config, "patchserve_memory_layer", None)
        layer = default_layer(config.num_hidden_layers) if layer is None else int(layer)
        slots = int(getattr(config, "patchserve_memory_slots", 4))
        decoder = self.model.layers[layer]
        decoder.mlp = MemoryMLP(decoder.mlp, slots)
        self.memory_layer = layer


def memory_mlp(model: nn.Module) -> MemoryMLP:
    """The MemoryMLP inside a loaded model (its LoRA wrapping may have moved things, never this)."""
    for module in model.modules():
        if isinstance(module, MemoryMLP):
            return module
    raise RuntimeError("this model has no side memory (not loaded as PatchserveLlamaForCausalLM)")
