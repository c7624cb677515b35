"""service/api/openai/serving.py: resolve, admit (lease, capacity), run on the engine, shape the answer."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from service.api.errors import APIError
from service.api.openai import protocol as p
from tests.fake_engine import FakeEngine
from tests.fast.support import BASE, OTHER_BASE


async def _run(serving, sub, chat: bool = False) -> dict:
    """What the routes do for a non-streaming request: admit, complete, release."""
    await serving.admit(sub)
    try:
        return await serving.complete(sub, chat)
    finally:
        serving.release(sub)


def _completion(model: str, prompt="Hello", **kw) -> p.CompletionRequest:
    return p.CompletionRequest(model=model, prompt=prompt, **kw)


def _ids(engine: FakeEngine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


@pytest_asyncio.fixture(loop_scope="function")
async def live(replica, store, new_version, alias, listening):
    """A started replica whose `alias` serves p@1 (p@2 exists, unused)."""
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    return replica


async def test_an_alias_is_served_by_its_active_version(live, store, alias, eventually):
    s, engine = live.serving, live.engine
    sub = s.submit_completion(_completion(alias, max_tokens=4, temperature=0))
    assert sub.resolved.served_by == f"base={BASE}; patch=p@1"
    body = await _run(s, sub)
    assert body["model"] == alias and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == engine.answer(_ids(engine, "Hello"), "p@1", 4)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    assert engine.served[-1] == (sub.request.request_id, "p@1")

    store.registry.activate(alias, "p", 2)
    await eventually(lambda: live.resolver.pointer(alias).ref == "p@2")
    body = await _run(s, s.submit_completion(_completion(alias, max_tokens=4, temperature=0)))
    assert body["choices"][0]["text"] == engine.answer(_ids(engine, "Hello"), "p@2", 4)
    # A pinned version is served as asked, whatever the alias points to.
    body = await _run(s, s.submit_completion(_completion("p@1", max_tokens=4, temperature=0)))
    assert body["model"] == "p"
    assert body["choices"][0]["text"] == engine.answer(_ids(engine, "Hello"), "p@1", 4)
    # A base is served with no adapter.
    body = await _run(s, s.submit_completion(_completion(BASE, max_tokens=3, temperature=0)))
    assert body["choices"][0]["text"] == engine.answer(_ids(engine, "Hello"), None, 3)
    assert engine.served[-1][1] is None


async def test_a_chat_completion_goes_through_the_chat_template(live, alias):
    s, engine = live.serving, live.engine
    req = p.ChatCompletionRequest(model=alias, messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                  max_tokens=5, temperature=0)
    sub = s.submit_chat(req)
    template = engine.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Hi"}],
                                                    tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(template, add_special_tokens=False)["input_ids"]
    assert sub.request.prompt_token_ids == ids
    assert ids.count(engine.tokenizer.bos_token_id) == 1, "the template's BOS, not a second one"
    body = await _run(s, sub, chat=True)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": engine.answer(ids, "p@1", 5)}
    # With no max_tokens, a chat completion may use the rest of the context.
    sub = s.submit_chat(p.ChatCompletionRequest(model=alias, messages=[{"role": "user", "content": "Hi"}]))
    assert sub.request.sampling.max_tokens == engine.max_model_len - len(sub.request.prompt_token_ids)


async def test_n_stop_echo_and_eos_reach_the_engine_and_the_answer(live, alias):
    s, engine = live.serving, live.engine
    ids = _ids(engine, "Hello")
    body = await _run(s, s.submit_completion(_completion(alias, max_tokens=3, n=3, temperature=0.7, seed=1)))
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == [engine.answer(ids, "p@1", 3, index=i, seed=1) for i in range(3)]
    assert len(set(texts)) == 3 and body["usage"]["completion_tokens"] == 9

    second = engine.token_text(ids, "p@1", 1)
    body = await _run(s, s.submit_completion(_completion(alias, max_tokens=6, temperature=0, stop=[second])))
    assert body["choices"][0] == {**body["choices"][0], "text": engine.token_text(ids, "p@1", 0),
                                  "finish_reason": "stop"}

    body = await _run(s, s.submit_completion(_completion(alias, max_tokens=2, temperature=0, echo=True)))
    assert body["choices"][0]["text"] == "Hello" + engine.answer(ids, "p@1", 2)

    engine.eos_after = 2
    body = await _run(s, s.submit_completion(_completion(alias, max_tokens=5, temperature=0)))
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (2, "stop")
    body = await _run(s, s.submit_completion(_completion(alias, max_tokens=5, temperature=0, ignore_eos=True)))
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (5, "length")


async def test_token_id_prompts_are_checked_against_the_vocabulary(live, alias):
    s, engine = live.serving, live.engine
    vocab = len(engine.tokenizer)
    body = await _run(s, s.submit_completion(_completion(alias, prompt=[1, 2, vocab - 1], max_tokens=2,
                                                         temperature=0)))
    assert body["choices"][0]["text"] == engine.answer([1, 2, vocab - 1], "p@1", 2)
    for bad in (vocab, -1, 10**9):
        with pytest.raises(APIError) as info:
            s.submit_completion(_completion(alias, prompt=[1, bad], max_tokens=2))
        assert info.value.status == 400 and info.value.param == "prompt"
        assert str(bad) in info.value.message
    assert engine.requests[-1].prompt_token_ids == [1, 2, vocab - 1], "a refused request never reached the engine"


async def test_unknown_models_and_foreign_bases_are_refused(live, store, new_version):
    s = live.serving
    for model in ("nope", "p@9", "p@x"):
        with pytest.raises(APIError) as info:
            s.submit_completion(_completion(model))
        assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
        with pytest.raises(APIError) as info:
            s.submit_chat(p.ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "x"}]))
        assert info.value.status == 404
    new_version("q", base=OTHER_BASE)
    store.registry.activate("foreign", "q", 1)
    await live.sync.reconcile()
    with pytest.raises(APIError) as info:
        s.submit_completion(_completion("foreign"))
    assert (info.value.status, info.value.code) == (421, "base_not_hosted")
    assert live.engine.requests == []


async def test_a_request_longer_than_the_context_is_refused(live, alias):
    s, engine = live.serving, live.engine
    ids = _ids(engine, "Hello")
    ok = s.submit_completion(_completion(alias, max_tokens=engine.max_model_len - len(ids)))
    assert ok.request.sampling.max_tokens == engine.max_model_len - len(ids)  # exactly the limit is fine
    with pytest.raises(APIError) as info:
        s.submit_completion(_completion(alias, max_tokens=engine.max_model_len - len(ids) + 1))
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")
    assert f"maximum context length is {engine.max_model_len}" in info.value.message
    with pytest.raises(APIError) as info:
        s.submit_completion(_completion(alias, prompt="x" * engine.max_model_len, max_tokens=1))
    assert info.value.status == 400
    long_chat = [{"role": "user", "content": "y" * engine.max_model_len}]
    with pytest.raises(APIError) as info:
        s.submit_chat(p.ChatCompletionRequest(model=alias, messages=long_chat, max_tokens=1))
    assert info.value.status == 400
    with pytest.raises(APIError) as info:  # echo and logprobs together are refused before anything runs
        s.submit_completion(_completion(alias, echo=True, logprobs=1))
    assert (info.value.status, info.value.param) == (400, "echo")
    assert live.pool.leases_held() == {} and s.in_flight == 0


async def test_a_full_gateway_answers_503_with_retry_after(live, alias):
    s = live.serving
    s.max_in_flight = 2
    first, second = (s.submit_completion(_completion(alias, max_tokens=2)) for _ in range(2))
    await s.admit(first)
    await s.admit(second)
    third = s.submit_completion(_completion(alias, max_tokens=2))
    with pytest.raises(APIError) as info:
        await s.admit(third)
    assert (info.value.status, info.value.code) == (503, "overloaded")
    assert info.value.headers == {"Retry-After": "1"}
    assert info.value.response().headers["retry-after"] == "1"
    assert s.in_flight == 2 and live.pool.leases_held() == {"p@1": 2}, "a refused request holds nothing"
    s.release(first)
    await s.admit(third)  # a slot came free
    for sub in (second, third):
        s.release(sub)
    assert s.in_flight == 0 and live.pool.leases_held() == {}


async def test_the_lease_is_held_while_generating_and_released_after(live, store, alias, eventually):
    """An alias moves twice while a request runs on p@1: p@1 is neither active nor previous any more, but the
    request's lease keeps it in the engine until its last token; released, it leaves."""
    s, engine = live.serving, live.engine
    engine.hold = asyncio.Event()
    sub = s.submit_completion(_completion(alias, max_tokens=4, temperature=0))
    running = asyncio.create_task(_run(s, sub))
    await eventually(lambda: engine.running() == 1, what="the request is generating")
    assert live.pool.leases_held() == {"p@1": 1} and s.in_flight == 1
    assert s.waiting() == 0

    p3 = store.registry.create_version("p", BASE, live.resolver.versions["p"][1].files)
    store.registry.activate(alias, "p", 2)
    store.registry.activate(alias, "p", p3.version)
    await eventually(lambda: live.resolver.pointer(alias).ref == p3.ref)
    await live.sync.reconcile()  # whatever the events did, the wanted set is {p@3, p@2} now
    assert "p@1" in engine.adapters() and engine.remove_calls["p@1"] == 0, "unloaded under a running request"

    engine.hold.set()
    body = await running
    assert body["choices"][0]["text"] == engine.answer(_ids(engine, "Hello"), "p@1", 4), "served by its version"
    assert live.pool.leases_held() == {} and s.in_flight == 0
    await eventually(lambda: "p@1" not in engine.adapters(), what="the last lease out unloaded p@1")
    assert sorted(engine.adapters()) == ["p@2", p3.ref]


