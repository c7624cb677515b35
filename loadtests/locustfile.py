"""Locust scenario: tenants calling the OpenAI API over a mix of aliases while an operator changes patches.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000   (or: loadtests/run_locust.py)

`Tenant` users send chat and plain completions, streamed and not, over the kit's aliases with the
kit's own prompts (the kit's tasks are short: prompts of 8–40 tokens, answers of 4–48). Streamed
requests also report their time to first token as request type "TTFT" and their whole time as
"E2E", so the CSVs carry what users feel. One `Operator` uploads a new version of its patch,
activates it through the gate (a worker job it follows), reads the report and rolls back, on an
alias the tenants also call: every move happens under their traffic.

Environment: PATCHSERVE_ADMIN_KEY (the operator's key; without it the operator stays idle),
PATCHSERVE_KIT_DIR (default .patchserve/kit), LOCUST_ALIASES (default: sentiment,reverse,qa,tiny and,
with a key, the operator's alias locust-ops).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task

KIT = Path(os.environ.get("PATCHSERVE_KIT_DIR", Path(__file__).resolve().parents[1] / ".patchserve" / "kit"))
ADMIN_KEY = os.environ.get("PATCHSERVE_ADMIN_KEY", "")
OPERATOR_ALIAS = "locust-ops"  # the operator's own alias: created at test start, called by tenants too
ALIASES = os.environ.get("LOCUST_ALIASES", "sentiment,reverse,qa,tiny" + (f",{OPERATOR_ALIAS}" if ADMIN_KEY else "")
                         ).split(",")
TASK_OF = {"sentiment": "sentiment", "reverse": "reverse", "qa": "qa"}  # alias → the kit task it answers


def _prompts() -> dict[str, list[str]]:
    found = {}
    for task_name in ("sentiment", "reverse", "qa", "facts-v1"):
        path = KIT / "eval" / f"{task_name}.jsonl"
        found[task_name] = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return found


PROMPTS = _prompts()


def prompt_for(alias: str) -> str:
    return random.choice(PROMPTS[TASK_OF.get(alias, "facts-v1")])


@events.test_start.add_listener
def create_operator_alias(environment, **_) -> None:
    """The operator's alias exists before any tenant calls it (a first version moves at once, no gate)."""
    if ADMIN_KEY:
        operator = _AdminCalls(environment.host)
        version = operator.upload()
        operator.session.post(f"{environment.host}/admin/aliases/{OPERATOR_ALIAS}/activate",
                              json={"version": version, "reason": "locust start"}).raise_for_status()


class Tenant(HttpUser):
    """A tenant's application: mostly short calls, some streamed, over the alias mix."""

    weight = 20
    wait_time = between(0.2, 1.0)

    @task(3)
    def chat_streamed(self) -> None:
        alias = random.choice(ALIASES)
        self._stream("/v1/chat/completions", alias, {"messages": [{"role": "user", "content": prompt_for(alias)}]},
                     "chat")

    @task(3)
    def completion_streamed(self) -> None:
        alias = random.choice(ALIASES)
        self._stream("/v1/completions", alias, {"prompt": prompt_for(alias)}, "completion")

    @task(2)
    def completion(self) -> None:
        alias = random.choice(ALIASES)
        body = {"model": alias, "prompt": prompt_for(alias), "max_tokens": random.randint(4, 48), "temperature": 0}
        with self.client.post("/v1/completions", json=body, name=f"completion {alias}",
                              catch_response=True) as response:
            if response.status_code != 200 or not response.json().get("choices"):
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(1)
    def chat(self) -> None:
        alias = random.choice(ALIASES)
        body = {"model": alias, "messages": [{"role": "user", "content": prompt_for(alias)}],
                "max_tokens": random.randint(4, 48), "temperature": 0}
        with self.client.post("/v1/chat/completions", json=body, name=f"chat {alias}",
                              catch_response=True) as response:
            if response.status_code != 200 or not response.json().get("choices"):
                response.failure(f"{response.status_code}: {response.text[:200]}")

    def _stream(self, path: str, alias: str, body: dict, kind: str) -> None:
        """A streamed call; its TTFT and whole time go to the stats as their own request types."""
        body = {**body, "model": alias, "stream": True, "max_tokens": random.randint(8, 48), "temperature": 0}
        started = time.perf_counter()
        first = None
        with self.client.post(path, json=body, stream=True, name=f"{kind} stream {alias}",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            done = False
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                if first is None:
                    first = time.perf_counter()
                if b'"error"' in line[:20]:
                    response.failure(f"error in the stream: {line[:200]!r}")
                    return
            if not done:
                response.failure("the stream ended without [DONE]")
                return
        for kind_name, until in (("TTFT", first), ("E2E", time.perf_counter())):
            if until is not None:
                events.request.fire(request_type=kind_name, name=alias, response_time=(until - started) * 1000,
                                    response_length=0, exception=None, context={})


class _AdminCalls:
    """The admin API calls the operator makes (plain requests: also used before users start)."""

    def __init__(self, host: str, session=None):
        import requests

        self.host = host
        self.session = session or requests.Session()
        self.session.headers["authorization"] = f"Bearer {ADMIN_KEY}"

    def upload(self, **kwargs) -> int:
        patch = KIT / "patches" / "sentiment"
        with (patch / "adapter_config.json").open("rb") as config, \
                (patch / "adapter_model.safetensors").open("rb") as weights:
            response = self.session.post(f"{self.host}/admin/patches/{OPERATOR_ALIAS}/versions",
                                         files=[("files", ("adapter_config.json", config)),
                                                ("files", ("adapter_model.safetensors", weights))],
                                         data={"reason": "locust operator"}, **kwargs)
        response.raise_for_status()
        return response.json()["version"]


class Operator(HttpUser):
    """One operator: upload → gated activation (follows the job) → read the report → roll back."""

    fixed_count = 1
    wait_time = between(2, 5)

    def on_start(self) -> None:
        self.admin = _AdminCalls(self.host, self.client)

    @task
    def change_and_undo(self) -> None:
        if not ADMIN_KEY:
            return
        version = self.admin.upload(name="admin: upload")
        moved = self.client.post(f"/admin/aliases/{OPERATOR_ALIAS}/activate", name="admin: activate",
                                 json={"version": version, "reason": "locust operator"})
        if moved.status_code != 202:
            return  # refused (recorded as a failure by locust), or moved at once: no report to read
        job = self._follow(moved.headers["location"])
        if job is None or job["state"] != "succeeded" or not job["result"].get("activated"):
            return  # _follow has recorded why
        self.client.get(f"/admin/patches/{OPERATOR_ALIAS}/versions/{version}/compat?items=false",
                        name="admin: report")
        self.client.get("/admin/jobs?limit=20", name="admin: jobs")
        self.client.post(f"/admin/aliases/{OPERATOR_ALIAS}/rollback", json={"reason": "locust undo"},
                         name="admin: rollback")

    def _follow(self, location: str, timeout_s: float = 120) -> dict | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.client.get(location, name="admin: job").json()
            if job["state"] in ("succeeded", "failed"):
                if job["state"] == "failed" or not (job["result"] or {}).get("activated"):
                    events.request.fire(request_type="JOB", name="activate", response_time=0, response_length=0,
                                        exception=RuntimeError(job.get("error") or "gate refused"), context={})
                return job
            time.sleep(0.5)
        events.request.fire(request_type="JOB", name="activate", response_time=timeout_s * 1000, response_length=0,
                            exception=TimeoutError(f"job {location} did not end in {timeout_s:.0f} s"), context={})
        return None
