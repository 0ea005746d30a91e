"""Link-aware defaults: the hidden-state codec and the number of micro-batches a pipeline runs with, chosen from
the links the gateway measured when it connected (``--codec auto`` and ``--micro-batches`` left out: the defaults).

The rules, from the GPU measurements in BENCHMARKS_GPU.md (random Llama-3-8B, Q8_0, two stage processes on one
GPU, molink-lite's relay between them):

- **Codec.** A decode round hands ``rows x n_embd`` hidden values across each stage boundary. When the f16 bytes of
  a full round (``max_seqs`` rows) take longer than :data:`LINK_BUDGET_S` on the slowest measured stage-to-stage
  link, int8 is chosen (half the bytes; its fidelity bound is in the README's codec table, measured by
  tests/test_codec_fidelity.py), else f16. 64 rows of 4096 values are 512 KiB: 42 ms at 100 Mbit/s (int8: 1125-1164
  tok/s at 64 concurrent against 881-936 with f16), 4.2 ms at 1 Gbit/s (f16 stays). A single stage has no such link.
- **Micro-batches.** One per stage and lane keeps every stage busy when the links add little to a step. When the
  step path's measured round trip is at least :data:`SLOW_PATH_S` and every stage runs its layers on a GPU (a step's
  compute is then a few ms, so the link dominates a round), twice that many: at 10 ms / 100 Mbit/s and 64
  concurrent, 4 micro-batches beat 2 (about 60 ms per round latency-bound with 2). CPU stages keep one per stage and
  lane: their steps take tens to hundreds of ms, and smaller micro-batches cost them more than the link.

A fixed ``--codec`` or ``--micro-batches`` is kept as given. The choice is made again at every (re)connect, with the
links measured then, so a link that changed is picked up when its pipeline reconnects; ``/v1/stats`` and
``molink-lite status`` show what was chosen and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

AUTO = "auto"
LINK_BUDGET_S = 0.005   # a full decode round's f16 hidden states may take this long on the slowest link
SLOW_PATH_S = 0.005     # a step path round trip from this long on makes GPU pipelines run 2 micro-batches a stage
MAX_MICRO_BATCHES = 16


@dataclass(frozen=True)
class LinkChoice:
    """What a pipeline runs with, and why (for the log, /v1/stats and status)."""

    codec: str
    micro_batches: int
    why: str

    def summary(self) -> dict:
        return {"codec": self.codec, "micro_batches": self.micro_batches, "why": self.why}


def choose_codec(codec_opt: str, links: Sequence[dict], n_embd: int, rows: int) -> tuple:
    """(codec, reason) for ``--codec codec_opt`` over the measured ``links`` (dicts with ``mbit``)."""
    if codec_opt != AUTO:
        return codec_opt, f"codec {codec_opt} (set by --codec)"
    rates = [float(k["mbit"]) for k in links if k.get("mbit")]
    if not rates:
        return "f16", "codec f16 (no stage-to-stage link measured)"
    slowest = min(rates)
    seconds = rows * n_embd * 2 * 8 / (slowest * 1e6)
    if seconds > LINK_BUDGET_S:
        return "int8", (f"codec int8: a decode round's f16 hidden states ({rows} x {n_embd}) take "
                        f"{seconds * 1e3:.1f} ms on the slowest link ({slowest:.0f} Mbit/s), over the "
                        f"{LINK_BUDGET_S * 1e3:.0f} ms budget")
    return "f16", (f"codec f16: a decode round's hidden states ({rows} x {n_embd}) take {seconds * 1e3:.1f} ms on "
                   f"the slowest link ({slowest:.0f} Mbit/s)")


def choose_micro_batches(mb_opt: Optional[int], n_stages: int, lanes: int, path_rtt_s: Optional[float],
                         backends: Sequence[str]) -> tuple:
    """(micro-batches, reason) for ``--micro-batches mb_opt`` (None: auto)."""
    if mb_opt:
        return int(mb_opt), f"{mb_opt} micro-batches (set by --micro-batches)"
    base = max(1, n_stages * max(1, lanes))
    gpu = bool(backends) and all(b and b != "cpu" for b in backends)
    if n_stages > 1 and gpu and path_rtt_s is not None and path_rtt_s >= SLOW_PATH_S:
        mb = min(MAX_MICRO_BATCHES, 2 * base)
        return mb, (f"{mb} micro-batches: GPU stages and a {path_rtt_s * 1e3:.1f} ms step path (from "
                    f"{SLOW_PATH_S * 1e3:.0f} ms the link dominates a round: 2 per stage and lane)")
    where = "CPU stages" if not gpu else f"a {path_rtt_s * 1e3:.1f} ms step path" if path_rtt_s is not None else \
        "an unmeasured step path"
    return base, f"{base} micro-batches (one per stage and lane; {where})"


def choose(*, codec_opt: str, mb_opt: Optional[int], links: Sequence[dict], path_rtt_s: Optional[float],
           infos: List[dict], rows: int) -> LinkChoice:
    """The codec and micro-batches of a pipeline whose stages said ``infos`` (hello) over ``links``."""
    n_embd = int(infos[0].get("n_embd") or 0) if infos else 0
    lanes = int(infos[0].get("lanes") or 1) if infos else 1
    codec, why_c = choose_codec(codec_opt, links, n_embd, rows)
    mb, why_m = choose_micro_batches(mb_opt, len(infos), lanes, path_rtt_s,
                                     [str(i.get("backend") or "cpu") for i in infos])
    return LinkChoice(codec, mb, f"{why_c}; {why_m}")
