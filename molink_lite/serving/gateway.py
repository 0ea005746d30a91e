"""OpenAI-compatible HTTP gateway over one or more pipelines (replicas), least-loaded routing.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``), ``GET /v1/models``, ``GET /health``, ``GET /v1/stats`` (``?timeline=1`` adds each stage's
recent step start/end times). Errors use OpenAI's shape
``{"error": {"message", "type", "code", "param"}}``: 400 for bad input (every field is checked
here, at the edge, before anything reaches a stage), 401 for a missing or wrong API key,
404 for an unknown model, 413 for a body over 8 MiB, 503 when no pipeline can take the request.

Open-internet limits (see :func:`start_gateway`): API keys (``Authorization: Bearer``), TLS,
a cap on concurrent connections, and a timeout for request headers (slow-header clients are
closed) and for request bodies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from .auth import ApiKeys
from .chat import ChatPrompt, ChatTemplateError, render_chat
from ..stage.sampling import SamplingError, SamplingParams
from .scheduler import Pipeline, PipelineError, RequestError
from .sequence import Event, GenRequest, SeqState

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 1024         # chat: until the model stops, capped (OpenAI: unlimited)
MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_HEADER_TIMEOUT = 15.0          # seconds for a request's line + headers to arrive
DEFAULT_BODY_TIMEOUT = 60.0            # seconds for a request's body to arrive
DEFAULT_KEEPALIVE_TIMEOUT = 75.0       # an idle keep-alive connection is closed after this

INT32_MAX = 2**31 - 1
MAX_STOP = 16                           # stop strings per request
MAX_STOP_CHARS = 1024                   # characters per stop string
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# float32 guards (llama.cpp's samplers take float): a temperature or repetition penalty this
# small would turn logits into infinities; below it the choice is already the top token.
MIN_TEMPERATURE = 1e-6
MIN_REPETITION_PENALTY = 1e-6
MIN_TOP_P = 1e-9                       # top_p 0 (OpenAI allows it) keeps only the most likely token
SEED_MOD = 2**32 - 1                   # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"
# No vocabulary entry is this long (Gemma 3's longest: 48 bytes), so a text longer than this many
# bytes per context token cannot fit and is refused before stage 0 spends seconds tokenizing it.
MAX_BYTES_PER_TOKEN = 128


class ApiError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, etype: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.etype = status, message, code, etype
        self.param, self.headers = param, headers

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.etype, "code": self.code, "param": self.param}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json",
                            headers=self.headers)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _short(v: Any, n: int = 64) -> str:
    """A client's value, shortened for an error message."""
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------- field validation
def _invalid(message: str, param: Optional[str]) -> ApiError:
    return ApiError(400, message, "invalid_value", param=param)


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, "unsupported_parameter", param=param)


def _number(body: dict, key: str, default: Optional[float], lo: float, hi: float) -> Optional[float]:
    """A JSON number in [lo, hi] (booleans, strings, non-finite values refused)."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid(f"'{key}' must be a number", key)
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or not lo <= f <= hi:
        raise _invalid(f"'{key}' must be between {lo:g} and {hi:g}, got {_short(v)}", key)
    return f


def _integer(body: dict, key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    """A JSON integer in [lo, hi]; an integral float (40.0) counts, booleans do not."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid(f"'{key}' must be an integer", key)
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise _invalid(f"'{key}' must be an integer, got {_short(v)}", key)
        if not lo <= v <= hi:
            raise _invalid(f"'{key}' must be in {lo}..{hi}, got {_short(v)}", key)
        v = int(v)
    if not lo <= v <= hi:
        raise _invalid(f"'{key}' must be in {lo}..{hi}, got {_short(v)}", key)
    return v


