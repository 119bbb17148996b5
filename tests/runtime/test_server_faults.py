"""The server when things go wrong inside: a request whose step fails, a request that can never fit, an engine
thread that dies, a full queue, and stop strings in streams."""

import asyncio
import json
import threading

import pytest

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from optforge.runtime.async_engine import AsyncEngine  # noqa: E402
from optforge.runtime.llm import Engine, EngineConfig  # noqa: E402
from optforge.runtime.sequence import SamplingParams  # noqa: E402
from optforge.runtime.server import create_app  # noqa: E402

CONFIG = EngineConfig(num_blocks=256, block_size=4, max_num_seqs=16, max_model_len=256)
POISON = 77  # a token id that makes the patched runner raise


def make_engine(model, tokenizer, config=CONFIG, **kwargs) -> AsyncEngine:
    return AsyncEngine(Engine(model, tokenizer, config), **kwargs)


def run(engine, scenario):
    async def main():
        async with TestClient(TestServer(create_app(engine, "tiny"))) as client:
            return await asyncio.wait_for(scenario(client), timeout=60)

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


async def stream(client, body) -> tuple[int, str, list[dict]]:
    """(status, concatenated text, error events) of a streamed completion."""
    r = await client.post("/v1/completions", json={**body, "stream": True})
    text, errors = [], []
    if r.status == 200:
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                else:
                    text.append(event["choices"][0]["text"])
    return r.status, "".join(text), errors


GOOD = [{"prompt": p, "max_tokens": 20, "ignore_eos": True} for p in ("one", "two three", "four five six")]


def test_a_failing_request_fails_alone(tiny_llama, byte_tokenizer, poison):
    engine = make_engine(tiny_llama, byte_tokenizer)
    poison(engine.engine.runner, POISON)
    bad = {"prompt": [10, 11, POISON, 12], "max_tokens": 20, "ignore_eos": True}

    async def scenario(client):
        alone = [await stream(client, b) for b in GOOD]
        together = await asyncio.gather(*(stream(client, b) for b in [GOOD[0], bad, GOOD[1], GOOD[2]]))
        plain_bad = await client.post("/v1/completions", json=bad)
        after = await stream(client, GOOD[0])
        return alone, together, (plain_bad.status, await plain_bad.json()), (after, engine.is_alive)

    alone, together, plain_bad, (after, alive) = run(engine, scenario)
    assert [t for t in together if t is not together[1]] == alone  # same text, no errors
    status, text, errors = together[1]
    assert status == 200 and len(errors) == 1 and errors[0]["code"] == 500 and "other requests were not affected" in errors[0]["message"]
    assert plain_bad[0] == 500 and plain_bad[1]["error"]["type"] == "server_error"
    assert after == alone[0] and alive
    assert engine.engine.num_failed_steps >= 1 and engine.stats.num_failed == 2
    assert engine.engine.block_manager.num_used_blocks == 0


def test_request_that_can_never_fit_the_kv_cache_is_refused_at_submit(tiny_llama, byte_tokenizer):
    config = EngineConfig(num_blocks=16, block_size=4, max_num_seqs=4, max_model_len=256)  # the cache holds 64 tokens
    engine = make_engine(tiny_llama, byte_tokenizer, config)

    async def scenario(client):
        big = await client.post("/v1/completions", json={"prompt": "x" * 30, "max_tokens": 40})
        ok = await client.post("/v1/completions", json={"prompt": "x" * 30, "max_tokens": 10})
        return big.status, (await big.json())["error"], ok.status, (await client.get("/health")).status

    big_status, error, ok_status, health = run(engine, scenario)
    assert big_status == 400 and "max_tokens" == error["param"] and "64" in error["message"]
    assert ok_status == 200 and health == 200


def test_a_dead_engine_is_reported_and_fails_requests_fast(tiny_llama, byte_tokenizer, monkeypatch):
    engine = make_engine(tiny_llama, byte_tokenizer)
    started = threading.Event()
    commit = engine.engine.block_manager.commit

    def broken_commit(seq):  # an error of the engine's own (not the runner's): nothing to isolate
        if started.is_set():
            raise RuntimeError("block table corrupted")
        return commit(seq)

    monkeypatch.setattr(engine.engine.block_manager, "commit", broken_commit)

    async def scenario(client):
        first = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 200, "ignore_eos": True, "stream": True})
        await first.content.readline()  # it runs
        started.set()
        events = [line.decode() async for line in first.content]
        health = await client.get("/health")
        later = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        return events, health.status, await health.json(), later.status, await later.json()

    events, health_status, health, later_status, later = run(engine, scenario)
    assert any('"error"' in e and "block table corrupted" in e for e in events)
    assert health_status == 503 and health["status"] == "dead" and "block table corrupted" in health["reason"]
    assert later_status == 503 and later["error"]["type"] == "service_unavailable"


def test_admission_counts_only_requests_beyond_the_free_slots(tiny_llama, byte_tokenizer, monkeypatch):
    """16 slots, max_waiting 4: of 24 requests at once, 20 are admitted and 4 refused with Retry-After."""
    engine = make_engine(tiny_llama, byte_tokenizer, max_waiting=4)
    gate, step = threading.Event(), engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: gate.wait(30) and step())

    async def scenario(client):
        body = {"prompt": "hi", "max_tokens": 8, "ignore_eos": True, "stream": True}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(24)))
        gate.set()  # headers of every answer are in: now let the engine run
        texts = [await r.read() for r in responses if r.status == 200]
        return [(r.status, r.headers.get("Retry-After")) for r in responses], texts

    statuses, texts = run(engine, scenario)
    assert sorted(s for s, _ in statuses).count(200) == 20
    refused = [retry for s, retry in statuses if s == 429]
    assert len(refused) == 4 and all(retry is not None and int(retry) >= 1 for retry in refused)
    assert all(b"[DONE]" in t and b'"finish_reason": "length"' in t for t in texts)


def test_streamed_text_equals_the_plain_text_whatever_the_stop_strings(tiny_llama, byte_tokenizer):
    plain_engine = Engine(tiny_llama, byte_tokenizer, CONFIG)
    prompt = "The capital"
    seq = plain_engine.add_request("probe", prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    while plain_engine.has_unfinished:
        plain_engine.step()
    text = plain_engine.output(seq).text
    # stops of one character up to many, found at the start, middle and end; and one that never occurs
    stops = [[text[i : i + n]] for n in (1, 2, 3, 5, 8) for i in (0, 5, len(text) - n)] + [[text[6:9], text[4:5]], ["\x00never"]]
    engine = make_engine(tiny_llama, byte_tokenizer)

    async def scenario(client):
        out = []
        for stop in stops:
            body = {"prompt": prompt, "max_tokens": 24, "stop": stop, "ignore_eos": True}
            plain = await (await client.post("/v1/completions", json=body)).json()
            status, streamed, errors = await stream(client, body)
            out.append((stop, plain["choices"][0]["text"], streamed))
        return out

    for stop, plain, streamed in run(engine, scenario):
        assert streamed == plain, (stop, plain, streamed)
        assert not any(s in streamed for s in stop)
