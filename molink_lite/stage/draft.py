"""Draft-model speculation: a small model on the gateway's machine proposes the draft tokens.

Prompt lookup (:mod:`.speculative`) drafts only where a text repeats itself. With ``--draft-model small.gguf`` the
gateway runs a small model of the same vocabulary itself (llama.cpp, whole model, in one thread of its own) and
proposes its greedy continuation of each decoding sequence as the drafts; the pipeline verifies them exactly as it
verifies lookup drafts (the last stage's sampler accepts a prefix, the rest is trimmed), so what is generated does
not change, only how many tokens each round trip brings. Where the draft has nothing yet (a sequence whose prompt
it is still reading) the sequence falls back to prompt lookup.

It lives with the engine code (it is a llama.cpp model run by the gateway's process, built by the CLI and handed to
:func:`molink_lite.serving.gateway.start_gateway`); the serving side only calls :meth:`DraftModel.fill` and
:meth:`DraftModel.check_vocab`.

How it runs: before scheduling, the pipeline asks for drafts for its idle decoding sequences (:meth:`DraftModel.fill`)
and waits at most a bounded time for them (a share of the step path's round trip, at least a few ms), so a slow
draft never holds a step back for long; what finishes later is used at the next step if the sequence has not moved
on. The draft keeps each sequence's KV (one of its own sequence slots per gateway sequence, least recently used
reused): a later draft reads only the tokens that came since, after trimming what the pipeline rejected.

Which draft: any whole GGUF whose vocabulary is the model's (checked when a pipeline connects: the same token count and
the same BOS/EOS texts as the first stage's; the gateway refuses the pipeline with a clear error otherwise), in practice
a small model of the family (Qwen2.5-0.5B for Qwen2.5-7B/14B/32B, Llama-3.2-1B for Llama-3.1-8B/70B). A draft made from
the model itself (its first layers and its head: :func:`molink_lite.model.split.write_truncated_model`) does not pay
without training: Gemma 3 270M cut to 16 of its 18 layers agrees with the whole model's greedy token on 34 % of a
text's positions (12 layers: 19 %) at 89 % of its cost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)
MIN_WAIT_S = 0.004   # the least the pipeline waits for drafts before it sends a step without them


class DraftError(RuntimeError):
    """The draft model cannot be used (not found, not a whole model, another vocabulary)."""


class DraftModel:
    """A whole small model proposing greedy drafts for the gateway's sequences (one llama.cpp thread)."""

    def __init__(self, path: str, *, n_ctx: int = 8192, n_seq_max: int = 32, n_threads: Optional[int] = None,
                 n_gpu_layers: int = 0):
        from ..model.vocab import Vocab
        from .engine import EngineError, StageEngine

        if not Path(path).is_file():
            raise DraftError(f"draft model {path}: no such file")
        try:
            self.engine = StageEngine(path, n_ctx=n_ctx, n_seq_max=n_seq_max, n_threads=n_threads,
                                      n_gpu_layers=n_gpu_layers)
        except EngineError as e:
            raise DraftError(f"draft model {path}: {e}") from None
        info = self.engine.info
        if not (info.is_first and info.is_last):
            self.engine.close()
            raise DraftError(f"draft model {path} is a stage of a split model (layers {info.layer_start}-"
                             f"{info.layer_stop - 1} of {info.n_layer_total}); give a whole model")
        self.path = path
        self.vocab = Vocab(self.engine.model_ptr)
        self.n_vocab = info.n_vocab
        self.n_seq_max = n_seq_max
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft")
        self._lock = threading.Lock()            # the slot table, between the loop and the draft thread
        self._slot_of: "OrderedDict[int, int]" = OrderedDict()  # id(sequence) -> draft slot, least recent first
        self._held: List[np.ndarray] = [np.zeros(0, np.int32) for _ in range(n_seq_max)]
        self._free = list(range(n_seq_max))
        self._job: Optional[asyncio.Future] = None
        self.stats = {"rounds": 0, "proposed": 0, "tokens_read": 0}

    # ------------------------------------------------------------------ checks
    def check_vocab(self, hello: dict) -> Optional[str]:
        """Why the draft cannot serve a model whose first stage said ``hello``, or None."""
        n = int(hello.get("n_vocab") or 0)
        if n != self.n_vocab:
            return f"the draft model has {self.n_vocab} tokens, the model {n}"
        for key, tok in (("bos", self.vocab.bos), ("eos", self.vocab.eos)):
            want = hello.get(key)
            if want is not None and self.vocab.token_text(tok) != want:
                return (f"the draft model's {key.upper()} is {self.vocab.token_text(tok)!r}, the model's {want!r}: "
                        f"another vocabulary")
        return None

    # ------------------------------------------------------------------ drafting
    async def fill(self, seqs: Sequence[Any], k: int, wait_s: float) -> None:
        """Start drafts of ``k`` tokens for each of ``seqs`` (the gateway's decoding sequences: anything with a
        ``spec``, a :class:`~molink_lite.serving.speculative.SpecState`) whose drafts are not for its current tokens
        yet, and wait up to ``wait_s`` for them; drafts land in ``s.spec.model_drafts``."""
        if self._job is None or self._job.done():
            jobs = [(id(s), s.spec.buf[:s.spec.length].copy(), s) for s in seqs
                    if s.spec is not None and s.spec.model_at != s.spec.length
                    and s.spec.length + k < self.engine.n_ctx]
            if jobs:
                loop = asyncio.get_running_loop()
                fut = loop.run_in_executor(self._pool, self._propose, [(key, toks) for key, toks, _ in jobs], k)
                self._job = asyncio.ensure_future(self._land(fut, jobs))
        if self._job is not None and not self._job.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._job), max(MIN_WAIT_S, wait_s))
            except asyncio.TimeoutError:
                pass

    async def _land(self, fut: "asyncio.Future", jobs: List[Tuple[int, np.ndarray, Any]]) -> None:
        try:
            drafts = await fut
        except Exception as e:  # noqa: BLE001 - a draft failure only costs drafts
            log.warning("draft model failed: %s", e)
            return
        for (_, toks, s), d in zip(jobs, drafts):
            if s.spec is not None and s.spec.length == toks.shape[0]:  # still where it was: the drafts follow it
                s.spec.model_drafts, s.spec.model_at = d, toks.shape[0]

    def _slot(self, key: int) -> Tuple[int, bool]:
        """(draft slot of a sequence, whether it is a fresh one), evicting the least recently used if none is free."""
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._slot_of.move_to_end(key)
                return slot, False
            if not self._free:
                _, slot = self._slot_of.popitem(last=False)
                self._free.append(slot)
            slot = self._free.pop()
            self._slot_of[key] = slot
            return slot, True

    def _propose(self, jobs: List[Tuple[int, np.ndarray]], k: int) -> List[np.ndarray]:
        """In the draft thread: for each (sequence, its tokens) the draft's greedy next ``k`` tokens (a failure, such
        as a full KV cache, clears the draft's memory and is raised: those sequences get no drafts this time)."""
        try:
            fit = self._make_room(jobs, k)
            drafts = dict(zip([key for key, _ in fit], self._propose_once(fit, k))) if fit else {}
            return [drafts.get(key, np.zeros(0, np.int32)) for key, _ in jobs]
        except Exception:
            self.engine.clear()
            with self._lock:
                self._slot_of.clear()
                self._free = list(range(self.n_seq_max))
            self._held = [np.zeros(0, np.int32) for _ in range(self.n_seq_max)]
            raise

    def _make_room(self, jobs: List[Tuple[int, np.ndarray]], k: int) -> List[Tuple[int, np.ndarray]]:
        """The jobs that fit the draft's KV cache (shared by its sequences): the least recently used other sequences
        give theirs up first; a job that still does not fit is left out (its sequence gets lookup drafts)."""
        keys = {key for key, _ in jobs}
        with self._lock:
            held_of = {key: self._held[slot].shape[0] for key, slot in self._slot_of.items()}
        need = sum(toks.shape[0] - held_of.get(key, 0) + k for key, toks in jobs)
        total = sum(h.shape[0] for h in self._held)
        for key in [key for key in held_of if key not in keys]:  # least recently used first
            if total + need <= self.engine.n_ctx:
                break
            with self._lock:
                slot = self._slot_of.pop(key)
                self._free.append(slot)
            self.engine.free(slot)
            total -= self._held[slot].shape[0]
            self._held[slot] = self._held[slot][:0]
        out = []
        for key, toks in jobs:
            cost = toks.shape[0] - held_of.get(key, 0) + k
            if total + cost <= self.engine.n_ctx:
                out.append((key, toks))
                total += cost
        return out

    def _propose_once(self, jobs: List[Tuple[int, np.ndarray]], k: int) -> List[np.ndarray]:
        """The sequences' new tokens go through one batched forward, then k - 1 one-row-per-sequence steps."""
        eng = self.engine
        slots, feeds, starts = [], [], []
        for key, toks in jobs:
            slot, fresh = self._slot(key)
            held = self._held[slot]
            if fresh:
                eng.free(slot)
                held = held[:0]
            c = _common_prefix(held, toks)
            c = min(c, toks.shape[0] - 1)  # the last token is always read again: its logits give the first draft
            if c < held.shape[0]:
                eng.trim(slot, c)
            slots.append(slot)
            feeds.append(toks[c:])
            starts.append(c)
            self._held[slot] = toks[:c]
        seq = np.concatenate([np.full(f.shape[0], s, np.int32) for s, f in zip(slots, feeds)])
        pos = np.concatenate([np.arange(c, c + f.shape[0], dtype=np.int32) for c, f in zip(starts, feeds)])
        tokens = np.concatenate(feeds).astype(np.int32)
        out = np.zeros((len(jobs), k), np.int32)
        nxt = np.argmax(eng.forward(seq, pos, tokens=tokens), axis=1).astype(np.int32)  # last row of each sequence
        self.stats["tokens_read"] += int(tokens.shape[0])
        out[:, 0] = nxt
        ends = np.asarray([c + f.shape[0] for c, f in zip(starts, feeds)], np.int32)
        sl = np.asarray(slots, np.int32)
        for j in range(1, k):
            nxt = np.argmax(eng.forward(sl, ends + (j - 1), tokens=nxt), axis=1).astype(np.int32)
            out[:, j] = nxt
        for i, (slot, (_, toks)) in enumerate(zip(slots, jobs)):
            self._held[slot] = np.concatenate([toks, out[i, :k - 1]])  # the last draft was never read
        self.stats["rounds"] += 1
        self.stats["proposed"] += len(jobs) * k
        return [out[i] for i in range(len(jobs))]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.close()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


