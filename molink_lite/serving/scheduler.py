"""Batch policy: which sequences' rows go into the next step (pure functions over :class:`SeqState`).

Continuous batching: every step carries the rows of many sequences (one row per decoding
sequence, a chunk of prompt for prefilling ones); sequences join and leave between steps. Up to
``micro_batches`` steps travel the chain at once, each holding a disjoint share of the sequences,
so every stage can compute while others send. Long prompts go in ``prefill_chunk``-token chunks
interleaved with decode rows, throttled by :class:`PrefillBudget`. KV space is reserved at
admission (prompt + max_tokens), so an admitted request never runs out of cache mid-way.

Nothing here touches a socket: :mod:`molink_lite.serving.pipeline` sends what this decides. Slots live in
lanes by :func:`~molink_lite.wire.protocol.lane_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from ..wire.protocol import lane_of
from .sequence import SeqState

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


def chunk_for_links(links: Sequence[dict], n_embd: int, codec: str, max_tokens: int) -> int:
    """Prefill chunk for a chain: the smallest of its measured links' (:func:`chunk_for_link`); without
    measurements, min(256, max_tokens)."""
    chunks = [chunk_for_link(k["rtt_ms"] / 1e3, k["mbit"], n_embd, codec, max_tokens) for k in links]
    return min(chunks) if chunks else min(256, max_tokens)


@dataclass
class StepPlan:
    decode: List[SeqState]                 # one row each: its last generated token
    prefill: List[Tuple[SeqState, int]]    # (sequence, rows of its feed to send now)


def admit(waiting: Deque[SeqState], free_slots: List[int], kv_lane: List[int], n_ctx_lane: int,
          active: Dict[int, SeqState], prefix: Optional[Any] = None) -> None:
    """Move waiting sequences (in order) into free slots while their KV reservation fits.

    Stages with lanes hold slot s in lane ``lane_of(s, len(kv_lane))``, each lane with its own KV of
    ``n_ctx_lane`` cells (one lane: the whole cache): each sequence goes to the lane with the fewest sequences
    among those with a free slot and room for its reservation, so the lanes' micro-batches stay even; the first
    that fits no lane waits, and so do the ones behind it.

    A group's leader (n > 1) comes in with its waiting choices (``SeqState.kids``), all in one lane (a fork copies
    KV within a lane's context); each reserves its whole need (the shared prefix is counted per choice).

    ``prefix`` (the slot table when its prefix cache is on, :class:`molink_lite.serving.slots.SlotTable`): cached
    entries hold slots and cells that count as free here, since admitting evicts them (``prefix.make_room``); a
    sequence that reuses a prefix (``prefix.lookup``) goes to the lane holding it when that lane has room, and is
    bound to it (``prefix.bind``).
    """
    lanes = len(kv_lane)
    while waiting and (free_slots or prefix is not None):
        s = waiting[0]
        if s.fork_from is not None:  # its leader is not ahead of it here: it prefills the prompt itself
            s.ungroup()
        group = [s]
        for k in list(s.kids):
            if not k.finished and any(w is k for w in waiting):
                group.append(k)
            else:
                k.ungroup()
        count = [0] * lanes
        for slot in active:
            count[lane_of(slot, lanes)] += 1
        open_slots = [0] * lanes
        for x in free_slots:
            open_slots[lane_of(x, lanes)] += 1
        need = sum(m.need for m in group)

        def fits(i: int) -> bool:
            slots, cells = open_slots[i], n_ctx_lane - kv_lane[i]
            if prefix is not None:
                cells -= prefix.cached_cells(i)
                if slots < len(group) or cells < need:
                    spare_slots, spare_cells = prefix.spare(i)
                    slots, cells = slots + spare_slots, cells + spare_cells
            return slots >= len(group) and cells >= need

        fit = [i for i in range(lanes) if fits(i)]
        if not fit:
            break
        hit = prefix.lookup(s) if prefix is not None else None
        if hit is not None and hit.lane in fit:
            lane = hit.lane
        else:
            hit = None
            lane = min(fit, key=lambda i: (count[i], kv_lane[i]))
        adopt = prefix.make_room(lane, len(group), need, hit) if prefix is not None else None
        slots = sorted(x for x in free_slots if lane_of(x, lanes) == lane)
        if adopt is not None:  # the sequence takes the cached entry's slot, and its KV with it
            slots.remove(adopt)
            slots.insert(0, adopt)
        slots = slots[:len(group)]
        waiting.popleft()
        for m, slot in zip(group, slots):
            if m is not s:
                for i, w in enumerate(waiting):
                    if w is m:
                        del waiting[i]
                        break
            free_slots.remove(slot)
            m.slot = slot
            kv_lane[lane] += m.need
            active[slot] = m
        if prefix is not None:
            prefix.bind(s, hit, adopt is not None)


def is_long(s: SeqState, prefill_chunk: int) -> bool:
    """A feed that takes more than one chunk: the kind whose prefill is throttled while others decode."""
    return int(s.feed.shape[0]) > prefill_chunk


def long_prefill_running(seqs: Iterable[SeqState], prefill_chunk: int) -> bool:
    """A long prompt is being prefilled (what :meth:`PrefillBudget.update` needs to know)."""
    return any(is_long(s, prefill_chunk) and s.prefilling and not s.finished and s.fork_from is None for s in seqs)


def plan_step(active: Iterable[SeqState], micro_batches: int, max_batch_tokens: int, prefill_chunk: int,
              prefill_budget: int, whole_copies: bool = False) -> StepPlan:
    """Rows for the next micro-batch.

    Decoding sequences not in flight, least recently sent first, an even share of them per micro-batch;
    then prompt chunks (oldest request first) in the rows left. While others decode, a long prompt gets at
    most ``prefill_budget`` rows per step in all; short prompts go in one piece (they delay decoders by one
    step at most). A prompt's next chunk may go while its previous chunk is still in flight: stages take
    steps in order, and no chunk but the last waits for a token, so with several micro-batches the chunks
    of one long prompt travel the chain together (stage 0 computes chunk k+1 while stage 1 computes k).

    n > 1: a group's leader prefills its prompt but the last token while its choices wait (``SeqState.kids``);
    then one step carries the leader's last token and, for each choice, a fork of the leader's KV and the same last
    token (all of them, or none while the rows left do not hold them).

    Prefix cache: a sequence reusing a running donor's prefix (``reuse_donor``) waits until the donor has sent the
    rows it copies. ``whole_copies`` (stages that copy only all a sequence holds): the donor stops at the length
    its waiting followers copy and sends nothing until they have copied it.
    """
    live = [s for s in active if not s.finished]
    ready = [s for s in live if (not s.in_flight or s.prefilling) and not s.media_wait]
    for s in sorted((s for s in ready if s.prefilling and s.req.media is not None), key=lambda s: s.t_submit):
        m = s.req.media
        if m.non_causal and m.at_image(s.prefilled):   # Gemma 3: an image is a step of its own (one batch, causal
            take = m.cut(s.prefilled, max_batch_tokens)    # attention off on every stage); decoders wait one step
            if take > 0:
                return StepPlan([], [(s, take)])
    n_decoding = sum(1 for s in live if not s.prefilling)
    per_step = max(1, math.ceil(n_decoding / micro_batches))
    decoding = sorted((s for s in ready if not s.prefilling), key=lambda s: s.last_sent)
    chosen = decoding[:per_step]
    budget = max(0, max_batch_tokens - len(chosen))
    long_budget = prefill_budget if n_decoding else budget
    prefill: List[Tuple[SeqState, int]] = []
    hold: Dict[int, int] = {}        # whole copies: id(donor) -> the shortest prefix a follower waits for
    if whole_copies:
        for s in live:
            if s.reuse_pending and s.reuse_donor is not None:
                d = id(s.reuse_donor)
                hold[d] = min(hold.get(d, 1 << 30), s.reuse_len)
    for s in sorted((s for s in ready if s.prefilling), key=lambda s: s.t_submit):
        if s.fork_from is not None:
            continue                 # goes with its leader
        d = s.reuse_donor
        if s.reuse_pending and d is not None and (not d.started or d.prefilled < s.reuse_len):
            continue                 # its donor has not sent the rows it copies yet
        left = int(s.feed.shape[0]) - s.prefilled
        stop = hold.get(id(s))
        if stop is not None and stop == s.prefilled:
            continue                 # followers copy what it holds now: it goes on once they have
        if s.kids:
            kids = [k for k in s.kids if not k.finished and not k.in_flight]
            if kids and left == 1:   # the group step
                if budget < 1 + len(kids):
                    break            # the rows left go to the group in a later step, before younger prompts
                prefill.append((s, 1))
                prefill.extend((k, 1) for k in kids)
                budget -= 1 + len(kids)
                continue
            if kids:
                left -= 1            # the last token waits for the group step
        take = min(prefill_chunk, left, budget)
        if stop is not None and stop > s.prefilled:
            take = min(take, stop - s.prefilled)   # stops where its followers copy
        if s.snap_at > s.prefilled:
            take = min(take, s.snap_at - s.prefilled)   # and where a branch point is kept (whole copies)
        m = s.req.media
        if m is not None and m.at_image(s.prefilled):
            take = m.cut(s.prefilled, min(left, budget))   # an image goes whole, alone, when the step has room
            long_budget -= take
        else:
            if m is not None:
                take = m.cut(s.prefilled, take)   # text up to the next image
            if is_long(s, prefill_chunk):
                take = min(take, long_budget)
                long_budget -= max(take, 0)
        if take <= 0:
            continue
        prefill.append((s, take))
        budget -= take
    return StepPlan(chosen, prefill)


def next_step(by_lane: Sequence[List[SeqState]], busy: Sequence[int], freeing: Sequence[bool], micro_batches: int,
              max_batch_tokens: int, prefill_chunk: int, prefill_budget: int,
              whole_copies: bool = False) -> Optional[Tuple[int, StepPlan]]:
    """The lane whose step goes next, and its rows; None when no lane has anything to send.

    Lanes with the fewest steps in flight (``busy``) come first; each lane's micro-batches share its sequences
    (``by_lane``) as :func:`plan_step` shares them (one lane: the whole pipeline). A lane with no rows to send but
    slots to free on the stages (``freeing``) sends an empty step, when nothing of it is in flight.
    """
    lanes = len(by_lane)
    per_lane = max(1, max(micro_batches, lanes) // lanes)
    for lane in sorted(range(lanes), key=lambda i: busy[i]):
        plan = plan_step(by_lane[lane], per_lane, max_batch_tokens, prefill_chunk, prefill_budget, whole_copies)
        if plan.decode or plan.prefill or (not busy[lane] and freeing[lane]):
            return lane, plan
    return None


class PrefillBudget:
    """AIMD on the prompt rows allowed per step while sequences decode (chunked-prefill interleaving).

    ``update(itl, long_prompt_running)`` takes the longest inter-token interval the decoding sequences of
    the step just finished saw. With no long prompt being prefilled it updates the baseline; during one the
    budget is halved when decoders wait more than INTERLEAVE_SLOWDOWN x the baseline, else it grows by a
    quarter, within [MIN_PREFILL_ROWS, chunk].
    """

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.rows = min(32, chunk)
        self.t_decode_step: Optional[float] = None  # moving average of inter-token time without prefill (s)

    def set_chunk(self, chunk: int) -> None:
        self.chunk = chunk
        self.rows = min(self.rows, chunk)

    def update(self, itl: Optional[float], long_prompt_running: bool) -> None:
        if itl is None:
            return
        if not long_prompt_running:
            t = self.t_decode_step
            self.t_decode_step = itl if t is None else 0.8 * t + 0.2 * itl
        elif self.t_decode_step is not None:
            if itl > INTERLEAVE_SLOWDOWN * self.t_decode_step:
                self.rows = max(MIN_PREFILL_ROWS, self.rows // 2)
            else:
                self.rows = min(self.chunk, self.rows + max(4, self.rows // 4))
