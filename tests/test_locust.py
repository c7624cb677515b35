"""The Locust scenario (loadtests/locustfile.py) runs headless through loadtests/run_locust.py against a
live vLLM gateway: tenants over every alias while the operator uploads, activates through the gate and
rolls back on an alias they call — and not one request fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tenants_and_an_operator_under_load_with_zero_failures(gateways, kit_dir, tmp_path):
    gw = gateways.get("vllm")
    out = tmp_path / "summary.json"
    env = {**os.environ, "PATCHSERVE_ADMIN_KEY": gw.admin_key, "PATCHSERVE_KIT_DIR": str(kit_dir)}
    done = subprocess.run([sys.executable, str(REPO / "loadtests" / "run_locust.py"), "--host", gw.url,
                           "--users", "4", "--time", "45s", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and summary["failures"] == []
    assert summary["requests"] > 50 and summary["ttft_p99_ms"] > 0
    actions = summary["operator_actions"]
    assert actions.get("admin: activate", 0) >= 1 and actions.get("admin: rollback", 0) >= 1, actions
    with gw.admin() as admin:
        history = admin.get("/admin/aliases/locust-ops").json()["history"]
    assert [h["action"] for h in history].count("rollback") >= 1
