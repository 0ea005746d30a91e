"""What closing the ring takes off each decode round: the gateway's own per-round work (taking a result, building
the next step), measured with a tiny random model whose layers cost little, so the round is mostly overhead.

Two real stage processes on loopback, one in-process pipeline, greedy requests of 64 tokens at 1 and 64 concurrent,
``--ring off`` and ``on`` alternated in one invocation (best of 3 per setting); prints ms per round and on/off.

    python tests/bench/ring_overhead.py [--conc 1,64] [--tokens 64] [--pairs 2]
"""

from __future__ import annotations

import llama_cpp  # noqa: F401,I001 - before numpy

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from molink_lite.model.split import LayerRange  # noqa: E402
from molink_lite.serving.launcher import start_stages, stop_stages  # noqa: E402
from molink_lite.serving.pipeline import Pipeline  # noqa: E402
from molink_lite.serving.router import Router  # noqa: E402
from molink_lite.serving.sequence import GenRequest  # noqa: E402
from molink_lite.wire.protocol import SamplingParams  # noqa: E402
from serving import events_to_end  # noqa: E402
from testmodels import write_random_gguf  # noqa: E402


async def ms_per_round(urls, ring: str, conc: int, tokens: int, reps: int = 3) -> float:
    p = Pipeline(urls, codec="f16", name="bench", ring=ring, prefix_cache=False)
    await p.connect(60)
    try:
        router = Router([p])
        prompt = np.arange(1, 9, dtype=np.int32)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            seqs = [router.submit(GenRequest(prompt, SamplingParams(temperature=0.0), tokens, ignore_eos=True))
                    for _ in range(conc)]
            for s in seqs:
                await events_to_end(s)
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best / tokens
    finally:
        await p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conc", default="1,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=2, help="off/on pairs per concurrency")
    a = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="ring-bench-"))
    model = str(wd / "tiny.gguf")
    write_random_gguf(model, "llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    concs = [int(x) for x in a.conc.split(",")]
    procs = start_stages(model, [LayerRange(0, 2), LayerRange(2, 4)], workdir=str(wd),
                         extra_args=["--threads", "1", "--ctx", "8192", "--max-seqs", str(max(concs))])
    try:
        urls = [sp.url for sp in procs]
        for conc in concs:
            got = {"off": [], "on": []}
            for _ in range(a.pairs):
                for ring in ("off", "on"):
                    got[ring].append(asyncio.run(ms_per_round(urls, ring, conc, a.tokens)))
            off, on = min(got["off"]), min(got["on"])
            print(f"{conc:>3} concurrent: ring off {off:.2f} ms per round, ring on {on:.2f} ms "
                  f"(on/off {on / off:.2f}x, {off - on:+.2f} ms)", flush=True)
    finally:
        stop_stages(procs)


if __name__ == "__main__":
    main()
