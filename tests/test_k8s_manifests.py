"""deploy/k8s checked without a cluster: every object against the Kubernetes schemas, and against the
service itself: settings and commands that exist, probes on the paths and ports the servers use, a
termination grace that outlasts the drain, a budget and an autoscaler per gateway, Services that
select real pods, and a Prometheus config that Prometheus accepts."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import typer
import yaml
from pydantic import ValidationError

from service import metrics
from service.cli import app as cli_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATION = "kustomization.yaml"
PREFIX = "PATCHSERVE_"
# The oldest minor managed clusters still commonly run, and the newest this kubernetes-validate ships.
K8S_VERSIONS = sorted({"1.30.0", kubernetes_validate.latest_version()})
# What the manifests must run; `router` is the newest of them.
REQUIRED_COMMANDS = ("serve", "worker", "router")
SERVERS = ("serve", "router")  # processes with /healthz, /readyz and a SIGTERM drain
SECRET = "<secret>"  # stands for a Secret's value: only its presence is checked


@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, object) of every non-empty YAML document of the resource files."""
    return tuple((path.name, doc) for path in resource_files()
                 for doc in yaml.safe_load_all(path.read_text()) if doc)


def resource_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION)


def ident(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(file, doc) for file, doc in documents() if doc.get("kind") in kinds]


def named(kind: str, name: str) -> dict:
    found = [doc for _, doc in of_kind(kind) if doc["metadata"]["name"] == name]
    if not found:
        pytest.fail(f"{kind} {name} is referred to but not defined in deploy/k8s")
    return found[0]


