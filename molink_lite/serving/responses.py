"""OpenAI's response shapes: whole answers and SSE chunks of /v1/completions and /v1/chat/completions.

The gateway parses a request and submits its sequences (one per choice); :func:`collect` and :func:`stream` turn
their :class:`~molink_lite.serving.sequence.Event` queues into what OpenAI clients read:

* ``choices``, each with its ``index`` (``n`` > 1: one sequence per choice; a stream interleaves them);
* completions' ``logprobs``: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``, the
  prompt's first (``echo``: its text and, with logprobs, its tokens' logprobs; the first one is null);
* chat's ``logprobs``: ``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``;
* tool calls (chat with ``tools``): the plan's parser takes the text apart; ``message.tool_calls`` (``content``
  null when the message is only calls), ``finish_reason: "tool_calls"``; streamed as ``delta.tool_calls``
  ``[{index, id, type, function: {name, arguments}}]``;
* ``usage``: the prompt counted once for all choices (they shared its prefill).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import aiohttp
import orjson
from aiohttp import web

from .http_limits import bound_send_buffer
from .openai_schema import ApiError, OutputOptions, StreamOptions, _json
from .sequence import Event, SeqState, TokenLogprob

log = logging.getLogger(__name__)
# request keys (aiohttp >= 3.13 wants typed ones): the stream's client went away
_RequestKey: Any = getattr(web, "RequestKey", None)
CLIENT_GONE: Any = _RequestKey("molink_client_gone", bool) if _RequestKey else "molink_client_gone"
# OpenAI's stand-in for a token the model gives no probability at all (-inf is not JSON)
MIN_LOGPROB = -9999.0
_LAST = ("done", "error")   # a choice's last event


@dataclass
class Answer:
    """What one request's answer is made of, besides its sequences' events."""

    chat: bool
    rid: str
    created: int
    model: str
    opts: OutputOptions
    prompt_tokens: int
    echo_text: str = ""                                   # completions with echo: the prompt, first in every choice
    new_parser: Optional[Callable[[], Any]] = None         # chat with tools: a ToolCallParser per choice

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


# ---------------------------------------------------------------------- logprobs
def _lp(v: Optional[float]) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else MIN_LOGPROB


def token_str(b: bytes) -> str:
    """A token's text as OpenAI shows it (``bytes`` carries the exact bytes; a partial UTF-8 character is U+FFFD)."""
    return b.decode("utf-8", "replace")


class _Offsets:
    """Character offsets of consecutive tokens in their decoded text (completions' ``text_offset``)."""

    def __init__(self, base: int = 0):
        self.pos = base
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, b: bytes) -> int:
        at = self.pos
        self.pos += len(self._dec.decode(b))
        return at


def completion_logprobs(lps: Sequence[TokenLogprob], offsets: _Offsets) -> Dict[str, list]:
    """Completions' ``logprobs`` for these tokens: tokens, token_logprobs, top_logprobs (the token itself included,
    as OpenAI's and vLLM's are; null for a prompt's first token) and text_offset."""
    out: Dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in lps:
        out["tokens"].append(token_str(t.bytes))
        out["token_logprobs"].append(_lp(t.logprob))
        if t.logprob is None:
            out["top_logprobs"].append(None)
        else:
            top: Dict[str, Optional[float]] = {}
            for _, b, v in t.top:
                top.setdefault(token_str(b), _lp(v))
            top.setdefault(token_str(t.bytes), _lp(t.logprob))
            out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.take(t.bytes))
    return out


def _merge_completion(into: Optional[Dict[str, list]], more: Dict[str, list]) -> Dict[str, list]:
    if into is None:
        return more
    for k, v in more.items():
        into[k].extend(v)
    return into


def chat_logprobs(lps: Sequence[TokenLogprob]) -> List[dict]:
    """Chat's ``logprobs.content`` entries for these tokens."""
    return [{"token": token_str(t.bytes), "logprob": _lp(t.logprob), "bytes": list(t.bytes),
             "top_logprobs": [{"token": token_str(b), "logprob": _lp(v), "bytes": list(b)} for _, b, v in t.top]}
            for t in lps]


# ---------------------------------------------------------------------- one choice
def _tool_call(index: int, call: Any, streamed: bool) -> dict:
    d = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": index, **d} if streamed else d


