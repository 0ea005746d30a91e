"""OpenAI-compatible HTTP gateway over one or more pipelines (replicas), least-loaded routing.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``, ``n`` choices, logprobs and grammars; chat with tools; the answers' shapes are
:mod:`molink_lite.serving.responses`), llama-server's ``POST /tokenize`` and ``POST /detokenize``,
``GET /v1/models``, ``GET /health``, ``GET /v1/stats`` (``?timeline=1`` adds each stage's
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
import copy
import hashlib
import logging
import os
import ssl
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..wire.auth import LinkKey
from ..wire.channel import RemoteError
from ..wire.media import plan_media, with_data
from ..wire.protocol import DETOKENIZE, GRAMMAR_CHECK, MAX_GRAMMAR_BYTES, ProtocolError
from .auth import ApiKeys
from .chat import BUILTIN_BY_ARCH, ChatTemplateError
from .config import GatewayConfig
from .metrics import CONTENT_TYPE_LATEST, Metrics, prefix_cache_summary
from .models import ModelTable, ServedModel, UnknownModel
from .grammar import GrammarError, grammar_for_request
from .images import DEFAULT_MAX_IMAGE_BYTES, ImageError, load_image, split_at_markers
from .http_limits import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUESTS_PER_KEY, ConnectionGuard, serve_app
from .openai_schema import (DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, MAX_BODY_BYTES,
                            MAX_BYTES_PER_TOKEN, ApiError, OutputOptions, StreamOptions, _boolean, _invalid, _json,
                            _short, _unsupported, check_common, check_completion_only, parse_chat_output,
                            parse_completion_output, parse_max_tokens, parse_messages, parse_prompt, parse_sampling,
                            parse_stop, parse_stream)
from .pipeline import Pipeline, PipelineError, RequestError
from .responses import CLIENT_GONE, Answer, collect, stream
from .router import Overloaded, Router
from .sequence import GenRequest, SeqState
from .tools import ToolError, plan_chat

log = logging.getLogger(__name__)
# /cluster: joining stages authenticate with the cluster secret; "/" and /web/: the dashboard's static files
# (no data: every request the page makes for data carries the API key)
_OPEN_PATHS = ("/health", "/cluster", "/")
# relayed stage links: a random per-stage token, and the stage link's own handshake runs inside the tunnel
_OPEN_PREFIXES = ("/relay/", "/relay-back/", "/web/")
# request keys (aiohttp >= 3.13 wants typed ones): which API key (its index); the stream's client went away is
# responses.CLIENT_GONE
_RequestKey: Any = getattr(web, "RequestKey", None)
_KEY_ID: Any = _RequestKey("molink_key_id", int) if _RequestKey else "molink_key_id"
_MODEL_KEY: Any = _RequestKey("molink_model", str) if _RequestKey else "molink_model"   # the model it named
_IDLE_KEY: Any = _RequestKey("molink_idle", object) if _RequestKey else "molink_idle"   # its IdleUnloader, held
# the first stage tokenizes at most this many characters per context token (stage/server.py)
STAGE_TOKENIZE_CHARS_PER_TOKEN = 32
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # counted in /metrics
GRAMMAR_CACHE = 256              # grammars whose verdict (compiles on the last stage, or why not) is remembered
MAX_DETOKENIZE = 1 << 17         # token ids in one /detokenize request
WEB_DIR = Path(__file__).with_name("web")
_WEB_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


class Gateway:
    """Answers OpenAI requests for one or more models (:class:`~.models.ModelTable`: a request's ``model`` picks
    one); each model's :class:`Router` picks its pipelines and replays requests when one fails."""

    def __init__(self, router: Optional[Router] = None, model_name: Optional[str] = None,
                 chat_template: Optional[str] = None, api_keys: Sequence[str] = (),
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 max_requests_per_key: int = DEFAULT_MAX_REQUESTS_PER_KEY, models: Sequence[ServedModel] = ()):
        if max_requests_per_key < 0:
            raise ValueError("max_requests_per_key must be >= 0 (0: no cap)")
        if not models:
            if router is None:
                raise ValueError("a Gateway needs a router or models")
            models = [ServedModel(model_name or "", router)]
        self.models = ModelTable(models)
        self.cluster: Any = None  # serving.cluster_set.ClusterSet when stages join this gateway
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
        self.metrics = Metrics(None)
        for m in self.models:
            self.metrics.add_model(m)
        self._warned_no_template = False
        self.allow_image_urls = False   # --allow-image-urls: fetch http(s) image_url parts (size and time limits)
        # grammar hash -> None (the last stage compiles it) or why not; most recently used last
        self._grammars: "OrderedDict[bytes, Optional[str]]" = OrderedDict()
        self._grammar_checks: Dict[bytes, "asyncio.Future[Optional[str]]"] = {}   # being checked now
        # the dashboard's files, read once: only these names are served (no paths from the request)
        self._web: Dict[str, Tuple[bytes, str]] = {
            f.name: (f.read_bytes(), _WEB_TYPES[f.suffix]) for f in sorted(WEB_DIR.glob("*"))
            if f.is_file() and f.suffix in _WEB_TYPES}

    @property
    def router(self) -> Router:
        """The first (default) model's router."""
        return self.models.default.router

    @property
    def pipelines(self) -> List[Pipeline]:
        """Every model's pipelines."""
        return [p for m in self.models for p in m.pipelines]

    @property
    def model_name(self) -> str:
        """The first (default) model's id."""
        return self.models.default.name

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._count, self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/", self.dashboard)
        app.router.add_get("/web/{name}", self.web_file)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        for m in self.models:
            for p in m.pipelines:
                p.start_background()
            self._bg.append(asyncio.ensure_future(m.router.expire_parked()))
            self._bg.append(asyncio.ensure_future(m.router.dispatch_forever()))
            if m.idle is not None:
                self._bg.append(asyncio.ensure_future(m.idle.watch()))

    async def _cleanup(self, app: web.Application) -> None:
        for t in self._bg:
            t.cancel()
        for p in self.pipelines:
            await p.close()
        for m in self.models:
            if m.idle is not None:
                await m.idle.close()

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
            self.metrics.client_gone(endpoint, request.get(_MODEL_KEY, ""))
            raise
        if request.get(CLIENT_GONE):
            self.metrics.client_gone(endpoint, request.get(_MODEL_KEY, ""))
        else:
            self.metrics.request_done(endpoint, resp.status, request.get(_MODEL_KEY, ""))
        return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await self._answer(request, handler)
        finally:
            idle = request.get(_IDLE_KEY)
            if idle is not None:   # the model it named may go idle from now on
                idle.end()

    async def _answer(self, request: web.Request, handler: Callable) -> web.StreamResponse:
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
    async def list_models(self, request: web.Request) -> web.Response:
        """Every served model with its state (serving, placing, no capacity, down, unloaded, loading), aliases
        and llama-server's ``meta`` (context per request, vocabulary, layers) once a pipeline has connected."""
        return _json({"object": "list", "data": [m.entry() for m in self.models]})

    def _status(self) -> str:
        """ok while every model serves (all pipelines up), degraded while some pipeline or model is down,
        unavailable when no model has a pipeline up. An idle model that was unloaded counts as serving."""
        states = [("ok" if m.state in ("unloaded", "loading") else m.router.status) for m in self.models]
        if all(x == "unavailable" for x in states):
            return "unavailable"
        return "ok" if all(x == "ok" for x in states) else "degraded"

    async def health(self, request: web.Request) -> web.Response:
        """200 while some pipeline is up ("ok" when all are, else "degraded"), 503 otherwise.

        Open, so without the API key it says only that (``{"status": ...}``): each pipeline's stage addresses
        (a relayed stage's includes its relay token, a tunnel to a stage behind NAT) and errors go only to
        a request with the key (or to anyone when no keys are configured: then the whole API is open)."""
        status = self._status()
        code = 200 if status != "unavailable" else 503
        if not self._authorized(request):
            return _json({"status": status}, code)
        pipes = [{**d, "model": m.name} for m in self.models for d in m.router.describe()]
        return _json({"status": status, "pipelines": pipes, "router": self.router.stats,
                      "queued": sum(m.router.queued for m in self.models),
                      "models": {m.name: {"state": m.state, "status": m.router.status, "router": m.router.stats,
                                          "queued": m.router.queued} for m in self.models}}, code)

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
        """Everything the dashboard and ``molink-lite status`` show: ``pipelines`` (every model's, each with its
        ``model``), ``models`` (one section per model: state, router, queue, placement) and the gateway's totals."""
        timeline = request.query.get("timeline") in ("1", "true")
        pipes = [(m, p, d) for m in self.models for p, d in zip(m.pipelines, m.router.describe())]
        out = await asyncio.gather(*(self._pipeline_stats(m, p, d, timeline) for m, p, d in pipes))
        models = []
        for m in self.models:
            state, why = m.state_detail()
            c = m.cluster
            models.append({"name": m.name, "aliases": list(m.aliases), "state": state, "state_detail": why,
                           "status": m.router.status, "router": m.router.stats, "queued": m.router.queued,
                           "pipelines": [p.name for p in m.pipelines], "metrics": self.metrics.recent(m.name),
                           "placement": c.plans if c is not None else None,
                           "replacements": c.replacements if c is not None else None,
                           "idle": m.idle.summary() if m.idle is not None else None})
        d0 = self.models.default
        return _json({"status": self._status(), "model": self.model_name, "router": self.router.stats,
                      "queued": sum(m.router.queued for m in self.models), "metrics": self.metrics.recent(),
                      "http": self._http_stats(), "pipelines": list(out), "models": models,
                      "placement": d0.cluster.plans if d0.cluster is not None else None,
                      "replacements": d0.cluster.replacements if d0.cluster is not None else None})

    async def _pipeline_stats(self, m: ServedModel, p: Pipeline, d: dict, timeline: bool) -> Dict[str, Any]:
        """One pipeline in ``/v1/stats``: scheduler, links, codec, speculation, prefix cache, stage counters."""
        entry: Dict[str, Any] = {**d, "model": m.name, "scheduler": p.stats, "prefill_chunk": p.prefill_chunk,
                                 "micro_batches": p.max_inflight, "lanes": p.lanes, "links": p.links,
                                 "codec": p.codec, "link_choice": (p.link_choice.summary()
                                                                   if p.link_choice is not None else None),
                                 "events": list(p.events),
                                 "n_ctx": p.n_ctx, "kv_reserved": p.kv_reserved, "max_seqs": p.max_seqs,
                                 "stage_info": [_stage_info(i) for i in p.infos] if p.healthy else [],
                                 "speculative": p.spec_summary(), "prefix_cache": prefix_cache_summary(p)}
        if p.healthy:
            try:
                entry["stages"] = await asyncio.wait_for(p.stage_stats(), 10)
                if not timeline:
                    for st in entry["stages"]:
                        st.pop("timeline", None)
            except asyncio.TimeoutError:
                entry["stages_error"] = "the stages did not answer within 10 s"
            except Exception as e:  # noqa: BLE001
                entry["stages_error"] = str(e)
        return entry

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
        if model is not None and not isinstance(model, str):
            raise _invalid("'model' must be a string", "model")
        check_common(body)
        return body

    def _model(self, request: web.Request, body: dict) -> ServedModel:
        """The model the request names (its id or an alias; none: the first model), marked as in use (an idle
        model that was unloaded starts loading now); 404 ``model_not_found`` for a name no model answers to."""
        try:
            m = self.models.resolve(body.get("model"))
        except UnknownModel as e:
            served = ", ".join(f"'{n}'" for n in e.served)
            raise ApiError(404, f"The model '{_short(e.name)}' does not exist; this server serves {served} "
                                f"(GET /v1/models lists them)", "model_not_found", param="model") from None
        request[_MODEL_KEY] = m.name
        if m.idle is not None and _IDLE_KEY not in request:
            m.idle.begin()   # ended by the _errors middleware, however the request ends
            request[_IDLE_KEY] = m.idle
        return m

    # ------------------------------------------------------------------ generation
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        m = self._model(request, body)
        check_completion_only(body)
        prompt = parse_prompt(body)
        opts = parse_stream(body)
        out = parse_completion_output(body)
        params = parse_sampling(body)
        max_tokens = parse_max_tokens(body, DEFAULT_COMPLETION_MAX_TOKENS, lo=0 if out.echo else 1)
        stop = parse_stop(body)
        ignore_eos = _boolean(body, "ignore_eos", False)   # llama.cpp server's: past end-of-generation
        grammar, param = self._grammar(body)
        if isinstance(prompt, str):
            tokens = await self._tokenize(m, prompt, add_special=True)
        else:
            n_vocab = int((await self._facts(m)).first["n_vocab"])
            if min(prompt) < 0 or max(prompt) >= n_vocab:
                raise _invalid(f"prompt token ids must be in 0..{n_vocab - 1}", "prompt")
            tokens = np.asarray(prompt, dtype=np.int32)
        echo_text = ""
        if out.echo:
            echo_text = prompt if isinstance(prompt, str) else await self._detokenize(m, tokens.tolist())
        await self._check_grammar(m, grammar, (), param)
        req = GenRequest(tokens, params, max_tokens, stop, ignore_eos=ignore_eos, owner=request.get(_KEY_ID),
                         grammar=grammar, logprobs=out.logprobs, echo=out.echo and out.logprobs >= 0)
        return await self._run(m, request, req, opts, out, chat=False, echo_text=echo_text)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        m = self._model(request, body)
        images: List[Tuple[str, str]] = []   # (url, the part's place in the request)
        messages = parse_messages(body, images)
        opts = parse_stream(body)
        out = parse_chat_output(body)
        if images and out.n > 1:
            raise _invalid("n > 1 with images is not supported yet", "n")
        params = parse_sampling(body)
        stop = parse_stop(body)
        ignore_eos = _boolean(body, "ignore_eos", False)
        parse_max_tokens(body, 1)  # checked now; the default depends on the prompt's length
        pipe = await self._facts(m)
        plan = self._plan_chat(pipe, body, messages)   # the template, tools and structured output
        grammar, triggers = plan.grammar, tuple(plan.triggers) if plan.grammar else ()
        param = "tools" if plan.parser is not None else _grammar_param(body)
        media = None
        if images:
            tokens, media = await self._tokenize_images(m, pipe, plan.prompt, plan.add_special, images)
        else:
            tokens = await self._tokenize(m, plan.prompt, add_special=plan.add_special)
        await self._check_grammar(m, grammar, triggers, param)
        max_default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, pipe.n_ctx - int(tokens.shape[0])))
        req = GenRequest(tokens, params, parse_max_tokens(body, max_default), stop + [s for s in plan.stop if s],
                         ignore_eos=ignore_eos, owner=request.get(_KEY_ID), grammar=grammar, triggers=triggers,
                         logprobs=out.logprobs, media=media)
        parser = plan.parser
        return await self._run(m, request, req, opts, out, chat=True,
                               new_parser=None if parser is None else lambda: copy.deepcopy(parser))

    async def _tokenize_images(self, m: ServedModel, pipe: Pipeline, prompt: str, add_special: bool,
                               images: List[Tuple[str, str]]) -> Tuple[np.ndarray, Any]:
        """A chat prompt with images (:mod:`.images`): the images loaded and checked, the text around them
        tokenized as mtmd does, each image encoded by the first stage's projector (its layout back), and the
        prompt's tokens (-1 at image rows) with its :class:`~molink_lite.wire.media.MediaPlan`."""
        vision = pipe.first.get("vision") if pipe.infos else None
        if not vision:
            raise _unsupported(f"the model '{_short(m.name)}' takes no images: its first stage has no vision "
                               "projector (start it with --mmproj)", images[0][1] + ".type")
        urls = [u for u, _ in images]
        max_bytes = min(DEFAULT_MAX_IMAGE_BYTES, int(vision.get("max_bytes") or DEFAULT_MAX_IMAGE_BYTES))
        try:
            datas = [await load_image(u, allow_remote=self.allow_image_urls, max_bytes=max_bytes) for u in urls]
            pieces = split_at_markers(prompt, len(urls))
        except ImageError as e:
            raise _invalid(_short(str(e), 300), "messages") from None
        async def piece(i: int, p: str) -> np.ndarray:
            return await self._tokenize(m, p, add_special=add_special and i == 0) if p else np.zeros(0, np.int32)

        try:   # the text pieces and the images at once: one round trip to the first stage, not one each
            got = await asyncio.gather(*(piece(i, p) for i, p in enumerate(pieces)),
                                       *(pipe.put_media(d) for d in datas))
            toks, layouts = list(got[:len(pieces)]), list(got[len(pieces):])
        except RemoteError as e:
            raise _invalid(_short(str(e), 300), "messages") from None
        except (PipelineError, ProtocolError, ConnectionError, asyncio.TimeoutError) as e:
            raise ApiError(503, f"the image could not be encoded: {_short(str(e), 300)}", "no_pipeline",
                           "service_unavailable") from None
        tokens, plan = plan_media(toks, layouts, bool(vision.get("mrope")), bool(vision.get("non_causal")))
        if int(tokens.shape[0]) >= pipe.n_ctx:
            raise ApiError(400, f"the prompt with its images ({tokens.shape[0]} tokens) cannot fit the context "
                                f"window ({pipe.n_ctx} tokens)", "context_length_exceeded")
        return tokens, with_data(plan, datas)

    async def _facts(self, m: ServedModel) -> Pipeline:
        """An up pipeline of model ``m`` to read its facts from (vocabulary, context, template); waits like a
        request does (an unloaded model first loads)."""
        try:
            if m.idle is not None:
                await m.idle.ready()
            return await m.router.wait_up()
        except PipelineError as e:
            raise ApiError(503, _short(str(e), 300), "no_pipeline", "service_unavailable") from None

    def _plan_chat(self, pipe: Pipeline, body: dict, messages: list) -> Any:
        """The chat's prompt, stops, grammar and tool-call parser (:func:`.tools.plan_chat`)."""
        info = pipe.first
        if not (self.chat_template or self.builtin_template or info.get("chat_template")) \
                and not self._warned_no_template:
            self._warned_no_template = True
            log.warning("the model has no chat template (a base model?): /v1/chat/completions formats messages "
                        "with llama.cpp's built-in '%s' template, which the model may not follow; use "
                        "/v1/completions, or pass --chat-template", BUILTIN_BY_ARCH.get(info.get("arch"), "chatml"))
        try:
            return plan_chat(body, messages, template=self.chat_template or info.get("chat_template"),
                             arch=info["arch"], bos=info.get("bos", ""), eos=info.get("eos", ""),
                             builtin=self.builtin_template)
        except ToolError as e:
            raise _invalid(_short(str(e), 500), getattr(e, "param", None) or "tools") from None
        except GrammarError as e:
            raise _invalid(_short(str(e), 500), getattr(e, "param", None) or _grammar_param(body)) from None
        except RecursionError:   # a schema the converter could not walk (its checks should have refused it)
            raise _invalid("the schema nests too deeply", _grammar_param(body)) from None
        except ChatTemplateError as e:
            raise _invalid(_short(str(e), 500), "messages") from None

    @staticmethod
    def _grammar(body: dict) -> Tuple[str, str]:
        """The request's grammar (GBNF from ``response_format``, ``json_schema`` or ``grammar``; "" for none) and
        the field it came from."""
        param = _grammar_param(body)
        try:
            g = grammar_for_request(body)
        except GrammarError as e:
            raise _invalid(_short(str(e), 500), getattr(e, "param", None) or param) from None
        except RecursionError:   # a schema the converter could not walk (its checks should have refused it)
            raise _invalid("the schema nests too deeply", param) from None
        return g or "", param

    async def _check_grammar(self, m: ServedModel, grammar: str, triggers: Tuple[str, ...], param: str) -> None:
        """A 400 unless the last stage's llama.cpp compiles ``grammar`` (its verdict is cached by the grammar's hash,
        and a check already asked for is shared)."""
        if not grammar:
            return
        if len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
            raise _invalid(f"the grammar is larger than {MAX_GRAMMAR_BYTES} bytes of GBNF", param)
        key = hashlib.sha256(orjson.dumps([m.name, grammar, list(triggers)])).digest()
        if key in self._grammars:
            self._grammars.move_to_end(key)
            problem = self._grammars[key]
        else:
            fut = self._grammar_checks.get(key)
            if fut is None:
                fut = asyncio.ensure_future(self._ask_grammar(m, grammar, triggers))
                self._grammar_checks[key] = fut
                fut.add_done_callback(lambda f, k=key: self._grammar_done(k, f))
            problem = await asyncio.shield(fut)
        if problem is not None:
            raise _invalid(f"the grammar does not compile: {_short(problem, 500)}", param)

    def _grammar_done(self, key: bytes, fut: "asyncio.Future[Optional[str]]") -> None:
        self._grammar_checks.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return   # no verdict (the stage was gone): ask again next time
        self._grammars[key] = fut.result()
        while len(self._grammars) > GRAMMAR_CACHE:
            self._grammars.popitem(last=False)

    async def _ask_grammar(self, m: ServedModel, grammar: str, triggers: Tuple[str, ...]) -> Optional[str]:
        """The last stage's verdict on a grammar: None when it compiles, else why not; ApiError 503 when no stage
        could say."""
        meta: Dict[str, Any] = {"type": GRAMMAR_CHECK, "grammar": grammar}
        if triggers:
            meta["triggers"] = list(triggers)
        pipe = await self._facts(m)
        try:
            reply = await pipe.chain.request_last(meta, timeout=60)
        except RemoteError as e:
            if e.meta.get("code") == "grammar":   # llama.cpp (or the stage's guards) refused this grammar
                return str(e) or "refused"
            problem = str(e)
        except (PipelineError, RuntimeError, ConnectionError, asyncio.TimeoutError) as e:
            problem = str(e) or type(e).__name__
        else:
            if reply.get("type") == "grammar_ok":
                return None
            problem = f"unexpected reply {_short(str(reply.get('type')))}"
        raise ApiError(503, f"the grammar could not be checked: {_short(problem, 300)}", "no_pipeline",
                       "service_unavailable")

    async def _tokenize(self, m: ServedModel, text: str, add_special: bool) -> np.ndarray:
        pipe = await self._facts(m)
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
            return await m.router.tokenize(text, add_special=add_special)
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

    async def _detokenize(self, m: ServedModel, tokens: List[int]) -> str:
        """Text of token ids (special tokens written out), from the last stage's vocabulary."""
        reply = await self._ask_vocab(m, {"type": DETOKENIZE, "tokens": tokens, "special": True}, "detokenization")
        return str(reply.get("text", ""))

    async def _ask_vocab(self, m: ServedModel, meta: dict, what: str) -> dict:
        pipe = await self._facts(m)
        try:
            return await pipe.chain.request_last(meta, timeout=60)
        except (RemoteError, PipelineError, RuntimeError, ConnectionError, asyncio.TimeoutError) as e:
            raise ApiError(503, f"{what} failed: {_short(str(e), 300)}", "no_pipeline",
                           "service_unavailable") from None

    async def _run(self, m: ServedModel, request: web.Request, req: GenRequest, opts: StreamOptions, out: OutputOptions,
                   chat: bool, echo_text: str = "", new_parser: Optional[Callable[[], Any]] = None
                   ) -> web.StreamResponse:
        """Submit the request (``out.n`` choices sharing one prefill) and answer with its choices, whole or
        streamed; whatever happens, its sequences are freed when the answer ends."""
        seqs: List[SeqState] = []
        try:
            if req.max_tokens == 0 and not req.echo:   # echo alone: the prompt is the whole answer
                seqs = [SeqState(req=req, events=asyncio.Queue()) for _ in range(out.n)]
                for s in seqs:
                    s.end("length")
            elif out.n == 1:
                seqs = [m.router.submit(req)]
            else:
                seqs = list(m.router.submit_group(req, out.n))
        except RequestError as e:
            raise ApiError(400, str(e), "context_length_exceeded" if "context" in str(e) else "invalid_value") from None
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", "rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except PipelineError as e:   # no pipeline at all (stages still joining)
            raise ApiError(503, _short(str(e), 300), "no_pipeline", "service_unavailable") from None
        self.metrics.prompt(m.name, int(req.prompt.shape[0]))
        answer = Answer(chat, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()),
                        m.name, out, int(req.prompt.shape[0]), echo_text, new_parser)
        try:
            if opts.stream:
                return await stream(request, answer, seqs, opts)
            return await collect(answer, seqs)
        finally:
            for s in seqs:
                if not s.finished:
                    m.router.cancel(s)
                m.router.release(s)

    # ------------------------------------------------------------------ llama-server's tokenizer endpoints
    async def tokenize(self, request: web.Request) -> web.Response:
        """``{"content", "add_special"?, "with_pieces"?}`` -> ``{"tokens": [id, ...]}``, or with pieces
        ``[{"id", "piece"}]`` (a piece that is not whole UTF-8 is its list of bytes), as llama-server answers."""
        body = await self._body(request)
        m = self._model(request, body)
        content = body.get("content")
        if not isinstance(content, str):
            raise _invalid("'content' must be a string", "content")
        add_special = _boolean(body, "add_special", False)
        with_pieces = _boolean(body, "with_pieces", False)
        if not _boolean(body, "parse_special", True):
            raise _unsupported("'parse_special': false is not supported (special tokens in the text are parsed)",
                               "parse_special")
        tokens = (await self._tokenize(m, content, add_special=add_special)).tolist()
        if not with_pieces:
            return _json({"tokens": tokens})
        pieces = await self._pieces(m, tokens)
        out = []
        for t, b in zip(tokens, pieces):
            try:
                piece: Any = b.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(b)
            out.append({"id": t, "piece": piece})
        return _json({"tokens": out})

    async def _pieces(self, m: ServedModel, tokens: List[int]) -> List[bytes]:
        """Each token's bytes (special tokens written out), from the last stage's vocabulary."""
        if not tokens:
            return []
        reply = await self._ask_vocab(m, {"type": DETOKENIZE, "tokens": tokens, "pieces": True}, "detokenization")
        pieces = reply.get("pieces")
        if not isinstance(pieces, list) or len(pieces) != len(tokens):
            raise ApiError(503, "the stage did not answer the tokens' pieces", "no_pipeline", "service_unavailable")
        return [bytes.fromhex(p) for p in pieces]

    async def detokenize(self, request: web.Request) -> web.Response:
        """``{"tokens": [id, ...]}`` -> ``{"content": text}``, as llama-server answers."""
        body = await self._body(request)
        m = self._model(request, body)
        tokens = body.get("tokens")
        msg = f"'tokens' must be a list of at most {MAX_DETOKENIZE} token ids"
        if not isinstance(tokens, list) or len(tokens) > MAX_DETOKENIZE:
            raise _invalid(msg, "tokens")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
            raise _invalid(msg, "tokens")
        if not tokens:
            return _json({"content": ""})
        n_vocab = int((await self._facts(m)).first["n_vocab"])
        if min(tokens) < 0 or max(tokens) >= n_vocab:
            raise _invalid(f"token ids must be in 0..{n_vocab - 1}", "tokens")
        return _json({"content": await self._detokenize(m, tokens)})


