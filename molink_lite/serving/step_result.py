"""Results in: what a step's answer (or its error) does to the sequences it carried.

molink's ``update_from_output`` (vLLM) / ``postprocess`` (nano-vllm). :func:`apply_result` takes the last stage's
:class:`~molink_lite.wire.protocol.ResultFrame` for a :class:`~molink_lite.serving.step_builder.StepRecord`:
speculative acceptance (drafts verified, counted), each token taken by its sequence (text to the client, finish
reason), cancelled sequences released, token timings to the observer; it returns the longest inter-token gap the
step's decoders saw, which steers the prefill budget. :func:`apply_step_error` hands a failed step's sequences
back. Slots and KV are given back through the ``finish`` / ``release`` callbacks (the pipeline's slot table).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..wire.protocol import ResultFrame
from .sequence import SeqState
from .step_builder import StepRecord

Finish = Callable[[SeqState, str], None]       # the sequence ended with this finish reason: count it, release it
Release = Callable[..., None]                  # release(s, keep=False): give its slot back (keep: it goes on)


def apply_result(rec: StepRecord, res: ResultFrame, now: float, *, owner: Any, stats: Dict[str, int],
                 finish: Finish, release: Release, observer: Any = None) -> Optional[float]:
    """Apply the answer ``res`` to step ``rec`` (popped from the steps in flight) at time ``now``.

    Only the sequences the step still speaks for (:meth:`StepRecord.live`) and that still run on ``owner`` take
    tokens. Returns the longest gap between two tokens of one sequence in this result (None if none)."""
    live = rec.landed()
    by_slot = {slot: s for s, slot in live}
    if rec.n_decode:
        _verify(rec, res, stats)
    seqs, toks = res.seq.tolist(), res.tokens.tolist()
    eogs = res.eog.tolist() if res.eog is not None else [False] * len(seqs)
    worst_itl: Optional[float] = None
    taken = 0
    for slot, tok, eog, piece in zip(seqs, toks, eogs, res.pieces):
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
        reason = s.take_token(tok, bool(eog), piece, now)
        if reason:
            finish(s, reason)
    for s, _ in live:
        if s.cancelled and not s.finished and not s.in_flight:
            release(s)
    if observer is not None:
        observer.tokens(taken)
    return worst_itl


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
