"""Steps out: the sequences a step carries, as a :class:`~molink_lite.wire.protocol.StepFrame` and its record.

The step frame is molink's ``SchedulerOutput`` (vLLM): decoding sequences send their last token (and, when they
speculate, draft tokens at the next positions, with ``drafts``); prefilling ones a chunk of their feed; a
sequence's first step carries ``start`` (its sampling parameters, grammar and logprobs, and the tokens it generated
before a replay); a sequence whose drafts were rejected last time has its KV cut back (``trim``); slots of finished
sequences in the step's lane are freed (``free``).

Three kinds of prefill rows besides plain prompt chunks:

* **fork** (n > 1): a choice waiting for its leader (``SeqState.fork_from``) takes one row, the prompt's last token,
  and ``fork`` copies the leader's KV (the prompt but its last token) to it on every stage before the rows; the
  leader feeds its own last token in the same step (the scheduler sends the group together).
* **prefix** (the prefix cache, :mod:`molink_lite.serving.prefix_cache`): a sequence's first step copies the
  prefix it reuses from a cached entry or a running sequence (``fork`` with the prefix's length), or, when it took
  the entry's slot itself, cuts that slot back to the prefix (``trim``), and prefills from there.
* **score** (echo with logprobs): every prefill row whose next token is a prompt token is an output row, and
  ``score`` names those next tokens; the last stage returns their logprobs instead of sampling there. The row of
  the prompt's last token samples as usual (nothing with ``max_tokens`` 0).

Two halves, so that a step that never leaves (it could not be encoded) changes no sequence:

* :func:`build_step` reads the sequences and returns the frame and a :class:`StepRecord`; it changes nothing.
* :meth:`StepRecord.mark_sent` applies the sequence side of the step once the frame is on its way: positions
  prefilled, KV length (drafts included), sampler started, drafts in flight, steps in flight. One place, in the
  order the old inline code did it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..wire.media import text_pos4
from ..wire.protocol import SeqStart, StepFrame, lane_of
from .sequence import SeqState
from .speculative import SpecState

_EMPTY = np.zeros(0, np.int32)


@dataclass
class StepRecord:
    """A step in flight: what the gateway needs when its result (or error) comes back."""

    sid: int
    seqs: List[Tuple[SeqState, bool]]   # (sequence, expects a token back); the decoding ones first
    sent_at: float = 0.0
    n_decode: int = 0                   # decoding sequences (the first n_decode of ``seqs``)
    n_prefill: int = 0                  # prompt rows
    rows: int = 0
    sent: List[Tuple[int, int]] = field(default_factory=list)  # (slot, epoch) of each sequence when sent
    lane: int = 0
    drafts: List[np.ndarray] = field(default_factory=list)     # per decoding sequence (empty: none)
    ends: List[int] = field(default_factory=list)              # per prefilling sequence: its feed prefilled after
    spec: bool = False                  # the sequences it starts speculate
    forks: List[SeqState] = field(default_factory=list)       # choices that copy their leader's KV in this step
    scoring: List[SeqState] = field(default_factory=list)     # sequences whose prompt rows are scored (echo)
    prompt_only: List[SeqState] = field(default_factory=list)  # prompt done, nothing to sample (max_tokens 0)
    # closing the ring (stage/ring.py): slots whose ring still runs, the round whose result comes next, and whether
    # the gateway asked the last stage to let the whole ring go (it has work to batch with it)
    ring_slots: Set[int] = field(default_factory=set)
    round: int = 0
    stopping: bool = False

    def live(self) -> List[Tuple[SeqState, int]]:
        """(sequence, slot it was sent in) for the sequences this step still speaks for: a sequence handed back
        (replayed) since it was sent has moved on, and this step's outcome is not its own any more."""
        return [(s, slot) for (s, _), (slot, ep) in zip(self.seqs, self.sent) if s.epoch == ep]

    def current(self) -> List[Tuple[SeqState, int]]:
        """The live sequences the next result speaks for: every one at round 0, the ringed ones after."""
        live = self.live()
        return live if self.round == 0 else [(s, slot) for s, slot in live if slot in self.ring_slots]

    def landed(self, left: Optional[Sequence[int]] = None, end: bool = True) -> List[Tuple[SeqState, int]]:
        """A result (or an error) is back: this round's live sequences have one step fewer in flight, except the
        ringed ones that stay in the ring (not in ``left``, and the ring not at its ``end``)."""
        out = self.current()
        stay = set() if end or not self.ring_slots else self.ring_slots.difference(left or ())
        for s, slot in out:
            if slot in stay:
                continue
            s.in_flight = max(0, s.in_flight - 1)
            if s.ring == self.sid:
                s.ring = 0
        self.ring_slots = stay
        self.round += 1
        return out

    def mark_sent(self, now: float) -> None:
        """The frame is on its way: the sequences' side of it."""
        self.sent_at = now
        for (s, _), d in zip(self.seqs[:self.n_decode], self.drafts):
            s.kv_len = s.decode_pos + 1 + int(d.shape[0])
            if s.spec is not None:
                s.spec.drafts = d
        for k in self.forks:
            k.ungroup()   # its KV is its leader's now: from here on it runs alone
        for (s, _), end in zip(self.seqs[self.n_decode:], self.ends):
            if s.snap_slot >= 0:
                s.snap_at, s.snap_slot = 0, -1
            if not s.started:
                if self.spec and s.spec is None and s.may_speculate:
                    s.spec = SpecState.for_prompt(s.req.prompt, s.req.max_tokens, s.generated)
                s.started = True
            s.prefilled = s.kv_len = end
        for s, _ in self.seqs:
            s.in_flight += 1
            s.last_sent = self.sid
            if s.slot in self.ring_slots:
                s.ring = self.sid

    def count(self, stats: Dict[str, int], in_flight: int) -> None:
        """Add this step to a pipeline's counters (``in_flight``: steps in flight with it)."""
        n_spec = sum(1 for d in self.drafts if d.shape[0])
        prefill = len(self.seqs) > self.n_decode
        stats["steps"] += 1
        stats["rows"] += self.rows
        stats["decode_rows"] += self.rows - self.n_prefill
        stats["prefill_rows"] += self.n_prefill
        if n_spec:
            stats["spec_rounds"] += n_spec
            stats["drafted"] += sum(int(d.shape[0]) for d in self.drafts)
            if n_spec < self.n_decode or prefill:  # speculating and plain sequences share the step
                stats["spec_mixed_steps"] += 1
        if self.n_decode and prefill:
            stats["mixed_steps"] += 1
        if self.forks:
            stats["forks"] = stats.get("forks", 0) + len(self.forks)
        stats["max_seqs_in_step"] = max(stats["max_seqs_in_step"], len(self.seqs))
        stats["max_inflight_seen"] = max(stats["max_inflight_seen"], in_flight)


