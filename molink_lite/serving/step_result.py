"""Results in: what a step's answer (or its error) does to the sequences it carried.

**Logprobs, for the HTTP side** (requests with ``GenRequest.logprobs`` 0..20; nothing of this when -1):

* Generated tokens: every ``Event("text")`` of such a request has ``Event.logprobs``, a list of
  :class:`~molink_lite.serving.sequence.TokenLogprob` (token id, raw bytes, logprob, ``top``: up to ``logprobs``
  (id, bytes, logprob) alternatives, best first) for the tokens whose text that event completes: text held back
  (stop strings) carries its tokens' entries when it is sent; a token whose piece is empty (part of a UTF-8
  character) rides with the event that completes its character; whatever is left at the end (tokens that formed a
  stop string) comes on a last ``Event("text")`` before ``done`` (its text may be empty). The end-of-generation
  token that stops a sequence gets no entry (it has no text).
* Prompt (``echo``): ONE ``Event("prompt_logprobs")`` before any text: ``Event.logprobs`` lists every prompt
  token in order (the first with ``logprob`` None, ``bytes`` b"" and no alternatives: nothing predicts it; ask a
  stage to ``detokenize`` it if its bytes are needed); the same list stays in ``SeqState.prompt_logprobs``. Sent
  once per sequence, never again after a replay; every choice of an n > 1 group gets it (the leader scores the
  shared prompt for all). With ``max_tokens`` 0 the request then ends with ``Event("done", finish_reason="length")``.

molink's ``update_from_output`` (vLLM) / ``postprocess`` (nano-vllm). :func:`apply_result` takes the last stage's
:class:`~molink_lite.wire.protocol.ResultFrame` for a :class:`~molink_lite.serving.step_builder.StepRecord`:
speculative acceptance (drafts verified, counted), each token taken by its sequence (text to the client, finish
reason), cancelled sequences released, token timings to the observer; it returns the longest inter-token gap the
step's decoders saw, which steers the prefill budget. :func:`apply_step_error` hands a failed step's sequences
back. Slots and KV are given back through the ``finish`` / ``release`` callbacks (the pipeline's slot table).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..wire.protocol import ResultFrame
from .sequence import SeqState, TokenLogprob
from .step_builder import StepRecord

Finish = Callable[[SeqState, str], None]       # the sequence ended with this finish reason: count it, release it
Release = Callable[..., None]                  # release(s, keep=False): give its slot back (keep: it goes on)


def apply_result(rec: StepRecord, res: ResultFrame, now: float, *, owner: Any, stats: Dict[str, int],
                 finish: Finish, release: Release, observer: Any = None) -> Optional[float]:
    """Apply the answer ``res`` to step ``rec`` (popped from the steps in flight) at time ``now``.

    Only the sequences the step still speaks for (:meth:`StepRecord.live`) and that still run on ``owner`` take
    tokens. Returns the longest gap between two tokens of one sequence in this result (None if none)."""
    first = rec.round == 0
    ringed = set(rec.ring_slots)
    live = rec.landed(res.ring_left, res.ring_end)
    by_slot = {slot: s for s, slot in live}
    if not first:   # a ring round: one token per ringed sequence
        stats["ring_rounds"] += 1
        stats["decode_entries"] += len(live)
        stats["decode_tokens"] += int(res.seq.shape[0])
    elif rec.n_decode:
        _verify(rec, res, stats)
    if first and rec.scoring:
        _prompt_scores(rec, res, by_slot, owner)
    seqs, toks = res.seq.tolist(), res.tokens.tolist()
    eogs = res.eog.tolist() if res.eog is not None else [False] * len(seqs)
    lps = _Logprobs(res.logprob, res.top_ids, res.top_logprobs, res.token_bytes, res.top_bytes) \
        if res.logprob is not None else None
    worst_itl: Optional[float] = None
    taken = 0
    for i, (slot, tok, eog, piece) in enumerate(zip(seqs, toks, eogs, res.pieces)):
        s = by_slot.get(slot)
        if s is None or s.finished or s.pipeline is not owner:
            continue
        if s.cancelled:
            release(s)
            continue
        if s.t_last is not None and s.t_first is not None:
            gap = now - s.t_last
            worst_itl = max(worst_itl or 0.0, gap)
            if observer is not None:
                observer.token_gap(gap)
        elif observer is not None:
            observer.first_token(now - s.t_submit)
        taken += 1
        lp = lps.entry(i, tok, s.req.logprobs) if lps is not None and s.req.logprobs >= 0 else None
        reason = s.take_token(tok, bool(eog), piece, now, lp)
        if reason:
            finish(s, reason)
    for s in (rec.prompt_only if first else ()):   # max_tokens 0 (echo): the prompt was all there was to do
        if s.epoch == _sent_epoch(rec, s) and not s.finished and not s.cancelled and s.pipeline is owner:
            finish(s, "length")
    for s, slot in live:   # ringed: the next round feeds the token just taken (its KV then holds one more)
        if slot in ringed:
            s.kv_len = s.decode_pos + (1 if slot in rec.ring_slots else 0)
    for s, _ in live:
        if s.cancelled and not s.finished and not s.in_flight:
            release(s)
    if observer is not None:
        observer.tokens(taken)
    return worst_itl


class _Logprobs:
    """A result's logprob arrays, as lists once (only built when the result carries logprobs)."""

    def __init__(self, logprob: np.ndarray, top_ids: Optional[np.ndarray], top_lp: Optional[np.ndarray],
                 tok_bytes: Optional[List[str]], top_bytes: Optional[List[List[str]]]):
        self.lp = logprob.tolist()
        self.top_ids = top_ids.tolist() if top_ids is not None else None
        self.top_lp = top_lp.tolist() if top_lp is not None else None
        self.tok_bytes, self.top_bytes = tok_bytes, top_bytes

    def entry(self, i: int, token: int, k: int) -> TokenLogprob:
        """Row ``i`` (token ``token``) with at most ``k`` alternatives."""
        top: Tuple[Tuple[int, bytes, float], ...] = ()
        if k and self.top_ids is not None and self.top_lp is not None:
            ids, lps = self.top_ids[i], self.top_lp[i]
            bs = self.top_bytes[i] if self.top_bytes is not None else ()
            top = tuple((int(t), _hex(bs[j] if j < len(bs) else ""), float(lps[j]))
                        for j, t in enumerate(ids[:k]) if t >= 0)
        return TokenLogprob(int(token), _hex(self.tok_bytes[i] if self.tok_bytes is not None else ""),
                            float(self.lp[i]), top)