def workloads() -> list[tuple[str, dict]]:
    return of_kind("Deployment", "StatefulSet")


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def template_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def argv(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def patchserve_command(container: dict) -> str | None:
    """The `patchserve` subcommand a container runs (an empty string for none), or None if it runs another program."""
    words = argv(container)
    for i, word in enumerate(words):
        if Path(word).name == "patchserve":
            return words[i + 1] if i + 1 < len(words) else ""
    return None


def running(*commands: str) -> list[tuple[str, dict, dict]]:
    """(file, workload, container) of every container running one of these `patchserve` commands."""
    return [(file, doc, c) for file, doc in workloads() for c in containers(doc)
            if patchserve_command(c) in commands]


def container_env(container: dict) -> dict[str, str]:
    """The environment as the kubelet builds it: envFrom, then env over it in order, $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= named("ConfigMap", source["configMapRef"]["name"]).get("data", {})
        if "secretRef" in source:
            secret = named("Secret", source["secretRef"]["name"])
            env |= dict.fromkeys([*secret.get("stringData", {}), *secret.get("data", {})], SECRET)
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "fieldRef" in ref:
            value = f"<{ref['fieldRef']['fieldPath']}>"
        elif "configMapKeyRef" in ref:
            value = named("ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            value = SECRET
        else:
            # Only variables defined earlier expand; anything else stays literally "$(NAME)", as on a node.
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var.get("value", ""))
        env[var["name"]] = value
    return env


def settings_in(container: dict) -> Settings:
    """The Settings a process in this container reads, this machine's PATCHSERVE_* variables set aside."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)} | container_env(container)
    with mock.patch.dict(os.environ, environ, clear=True):
        return Settings()


def port_number(container: dict, port: int | str) -> int | None:
    """A probe's or Service's port resolved against the container's ports (None: it has no such port)."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def image_entrypoint() -> str:
    """The absolute path of the program the Dockerfile's CMD runs."""
    text = (REPO / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    command = json.loads(re.findall(r"^CMD\s+(\[.*\])", text, re.M)[-1])
    return str(Path(workdir) / command[0])


# -- schemas and the kustomization ---------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(version):
    errors = []
    for file, doc in documents():
        if not {"apiVersion", "kind", "metadata"} <= doc.keys():
            errors.append(f"{file}: a document without apiVersion, kind or metadata")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: a misspelt field fails
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{file}: {ident(doc)}: {'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{file}: {ident(doc)}: {e.message}")
    assert not errors, f"against Kubernetes {version}:\n" + "\n".join(errors)


def test_kustomization_lists_exactly_the_resource_files():
    kustomization = yaml.safe_load((K8S / KUSTOMIZATION).read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"listed twice in {KUSTOMIZATION}: {listed}"
    present = {p.name for p in resource_files()}
    assert not present - set(listed), f"not in {KUSTOMIZATION}'s resources: {sorted(present - set(listed))}"
    assert not set(listed) - present, f"listed but missing: {sorted(set(listed) - present)}"

    namespaces = [doc["metadata"]["name"] for _, doc in of_kind("Namespace")]
    assert namespaces == [kustomization["namespace"]] == ["patchserve"]
    ids = [(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()]
    assert len(ids) == len(set(ids)), "kustomize refuses two objects of one kind and name"
    # The image name the manifests use is the one kustomization.yaml points at a registry.
    images = {i["name"] for i in kustomization.get("images", [])}
    for file, doc, c in running(*REQUIRED_COMMANDS):
        assert c["image"] in images, f"{file}: {ident(doc)} runs image {c['image']!r}, not set in images:"


# -- the service's own settings and commands -----------------------------------------------------------
def test_every_patchserve_variable_is_a_setting():
    """A misspelt PATCHSERVE_ variable is silently ignored: each one named here, comments included, must exist."""
    assert Settings.model_config["env_prefix"] == PREFIX
    fields = set(Settings.model_fields)
    unknown, seen = [], set()
    for path in sorted(K8S.iterdir()):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for var in re.findall(rf"\b{PREFIX}[A-Z0-9_]+", line):
                seen.add(var)
                if var.removeprefix(PREFIX).lower() not in fields:
                    unknown.append(f"{path.name}:{lineno}: {var}")
    assert seen, "no PATCHSERVE_ variable found: is deploy/k8s empty?"
    assert not unknown, "not fields of service.settings.Settings:\n" + "\n".join(unknown)


def test_settings_parse_in_every_container():
    found = running(*REQUIRED_COMMANDS)
    assert found
    for file, doc, c in found:
        try:
            settings_in(c)
        except ValidationError as e:  # a value of the wrong type, which the process would refuse at start
            pytest.fail(f"{file}: {ident(doc)} container {c['name']}: {e}")


@pytest.mark.parametrize("command", REQUIRED_COMMANDS)
def test_the_manifests_run_each_command_and_it_exists(command):
    assert running(command), f"no container runs `patchserve {command}`"
    assert command in typer.main.get_command(cli_app).commands, f"service/cli.py has no `patchserve {command}`"


def test_every_patchserve_invocation_names_a_real_command():
    commands = set(typer.main.get_command(cli_app).commands)
    entrypoint = image_entrypoint()
    for file, doc in workloads():
        for c in containers(doc):
            command = patchserve_command(c)
            if command is None:
                continue
            where = f"{file}: {ident(doc)} container {c['name']}"
            assert command in commands, f"{where}: `patchserve {command}` is not a command ({sorted(commands)})"
            assert entrypoint in argv(c), f"{where}: the image's patchserve is {entrypoint}, not in {argv(c)}"


# -- probes, drains and identity -----------------------------------------------------------------------
def test_workloads_select_their_pods_and_probe_every_container():
    assert workloads()
    for file, doc in workloads():
        assert selects(doc["spec"]["selector"]["matchLabels"], template_labels(doc)), \
            f"{file}: {ident(doc)}: the selector does not match its own pod template"
        for c in containers(doc):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    assert kind == "startupProbe", f"{file}: {ident(doc)} container {c['name']} has no {kind}"
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action:
                    assert port_number(c, action["port"]), \
                        f"{file}: {ident(doc)}: {kind} on port {action['port']!r}, which the container lacks"


def test_servers_probe_their_own_port_and_outlast_their_drain():
    found = running(*SERVERS)
    assert {patchserve_command(c) for _, _, c in found} == set(SERVERS)
    for file, doc, c in found:
        where = f"{file}: {ident(doc)}"
        settings = settings_in(c)
        port = settings.port if patchserve_command(c) == "serve" else settings.router_port
        assert port_number(c, port) == port, f"{where}: listens on {port}, which is not a containerPort"
        for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c[kind].get("httpGet", {})
            assert get.get("path") == path and port_number(c, get.get("port")) == port, \
                f"{where}: {kind} must GET {path} on port {port}, not {get}"
        # The kubelet's SIGKILL must not cut the drain short: grace, then requests in flight.
        grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        drain = settings.drain_grace_s + settings.drain_timeout_s
        assert grace > drain, f"{where}: terminationGracePeriodSeconds {grace} <= drain {drain} s"
        assert_scraped_on(doc, port, where)


def assert_scraped_on(workload: dict, port: int, where: str) -> None:
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true", f"{where}: not annotated prometheus.io/scrape"
    assert annotations.get("prometheus.io/port") == str(port), f"{where}: prometheus.io/port must be {port}"


def test_workers_are_probed_and_scraped_on_their_metrics_port():
    workers = running("worker")
    assert workers, "no Deployment runs `patchserve worker`"
    for file, doc, c in workers:
        where = f"{file}: {ident(doc)}"
        port = settings_in(c).worker_metrics_port
        assert port_number(c, port) == port, f"{where}: metrics on {port}, which is not a containerPort"
        for kind in ("readinessProbe", "livenessProbe"):
            assert port_number(c, c[kind]["httpGet"]["port"]) == port, f"{where}: {kind} not on port {port}"
        assert_scraped_on(doc, port, where)


def test_gateways_are_set_up_for_kubernetes():
    gateways = running("serve")
    assert gateways, "no Deployment runs `patchserve serve`"
    claimed: dict[str, str] = {}
    for file, doc, c in gateways:
        where = f"{file}: {ident(doc)}"
        settings = settings_in(c)
        assert "PATCHSERVE_BASE" in {v["name"] for v in c.get("env", [])}, f"{where}: sets no PATCHSERVE_BASE"
        # Workers are their own Deployment; no replica seeds the demo kit; others can reach it.
        assert settings.worker_in_process is False and settings.seed_kit is False, where
        assert settings.host == "0.0.0.0", where
        # Identity from the downward API: routers reach each replica by pod IP on the port it serves.
        assert settings.replica_id == "<metadata.name>", f"{where}: replica id {settings.replica_id!r}"
        assert settings.advertise_url == f"http://<status.podIP>:{settings.port}", \
            f"{where}: advertise URL {settings.advertise_url!r}"
        assert (settings.blob_url or "").startswith("s3://"), f"{where}: blobs must live in S3 ({settings.blob_url})"
        strategy = doc["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", where
        assert (strategy["rollingUpdate"]["maxUnavailable"], strategy["rollingUpdate"]["maxSurge"]) == (0, 1), where
        # A model name answered by two Deployments would route to either base.
        for name in [settings.base, *settings.base_aliases]:
            assert name not in claimed, f"{where}: {name!r} is already served by {claimed[name]}"
            claimed[name] = ident(doc)


def test_s3_credentials_reach_gateways_and_workers_only():
    for file, doc, c in running(*REQUIRED_COMMANDS):
        env = container_env(c)
        has_keys = env.get("AWS_ACCESS_KEY_ID") == env.get("AWS_SECRET_ACCESS_KEY") == SECRET
        needs_keys = patchserve_command(c) in ("serve", "worker")
        assert has_keys == needs_keys, f"{file}: {ident(doc)}: S3 keys {'missing' if needs_keys else 'not needed'}"


def test_the_registry_url_names_a_service_here():
    for file, doc, c in running(*REQUIRED_COMMANDS):
        url = settings_in(c).redis_url or container_env(c).get("REDIS_URL")
        assert url, f"{file}: {ident(doc)}: no Redis URL (the embedded Redis would be one per pod)"
        host, port = urlparse(url).hostname, urlparse(url).port or 6379
        if "." in host:
            continue  # an external Redis: nothing here to match
        ports = [p["port"] for p in named("Service", host)["spec"]["ports"]]
        assert port in ports, f"{file}: Redis URL {url}: Service {host} has ports {ports}"


# -- budgets, autoscalers, Services --------------------------------------------------------------------
def test_each_gateway_has_a_budget_and_an_autoscaler():
    budgets, autoscalers = of_kind("PodDisruptionBudget"), of_kind("HorizontalPodAutoscaler")
    exported = {family.name for family in metrics.REGISTRY.collect()}
    for file, doc in budgets:
        selector = doc["spec"]["selector"].get("matchLabels", {})
        chosen = [ident(w) for _, w in workloads() if selects(selector, template_labels(w))]
        # One budget per Deployment: spanning two, it would let a drain empty one of them.
        assert len(chosen) == 1, f"{file}: {ident(doc)} selects {chosen or 'nothing'}"
    for _, a in autoscalers:
        target = a["spec"]["scaleTargetRef"]
        named(target["kind"], target["name"])

    needing_budgets = [(f, d) for f, d, _ in running("serve", "router")]
    for file, doc in needing_budgets:
        mine = [b for _, b in budgets if selects(b["spec"]["selector"].get("matchLabels", {}), template_labels(doc))]
        assert len(mine) == 1, f"{file}: {ident(doc)} has {len(mine)} PodDisruptionBudgets, wants 1"

    for file, doc, _ in running("serve"):
        where = f"{file}: {ident(doc)}"
        mine = [a for _, a in autoscalers if a["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": doc["metadata"]["name"]}]
        assert len(mine) == 1, f"{where} has {len(mine)} autoscalers, wants 1"
        spec = mine[0]["spec"]
        pods_metrics = [m["pods"] for m in spec["metrics"] if m["type"] == "Pods"]
        assert [m["metric"]["name"] for m in pods_metrics] == ["patchserve_queue_depth"], where
        assert "patchserve_queue_depth" in exported
        assert pods_metrics[0]["target"]["type"] == "AverageValue", where
        budget = next(b for _, b in budgets if selects(b["spec"]["selector"]["matchLabels"], template_labels(doc)))
        # At the budget's floor, no node holding a replica could ever drain.
        assert spec["minReplicas"] > budget["spec"]["minAvailable"], where
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, f"{where}: scales down fast"


def test_services_select_pods_that_exist():
    services = of_kind("Service")
    assert services
    for file, svc in services:
        selector = svc["spec"].get("selector", {})
        pods = [w for _, w in workloads() if selects(selector, template_labels(w))]
        assert pods, f"{file}: {ident(svc)} selects no pod template ({selector})"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in pods:
                assert any(port_number(c, target) for c in containers(w)), \
                    f"{file}: {ident(svc)} targets port {target!r}, which {ident(w)} does not expose"
    for file, sts in of_kind("StatefulSet"):
        governing = named("Service", sts["spec"]["serviceName"])
        assert governing["spec"].get("clusterIP") == "None", f"{file}: {ident(sts)}: serviceName must be headless"


# -- Prometheus ----------------------------------------------------------------------------------------
def prometheus_files() -> dict[str, str]:
    return named("ConfigMap", "prometheus-config")["data"]


def test_prometheus_discovers_annotated_pods_and_embeds_the_alert_rules():
    files = prometheus_files()
    config = yaml.safe_load(files["prometheus.yml"])
    for rule_file in config["rule_files"]:
        assert rule_file in files, f"rule file {rule_file} is not in the ConfigMap"
    embedded = yaml.safe_load(files["alerts.yml"])
    assert embedded == yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text()), \
        "prometheus.yaml's alerts.yml differs from deploy/prometheus/alerts.yml: copy it over"
    jobs = [j for j in config["scrape_configs"]
            if any(sd.get("role") == "pod" for sd in j.get("kubernetes_sd_configs", []))]
    assert jobs, "no scrape job discovers pods"
    keep = [r for j in jobs for r in j.get("relabel_configs", []) if r.get("action") == "keep"]
    assert any(r["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
               and r["regex"] == "true" for r in keep), "pods are not kept by prometheus.io/scrape"
    # The Prometheus pod reads the files where its flags say.
    prometheus = named("Deployment", "prometheus")["spec"]["template"]["spec"]
    flag = next(a for a in prometheus["containers"][0]["args"] if a.startswith("--config.file="))
    volume = next(v["name"] for v in prometheus["volumes"] if v.get("configMap", {}).get("name") == "prometheus-config")
    mounts = {m["name"]: m["mountPath"] for m in prometheus["containers"][0]["volumeMounts"]}
    assert Path(flag.split("=", 1)[1]) == Path(mounts[volume]) / "prometheus.yml"


def write_prometheus_files(directory: Path, without_discovery: bool = False) -> Path:
    files = dict(prometheus_files())
    if without_discovery:
        config = yaml.safe_load(files["prometheus.yml"])
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["gateway:8000"]}]
        files["prometheus.yml"] = yaml.safe_dump(config)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory / "prometheus.yml"


def promtool_check(config: Path) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian's prometheus package has it)")
    return subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=30)


def test_promtool_accepts_the_prometheus_config(tmp_path):
    result = promtool_check(write_prometheus_files(tmp_path))
    if result.returncode and "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without Kubernetes discovery; the next test checks everything else.
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config_with_discovery_swapped_for_a_static_target(tmp_path):
    """Relabelling, the rule files and their rules, checked by any promtool build."""
    result = promtool_check(write_prometheus_files(tmp_path, without_discovery=True))
    assert result.returncode == 0, result.stdout + result.stderr
