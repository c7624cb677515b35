"""The OpenAI-compatible API, driven over HTTP with the official `openai` client, on both engines.

Every greedy answer must equal the transformers+PEFT reference computed here from the kit's files.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.evaluation.generation import greedy_generate
from tests.conftest import read_jsonl
from tests.gateway_server import GatewayProcess
from tests.process_ready import wait_ready

PATCHES = ["sentiment", "reverse", "qa"]
MAX_TOKENS = 12


@pytest.fixture(scope="session")
def reference(kit_dir):
    """Greedy completions from transformers+PEFT, by model name and prompt."""
    tok = AutoTokenizer.from_pretrained(kit_dir / "base-v1")
    base = AutoModelForCausalLM.from_pretrained(kit_dir / "base-v1", dtype=torch.float32).eval()
    models = {"tiny": base}
    for name in PATCHES:
        models[name] = PeftModel.from_pretrained(copy.deepcopy(base), kit_dir / "patches" / name).eval()
    cache: dict[tuple[str, str], str] = {}

    def complete(model: str, prompt: str) -> str:
        if (model, prompt) not in cache:
            ids = greedy_generate(models[model], tok, [prompt], max_new_tokens=MAX_TOKENS)[0]
            cache[(model, prompt)] = tok.decode(ids, skip_special_tokens=True)
        return cache[(model, prompt)]

    def chat(model: str, messages: list[dict]) -> str:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        out = models[model].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=MAX_TOKENS, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    complete.chat = chat
    return complete


def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def prompts(kit_dir, task: str, count: int = 4) -> list[str]:
    return [row["prompt"] for row in read_jsonl(kit_dir / "eval" / f"{task}.jsonl")[:count]]


def test_models_lists_bases_and_aliases(gateway):
    ids = {m.id for m in client(gateway).models.list()}
    assert {"tiny", *PATCHES} <= ids


@pytest.mark.parametrize("model", ["tiny", *PATCHES])
def test_completion_matches_reference(gateway, kit_dir, reference, model):
    task = model if model in PATCHES else "sentiment"
    for prompt in prompts(kit_dir, task):
        raw = client(gateway).completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                                   temperature=0)
        out = raw.parse()
        assert out.choices[0].text == reference(model, prompt)
        assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens >= 1
        patch = f"{model}@1" if model in PATCHES else "none"
        assert raw.headers["x-patchserve-served-by"] == f"base=base-v1; patch={patch}"


@pytest.mark.parametrize("model", ["tiny", "reverse"])
def test_streaming_completion_matches_reference(gateway, kit_dir, reference, model):
    prompt = prompts(kit_dir, "reverse", 1)[0]
    chunks = list(client(gateway).completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(model, prompt)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens > 0


def test_stream_is_server_sent_events_ending_in_done(gateway):
    with httpx.stream("POST", f"{gateway.url}/v1/completions", timeout=60,
                      json={"model": "sentiment", "prompt": "Review: good\nSentiment:", "max_tokens": 4,
                            "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-patchserve-served-by"] == "base=base-v1; patch=sentiment@1"
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["tiny", "qa"])
def test_chat_matches_reference(gateway, reference, model, stream):
    messages = [{"role": "user", "content": "Question: Where does Kelmar live?"}]
    c = client(gateway)
    if stream:
        chunks = list(c.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        out = c.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        text = out.choices[0].message.content
        assert out.choices[0].message.role == "assistant" and out.usage.total_tokens > 0
    assert text == reference.chat(model, messages)


def test_32_concurrent_requests_over_three_patches_and_the_base(gateway, kit_dir, reference):
    jobs = []
    for i in range(32):
        model = ["tiny", *PATCHES][i % 4]
        task = model if model in PATCHES else "qa"
        jobs.append((model, prompts(kit_dir, task, 8)[i // 4]))

    async def run() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        outs = await asyncio.gather(*(c.completions.create(model=m, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
                                      for m, p in jobs))
        await c.close()
        return [o.choices[0].text for o in outs]

    answers = asyncio.run(run())
    wrong = [(m, p, a) for (m, p), a in zip(jobs, answers) if a != reference(m, p)]
    assert not wrong, wrong[:3]


def test_sampling_options(gateway):
    c = client(gateway)
    args = dict(model="tiny", prompt="Kelmar", max_tokens=8, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=7, **args).choices[0].text
    b = c.completions.create(seed=7, **args).choices[0].text
    assert a == b, "the same seed gives the same sample"
    two = c.completions.create(n=2, seed=3, **args)
    assert sorted(ch.index for ch in two.choices) == [0, 1]
    # The stop string is taken from the model's own greedy answer: the test holds whatever this kit build says.
    reverse = dict(model="reverse", prompt="Reverse: red blue green\nOutput:", max_tokens=8, temperature=0)
    full = c.completions.create(**reverse).choices[0].text
    words = full.split(" ")
    assert len(words) >= 3, f"the reverse patch answers with words: {full!r}"
    stop = " " + words[-1]
    stopped = c.completions.create(stop=[stop], **reverse)
    assert stopped.choices[0].text == full[:full.index(stop)] != "" and stopped.choices[0].finish_reason == "stop"
    lp = c.completions.create(model="sentiment", prompt="Review: good great kind\nSentiment:", max_tokens=3,
                              temperature=0, logprobs=2)
    assert lp.choices[0].logprobs.tokens and len(lp.choices[0].logprobs.tokens) == lp.usage.completion_tokens
    assert all(p <= 0 for p in lp.choices[0].logprobs.token_logprobs)
    long = c.completions.create(model="sentiment", prompt="Review: good great kind\nSentiment:", max_tokens=6,
                                temperature=0, extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 6 and long.choices[0].finish_reason == "length"


def test_errors_the_openai_way(gateway):
    c = client(gateway)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert "maximum context length" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="word " * 400, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", max_tokens=0)
    r = httpx.post(f"{gateway.url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_disconnect_mid_stream_aborts_generation(gateway):
    before = gateway.metric("patchserve_requests_total", alias="tiny", status="499")
    with httpx.stream("POST", f"{gateway.url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "Kelmar", "max_tokens": 240, "temperature": 1.0,
                            "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # The client is gone: the engine must stop working on the request, long before 240 tokens.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if gateway.metric("patchserve_requests_total", alias="tiny", status="499") > before:
            break
        time.sleep(0.1)
    assert gateway.metric("patchserve_requests_total", alias="tiny", status="499") == before + 1
    assert gateway.metric("patchserve_running_requests") == 0


def test_health_and_readiness(gateway):
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz", timeout=15).json()
    # Other tests share this gateway and upload patches of their own: the kit's must be among those resident.
    assert ready["status"] == "ready" and {f"{p}@1" for p in PATCHES} <= set(ready["adapters"])


def test_overload_answers_503_with_retry_after(kit_dir, tmp_path):
    """The admission limit is the gateway's, the same for both engines: shown on the quicker to start."""
    server = GatewayProcess(kit_dir, "transformers", tmp_path, PATCHSERVE_MAX_IN_FLIGHT="2").start()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json={
                "model": "tiny", "prompt": "Kelmar", "max_tokens": 100, "temperature": 1.0, "ignore_eos": True})
                for _ in range(16)))

    try:
        answers = asyncio.run(burst())
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for r in answers:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_overloaded"
        # Once the burst is over the gateway admits again.
        assert client(server).completions.create(model="tiny", prompt="x", max_tokens=1).choices
    finally:
        server.stop()


