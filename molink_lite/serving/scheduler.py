"""Pipeline head: connects to a chain of stages and schedules requests onto it.

Continuous batching: every step carries the rows of many sequences (one row per
decoding sequence, a chunk of prompt for prefilling ones); sequences join and
leave between steps. Up to ``max_inflight`` steps (micro-batches) travel the chain
at once, each holding a disjoint share of the sequences, so every stage can compute
while others send. Long prompts go in ``prefill_chunk``-token chunks interleaved with
decode rows. KV space is reserved at admission (prompt + max_tokens), so an admitted
request never runs out of cache mid-way; requests that can never fit are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import websockets

import orjson

from ..wire import auth
from ..wire.auth import AuthError, LinkKey
from ..wire.channel import Channel, ChannelClosed, RemoteError
from ..wire.codec import FrameError
from ..stage.server import PROTOCOL_VERSION, chain_mismatch
from .sequence import Event, GenRequest, SeqState

log = logging.getLogger(__name__)
RESULT_MAX_BYTES = 64 << 20  # what the gateway accepts from a stage (results, stats, replies)


INTERLEAVE_SLOWDOWN = 2.0  # while a prompt is prefilled, decoders' inter-token time may grow this much
MIN_PREFILL_ROWS = 8       # prompt rows per step never drop below this (the prompt always progresses)
BYTES_PER_VALUE = {"f32": 4, "f16": 2, "f16-clamp": 2, "int8": 1}


def chunk_for_link(rtt_s: float, mbit: float, n_embd: int, codec: str = "f16", max_tokens: int = 512,
                   min_tokens: int = 32, floor_s: float = 0.005) -> int:
    """Prefill chunk (tokens) for a link: its hidden states take at most max(one-way latency, 5 ms) to send.

    A chunk that takes longer to serialize than the link's own latency delays the decode rows queued behind
    it by more than the link already does; a much smaller chunk wastes steps. So the chunk is the link's
    bandwidth x max(rtt / 2, ``floor_s``) in rows of ``n_embd`` values, clamped to [min_tokens, max_tokens].
    Example: 100 Mbit/s, 10 ms one way, n_embd 640, f16 -> 12.5 MB/s x 10 ms / 1280 B = 97 tokens.
    """
    row = n_embd * BYTES_PER_VALUE.get(codec, 2) + 16
    budget = max(rtt_s / 2, floor_s) * mbit * 1e6 / 8
    return int(max(min_tokens, min(max_tokens, budget // row)))


class PipelineError(RuntimeError):
    """A pipeline that cannot be used (unreachable, mis-tiled, mixed models), with the reason."""


class RequestError(ValueError):
    """A request that can never be served by this pipeline (e.g. longer than the context)."""


@dataclass
class _Step:
    sid: int
    seqs: List[Tuple[SeqState, bool]]   # (sequence, expects a token back)
    sent_at: float
    n_decode: int = 0
    n_prefill: int = 0


class Pipeline:
    """One chain of stages (``urls`` in layer order) and the scheduler that feeds it."""

    def __init__(self, urls: Sequence[str], *, codec: str = "f16", max_inflight: Optional[int] = None,
                 prefill_chunk: Optional[int] = None, max_batch_tokens: int = 512, step_timeout: float = 300.0,
                 name: str = "", key: Optional[LinkKey] = None):
        if not urls:
            raise PipelineError("a pipeline needs at least one stage URL")
        self.urls = list(urls)
        self.name = name or ",".join(self.urls)
        self.codec = codec
        self.max_inflight = max_inflight or len(self.urls)
        self.auto_chunk = not prefill_chunk
        self.prefill_chunk = prefill_chunk or min(256, max_batch_tokens)
        self.links: List[dict] = []  # measured stage-to-stage links (auto chunk size)
        # Prompt rows allowed in a step that also carries decode rows, adapted to measured step times:
        # halved when such a step takes more than INTERLEAVE_SLOWDOWN x a decode-only step, else grown.
        self.prefill_budget = min(32, self.prefill_chunk)
        self.t_decode_step: Optional[float] = None  # moving average of inter-token time without prefill (s)
        self.max_batch_tokens = self.max_batch_tokens_opt = max_batch_tokens
        self.key = key
        self.step_timeout = step_timeout
        self.channels: List[Channel] = []
        self.infos: List[dict] = []
        self.healthy = False
        self.error = "not connected"
        self.waiting: Deque[SeqState] = deque()
        self.active: Dict[int, SeqState] = {}
        self.free_slots: List[int] = []
        self.pending_free: List[int] = []
        self.kv_reserved = 0
        self.n_ctx = 0
        self.max_seqs = 0
        self.inflight: Dict[int, _Step] = {}
        self._sids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.stats = {"steps": 0, "rows": 0, "max_inflight_seen": 0, "max_seqs_in_step": 0,
                      "completed": 0, "failed": 0, "prefill_rows": 0, "decode_rows": 0, "mixed_steps": 0}

    # ------------------------------------------------------------------ connection
    @property
    def first(self) -> dict:
        return self.infos[0]

    @property
    def load(self) -> int:
        return len(self.active) + len(self.waiting)

    async def connect(self, timeout: float = 60.0) -> None:
        """Connect to every stage, check the chain tiles one model, link stages, start scheduling."""
        deadline = time.monotonic() + timeout
        chans: List[Channel] = []
        try:
            for i, url in enumerate(self.urls):
                ch = await _connect(url, deadline, self.key)
                chans.append(ch)
                asyncio.ensure_future(self._watch(i, ch))
            infos = []
            for url, ch in zip(self.urls, chans):
                info, _ = await ch.request({"type": "hello"}, timeout=30)
                info["url"] = url
                infos.append(info)
            problem = check_chain(infos)
            if problem:
                raise PipelineError(problem)
            for i, ch in enumerate(chans):
                nxt = self.urls[i + 1] if i + 1 < len(self.urls) else None
                await ch.request({"type": "configure", "next": nxt, "codec": self.codec}, timeout=60)
        except (RemoteError, ChannelClosed, asyncio.TimeoutError) as e:
            for ch in chans:
                await ch.close()
            raise PipelineError(f"pipeline {self.name}: {e}") from None
        except BaseException:
            for ch in chans:
                await ch.close()
            raise
        self.channels, self.infos = chans, infos
        # rows per step never exceed what every stage accepts
        self.max_batch_tokens = min([self.max_batch_tokens_opt] + [int(i.get("max_rows") or 1 << 30) for i in infos])
        if self.auto_chunk:
            await self._choose_chunk()
        self.n_ctx = min(int(i["n_ctx"]) for i in infos)
        self.max_seqs = min(int(i["max_seqs"]) for i in infos)
        self.free_slots = list(range(self.max_seqs - 1, -1, -1))
        self.pending_free.clear()
        self.kv_reserved = 0
        self.healthy, self.error = True, ""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())
        log.info("pipeline %s ready: %d stage(s), %s, %d layers, %d seqs, ctx %d, %d micro-batches",
                 self.name, len(chans), infos[0]["arch"], infos[0]["n_layer_total"], self.max_seqs,
                 self.n_ctx, self.max_inflight)

    async def _choose_chunk(self) -> None:
        """Pick the prefill chunk from the measured stage-to-stage links (see :func:`chunk_for_link`)."""
        self.links = []
        n_embd = int(self.infos[0]["n_embd"])
        for ch, url in zip(self.channels[:-1], self.urls[1:]):
            try:
                meta, _ = await ch.request({"type": "probe_next", "bytes": 1 << 20}, timeout=120)
            except (RemoteError, asyncio.TimeoutError) as e:
                log.warning("could not measure the link to %s (%s); prefill chunk stays %d", url, e,
                            self.prefill_chunk)
                return
            if meta.get("rtt_s") is None:
                continue
            self.links.append({"to": url, "rtt_ms": 1e3 * meta["rtt_s"], "mbit": meta["mbit"]})
        chunks = [chunk_for_link(k["rtt_ms"] / 1e3, k["mbit"], n_embd, self.codec, self.max_batch_tokens)
                  for k in self.links]
        self.prefill_chunk = min(chunks) if chunks else min(256, self.max_batch_tokens)
        self.prefill_budget = min(self.prefill_budget, self.prefill_chunk)
        for k in self.links:
            log.info("link to %s: rtt %.2f ms, %.0f Mbit/s", k["to"], k["rtt_ms"], k["mbit"])
        log.info("prefill chunk: %d tokens per sequence per step", self.prefill_chunk)

    async def _watch(self, idx: int, ch: Channel) -> None:
        await ch.serve(self._on_frame)
        if ch in self.channels and self.healthy:
            self._fail_all(f"stage {self.urls[idx]} disconnected ({ch.close_reason})")

    def _fail_all(self, message: str) -> None:
        log.error("pipeline %s unhealthy: %s", self.name, message)
        self.healthy, self.error = False, message
        for st in list(self.inflight.values()):
            for s, _ in st.seqs:
                self._finish(s, error=message)
        self.inflight.clear()
        for s in list(self.active.values()):
            self._finish(s, error=message)
        while self.waiting:
            self._finish(self.waiting.popleft(), error=message)
        self._wake.set()

    async def close(self) -> None:
        self.healthy = False
        if self._task is not None:
            self._task.cancel()
        for ch in self.channels:
            await ch.close()

    async def reconnect_forever(self, interval: float = 5.0) -> None:
        """Keep trying to bring an unhealthy pipeline back."""
        while True:
            await asyncio.sleep(interval)
            if self.healthy:
                continue
            for ch in self.channels:
                await ch.close()
            try:
                await self.connect(timeout=interval)
                log.info("pipeline %s reconnected", self.name)
            except (PipelineError, OSError) as e:
                self.error = str(e)

    # ------------------------------------------------------------------ requests
    async def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids from the first stage's tokenizer."""
        if not self.healthy:
            raise PipelineError(self.error)
        meta, arrays = await self.channels[0].request(
            {"type": "tokenize", "text": text, "add_special": add_special, "parse_special": True})
        return arrays["tokens"]

    def check(self, req: GenRequest) -> None:
        """Raise :class:`RequestError` if the request can never fit this pipeline."""
        n = int(req.prompt.shape[0])
        if n == 0:
            raise RequestError("the prompt is empty")
        if req.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if n + req.max_tokens > self.n_ctx:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                               f"window ({self.n_ctx} tokens)")
        vocab = int(self.first["n_vocab"])
        if int(req.prompt.min()) < 0 or int(req.prompt.max()) >= vocab:
            raise RequestError(f"prompt token ids must be in 0..{vocab - 1}")

    def submit(self, req: GenRequest) -> SeqState:
        """Queue a request; its events arrive on the returned state's queue."""
        if not self.healthy:
            raise PipelineError(self.error)
        self.check(req)
        try:  # what goes into a step must serialize: a bad request fails alone, never a whole step
            orjson.dumps(req.params.validate().to_dict())
        except (TypeError, ValueError) as e:
            raise RequestError(f"invalid sampling parameters: {e}") from None
        s = SeqState(req=req, events=asyncio.Queue())
        self.waiting.append(s)
        self._wake.set()
        return s

    def cancel(self, s: SeqState) -> None:
        """The client went away: stop generating and free the sequence on every stage."""
        if s.finished:
            return
        s.cancelled = True
        if s in self.waiting:
            self.waiting.remove(s)
            s.finished = True
            return
        if not s.in_flight:
            self._release(s)
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.healthy:
                continue
            try:
                self._admit()
                while len(self.inflight) < self.max_inflight:
                    step = self._build_and_send()
                    if not step:
                        break
            except ChannelClosed as e:
                self._fail_all(str(e))
            except Exception as e:  # noqa: BLE001 - keep serving; fail what was involved
                log.exception("scheduler error")
                self._fail_all(f"scheduler error: {e}")

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            s = self.waiting[0]
            if self.kv_reserved + s.need > self.n_ctx:
                break
            self.waiting.popleft()
            s.slot = self.free_slots.pop()
            self.kv_reserved += s.need
            self.active[s.slot] = s

    def _build_and_send(self) -> bool:
        ready = [s for s in self.active.values() if not s.in_flight and not s.finished]
        decoding = [s for s in ready if not s.prefilling]
        n_decoding = sum(1 for s in self.active.values() if not s.prefilling and not s.finished)
        per_step = max(1, math.ceil(n_decoding / self.max_inflight))
        decoding.sort(key=lambda s: s.last_sent)
        chosen = decoding[:per_step]
        budget = max(0, self.max_batch_tokens - len(chosen))
        # While others decode, a long prompt (more than one chunk) gets at most ``prefill_budget`` rows
        # per step in all; short prompts go in one piece (they delay decoders by one step at most).
        long_budget = self.prefill_budget if n_decoding else budget
        prefill: List[Tuple[SeqState, int]] = []
        for s in sorted((s for s in ready if s.prefilling), key=lambda s: s.t_submit):
            take = min(self.prefill_chunk, int(s.req.prompt.shape[0]) - s.prefilled, budget)
            if self._is_long(s):
                take = min(take, long_budget)
                long_budget -= max(take, 0)
            if take <= 0:
                continue
            prefill.append((s, take))
            budget -= take
        if not chosen and not prefill:
            if self.pending_free and not self.inflight:
                self._send_step([], [])
                return True
            return False
        self._send_step(chosen, prefill)
        return True

    def _send_step(self, decode: List[SeqState], prefill: List[Tuple[SeqState, int]]) -> None:
        sid = next(self._sids)
        seq_parts, pos_parts, tok_parts, out_parts = [], [], [], []
        entries: List[Tuple[SeqState, bool]] = []
        start: Dict[str, dict] = {}
        if decode:
            slots = np.fromiter((s.slot for s in decode), dtype=np.int32, count=len(decode))
            seq_parts.append(slots)
            pos_parts.append(np.fromiter((s.req.prompt.shape[0] + len(s.generated) - 1 for s in decode),
                                         dtype=np.int32, count=len(decode)))
            tok_parts.append(np.fromiter((s.generated[-1] for s in decode), dtype=np.int32, count=len(decode)))
            out_parts.append(np.ones(len(decode), dtype=np.uint8))
            entries.extend((s, True) for s in decode)
        for s, take in prefill:
            a, b = s.prefilled, s.prefilled + take
            seq_parts.append(np.full(take, s.slot, dtype=np.int32))
            pos_parts.append(np.arange(a, b, dtype=np.int32))
            tok_parts.append(s.req.prompt[a:b])
            done = b == s.req.prompt.shape[0]
            out = np.zeros(take, dtype=np.uint8)
            out[-1] = 1 if done else 0
            out_parts.append(out)
            entries.append((s, done))
            if not s.started:
                start[str(s.slot)] = s.req.params.to_dict()
                s.started = True
            s.prefilled = b
        meta = {"type": "step", "step": sid, "free": self.pending_free, "start": start}
        cat = lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt)  # noqa: E731
        arrays = {"seq": cat(seq_parts, np.int32), "pos": cat(pos_parts, np.int32),
                  "tokens": cat(tok_parts, np.int32), "out": cat(out_parts, np.uint8)}
        try:
            self.channels[0].send(meta, arrays)
        except FrameError as e:  # cannot happen for checked requests; if it does, fail only this step's requests
            log.error("step %d could not be encoded: %s", sid, e)
            for s, _ in entries:
                self._finish(s, error=f"internal error building a step: {e}")
            return
        self.pending_free = []
        for s, _ in entries:
            s.in_flight = True
            s.last_sent = sid
        n = int(arrays["seq"].shape[0])
        self.inflight[sid] = _Step(sid, entries, time.perf_counter(), len(decode), n - len(decode))
        st = self.stats
        st["steps"] += 1
        st["rows"] += n
        st["decode_rows"] += len(decode)
        st["prefill_rows"] += n - len(decode)
        if decode and prefill:
            st["mixed_steps"] += 1
        st["max_inflight_seen"] = max(st["max_inflight_seen"], len(self.inflight))
        st["max_seqs_in_step"] = max(st["max_seqs_in_step"], len(entries))

    # ------------------------------------------------------------------ results
    async def _on_frame(self, ch: Channel, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        kind = meta.get("type")
        if kind == "result":
            self._on_result(meta, arrays)
        elif kind == "step_error":
            st = self.inflight.pop(meta.get("step"), None)
            msg = f"stage {meta.get('stage')}: {meta.get('message')}"
            if st is not None:
                for s, _ in st.seqs:
                    s.in_flight = False
                    self._finish(s, error=msg)
            self._wake.set()
        elif kind == "error":
            log.warning("stage reported: %s", meta.get("message"))

    def _on_result(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        st = self.inflight.pop(meta.get("step"), None)
        if st is None:
            log.warning("result for unknown step %s", meta.get("step"))
            return
        by_slot = {s.slot: s for s, _ in st.seqs}
        for s, _ in st.seqs:
            s.in_flight = False
        seqs = arrays.get("seq", np.zeros(0, np.int32)).tolist()
        toks = arrays.get("tokens", np.zeros(0, np.int32)).tolist()
        eogs = arrays.get("eog", np.zeros(len(seqs), np.uint8)).tolist()
        pieces = meta.get("pieces") or [""] * len(seqs)
        now = time.perf_counter()
        worst_itl: Optional[float] = None
        for slot, tok, eog, piece in zip(seqs, toks, eogs, pieces):
            s = by_slot.get(slot)
            if s is None or s.finished:
                continue
            if s.cancelled:
                self._release(s)
                continue
            if s.t_first is None:
                s.t_first = now
            elif s.t_last is not None:
                worst_itl = max(worst_itl or 0.0, now - s.t_last)
            s.t_last = now
            s.generated.append(int(tok))
            if eog and not s.req.ignore_eos:
                self._finish(s, reason="stop")
                continue
            s.text += piece
            if self._emit(s):
                continue
            if len(s.generated) >= s.req.max_tokens:
                self._finish(s, reason="length")
        for s, _ in st.seqs:
            if s.cancelled and not s.finished:
                self._release(s)
        self._adapt_budget(worst_itl)
        self._wake.set()

    def _is_long(self, s: SeqState) -> bool:
        """A prompt that takes more than one chunk: the kind whose prefill is throttled while others decode."""
        return int(s.req.prompt.shape[0]) > self.prefill_chunk

    def _adapt_budget(self, itl: Optional[float]) -> None:
        """AIMD on the prompt rows allowed per step while sequences decode (chunked-prefill interleaving).

        ``itl`` is the longest inter-token interval the decoding sequences of the step just finished saw.
        With no long prompt being prefilled it updates the baseline; during one the budget is halved
        when decoders wait more than INTERLEAVE_SLOWDOWN x the baseline, else it grows by a quarter.
        """
        if itl is None:
            return
        prefilling = any(self._is_long(s) and s.prefilling and not s.finished for s in self.active.values())
        if not prefilling:
            t = self.t_decode_step
            self.t_decode_step = itl if t is None else 0.8 * t + 0.2 * itl
        elif self.t_decode_step is not None:
            if itl > INTERLEAVE_SLOWDOWN * self.t_decode_step:
                self.prefill_budget = max(MIN_PREFILL_ROWS, self.prefill_budget // 2)
            else:
                self.prefill_budget = min(self.prefill_chunk, self.prefill_budget + max(4, self.prefill_budget // 4))
        self.stats["prefill_budget"] = self.prefill_budget

    def _emit(self, s: SeqState) -> bool:
        """Send new text to the client, holding back a possible stop-string prefix; True if stopped."""
        stops = s.req.stop
        if stops:
            lo = max(0, s.emitted - max(len(x) for x in stops))
            hits = [i for i in (s.text.find(x, lo) for x in stops) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > s.emitted:
                    s.events.put_nowait(Event("text", s.text[s.emitted:cut]))
                s.emitted = cut
                s.text = s.text[:cut]
                self._finish(s, reason="stop")
                return True
            hold = max(len(x) for x in stops) - 1
            upto = max(s.emitted, len(s.text) - hold)
        else:
            upto = len(s.text)
        if upto > s.emitted:
            s.events.put_nowait(Event("text", s.text[s.emitted:upto]))
            s.emitted = upto
        return False

    def _finish(self, s: SeqState, reason: Optional[str] = None, error: Optional[str] = None) -> None:
        if s.finished:
            return
        if error is None and s.emitted < len(s.text):
            s.events.put_nowait(Event("text", s.text[s.emitted:]))
            s.emitted = len(s.text)
        s.finished = True
        if error is not None:
            self.stats["failed"] += 1
            s.events.put_nowait(Event("error", message=error))
        else:
            self.stats["completed"] += 1
            s.events.put_nowait(Event("done", finish_reason=reason))
        self._release(s)

    def _release(self, s: SeqState) -> None:
        s.finished = True
        if s.slot >= 0 and self.active.get(s.slot) is s:
            del self.active[s.slot]
            self.kv_reserved -= s.need
            if s.started:
                self.pending_free.append(s.slot)
            self.free_slots.append(s.slot)
        self._wake.set()

    # ------------------------------------------------------------------ watchdog
    async def watchdog(self, interval: float = 5.0) -> None:
        """Fail steps that never came back (a stage hung or a frame was lost)."""
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            late = [st for st in self.inflight.values() if now - st.sent_at > self.step_timeout]
            if late:
                self._fail_all(f"step {late[0].sid} got no answer within {self.step_timeout:.0f} s")

    async def stage_stats(self) -> List[dict]:
        """Counters of every stage (steps, rows, most sequences in one step, ...)."""
        out = []
        for ch in self.channels:
            meta, _ = await ch.request({"type": "stats"}, timeout=10)
            out.append(meta)
        return out


def check_chain(infos: Sequence[dict]) -> Optional[str]:
    """Why these stages (in order) do not form one whole model, or None."""
    if not infos:
        return "no stages"
    for i in infos:
        if i.get("protocol") != PROTOCOL_VERSION:
            return f"stage {i.get('url')} speaks protocol {i.get('protocol')}, expected {PROTOCOL_VERSION}"
    if infos[0]["layer_start"] != 0:
        return (f"the first stage ({infos[0]['url']}) starts at layer {infos[0]['layer_start']}: "
                f"layers 0-{infos[0]['layer_start'] - 1} are served by no stage")
    for a, b in zip(infos, infos[1:]):
        problem = chain_mismatch(a, b)
        if problem:
            return f"stage {b['url']} cannot follow {a['url']}: {problem}"
    last = infos[-1]
    if last["layer_stop"] != last["n_layer_total"]:
        return (f"the last stage ({last['url']}) ends at layer {last['layer_stop'] - 1}: layers "
                f"{last['layer_stop']}-{last['n_layer_total'] - 1} are served by no stage")
    return None


async def _connect(url: str, deadline: float, key: Optional[LinkKey]) -> Channel:
    delay = 0.2
    while True:
        try:
            ws = await auth.connect(url, key, "gateway", max_size=RESULT_MAX_BYTES)
            return Channel(ws, name=f"stage {url}")
        except AuthError as e:
            raise PipelineError(f"stage {url}: authentication failed: {e}") from None
        except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError) as e:
            if time.monotonic() + delay > deadline:
                raise PipelineError(f"cannot reach stage {url}: {e}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
