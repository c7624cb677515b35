"""Schemathesis against a live gateway's own /openapi.json: no input, of any operation, gets a 5xx.

Every operation is fuzzed, `/admin/*` included, with an admin key. Generated bodies would name random
models and never reach an engine, so `model` is replaced by real names (a base, aliases, a pinned
version, one unknown) and admin paths often name a real alias or patch: `/v1/*` really generates on
vLLM, and admin refusals are exercised on real records. Afterwards the store must list what it listed
before: every base, version and alias pointer is still there, unchanged (the fuzzer may add new ones).

The gateway is the fuzzer's own (its data dir, its embedded Redis): keys it creates must not close
`/v1` of the gateways other tests share.
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.gateway_server import GatewayProcess
from tests.run_summary import SUMMARY

MODELS = ["tiny", "reverse", "sentiment", "qa", "reverse@1", "no-such-model"]
NAMES = ["reverse", "qa", "sentiment", None]  # None: keep what the fuzzer generated
EXAMPLES_PER_OPERATION = 50

_models = itertools.cycle(MODELS)
_names = itertools.cycle(NAMES)
FIGURES = {"cases": 0, "server_errors": 0, "by_status": {}, "operations": set()}
SERVER_ERRORS: list[str] = []


@pytest.fixture(scope="module")
def fuzz_gateway(kit_dir, tmp_path_factory):
    gw = GatewayProcess(kit_dir, "vllm", tmp_path_factory.mktemp("fuzz")).start()
    before = _listing(gw)
    yield gw
    after = _listing(gw)
    gw.stop()
    # The store lists what it listed before: nothing that existed was changed or removed.
    assert after["bases"] >= before["bases"]
    assert after["versions"] >= before["versions"], before["versions"] - after["versions"]
    assert {a: after["aliases"].get(a) for a in before["aliases"]} == before["aliases"]


def _listing(gw: GatewayProcess) -> dict:
    with gw.admin() as admin:
        bases = {(b["name"], b["version"]) for b in admin.get("/admin/bases").json()}
        versions = {(p["name"], v["version"]) for p in admin.get("/admin/patches").json() for v in p["versions"]}
        aliases = {a["alias"]: a["ref"] for a in admin.get("/admin/aliases").json()}
    return {"bases": bases, "versions": versions, "aliases": aliases}


def _call(case, gw: GatewayProcess) -> None:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = next(_models)
        case.body.pop("stream", None)  # SSE is read whole by the fuzzer's client; streams are tested elsewhere
    name = next(_names)
    for param in ("alias", "name"):
        if name and param in (case.path_parameters or {}):
            case.path_parameters[param] = name
    response = case.call(base_url=gw.url, headers={"authorization": f"Bearer {gw.admin_key}"}, timeout=120)
    FIGURES["cases"] += 1
    FIGURES["by_status"][response.status_code] = FIGURES["by_status"].get(response.status_code, 0) + 1
    if response.status_code >= 500:
        FIGURES["server_errors"] += 1
    assert response.status_code < 500, (
        f"{case.operation.method.upper()} {case.formatted_path} → {response.status_code}: {response.text[:500]}\n"
        f"query: {case.query} body: {json.dumps(case.body, default=str)[:500]}")
    if response.status_code >= 400 and (response.headers.get("content-type") or [""])[0].startswith("application/json"):
        assert set(response.json()) == {"error"}, f"not an OpenAI-shaped error: {response.text[:300]}"


def test_no_input_gets_a_server_error(fuzz_gateway):
    """Every operation of /openapi.json, EXAMPLES_PER_OPERATION generated cases each (derandomised)."""
    # One hypothesis run per operation, driven here: schemathesis's pytest loader does not run on pytest 9.
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        FIGURES["operations"].add(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            _call(case, fuzz_gateway)

        try:
            fuzz()
        except AssertionError as exc:
            failures.append(str(exc))
    SUMMARY.append(f"fuzz: {len(FIGURES['operations'])} operations, {FIGURES['cases']} cases, "
            f"{FIGURES['server_errors']} server errors; statuses {dict(sorted(FIGURES['by_status'].items()))}")
    assert not failures, "\n\n".join(failures)


def test_the_fuzzed_gateway_still_serves(fuzz_gateway):
    """After the fuzz run the gateway answers a real request as before."""
    r = httpx.post(f"{fuzz_gateway.url}/v1/completions", timeout=60,
                   headers={"authorization": f"Bearer {fuzz_gateway.admin_key}"},
                   json={"model": "reverse", "prompt": "Reverse: red blue green\nOutput:", "max_tokens": 8,
                         "temperature": 0})
    assert r.status_code == 200 and r.headers["x-patchserve-served-by"] == "base=base-v1; patch=reverse@1"
