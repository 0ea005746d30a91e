"""OpenAI-compatible HTTP gateway over one or more pipelines (replicas), least-loaded routing.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``), ``GET /v1/models``, ``GET /health``, ``GET /v1/stats`` (``?timeline=1`` adds each stage's
recent step start/end times). Errors use
OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 for bad input,
404 for an unknown model, 503 when no pipeline can take the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import orjson
from aiohttp import web

from .chat import ChatPrompt, ChatTemplateError, render_chat
from ..stage.sampling import SamplingError, SamplingParams
from .scheduler import Pipeline, PipelineError, RequestError
from .sequence import Event, GenRequest, SeqState

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 1024         # chat: until the model stops, capped (OpenAI: unlimited)
MAX_BODY_BYTES = 8 * 1024 * 1024


class ApiError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, etype: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.etype = status, message, code, etype

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.etype, "code": self.code, "param": None}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


class Gateway:
    """Routes OpenAI requests to the least-loaded healthy pipeline."""

    def __init__(self, pipelines: Sequence[Pipeline], model_name: Optional[str] = None,
                 chat_template: Optional[str] = None):
        self.pipelines = list(pipelines)
        self._model_name = model_name
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
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
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
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status >= 400:
                return ApiError(e.status, e.reason or "error", etype="invalid_request_error").response()
            raise
        except Exception as e:  # noqa: BLE001
            log.exception("internal error")
            return ApiError(500, f"internal error: {e}", etype="server_error").response()

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
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "unsupported_parameter")
        return body

    def _sampling(self, body: dict) -> SamplingParams:
        def num(key: str, default: Any, kind=float):
            v = body.get(key, default)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ApiError(400, f"'{key}' must be a number", "invalid_value")
            return kind(v)
        try:
            return SamplingParams(
                temperature=num("temperature", 1.0), top_p=num("top_p", 1.0), top_k=num("top_k", 0, int),
                min_p=num("min_p", 0.0), presence_penalty=num("presence_penalty", 0.0),
                frequency_penalty=num("frequency_penalty", 0.0),
                repetition_penalty=num("repetition_penalty", num("repeat_penalty", 1.0)),
                seed=num("seed", None, int) if body.get("seed") is not None else None,
            ).validate()
        except SamplingError as e:
            raise ApiError(400, str(e), "invalid_value") from None

    @staticmethod
    def _ignore_eos(body: dict) -> bool:
        """llama.cpp server's ``ignore_eos``: generate max_tokens even past end-of-generation (benchmarks)."""
        v = body.get("ignore_eos", False)
        if not isinstance(v, bool):
            raise ApiError(400, "'ignore_eos' must be a boolean", "invalid_value")
        return v

    @staticmethod
    def _max_tokens(body: dict, default: int) -> int:
        v = body.get("max_completion_tokens", body.get("max_tokens"))
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ApiError(400, "'max_tokens' must be an integer", "invalid_value")
        if v < 1:
            raise ApiError(400, f"'max_tokens' must be at least 1, got {v}", "invalid_value")
        return v

    @staticmethod
    def _stop(body: dict) -> List[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise ApiError(400, "'stop' must be a non-empty string or a list of up to 16 of them", "invalid_value")
        return stop

    def _pick(self) -> Pipeline:
        healthy = [p for p in self.pipelines if p.healthy]
        if not healthy:
            errs = "; ".join(f"{p.name}: {p.error}" for p in self.pipelines)
            raise ApiError(503, f"no pipeline is available ({errs})", "no_pipeline", "service_unavailable")
        return min(healthy, key=lambda p: p.load / max(1, p.max_seqs))

    # ------------------------------------------------------------------ generation
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        pipe = self._pick()
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "'prompt' is empty", "invalid_value")
            tokens = await self._tokenize(pipe, prompt, add_special=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            tokens = np.asarray(prompt, dtype=np.int64)
            if tokens.min() < 0 or tokens.max() >= int(pipe.first["n_vocab"]):
                raise ApiError(400, f"prompt token ids must be in 0..{pipe.first['n_vocab'] - 1}", "invalid_value")
            tokens = tokens.astype(np.int32)
        else:
            raise ApiError(400, "'prompt' must be a string, a list with one string, or a list of token ids", "invalid_value")
        for unsupported in ("logprobs", "echo", "suffix", "best_of"):
            if body.get(unsupported) not in (None, False, 0, 1) or (unsupported == "echo" and body.get("echo")):
                raise ApiError(400, f"'{unsupported}' is not supported", "unsupported_parameter")
        req = GenRequest(tokens, self._sampling(body), self._max_tokens(body, DEFAULT_COMPLETION_MAX_TOKENS),
                         self._stop(body), ignore_eos=self._ignore_eos(body))
        return await self._run(request, pipe, req, body, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "invalid_value")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a 'role' string and 'content'", "invalid_value")
            c = m.get("content")
            if isinstance(c, list):  # OpenAI content parts: keep the text ones
                m["content"] = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
            elif not isinstance(c, str):
                raise ApiError(400, "message 'content' must be a string or a list of text parts", "invalid_value")
        pipe = self._pick()
        chat_prompt = self._apply_template(pipe, messages)
        stop_extra = chat_prompt.stop
        tokens = await self._tokenize(pipe, chat_prompt.text, add_special=chat_prompt.add_special)
        max_default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, pipe.n_ctx - int(tokens.shape[0])))
        stop = self._stop(body) + [s for s in stop_extra if s]
        req = GenRequest(tokens, self._sampling(body), self._max_tokens(body, max_default), stop,
                         ignore_eos=self._ignore_eos(body))
        return await self._run(request, pipe, req, body, chat=True)

    def _apply_template(self, pipe: Pipeline, messages: list) -> ChatPrompt:
        info = pipe.first
        try:
            return render_chat(messages, template=self.chat_template or info.get("chat_template"), arch=info["arch"],
                               bos=info.get("bos", ""), eos=info.get("eos", ""), builtin=self.builtin_template)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "invalid_value") from None

    async def _tokenize(self, pipe: Pipeline, text: str, add_special: bool) -> np.ndarray:
        try:
            return await pipe.tokenize(text, add_special=add_special)
        except PipelineError as e:
            raise ApiError(503, str(e), "no_pipeline", "service_unavailable") from None

    async def _run(self, request: web.Request, pipe: Pipeline, req: GenRequest, body: dict,
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
            if body.get("stream"):
                return await self._stream(request, seq, rid, created, chat, body)
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
                      body: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
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
                if (body.get("stream_options") or {}).get("include_usage"):
                    u = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                         "usage": self._usage(seq)}
                    await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start_gateway(pipeline_urls: Sequence[Sequence[str]], *, host: str = "127.0.0.1", port: int = 8000,
                        codec: str = "f16", max_inflight: Optional[int] = None, prefill_chunk: Optional[int] = None,
                        max_batch_tokens: int = 512, connect_timeout: float = 120.0,
                        model_name: Optional[str] = None, chat_template: Optional[str] = None) -> web.AppRunner:
    """Connect every pipeline (failing fast on a bad chain) and start serving HTTP."""
    pipes = [Pipeline(urls, codec=codec, max_inflight=max_inflight, prefill_chunk=prefill_chunk,
                      max_batch_tokens=max_batch_tokens, name=f"p{i}") for i, urls in enumerate(pipeline_urls)]
    await asyncio.gather(*(p.connect(timeout=connect_timeout) for p in pipes))
    gw = Gateway(pipes, model_name, chat_template)
    runner = web.AppRunner(gw.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("gateway on http://%s:%d/v1 serving %s over %d pipeline(s)", host, port, gw.model_name, len(pipes))
    return runner