def _hex(x: str) -> bytes:
    return bytes.fromhex(x) if x else b""


def _prompt_scores(rec: StepRecord, res: ResultFrame, by_slot: Dict[int, SeqState], owner: Any) -> None:
    """Prompt scoring (echo): each scored row's entry to its sequence (the target is the next prompt token); a
    sequence whose whole prompt is scored gets its ``prompt_logprobs`` event (before its first token's text)."""
    got: Dict[int, List[TokenLogprob]] = {}
    if res.score_seq is not None and res.score_logprob is not None:
        sc = _Logprobs(res.score_logprob, res.score_top_ids, res.score_top_logprobs, res.score_bytes,
                       res.score_top_bytes)
        for i, slot in enumerate(res.score_seq.tolist()):
            s = by_slot.get(slot)
            if s is None:
                continue
            entries = got.setdefault(slot, [])
            n_done = (len(s._plp) if s._plp is not None else 1) + len(entries)
            if n_done >= int(s.req.prompt.shape[0]):
                continue    # more rows than the prompt has tokens: not ours
            entries.append(sc.entry(i, int(s.req.prompt[n_done]), max(0, s.req.logprobs)))
    for s in _unique(rec.scoring):
        if s.epoch != _sent_epoch(rec, s) or s.finished or s.pipeline is not owner or not s.scores_prompt:
            continue
        if s.take_prompt_logprobs(got.get(s.slot, ())):
            s.deliver_prompt_logprobs()


def _unique(seqs: Sequence[SeqState]) -> List[SeqState]:
    return list({id(s): s for s in seqs}.values())


def _sent_epoch(rec: StepRecord, s: SeqState) -> int:
    for (x, _), (_, ep) in zip(rec.seqs, rec.sent):
        if x is s:
            return ep
    return -1


def _verify(rec: StepRecord, res: ResultFrame, stats: Dict[str, int]) -> None:
    """Decoding sequences: tokens per round trip, and how many of their drafts the last stage accepted (it returns
    the accepted drafts plus one token of its own)."""
    got = dict(zip(*np.unique(res.seq.astype(np.int64), return_counts=True))) if res.seq.shape[0] else {}
    for (s, _), (slot, ep) in zip(rec.seqs[:rec.n_decode], rec.sent):  # decode entries come first in a step
        if s.epoch != ep:
            continue
        n_got = int(got.get(slot, 0))
        stats["decode_entries"] += 1
        stats["decode_tokens"] += n_got
        if s.spec is None:
            continue
        k = int(s.spec.drafts.shape[0])
        if k and n_got:
            acc = min(k, n_got - 1)
            s.spec.verified(k, acc)
            stats["accepted"] += acc
        s.spec.drafts = s.spec.drafts[:0]


def apply_step_error(rec: StepRecord, release: Release) -> List[SeqState]:
    """A stage could not run step ``rec`` (nothing of it was applied there): its live sequences give their slots
    back here; returns the ones to replay (not the finished ones, nor the cancelled ones, which are released)."""
    lost = []
    for s, _ in rec.landed():
        if s.finished:
            continue
        if s.cancelled:
            release(s)
            continue
        release(s, keep=True)
        lost.append(s)
    return lost
