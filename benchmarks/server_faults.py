"""Fault injection against `optforge serve`: do well-formed streams survive a client that sends garbage?

Starts `optforge serve` as a subprocess on 127.0.0.1 (a random Llama written to a temporary folder with
save_pretrained beside a small trained BPE tokenizer, or --model DIR for a real folder), then runs two phases:

  alone: --clients streaming completions (greedy, --max-tokens each, eos ignored), all at once;
  abuse: the same clients while --abusers tasks send malformed requests without pause: floats where integers
         belong, booleans as numbers, a 1e-45 temperature, out-of-vocabulary token ids, too many stop strings,
         NaN and 1e309, deeply nested JSON, form posts, a bad charset, prompts over the character bound and
         bodies over the size bound.

/health is polled every 0.1 s in both phases. Reported per phase: requests sent, answers by status code
(`conn` where the server closed the connection, as it may on an oversized body), whether every well-formed
stream completed (and with the same text in both phases), p50/p99 latency of the good streams, /health's
statuses and slowest answer, and the server's own failure counters from /metrics. Prints a markdown table;
--out writes the same as JSON.

  python benchmarks/server_faults.py --clients 64 --max-tokens 32 --abusers 4 --out /tmp/server_faults.json [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and Berlin is the capital of Germany.",
          "Quantization stores weights in fewer bits; pruning removes them.", "def add(a, b):\n    return a + b\n"]


def make_model(path: Path, hidden: int, layers: int) -> Path:
    """A random Llama (context 1024) with a 512-token byte-level BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args, log_file) -> subprocess.Popen:
    command = [sys.executable, "-c", "from optforge.cli import main; main()", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting)]
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_healthy(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before answering /health")
            try:
                async with session.get(f"{base}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"no healthy server after {timeout_s} s")


def abusive_requests(max_prompt_chars: int) -> list[tuple[str, dict]]:
    """(name, keyword arguments of session.post) for each malformed request."""
    js = {"Content-Type": "application/json"}
    bodies = {
        "top_k float": {"top_k": 1.5}, "seed float": {"seed": 1.5}, "logprobs float": {"logprobs": 2.5}, "max_tokens float": {"max_tokens": 2.5},
        "temperature 1e-45": {"temperature": 1e-45}, "temperature bool": {"temperature": True}, "ignore_eos int": {"ignore_eos": 1},
        "ids 999999": {"prompt": [999999]}, "ids -1": {"prompt": [-1]}, "ids 2**64": {"prompt": [2**64]}, "stop 5": {"stop": 5},
        "17 stops": {"stop": ["a"] * 17}, "n x": {"n": "x"}, "prompt over the char bound": {"prompt": "a" * (max_prompt_chars + 1)},
    }
    out = [(name, {"json": {"prompt": "Hello", "max_tokens": 8, **body}}) for name, body in bodies.items()]
    out += [
        ("max_tokens 1e309", {"data": b'{"prompt": "Hello", "max_tokens": 1e309}', "headers": js}),
        ("NaN", {"data": b'{"prompt": "Hello", "temperature": NaN}', "headers": js}),
        ("nested 100000", {"data": b'{"prompt": "Hello", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": js}),
        ("form post", {"data": b"prompt=Hello", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        ("bad charset", {"data": b'{"prompt": "Hello"}', "headers": {"Content-Type": "application/json; charset=nope"}}),
        ("body over the size bound", {"data": b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}', "headers": js}),
    ]
    return out


async def abuser(base: str, requests: list[tuple[str, dict]], stop: asyncio.Event, seen: Counter, offset: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        i = offset
        while not stop.is_set():
            name, kwargs = requests[i % len(requests)]
            i += 1
            try:
                async with session.post(f"{base}/v1/completions", **kwargs) as r:
                    await r.read()
                    seen[(name, str(r.status))] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                seen[(name, "conn")] += 1


async def poll_health(base: str, stop: asyncio.Event, seen: list) -> None:
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                async with session.get(f"{base}/health") as r:
                    status = str(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = "conn"
            seen.append((round(t - start, 2), status, time.perf_counter() - t))
            await asyncio.sleep(0.1)


async def good_stream(session: aiohttp.ClientSession, base: str, i: int, max_tokens: int) -> dict:
    body = {"prompt": f"Request {i}: the quick brown fox", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    start, text, finish, error = time.perf_counter(), [], None, None
    try:
        async with session.post(f"{base}/v1/completions", json=body) as r:
            if r.status != 200:
                return {"status": str(r.status), "completed": False, "latency_s": time.perf_counter() - start}
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    else:
                        text.append(event["choices"][0]["text"])
                        finish = event["choices"][0]["finish_reason"] or finish
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return {"status": "conn", "completed": False, "latency_s": time.perf_counter() - start, "error": repr(exc)}
    return {"status": "200", "completed": finish == "length" and error is None, "text": "".join(text), "error": error,
            "latency_s": time.perf_counter() - start}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def run_phase(base: str, args, abuse: bool) -> dict:
    stop, abuse_seen, health_seen = asyncio.Event(), Counter(), []
    tasks = [asyncio.create_task(poll_health(base, stop, health_seen))]
    if abuse:
        requests = abusive_requests(32 * args.max_model_len)
        tasks += [asyncio.create_task(abuser(base, requests, stop, abuse_seen, k * 5)) for k in range(args.abusers)]
        await asyncio.sleep(1.0)  # the abuse is under way before the good clients start
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        goods = await asyncio.gather(*(good_stream(session, base, i, args.max_tokens) for i in range(args.clients)))
    stop.set()
    await asyncio.gather(*tasks)
    latencies = [g["latency_s"] for g in goods if g["completed"]]
    by_status = Counter(status for (_, status) in abuse_seen.elements())
    return {
        "good_requests": len(goods), "good_completed": sum(g["completed"] for g in goods),
        "good_by_status": dict(Counter(g["status"] for g in goods)),
        "good_p50_s": percentile(latencies, 50), "good_p99_s": percentile(latencies, 99),
        "abusive_requests": sum(abuse_seen.values()), "abusive_by_status": dict(sorted(by_status.items())),
        "abusive_by_kind": {f"{name} -> {status}": n for (name, status), n in sorted(abuse_seen.items())},
        "health_by_status": dict(Counter(status for _, status, _ in health_seen)),
        "health_slowest_s": max((lat for _, _, lat in health_seen), default=None),
        "health_timeline": [(t, status) for t, status, _ in health_seen],
        "texts": [g.get("text") for g in goods],
    }


async def server_counters(base: str) -> dict:
    names = ("optforge_requests_failed_total", "optforge_engine_failed_steps_total", "optforge_requests_refused_total", "optforge_engine_alive",
             "optforge_requests_finished_total")
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        text = await r.text()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.split() and line.split()[0] in names}


async def measure(base: str, server: subprocess.Popen, args) -> dict:
    await wait_healthy(base, server, 300)
    alone = await run_phase(base, args, abuse=False)
    with_abuse = await run_phase(base, args, abuse=True)
    return {"alone": alone, "abuse": with_abuse, "server": await server_counters(base),
            "same_text": alone["texts"] == with_abuse["texts"] and all(t for t in alone["texts"])}


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(result: dict, args) -> None:
    print(f"{args.clients} streaming clients x {args.max_tokens} tokens; {args.abusers} abusers; model {result['model']}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print()
    print("| phase | good streams | completed | p50 s | p99 s | abusive requests | abusive answers by status | /health by status | slowest /health s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("alone", "abuse"):
        p = result[name]
        abusive = ", ".join(f"{k}: {v}" for k, v in p["abusive_by_status"].items()) or "-"
        health = ", ".join(f"{k}: {v}" for k, v in p["health_by_status"].items())
        print(f"| {name} | {p['good_requests']} | {p['good_completed']} | {fmt(p['good_p50_s'])} | {fmt(p['good_p99_s'])} | "
              f"{p['abusive_requests']} | {abusive} | {health} | {fmt(p['health_slowest_s'])} |")
    print()
    every = all(result[p]["good_completed"] == result[p]["good_requests"] for p in ("alone", "abuse"))
    print(f"every well-formed stream completed: {'yes' if every else 'no'}; same text alone and under abuse: {'yes' if result['same_text'] else 'no'}")
    print("server counters: " + ", ".join(f"{k} {v:g}" for k, v in result["server"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder; default: a random Llama written to a temporary folder")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--abusers", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=300, help="seconds a phase may take, at most")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp) / "random-llama", args.hidden, args.layers)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(Path(tmp) / "server.log", "w") as log_file:
            server = start_server(model, port, args, log_file)
            try:
                result = asyncio.run(asyncio.wait_for(measure(base, server, args), timeout=3 * args.timeout + 300))
            finally:
                os.killpg(server.pid, signal.SIGINT)
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
        result["model"] = str(args.model) if args.model else f"random Llama (hidden {args.hidden}, {args.layers} layers)"
    report(result, args)
    if args.out:
        for phase in ("alone", "abuse"):
            result[phase].pop("texts")
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))


if __name__ == "__main__":
    main()
