"""When the gateway lets rings go (closing the ring: :mod:`molink_lite.stage.ring`).

A ring keeps its sequences going around the stages without the gateway, so the gateway no longer re-batches them
every step. It ends rings (asks the last stage to let their sequences go, which takes effect within a round) when
batching them again is worth a trip through the gateway:

* sequences wait for a step and every micro-batch in flight is a ring (a new prompt, a prompt that just ended);
* the rings are out of balance: more or fewer rings than micro-batches (while there are sequences for each), or one
  ring over twice the size of another (the stages would take turns on a large and a small batch).

Nothing is decided while a plain step or an ending ring is in flight: it comes back within a round, and the
scheduler batches again then. Pure functions over the steps in flight (:class:`~.step_builder.StepRecord`).
"""

from __future__ import annotations

from typing import Iterable, List

from .step_builder import StepRecord


def settling(inflight: Iterable[StepRecord]) -> bool:
    """A ring is ending: its sequences come back within a round, and the next steps wait for them (so that all are
    batched together, evenly)."""
    return any(r.stopping for r in inflight)


def rings_to_stop(inflight: Iterable[StepRecord], micro_batches: int, work_waiting: bool) -> List[StepRecord]:
    """The rings to end now (all or none). ``work_waiting``: sequences wait for a step the micro-batches have no
    room for."""
    recs = list(inflight)
    rings = [r for r in recs if r.ring_slots]
    if not rings or len(rings) < len(recs) or any(r.stopping for r in rings):
        return []
    if work_waiting:
        return rings
    sizes = [len(r.ring_slots) for r in rings]
    if len(rings) != min(micro_batches, sum(sizes)) or max(sizes) > 2 * min(sizes) + 1:
        return rings
    return []


__all__ = ["rings_to_stop", "settling"]
