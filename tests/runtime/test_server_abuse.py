"""The server against malformed, oversized and cross-site requests: each is refused at the edge with the
right status and an OpenAI-style error naming the field, and none of them reaches the shared engine step."""

import asyncio
import json
import threading
import time
import urllib.request

import pytest

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from optforge.runtime.async_engine import AsyncEngine  # noqa: E402
from optforge.runtime.llm import Engine, EngineConfig  # noqa: E402
from optforge.runtime.sequence import SamplingParams  # noqa: E402
from optforge.runtime.server import create_app  # noqa: E402

CONFIG = EngineConfig(num_blocks=256, block_size=4, max_num_seqs=16, max_model_len=256)


@pytest.fixture
def engine(tiny_llama, byte_tokenizer):
    eng = AsyncEngine(Engine(tiny_llama, byte_tokenizer, CONFIG), max_waiting=64)
    yield eng
    eng.shutdown()


def run(engine, scenario, **app_options):
    async def main():
        async with TestClient(TestServer(create_app(engine, "tiny", **app_options))) as client:
            return await asyncio.wait_for(scenario(client), timeout=60)

    return asyncio.run(main())


async def stream_text(client, body) -> str:
    r = await client.post("/v1/completions", json={**body, "stream": True})
    assert r.status == 200, await r.text()
    text = []
    async for line in r.content:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            text.append(event["choices"][0]["text"])
    return "".join(text)


MALFORMED = [  # (body, the field the error must name)
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "logprobs": 2.5}, "logprobs"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": 1e-45}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "top_p": False}, "top_p"),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [2**64]}, "prompt"),
    ({"prompt": [5, True]}, "prompt"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stop": ["a" * 257]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "n": "x"}, "n"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "x" * 200, "max_tokens": 100}, "max_tokens"),  # fits neither: prompt + max_tokens > 256
]


@pytest.mark.parametrize("body,param", MALFORMED, ids=[f"{p}-{i}" for i, (_, p) in enumerate(MALFORMED)])
def test_malformed_fields_get_400_naming_the_field(engine, body, param):
    async def scenario(client):
        r = await client.post("/v1/completions", json=body)
        return r.status, (await r.json())["error"]

    status, error = run(engine, scenario)
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", error
    assert engine.stats.num_requests == 0  # refused before the engine saw it


