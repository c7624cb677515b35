"""The side memory's remote calls inside vLLM's worker: `worker_extension_cls`, reached by `collective_rpc`.

Named methods, not callables: vLLM sends a callable only with an insecure serialization flag. Memory
files travel as paths (the worker reads them itself; tensors do not survive the trip).
"""

from __future__ import annotations

from service.memory import memory_file
from service.memory.vllm_model import memory_mlp


class MemoryWorkerExtension:
    """Mixed into vLLM's worker class: `self` is the worker."""

    def _patchserve_mlp(self):
        mlp = memory_mlp(self.model_runner.get_model())
        mlp.runner = self.model_runner  # each forward pass reads its batch's memory keys from here
        return mlp

    def patchserve_memory_layer(self) -> int:
        """The layer the side memory sits in (vLLM's model class chose it at load)."""
        self._patchserve_mlp()
        return self.model_runner.get_model().memory_layer

    def patchserve_memory_load(self, key: str, path: str) -> int:
        """Load a memory file into a free slot under `key`; returns the slot."""
        mlp = self._patchserve_mlp()
        weights = memory_file.read(path)
        layer = self.model_runner.get_model().memory_layer
        if weights.layer != layer:
            raise ValueError(f"memory {key} was trained for layer {weights.layer}; this engine's memory is "
                             f"at layer {layer}")
        return mlp.side_memory.load(key, weights.delta, weights.threshold)

    def patchserve_memory_free(self, key: str) -> None:
        """Empty the slot of `key`."""
        self._patchserve_mlp().side_memory.free(key)

    def patchserve_memory_stats(self) -> dict:
        """Per key: tokens that went through its slot and tokens routed to it, since the engine started."""
        memory = self._patchserve_mlp().side_memory
        return {key: {"tokens": memory.tokens[key], "routed": memory.routed[key]}
                for key in set(memory.tokens) | set(memory.loaded())}