async def test_a_version_that_cannot_be_loaded_answers_503_and_holds_nothing(live, alias):
    s, engine = live.serving, live.engine
    engine.fail_add = {"p@2"}
    sub = s.submit_completion(_completion("p@2", max_tokens=2))  # pinned, not resident
    with pytest.raises(APIError) as info:
        await s.admit(sub)
    assert (info.value.status, info.value.code) == (503, "adapter_unavailable")
    assert info.value.headers == {"Retry-After": "1"}
    assert s.in_flight == 0 and live.pool.leases_held() == {}
    engine.fail_add = False
    body = await _run(s, s.submit_completion(_completion("p@2", max_tokens=2, temperature=0)))
    assert body["choices"][0]["text"] == engine.answer(_ids(engine, "Hello"), "p@2", 2)


def _chunks(lines: list[str]) -> list[dict]:
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


async def _stream(serving, sub, chat: bool, include_usage: bool = False) -> list[str]:
    await serving.admit(sub)
    try:
        return [chunk async for chunk in serving.stream(sub, chat, include_usage)]
    finally:
        serving.release(sub)


async def test_a_completion_streams_sse_chunks_ending_in_done(live, alias):
    s, engine = live.serving, live.engine
    sub = s.submit_completion(_completion(alias, max_tokens=4, temperature=0, stream=True))
    chunks = _chunks(await _stream(s, sub, chat=False, include_usage=True))
    assert len(chunks) == 5  # one per token, then usage
    assert {c["id"] for c in chunks} == {sub.request.request_id}
    assert {(c["object"], c["model"]) for c in chunks} == {("text_completion", alias)}
    assert "".join(c["choices"][0]["text"] for c in chunks[:4]) == engine.answer(_ids(engine, "Hello"), "p@1", 4)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert live.pool.leases_held() == {} and s.in_flight == 0