@pytest.mark.parametrize("raw,what", [
    (b'{"prompt": "x", "max_tokens": 1e309}', "max_tokens"),
    (b'{"prompt": "x", "temperature": NaN}', "JSON"),
    (b'{"prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nest"),
    (b'{"prompt": "\xff"}', "JSON"),
])
def test_bodies_that_used_to_give_500_give_400(engine, raw, what):
    async def scenario(client):
        r = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
        return r.status, (await r.json())["error"]

    status, error = run(engine, scenario)
    assert status == 400 and what in (error["param"] or error["message"]), error


def test_json_only_as_application_json_in_utf8(engine):
    async def scenario(client):
        out = []
        for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": content_type} if content_type else {}
            r = await client.post("/v1/completions", data=b'{"prompt": "x"}', headers=headers)
            out.append(r.status)
        r = await client.post("/v1/completions", data=b'{"prompt": "x"}', headers={"Content-Type": "application/json; charset=no-such-charset"})
        out.append((r.status, (await r.json())["error"]["message"]))
        r = await client.post("/v1/completions", data=b'{"prompt": "x", "max_tokens": 2}', headers={"Content-Type": "application/json; charset=utf-8"})
        out.append(r.status)
        return out

    *refused, bad_charset, ok = run(engine, scenario)
    assert refused == [415, 415, 415, 415]
    assert bad_charset[0] == 400 and "charset" in bad_charset[1]
    assert ok == 200


def test_chat_messages_are_validated(engine):
    async def scenario(client):
        out = []
        for messages in ("hi", [], [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                         [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
            r = await client.post("/v1/chat/completions", json={"messages": messages})
            out.append((r.status, (await r.json())["error"]["param"]))
        return out

    results = run(engine, scenario)
    assert all(status == 400 for status, _ in results)
    assert [param for _, param in results] == ["messages", "messages", "messages[0].content", "messages[0].role", "messages[0].content", "messages[0].content"]


def test_abuse_alongside_good_streams_leaves_them_whole(engine):
    """Malformed requests sent while 4 streams run: every stream completes with the text it gives alone."""
    bodies = [{"prompt": p, "max_tokens": 24, "ignore_eos": True} for p in ("alpha", "beta gamma", "delta", "epsilon zeta eta")]

    async def scenario(client):
        alone = [await stream_text(client, b) for b in bodies]
        abuse = [client.post("/v1/completions", json=b) for b, _ in MALFORMED]
        together = await asyncio.gather(*(stream_text(client, b) for b in bodies), *abuse)
        return alone, together[: len(bodies)], [r.status for r in together[len(bodies):]]

    alone, together, abuse_statuses = run(engine, scenario)
    assert together == alone
    assert set(abuse_statuses) == {400}
    assert engine.is_alive and engine.engine.num_failed_steps == 0


def test_offline_engine_rejects_out_of_vocab_ids(tiny_llama, byte_tokenizer):
    engine = Engine(tiny_llama, byte_tokenizer, CONFIG)
    for prompt in ([999999], [-1], [2**64], [5, 300]):
        with pytest.raises(ValueError, match="vocabulary"):
            engine.add_request("r", prompt, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="integers"):
        engine.add_request("r", [5, 1.5], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished


def test_prompt_size_is_bounded_before_tokenizing(engine, monkeypatch):
    calls = []
    tokenizer = engine.engine.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(len(text)) or [7] * len(text), raising=False)

    async def scenario(client):
        r1 = await client.post("/v1/completions", json={"prompt": "y" * 1001})
        r2 = await client.post("/v1/completions", json={"prompt": "y" * 20_000})  # over client_max_size as well
        r3 = await client.post("/v1/completions", json={"prompt": [7] * 256})
        return [(r.status, (await r.json())["error"]) for r in (r1, r2, r3)]

    (s1, e1), (s2, e2), (s3, e3) = run(engine, scenario, max_prompt_chars=1000)
    assert s1 == 400 and e1["param"] == "prompt" and "1000" in e1["message"]
    assert s2 in (400, 413)
    assert s3 == 400 and e3["param"] == "prompt"
    assert calls == []  # nothing reached the tokenizer


class SlowTokenizer:
    """The byte tokenizer, with an encode that takes 1.5 s (and holds no lock) on long prompts."""

    def __init__(self, inner):
        self.inner, self.eos_token_id = inner, inner.eos_token_id

    def encode(self, text):
        if len(text) > 100:
            time.sleep(1.5)
        return self.inner.encode(text[:100])

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode(ids, skip_special_tokens)


def test_health_answers_while_a_large_prompt_tokenizes(tiny_llama, byte_tokenizer):
    """/health is asked from another thread (the test client shares the server's event loop, so it could
    not see that loop stall) while a prompt takes 1.5 s to tokenize."""
    engine = AsyncEngine(Engine(tiny_llama, SlowTokenizer(byte_tokenizer), CONFIG))

    async def scenario(client):
        url, seen = str(client.make_url("/health")), {}

        def probe():
            time.sleep(0.3)  # the large prompt is being tokenized now
            start = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as r:
                seen["status"] = r.status
            seen["waited"] = time.perf_counter() - start

        thread = threading.Thread(target=probe)
        thread.start()
        big = await client.post("/v1/completions", json={"prompt": "z" * 5000, "max_tokens": 2})
        await asyncio.to_thread(thread.join)
        return seen, big.status

    try:
        seen, big_status = run(engine, scenario)
    finally:
        engine.shutdown()
    assert seen["status"] == 200 and seen["waited"] < 0.5, seen
    assert big_status == 200


class ChatByteTokenizer:
    """The byte tokenizer with a trivial chat template."""

    chat_template = "{role}: {content}"

    def __init__(self, inner):
        self.inner, self.eos_token_id = inner, inner.eos_token_id

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode(ids, skip_special_tokens)


def test_chat_without_max_tokens_may_fill_the_context(tiny_llama, byte_tokenizer):
    config = EngineConfig(num_blocks=256, block_size=4, max_num_seqs=16, max_model_len=64)
    engine = AsyncEngine(Engine(tiny_llama, ChatByteTokenizer(byte_tokenizer), config))

    async def scenario(client):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}], "ignore_eos": True})
        return r.status, await r.json()

    try:
        status, body = run(engine, scenario)
    finally:
        engine.shutdown()
    assert status == 200, body
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64 and body["choices"][0]["finish_reason"] == "length"


def test_api_key_guards_v1_but_not_health(engine):
    async def scenario(client):
        body = {"prompt": "x", "max_tokens": 2}
        out = [(await client.post("/v1/completions", json=body)).status,
               (await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})).status,
               (await client.get("/v1/models")).status,
               (await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})).status,
               (await client.get("/health")).status]
        return out

    assert run(engine, scenario, api_key="s3cret") == [401, 401, 401, 200, 200]


def test_origins_are_refused_unless_allowed(engine):
    allowed = "http://localhost:3000"

    async def scenario(client):
        body = {"prompt": "x", "max_tokens": 2}
        evil = {"Origin": "http://evil.example"}
        out = {
            "evil post": (await client.post("/v1/completions", json=body, headers=evil)).status,
            "evil health": (await client.get("/health", headers=evil)).status,
            "evil preflight": (await client.options("/v1/completions", headers={**evil, "Access-Control-Request-Method": "POST"})).status,
            "no origin": (await client.post("/v1/completions", json=body)).status,
        }
        pre = await client.options("/v1/completions", headers={"Origin": allowed, "Access-Control-Request-Method": "POST"})
        ok = await client.post("/v1/completions", json={**body, "stream": True}, headers={"Origin": allowed})
        await ok.read()
        return out, pre, ok

    out, pre, ok = run(engine, scenario, allowed_origins=(allowed,))
    assert out == {"evil post": 403, "evil health": 403, "evil preflight": 403, "no origin": 200}
    assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == allowed
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert ok.status == 200 and ok.headers["Access-Control-Allow-Origin"] == allowed  # streamed answers too


def test_no_origin_is_allowed_by_default(engine):
    async def scenario(client):
        return (await client.post("/v1/completions", json={"prompt": "x"}, headers={"Origin": "http://localhost:8000"})).status

    assert run(engine, scenario) == 403

