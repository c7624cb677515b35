"""`kill -9` of a standalone worker mid-job: another worker takes the job over and it completes once.

Twice: a gated activation (the alias moves once), and a base port killed after it carried a first
patch (each patch is carried once: the retry finds the version its first attempt made).

A gateway without an in-process worker and a `patchserve worker` process share a Redis the test
started. A gated activation is queued; the worker is killed while the job runs; a second worker
claims the job once it has been silent for the claim interval, and finishes it: the alias moves once,
the job shows two attempts, and no version is created twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from adapters_store.redis_server import EmbeddedRedis
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port

CLAIM_IDLE_S = 3


def _worker(env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], stdout=subprocess.DEVNULL, stderr=log,
                            env={**env, "PATCHSERVE_WORKER_METRICS_PORT": str(free_port())})


def test_a_killed_worker_s_job_completes_once(kit_dir, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_DIR": str(tmp_path / "blobs"),
              "PATCHSERVE_JOB_CLAIM_IDLE_S": str(CLAIM_IDLE_S), "PATCHSERVE_LOG_LEVEL": "INFO"}
    gw = GatewayProcess(kit_dir, "transformers", tmp_path, PATCHSERVE_WORKER_IN_PROCESS="false", **shared).start()
    env = {**gw.env, "PATCHSERVE_DATA_DIR": str(tmp_path / "worker-data")}
    workers = []
    try:
        name = f"wk-{uuid.uuid4().hex[:8]}"
        files = [("file", (f.name, f.read_bytes())) for f in sorted((kit_dir / "patches" / "qa").iterdir())]
        with gw.admin() as admin:
            for _ in range(2):
                assert admin.post(f"/admin/patches/{name}/versions", files=files).status_code == 201
            assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 1}).status_code == 200
            rows = (kit_dir / "eval" / "qa.jsonl").read_text()
            assert admin.put(f"/admin/aliases/{name}/evalset", content=rows).status_code == 200
            location = admin.post(f"/admin/aliases/{name}/activate", json={"version": 2}).headers["location"]

            workers.append(_worker(env, (tmp_path / "worker-1.log").open("w")))
            deadline = time.monotonic() + 120
            while admin.get(location).json()["state"] != "running":
                assert time.monotonic() < deadline, admin.get(location).json()
                time.sleep(0.05)
            workers[0].kill()  # mid-job: no handler runs, the entry stays pending
            workers[0].wait()
            stalled = admin.get(location).json()
            assert stalled["state"] == "running" and stalled["attempts"] == 1

            workers.append(_worker(env, (tmp_path / "worker-2.log").open("w")))
            job = gw.wait_job(location)
            assert job["state"] == "succeeded" and job["result"]["activated"] and job["attempts"] == 2, job
            history = admin.get(f"/admin/aliases/{name}").json()["history"]
            assert [h["to_ref"] for h in history] == [f"{name}@1", f"{name}@2"], "moved exactly once"
            assert [v["version"] for v in admin.get(f"/admin/patches/{name}").json()["versions"]] == [1, 2]
            assert admin.get("/admin/jobs/dead-letters").json() == []

            # A job that creates versions: the port to base-v2, killed after it carried a first patch.
            port = admin.post("/admin/bases", json={"name": "base-v2", "version": "kit",
                                                    "path": str(kit_dir / "base-v2")}).headers["location"]
            deadline = time.monotonic() + 120
            while ": evaluating" not in (job := admin.get(port).json())["stage"]:
                assert time.monotonic() < deadline and job["state"] in ("queued", "running"), job
                time.sleep(0.02)
            workers[1].kill()
            workers[1].wait()
            workers.append(_worker(env, (tmp_path / "worker-3.log").open("w")))
            job = gw.wait_job(port)
            assert job["state"] == "succeeded" and job["attempts"] == 2, job
            for alias in ("sentiment", "reverse", "qa", name):
                versions = admin.get(f"/admin/patches/{alias}").json()["versions"]
                ported = [v for v in versions if v["origin"] == "port"]
                assert len(ported) == 1, f"{alias}: carried {len(ported)} times"
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait(10)
        gw.stop()
        server.stop()
    assert os.path.getsize(tmp_path / "worker-2.log") > 0  # the second worker said what it did