async def test_a_chat_streams_a_role_chunk_then_deltas_then_done(live, alias):
    s, engine = live.serving, live.engine
    sub = s.submit_chat(p.ChatCompletionRequest(model=alias, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3, temperature=0, n=2, logprobs=True, top_logprobs=1))
    chunks = _chunks(await _stream(s, sub, chat=True))
    assert chunks[0]["choices"] == [{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(2)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:])
    assert text == engine.answer(sub.request.prompt_token_ids, "p@1", 3)
    assert all(len(c["choices"]) == 2 and c["choices"][0]["logprobs"]["content"] for c in chunks[1:])
    assert "usage" not in chunks[-1]


async def test_a_cancelled_stream_aborts_the_request_and_gives_everything_back(live, alias, eventually):
    """A client gone mid-stream: the server cancels the response's task (Starlette under uvicorn does)."""
    s, engine = live.serving, live.engine
    sub = s.submit_completion(_completion("p@2", max_tokens=50, temperature=0, stream=True))  # pinned, unwanted
    got_one = asyncio.Event()

    async def respond() -> None:  # what routes._serve's events() does around serving.stream
        try:
            async for _ in s.stream(sub, chat=False, include_usage=False):
                got_one.set()
        finally:
            s.release(sub)

    engine.token_delay_s = 0.01  # 50 tokens: half a second, so the cancellation arrives mid-stream
    await s.admit(sub)
    task = asyncio.create_task(respond())
    await asyncio.wait_for(got_one.wait(), 5)
    assert engine.running() == 1 and live.pool.leases_held() == {"p@2": 1}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.running() == 0, "the engine's request was not aborted"
    assert live.pool.leases_held() == {} and s.in_flight == 0
    await eventually(lambda: "p@2" not in engine.adapters(), what="the unwanted pinned version left")


async def test_closing_a_stream_aborts_the_engine_request_before_the_lease_is_given_back(live, alias):
    s, engine = live.serving, live.engine
    sub = s.submit_completion(_completion("p@2", max_tokens=50, temperature=0, stream=True))  # pinned, unwanted
    await s.admit(sub)
    stream = s.stream(sub, chat=False, include_usage=False)
    try:
        assert (await anext(stream)).startswith("data: ") and engine.running() == 1
        await stream.aclose()  # an ASGI server that closes the body iterator instead of cancelling it
        running_after_close = engine.running()
        s.release(sub)
        for _ in range(10):
            await asyncio.sleep(0)
        violations = list(engine.violations)
    finally:
        engine.violations.clear()  # reported here, not as the engine fixture's teardown error
    assert running_after_close == 0, "the engine's request outlived the stream's close"
    assert violations == []
