"""An OpenAI-compatible HTTP server over the engine (aiohttp).

POST /v1/completions and /v1/chat/completions (chat template from the tokenizer), both with SSE streaming;
GET /v1/models, /health, and Prometheus text at /metrics. Bad requests get 400 with an OpenAI-style error
body naming the field; a full queue gets 429; a client that disconnects has its request aborted and its
KV blocks freed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from optforge.runtime.async_engine import AsyncEngine, Overloaded
from optforge.runtime.sequence import SamplingParams

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", AsyncEngine)
MODEL_KEY = web.AppKey("model_name", str)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos", "logprobs")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}}, status=status)


def sampling_params(body: dict) -> SamplingParams:
    """Map an OpenAI request body to SamplingParams; wrong types or ranges raise BadRequest naming the field."""
    kwargs = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if isinstance(kwargs.get("logprobs"), bool):  # chat API: logprobs=true, top_logprobs=n
        kwargs["logprobs"] = int(body.get("top_logprobs") or 0) if kwargs["logprobs"] else None
    for name, value in [("max_tokens", max_tokens), *kwargs.items()]:
        if isinstance(value, (str, list, dict)):
            raise BadRequest(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    try:
        return SamplingParams(max_tokens=int(max_tokens), stop=stop, **kwargs)
    except (ValueError, TypeError) as exc:
        raise BadRequest(str(exc), str(exc).split()[0]) from exc


async def _read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _completion_prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise BadRequest("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


class _TextStream:
    """Incremental detokenization that holds back text that may still turn into a stop string."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text) - self.hold
        if text.endswith("\ufffd") or end <= self.sent:  # half a UTF-8 character, or held back
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta

    def finish(self, final_text: str) -> str:
        return final_text[self.sent :]


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine: AsyncEngine = request.app[ENGINE_KEY]
    try:
        body = await _read_json(request)
        params = sampling_params(body)
        prompt = _chat_prompt(body, engine.engine.tokenizer) if chat else _completion_prompt(body)
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", "n")
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        events = engine.submit(request_id, prompt, params)
    except BadRequest as exc:
        return _error(400, str(exc), "invalid_request_error", exc.param)
    except ValueError as exc:
        return _error(400, str(exc), "invalid_request_error")
    except Overloaded as exc:
        return _error(429, str(exc), "overloaded")
    meta = {"id": request_id, "created": int(time.time()), "model": request.app[MODEL_KEY]}
    finished = False
    try:
        if body.get("stream"):
            response = await _stream(request, events, params, meta, chat)
        else:
            response = await _collect(events, meta, chat)
        finished = True
        return response
    finally:
        if not finished:  # the client went away (or the handler failed): free the request's blocks
            engine.abort(request_id)


async def _collect(events, meta: dict, chat: bool) -> web.Response:
    while True:
        kind, payload = await events.get()
        if kind == "error":
            return _error(500, payload, "server_error")
        if kind == "done":
            break
    out = payload
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids), "total_tokens": len(out.prompt_token_ids) + len(out.token_ids)}
    choice = {"index": 0, "finish_reason": out.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": out.text}
    else:
        choice["text"] = out.text
    if out.logprobs:
        choice["logprobs"] = {"tokens": [lp["token"] for lp in out.logprobs], "token_logprobs": [lp["logprob"] for lp in out.logprobs], "top_logprobs": [lp["top"] for lp in out.logprobs]}
    obj = "chat.completion" if chat else "text_completion"
    return web.json_response({**meta, "object": obj, "choices": [choice], "usage": usage})


async def _stream(request: web.Request, events, params: SamplingParams, meta: dict, chat: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    text = _TextStream(request.app[ENGINE_KEY].engine.tokenizer, params)
    obj = "chat.completion.chunk" if chat else "text_completion"

    async def send(delta: str, finish_reason: str | None) -> None:
        choice = {"index": 0, "finish_reason": finish_reason}
        if chat:
            choice["delta"] = {"content": delta} if delta or finish_reason else {"role": "assistant", "content": ""}
        else:
            choice["text"] = delta
        await response.write(f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n".encode())

    while True:
        kind, payload = await events.get()
        if kind == "error":
            await response.write(f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n".encode())
            break
        if kind == "token":
            delta = text.push(payload)
            if delta:
                await send(delta, None)
        else:
            await send(text.finish(payload.text), payload.finish_reason)
            break
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": request.app[MODEL_KEY], "object": "model", "owned_by": "optforge"}]})


async def metrics(request: web.Request) -> web.Response:
    from optforge.runtime.metrics import render_metrics

    return web.Response(text=render_metrics(request.app[ENGINE_KEY]), content_type="text/plain")


def create_app(engine: AsyncEngine, model_name: str) -> web.Application:
    app = web.Application(client_max_size=8 * 2**20)
    app[ENGINE_KEY], app[MODEL_KEY] = engine, model_name
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def serve(engine: AsyncEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted. Handlers are cancelled when their client disconnects (frees its blocks)."""
    web.run_app(create_app(engine, model_name), host=host, port=port, handler_cancellation=True, print=None)