def _boolean(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _invalid(f"'{key}' must be a boolean", key)
    return v


def parse_sampling(body: dict) -> SamplingParams:
    """OpenAI's sampling fields (plus llama.cpp's top_k, min_p, repeat penalty), checked and mapped."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 0, INT32_MAX)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    rep = None
    for key in ("repetition_penalty", "repeat_penalty"):
        r = _number(body, key, None, 0.0, 10.0)
        if r is not None and r <= 0.0:
            raise _invalid(f"'{key}' must be in (0, 10], got {_short(body[key])}", key)
        rep = r if rep is None else rep
    seed = _integer(body, "seed", None, -2**63, 2**64 - 1)
    assert temperature is not None and top_p is not None and min_p is not None
    if 0.0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    try:
        return SamplingParams(
            temperature=temperature, top_p=max(top_p, MIN_TOP_P), top_k=int(top_k or 0), min_p=min_p,
            presence_penalty=float(presence or 0.0), frequency_penalty=float(frequency or 0.0),
            repetition_penalty=1.0 if rep is None else max(rep, MIN_REPETITION_PENALTY),
            seed=None if seed is None else seed % SEED_MOD,
        ).validate()
    except SamplingError as e:
        raise _invalid(str(e), None) from None


def parse_max_tokens(body: dict, default: int) -> int:
    """``max_completion_tokens`` (preferred) or ``max_tokens``: an integer in 1..2^31-1."""
    v = None
    for key in ("max_tokens", "max_completion_tokens"):
        got = _integer(body, key, None, 1, INT32_MAX)
        v = got if got is not None else v
    return default if v is None else v


def parse_stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    msg = (f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them, each at most "
           f"{MAX_STOP_CHARS} characters")
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise _invalid(msg, "stop")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise _invalid(msg, "stop")
    return stop


@dataclass
class StreamOptions:
    stream: bool
    include_usage: bool


def parse_stream(body: dict) -> StreamOptions:
    stream = _boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return StreamOptions(stream, False)
    if not isinstance(opts, dict):
        raise _invalid("'stream_options' must be an object or null", "stream_options")
    if not stream:
        raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    inc = opts.get("include_usage")
    if inc is not None and not isinstance(inc, bool):
        raise _invalid("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    return StreamOptions(stream, bool(inc))


def check_common(body: dict) -> None:
    """Fields both endpoints share: ``n`` and features this server does not have (400, not ignored)."""
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise _invalid("'n' must be an integer", "n")
        if n != 1:
            raise _unsupported("only n=1 is supported", "n")
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise _invalid("'logit_bias' must be an object", "logit_bias")
        if lb:
            raise _unsupported("'logit_bias' is not supported", "logit_bias")
    for key in ("tools", "functions"):
        v = body.get(key)
        if v is not None and v != []:
            raise _unsupported(f"'{key}' (tool / function calling) is not supported", key)
    for key in ("tool_choice", "function_call"):
        v = body.get(key)
        if v is not None and v != "none":
            raise _unsupported(f"'{key}' (tool / function calling) is not supported", key)
    if body.get("parallel_tool_calls") is not None:
        raise _unsupported("'parallel_tool_calls' (tool calling) is not supported", "parallel_tool_calls")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise _invalid("'response_format' must be an object with a 'type'", "response_format")
        if rf["type"] != "text":
            raise _unsupported(f"response_format type '{_short(rf['type'])}' is not supported (only 'text')",
                               "response_format")
    for key in ("audio", "prediction", "web_search_options"):
        if body.get(key) is not None:
            raise _unsupported(f"'{key}' is not supported", key)
    mod = body.get("modalities")
    if mod is not None and mod != ["text"]:
        raise _unsupported("only 'modalities': ['text'] is supported", "modalities")


def parse_messages(body: dict) -> List[dict]:
    """Chat messages as ``{"role", "content": str[, "name"]}`` for the template; text parts only."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _invalid(f"{where}.role must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
        c = m.get("content")
        if isinstance(c, list):
            texts = []
            for j, part in enumerate(c):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _invalid(f"{pw} must be an object with a 'type'", pw)
                if part["type"] != "text":
                    raise _unsupported(f"{pw}: content type '{_short(part['type'])}' is not supported "
                                       "(only 'text')", f"{pw}.type")
                if not isinstance(part.get("text"), str):
                    raise _invalid(f"{pw}.text must be a string", f"{pw}.text")
                texts.append(part["text"])
            c = "".join(texts)
        elif not isinstance(c, str):
            raise _invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        for key in ("tool_calls", "function_call"):
            if m.get(key):
                raise _unsupported(f"{where}.{key}: tool / function calling is not supported", f"{where}.{key}")
        msg = {"role": role, "content": c}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _invalid(f"{where}.name must be a string", f"{where}.name")
            msg["name"] = name
        out.append(msg)
    return out


def check_chat_only(body: dict) -> None:
    lp = body.get("logprobs")
    if lp is not None:
        if not isinstance(lp, bool):
            raise _invalid("'logprobs' must be a boolean", "logprobs")
        if lp:
            raise _unsupported("'logprobs' is not supported", "logprobs")
    if body.get("top_logprobs") not in (None, 0) or isinstance(body.get("top_logprobs"), bool):
        raise _unsupported("'top_logprobs' is not supported", "top_logprobs")


def check_completion_only(body: dict) -> None:
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or lp != 0):
        raise _unsupported("'logprobs' is not supported", "logprobs")
    if body.get("echo") not in (None, False):
        raise _unsupported("'echo' is not supported", "echo")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("'suffix' is not supported", "suffix")
    bo = body.get("best_of")
    if bo is not None:
        if isinstance(bo, bool) or not isinstance(bo, (int, float)):
            raise _invalid("'best_of' must be an integer", "best_of")
        if bo != 1:
            raise _unsupported("only best_of=1 is supported", "best_of")


