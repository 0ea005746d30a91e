"""Request state: what a request asks for (:class:`GenRequest`), how far it got (:class:`SeqState`),
and what its client receives (:class:`Event`).

The gateway's record of a request is the source of truth: prompt, every token generated so far,
sampling parameters and the text already sent. A pipeline only borrows a sequence (its slot and
KV); when the pipeline fails, :meth:`SeqState.prepare_replay` turns the record back into work that
any pipeline can take: prefill the prompt plus the generated tokens, then go on decoding.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..wire.protocol import SamplingParams, SeqStart
from .speculative import SpecState


@dataclass(eq=False)
class GenRequest:
    """Tokens in, sampling settings, and when to stop.

    Compared by identity (``eq=False``): a field-by-field ``==`` would compare the prompt arrays, which
    numpy answers with an array whose truth value raises ``ValueError``."""

    prompt: np.ndarray
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    owner: Any = None      # who asked (the API key's index): the router shares capacity fairly between owners
    grammar: str = ""      # GBNF the output must follow (root rule "root"); "" = none
    triggers: Tuple[str, ...] = ()  # lazy grammar: it applies from the first of these words on
    logprobs: int = -1     # -1: none; 0..20: each generated token's logprob and this many top alternatives
    echo: bool = False     # also score the prompt's tokens (completions' echo + logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its logprob (the model's raw log_softmax) and the top alternatives (id, bytes, logprob);
    ``logprob`` is None for a prompt's first token (nothing predicts it)."""

    token: int
    bytes: bytes
    logprob: Optional[float]
    top: Tuple[Tuple[int, bytes, float], ...] = ()


@dataclass
class Event:
    kind: str              # "text", "done" or "error"
    text: str = ""
    finish_reason: Optional[str] = None
    message: str = ""
    logprobs: Optional[List[TokenLogprob]] = None  # the tokens behind ``text`` (when the request asked)


@dataclass(eq=False)
class SeqState:
    """One request's progress. Fields above ``pipeline`` belong to the request; the rest to the pipeline
    currently running it (reset by :meth:`prepare_replay`).

    Compared and hashed by identity (``eq=False``): a sequence is one request, and ``s in queue`` /
    ``queue.remove(s)`` (cancelling a queued request) must find that request, not compare every field of
    the others (numpy prompt arrays: ``ValueError``)."""

    req: GenRequest
    events: "asyncio.Queue[Event]"
    generated: List[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finished: bool = False
    cancelled: bool = False
    replays: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: Optional[float] = None
    t_last: Optional[float] = None
    spec: Optional[SpecState] = None    # speculative decoding (set by a pipeline that speculates)
    # --- where it runs now
    pipeline: Any = None
    feed: Optional[np.ndarray] = None   # tokens to prefill (the prompt; prompt + generated after a replay)
    slot: int = -1
    prefilled: int = 0
    in_flight: int = 0                  # steps carrying its rows now (a long prompt's chunks can travel together)
    epoch: int = 0                      # bumped by a replay: results of steps sent before it are stale
    started: bool = False
    last_sent: int = 0
    kv_len: int = 0                     # positions its KV holds on the stages (drafts included, until trimmed)

    def __post_init__(self) -> None:
        if self.feed is None:
            self.feed = self.req.prompt

    @property
    def need(self) -> int:
        """KV cells reserved for this sequence: it can never outgrow them."""
        return int(self.req.prompt.shape[0]) + self.req.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.feed.shape[0]

    @property
    def decode_pos(self) -> int:
        """Position of the token the next decode step feeds (the last generated one)."""
        return int(self.req.prompt.shape[0]) + len(self.generated) - 1

    def prepare_replay(self) -> None:
        """Forget the pipeline it ran on; prefill prompt + generated tokens wherever it goes next.

        Greedy decoding then continues exactly as a one-at-a-time run that prefilled the same tokens.
        """
        self.replays += 1
        self.pipeline = None
        self.feed = (np.concatenate([self.req.prompt, np.asarray(self.generated, dtype=np.int32)])
                     if self.generated else self.req.prompt)
        self.slot, self.prefilled, self.in_flight, self.started, self.last_sent = -1, 0, 0, False, 0
        self.kv_len = 0
        self.epoch += 1
        if self.spec is not None:
            self.spec.drafts = self.spec.drafts[:0]

    def start_params(self) -> SeqStart:
        """What the last stage needs to start this sequence's sampler (history after a replay).

        A seeded sampler restarts from a seed derived from (seed, tokens so far): the continuation is
        reproducible, though not the one an undisturbed run would have drawn (llama.cpp's RNG state
        cannot move between hosts).
        """
        params = self.req.params
        if self.generated and params.seed is not None:
            params = replace(params, seed=(int(params.seed) + 0x9E3779B1 * len(self.generated)) % 0xFFFFFFFF)
        return SeqStart(params, tuple(self.generated), self.spec is not None)

    # ------------------------------------------------------------------ results
    def take_token(self, token: int, eog: bool, piece: str, now: float) -> Optional[str]:
        """Record a generated token and queue new text; returns the finish reason if it ends here."""
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.generated.append(int(token))
        if self.spec is not None:
            self.spec.push(token)
        if eog and not self.req.ignore_eos:
            return "stop"
        self.text += piece
        if self._emit():
            return "stop"
        if len(self.generated) >= self.req.max_tokens:
            return "length"
        return None

    def _emit(self) -> bool:
        """Send new text to the client, holding back a possible stop-string prefix; True if stopped."""
        stops = self.req.stop
        if stops:
            lo = max(0, self.emitted - max(len(x) for x in stops))
            hits = [i for i in (self.text.find(x, lo) for x in stops) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > self.emitted:
                    self.events.put_nowait(Event("text", self.text[self.emitted:cut]))
                self.emitted = cut
                self.text = self.text[:cut]
                return True
            hold = max(len(x) for x in stops) - 1
            upto = max(self.emitted, len(self.text) - hold)
        else:
            upto = len(self.text)
        if upto > self.emitted:
            self.events.put_nowait(Event("text", self.text[self.emitted:upto]))
            self.emitted = upto
        return False

    def end(self, reason: Optional[str] = None, error: Optional[str] = None) -> bool:
        """Finish with a reason or an error (flushing held-back text); False if it had already ended."""
        if self.finished:
            return False
        if error is None and self.emitted < len(self.text):
            self.events.put_nowait(Event("text", self.text[self.emitted:]))
            self.emitted = len(self.text)
        self.finished = True
        self.events.put_nowait(Event("error", message=error) if error is not None
                               else Event("done", finish_reason=reason))
        return True