def test_a_taken_port_fails_before_the_engine_starts(kit_dir, tmp_path):
    """The gateway binds its address before starting its engine: a port in use is a clear error at once,
    not a failure after minutes of engine start-up, and nothing else can take the address meanwhile."""
    server = GatewayProcess(kit_dir, "vllm", tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", server.port))
        held.listen()
        done = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=server.env, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{server.port}" in done.stderr, done.stderr
    assert "address already in use" in done.stderr.lower()
    assert "ready on" not in done.stdout and "Traceback" not in done.stderr, (done.stdout, done.stderr)


def test_ctrl_c_twice_stops_quietly(kit_dir, tmp_path):
    """An impatient Ctrl-C, pressed twice at the terminal (its process group, vLLM's engine process included):
    everything stops, and what vLLM says of its engine being stopped under it is not printed as an error."""
    server = GatewayProcess(kit_dir, "vllm", tmp_path)
    log = tmp_path / "ctrl-c.log"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=server.env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # a terminal shows both
    try:
        wait_ready(proc, f"{server.url}/readyz", log, 240, "gateway")
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


@pytest.mark.parametrize("setting, value, says", [
    ("PATCHSERVE_PORT", "abc", "PATCHSERVE_PORT='abc': Input should be a valid integer"),
    ("PATCHSERVE_REDIS_PORT", "0", "PATCHSERVE_REDIS_PORT='0': Input should be greater than or equal to 1"),
    ("PATCHSERVE_ENGINE", "tpu", "PATCHSERVE_ENGINE='tpu': Input should be 'auto', 'vllm' or 'transformers'"),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path, setting, value, says):
    """An operator's typo in the environment: status 2 and one line naming the variable, not a traceback."""
    env = {**os.environ, "PATCHSERVE_DATA_DIR": str(tmp_path), setting: value}
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"patchserve: {says}"), done.stderr


def test_a_redis_port_held_by_another_program_is_one_line(kit_dir, tmp_path):
    """The embedded Redis cannot start on a port another program holds: one line saying so and what to change."""
    server = GatewayProcess(kit_dir, "transformers", tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", int(server.env["PATCHSERVE_REDIS_PORT"])))
        held.listen()
        done = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=server.env, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not start on port" in lines[0] and "PATCHSERVE_REDIS_PORT" in lines[0], lines
