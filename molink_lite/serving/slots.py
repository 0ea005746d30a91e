"""Sequence slots and KV cells on one pipeline's stages (nano-vllm's ``BlockManager``, vLLM's ``KVCacheManager``).

Every stage holds ``max_seqs`` sequence slots. With ``--lanes L`` slot s lives in lane
:func:`~molink_lite.wire.protocol.lane_of` (s, L), its own llama.cpp context of ``n_ctx_lane`` KV cells on every
stage. Admission reserves a sequence's whole need (prompt + max_tokens) in its lane, so an admitted sequence never
runs out of cache mid-way (which lane: :func:`molink_lite.serving.scheduler.admit`). Releasing a sequence gives its
slot and reservation back; when the stages hold state for it (it started), the slot is also queued to be freed
there, by the next step of its lane.

Nothing here sends anything: :mod:`molink_lite.serving.pipeline` puts the frees into steps.
"""

from __future__ import annotations

from typing import Deque, Dict, Iterable, List, Sequence

from ..wire.protocol import lane_of
from .chain import PipelineError
from .scheduler import admit
from .sequence import SeqState


class SlotTable:
    """Free slots, the sequence holding each busy slot, KV cells reserved per lane, slots to free per lane."""

    def __init__(self) -> None:
        self.lanes = 1
        self.n_ctx_lane = 0              # KV cells of one lane (one lane: the whole cache)
        self.n_ctx = 0                   # KV cells of all lanes
        self.max_seqs = 0
        self.free_slots: List[int] = []
        self.active: Dict[int, SeqState] = {}
        self.kv_lane: List[int] = [0]    # KV cells reserved by the admitted sequences, per lane
        self.pending_free: List[int] = []  # slots of started sequences that are over: the stages drop their KV

    def size_for(self, infos: Sequence[dict], name: str = "") -> None:
        """Sized for a chain just (re)connected (the stages' ``hello``): the fewest slots and KV cells per lane of any
        stage; :class:`PipelineError` when the stages run different lane counts."""
        lanes = {int(i.get("lanes") or 1) for i in infos}
        if len(lanes) > 1:
            raise PipelineError(f"the stages of pipeline {name} run different --lanes ({sorted(lanes)}); "
                                "give every stage of a pipeline the same count")
        self.reset(min(int(i["max_seqs"]) for i in infos), lanes.pop(),
                   min(int(i.get("n_ctx_lane") or i["n_ctx"]) for i in infos))

    def reset(self, max_seqs: int, lanes: int, n_ctx_lane: int) -> None:
        """Every slot free, nothing reserved, nothing to free."""
        self.max_seqs, self.lanes, self.n_ctx_lane, self.n_ctx = max_seqs, lanes, n_ctx_lane, n_ctx_lane * lanes
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.pending_free.clear()
        self.kv_lane = [0] * lanes

    def clear(self) -> List[SeqState]:
        """The chain is gone (its KV with it): forget every sequence here; returns the ones that were active."""
        out = list(self.active.values())
        self.active.clear()
        self.kv_lane = [0] * self.lanes
        self.pending_free.clear()
        return out

    @property
    def kv_reserved(self) -> int:
        """KV cells reserved by the admitted sequences."""
        return sum(self.kv_lane)

    def lane(self, slot: int) -> int:
        return int(lane_of(slot, self.lanes))

    def admit(self, waiting: Deque[SeqState]) -> None:
        """Move waiting sequences (in order) into free slots while their KV reservation fits."""
        admit(waiting, self.free_slots, self.kv_lane, self.n_ctx_lane, self.active)

    def release(self, s: SeqState) -> None:
        """Give the sequence's slot and KV reservation back (nothing if it holds no slot here); a group's choice or
        leader that leaves stops sharing its prefill (:meth:`SeqState.ungroup`)."""
        s.ungroup()
        if s.slot >= 0 and self.active.get(s.slot) is s:
            del self.active[s.slot]
            self.kv_lane[self.lane(s.slot)] -= s.need
            if s.started:
                self.pending_free.append(s.slot)
            self.free_slots.append(s.slot)

    def by_lane(self) -> List[List[SeqState]]:
        """The active sequences of each lane."""
        out: List[List[SeqState]] = [[] for _ in range(self.lanes)]
        for s in self.active.values():
            out[self.lane(s.slot)].append(s)
        return out

    def lanes_freeing(self) -> List[bool]:
        """Per lane: slots wait to be freed on the stages."""
        out = [False] * self.lanes
        for x in self.pending_free:
            out[self.lane(x)] = True
        return out

    def freed(self, slots: Iterable[int]) -> None:
        """These frees went out in a step."""
        sent = set(slots)
        if sent:
            self.pending_free = [x for x in self.pending_free if x not in sent]
