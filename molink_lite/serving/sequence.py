"""Request state: what a request asks for (:class:`GenRequest`), how far it got (:class:`SeqState`),
and what its client receives (:class:`Event`).

The gateway's record of a request is the source of truth: prompt, every token generated so far,
sampling parameters and the text already sent. A pipeline only borrows a sequence (its slot and
KV); when the pipeline fails, :meth:`SeqState.prepare_replay` turns the record back into work that
any pipeline can take: prefill the prompt plus the generated tokens, then go on decoding.

What a client receives (``SeqState.events``, in this order): at most one ``Event("prompt_logprobs")`` (a request
with ``echo`` and ``logprobs >= 0``: ``Event.logprobs`` holds one :class:`TokenLogprob` per prompt token, the
first with ``logprob`` None; also kept in ``SeqState.prompt_logprobs``), then ``Event("text")`` events (with
``logprobs >= 0``, ``Event.logprobs`` lists the tokens whose text the event completes, possibly none), then one
``Event("done")`` or ``Event("error")``.

n > 1 (``Router.submit_group``): one sequence per choice; the first (the group's leader) prefills the prompt but
its last token, the others (``fork_from``: the leader) copy its KV and feed only the last token. See
:meth:`SeqState.ungroup` for when a choice stops sharing and prefills itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..wire.media import MediaPlan
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
    media: Optional[MediaPlan] = None   # the prompt's images (rows of token id -1) and every row's M-RoPE positions


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
    kind: str              # "prompt_logprobs", "text", "done" or "error" (see the module docstring)
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
    ring: int = 0                       # the step whose ring runs it now (closing the ring; 0: none)
    media_wait: bool = False            # its images are being sent to this pipeline's first stage: no rows yet
    after_ring: Optional[bool] = None   # released while its ring ran: ``keep``, applied once the ring lets it go
    # --- n > 1: one prefill shared by the group's choices (see ungroup)
    # (repr=False: these point at each other)
    fork_from: Optional["SeqState"] = field(default=None, repr=False)  # a choice waiting to copy this leader's
    #                                                                    prompt KV (same pipeline)
    kids: List["SeqState"] = field(default_factory=list, repr=False)    # a leader's choices waiting to fork from it
    group: Tuple["SeqState", ...] = field(default=(), repr=False)       # every choice of its request (its prompt
    #                                                                    logprobs go to all)
    # --- the prefix cache (serving/prefix_cache.py): positions 0..reuse_len-1 come from slot reuse_slot (a cached
    # entry, or reuse_donor: a running sequence) instead of being prefilled; ``prefilled`` starts at reuse_len
    reuse_slot: int = -1
    reuse_len: int = 0
    reuse_donor: Optional["SeqState"] = field(default=None, repr=False)
    reuse_adopt: bool = False          # it took the entry's slot itself (its first step cuts it to reuse_len)
    reuse_trim: int = -1               # adopt: the entry held more than reuse_len positions
    snap_at: int = 0                   # whole copies: keep its first snap_at positions as an entry when it gets
    snap_slot: int = -1                # there (a branch point other requests share), in this slot
    # --- logprobs (only used when the request asked for them)
    prompt_logprobs: Optional[List[TokenLogprob]] = None  # delivered prompt logprobs (echo); None until then
    _plp: Optional[List[TokenLogprob]] = field(default=None, repr=False)   # prompt logprobs received so far
    _lp: List[Tuple[int, TokenLogprob]] = field(default_factory=list, repr=False)  # (text end, entry) not sent

    def __post_init__(self) -> None:
        if self.feed is None:
            self.feed = self.req.prompt

    @property
    def scores_prompt(self) -> bool:
        """Its prefill rows are scored (echo with logprobs, not delivered yet, no leader scoring for it)."""
        r = self.req
        return r.echo and r.logprobs >= 0 and self.prompt_logprobs is None and self.fork_from is None

    @property
    def may_speculate(self) -> bool:
        """A sequence under a grammar never sends drafts (the last stage's grammar sampler cannot verify them), nor
        one with images (its positions after the images are not its row indices: drafts would need trims there)."""
        return not self.req.grammar and self.req.media is None

    def ungroup(self) -> None:
        """Stop sharing a prefill: a waiting choice leaves its leader (it prefills the prompt itself), a leader lets
        its waiting choices go. Called when a choice forks (the KV is copied), and whenever one of them leaves the
        pipeline or was never admitted with the other (cancel, release, replay, parking)."""
        if self.fork_from is not None:
            kids = self.fork_from.kids
            for i, k in enumerate(kids):
                if k is self:
                    del kids[i]
                    break
            self.fork_from = None
        if self.kids:
            for k in self.kids:
                k.fork_from = None
            self.kids = []

    @property
    def reuse_pending(self) -> bool:
        """It reuses a prefix whose copy has not gone out yet (its first step carries it)."""
        return self.reuse_len > 0 and not self.started

    def drop_reuse(self) -> None:
        """Its donor went away before the copy: prefill the whole feed instead (nothing was sent yet)."""
        if self.reuse_pending and not self.reuse_adopt:
            self.prefilled = 0
            self._clear_reuse()

    def _clear_reuse(self) -> None:
        self.reuse_slot, self.reuse_len, self.reuse_donor, self.reuse_adopt, self.reuse_trim = -1, 0, None, False, -1
        self.snap_at, self.snap_slot = 0, -1

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
        self.ring, self.after_ring = 0, None
        self._clear_reuse()
        self.epoch += 1
        if self.spec is not None:
            self.spec.drafts = self.spec.drafts[:0]
        self.ungroup()       # each choice of a group replays on its own
        self._plp = None     # prompt scoring not delivered yet starts over (delivered: never again)

    def start_params(self) -> SeqStart:
        """What the last stage needs to start this sequence's sampler (history after a replay).

        A seeded sampler restarts from a seed derived from (seed, tokens so far): the continuation is
        reproducible, though not the one an undisturbed run would have drawn (llama.cpp's RNG state
        cannot move between hosts).
        """
        params = self.req.params
        if self.generated and params.seed is not None:
            params = replace(params, seed=(int(params.seed) + 0x9E3779B1 * len(self.generated)) % 0xFFFFFFFF)
        r = self.req
        return SeqStart(params, tuple(self.generated), self.spec is not None and not r.grammar, r.grammar,
                        tuple(r.triggers) if r.grammar else (), r.logprobs)

    # ------------------------------------------------------------------ results
    def take_token(self, token: int, eog: bool, piece: str, now: float,
                   lp: Optional[TokenLogprob] = None) -> Optional[str]:
        """Record a generated token and queue new text; returns the finish reason if it ends here.

        ``lp``: the token's logprob entry (requests that asked), sent with the event that completes its text. The
        end-of-generation token that stops a sequence has no text and gets no entry."""
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.generated.append(int(token))
        if self.spec is not None:
            self.spec.push(token)
        if eog and not self.req.ignore_eos:
            return "stop"
        self.text += piece
        if lp is not None:
            self._lp.append((len(self.text), lp))
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
                    self.events.put_nowait(Event("text", self.text[self.emitted:cut],
                                                 logprobs=None if self.req.logprobs < 0 else self._lps(cut)))
                self.emitted = cut
                self.text = self.text[:cut]
                return True
            hold = max(len(x) for x in stops) - 1
            upto = max(self.emitted, len(self.text) - hold)
        else:
            upto = len(self.text)
        if upto > self.emitted:
            self.events.put_nowait(Event("text", self.text[self.emitted:upto],
                                         logprobs=None if self.req.logprobs < 0 else self._lps(upto)))
            self.emitted = upto
        return False

    def _lps(self, upto: Optional[int]) -> Optional[List[TokenLogprob]]:
        """Entries of the tokens whose text ends by ``upto`` (None: all), for the event sending text up to there;
        None when the request did not ask for logprobs."""
        if self.req.logprobs < 0:
            return None
        lp = self._lp
        if upto is None:
            self._lp = []
            return [e for _, e in lp]
        i = 0
        while i < len(lp) and lp[i][0] <= upto:
            i += 1
        self._lp = lp[i:]
        return [e for _, e in lp[:i]]

    def take_prompt_logprobs(self, entries: Sequence[TokenLogprob]) -> bool:
        """Prompt scoring results (in prompt order, after the first token); True once the whole prompt is scored.
        """
        if self._plp is None:
            t0 = int(self.req.prompt[0])
            self._plp = [TokenLogprob(t0, b"", None)]
        self._plp.extend(entries)
        return len(self._plp) >= int(self.req.prompt.shape[0])

    def deliver_prompt_logprobs(self) -> None:
        """The prompt is scored: its logprobs go to this sequence and to every choice of its group that has not
        had them (each choice's events start with them)."""
        entries = self._plp or []
        for s in self.group or (self,):
            if s.prompt_logprobs is None and not s.finished:
                s.prompt_logprobs = entries
                s._plp = None
                s.events.put_nowait(Event("prompt_logprobs", logprobs=entries))

    def end(self, reason: Optional[str] = None, error: Optional[str] = None) -> bool:
        """Finish with a reason or an error (flushing held-back text); False if it had already ended."""
        if self.finished:
            return False
        if error is None and (self.emitted < len(self.text) or self._lp):
            self.events.put_nowait(Event("text", self.text[self.emitted:], logprobs=self._lps(None)))
            self.emitted = len(self.text)
        self.finished = True
        self.events.put_nowait(Event("error", message=error) if error is not None
                               else Event("done", finish_reason=reason))
        return True
