"""Checks every field of a step frame against the stage's configuration before llama.cpp sees it.

A frame that fails gets an error reply; nothing in it has been applied (no free, no sampler
start, no KV entry), so one bad frame can neither abort the process nor poison a sequence slot.
Pure functions over numpy arrays: unit-testable without sockets or a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from .sampling import SamplingError, SamplingParams


MAX_DRAFT = 32  # draft tokens one sequence may carry in one step (speculative decoding)


class StepError(ValueError):
    """A step frame that cannot be run (missing, inconsistent or out-of-range fields)."""


@dataclass(frozen=True)
class StepLimits:
    """What this stage accepts."""

    n_seq_max: int
    n_ctx: int
    max_rows: int
    n_vocab: int
    n_embd_inp: int
    is_first: bool
    is_last: bool

    def max_frame_bytes(self) -> int:
        """Largest step frame this stage can be sent (f32 hidden rows plus ids), with room for the header."""
        return self.max_rows * (self.n_embd_inp * 4 + 16) + (1 << 20)


@dataclass
class StepPlan:
    """A checked step: what to free, which samplers to start, and the rows."""

    free: List[int]
    start: Dict[int, Tuple[SamplingParams, List[int]]]  # sampler settings and tokens generated before (replay)
    seq: np.ndarray               # int32 [n]
    pos: np.ndarray               # int32 [n]
    tokens: Optional[np.ndarray]  # int32 [n] (first stage)
    hidden: Optional[np.ndarray]  # float [n, n_embd_inp] (later stages)
    out: Optional[np.ndarray]     # bool [n]
    run_starts: np.ndarray        # index of each sequence's first row
    run_ends: np.ndarray          # index of each sequence's last row
    trim: Dict[int, int] = field(default_factory=dict)            # seq -> drop its KV from this position on
    drafts: Dict[int, np.ndarray] = field(default_factory=dict)   # seq -> draft tokens (its last rows) to verify
    spec: Set[int] = field(default_factory=set)                   # started sequences that sample for verification

    @property
    def n(self) -> int:
        return int(self.seq.shape[0])


_ARRAYS = {"seq", "pos", "tokens", "hidden", "out"}


def _int_list(v: object, what: str, hi: int) -> List[int]:
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > hi:
        raise StepError(f"'{what}' must be a list of at most {hi} sequence ids")
    for s in v:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < hi:
            raise StepError(f"'{what}' holds {s!r}: sequence ids are integers in 0..{hi - 1}")
    return list(v)


def _ints(arrays: Dict[str, np.ndarray], name: str, n: Optional[int]) -> np.ndarray:
    a = arrays.get(name)
    if a is None:
        raise StepError(f"step frame needs a '{name}' array")
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise StepError(f"'{name}' must be a 1-D integer array, got {a.dtype} {tuple(a.shape)}")
    if n is not None and a.shape[0] != n:
        raise StepError(f"'{name}' has {a.shape[0]} rows, 'seq' has {n}")
    return a


def check_step(meta: dict, arrays: Dict[str, np.ndarray], lim: StepLimits, seq_len: np.ndarray) -> StepPlan:
    """Validate one step frame; ``seq_len[s]`` is how many positions sequence ``s`` holds on this stage.

    Rows of one sequence must be contiguous, at consecutive positions, and continue the sequence
    where it stands (after this step's frees), all below the context size.
    """
    step = meta.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise StepError("'step' must be an integer")
    extra = set(arrays) - _ARRAYS
    if extra:
        raise StepError(f"unknown array(s) {sorted(extra)} in a step frame")
    free = _int_list(meta.get("free"), "free", lim.n_seq_max)
    tok_hi = lim.n_vocab if lim.n_vocab > 1 else 2**31 - 1  # middle stages hold no vocabulary
    start_raw = meta.get("start")
    start: Dict[int, Tuple[SamplingParams, List[int]]] = {}
    spec_start: Set[int] = set()
    if start_raw is not None:
        if not isinstance(start_raw, dict) or len(start_raw) > lim.n_seq_max:
            raise StepError(f"'start' must map at most {lim.n_seq_max} sequence ids to sampling parameters")
        for k, v in start_raw.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < lim.n_seq_max):
                raise StepError(f"'start' key {k!r} is not a sequence id in 0..{lim.n_seq_max - 1}")
            try:
                params = SamplingParams.from_dict(v).validate()
            except (SamplingError, TypeError, ValueError) as e:
                raise StepError(f"sampling parameters of sequence {k}: {e}") from None
            history = v.get("history") or []
            if (not isinstance(history, list) or len(history) > lim.n_ctx
                    or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok_hi for t in history)):
                raise StepError(f"'history' of sequence {k} must be at most {lim.n_ctx} token ids in "
                                f"0..{tok_hi - 1}")
            start[int(k)] = (params, history)
            spec = v.get("spec", False)
            if not isinstance(spec, bool):
                raise StepError(f"'spec' of sequence {k} must be true or false")
            if spec:
                spec_start.add(int(k))
    trim = _seq_map(meta.get("trim"), "trim", lim.n_seq_max)
    for s, p in trim.items():
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < lim.n_ctx:
            raise StepError(f"'trim' of sequence {s} must be a position in 0..{lim.n_ctx - 1}")
    drafts_raw = _seq_map(meta.get("drafts"), "drafts", lim.n_seq_max)
    drafts: Dict[int, np.ndarray] = {}
    for s, d in drafts_raw.items():
        if (not isinstance(d, list) or not 1 <= len(d) <= MAX_DRAFT
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok_hi for t in d)):
            raise StepError(f"'drafts' of sequence {s} must be 1..{MAX_DRAFT} token ids in 0..{tok_hi - 1}")
        drafts[s] = np.asarray(d, dtype=np.int32)

    seq = _ints(arrays, "seq", None)
    n = int(seq.shape[0])
    pos = _ints(arrays, "pos", n)
    if n > lim.max_rows:
        raise StepError(f"{n} rows in one step; this stage takes at most {lim.max_rows}")
    empty = np.zeros(0, np.int64)
    if n == 0:
        if drafts:
            raise StepError("'drafts' names sequences without rows in this step")
        return StepPlan(free, start, seq.astype(np.int32), pos.astype(np.int32), None, None, None, empty, empty,
                        _checked_trim(trim, free, seq_len), {}, spec_start)
    if int(seq.min()) < 0 or int(seq.max()) >= lim.n_seq_max:
        raise StepError(f"sequence ids must be in 0..{lim.n_seq_max - 1}")
    if int(pos.min()) < 0 or int(pos.max()) >= lim.n_ctx:
        raise StepError(f"positions must be in 0..{lim.n_ctx - 1} (the context size)")
    seq = seq.astype(np.int32, copy=False)
    pos = pos.astype(np.int32, copy=False)
    change = seq[1:] != seq[:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    ends = np.concatenate((starts[1:] - 1, [n - 1]))
    if starts.shape[0] != np.unique(seq).shape[0]:
        raise StepError("the rows of each sequence must be contiguous in a step")
    if np.any(np.diff(pos)[~change] != 1):
        raise StepError("positions must increase by one within each sequence")
    held = seq_len.copy()
    if free:
        held[free] = 0
    trim = _checked_trim(trim, free, seq_len)
    if trim:
        held[list(trim)] = list(trim.values())
    s0 = seq[starts]
    if np.any(pos[starts] != held[s0]):
        i = int(np.flatnonzero(pos[starts] != held[s0])[0])
        raise StepError(f"sequence {int(s0[i])} holds {int(held[s0[i]])} positions here; a step may not "
                        f"continue it at position {int(pos[starts[i]])}")

    tokens = hidden = None
    if lim.is_first:
        if "hidden" in arrays:
            raise StepError("the first stage takes token ids, not hidden states")
        tokens = _ints(arrays, "tokens", n)
        if int(tokens.min()) < 0 or int(tokens.max()) >= lim.n_vocab:
            raise StepError(f"token ids must be in 0..{lim.n_vocab - 1}")
        tokens = tokens.astype(np.int32, copy=False)
    else:
        if "tokens" in arrays:
            raise StepError("this stage takes hidden states, not token ids")
        hidden = arrays.get("hidden")
        if hidden is None:
            raise StepError("step frame needs a 'hidden' array")
        if hidden.shape != (n, lim.n_embd_inp) or not np.issubdtype(hidden.dtype, np.floating):
            raise StepError(f"'hidden' must be float [{n}, {lim.n_embd_inp}], got {hidden.dtype} {tuple(hidden.shape)}")
        if not np.isfinite(hidden).all():
            raise StepError("'hidden' holds NaN or infinite values")
    out = arrays.get("out")
    if out is not None:
        out = _ints(arrays, "out", n)
        if int(out.min()) < 0 or int(out.max()) > 1:
            raise StepError("'out' must hold 0 or 1 per row")
        out = out.astype(bool)
    if drafts:
        if out is None:
            raise StepError("a step with 'drafts' needs an 'out' array")
        row_of = {int(x): i for i, x in enumerate(s0.tolist())}
        for s, d in drafts.items():
            i = row_of.get(s)
            if i is None:
                raise StepError(f"'drafts' names sequence {s}, which has no rows in this step")
            a, b, k = int(starts[i]), int(ends[i]), int(d.shape[0])
            if b - a < k:
                raise StepError(f"sequence {s} carries {k} drafts in {b - a + 1} rows (needs at least {k + 1})")
            if not out[b - k:b + 1].all() or out[a:b - k].any():
                raise StepError(f"sequence {s}: exactly its last {k + 1} rows (last token and drafts) must be outputs")
            if tokens is not None and not np.array_equal(tokens[b - k + 1:b + 1], d):
                raise StepError(f"sequence {s}: 'drafts' differ from the tokens of its last {k} rows")
    return StepPlan(free, start, seq, pos, tokens, hidden, out, starts, ends, trim, drafts, spec_start)


def _seq_map(v: object, what: str, n_seq_max: int) -> Dict[int, object]:
    """A JSON object keyed by sequence ids (as strings)."""
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > n_seq_max:
        raise StepError(f"'{what}' must map at most {n_seq_max} sequence ids to values")
    out: Dict[int, object] = {}
    for k, x in v.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) < 6 and int(k) < n_seq_max):
            raise StepError(f"'{what}' key {k[:20]!r} is not a sequence id in 0..{n_seq_max - 1}")
        out[int(k)] = x
    return out


def _checked_trim(trim: Dict[int, object], free: List[int], seq_len: np.ndarray) -> Dict[int, int]:
    """Trims may only shorten what a sequence holds here (after this step's frees)."""
    freed = set(free)
    for s, p in trim.items():
        held = 0 if s in freed else int(seq_len[s])
        if p > held:
            raise StepError(f"'trim' of sequence {s} to {p} positions: it holds only {held} here")
    return {s: int(p) for s, p in trim.items()}


__all__ = ["StepError", "StepLimits", "StepPlan", "check_step"]

