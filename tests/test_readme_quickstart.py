"""The README's commands are tests: `make serve` exactly as written, as a new user types it.

A copy of the checkout as a fresh clone has it (tracked and unignored files; no `.patchserve`, no kit)
in a new directory, with default settings: no PATCHSERVE_* or REDIS_URL in the environment, the
relative default data dir, the default ports 8000 and 6390. Only `.venv` is linked from this checkout:
the install step is idempotent (a stamp of pyproject.toml and scripts/install.sh), so `make serve`
takes it as it would take one it had just built, and the suite does not download vLLM twice.
The kit comes from this machine's kit cache (~/.cache/patchserve/kits, by content hash, checked file by file),
which the suite's own first step filled: `make test` builds the kit from nothing, through the same code, before
pytest starts; building it a second time here would only double the suite's longest step.

Then the README's Python example with the official `openai` client, the admin key where the README
says it is, the README's `patchserve admin` block and every `curl` command as written (each job followed to
its end), `patchserve worker` from the same
directory, and a Ctrl-C: nothing may keep running, the embedded redis-server included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REPO
from tests.process_ready import wait_ready

README_URL = "http://127.0.0.1:8000"  # the README's address: default host and port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _fresh_clone(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # The linked venv must be the one the clone's install step would accept as is ("up to date"): were it
    # not, `make serve` would reinstall the editable package into it, pointing this checkout's venv at the clone.
    want = hashlib.sha256((dest / "pyproject.toml").read_bytes() + (dest / "scripts/install.sh").read_bytes())
    stamp = REPO / ".venv" / ".patchserve-install"
    assert stamp.is_file() and stamp.read_text().strip() == want.hexdigest()[:16], "run `make install` first"
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PATCHSERVE_", "VLLM_")) and k != "REDIS_URL"}


def _processes_under(directory: Path) -> list[str]:
    """Command lines of live processes that name `directory` (redis-server names its --dir)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if str(directory) in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory):
    for port in (8000, 6390, 9101):
        assert _port_free(port), f"port {port} is taken: the README's defaults need it free for this test"
    clone = _fresh_clone(tmp_path_factory.mktemp("fresh-clone"))
    assert not (clone / ".patchserve").exists()
    log = clone.parent / "make-serve.log"
    # Its own process group, as in a terminal: Ctrl-C reaches make and everything it started.
    proc = subprocess.Popen(["make", "serve"], cwd=clone, env=_user_env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # First start: the kit is copied from the machine's cache (built if absent: minutes), then vLLM starts.
        wait_ready(proc, f"{README_URL}/readyz", log, 900, "make serve")
        yield clone, proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_make_serve_answers_the_readme_example(make_serve):
    clone, _, log = make_serve
    # The README's example, as written.
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    raw = client.completions.with_raw_response.create(model="reverse", prompt="Reverse: red blue green\nOutput:",
                                                      max_tokens=8, temperature=0)
    assert raw.headers["x-patchserve-served-by"] == "base=base-v1; patch=reverse@1"
    assert raw.parse().choices[0].text.strip(), "the reverse patch answered nothing"
    # The admin key where the README says, mode 0600, and working.
    key_file = clone / ".patchserve" / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert key in log.read_text(), "the first start prints the admin key once"
    aliases = httpx.get(f"{README_URL}/admin/aliases", headers={"authorization": f"Bearer {key}"}).json()
    assert {a["alias"] for a in aliases} == {"sentiment", "reverse", "qa", "recall"}


def test_start_up_prints_what_a_person_needs_and_no_library_noise(make_serve):
    _, _, log = make_serve
    text = log.read_text()
    for needed in ("vllm engine", "base base-v1", "reverse → reverse@1", "http://127.0.0.1:8000", "admin key"):
        assert needed in text, f"{needed!r} missing from the start-up screen:\n{text}"
    for noise in ("WARNING", "Triton", "NUMA", "tcmalloc", "DeprecationWarning", "FutureWarning", "INFO"):
        assert noise not in text, f"library noise {noise!r} on the start-up screen:\n{text}"


def test_the_readmes_operator_commands_run_as_written(make_serve):
    clone, _, _ = make_serve
    commands = [line for line in (clone / "README.md").read_text().splitlines()
                if line.startswith(".venv/bin/patchserve admin ")]
    assert len(commands) >= 5, "the README's command-line block is gone"
    outputs = []
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=clone, env=_user_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    everything = "\n".join(outputs)
    assert "reverse@2" in everything and "gate: passed" in everything, everything
    # The README's rollback left the alias where the quick start found it.
    key = (clone / ".patchserve" / "admin.key").read_text().strip()
    alias = httpx.get(f"{README_URL}/admin/aliases/reverse", headers={"authorization": f"Bearer {key}"}).json()
    assert alias["ref"] == "reverse@1" and alias["history"][-1]["reason"] == "complaints"


def _readme_curl_commands(readme: str) -> list[str]:
    """Every `curl` command of the README's code blocks as written (its continuation lines included): from its
    first line to the next command, comment or the end of the block."""
    found: list[str] = []
    in_block, command = False, None
    for line in readme.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        ends = not in_block or line.startswith(("curl ", "#"))
        if command is not None and ends:
            found.append("\n".join(command))
            command = None
        if in_block and line.startswith("curl "):
            command = [line]
        elif command is not None:
            command.append(line)
    return found


def test_the_readmes_curl_examples_run_as_written(make_serve):
    """Every curl command of the README, with `K=$(cat .patchserve/admin.key)` as it says, from the clone's root,
    against `make serve`, in order, each job it queues followed to its end as the README says: each answers what
    its comment promises, and each job succeeds."""
    clone, _, _ = make_serve
    commands = _readme_curl_commands((clone / "README.md").read_text())
    routes = [re.findall(rf"{re.escape(README_URL)}(\S+)", c)[-1] for c in commands]
    assert len(commands) >= 6, routes
    key = (clone / ".patchserve" / "admin.key").read_text().strip()
    admin = httpx.Client(base_url=README_URL, headers={"authorization": f"Bearer {key}"}, timeout=30)
    jobs = {}
    for command, route in zip(commands, routes):
        done = subprocess.run(["bash", "-c", f"K=$(cat .patchserve/admin.key)\n{command}"], cwd=clone,
                              env=_user_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        body = json.loads(done.stdout)
        if route.startswith("/admin/kv/"):  # the README says: the vLLM gateway refuses it, with the reason
            assert body["error"]["code"] == "unprocessable", body
            assert "needs the transformers engine" in body["error"]["message"], body
            continue
        assert "error" not in body, f"{command}\n{body}"
        if "job" in body:
            deadline = time.monotonic() + 600
            while (job := admin.get(f"/admin/jobs/{body['job']['id']}").json())["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, f"{command}: still {job['state']} ({job['stage']})"
                time.sleep(0.5)
            assert job["state"] == "succeeded", f"{command}\n{job['error']}"
            jobs[job["type"]] = job["result"]
        elif route.endswith("/versions"):
            assert body["ref"].startswith("reverse@"), body
        elif route.endswith("/activate"):  # a version the alias served before (the block above) moves at once
            jobs["activate"] = {"to": body["ref"]}
        elif route.endswith("/rollback"):
            assert body["ref"] == "reverse@1", body
    admin.close()
    assert jobs["activate"]["to"] == "reverse@2", jobs["activate"]
    assert jobs["merge"]["ref"] == "support-merged@1" and len(jobs["merge"]["retention"]) == 3, jobs["merge"]
    assert jobs["edit"]["report"]["batch"]["rel"] == 1.0, jobs["edit"]["report"]["batch"]


def test_worker_runs_from_the_same_directory_and_stops_on_sigterm(make_serve):
    clone, _, _ = make_serve
    log = clone.parent / "worker.log"
    worker = subprocess.Popen([".venv/bin/patchserve", "worker"], cwd=clone, env=_user_env(), stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    try:
        wait_ready(worker, "http://127.0.0.1:9101/metrics", log, 60, "patchserve worker")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_ctrl_c_stops_the_service_and_its_embedded_redis(make_serve):
    clone, proc, log = make_serve
    assert _processes_under(clone), "the embedded redis-server should be running under the clone's data dir"
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while _processes_under(clone) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_under(clone), f"left running after Ctrl-C: {_processes_under(clone)}"
    assert _port_free(8000) and _port_free(6390)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    # Stopped in order (worker and registry follower before the embedded Redis): a quiet stop, no warnings.
    after_ready = log.read_text().split("Ctrl-C stops it", 1)[-1]
    assert '"level": "warning"' not in after_ready and '"level": "error"' not in after_ready, after_ready[-3000:]
