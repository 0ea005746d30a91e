"""Sequence slots and KV cells on one pipeline's stages (nano-vllm's ``BlockManager``, vLLM's ``KVCacheManager``).

Every stage holds ``max_seqs`` sequence slots. With ``--lanes L`` slot s lives in lane
:func:`~molink_lite.wire.protocol.lane_of` (s, L), its own llama.cpp context of ``n_ctx_lane`` KV cells on every
stage. Admission reserves a sequence's whole need (prompt + max_tokens) in its lane, so an admitted sequence never
runs out of cache mid-way (which lane: :func:`molink_lite.serving.scheduler.admit`). Releasing a sequence gives its
slot and reservation back; when the stages hold state for it (it started), the slot is also queued to be freed
there, by the next step of its lane.

The prefix cache (:mod:`molink_lite.serving.prefix_cache`) lives here too: a sequence that ends normally may keep
its slot and KV as a cached entry instead of being freed; admission evicts entries whenever a sequence needs their
slot or cells (the table is the ``prefix`` hooks of :func:`~molink_lite.serving.scheduler.admit`).

Nothing here sends anything: :mod:`molink_lite.serving.pipeline` puts the frees into steps.
"""

from __future__ import annotations

from typing import Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from ..wire.protocol import lane_of
from .chain import PipelineError
from .prefix_cache import MIN_SNAPSHOT, Hit, PrefixCache
from .scheduler import admit
from .sequence import SeqState