def _grammar_param(body: dict) -> str:
    """The field a request's grammar came from (what a 400 about it names)."""
    return "grammar" if body.get("grammar") is not None else (
        "json_schema" if body.get("json_schema") is not None else "response_format")


def _stage_info(info: dict) -> dict:
    """What the dashboard shows of a stage (its hello): address, host, layers, backend, offload, sizes."""
    keys = ("url", "host", "layer_start", "layer_stop", "n_layer_total", "backend", "n_gpu_layers", "model_bytes",
            "n_ctx", "max_seqs", "arch", "codec", "stage_output")
    return {k: info.get(k) for k in keys}


async def _served_models(cfg: GatewayConfig, key: Optional[LinkKey], drafter: Optional[Any],
                         tls_fingerprint: str) -> Tuple[List[ServedModel], Any]:
    """The models of ``cfg``, each with its router, its ``--pipeline`` replicas connected and, in join mode, its
    cluster (several: one :class:`~.cluster_set.ClusterSet` takes the joins); returns (models, cluster or set).

    Order: the join models in ``--model`` order, then pipeline tags in order of first use. Untagged pipelines
    serve the first model; ``--model-name`` names the first model; ``--draft-model`` drafts for the first model
    (a draft must share its vocabulary). ``--alias ALIAS=NAME`` adds names once every model's name is known."""
    from .config import ConfigError

    groups: Dict[str, List[Tuple[str, ...]]] = {}
    for urls, tag in zip(cfg.pipelines, cfg.pipeline_models):
        groups.setdefault(tag, []).append(urls)
    specs = list(cfg.join.models) if cfg.join.model else []
    if not specs and "" not in groups and groups:   # only tagged pipelines: the first tag is the first model
        first = next(iter(groups))
        groups[""] = groups.pop(first) + groups.pop("", [])
        names_first: Optional[str] = first
    else:
        names_first = None
    models: List[ServedModel] = []
    clusters: List[Any] = []

    def pipes_for(urls_list: Sequence[Tuple[str, ...]], prefix: str, first_model: bool) -> List[Pipeline]:
        kw = cfg.pipeline.pipeline_kwargs(key=key, drafter=drafter if first_model else None)
        return [Pipeline(urls, **{**kw, "name": f"{prefix}p{i}"}) for i, urls in enumerate(urls_list)]

    def router_for(pipes: List[Pipeline]) -> Router:
        return Router(pipes, recover_timeout=cfg.recover_timeout, max_queue=cfg.max_queue)

    all_pipes: List[Pipeline] = []
    if specs:
        from ..model.split import read_model_info
        from .cluster import Cluster

        j = cfg.join
        for i, spec in enumerate(specs):
            name = spec.name or (cfg.model_name if i == 0 and cfg.model_name else read_model_info(spec.path).name)
            # --pipeline NAME=... of this model: replicas started by hand, next to the joined ones
            pipes = pipes_for(groups.get("", []) if i == 0 else [], "", i == 0)
            pipes += pipes_for(groups.pop(name, []) if name else [], f"{name}/", i == 0)
            all_pipes += pipes
            router = router_for(pipes)
            joined_kw = {k: v for k, v in cfg.pipeline.pipeline_kwargs(drafter=drafter if i == 0 else None).items()
                         if k != "codec"}
            c = Cluster(spec.path, router, key, n_ctx=j.n_ctx, n_seqs=j.n_seqs, codec=cfg.pipeline.codec,
                        settle=j.settle, pipeline_kw=joined_kw, cert_fp=tls_fingerprint, ready_timeout=j.ready_timeout,
                        rejoin_grace=j.rejoin_grace, mmproj=j.mmproj)
            if len(specs) > 1:
                c.pipe_prefix = f"{name}/"
            clusters.append(c)
            models.append(ServedModel(name, router, aliases=spec.aliases, cluster=c))
    elif "" in groups:
        pipes = pipes_for(groups[""], "", True)
        all_pipes += pipes
        models.append(ServedModel(names_first or cfg.model_name or "", router_for(pipes)))
    for tag, urls_list in groups.items():
        if tag == "":
            continue
        pipes = pipes_for(urls_list, f"{tag}/", False)
        all_pipes += pipes
        models.append(ServedModel(tag, router_for(pipes)))
    await asyncio.gather(*(p.connect(timeout=cfg.connect_timeout) for p in all_pipes))
    if clusters:   # each model's memory model (reads its GGUF), before joins are weighed against it
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, c._cost_model) for c in clusters))
    for alias, target in cfg.aliases:
        m = next((x for x in models if x.name == target), None)
        if m is None:
            raise ConfigError(f"--alias {alias}={target}: no model is called {target!r} (models: "
                              f"{', '.join(x.name for x in models)})")
        m.aliases += (alias,)
    try:
        ModelTable(models)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cluster: Any = None
    if len(clusters) == 1:
        cluster = clusters[0]
    elif clusters:
        from .cluster_set import ClusterSet

        cluster = ClusterSet(clusters)
    return models, cluster


