"""OpenAI-compatible HTTP gateway over one or more pipelines (replicas), least-loaded routing.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``), ``GET /v1/models``, ``GET /health``, ``GET /v1/stats`` (``?timeline=1`` adds each stage's
recent step start/end times), ``GET /metrics`` (Prometheus, :mod:`molink_lite.serving.metrics`) and the
dashboard at ``GET /`` (static files from :mod:`molink_lite.serving.web`, reading ``/v1/stats`` and
``/metrics``). Errors use OpenAI's shape
``{"error": {"message", "type", "code", "param"}}``: 400 for bad input (every field is checked
here, at the edge, before anything reaches a stage; a prompt longer than the context is
``context_length_exceeded``), 401 for a missing or wrong API key, 404 for an unknown model, 413 for
a body over 8 MiB, 429 when a key has too many requests running or the queue is full, 503 when no
pipeline can take the request.

Open-internet limits (see :func:`start_gateway`): API keys (``Authorization: Bearer``), TLS,
caps on concurrent connections (in all and per remote address; idle keep-alive connections make
room), concurrent generation requests per API key, timeouts for request headers (slow-header
clients are closed), request bodies, idle keep-alive connections and writes (a client that stops
reading its stream is cut and its sequence freed). Without the API key, ``GET /health`` says only
``{"status": ...}``: pipelines, stage addresses (relay tokens included) and errors need the key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..wire.auth import LinkKey
from ..wire.channel import RemoteError
from .auth import ApiKeys
from .chat import BUILTIN_BY_ARCH, ChatPrompt, ChatTemplateError, render_chat
from .config import GatewayConfig
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .http_limits import (DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUESTS_PER_KEY, ConnectionGuard, bound_send_buffer,
                          serve_app)
from .openai_schema import (DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, MAX_BODY_BYTES,
                            MAX_BYTES_PER_TOKEN, ApiError, StreamOptions, _boolean, _invalid, _json, _short,
                            check_chat_only, check_common, check_completion_only, parse_max_tokens, parse_messages,
                            parse_prompt, parse_sampling, parse_stop, parse_stream)
from .pipeline import Pipeline, PipelineError, RequestError
from .router import Overloaded, Router
from .sequence import Event, GenRequest, SeqState

log = logging.getLogger(__name__)
# /cluster: joining stages authenticate with the cluster secret; "/" and /web/: the dashboard's static files
# (no data: every request the page makes for data carries the API key)
_OPEN_PATHS = ("/health", "/cluster", "/")
# relayed stage links: a random per-stage token, and the stage link's own handshake runs inside the tunnel
_OPEN_PREFIXES = ("/relay/", "/relay-back/", "/web/")
# request keys (aiohttp >= 3.13 wants typed ones): the stream's client went away; which API key (its index)
_RequestKey: Any = getattr(web, "RequestKey", None)
_CLIENT_GONE: Any = _RequestKey("molink_client_gone", bool) if _RequestKey else "molink_client_gone"
_KEY_ID: Any = _RequestKey("molink_key_id", int) if _RequestKey else "molink_key_id"
# the first stage tokenizes at most this many characters per context token (stage/server.py)
STAGE_TOKENIZE_CHARS_PER_TOKEN = 32
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # counted in /metrics
WEB_DIR = Path(__file__).with_name("web")
_WEB_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


class Gateway:
    """Answers OpenAI requests; the :class:`Router` picks pipelines and replays requests when one fails."""

    def __init__(self, router: Router, model_name: Optional[str] = None,
                 chat_template: Optional[str] = None, api_keys: Sequence[str] = (),
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 max_requests_per_key: int = DEFAULT_MAX_REQUESTS_PER_KEY):
        if max_requests_per_key < 0:
            raise ValueError("max_requests_per_key must be >= 0 (0: no cap)")
        self.router = router
        self.cluster: Any = None  # serving.cluster.Cluster when stages join this gateway
        self.pipelines = router.pipelines
        self._model_name = model_name
        self.api_keys = ApiKeys(api_keys)
        self.body_timeout = body_timeout
        self.max_requests_per_key = max_requests_per_key
        self.per_key: Dict[int, int] = {}   # API key index -> its generation requests being answered now
        self.per_key_refused = 0
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
        self.guard: Optional[ConnectionGuard] = None   # the listener's connection counters, once it listens
        self.metrics = Metrics(router)
        router.observer = self.metrics
        self._warned_no_template = False
        # the dashboard's files, read once: only these names are served (no paths from the request)
        self._web: Dict[str, Tuple[bytes, str]] = {
            f.name: (f.read_bytes(), _WEB_TYPES[f.suffix]) for f in sorted(WEB_DIR.glob("*"))
            if f.is_file() and f.suffix in _WEB_TYPES}

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
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._count, self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/", self.dashboard)
        app.router.add_get("/web/{name}", self.web_file)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        for p in self.pipelines:
            p.start_background()
        self._bg.append(asyncio.ensure_future(self.router.expire_parked()))
        self._bg.append(asyncio.ensure_future(self.router.dispatch_forever()))

    async def _cleanup(self, app: web.Application) -> None:
        for t in self._bg:
            t.cancel()
        for p in self.pipelines:
            await p.close()

    @web.middleware
    async def _count(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Generation requests by endpoint and status (``molink_requests_total``), errors included; a client that
        went away before the end counts as status 499 (nginx's "client closed request")."""
        endpoint = _ENDPOINTS.get(request.path) if request.method == "POST" else None
        if endpoint is None:
            return await handler(request)
        try:
            resp = await handler(request)
        except asyncio.CancelledError:  # the connection closed: aiohttp cancels the handler (handler_cancellation)
            self.metrics.client_gone(endpoint)
            raise
        if request.get(_CLIENT_GONE):
            self.metrics.client_gone(endpoint)
        else:
            self.metrics.request_done(endpoint, resp.status)
        return resp

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
        open_path = request.path in _OPEN_PATHS or request.path.startswith(_OPEN_PREFIXES)
        if self.api_keys and not (request.method in ("GET", "HEAD") and open_path):
            token = ApiKeys.bearer(request.headers.get("Authorization"))
            if token is None:
                raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            key_id = self.api_keys.identify(token)
            if key_id is None:
                raise ApiError(401, "Incorrect API key provided.", "invalid_api_key",
                               headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            request[_KEY_ID] = key_id
            if self.max_requests_per_key and request.method == "POST" and request.path in _ENDPOINTS:
                return await self._per_key_limited(key_id, request, handler)
        return await handler(request)

    async def _per_key_limited(self, key_id: int, request: web.Request, handler: Callable) -> web.StreamResponse:
        """At most ``max_requests_per_key`` generation requests of one key at a time (body, queue, generation and
        stream included); more get 429, so one key holder cannot fill the queue in front of everyone else."""
        n = self.per_key.get(key_id, 0)
        if n >= self.max_requests_per_key:
            self.per_key_refused += 1
            raise ApiError(429, f"too many concurrent requests with this API key (at most "
                                f"{self.max_requests_per_key}); retry when one has finished",
                           "rate_limit_exceeded", "rate_limit_error", headers={"Retry-After": "1"})
        self.per_key[key_id] = n + 1
        try:
            return await handler(request)
        finally:
            left = self.per_key.get(key_id, 1) - 1
            if left > 0:
                self.per_key[key_id] = left
            else:
                self.per_key.pop(key_id, None)

    def _authorized(self, request: web.Request) -> bool:
        """The request may see internals (stage addresses, errors): it carries a valid key, or no keys are
        configured (then the whole API is open; the gateway only starts so on loopback or with --insecure)."""
        if not self.api_keys:
            return True
        return self.api_keys.check(ApiKeys.bearer(request.headers.get("Authorization")))

    # ------------------------------------------------------------------ simple endpoints
    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "molink-lite"}]})

    async def health(self, request: web.Request) -> web.Response:
        """200 while some pipeline is up ("ok" when all are, else "degraded"), 503 otherwise.

        Open, so without the API key it says only that (``{"status": ...}``): each pipeline's stage addresses
        (a relayed stage's includes its relay token, a tunnel to a stage behind NAT) and errors go only to
        a request with the key (or to anyone when no keys are configured: then the whole API is open)."""
        status = self.router.status
        code = 200 if status != "unavailable" else 503
        if not self._authorized(request):
            return _json({"status": status}, code)
        return _json({"status": status, "pipelines": self.router.describe(), "router": self.router.stats,
                      "queued": self.router.queued}, code)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dashboard(self, request: web.Request) -> web.Response:
        return self._static("index.html")

    async def web_file(self, request: web.Request) -> web.Response:
        return self._static(request.match_info["name"])

    def _static(self, name: str) -> web.Response:
        found = self._web.get(name)
        if found is None:
            raise ApiError(404, "not found", "not_found")
        body, ctype = found
        return web.Response(body=body, content_type=ctype, charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
                                     "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})

    async def stats(self, request: web.Request) -> web.Response:
        out = []
        for p, d in zip(self.pipelines, self.router.describe()):
            entry: Dict[str, Any] = {**d, "scheduler": p.stats, "prefill_chunk": p.prefill_chunk,
                                     "micro_batches": p.max_inflight, "lanes": p.lanes, "links": p.links,
                                     "events": list(p.events),
                                     "n_ctx": p.n_ctx, "kv_reserved": p.kv_reserved, "max_seqs": p.max_seqs,
                                     "stage_info": [_stage_info(i) for i in p.infos] if p.healthy else [],
                                     "speculative": p.spec_summary()}
            if p.healthy:
                try:
                    entry["stages"] = await asyncio.wait_for(p.stage_stats(), 10)
                    if request.query.get("timeline") not in ("1", "true"):
                        for st in entry["stages"]:
                            st.pop("timeline", None)
                except asyncio.TimeoutError:
                    entry["stages_error"] = "the stages did not answer within 10 s"
                except Exception as e:  # noqa: BLE001
                    entry["stages_error"] = str(e)
            out.append(entry)
        return _json({"status": self.router.status, "model": self.model_name, "router": self.router.stats,
                      "queued": self.router.queued, "metrics": self.metrics.recent(), "http": self._http_stats(),
                      "pipelines": out, "placement": self.cluster.plans if self.cluster is not None else None,
                      "replacements": self.cluster.replacements if self.cluster is not None else None})

    def _http_stats(self) -> dict:
        """Connections and what the limits turned away (/v1/stats)."""
        out: Dict[str, Any] = {"requests_refused_per_key": self.per_key_refused,
                               "keys_with_requests": len(self.per_key)}
        g = self.guard
        if g is not None:
            out.update(connections=g.active, addresses=len(g.per_address), refused=g.refused,
                       refused_per_address=g.refused_address, idle_closed_for_room=g.evicted,
                       header_timeouts=g.timed_out, write_timeouts=g.write_timed_out)
        return out

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
        if isinstance(prompt, str):
            tokens = await self._tokenize(prompt, add_special=True)
        else:
            n_vocab = int((await self._facts()).first["n_vocab"])
            if min(prompt) < 0 or max(prompt) >= n_vocab:
                raise _invalid(f"prompt token ids must be in 0..{n_vocab - 1}", "prompt")
            tokens = np.asarray(prompt, dtype=np.int32)
        req = GenRequest(tokens, params, max_tokens, stop, ignore_eos=ignore_eos, owner=request.get(_KEY_ID))
        return await self._run(request, req, opts, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        check_chat_only(body)
        messages = parse_messages(body)
        opts = parse_stream(body)
        params = parse_sampling(body)
        stop = parse_stop(body)
        ignore_eos = _boolean(body, "ignore_eos", False)
        parse_max_tokens(body, 1)  # checked now; the default depends on the prompt's length
        pipe = await self._facts()
        chat_prompt = self._apply_template(pipe, messages)
        tokens = await self._tokenize(chat_prompt.text, add_special=chat_prompt.add_special)
        max_default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, pipe.n_ctx - int(tokens.shape[0])))
        req = GenRequest(tokens, params, parse_max_tokens(body, max_default), stop + [s for s in chat_prompt.stop if s],
                         ignore_eos=ignore_eos, owner=request.get(_KEY_ID))
        return await self._run(request, req, opts, chat=True)

    async def _facts(self) -> Pipeline:
        """An up pipeline to read model facts from (vocabulary, context, template); waits like a request does."""
        try:
            return await self.router.wait_up()
        except PipelineError as e:
            raise ApiError(503, _short(str(e), 300), "no_pipeline", "service_unavailable") from None

    def _apply_template(self, pipe: Pipeline, messages: list) -> ChatPrompt:
        info = pipe.first
        if not (self.chat_template or self.builtin_template or info.get("chat_template")) \
                and not self._warned_no_template:
            self._warned_no_template = True
            log.warning("the model has no chat template (a base model?): /v1/chat/completions formats messages "
                        "with llama.cpp's built-in '%s' template, which the model may not follow; use "
                        "/v1/completions, or pass --chat-template", BUILTIN_BY_ARCH.get(info.get("arch"), "chatml"))
        try:
            return render_chat(messages, template=self.chat_template or info.get("chat_template"), arch=info["arch"],
                               bos=info.get("bos", ""), eos=info.get("eos", ""), builtin=self.builtin_template)
        except ChatTemplateError as e:
            raise _invalid(_short(str(e), 500), "messages") from None

    async def _tokenize(self, text: str, add_special: bool) -> np.ndarray:
        pipe = await self._facts()
        n_ctx = pipe.n_ctx
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        if n_bytes > MAX_BYTES_PER_TOKEN * n_ctx:
            raise ApiError(400, f"the prompt ({n_bytes} bytes) cannot fit the context window ({n_ctx} tokens)",
                           "context_length_exceeded")
        # the first stage refuses to tokenize more characters than this (a 503 if asked): such a prompt cannot
        # fit the context anyway, which is the client's error
        stage_ctx = int(pipe.first.get("n_ctx") or n_ctx) if pipe.infos else n_ctx
        if len(text) > STAGE_TOKENIZE_CHARS_PER_TOKEN * stage_ctx:
            raise ApiError(400, f"the prompt ({len(text)} characters) cannot fit the context window "
                                f"({n_ctx} tokens)", "context_length_exceeded")
        try:
            return await self.router.tokenize(text, add_special=add_special)
        except RemoteError as e:
            if "at most" in str(e) and "n_ctx" in str(e):   # the stage's own length check (a smaller stage context)
                raise ApiError(400, f"the prompt cannot fit the context window ({n_ctx} tokens)",
                               "context_length_exceeded") from None
            raise ApiError(503, f"tokenization failed: {_short(str(e), 300)}", "no_pipeline",
                           "service_unavailable") from None
        except (PipelineError, RuntimeError, ConnectionError, asyncio.TimeoutError) as e:
            # the first stage is gone, answered an error, or did not answer in time
            raise ApiError(503, f"tokenization failed: {_short(str(e), 300)}", "no_pipeline",
                           "service_unavailable") from None

    async def _run(self, request: web.Request, req: GenRequest, opts: StreamOptions,
                   chat: bool) -> web.StreamResponse:
        try:
            seq = self.router.submit(req)
        except RequestError as e:
            raise ApiError(400, str(e), "context_length_exceeded" if "context" in str(e) else "invalid_value") from None
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", "rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except PipelineError as e:   # no pipeline at all (stages still joining)
            raise ApiError(503, _short(str(e), 300), "no_pipeline", "service_unavailable") from None
        self.metrics.prompt_tokens.inc(int(req.prompt.shape[0]))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            if opts.stream:
                return await self._stream(request, seq, rid, created, chat, opts)
            return await self._collect(seq, rid, created, chat)
        finally:
            if not seq.finished:
                self.router.cancel(seq)
            self.router.release(seq)

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

        # a client that stops reading: its unread chunks fill a bounded buffer, then the write timeout cuts the
        # stream (http_limits) and _run frees its sequence; meanwhile only this handler waits, never the loop
        bound_send_buffer(request.transport)
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
            request[_CLIENT_GONE] = True
            log.debug("client %s went away mid-stream (%s): %s", request.remote, rid, e)
        return resp


