"""deploy/ checked statically: compose and Dockerfile point at real files, Prometheus accepts its config
and rules, and dashboards only name metrics the service exports (evaluated live in test_observability)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from service import metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def exported_metric_names() -> set[str]:
    """Every series name the service can export, histogram and counter suffixes included."""
    names = set()
    for family in metrics.REGISTRY.collect():
        base = family.name
        kind = family.type
        if kind == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return names


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target."""
    out = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            out += [(path.name, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bpatchserve_[a-z0-9_]+\b", expr))


def test_dashboards_name_only_exported_metrics():
    exported = exported_metric_names()
    queries = dashboard_queries()
    assert {q[0] for q in queries} >= {"serving.json", "patches.json", "compatibility.json", "worker.json"}
    for board, title, expr in queries:
        unknown = metric_names_in(expr) - exported
        assert metric_names_in(expr), f"{board} / {title}: no patchserve metric in {expr!r}"
        assert not unknown, f"{board} / {title}: unknown metrics {unknown}"
    for alert, expr in alert_expressions():
        assert not metric_names_in(expr) - exported, f"alert {alert} names unknown metrics"


def test_dashboards_are_generated_from_their_source(tmp_path):
    subprocess.run([sys.executable, str(DEPLOY / "grafana" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True)
    committed = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert [p.name for p in committed] == sorted(p.name for p in tmp_path.glob("*.json"))
    for path in committed:
        assert (tmp_path / path.name).read_text() == path.read_text(), f"{path.name}: run deploy/grafana/generate.py"


def test_promtool_accepts_config_and_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (scripts/install.sh installs it)"
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_and_build_context_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"patchserve", "redis", "prometheus", "grafana"} <= set(services)
    build = services["patchserve"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    # The registry runs as production should: a primary, a replica of it, and three Sentinels that
    # watch the primary under the name patchserve is configured with.
    env = services["patchserve"]["environment"]
    sentinels = env["PATCHSERVE_REDIS_SENTINELS"].split(",")
    assert len(sentinels) == 3 and all(s.split(":")[0] in services for s in sentinels)
    assert "--replicaof" in services["redis-replica"]["command"]
    conf = (DEPLOY / "redis" / "sentinel.conf").read_text()
    assert f"sentinel monitor {env['PATCHSERVE_REDIS_MASTER_NAME']} redis 6379 2" in conf


def test_dockerfile_copies_what_exists_and_runs_the_install_script():
    text = (REPO / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), line
    assert "scripts/install.sh" in text and "patchserve" in text.splitlines()[-1]
