"""An OpenAI-compatible HTTP server over the engine (aiohttp).

POST /v1/completions and /v1/chat/completions (chat template from the tokenizer), both with SSE streaming;
GET /v1/models, /health, and Prometheus text at /metrics. Every request is checked at the edge (api_models.py,
http_guards.py) before it reaches the shared engine: a bad one gets 400 with an OpenAI-style error body naming
the field. Bodies are decoded and prompts tokenized in a worker thread, so a large prompt never stalls the
event loop. A full queue gets 429 with Retry-After; a dead engine gets 503, and /health says why. A client that
disconnects has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from optforge.runtime.api_models import ApiLimits, BadRequest, ChatRequest, CompletionRequest, parse_request
from optforge.runtime.async_engine import AsyncEngine, EngineDead, Failure, Overloaded
from optforge.runtime.detokenize import TextStream
from optforge.runtime.http_guards import HttpError, access_middleware, cors_on_prepare, error_response, read_json
from optforge.runtime.sequence import SamplingParams

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", AsyncEngine)
MODEL_KEY = web.AppKey("model_name", str)
LIMITS_KEY = web.AppKey("limits", ApiLimits)
POOL_KEY = web.AppKey("pool", ThreadPoolExecutor)
ENCODER_KEY = web.AppKey("encoder", object)  # the tokenizer copy that the pool encodes with
RETRY_AFTER_S = "1"  # a queue slot usually frees within a few decode steps
ERROR_TYPES = {400: "invalid_request_error", 503: "service_unavailable"}  # OpenAI's error types; others: server_error


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    app, engine = request.app, request.app[ENGINE_KEY]
    try:
        body = await read_json(request, app[POOL_KEY])
        req = parse_request(ChatRequest if chat else CompletionRequest, body, app[LIMITS_KEY])
        token_ids = await _tokenize(app, req)
        params = _sampling_params(req, token_ids, app[LIMITS_KEY])
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        events = engine.submit(request_id, token_ids, params)
    except BadRequest as exc:
        return error_response(400, str(exc), "invalid_request_error", exc.param)
    except HttpError as exc:
        return error_response(exc.status, str(exc), exc.kind, headers=exc.headers)
    except Overloaded as exc:
        return error_response(429, str(exc), "overloaded", headers={"Retry-After": RETRY_AFTER_S})
    except EngineDead as exc:
        return error_response(503, str(exc), "service_unavailable")
    except ValueError as exc:  # the engine's own check (Engine.check_request) on the tokenized prompt
        return error_response(400, str(exc), "invalid_request_error")
    meta = {"id": request_id, "created": int(time.time()), "model": app[MODEL_KEY]}
    finished = False
    try:
        if req.stream:
            response = await _stream(request, events, params, meta, chat)
        else:
            response = await _collect(events, meta, chat)
        finished = True
        return response
    finally:
        if not finished:  # the client went away (or the handler failed): free the request's blocks
            engine.abort(request_id)


async def _tokenize(app: web.Application, req: CompletionRequest | ChatRequest) -> list[int]:
    tokenizer = app[ENCODER_KEY]
    if isinstance(req, ChatRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
        work = functools.partial(_encode_chat, tokenizer, [m.model_dump(exclude_none=True) for m in req.messages])
    elif isinstance(req.prompt, str):
        work = functools.partial(tokenizer.encode, req.prompt)
    else:
        return req.prompt
    return await asyncio.get_running_loop().run_in_executor(app[POOL_KEY], work)


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:  # the template's own checks, e.g. roles that must alternate
        raise BadRequest(f"the chat template refused these messages: {exc}", "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def _sampling_params(req: CompletionRequest | ChatRequest, token_ids: list[int], limits: ApiLimits) -> SamplingParams:
    num_prompt, prompt_field = len(token_ids), "messages" if isinstance(req, ChatRequest) else "prompt"
    if num_prompt >= limits.max_context:
        raise BadRequest(f"the prompt has {num_prompt} tokens; the context length is {limits.max_context}", prompt_field)
    try:
        params = req.to_params(num_prompt, limits.max_context)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    if num_prompt + params.max_tokens > limits.max_context:
        raise BadRequest(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the context length of {limits.max_context}", "max_tokens")
    return params


async def _collect(events, meta: dict, chat: bool) -> web.Response:
    while True:
        kind, payload = await events.get()
        if kind == "error":
            return error_response(payload.status, payload.message, ERROR_TYPES.get(payload.status, "server_error"))
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
    text = TextStream(request.app[ENGINE_KEY].engine.tokenizer, params.stop)
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
            failure: Failure = payload
            error = {"message": failure.message, "type": "server_error", "code": failure.status}
            await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
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
    engine = request.app[ENGINE_KEY]
    if not engine.is_alive:
        return web.json_response({"status": "dead", "reason": engine.dead_reason or "the engine thread is not running"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": request.app[MODEL_KEY], "object": "model", "owned_by": "optforge"}]})


async def metrics(request: web.Request) -> web.Response:
    from optforge.runtime.metrics import render_metrics

    return web.Response(text=render_metrics(request.app[ENGINE_KEY]), content_type="text/plain")


def create_app(engine: AsyncEngine, model_name: str, *, api_key: str | None = None, allowed_origins: tuple[str, ...] = (),
               max_prompt_chars: int | None = None) -> web.Application:
    """The app. `api_key`: required on /v1/* when set. `allowed_origins`: browser origins that may call it
    (none by default). `max_prompt_chars`: text prompt bound before tokenizing (default 32 x the context)."""
    limits = ApiLimits.for_context(engine.engine.max_context, engine.engine.vocab_size, max_prompt_chars)
    origins = frozenset(allowed_origins)
    # a prompt at the bound, every character JSON-escaped (\uXXXX), plus room for the rest of the body
    app = web.Application(client_max_size=6 * limits.max_prompt_chars + 2**20, middlewares=[access_middleware(api_key, origins)])
    app[ENGINE_KEY], app[MODEL_KEY], app[LIMITS_KEY] = engine, model_name, limits
    # One thread, with its own copy of the tokenizer: a fast (Rust) tokenizer raises "Already borrowed" when two
    # threads encode with it at once, or one encodes while another decodes (the engine and the streams decode).
    app[POOL_KEY] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optforge-tokenize")
    app[ENCODER_KEY] = copy.deepcopy(engine.engine.tokenizer)
    app.on_response_prepare.append(cors_on_prepare(origins))
    app.on_cleanup.append(_shutdown_pool)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def _shutdown_pool(app: web.Application) -> None:
    app[POOL_KEY].shutdown(wait=False, cancel_futures=True)


def serve(engine: AsyncEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Serve until interrupted (`app_options`: see `create_app`). Handlers are cancelled when their client
    disconnects, which frees the request's blocks."""
    web.run_app(create_app(engine, model_name, **app_options), host=host, port=port, handler_cancellation=True, print=None)
