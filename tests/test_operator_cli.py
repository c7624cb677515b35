"""The operator's command line (`patchserve admin …`) driven as an operator types it, against a live gateway.

Each call is a real `python -m service.cli admin …` process talking HTTP to the session's shared
transformers gateway; the test only changes what it creates (a patch and an alias named for it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

GATE_REFUSED = 3


@pytest.fixture(scope="module")
def gw(gateways):
    return gateways.get("transformers")


def admin(gw, *args: str, key: str | None = None, url: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`patchserve admin ARGS` with the gateway's URL and admin key in the environment (as an operator sets them)."""
    environ = {**os.environ, "PATCHSERVE_URL": url or gw.url, "PATCHSERVE_ADMIN_KEY": key or gw.admin_key, **env}
    return subprocess.run([sys.executable, "-m", "service.cli", "admin", *args], env=environ,
                          capture_output=True, text=True, timeout=600)


def as_json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The error an operator reads: status 1, exactly one line on stderr, no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_upload_activate_through_the_gate_watch_report_and_roll_back(gw, kit_dir, tmp_path):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    first = as_json(admin(gw, "patches", "upload", name, str(kit_dir / "patches" / "sentiment"), "--json",
                          "--reason", "first cut"))
    assert first["ref"] == f"{name}@1" and first["base"] == "base-v1"
    moved = as_json(admin(gw, "aliases", "activate", name, "1", "--json"))  # a new alias: no gate, at once
    assert moved["ref"] == f"{name}@1"

    rows = (kit_dir / "eval" / "sentiment.jsonl").read_text().splitlines()[:12]
    evalset = tmp_path / "evalset.jsonl"
    evalset.write_text("\n".join(rows) + "\n")
    assert as_json(admin(gw, "aliases", "evalset", name, str(evalset), "--json"))["n"] == 12

    # The reverse patch under this name fails the sentiment gate: the job ends, the alias stays, exit 3.
    refused = admin(gw, "patches", "upload", name, str(kit_dir / "patches" / "reverse"), "--activate")
    assert refused.returncode == GATE_REFUSED, refused.stderr
    assert "compatibility report" in refused.stdout and "gate: refused" in refused.stdout
    assert "negative flip rate" in refused.stdout
    assert as_json(admin(gw, "aliases", "list", "--json")) and \
        next(a for a in as_json(admin(gw, "aliases", "list", "--json")) if a["alias"] == name)["version"] == 1

    # The same weights again pass it; `--no-wait` queues, `jobs watch` follows to the end and shows the verdict.
    as_json(admin(gw, "patches", "upload", name, str(kit_dir / "patches" / "sentiment"), "--json"))
    queued = as_json(admin(gw, "aliases", "activate", name, "3", "--no-wait", "--json"))
    assert queued["type"] == "activate" and queued["state"] in ("queued", "running", "succeeded")
    watched = admin(gw, "jobs", "watch", queued["id"])
    assert watched.returncode == 0, watched.stderr
    assert "succeeded" in watched.stdout and "gate: passed" in watched.stdout
    assert any(j["id"] == queued["id"] for j in as_json(admin(gw, "jobs", "list", "--json", "--limit", "50")))

    report = as_json(admin(gw, "reports", "show", f"{name}@3", "--json"))
    assert report["candidate"] == f"{name}@3" and report["nfr"] == 0 and report["gate"]["passed"]
    table = admin(gw, "reports", "show", f"{name}@2")
    assert table.returncode == 0 and "refused" in table.stdout and "nfr" in table.stdout

    back = as_json(admin(gw, "aliases", "rollback", name, "--reason", "undo", "--json"))
    assert back["ref"] == f"{name}@1"
    history = as_json(admin(gw, "aliases", "history", name, "--json"))["history"]
    assert [h["to_ref"] for h in history][-3:] == [f"{name}@1", f"{name}@3", f"{name}@1"]
    assert history[-1]["reason"] == "undo"
    shown = admin(gw, "patches", "show", name)
    assert shown.returncode == 0 and all(f"{name}@{n}" in shown.stdout for n in (1, 2, 3))
    audit = as_json(admin(gw, "audit", "--json", "--limit", "200"))
    assert any(e["action"] == "gate_refused" and e["target"] == name for e in audit)


def test_keys_are_created_listed_and_revoked_and_a_secret_is_shown_once(gw):
    created = as_json(admin(gw, "keys", "create", f"tenant-{uuid.uuid4().hex[:6]}", "--role", "inference", "--json"))
    assert created["key"] and created["role"] == "inference"
    listed = as_json(admin(gw, "keys", "list", "--json"))
    assert any(k["id"] == created["id"] for k in listed) and all("key" not in k for k in listed)
    assert as_json(admin(gw, "keys", "revoke", created["id"], "--json")) == {"id": created["id"], "revoked": True}
    assert not any(k["id"] == created["id"] for k in as_json(admin(gw, "keys", "list", "--json")))
    assert one_line_error(admin(gw, "keys", "revoke", created["id"])) == \
        f"error: 404 not_found: no key {created['id']!r}"


def test_errors_are_one_clear_line(gw, tmp_path):
    assert one_line_error(admin(gw, "aliases", "history", "no-such-alias")) == \
        "error: 404 not_found: no alias 'no-such-alias'"
    assert "401" in one_line_error(admin(gw, "aliases", "list", key="not-a-key"))
    assert "cannot reach http://127.0.0.1:9" in one_line_error(admin(gw, "aliases", "list", url="http://127.0.0.1:9"))
    assert one_line_error(admin(gw, "merges", "create", "a@1", "b@1", "--name", "m", "--rank", "4",
                                "--method", "nope")).startswith("error: 400 invalid_request_error: method: ")
    assert "has no adapter_config.json" in one_line_error(admin(gw, "patches", "upload", "x", str(tmp_path)))
    usage = admin(gw, "reports", "show", "not-a-ref")
    assert usage.returncode == 2 and "not a version like sentiment@2" in usage.stderr


def test_without_a_key_in_the_environment_it_reads_the_local_servers_key_file(gw):
    environ = {k: v for k, v in os.environ.items() if k != "PATCHSERVE_ADMIN_KEY"}
    done = subprocess.run([sys.executable, "-m", "service.cli", "admin", "bases", "list", "--json"],
                          env={**environ, "PATCHSERVE_URL": gw.url, "PATCHSERVE_DATA_DIR": str(gw.data_dir)},
                          capture_output=True, text=True, timeout=120)
    assert any(b["name"] == "base-v1" for b in as_json(done))
    missing = subprocess.run([sys.executable, "-m", "service.cli", "admin", "bases", "list"],
                             env={**environ, "PATCHSERVE_URL": gw.url, "PATCHSERVE_DATA_DIR": "/nonexistent"},
                             capture_output=True, text=True, timeout=120)
    assert "no admin key" in one_line_error(missing)