def _stage_info(info: dict) -> dict:
    """What the dashboard shows of a stage (its hello): address, host, layers, backend, offload, sizes."""
    keys = ("url", "host", "layer_start", "layer_stop", "n_layer_total", "backend", "n_gpu_layers", "model_bytes",
            "n_ctx", "max_seqs", "arch", "codec")
    return {k: info.get(k) for k in keys}


async def start_gateway(cfg: GatewayConfig, *, key: Optional[LinkKey] = None, api_keys: Sequence[str] = (),
                        ssl_context: Optional[ssl.SSLContext] = None, tls_fingerprint: str = "") -> web.AppRunner:
    """Connect every pipeline of ``cfg`` (failing fast on a bad chain) and start serving HTTP (HTTPS with
    ``ssl_context``).

    ``cfg`` holds the settings (:class:`~molink_lite.serving.config.GatewayConfig`); the keywords hold what was
    loaded from them: ``key``, the cluster key of the stage links; ``api_keys``: when given, every endpoint but
    ``GET /health`` needs ``Authorization: Bearer <key>`` (and ``/health`` says only ``{"status": ...}`` without
    it); ``ssl_context`` and ``tls_fingerprint``: the listener's TLS and its certificate's fingerprint (bound
    into join handshakes).

    ``cfg.http`` (:class:`~molink_lite.serving.config.HttpLimits`): ``max_connections``: open HTTP connections
    at most; ``max_connections_per_address``: the same per remote address (IPv6: per /64; 0: no cap). At a cap
    the longest-idle keep-alive connection is closed to make room, else the new one gets 503 (429 per address).
    ``header_timeout``: seconds for a request's line and headers (also the TLS handshake) to arrive;
    ``keepalive_timeout``: an idle keep-alive connection is closed after it; ``write_timeout``: a client that
    reads nothing of its response for this long is cut (a stream's sequence is freed; 0: never);
    ``max_requests_per_key``: concurrent generation requests of one API key (more get 429; 0: no cap; only
    with ``api_keys``; with several keys, one running on a pipeline leaves room there for the others);
    ``body_timeout``: seconds for a request's body. ``cfg.recover_timeout``: how long a request waits for a
    pipeline to come back when none is up; ``cfg.max_queue``: requests waiting for a slot at most (more get 429).
    ``cfg.pipeline`` goes to each :class:`Pipeline`, joined ones included. ``cfg.join.model``: the gateway holds
    this GGUF and stages join at ``/cluster`` (:mod:`molink_lite.serving.cluster`), placed for
    ``cfg.join.n_ctx`` tokens and ``cfg.join.n_seqs`` sequences.
    """
    lim = cfg.http
    # bad limits fail before connecting anything (the config checked them too)
    ConnectionGuard(lim.max_connections, lim.header_timeout, lim.max_connections_per_address, lim.write_timeout)
    pipes = [Pipeline(urls, **cfg.pipeline.pipeline_kwargs(name=f"p{i}", key=key))
             for i, urls in enumerate(cfg.pipelines)]
    await asyncio.gather(*(p.connect(timeout=cfg.connect_timeout) for p in pipes))
    router = Router(pipes, recover_timeout=cfg.recover_timeout, max_queue=cfg.max_queue)
    app_model_name = cfg.model_name
    cluster = None
    if cfg.join.model:
        from .cluster import Cluster

        j = cfg.join
        joined_kw = {k: v for k, v in cfg.pipeline.pipeline_kwargs().items() if k != "codec"}
        cluster = Cluster(j.model, router, key, n_ctx=j.n_ctx, n_seqs=j.n_seqs, codec=cfg.pipeline.codec,
                          settle=j.settle, pipeline_kw=joined_kw, cert_fp=tls_fingerprint,
                          ready_timeout=j.ready_timeout, rejoin_grace=j.rejoin_grace)
        app_model_name = cfg.model_name or cluster.info.name
    gw = Gateway(router, app_model_name, cfg.chat_template, api_keys=api_keys, body_timeout=lim.body_timeout,
                 max_requests_per_key=lim.max_requests_per_key)
    # several key holders share the pipelines: one running there always leaves room for a request of another
    router.reserve_for_others = len(gw.api_keys) > 1
    app = gw.app()
    if cluster is not None:
        cluster.routes(app)
        gw.cluster = cluster
    host = cfg.host
    runner, site = await serve_app(app, host, cfg.port, ssl_context=ssl_context, max_connections=lim.max_connections,
                                   header_timeout=lim.header_timeout, keepalive_timeout=lim.keepalive_timeout,
                                   max_connections_per_address=lim.max_connections_per_address,
                                   write_timeout=lim.write_timeout)
    gw.guard = site.guard
    gw.metrics.http_stats = gw._http_stats
    if cluster is not None:
        own = "127.0.0.1" if host in ("0.0.0.0", "", None) else "[::1]" if host == "::" else host
        own = f"[{own}]" if ":" in own and not own.startswith("[") else own
        bound = runner.addresses[0][1] if runner.addresses else cfg.port
        cluster.local_base = f"{'wss' if ssl_context else 'ws'}://{own}:{bound}"
    log.info("gateway on %s/v1 serving %s over %d pipeline(s); %s; at most %d connections (%s per address), "
             "timeouts: header %g s, keep-alive %g s, write %g s", site.name, gw.model_name, len(pipes),
             f"{len(gw.api_keys)} API key(s) required, at most {lim.max_requests_per_key or 'unlimited'} "
             f"requests per key" if gw.api_keys else "no API key required",
             lim.max_connections, lim.max_connections_per_address or "any", lim.header_timeout,
             lim.keepalive_timeout, lim.write_timeout)
    if not gw.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the gateway listens on %s without API keys: anyone who can reach it can use it "
                    "(--api-key-file FILE or $MOLINK_API_KEY)", host)
    return runner
