"""Dashboards and alerts, proven against a real Prometheus scraping a live gateway and a router in front
of it, under a little load.

Every panel query of every dashboard must return data; every alert expression must parse and load.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from tests.gateway_server import GatewayProcess, RouterProcess
from tests.prometheus_server import PrometheusServer
from tests.test_deploy import alert_expressions, dashboard_queries


@pytest.fixture(scope="module")
def scraped(kit_dir, tmp_path_factory):
    """A gateway (transformers engine: metrics are engine-agnostic and it starts in seconds) and a
    Prometheus that has scraped it before, during and after some load."""
    workdir = tmp_path_factory.mktemp("observability")
    gateway = GatewayProcess(kit_dir, "transformers", workdir).start()
    router = RouterProcess(f"redis://127.0.0.1:{gateway.env['PATCHSERVE_REDIS_PORT']}/0", workdir).start()
    prometheus = PrometheusServer(workdir, f"127.0.0.1:{gateway.port}", f"127.0.0.1:{router.port}").start()
    try:
        deadline = time.monotonic() + 30
        while prometheus.target_health() != ["up", "up"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert prometheus.target_health() == ["up", "up"]
        edit = _a_knowledge_edit(gateway, kit_dir)
        for _ in range(3):  # load spread over several scrapes, so rate() has points to work with
            for model in ("tiny", "sentiment", "reverse", "qa"):
                for stream, url in ((False, gateway.url), (True, router.url)):
                    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                        "model": model, "prompt": "Review: good great\nSentiment:" if model != "tiny" else edit,
                        "max_tokens": 6, "temperature": 0, "stream": stream})
                    assert r.status_code == 200
            time.sleep(1.5)
            if _ == 0:
                _an_operators_move_and_its_undo(gateway, kit_dir)
        time.sleep(2.5)
        yield prometheus
    finally:
        prometheus.stop()
        router.stop()
        gateway.stop()


def _a_knowledge_edit(gateway: GatewayProcess, kit_dir) -> str:
    """Two of the kit's edits into the memory `facts` (a job): the side-memory metrics get their series.
    Returns an edited prompt."""
    edits = [json.loads(line) for line in (kit_dir / "edits.jsonl").read_text().splitlines()[:2]]
    with gateway.admin() as admin:
        queued = admin.post("/admin/memories/facts/edits", json={"edits": edits, "reason": "observability"})
        assert queued.status_code == 202, queued.text
    job = gateway.wait_job(queued.headers["location"])
    assert job["result"]["activated"], job
    return edits[0]["prompt"]


def _an_operators_move_and_its_undo(gateway: GatewayProcess, kit_dir) -> None:
    """A new version of `reverse` through the gate (a job, a report), then rolled back: the hot-swap,
    worker and compatibility metrics get their series."""
    files = [("file", (f.name, f.read_bytes())) for f in sorted((kit_dir / "patches" / "reverse").iterdir())]
    with gateway.admin() as admin:
        version = admin.post("/admin/patches/reverse/versions", files=files).json()["version"]
        queued = admin.post("/admin/aliases/reverse/activate", json={"version": version})
        assert queued.status_code == 202
        job = gateway.wait_job(queued.headers["location"])
        assert job["result"]["activated"], job
        assert admin.post("/admin/aliases/reverse/rollback", json={"reason": "drill"}).status_code == 200


@pytest.mark.parametrize("board,title,expr", dashboard_queries(), ids=lambda v: v if len(v) < 40 else None)
def test_every_panel_query_returns_data(scraped, board, title, expr):
    answer = scraped.query(expr)
    assert answer["status"] == "success", f"{board} / {title}: {answer.get('error')}"
    values = [float(s["value"][1]) for s in answer["data"]["result"]]
    assert any(not math.isnan(v) for v in values), f"{board} / {title}: no data for {expr}"


@pytest.mark.parametrize("alert,expr", alert_expressions())
def test_every_alert_expression_parses(scraped, alert, expr):
    answer = scraped.query(expr)
    assert answer["status"] == "success", f"{alert}: {answer.get('error')}"


def test_prometheus_loaded_every_rule(scraped):
    groups = httpx.get(f"{scraped.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert set(loaded) == {a for a, _ in alert_expressions()}
    assert all(h in ("ok", "unknown") for h in loaded.values()), loaded
