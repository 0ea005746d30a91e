"""The stage's check of a step frame: the frame itself (:meth:`~molink_lite.wire.protocol.StepFrame.decode`,
against this stage's :class:`~molink_lite.wire.protocol.FrameLimits`), then against where its sequences stand
here (positions held, trims).

A frame that fails gets an error reply; nothing in it has been applied (no free, no sampler start, no KV
entry), so one bad frame can neither abort the process nor poison a sequence slot. Pure functions over numpy
arrays: unit-testable without sockets or a model.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..wire.protocol import MAX_DRAFT, FrameLimits, StepError, StepFrame

StepLimits = FrameLimits  # the name the stage used before the protocol module held it


def check_step(meta: dict, arrays: Dict[str, np.ndarray], lim: FrameLimits, seq_len: np.ndarray,
               whole_only: bool = False) -> StepFrame:
    """Decode and check one step frame; ``seq_len[s]`` is how many positions sequence ``s`` holds on this stage.

    Changes apply in this order: frees, trims, forks, then the rows. Rows of a sequence must continue it where it
    stands after them; trims may only shorten what a sequence holds; a fork's child must hold nothing (after
    the frees and trims) and then holds the n positions it copies, at most what its parent holds (``whole_only``:
    exactly that)."""
    frame = StepFrame.decode(meta, arrays, lim)
    frame.trim = _checked_trim(frame.trim, frame.free, seq_len)
    if frame.n == 0 and not frame.fork:
        return frame
    held = seq_len.copy()
    if frame.free:
        held[frame.free] = 0
    if frame.trim:
        held[list(frame.trim)] = list(frame.trim.values())
    if frame.fork:
        for child, (parent, n) in frame.fork.items():
            if held[child]:
                raise StepError(f"'fork' to sequence {child}, which holds {int(held[child])} positions here (a "
                                f"fork's child must hold nothing: free it first)")
            if n > held[parent] or (whole_only and n != held[parent]):
                raise StepError(f"'fork' of {n} positions of sequence {parent}, which holds {int(held[parent])} "
                                f"here" + (" (this stage copies only all a sequence holds)" if whole_only else ""))
        for child, (parent, n) in frame.fork.items():  # no sequence is both a child and a parent in one step
            held[child] = n
    if frame.n == 0:
        return frame
    starts, _ = frame.runs()
    s0 = frame.seq[starts]
    bad = frame.pos[starts] != held[s0]
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise StepError(f"sequence {int(s0[i])} holds {int(held[s0[i]])} positions here; a step may not "
                        f"continue it at position {int(frame.pos[starts[i]])}")
    return frame


def _checked_trim(trim: Dict[int, int], free: List[int], seq_len: np.ndarray) -> Dict[int, int]:
    """Trims may only shorten what a sequence holds here (after this step's frees)."""
    freed = set(free)
    for s, p in trim.items():
        held = 0 if s in freed else int(seq_len[s])
        if p > held:
            raise StepError(f"'trim' of sequence {s} to {p} positions: it holds only {held} here")
    return trim


__all__ = ["MAX_DRAFT", "StepError", "StepLimits", "FrameLimits", "check_step"]