@dataclass
class _Choice:
    """One choice being answered: its text, logprobs and tool calls so far."""

    index: int
    answer: Answer
    parser: Any = None
    parts: List[str] = field(default_factory=list)
    calls: Dict[int, Any] = field(default_factory=dict)
    chat_lps: List[dict] = field(default_factory=list)
    comp_lps: Optional[Dict[str, list]] = None
    offsets: _Offsets = field(default_factory=_Offsets)
    finish_reason: Optional[str] = None
    echoed: bool = False

    def __post_init__(self) -> None:
        a = self.answer
        self.offsets = _Offsets(len(a.echo_text))
        if a.new_parser is not None:
            self.parser = a.new_parser()

    @property
    def echo_waits(self) -> bool:
        """The prompt goes first with its logprobs: they come as the choice's first event."""
        return self.answer.opts.echo and self.answer.opts.logprobs >= 0 and not self.echoed

    def echo(self, entries: Optional[List[TokenLogprob]] = None) -> Tuple[str, Optional[Dict[str, list]]]:
        """The prompt's text (and, with logprobs, ``entries``: its tokens'), first in a completion with ``echo``."""
        a = self.answer
        self.echoed = True
        lps = None
        if a.opts.logprobs >= 0:
            lps = completion_logprobs(entries or [], _Offsets())
            self.comp_lps = _merge_completion(self.comp_lps, {k: list(v) for k, v in lps.items()})
        self.parts.append(a.echo_text)
        return a.echo_text, lps

    def take(self, text: str, lps: Optional[List[TokenLogprob]]) -> Tuple[str, List[Tuple[int, Any]], Any]:
        """New text of this choice: (content to show, new tool calls, logprobs of its tokens in this API's shape)."""
        calls: List[Tuple[int, Any]] = []
        if self.parser is not None and text:
            text, calls = self.parser.feed(text)
        return text, self._record(text, calls), self._logprobs(lps)

    def finish(self, reason: Optional[str]) -> Tuple[str, List[Tuple[int, Any]]]:
        """The choice ended: what the tool-call parser still held; the finish reason (``tool_calls`` when the
        model called tools and stopped by itself)."""
        text, calls = ("", [])
        if self.parser is not None:
            text, calls = self.parser.finish()
        calls = self._record(text, calls)
        self.finish_reason = "tool_calls" if self.calls and reason == "stop" else reason
        return text, calls

    def _record(self, text: str, calls: List[Tuple[int, Any]]) -> List[Tuple[int, Any]]:
        if text:
            self.parts.append(text)
        for i, c in calls:
            self.calls[i] = c
        return calls

    def _logprobs(self, lps: Optional[List[TokenLogprob]]) -> Any:
        if self.answer.opts.logprobs < 0 or not lps:
            return None
        if self.answer.chat:
            got = chat_logprobs(lps)
            self.chat_lps.extend(got)
            return {"content": got}
        got2 = completion_logprobs(lps, self.offsets)
        self.comp_lps = _merge_completion(self.comp_lps, {k: list(v) for k, v in got2.items()})
        return got2

    def whole(self) -> dict:
        """This choice in a non-streamed answer."""
        text = "".join(self.parts)
        a = self.answer
        if a.chat:
            msg: Dict[str, Any] = {"role": "assistant", "content": text}
            if self.calls:
                msg["tool_calls"] = [_tool_call(i, self.calls[i], False) for i in sorted(self.calls)]
                if not text.strip():
                    msg["content"] = None
            lps = {"content": self.chat_lps} if a.opts.logprobs >= 0 else None
            return {"index": self.index, "message": msg, "finish_reason": self.finish_reason, "logprobs": lps}
        lps = None
        if a.opts.logprobs >= 0:
            lps = self.comp_lps or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return {"index": self.index, "text": text, "finish_reason": self.finish_reason, "logprobs": lps}


