"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from the panel lists below.

Run `python deploy/grafana/generate.py` after changing a panel; tests evaluate every query
against a real Prometheus scraping a live gateway.
"""

from __future__ import annotations

import json
from pathlib import Path

SERVED = "alias, version, base"

DASHBOARDS = {
    "serving": ("patchserve — Serving", "Is the service answering, how fast, and for whom?", [
        ("Requests/s by alias and version", f"sum by ({SERVED}) (rate(patchserve_requests_total[1m]))", "reqps"),
        # `or … * 0` keeps a zero line for aliases without errors instead of no data at all.
        ("Error ratio (5xx) by alias",
         '(sum by (alias) (rate(patchserve_requests_total{status=~"5.."}[1m])) '
         "or sum by (alias) (rate(patchserve_requests_total[1m])) * 0) "
         "/ clamp_min(sum by (alias) (rate(patchserve_requests_total[1m])), 1e-9)", "percentunit"),
        ("Responses by status", "sum by (status) (rate(patchserve_requests_total[1m]))", "reqps"),
        ("End-to-end latency p50",
         "histogram_quantile(0.5, sum by (le, alias) (rate(patchserve_request_duration_seconds_bucket[1m])))", "s"),
        ("End-to-end latency p99",
         "histogram_quantile(0.99, sum by (le, alias) (rate(patchserve_request_duration_seconds_bucket[1m])))", "s"),
        ("Time to first token p50",
         "histogram_quantile(0.5, sum by (le, alias) (rate(patchserve_time_to_first_token_seconds_bucket[1m])))", "s"),
        ("Inter-token latency p50",
         "histogram_quantile(0.5, sum by (le, alias) (rate(patchserve_inter_token_latency_seconds_bucket[1m])))", "s"),
        ("Generated tokens/s by alias", "sum by (alias) (rate(patchserve_generation_tokens_total[1m]))", "short"),
        ("Prompt tokens/s by alias", "sum by (alias) (rate(patchserve_prompt_tokens_total[1m]))", "short"),
        ("Queue depth", "sum by (engine) (patchserve_queue_depth)", "short"),
        ("Running requests", "sum by (engine) (patchserve_running_requests)", "short"),
        ("Engine ready", "patchserve_engine_ready", "short"),
        ("Router: requests/s by base and status", "sum by (base, status) (rate(patchserve_router_requests_total[1m]))",
         "reqps"),
        ("Live replicas per base (the router's view)", "max by (base) (patchserve_router_replicas)", "short"),
    ]),
    "patches": ("patchserve — Patches and versions", "Which version does each alias serve, and what is loaded?", [
        ("Active version per alias", "patchserve_alias_active_info == 1", "short"),
        ("Adapters resident per engine", "patchserve_adapters_resident", "short"),
        ("Adapter load and unload time (mean since start)",
         "sum by (engine, operation) (patchserve_adapter_operation_duration_seconds_sum) "
         "/ sum by (engine, operation) (patchserve_adapter_operation_duration_seconds_count)", "s"),
        ("Requests/s by version", "sum by (alias, version) (rate(patchserve_requests_total[1m]))", "reqps"),
        ("Alias moves by kind and reason (last hour)",
         "sum by (alias, kind, reason) (increase(patchserve_hot_swaps_total[1h]))", "short"),
        ("Missed events repaired by the reconcile (last hour)",
         "sum(increase(patchserve_registry_repairs_total[1h]))", "short"),
        ("Registry (Redis) reachable", "patchserve_redis_up", "short"),
        ("Side memory: tokens routed to it per second, by version",
         "sum by (memory, version) (rate(patchserve_memory_routed_tokens_total[1m]))", "short"),
        ("Side memory: share of its requests' tokens it served",
         "sum by (memory, version) (rate(patchserve_memory_routed_tokens_total[5m])) "
         "/ sum by (memory, version) (rate(patchserve_memory_tokens_total[5m]))", "percentunit"),
        ("Side memory: edits in the version served",
         "max by (memory) (patchserve_memory_edits)", "short"),
        ("Side-memory slots in use / in all", "sum by (engine, state) (patchserve_memory_slots)", "short"),
        ("KV-cache policy in force by scope (a base: its default; an alias: its own)",
         "patchserve_kv_policy_info == 1", "short"),
        ("KV bytes held per token by scope", "max by (engine, scope) (patchserve_kv_bytes_per_token)", "bytes"),
        ("KV cache capacity in tokens by scope", "max by (engine, scope) (patchserve_kv_cache_capacity_tokens)",
         "short"),
        ("KV policies recorded but refused by the engine",
         "sum by (scope) (patchserve_kv_policy_refused) or sum by (scope) (patchserve_kv_policy_info) * 0", "short"),
    ]),
    "compatibility": ("patchserve — Compatibility", "Is the new version worse than the one it replaces?", [
        ("Negative flip rate by version (share of items it got worse on)",
         "max by (patch, version, against) (patchserve_compat_nfr)", "percentunit"),
        ("Positive flip rate by version", "max by (patch, version, against) (patchserve_compat_pfr)", "percentunit"),
        ("Task score change (candidate − replaced)",
         "max by (patch, version, against) (patchserve_compat_score_new - patchserve_compat_score_old)", "short"),
        ("Agreement with the version replaced", "max by (patch, version, against) (patchserve_compat_agreement)",
         "percentunit"),
        ("Probe perplexity ratio (candidate / replaced)",
         "max by (patch, version, against) (patchserve_compat_perplexity_ratio)", "short"),
        ("Gate passed (1) or refused (0)", "max by (patch, version, against) (patchserve_compat_gate_passed)",
         "short"),
    ]),
    "worker": ("patchserve — Worker", "Are update jobs done, how long do they take, is anything stuck?", [
        ("Jobs finished by type and outcome (last hour)",
         "sum by (type, outcome) (increase(patchserve_jobs_total[1h]))", "short"),
        # Jobs are rare: a mean since start has data between them, where a windowed quantile has none.
        ("Job attempt duration by type (mean since start)",
         "sum by (type) (patchserve_job_duration_seconds_sum) / sum by (type) (patchserve_job_duration_seconds_count)",
         "s"),
        ("Queue lag (oldest unfinished job)", "max(patchserve_job_queue_lag_seconds)", "s"),
        ("Dead letters by type (last hour)", "sum by (type) (increase(patchserve_job_dead_letters_total[1h]))",
         "short"),
    ]),
}


def panel(i: int, title: str, expr: str, unit: str) -> dict:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": "prometheus"}}],
    }


def dashboard(uid: str, title: str, description: str, panels: list) -> dict:
    return {
        "uid": f"patchserve-{uid}",
        "title": title,
        "description": description,
        "tags": ["patchserve"],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "dashboards"
    for uid, (title, description, panels) in DASHBOARDS.items():
        (out / f"{uid}.json").write_text(json.dumps(dashboard(uid, title, description, panels), indent=2) + "\n")
        print(f"wrote {out / f'{uid}.json'}")
