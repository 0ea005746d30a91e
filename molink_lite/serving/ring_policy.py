"""When the gateway lets rings go (closing the ring: :mod:`molink_lite.stage.ring`).

A ring keeps its sequences going around the stages without the gateway, so the gateway no longer re-batches them
every step. It ends rings (asks the last stage to let their sequences go, which takes effect within a round) when
batching them again is worth a trip through the gateway:

* sequences wait for a step and every micro-batch in flight is a ring (a new prompt, a prompt that just ended);
* the rings are out of balance: more or fewer rings than micro-batches (while there are sequences for each), or one
  ring over twice the size of another (the stages would take turns on a large and a small batch).

One ring ends at a time, and nothing is decided while a plain step or an ending ring is in flight: it comes back
within a round, and the scheduler batches again then (an even share of the decoding sequences per micro-batch, as
without rings). A pure function over the steps in flight (:class:`~.step_builder.StepRecord`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from .step_builder import StepRecord


def ring_to_stop(inflight: Iterable[StepRecord], micro_batches: int,
                 work_waiting: Callable[[], bool]) -> Optional[StepRecord]:
    """The ring to end now, or None: one at a time, so the others keep going while it comes back.

    ``work_waiting()``: sequences wait for a step the micro-batches have no room for (asked only when a ring could
    end: it plans a step); the smallest ring ends, and its
    sequences are batched with them. Out of balance: the largest ring ends when there are too few rings or one is
    over twice another's size (its sequences come back as an even share, and what is left over waits for the next
    ring to end), the smallest when there are more rings than micro-batches."""
    recs = list(inflight)
    rings = [r for r in recs if r.ring_slots]
    if not rings or len(rings) < len(recs) or any(r.stopping for r in rings):
        return None
    smallest = min(rings, key=lambda r: len(r.ring_slots))
    largest = max(rings, key=lambda r: len(r.ring_slots))
    if len(rings) > micro_batches or work_waiting():
        return smallest
    sizes = [len(r.ring_slots) for r in rings]
    if len(rings) < min(micro_batches, sum(sizes)) or max(sizes) > 2 * min(sizes) + 1:
        return largest
    return None


__all__ = ["ring_to_stop"]
