"""What the server checks before a request reaches a handler: who sends it, from where, and in what form.

- An API key (optional): /v1/* needs `Authorization: Bearer KEY` (401 otherwise); /health stays open.
- Browser origins: a request that carries an `Origin` header is refused (403) unless that origin is allowed;
  an allowed one gets CORS headers and its OPTIONS preflight answered. Nothing is allowed by default, so a
  web page cannot drive a server on the user's machine.
- Bodies: JSON only, sent as `Content-Type: application/json` in UTF-8 (415 otherwise: an HTML form cannot
  send that type without a preflight). Decoded off the event loop; NaN, Infinity and deep nesting are 400s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from concurrent.futures import Executor
from typing import Any

from aiohttp import web

from optforge.runtime.api_models import BadRequest


class HttpError(Exception):
    """A refusal with its HTTP status and OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def error_response(status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}}, status=status, headers=headers)


def access_middleware(api_key: str | None, allowed_origins: frozenset[str]):
    """The API-key and origin checks, and preflight answers, as one aiohttp middleware."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin not in allowed_origins:
            return error_response(403, f"requests from origin {origin!r} are not allowed (see `optforge serve --allowed-origins`)", "permission_error")
        if origin is not None and request.method == "OPTIONS":  # a browser's preflight: no credentials on it
            return web.Response(status=204, headers=_cors_headers(origin, preflight=True))
        if expected is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "a valid API key is required: send 'Authorization: Bearer KEY'", "invalid_request_error",
                                      headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return guard


def _cors_headers(origin: str, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600"})
    return headers


def cors_on_prepare(allowed_origins: frozenset[str]):
    """An on_response_prepare hook: CORS headers go on every answer to an allowed origin, streamed ones too
    (a middleware could not add them after a stream has sent its headers)."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin in allowed_origins and "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(_cors_headers(origin))

    return add_headers


async def read_json(request: web.Request, executor: Executor | None) -> Any:
    """The request's JSON body, decoded in `executor`; HttpError (413, 415) or BadRequest (400) otherwise."""
    if request.content_type != "application/json":
        raise HttpError(415, f"send the body as 'Content-Type: application/json' (got {request.content_type!r})", "invalid_request_error")
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise BadRequest(f"JSON bodies are UTF-8; charset {charset!r} is not accepted")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "the body is larger than this server accepts; send a shorter prompt", "invalid_request_error") from None
    return await asyncio.get_running_loop().run_in_executor(executor, _decode, raw)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest("the body nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
