"""Inputs once answered 500 or a reset connection: each now gets a clear 4xx (or is served), on both engines.

Found by hand and by the fuzz test (tests/test_fuzz_api.py). Each row: the route, the body, the status
expected and a word its message must contain. A served row checks what it serves.
"""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

LONG_PATH = "a" * 300  # one path component past every filesystem's 255-byte limit
SURROGATE_PROMPT = '{"model": "reverse", "prompt": "\\ud800 hi", "max_tokens": 2}'  # JSON text: a lone surrogate

CASES = [
    # (id, method, path, JSON body or raw JSON text, admin?, status, word in the message)
    ("seed-past-int64", "/v1/completions", {"model": "reverse", "prompt": "hi", "seed": 2**70}, False, 400, "seed"),
    ("lone-surrogate", "/v1/completions", SURROGATE_PROMPT, False, 400, "Unicode"),
    ("token-past-vocab", "/v1/completions", {"model": "reverse", "prompt": [999999]}, False, 400, "vocabulary"),
    ("negative-token", "/v1/completions", {"model": "reverse", "prompt": [-5]}, False, 400, "vocabulary"),
    ("empty-token-list", "/v1/completions", {"model": "reverse", "prompt": []}, False, 400, "prompt"),
    ("empty-stop", "/v1/completions", {"model": "reverse", "prompt": "hi", "stop": ""}, False, 400, "stop"),
    ("no-messages", "/v1/chat/completions", {"model": "reverse", "messages": []}, False, 400, "messages"),
    ("image-part", "/v1/chat/completions",
     {"model": "reverse",
      "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     False, 400, "text parts only"),
    ("echo-with-logprobs", "/v1/completions", {"model": "reverse", "prompt": "hi", "echo": True, "logprobs": 1},
     False, 400, "echo"),
    ("base-path-too-long", "/admin/bases", {"name": "base-x", "version": "1", "path": LONG_PATH}, True, 422,
     "checkpoint"),
    ("extract-path-too-long", "/admin/patches/fuzzed/extract", {"checkpoint": LONG_PATH, "rank": 4}, True, 422,
     "checkpoint"),
    ("admin-reason-surrogate", "/admin/aliases/reverse/rollback", '{"reason": "\\udfff"}', True, 400, "Unicode"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_with_a_clear_4xx(gateway, case):
    _, path, body, admin, status, word = case
    headers = {"content-type": "application/json"}
    if admin:
        headers["authorization"] = f"Bearer {gateway.admin_key}"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{gateway.url}{path}", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and word in error["message"], error


def test_chat_content_as_text_parts_is_served_like_a_string(gateway):
    c = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    text = "Reverse: red blue green\nOutput:"
    parts = c.chat.completions.create(model="reverse", temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Reverse: red blue "},
                                     {"type": "text", "text": "green\nOutput:"}]}])
    plain = c.chat.completions.create(model="reverse", temperature=0, max_tokens=8,
                                      messages=[{"role": "user", "content": text}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_completion(gateway, stream):
    c = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    prompt = "Reverse: red blue green\nOutput:"
    plain = c.completions.create(model="reverse", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    if stream:
        echoed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="reverse", prompt=prompt, max_tokens=8, temperature=0, echo=True, stream=True) if ch.choices)
    else:
        echoed = c.completions.create(model="reverse", prompt=prompt, max_tokens=8, temperature=0,
                                      echo=True).choices[0].text
    assert echoed == prompt + plain


async def test_the_catch_all_answers_an_openai_shaped_500_naming_a_request_id_that_is_logged(caplog):
    """What nobody foresaw (no route above reaches it): an app whose route raises, behind the gateway's handlers."""
    from fastapi import FastAPI

    from service.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("nobody foresaw this")

    logger = logging.getLogger("patchserve.api")
    logger.addHandler(caplog.handler)  # patchserve's loggers may not propagate (service/logs.py)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            r = await client.get("/boom")
    finally:
        logger.removeHandler(caplog.handler)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    request_id = r.headers["x-request-id"]
    assert error["type"] == "server_error" and request_id in error["message"]
    assert "nobody foresaw" not in error["message"]  # internals stay in the log
    logged = [rec for rec in caplog.records if getattr(rec, "fields", {}).get("request_id") == request_id]
    assert logged and logged[0].exc_info[1].args == ("nobody foresaw this",)