def parse_prompt(body: dict) -> Any:
    """A completion prompt: a non-empty string, or a non-empty list of token ids (range checked later)."""
    prompt = body.get("prompt")
    msg = "'prompt' must be a string, a list with one string, or a list of token ids"
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _invalid("'prompt' is empty", "prompt")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise _invalid(msg, "prompt")
    if all(isinstance(t, (str, list)) for t in prompt):
        raise _unsupported("batched prompts (several prompts in one request) are not supported", "prompt")
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _invalid(msg, "prompt")
    return prompt


# ---------------------------------------------------------------------- connection limits
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\n")


class ConnectionGuard:
    """Shared by all connections of a listener: the open-connection count, the cap and the header timeout."""

    def __init__(self, max_connections: int, header_timeout: float):
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if header_timeout < 0:
            raise ValueError("header_timeout must be >= 0 (0 disables it)")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.active = 0
        self.refused = 0
        self.timed_out = 0
        self._last_warn = -math.inf
        body = orjson.dumps({"error": {
            "message": f"too many connections (at most {max_connections}); try again later",
            "type": "service_unavailable", "code": "too_many_connections", "param": None}})
        self.busy_response = _BUSY + f"Content-Length: {len(body)}\r\n\r\n".encode() + body

    def refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warn > 10.0:
            self._last_warn = now
            log.warning("refusing connections: %d open, the cap is %d (refused so far: %d)", self.active,
                        self.max_connections, self.refused)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol with a connection cap and a request-header timeout.

    aiohttp itself bounds an idle keep-alive connection (``keepalive_timeout``) but not a request
    whose line and headers trickle in byte by byte ("slowloris"). Here a timer starts when a
    connection opens or when the first byte of a new request arrives on an idle one; it stops once
    the headers are parsed (aiohttp queues the message), and if it fires first the connection is
    closed. Over the cap, a new connection gets a 503 and is closed at once. Portable: only
    asyncio's call_later and transports are used. Reads RequestHandler's ``_messages`` (parsed,
    unhandled requests) and ``_request_in_progress``; tests/test_api_security.py checks both paths.
    """

    __slots__ = ("_guard", "_header_handle", "_admitted")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_handle: Optional[asyncio.TimerHandle] = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._guard
        if g.active >= g.max_connections:
            g.refuse()
            self._manager = None            # RequestHandler.connection_lost becomes a no-op
            self._force_close = True        # data_received ignores anything that still arrives
            t: Any = transport
            try:
                t.write(g.busy_response)
            finally:
                t.close()
            return
        g.active += 1
        self._admitted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._disarm_header_timer()
        if self._admitted:
            self._admitted = False
            self._guard.active -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_handle is None and not self._messages and not self._request_in_progress:
            self._arm_header_timer()        # a new request starts on an idle connection
        super().data_received(data)
        if self._header_handle is not None and (self._messages or self._request_in_progress):
            self._disarm_header_timer()     # headers complete

    def _arm_header_timer(self) -> None:
        if self._guard.header_timeout > 0 and self._header_handle is None:
            self._header_handle = self._loop.call_later(self._guard.header_timeout, self._header_expired)

    def _disarm_header_timer(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_expired(self) -> None:
        self._header_handle = None
        if self._messages or self._request_in_progress or self._force_close or self.transport is None:
            return
        self._guard.timed_out += 1
        log.debug("closing a connection from %s: request headers did not arrive within %.1f s", self.peername,
                  self._guard.header_timeout)
        self.force_close()


class GuardedSite(web.BaseSite):
    """A TCP listener (optionally TLS) whose connections are :class:`GuardedRequestHandler`."""

    def __init__(self, runner: web.BaseRunner, host: Optional[str], port: int, *, guard: ConnectionGuard,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                 ssl_context: Optional[ssl.SSLContext] = None, backlog: int = 128):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port, self.guard = host, port, guard
        self._handler_kwargs = {"keepalive_timeout": keepalive_timeout, "access_log": None}

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = self._host or "0.0.0.0"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard, kw = self.guard, self._handler_kwargs

        def factory() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, guard=guard, **kw)

        tls_timeout = (guard.header_timeout or None) if self._ssl_context else None
        self._server = await loop.create_server(factory, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, ssl_handshake_timeout=tls_timeout)


async def serve_app(app: web.Application, host: Optional[str], port: int, *,
                    ssl_context: Optional[ssl.SSLContext] = None,
                    max_connections: int = DEFAULT_MAX_CONNECTIONS,
                    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT) -> Tuple[web.AppRunner, GuardedSite]:
    """Start ``app`` on a guarded listener; returns the runner (``cleanup()`` stops it) and the site."""
    guard = ConnectionGuard(max_connections, header_timeout)
    # handler_cancellation: a client that goes away cancels its handler, which frees its sequence
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard=guard, keepalive_timeout=keepalive_timeout, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


# ---------------------------------------------------------------------- the gateway
_OPEN_PATHS = ("/health",)


class Gateway:
    """Routes OpenAI requests to the least-loaded healthy pipeline."""

    def __init__(self, pipelines: Sequence[Pipeline], model_name: Optional[str] = None,
                 chat_template: Optional[str] = None, api_keys: Sequence[str] = (),
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.pipelines = list(pipelines)
        self._model_name = model_name
        self.api_keys = ApiKeys(api_keys)
        self.body_timeout = body_timeout
        # --chat-template: a llama.cpp built-in name, or a Jinja2 file
        self.chat_template: Optional[str] = None
        self.builtin_template: Optional[str] = None
        if chat_template:
            if os.path.isfile(chat_template):
                with open(chat_template, encoding="utf-8") as f:
                    self.chat_template = f.read()
            else:
                self.builtin_template = chat_template
        self._bg: List[asyncio.Task] = []

    @property
    def model_name(self) -> str:
        if self._model_name:
            return self._model_name
        for p in self.pipelines:
            if p.infos:
                return str(p.infos[0].get("name") or "model")
        return "model"

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/stats", self.stats)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        for p in self.pipelines:
            self._bg.append(asyncio.ensure_future(p.watchdog()))
            self._bg.append(asyncio.ensure_future(p.reconnect_forever()))

    async def _cleanup(self, app: web.Application) -> None:
        for t in self._bg:
            t.cancel()
        for p in self.pipelines:
            await p.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            if e.status == 413:
                return ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "request_too_large",
                                param=None).response()
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status)
            return ApiError(e.status, e.reason or "error", code).response()
        except Exception:  # noqa: BLE001 - a bug: log it, answer 500 without internals
            log.exception("internal error on %s %s", request.method, request.path)
            return ApiError(500, "internal server error (see the gateway's log)", "internal_error",
                            "server_error").response()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if self.api_keys and not (request.method in ("GET", "HEAD") and request.path in _OPEN_PATHS):
            token = ApiKeys.bearer(request.headers.get("Authorization"))
            if token is None:
                raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if not self.api_keys.check(token):
                raise ApiError(401, "Incorrect API key provided.", "invalid_api_key",
                               headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return await handler(request)

    # ------------------------------------------------------------------ simple endpoints
    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "molink-lite"}]})

    async def health(self, request: web.Request) -> web.Response:
        ps = [{"name": p.name, "healthy": p.healthy, "error": p.error or None, "load": p.load} for p in self.pipelines]
        ok = any(p.healthy for p in self.pipelines)
        return _json({"status": "ok" if ok else "unavailable", "pipelines": ps}, 200 if ok else 503)

    async def stats(self, request: web.Request) -> web.Response:
        out = []
        for p in self.pipelines:
            entry: Dict[str, Any] = {"name": p.name, "healthy": p.healthy, "scheduler": p.stats,
                                     "prefill_chunk": p.prefill_chunk, "micro_batches": p.max_inflight,
                                     "links": p.links}
            if p.healthy:
                try:
                    entry["stages"] = await p.stage_stats()
                    if request.query.get("timeline") not in ("1", "true"):
                        for st in entry["stages"]:
                            st.pop("timeline", None)
                except Exception as e:  # noqa: BLE001
                    entry["stages_error"] = str(e)
            out.append(entry)
        return _json({"pipelines": out})

    # ------------------------------------------------------------------ parsing
    async def _body(self, request: web.Request) -> dict:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "request_too_large")
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body did not arrive within {self.body_timeout:g} s",
                           "request_timeout") from None
        except RequestPayloadError as e:
            raise ApiError(400, f"malformed request body: {e}", "invalid_body") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {_short(str(e), 200)}", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise _invalid("'model' must be a string", "model")
            if model != self.model_name:
                raise ApiError(404, f"model '{_short(model)}' does not exist; this server serves "
                                    f"'{self.model_name}'", "model_not_found", param="model")
        check_common(body)
        return body

    def _pick(self) -> Pipeline:
        healthy = [p for p in self.pipelines if p.healthy]
        if not healthy:
            errs = "; ".join(f"{p.name}: {p.error}" for p in self.pipelines)
            raise ApiError(503, f"no pipeline is available ({errs})", "no_pipeline", "service_unavailable")
        return min(healthy, key=lambda p: p.load / max(1, p.max_seqs))

    # ------------------------------------------------------------------ generation
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        check_completion_only(body)
        prompt = parse_prompt(body)
        opts = parse_stream(body)
        params = parse_sampling(body)
        max_tokens = parse_max_tokens(body, DEFAULT_COMPLETION_MAX_TOKENS)
        stop = parse_stop(body)
        ignore_eos = _boolean(body, "ignore_eos", False)   # llama.cpp server's: past end-of-generation
        pipe = self._pick()
        if isinstance(prompt, str):
            tokens = await self._tokenize(pipe, prompt, add_special=True)
        else:
            n_vocab = int(pipe.first["n_vocab"])
            if min(prompt) < 0 or max(prompt) >= n_vocab:
                raise _invalid(f"prompt token ids must be in 0..{n_vocab - 1}", "prompt")
            tokens = np.asarray(prompt, dtype=np.int32)
        req = GenRequest(tokens, params, max_tokens, stop, ignore_eos=ignore_eos)
        return await self._run(request, pipe, req, opts, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        check_chat_only(body)
        messages = parse_messages(body)
        opts = parse_stream(body)
        params = parse_sampling(body)
        stop = parse_stop(body)
        ignore_eos = _boolean(body, "ignore_eos", False)
        parse_max_tokens(body, 1)  # checked now; the default depends on the prompt's length
        pipe = self._pick()
        chat_prompt = self._apply_template(pipe, messages)
        tokens = await self._tokenize(pipe, chat_prompt.text, add_special=chat_prompt.add_special)
        max_default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, pipe.n_ctx - int(tokens.shape[0])))
        req = GenRequest(tokens, params, parse_max_tokens(body, max_default), stop + [s for s in chat_prompt.stop if s],
                         ignore_eos=ignore_eos)
        return await self._run(request, pipe, req, opts, chat=True)

    def _apply_template(self, pipe: Pipeline, messages: list) -> ChatPrompt:
        info = pipe.first
        try:
            return render_chat(messages, template=self.chat_template or info.get("chat_template"), arch=info["arch"],
                               bos=info.get("bos", ""), eos=info.get("eos", ""), builtin=self.builtin_template)
        except ChatTemplateError as e:
            raise _invalid(_short(str(e), 500), "messages") from None

    async def _tokenize(self, pipe: Pipeline, text: str, add_special: bool) -> np.ndarray:
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        if n_bytes > MAX_BYTES_PER_TOKEN * pipe.n_ctx:
            raise ApiError(400, f"the prompt ({n_bytes} bytes) cannot fit the context window ({pipe.n_ctx} tokens)",
                           "context_length_exceeded")
        try:
            return await pipe.tokenize(text, add_special=add_special)
        except (PipelineError, RuntimeError, ConnectionError, asyncio.TimeoutError) as e:
            # the first stage is gone, answered an error, or did not answer in time
            raise ApiError(503, f"tokenization failed: {_short(str(e), 300)}", "no_pipeline",
                           "service_unavailable") from None

    async def _run(self, request: web.Request, pipe: Pipeline, req: GenRequest, opts: StreamOptions,
                   chat: bool) -> web.StreamResponse:
        try:
            seq = pipe.submit(req)
        except RequestError as e:
            raise ApiError(400, str(e), "context_length_exceeded" if "context" in str(e) else "invalid_value") from None
        except PipelineError as e:
            raise ApiError(503, str(e), "no_pipeline", "service_unavailable") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            if opts.stream:
                return await self._stream(request, seq, rid, created, chat, opts)
            return await self._collect(seq, rid, created, chat)
        finally:
            if not seq.finished:
                pipe.cancel(seq)

    def _usage(self, seq: SeqState) -> dict:
        p, c = int(seq.req.prompt.shape[0]), len(seq.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _collect(self, seq: SeqState, rid: str, created: int, chat: bool) -> web.Response:
        parts: List[str] = []
        while True:
            ev: Event = await seq.events.get()
            if ev.kind == "text":
                parts.append(ev.text)
            elif ev.kind == "error":
                raise ApiError(503, ev.message, "pipeline_error", "server_error")
            else:
                break
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": ev.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": ev.finish_reason, "logprobs": None}
        return _json({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                      "model": self.model_name, "choices": [choice], "usage": self._usage(seq)})

    async def _stream(self, request: web.Request, seq: SeqState, rid: str, created: int, chat: bool,
                      opts: StreamOptions) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> bytes:
            if chat:
                delta: Dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return b"data: " + orjson.dumps({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                             "choices": [choice]}) + b"\n\n"

        try:
            await resp.prepare(request)
            if chat:
                await resp.write(chunk(None, None, first=True))
            while True:
                ev = await seq.events.get()
                if ev.kind == "text":
                    await resp.write(chunk(ev.text, None))
                elif ev.kind == "error":
                    err = {"error": {"message": ev.message, "type": "server_error", "code": "pipeline_error"}}
                    await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
                    break
                else:
                    await resp.write(chunk(None, ev.finish_reason))
                    if opts.include_usage:
                        u = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                             "usage": self._usage(seq)}
                        await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
                    break
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError) as e:
            # the client went away mid-stream; _run's finally frees the sequence
            log.debug("client %s went away mid-stream (%s): %s", request.remote, rid, e)
        return resp


async def start_gateway(pipeline_urls: Sequence[Sequence[str]], *, host: str = "127.0.0.1", port: int = 8000,
                        codec: str = "f16", max_inflight: Optional[int] = None, prefill_chunk: Optional[int] = None,
                        max_batch_tokens: int = 512, connect_timeout: float = 120.0,
                        model_name: Optional[str] = None, chat_template: Optional[str] = None,
                        api_keys: Sequence[str] = (), ssl_context: Optional[ssl.SSLContext] = None,
                        max_connections: int = DEFAULT_MAX_CONNECTIONS,
                        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                        body_timeout: float = DEFAULT_BODY_TIMEOUT, **pipeline_kw: Any) -> web.AppRunner:
    """Connect every pipeline (failing fast on a bad chain) and start serving HTTP (HTTPS with ``ssl_context``).

    ``api_keys``: when given, every endpoint but ``GET /health`` needs ``Authorization: Bearer <key>``.
    ``max_connections``: open HTTP connections at most (more get a 503 and are closed).
    ``header_timeout``: seconds for a request's line and headers (also the TLS handshake) to arrive;
    ``keepalive_timeout``: an idle keep-alive connection is closed after it; ``body_timeout``: seconds
    for a request's body. ``pipeline_kw`` goes to each :class:`Pipeline`.
    """
    ConnectionGuard(max_connections, header_timeout)  # bad limits fail before connecting anything
    pipes = [Pipeline(urls, codec=codec, max_inflight=max_inflight, prefill_chunk=prefill_chunk,
                      max_batch_tokens=max_batch_tokens, name=f"p{i}", **pipeline_kw)
             for i, urls in enumerate(pipeline_urls)]
    await asyncio.gather(*(p.connect(timeout=connect_timeout) for p in pipes))
    gw = Gateway(pipes, model_name, chat_template, api_keys=api_keys, body_timeout=body_timeout)
    runner, site = await serve_app(gw.app(), host, port, ssl_context=ssl_context, max_connections=max_connections,
                                   header_timeout=header_timeout, keepalive_timeout=keepalive_timeout)
    log.info("gateway on %s/v1 serving %s over %d pipeline(s); %s; at most %d connections, header timeout %g s",
             site.name, gw.model_name, len(pipes),
             f"{len(gw.api_keys)} API key(s) required" if gw.api_keys else "no API key required",
             max_connections, header_timeout)
    if not gw.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the gateway listens on %s without API keys: anyone who can reach it can use it "
                    "(--api-key-file FILE or $MOLINK_API_KEY)", host)
    return runner