def usage(answer: Answer, seqs: Sequence[SeqState]) -> dict:
    """Token counts: the prompt once (the choices shared its prefill), every choice's generated tokens, and (as
    OpenAI's ``prompt_tokens_details.cached_tokens``) the prompt tokens the prefix cache supplied."""
    p = answer.prompt_tokens
    c = sum(len(s.generated) for s in seqs)
    cached = min(p, max((s.reuse_len for s in seqs), default=0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def events(seqs: Sequence[SeqState]) -> AsyncIterator[Tuple[int, Event]]:
    """Every choice's events as they come, tagged with the choice's index (in order within one choice); a choice's
    stream ends with its ``done`` or ``error`` event."""
    if len(seqs) == 1:
        while True:
            ev = await seqs[0].events.get()
            yield 0, ev
            if ev.kind in _LAST:
                return
    gets: Dict[int, "asyncio.Future[Event]"] = {i: asyncio.ensure_future(s.events.get()) for i, s in enumerate(seqs)}
    try:
        while gets:
            await asyncio.wait(list(gets.values()), return_when=asyncio.FIRST_COMPLETED)
            for i in sorted(i for i, f in gets.items() if f.done()):
                ev = gets[i].result()
                if ev.kind in _LAST:
                    del gets[i]
                else:
                    gets[i] = asyncio.ensure_future(seqs[i].events.get())
                yield i, ev
    finally:
        for f in gets.values():
            f.cancel()


# ---------------------------------------------------------------------- whole answers
async def collect(answer: Answer, seqs: Sequence[SeqState]) -> web.Response:
    """Wait for every choice to end; one JSON answer (a 503 if a choice failed)."""
    choices = [_Choice(i, answer) for i in range(len(seqs))]
    async for i, ev in events(seqs):
        c = choices[i]
        if answer.opts.echo and not c.echoed:
            c.echo(ev.logprobs if ev.kind == "prompt_logprobs" else None)
        if ev.kind == "prompt_logprobs":
            continue
        if ev.kind == "text":
            c.take(ev.text, ev.logprobs)
        elif ev.kind == "error":
            raise ApiError(503, ev.message, "pipeline_error", "server_error")
        else:
            c.finish(ev.finish_reason)
    return _json({"id": answer.rid, "object": answer.object, "created": answer.created, "model": answer.model,
                  "choices": [c.whole() for c in choices], "usage": usage(answer, seqs)})


# ---------------------------------------------------------------------- streams
def _chunk(answer: Answer, choice: dict) -> bytes:
    return b"data: " + orjson.dumps({"id": answer.rid, "object": answer.chunk_object, "created": answer.created,
                                     "model": answer.model, "choices": [choice]}) + b"\n\n"


def _piece(answer: Answer, index: int, text: str, calls: List[Tuple[int, Any]], lps: Any,
           finish: Optional[str], role: bool = False) -> Any:
    """One choice's part of a chunk, or None when there is nothing to say."""
    if answer.chat:
        delta: Dict[str, Any] = {}
        if role:
            delta.update(role="assistant", content="")
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = [_tool_call(i, c, True) for i, c in calls]
        if not delta and lps is None and finish is None and not role:
            return None
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lps}
    if not text and lps is None and finish is None:
        return None
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": lps}


async def stream(request: web.Request, answer: Answer, seqs: Sequence[SeqState],
                 opts: StreamOptions) -> web.StreamResponse:
    """Server-sent events: each choice's text (tool calls, logprobs) as it comes, its finish, the usage chunk when
    asked, then ``[DONE]``. A client that goes away ends it quietly (the caller frees the sequences)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    choices = [_Choice(i, answer) for i in range(len(seqs))]
    # a client that stops reading: its unread chunks fill a bounded buffer, then the write timeout cuts the
    # stream (http_limits) and the caller frees its sequences; meanwhile only this handler waits, never the loop
    bound_send_buffer(request.transport)
    try:
        await resp.prepare(request)
        for c in choices:
            if answer.chat:
                await resp.write(_chunk(answer, _piece(answer, c.index, "", [], None, None, role=True)))
            elif answer.opts.echo and not c.echo_waits:
                text, lps = c.echo()
                await resp.write(_chunk(answer, _piece(answer, c.index, text, [], lps, None)))
        failed = False
        async for i, ev in events(seqs):
            c = choices[i]
            if answer.opts.echo and not c.echoed and ev.kind != "error":
                text, lps = c.echo(ev.logprobs if ev.kind == "prompt_logprobs" else None)
                await resp.write(_chunk(answer, _piece(answer, i, text, [], lps, None)))
            if ev.kind == "prompt_logprobs":
                continue
            if ev.kind == "text":
                piece = _piece(answer, i, *c.take(ev.text, ev.logprobs), None)
            elif ev.kind == "error":
                err = {"error": {"message": ev.message, "type": "server_error", "code": "pipeline_error"}}
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
                failed = True
                break
            else:
                text, calls = c.finish(ev.finish_reason)
                piece = _piece(answer, i, text, calls, None, c.finish_reason)
            if piece is not None:
                await resp.write(_chunk(answer, piece))
        if opts.include_usage and not failed:
            u = {"id": answer.rid, "object": answer.chunk_object, "created": answer.created, "model": answer.model,
                 "choices": [], "usage": usage(answer, seqs)}
            await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError) as e:
        request[CLIENT_GONE] = True
        log.debug("client %s went away mid-stream (%s): %s", request.remote, answer.rid, e)
    return resp
