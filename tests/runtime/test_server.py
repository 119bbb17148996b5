"""The HTTP server on a tiny random model: OpenAI shapes, streaming, errors, metrics, disconnects."""

import asyncio
import json

import pytest

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from optforge.runtime.async_engine import AsyncEngine  # noqa: E402
from optforge.runtime.llm import Engine, EngineConfig  # noqa: E402
from optforge.runtime.server import create_app  # noqa: E402


@pytest.fixture
def engine(tiny_llama, byte_tokenizer):
    eng = AsyncEngine(Engine(tiny_llama, byte_tokenizer, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=16, max_model_len=256)), max_waiting=64)
    yield eng
    eng.shutdown()


def run(engine, scenario):
    async def main():
        async with TestClient(TestServer(create_app(engine, "tiny"))) as client:
            return await scenario(client)

    return asyncio.run(main())


async def read_sse(response) -> list[dict]:
    events = []
    async for line in response.content:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_completion_and_stream_agree(engine):
    async def scenario(client):
        body = {"prompt": "hello", "max_tokens": 8, "ignore_eos": True}
        plain = await (await client.post("/v1/completions", json=body)).json()
        streamed = await read_sse(await client.post("/v1/completions", json={**body, "stream": True}))
        return plain, streamed

    plain, streamed = run(engine, scenario)
    assert plain["usage"]["completion_tokens"] == 8 and plain["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in streamed) == plain["choices"][0]["text"]
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"


def test_bad_requests_get_clear_400s(engine):
    async def scenario(client):
        out = []
        for body in ({"prompt": 3}, {"prompt": "x", "temperature": -1}, {"prompt": "x", "max_tokens": "many"}, {"messages": "hi"}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = await client.post(path, json=body)
            out.append((r.status, (await r.json())["error"]))
        r = await client.post("/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        out.append((r.status, (await r.json())["error"]))
        return out

    results = run(engine, scenario)
    assert all(status == 400 for status, _ in results)
    assert results[0][1]["param"] == "prompt" and "temperature" in results[1][1]["message"]
    assert results[2][1]["param"] == "max_tokens" and results[3][1]["param"] == "messages"


def test_overload_is_refused_not_hung(engine):
    engine.max_waiting = 0

    async def scenario(client):
        return (await client.post("/v1/completions", json={"prompt": "x"})).status

    assert run(engine, scenario) == 429


def test_disconnected_client_frees_its_blocks_and_metrics_report(engine):
    async def scenario(client):
        r = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 200, "ignore_eos": True, "stream": True})
        await r.content.readline()  # the first event arrived: the request holds blocks now
        r.close()
        for _ in range(200):
            await asyncio.sleep(0.05)
            if engine.engine.block_manager.num_used_blocks == 0 and not engine.engine.has_unfinished:
                break
        return await (await client.get("/metrics")).text()

    text = run(engine, scenario)
    assert engine.engine.block_manager.num_used_blocks == 0
    assert "optforge_requests_aborted_total 1" in text and "optforge_time_to_first_token_seconds_count 1" in text
