"""Every Prometheus metric the service exports, in one place, so dashboards have one list to match.

Label sets are bounded: `alias` is a registered model name (never the raw request string),
`version` is a patch version number or "none", `base` a registered base, `status` an HTTP code.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_SERVED = ["alias", "version", "base"]
# Latencies on CPU range from milliseconds (a token) to tens of seconds (a long request under load).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

requests_total = Counter(
    "patchserve_requests_total", "Inference requests finished, by what served them and their HTTP status.",
    _SERVED + ["status"], registry=REGISTRY)
request_duration = Histogram(
    "patchserve_request_duration_seconds", "End-to-end latency of an inference request.",
    _SERVED, buckets=_LATENCY_BUCKETS, registry=REGISTRY)
time_to_first_token = Histogram(
    "patchserve_time_to_first_token_seconds", "Time from admission to the first generated token.",
    _SERVED, buckets=_LATENCY_BUCKETS, registry=REGISTRY)
inter_token_latency = Histogram(
    "patchserve_inter_token_latency_seconds", "Time between consecutive generated tokens.",
    _SERVED, buckets=_TOKEN_BUCKETS, registry=REGISTRY)
prompt_tokens = Counter(
    "patchserve_prompt_tokens_total", "Prompt tokens processed.", _SERVED, registry=REGISTRY)
generation_tokens = Counter(
    "patchserve_generation_tokens_total", "Tokens generated.", _SERVED, registry=REGISTRY)

queue_depth = Gauge(
    "patchserve_queue_depth", "Requests admitted by the gateway and waiting for the engine.", ["engine"],
    registry=REGISTRY)
running_requests = Gauge(
    "patchserve_running_requests", "Requests the engine is generating for now.", ["engine"], registry=REGISTRY)
adapters_resident = Gauge(
    "patchserve_adapters_resident", "Adapters loaded in an engine.", ["engine"], registry=REGISTRY)
adapter_operation_duration = Histogram(
    "patchserve_adapter_operation_duration_seconds", "Time to load or unload an adapter in an engine.",
    ["engine", "operation"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)

alias_active = Gauge(
    "patchserve_alias_active_info", "1 for the version each alias serves now.",
    ["alias", "patch", "version", "base"], registry=REGISTRY)
hot_swaps = Counter(
    "patchserve_hot_swaps_total", "Alias pointer moves, by kind (activate, rollback, auto_rollback) and reason.",
    ["alias", "kind", "reason"], registry=REGISTRY)

live_agreement = Gauge(
    "patchserve_live_agreement", "Share of live greedy answers on which an alias's new version agreed with the "
    "version it replaced (measured over the first requests after a move, when the alias asks for it).",
    ["alias"], registry=REGISTRY)
rollout_compared = Counter("patchserve_rollout_compared", "Live answers of a rollout's candidate compared with "
                           "the active version's (canary or shadow).", ["alias"], registry=REGISTRY)
rollout_agreed = Counter("patchserve_rollout_agreed", "Of those, the answers on which they agreed.", ["alias"],
                         registry=REGISTRY)
rollouts_stopped = Counter("patchserve_rollouts_stopped", "Rollouts ended, by reason (operator, automatic).",
                           ["alias", "reason"], registry=REGISTRY)
registry_repairs = Counter(
    "patchserve_registry_repairs_total",
    "Alias moves the periodic reconcile applied before any event did (an event missed or late).", registry=REGISTRY)
redis_up = Gauge("patchserve_redis_up", "1 when the registry's Redis answers PING.", registry=REGISTRY)


def or_nan(read: Callable[[], float]) -> Callable[[], float]:
    """A gauge reading taken from Redis at scrape time; NaN while Redis is away, so /metrics keeps answering."""

    def reading() -> float:
        try:
            return read()
        except Exception:  # the scrape must never fail; patchserve_redis_up says why this one is NaN
            return float("nan")

    return reading
engine_ready = Gauge("patchserve_engine_ready", "1 when the engine is loaded and answering.", ["engine"],
                     registry=REGISTRY)

# -- worker ---------------------------------------------------------------------------------------------
jobs = Counter("patchserve_jobs_total", "Worker jobs finished, by type and outcome (succeeded, retrying, failed).",
               ["type", "outcome"], registry=REGISTRY)
job_duration = Histogram("patchserve_job_duration_seconds", "Time one attempt of a job ran.", ["type"],
                         buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)
dead_letters = Counter("patchserve_job_dead_letters_total", "Jobs that failed every attempt (dead-lettered).",
                       ["type"], registry=REGISTRY)
job_queue_lag = Gauge("patchserve_job_queue_lag_seconds",
                      "Age of the oldest job not finished yet (0 when the queue is drained).", registry=REGISTRY)

router_requests = Counter(
    "patchserve_router_requests_total", "Requests the router forwarded, by the base that served them and status.",
    ["base", "status"], registry=REGISTRY)
router_retries = Counter(
    "patchserve_router_retries_total", "Requests sent again to another replica before any byte reached the client, "
    "by why (connect: the replica was gone; misdirected: the alias had moved to another base).",
    ["reason"], registry=REGISTRY)
router_replicas = Gauge(
    "patchserve_router_replicas", "Live replicas that take requests, by base, as the router last read them.",
    ["base"], registry=REGISTRY)


class CompatibilityCollector:
    """The stored compatibility reports as gauges, read from the registry at scrape time.

    Labels: patch, version (the candidate), against (what it was compared with). One series per
    evaluated version: bounded by the versions kept, which an operator deletes as they retire.
    """

    _FIELDS = {"nfr": "Negative flip rate (share of items the candidate got worse on).",
               "pfr": "Positive flip rate (share of items the candidate got better on).",
               "score_old": "Task score of the version replaced.", "score_new": "Task score of the candidate.",
               "agreement": "Share of items both versions answer alike.",
               "perplexity_ratio": "Probe-set perplexity of the candidate over the version replaced."}

    def __init__(self):
        self.source = lambda: []  # the gateway points it at the registry's reports

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        families = {f: GaugeMetricFamily(f"patchserve_compat_{f}", doc, labels=["patch", "version", "against"])
                    for f, doc in self._FIELDS.items()}
        passed = GaugeMetricFamily("patchserve_compat_gate_passed", "1 when the candidate passed its gate.",
                                   labels=["patch", "version", "against"])
        try:
            reports = self.source()
        except Exception:  # Redis away: no report series this scrape (patchserve_redis_up says why)
            reports = []
        for r in reports:
            patch, _, version = r["candidate"].rpartition("@")
            labels = [patch, version, r.get("incumbent") or "base"]
            for f, family in families.items():
                family.add_metric(labels, float(r[f]))
            passed.add_metric(labels, 1.0 if r.get("gate", {}).get("passed") else 0.0)
        yield from families.values()
        yield passed


compatibility = CompatibilityCollector()
REGISTRY.register(compatibility)


# -- side memories (knowledge edits) ---------------------------------------------------------------------
memory_requests = Counter(
    "patchserve_memory_requests_total", "Inference requests admitted with a side-memory version.",
    ["memory", "version"], registry=REGISTRY)
memory_active = Gauge(
    "patchserve_memory_active_info", "1 for the version each side memory serves now on this replica.",
    ["memory", "version", "base"], registry=REGISTRY)
memory_edits = Gauge(
    "patchserve_memory_edits", "Edits held by the version each side memory serves now.", ["memory"], registry=REGISTRY)
memory_slots = Gauge(
    "patchserve_memory_slots", "Side-memory slots of an engine: in use, and in all.", ["engine", "state"],
    registry=REGISTRY)


class MemoryTokensCollector:
    """Tokens through each memory version's slot and tokens routed to its side memory, as counters.

    The engine counts them where the forward pass runs (vLLM's worker process), so the gateway reads a
    snapshot (`update`) before each scrape; the counters grow from the engine's start.
    """

    def __init__(self):
        self.snapshot: dict[str, dict[str, int]] = {}

    def update(self, stats: dict[str, dict[str, int]]) -> None:
        for key, counts in stats.items():
            self.snapshot[key] = dict(counts)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        tokens = CounterMetricFamily("patchserve_memory_tokens", "Tokens of requests admitted with a memory "
                                     "version (prompt and generated).", labels=["memory", "version"])
        routed = CounterMetricFamily("patchserve_memory_routed_tokens", "Of those, the tokens whose activation "
                                     "crossed the memory's threshold: served by the side memory.",
                                     labels=["memory", "version"])
        for key, counts in sorted(self.snapshot.items()):
            name, _, version = key.rpartition("@")
            tokens.add_metric([name, version], counts.get("tokens", 0))
            routed.add_metric([name, version], counts.get("routed", 0))
        yield tokens
        yield routed


memory_tokens = MemoryTokensCollector()
REGISTRY.register(memory_tokens)
kv_policy_info = Gauge(
    "patchserve_kv_policy_info", "1 for the KV-cache policy in force on each scope (a base: its default; an alias: "
    "its own), with its label ('int4 g32 r16 sinks4', 'none') and version.",
    ["engine", "scope", "policy", "version"], registry=REGISTRY)
kv_policy_refused = Gauge(
    "patchserve_kv_policy_refused", "1 while a scope's recorded KV policy is refused by this replica's engine "
    "(it keeps serving the policy it had; /admin/replica says why).", ["engine", "scope"], registry=REGISTRY)
kv_bytes_per_token = Gauge(
    "patchserve_kv_bytes_per_token", "KV-cache bytes held per token under each scope's policy (transformers: measured "
    "from the last batch's cache tensors; vLLM: its cache dtype).", ["engine", "scope"], registry=REGISTRY)
kv_capacity_tokens = Gauge(
    "patchserve_kv_cache_capacity_tokens", "Tokens the KV-cache budget holds at that rate (vLLM: its block pool).",
    ["engine", "scope"], registry=REGISTRY)
