"""KV-cache compression: a policy (policy.py), its quantisers (quantize.py), eviction scorers (evict.py), the one
compressed cache layer the transformers engine plugs into transformers' cache (cache.py), and what vLLM can do
of a policy on this machine (vllm_mapping.py)."""
