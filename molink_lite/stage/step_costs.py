"""What a decode step of n rows costs on this stage, measured once when the stage starts.

The gateway sizes speculative steps by it (:class:`molink_lite.serving.speculative.StepCost`): a draft row is worth
sending when the tokens it may add pay for the time it adds. That time is not linear in the rows. On a CPU,
llama.cpp's quantized matrix kernels work on tiles of rows, and rows left over from a tile cost nearly a pass of
their own. Measured for Gemma 3 270M's LM head on one thread (262,144 x 640), ms per step:

  rows  1: 12   2: 33   4: 39   5: 67   8: 55   12: 67   16: 78

So a step of 8 rows costs less than one of 5, and one of 4 about what one of 2 does. A linear fit of the observed
round trips cannot see this, and it kept single streams at 2-3 drafts where 7 pay (BENCHMARKS.md, issue 28).

Every row of the probe outputs: the last stage computes logits for each, as for decode and verify rows. The probe
runs one sequence of lane 0 at positions 0..n-1 and clears the KV cache after each step, before the stage serves.
The hello carries the table (``step_costs``, read by :func:`molink_lite.wire.protocol.parse_step_costs`).
"""

from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import numpy as np

# rows probed, in this order, until the time budget is spent (rows between or after them are interpolated)
ROWS: Tuple[int, ...] = tuple(range(1, 33)) + (40, 48, 56, 64, 96, 128)


def measure(engine, budget_s: float, rows: Sequence[int] = ROWS) -> List[Tuple[int, float]]:
    """(rows, seconds) of one forward step for each count in ``rows`` that fits the engine, until ``budget_s``
    seconds have been spent (at least the first count is measured). A count that is quick to run is timed twice,
    the faster kept (a GPU's first step of a new shape builds its graph)."""
    n_cap = max(1, min(int(engine.n_ctx_lane) - 1, int(engine.n_batch)))
    first = bool(engine.info.is_first)
    rng = np.random.default_rng(0)
    n_top = min(max(rows), n_cap)
    hidden = None if first else (0.1 * rng.standard_normal((n_top, engine.info.n_embd_inp))).astype(np.float32)
    tokens = None if not first else rng.integers(1, max(2, engine.info.n_vocab), n_top).astype(np.int32)

    def step(n: int) -> float:
        seq = np.zeros(n, np.int32)
        pos = np.arange(n, dtype=np.int32)
        out = np.ones(n, np.int8)
        t0 = time.perf_counter()
        try:
            if first:
                engine.forward(seq, pos, tokens=tokens[:n], output_rows=out)
            else:
                engine.forward(seq, pos, hidden=hidden[:n], output_rows=out)
            return time.perf_counter() - t0
        finally:
            engine.clear()

    got: List[Tuple[int, float]] = []
    t_end = time.perf_counter() + budget_s
    step(1)   # warm-up: buffers, first graph
    for n in rows:
        if n > n_cap:
            break
        dt = step(n)
        if dt < budget_s / 64:
            dt = min(dt, step(n))
        got.append((int(n), float(dt)))
        if time.perf_counter() > t_end:
            break
    return got


def summary(table: Sequence[Tuple[int, float]]) -> str:
    """A log line: ms per step at a few of the measured row counts."""
    return ", ".join(f"{n}: {1e3 * s:.1f}" for n, s in table if n in (1, 2, 4, 5, 8, 16, 32, 64, 128))


__all__ = ["measure", "summary", "ROWS"]
