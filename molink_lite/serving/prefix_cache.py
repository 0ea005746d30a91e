"""The prefix cache of one pipeline: finished sequences' KV kept on the stages, and which new sequence reuses what.

A chat client resends the whole conversation with every turn, and agents resend one long system prompt: without
a cache every turn prefills (and sends over every link) all of it again. Here a sequence that ends normally keeps
its slot and KV on every stage as a :class:`CachedPrefix` (the tokens at positions 0..n-1), and a new sequence
whose feed starts with tokens a cached or running sequence holds copies those positions on every stage (a step's
``fork``: ``llama_memory_seq_cp``, which shares the KV cells rather than copying them) and prefills only the rest.

Rules (what a user can count on):

* **A live sequence always wins.** Entries hold slots and KV cells no admitted sequence reserved; admission
  evicts entries, least recently used first, whenever a sequence needs their slot or cells
  (:meth:`PrefixCache.make_room`). Entries never hold more than ``budget`` cells in all (0: any cell not
  reserved).
* **At least one token is prefilled fresh**, so the last stage has logits to sample from.
* **Only a shared prefix is read**: a copy takes positions 0..k-1 where k is the length of the common prefix of
  the two token sequences, so a request never sees another's tokens past what both sent.
* Stages that can only copy all a sequence holds (``prefix_reuse`` "whole": sliding-window attention, recurrent
  state; see :attr:`molink_lite.stage.engine.StageEngine.prefix_reuse`) reuse an entry only when the whole of it
  is a prefix of the new feed, and a running donor only at the point it has prefilled exactly k tokens (it waits
  there for its followers: :func:`molink_lite.serving.scheduler.plan_step`).
* A request that scores its prompt (``echo`` with logprobs) prefills all of it (every row is an output).

The index is a scan over the entries and running sequences (at most ``max_seqs``, 256), each compared with numpy
in one vectorized pass: no trie to keep consistent with evictions, and microseconds per request at these sizes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .sequence import SeqState

MIN_REUSE = 8  # tokens: a shorter common prefix is not worth a copy (nor an entry)
MIN_SNAPSHOT = 32  # whole copies: a branch point shorter than this is not kept as an entry of its own


@dataclass(eq=False)
class CachedPrefix:
    """A finished sequence's KV kept on the stages: ``slot`` holds ``tokens`` at positions 0..len-1."""

    slot: int
    tokens: np.ndarray
    lane: int
    used: int = 0        # LRU clock of its last use
    owner: Any = None    # whose request it was (the API key's index): per-key caches share only within an owner

    @property
    def cells(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Hit:
    """What a new sequence reuses: positions 0..k-1 of ``slot`` (an entry, or ``donor``: a running sequence)."""

    slot: int
    k: int
    lane: int
    entry: Optional[CachedPrefix] = None
    donor: Optional[SeqState] = None


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    m = min(int(a.shape[0]), int(b.shape[0]))
    if m == 0:
        return 0
    eq = a[:m] == b[:m]
    return m if bool(eq.all()) else int(np.argmin(eq))


def kv_tokens(s: SeqState) -> np.ndarray:
    """The tokens a sequence's KV holds for certain on every stage: what it prefilled and decoded, without
    speculative drafts (a step still out with its rows counts: stages apply a lane's steps in order)."""
    if s.prefilling:
        return s.feed[:s.prefilled]
    n = min(s.kv_len, s.decode_pos)
    full = np.concatenate([s.req.prompt, np.asarray(s.generated, dtype=np.int32)]) if s.generated else s.req.prompt
    return full[:n].astype(np.int32, copy=False)


class PrefixCache:
    """The entries of one pipeline (by slot) and the counters; the slot table owns the slots themselves."""

    def __init__(self, enabled: bool = True, budget: int = 0, per_key: bool = False) -> None:
        self.enabled = enabled
        self.per_key = per_key                  # reuse only between requests of one API key (owner)
        self.budget_opt = max(0, int(budget))   # 0: every cell no sequence reserved
        self.budget = 0
        self.whole_only = False                 # set from the stages' hello (prefix_reuse)
        self.entries: Dict[int, CachedPrefix] = {}
        self._clock = itertools.count(1)
        self.stats = {"prefix_lookups": 0, "prefix_hits": 0, "prefix_tokens_reused": 0, "prefix_evictions": 0}

    # ------------------------------------------------------------------ sizing
    def size_for(self, infos: Iterable[dict], n_ctx: int) -> None:
        """A chain (re)connected: nothing is cached on it; copies as its weakest stage allows."""
        self.entries.clear()
        self.whole_only = any(i.get("prefix_reuse", "whole") != "any" for i in infos)
        self.budget = min(self.budget_opt, n_ctx) if self.budget_opt else n_ctx

    def clear(self) -> None:
        self.entries.clear()

    @property
    def cells(self) -> int:
        return sum(e.cells for e in self.entries.values())

    def cells_in(self, lane: int) -> int:
        return sum(e.cells for e in self.entries.values() if e.lane == lane)

    def summary(self) -> dict:
        return {"enabled": self.enabled, "entries": len(self.entries), "cells": self.cells, "budget": self.budget,
                "copies": "whole sequences" if self.whole_only else "any prefix",
                "shared": "per API key" if self.per_key else "between all requests"}

    # ------------------------------------------------------------------ lookups
    def lookup(self, s: SeqState, live: Iterable[SeqState]) -> Optional[Hit]:
        """The longest prefix of ``s``'s feed that an entry or a running sequence (``live``) holds or will hold,
        if worth copying; ties go to entries, then to donors that started first."""
        if not self.enabled or s.fork_from is not None or s.scores_prompt or s.started:
            return None
        feed = s.feed
        limit = int(feed.shape[0]) - 1          # one token is always prefilled fresh
        if limit < MIN_REUSE:
            return None
        self.stats["prefix_lookups"] += 1
        best: Optional[Hit] = None
        for e in self._entries_for(s.req.owner):
            k = min(common_prefix(feed, e.tokens), limit)
            if self.whole_only and k != e.cells:
                continue
            if k >= MIN_REUSE and (best is None or k > best.k):
                best = Hit(e.slot, k, -1, entry=e)
        for d in self._live_for(live, s.req.owner):
            if d is s or d.finished or d.cancelled or d.slot < 0 or d.reuse_pending:
                continue
            k = min(common_prefix(feed, d.feed), limit)
            if self.whole_only and not (d.prefilling and d.prefilled <= k < int(d.feed.shape[0])):
                continue  # it is (or will be) past the shared part before the copy: its KV cannot be cut back
            if k >= MIN_REUSE and (best is None or k > best.k):
                best = Hit(d.slot, k, -1, donor=d)
        return best

    def branch_point(self, s: SeqState, live: Iterable[SeqState]) -> int:
        """Whole copies: the longest prefix ``s`` shares with an entry or a running sequence that no entry holds
        whole (0: none worth keeping). ``s`` keeps that prefix as an entry of its own when its prefill gets there
        (:attr:`SeqState.snap_at`), so the next request with it (a shared system prompt) copies it whole."""
        if not (self.enabled and self.whole_only) or s.fork_from is not None or s.scores_prompt:
            return 0
        feed = s.feed
        limit = int(feed.shape[0]) - 1
        best = 0
        for e in self._entries_for(s.req.owner):
            k = min(common_prefix(feed, e.tokens), limit)
            if k < e.cells:
                best = max(best, k)
        for d in self._live_for(live, s.req.owner):
            if d is not s and not d.finished and d.slot >= 0:
                best = max(best, min(common_prefix(feed, d.feed), limit))
        if best < MIN_SNAPSHOT or best <= s.prefilled or self.holds(feed[:best], s.req.owner):
            return 0
        return best

    def holds(self, tokens: np.ndarray, owner: Any = None) -> bool:
        """An entry (``owner``'s, per key) holds exactly these tokens."""
        n = int(tokens.shape[0])
        return any(e.cells == n and common_prefix(tokens, e.tokens) == n for e in self._entries_for(owner))

    def snapshot(self, slot: int, tokens: np.ndarray, lane: int, owner: Any = None) -> None:
        """A branch point kept as an entry (its copy goes out in the step being built)."""
        self.entries[slot] = CachedPrefix(slot, tokens.astype(np.int32, copy=True), lane, next(self._clock), owner)

    def _entries_for(self, owner: Any) -> Iterable[CachedPrefix]:
        return (e for e in self.entries.values() if not self.per_key or e.owner == owner)

    def _live_for(self, live: Iterable[SeqState], owner: Any) -> Iterable[SeqState]:
        return (d for d in live if not self.per_key or d.req.owner == owner)

    def count_hit(self, hit: Hit) -> None:
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += hit.k
        if hit.entry is not None:
            hit.entry.used = next(self._clock)

    def match_len(self, tokens: np.ndarray, live: Iterable[SeqState], owner: Any = None) -> int:
        """How many tokens of ``tokens`` (a request of ``owner``) this pipeline could reuse now (routing; counts
        nothing)."""
        if not self.enabled:
            return 0
        limit = int(tokens.shape[0]) - 1
        best = 0
        for e in self._entries_for(owner):
            k = min(common_prefix(tokens, e.tokens), limit)
            if not (self.whole_only and k != e.cells):
                best = max(best, k)
        for d in self._live_for(live, owner):
            if not d.finished and d.slot >= 0:
                best = max(best, min(common_prefix(tokens, d.feed), limit))
        return best if best >= MIN_REUSE else 0

    # ------------------------------------------------------------------ entries in and out
    def keep(self, s: SeqState, lane: int, pinned: Callable[[int], bool]) -> Tuple[bool, List[int]]:
        """Keep a sequence that ended normally as an entry: (kept, the slots evicted to make room, to free on the
        stages). Not kept: its own slot is freed as usual."""
        if not self.enabled or not s.started:
            return False, []
        tokens = kv_tokens(s)
        n = int(tokens.shape[0])
        if n < MIN_REUSE or n > self.budget:
            return False, []
        if self.whole_only and s.kv_len != n:   # rejected drafts still in its KV: a whole copy would take them
            return False, []
        evicted: List[int] = []
        if not self.whole_only:  # an entry this one extends is of no more use (a chat's earlier turn)
            for e in list(self.entries.values()):
                if e.cells <= n and common_prefix(tokens, e.tokens) == e.cells and not pinned(e.slot):
                    evicted.append(self._evict(e))
        while self.cells + n > self.budget:
            e = min(self._evictable(None, pinned), key=lambda e: e.used, default=None)
            if e is None:
                return False, evicted
            evicted.append(self._evict(e))
        self.entries[s.slot] = CachedPrefix(s.slot, tokens.copy(), lane, next(self._clock), s.req.owner)
        return True, evicted

    def make_room(self, lane: int, slots_free: int, slots_needed: int, cells_free: int, cells_needed: int,
                  pinned: Callable[[int], bool], spare: Optional[CachedPrefix] = None) -> Optional[List[int]]:
        """Evict entries of ``lane`` (least recently used first, never a pinned one, ``spare`` last) until
        ``slots_needed`` slots and ``cells_needed`` cells are free there; returns the evicted slots, or None (and
        evicts nothing) when even evicting every evictable entry would not do."""
        order = sorted(self._evictable(lane, pinned), key=lambda e: (e is spare, e.used))
        take: List[CachedPrefix] = []
        for e in order:
            if slots_free >= slots_needed and cells_free >= cells_needed:
                break
            take.append(e)
            slots_free += 1
            cells_free += e.cells
        if slots_free < slots_needed or cells_free < cells_needed:
            return None
        return [self._evict(e) for e in take]

    def room(self, lane: int, pinned: Callable[[int], bool]) -> Tuple[int, int]:
        """(slots, cells) that evicting every evictable entry of ``lane`` would free."""
        es = self._evictable(lane, pinned)
        return len(es), sum(e.cells for e in es)

    def _evictable(self, lane: Optional[int], pinned: Callable[[int], bool]) -> List[CachedPrefix]:
        """Entries of ``lane`` (None: any lane) that no sequence waits to copy."""
        return [e for e in self.entries.values() if (lane is None or e.lane == lane) and not pinned(e.slot)]

    def _evict(self, e: CachedPrefix) -> int:
        del self.entries[e.slot]
        self.stats["prefix_evictions"] += 1
        return e.slot
