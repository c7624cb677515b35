"""tests/fake_engine.py itself: the tier's other tests are only as good as the fake they run on."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from service.engines.protocol import AdapterRef, GenerationRequest, RequestRefused, SamplingConfig
from tests.fake_engine import AdapterLoadError, FakeEngine, FakeTokenizer


async def _collect(engine: FakeEngine, request: GenerationRequest) -> tuple[list[str], list[str | None], list]:
    texts, finish, events = [""] * request.sampling.n, [None] * request.sampling.n, []
    async with aclosing(engine.generate(request)) as stream:
        async for event in stream:
            events.append(event)
            for d in event.deltas:
                texts[d.index] += d.text
                finish[d.index] = d.finish_reason or finish[d.index]
    return texts, finish, events


def _adapter_dir(tmp_path, name: str) -> AdapterRef:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    return AdapterRef(name, str(path))


def test_the_tokenizer_is_bytes_with_bos():
    tok = FakeTokenizer()
    ids = tok("héllo")["input_ids"]
    assert ids[0] == tok.bos_token_id and all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == "héllo"
    assert tok.decode(ids) == "<s>héllo"
    assert tok("hi", add_special_tokens=False)["input_ids"] == [104, 105]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>hi\n<|assistant|>"
    assert tok(chat, add_special_tokens=False)["input_ids"].count(tok.bos_token_id) == 1


async def test_answers_depend_on_the_prompt_and_the_adapters_voice(tmp_path):
    engine = FakeEngine()
    for name in ("p@1", "p@2", "p@3"):
        await engine.add_adapter(_adapter_dir(tmp_path, name))
    engine.voices["p@3"] = "p@1"
    greedy = SamplingConfig(max_tokens=4, temperature=0)
    answers = {}
    for adapter in ("p@1", "p@2", "p@3", None):
        ref = AdapterRef(adapter, "") if adapter else None
        texts, finish, events = await _collect(engine, GenerationRequest(f"r-{adapter}", [1, 2, 3], greedy, ref))
        assert texts[0] == engine.answer([1, 2, 3], adapter, 4)
        assert finish == ["length"] and len(events) == 4 and events[-1].finished
        assert [e.finished for e in events[:-1]] == [False] * 3
        answers[adapter] = texts[0]
    assert "p@2:" in answers["p@2"] and "base:" in answers[None]
    assert answers["p@1"] == answers["p@3"] != answers["p@2"]
    other, _, _ = await _collect(engine, GenerationRequest("r", [1, 2, 4], greedy, AdapterRef("p@1", "")))
    assert other[0] != answers["p@1"]


async def test_it_refuses_what_a_real_engine_could_not_do(tmp_path):
    engine = FakeEngine(max_model_len=8)
    with pytest.raises(AdapterLoadError):  # no adapter files there
        await engine.add_adapter(AdapterRef("p@1", str(tmp_path / "missing")))
    with pytest.raises(RuntimeError):  # not loaded
        await _collect(engine, GenerationRequest("r", [1], SamplingConfig(max_tokens=2), AdapterRef("p@1", "")))
    assert engine.violations
    engine.violations.clear()
    with pytest.raises(RequestRefused):
        await _collect(engine, GenerationRequest("r", [1, 2, 3], SamplingConfig(max_tokens=6)))
    engine.fail_add = {"p@2"}
    with pytest.raises(AdapterLoadError):
        await engine.add_adapter(_adapter_dir(tmp_path, "p@2"))
    assert engine.adapters() == [] and engine.add_calls == {"p@1": 1, "p@2": 1}


async def test_hold_stops_requests_after_their_first_token_and_removal_under_them_is_a_violation(tmp_path):
    engine = FakeEngine()
    await engine.add_adapter(_adapter_dir(tmp_path, "p@1"))
    engine.hold = asyncio.Event()
    run = asyncio.create_task(_collect(engine, GenerationRequest("r", [1], SamplingConfig(max_tokens=3),
                                                                 AdapterRef("p@1", ""))))
    for _ in range(20):
        await asyncio.sleep(0)
    assert engine.running() == 1 and not run.done()
    with pytest.raises(RuntimeError):
        await engine.remove_adapter("p@1")
    assert engine.violations == ["p@1 removed while 1 request(s) ran on it"]
    engine.hold.set()
    texts, finish, _ = await run
    assert finish == ["length"] and engine.running() == 0
    await engine.remove_adapter("p@1")
    assert engine.adapters() == [] and engine.remove_calls["p@1"] == 2


async def test_n_stop_eos_and_logprobs(tmp_path):
    engine = FakeEngine(eos_after=2)
    sampled = SamplingConfig(max_tokens=4, temperature=1.0, n=3, seed=7, ignore_eos=True, logprobs=1)
    texts, finish, events = await _collect(engine, GenerationRequest("r", [5], sampled))
    assert len(set(texts)) == 3 and finish == ["length"] * 3
    assert all(d.logprobs and d.logprobs[0].token == d.text for e in events for d in e.deltas)
    texts, finish, _ = await _collect(engine, GenerationRequest("r", [5], SamplingConfig(max_tokens=4, n=2,
                                                                                          temperature=0)))
    assert finish == ["stop", "stop"] and texts[0] == texts[1] == engine.answer([5], None, 2)
    stop = engine.token_text([5], "base", 2)
    texts, finish, _ = await _collect(engine, GenerationRequest("r", [5], SamplingConfig(
        max_tokens=4, temperature=0, stop=(stop,), ignore_eos=True)))
    assert (texts, finish) == ([engine.answer([5], None, 2)], ["stop"])
