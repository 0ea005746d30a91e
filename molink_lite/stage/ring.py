"""Closing the ring on a stage: the last stage sends each sampled token straight to the first stage.

Without it a token costs a trip around the stages and one more through the gateway (result in, next step out).
With it the gateway marks decode rows of a step with ``ring`` (:class:`~molink_lite.wire.protocol.StepFrame`:
rounds left, and whether an end-of-generation token ends the sequence); the last stage samples as always, sends
the gateway its result, and sends the first stage the next ``round`` of the same step: one decode row per
sequence that goes on. The gateway still gets every token (streaming, stop strings, bookkeeping) and stays in
charge: it never names a ringed sequence in a step of its own until a result says the sequence ``left`` the ring,
and it asks the last stage to let sequences go (:class:`~molink_lite.wire.protocol.RingStop`) when a stop string
matched, a client went away, or it has new work to batch with them.

Two halves, one per end of the ring:

* :class:`RingGate` (first stage): which ringed sequences may take a round from the ring link, and with how many
  rounds left. Only the gateway's own steps grant rounds; every round must spend one; a gateway step that names
  a sequence again takes back what was granted. A round from the ring link for anything else is rejected.
* :class:`RingTurn` (last stage): after sampling, which ringed sequences go on (rounds left, no end of generation,
  not stopped), the next round's frame, and which sequences left.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Set, Tuple

import numpy as np

from ..wire.protocol import StepError, StepFrame


class RingGate:
    """The first stage's grants: sequence ``s`` may take ``left[s]`` more rounds (-1: none) of the ring of step
    ``ring_of[s]``, ending at an end-of-generation token if ``eog[s]``."""

    def __init__(self, n_seq_max: int):
        self.left = np.full(n_seq_max, -1, dtype=np.int64)
        self.ring_of = np.full(n_seq_max, -1, dtype=np.int64)
        self.eog = np.zeros(n_seq_max, dtype=bool)

    def from_gateway(self, frame: StepFrame) -> None:
        """A step from the gateway (checked): whatever it names loses its grant; its ringed rows get new ones."""
        named = frame.named()
        if named:
            idx = np.fromiter(named, dtype=np.int64, count=len(named))
            self.left[idx] = -1
        for s, (b, e) in frame.ring.items():
            self.left[s], self.ring_of[s], self.eog[s] = b, frame.step, e

    def check_round(self, frame: StepFrame) -> None:
        """A round from the ring link (checked as a frame): every sequence must hold a grant of this ring with
        more rounds left than the round claims, and the same end-of-generation rule; :class:`StepError` else."""
        if frame.round < 1 or not frame.ring:
            raise StepError("the ring link sends only ring rounds (round >= 1)")
        for s, (b, e) in frame.ring.items():
            if self.left[s] < 0 or self.ring_of[s] != frame.step:
                raise StepError(f"sequence {s} has no ring {frame.step} here")
            if b >= self.left[s] or e != bool(self.eog[s]):
                raise StepError(f"sequence {s}: a ring round must spend one of the {int(self.left[s])} rounds the "
                                f"gateway granted, under the same end-of-generation rule")

    def spend(self, frame: StepFrame) -> None:
        """A round passed the check: its sequences have the rounds it claims left."""
        for s, (b, _) in frame.ring.items():
            self.left[s] = b

    def forget(self, seqs) -> None:
        idx = np.asarray(list(seqs), dtype=np.int64)
        if idx.size:
            self.left[idx] = -1


class RingTurn:
    """The last stage's end of the ring: ``stops[step]``: sequences the gateway asked to let go of ring ``step``."""

    MAX_STOPS = 4096   # rings with stops kept (a stop may come before the ring's first round reached this stage)

    def __init__(self) -> None:
        self.stops: Dict[int, Set[int]] = {}
        self.ended: Deque[int] = deque(maxlen=self.MAX_STOPS)   # rings over (a stop for one of them is stale)
        self._ended: Set[int] = set()

    def stop(self, step: int, seqs) -> None:
        if step in self._ended:
            return
        if step not in self.stops and len(self.stops) >= self.MAX_STOPS:
            del self.stops[min(self.stops)]   # the oldest: a ring long over, or a stop for a step that never rang
        self.stops.setdefault(step, set()).update(int(s) for s in seqs)

    def _end(self, step: int) -> None:
        self.stops.pop(step, None)
        if len(self.ended) == self.ended.maxlen:
            self._ended.discard(self.ended[0])
        self.ended.append(step)
        self._ended.add(step)

    def turn(self, frame: StepFrame, out_seq: np.ndarray, out_pos: np.ndarray, tokens: np.ndarray,
             eog: np.ndarray) -> Tuple[Optional[StepFrame], List[int], bool]:
        """(the next round or None, sequences that left the ring, whether the ring is over) for a sampled step;
        ``out_seq``/``out_pos``/``tokens``/``eog``: one per sampled token (a ringed sequence samples one)."""
        if not frame.ring:
            return None, [], False
        last = {s: i for i, s in enumerate(out_seq.tolist())}   # each ringed sequence's (last) token
        stops = self.stops.get(frame.step, ())
        go: List[int] = []
        left: List[int] = []
        for s, (b, e) in frame.ring.items():
            i = last.get(s)
            if i is None or b <= 0 or s in stops or (e and bool(eog[i])):
                left.append(s)
            else:
                go.append(i)
        if not go:
            self._end(frame.step)
            return None, sorted(left), True
        rows = np.asarray(sorted(go, key=lambda i: int(out_seq[i])), dtype=np.int64)
        seq = out_seq[rows].astype(np.int32)
        nxt = StepFrame(frame.step, seq, (out_pos[rows] + 1).astype(np.int32), tokens=tokens[rows].astype(np.int32),
                        out=np.ones(rows.shape[0], dtype=bool), lane=frame.lane, round=frame.round + 1,
                        ring={int(s): (frame.ring[int(s)][0] - 1, frame.ring[int(s)][1]) for s in seq.tolist()})
        return nxt, sorted(left), False

    def forget_all(self) -> None:
        self.stops.clear()


__all__ = ["RingGate", "RingTurn"]