class SlotTable:
    """Free slots, the sequence holding each busy slot, KV cells reserved per lane, slots to free per lane."""

    def __init__(self, prefix_cache: bool = True, prefix_cache_cells: int = 0, per_key: bool = False) -> None:
        self.cache = PrefixCache(prefix_cache, prefix_cache_cells, per_key)
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
        self.cache.size_for(infos, self.n_ctx)

    def reset(self, max_seqs: int, lanes: int, n_ctx_lane: int) -> None:
        """Every slot free, nothing reserved, nothing to free."""
        self.max_seqs, self.lanes, self.n_ctx_lane, self.n_ctx = max_seqs, lanes, n_ctx_lane, n_ctx_lane * lanes
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.pending_free.clear()
        self.kv_lane = [0] * lanes
        self.cache.clear()

    def clear(self) -> List[SeqState]:
        """The chain is gone (its KV with it): forget every sequence here; returns the ones that were active."""
        out = list(self.active.values())
        self.active.clear()
        self.kv_lane = [0] * self.lanes
        self.pending_free.clear()
        for slot in self.cache.entries:
            self.free_slots.append(slot)
        self.cache.clear()
        return out

    @property
    def kv_reserved(self) -> int:
        """KV cells reserved by the admitted sequences."""
        return sum(self.kv_lane)

    def lane(self, slot: int) -> int:
        return int(lane_of(slot, self.lanes))

    def admit(self, waiting: Deque[SeqState]) -> None:
        """Move waiting sequences (in order) into free slots while their KV reservation fits (evicting cached
        entries as needed)."""
        admit(waiting, self.free_slots, self.kv_lane, self.n_ctx_lane, self.active,
              self if self.cache.enabled else None)

    def release(self, s: SeqState, cache: bool = False) -> None:
        """Give the sequence's slot and KV reservation back (nothing if it holds no slot here); a group's choice or
        leader that leaves stops sharing its prefill (:meth:`SeqState.ungroup`). ``cache``: it ended normally, so
        its KV may stay on the stages as a prefix cache entry."""
        s.ungroup()
        if s.slot >= 0 and self.active.get(s.slot) is s:
            del self.active[s.slot]
            self.kv_lane[self.lane(s.slot)] -= s.need
            kept = False
            if s.started:
                if cache and s.req.media is None:   # no prefix entries with images (their rows name no image)
                    kept, evicted = self.cache.keep(s, self.lane(s.slot), self.pinned().__contains__)
                    self._free(evicted)
                if not kept:
                    self.pending_free.append(s.slot)
            elif s.reuse_adopt:  # it took a cached entry's slot but never ran: the stages still hold that KV
                self.pending_free.append(s.slot)
            if not kept:
                self.free_slots.append(s.slot)
            self._orphans(s, kept)

    def _orphans(self, donor: SeqState, kept: bool) -> None:
        """Sequences waiting to copy a prefix of a sequence that just left: they copy its cached entry (same slot)
        when it was kept and holds what they need, else they prefill everything themselves."""
        entry = self.cache.entries.get(donor.slot) if kept else None
        for x in self.active.values():
            if x.reuse_donor is donor and x.reuse_pending:
                if entry is not None and (entry.cells == x.reuse_len or
                                          (entry.cells > x.reuse_len and not self.cache.whole_only)):
                    x.reuse_donor = None
                else:
                    x.drop_reuse()

    def _free(self, slots: Iterable[int]) -> None:
        for x in slots:
            self.pending_free.append(x)
            self.free_slots.append(x)

    # ------------------------------------------------------------------ the prefix hooks of scheduler.admit
    def pinned(self) -> set:
        """Entries a sequence waits to copy (they may not be evicted before the copy has gone out)."""
        return {x.reuse_slot for x in self.active.values() if x.reuse_pending and x.slot != x.reuse_slot}

    def lookup(self, s: SeqState) -> Optional[Hit]:
        if s.req.media is not None:   # a prompt with images reuses no prefix (its -1 rows name no image)
            return None
        hit = self.cache.lookup(s, self.active.values())
        if hit is not None:
            hit.lane = self.lane(hit.slot)
        return hit

    def cached_cells(self, lane: int) -> int:
        return self.cache.cells_in(lane)

    def spare(self, lane: int) -> Tuple[int, int]:
        return self.cache.room(lane, self.pinned().__contains__)

    def make_room(self, lane: int, n_slots: int, need: int, hit: Optional[Hit]) -> Optional[int]:
        """Evict entries of ``lane`` until ``n_slots`` slots and ``need`` cells are free there; the hit's entry goes
        last, and when it must go its slot is returned: the hit's sequence takes it, KV and all (not freed)."""
        open_slots = sum(1 for x in self.free_slots if self.lane(x) == lane)
        cells = self.n_ctx_lane - self.kv_lane[lane] - self.cache.cells_in(lane)
        spare = hit.entry if hit is not None else None
        pinned = self.pinned().__contains__
        evicted = self.cache.make_room(lane, open_slots, n_slots, cells, need, pinned, spare) or []
        adopt = None
        for x in evicted:
            if spare is not None and x == spare.slot:
                adopt = x
                self.free_slots.append(x)
                self.cache.stats["prefix_evictions"] -= 1   # taken over, not evicted
            else:
                self._free([x])
        return adopt

    def bind(self, s: SeqState, hit: Optional[Hit], adopted: bool) -> None:
        """``s`` (just admitted) reuses the hit's prefix: its first step copies it (or cuts the adopted slot). With
        whole copies, a branch point it shares with others becomes an entry when a prefill gets there."""
        if hit is not None:
            s.reuse_slot, s.reuse_len, s.reuse_donor = hit.slot, hit.k, hit.donor
            s.prefilled = hit.k
            if adopted:
                s.reuse_adopt = True
                s.reuse_trim = hit.k if hit.entry is not None and hit.entry.cells > hit.k else -1
            self.cache.count_hit(hit)
            d = hit.donor
            if (d is not None and self.cache.whole_only and hit.k > d.prefilled and hit.k >= MIN_SNAPSHOT
                    and not self.cache.holds(d.feed[:hit.k], d.req.owner)):
                d.snap_at = min(d.snap_at, hit.k) if d.snap_at > d.prefilled else hit.k
        k = self.cache.branch_point(s, self.active.values())
        if k:
            s.snap_at = k

    def snapshot_slot(self, s: SeqState) -> None:
        """``s`` reached its branch point (its step is being built): a free slot of its lane keeps those positions
        as an entry (``s.snap_slot``; the step copies them), if one is free and the cells fit; else nothing."""
        lane, k = self.lane(s.slot), s.snap_at
        slots = [x for x in self.free_slots if self.lane(x) == lane]
        room = self.n_ctx_lane - self.kv_lane[lane] - self.cache.cells_in(lane)
        if (not slots or k > room or self.cache.cells + k > self.cache.budget
                or self.cache.holds(s.feed[:k], s.req.owner)):
            s.snap_at = 0
            return
        slot = max(slots)
        self.free_slots.remove(slot)
        s.snap_slot = slot
        self.cache.snapshot(slot, s.feed[:k], lane, s.req.owner)

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