async def start_gateway(cfg: GatewayConfig, *, key: Optional[LinkKey] = None, api_keys: Sequence[str] = (),
                        drafter: Optional[Any] = None,
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
    if drafter is not None:
        log.info("draft model %s (%d tokens): speculative drafts come from it (for the first model)", drafter.path,
                 drafter.n_vocab)
    models, cluster = await _served_models(cfg, key, drafter, tls_fingerprint)
    gw = Gateway(chat_template=cfg.chat_template, api_keys=api_keys, body_timeout=lim.body_timeout,
                 max_requests_per_key=lim.max_requests_per_key, models=models)
    gw.allow_image_urls = cfg.image_urls
    for m in gw.models:
        # several key holders share the pipelines: one running there always leaves room for a request of another
        m.router.reserve_for_others = len(gw.api_keys) > 1
        if cfg.idle_unload:
            from .idle import IdleUnloader

            m.idle = IdleUnloader(m, cfg.idle_unload, load_timeout=cfg.recover_timeout + cfg.connect_timeout)
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
             "timeouts: header %g s, keep-alive %g s, write %g s", site.name,
             ", ".join(f"{m.name} ({len(m.pipelines)})" for m in gw.models), len(gw.pipelines),
             f"{len(gw.api_keys)} API key(s) required, at most {lim.max_requests_per_key or 'unlimited'} "
             f"requests per key" if gw.api_keys else "no API key required",
             lim.max_connections, lim.max_connections_per_address or "any", lim.header_timeout,
             lim.keepalive_timeout, lim.write_timeout)
    if not gw.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the gateway listens on %s without API keys: anyone who can reach it can use it "
                    "(--api-key-file FILE or $MOLINK_API_KEY)", host)
    return runner