def build_step(sid: int, decode: Sequence[SeqState], prefill: Sequence[Tuple[SeqState, int]], *, lane: int = 0,
               lanes: int = 1, drafts: Optional[Sequence[np.ndarray]] = None, pending_free: Sequence[int] = (),
               spec: bool = False, ring: bool = False) -> Tuple[StepFrame, StepRecord]:
    """Step ``sid`` of lane ``lane``: one row per decoding sequence (its last token, then its ``drafts``), then
    ``take`` rows of each prefilling sequence's feed; frees the slots of ``pending_free`` that live in the lane.

    ``spec``: the pipeline speculates (sequences it starts may send drafts). ``ring``: the stages close the ring
    (:mod:`molink_lite.stage.ring`): decoding sequences of a step without drafts ring, each for as many rounds as
    its ``max_tokens`` leaves. Reads the sequences only; see :meth:`StepRecord.mark_sent` for what changes once the
    frame is sent.
    """
    drafts = list(drafts) if drafts is not None else [_EMPTY] * len(decode)
    seq_p: List[np.ndarray] = []
    pos_p: List[np.ndarray] = []
    tok_p: List[np.ndarray] = []
    out_p: List[np.ndarray] = []
    trim: Dict[int, int] = {}
    draft_map: Dict[int, np.ndarray] = {}
    if decode and not any(d.shape[0] for d in drafts):  # the common case: one row per sequence
        n = len(decode)
        seq_p.append(np.fromiter((s.slot for s in decode), dtype=np.int32, count=n))
        pos_p.append(np.fromiter((s.decode_pos for s in decode), dtype=np.int32, count=n))
        tok_p.append(np.fromiter((s.generated[-1] for s in decode), dtype=np.int32, count=n))
        out_p.append(np.ones(n, dtype=bool))
    else:
        for s, d in zip(decode, drafts):  # the last token, then its drafts at the next positions
            k = int(d.shape[0])
            seq_p.append(np.full(k + 1, s.slot, dtype=np.int32))
            pos_p.append(np.arange(s.decode_pos, s.decode_pos + k + 1, dtype=np.int32))
            tok_p.append(np.concatenate(([s.generated[-1]], d)).astype(np.int32))
            out_p.append(np.ones(k + 1, dtype=bool))
            if k:
                draft_map[s.slot] = np.asarray(d, dtype=np.int32)
    for s in decode:
        if s.kv_len > s.decode_pos:  # drafts rejected last time: every stage drops them first
            trim[s.slot] = s.decode_pos
    start: Dict[int, SeqStart] = {}
    fork: Dict[int, int] = {}
    score: Dict[int, np.ndarray] = {}
    ends: List[int] = []
    wants: List[bool] = []
    forks: List[SeqState] = []
    scoring: List[SeqState] = []
    prompt_only: List[SeqState] = []
    for s, take in prefill:
        n_feed = int(s.feed.shape[0])
        if s.fork_from is not None and not s.started:  # copies its leader's prompt KV, feeds the last token
            a = n_feed - take
            fork[s.slot] = (s.fork_from.slot, a)
            forks.append(s)
        else:
            a = s.prefilled
            if s.reuse_pending:  # the prefix cache: copy (or cut back the adopted slot to) what it reuses
                if s.reuse_adopt:
                    if s.reuse_trim >= 0:
                        trim[s.slot] = s.reuse_trim
                else:
                    fork[s.slot] = (s.reuse_slot, s.reuse_len)
            if s.snap_slot >= 0:  # a branch point it reached is kept as an entry (whole copies)
                fork[s.snap_slot] = (s.slot, s.snap_at)
        b = a + take
        seq_p.append(np.full(take, s.slot, dtype=np.int32))
        pos_p.append(np.arange(a, b, dtype=np.int32))
        tok_p.append(s.feed[a:b])
        last = b == n_feed
        samples = last and s.req.max_tokens > 0  # only a finished prompt's last row wants a token
        if s.scores_prompt:
            scoring.append(s)
            p_last = int(s.req.prompt.shape[0]) - 1  # rows before the prompt's last token predict a prompt token
            out = np.arange(a, b) < p_last
            if a < p_last:
                score[s.slot] = s.req.prompt[a + 1:min(b, p_last) + 1].astype(np.int32)
        else:
            out = np.zeros(take, dtype=bool)
        out[-1] |= samples
        out_p.append(out)
        ends.append(b)
        wants.append(samples)
        if last and not samples:
            prompt_only.append(s)
        if not s.started:
            st = s.start_params()
            start[s.slot] = replace(st, spec=True) if spec and s.spec is None and s.may_speculate else st
    rings: Dict[int, Tuple[int, bool]] = {}
    if ring and not draft_map:
        for s in decode:
            left = s.req.max_tokens - len(s.generated) - 1   # rounds after this step's token
            if left >= 1 and not s.cancelled and not s.finished and s.req.media is None:
                rings[s.slot] = (left, not s.req.ignore_eos)
    frame = StepFrame(sid, _cat(seq_p, np.int32), _cat(pos_p, np.int32), tokens=_cat(tok_p, np.int32),
                      out=_cat(out_p, bool), free=[x for x in pending_free if lane_of(x, lanes) == lane],
                      start=start, trim=trim, drafts=draft_map, lane=lane, fork=fork, score=score, ring=rings)
    seqs = list(decode) + [s for s, _ in prefill]
    if any(s.req.media is not None for s in seqs):
        _media_rows(frame, seqs)
    entries = [(s, True) for s in decode] + [(s, w) for (s, _), w in zip(prefill, wants)]
    rec = StepRecord(sid, entries, n_decode=len(decode), n_prefill=sum(t for _, t in prefill), rows=frame.n,
                     sent=[(s.slot, s.epoch) for s, _ in entries], lane=lane, drafts=drafts, ends=ends, spec=spec,
                     forks=forks, scoring=scoring, prompt_only=prompt_only, ring_slots=set(rings))
    return frame, rec


def _media_rows(frame: StepFrame, seqs: List[SeqState]) -> None:
    """A step with a sequence holding images: name the images whose rows it carries (``media``, per sequence) and
    give every row its 4 M-RoPE positions (``mpos``; rows of sequences without images: (p, p, p, 0))."""
    mpos = text_pos4(frame.pos)
    by_slot = {s.slot: s for s in seqs if s.req.media is not None}
    starts, ends = frame.runs()
    for a, b in zip(starts.tolist(), ends.tolist()):
        s = by_slot.get(int(frame.seq[a]))
        if s is None:
            continue
        p0, p1 = int(frame.pos[a]), int(frame.pos[b]) + 1
        mpos[a:b + 1] = s.req.media.positions(p0, p1)
        ids = s.req.media.images_in(p0, p1)
        if ids:
            frame.media[s.slot] = tuple(ids)
            # the scheduler sends such an image alone (scheduler.plan_step): every stage decodes it non-causally
            frame.noncausal = s.req.media.non_causal
    if any(s.req.media.mrope for s in by_slot.values()):
        frame.mpos = mpos   # 1-D models: an image's rows take one position each, as ``pos`` says


def _cat(parts: List[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
