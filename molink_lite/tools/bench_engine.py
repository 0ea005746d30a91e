"""Engine micro-benchmark: step time of a chain of stages vs the whole model, same run.

Both run in this process, one after the other, on the same inputs: a short prefill
per sequence, then timed greedy decode steps. The chain's hidden states go through
a real encode/decode of the wire codec between stages (no sockets: see
``molink-lite bench`` for the served, networked figures).
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import statistics
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..stage.engine import StageEngine
from ..model.split import LayerRange, even_ranges, read_model_info, stage_gguf
from ..wire.codec import decode_frame, encode_frame


@dataclass
class EngineBenchRow:
    n_seqs: int
    whole_ms: float
    chain_ms: float
    codec_ms: float

    @property
    def ratio(self) -> float:
        return self.chain_ms / self.whole_ms


def _step(engines: List[StageEngine], seq, pos, tok, codec: str, codec_time: List[float]) -> np.ndarray:
    h = None
    for i, e in enumerate(engines):
        out = e.forward(seq, pos, tokens=tok) if i == 0 else e.forward(seq, pos, hidden=h)
        if i < len(engines) - 1:
            t0 = time.perf_counter()
            h = decode_frame(encode_frame({}, {"hidden": out}, codec=codec))[1]["hidden"]
            codec_time.append(time.perf_counter() - t0)
    return out


def _time_decode(engines: List[StageEngine], n_seqs: int, prompt_len: int, steps: int, codec: str):
    rng = np.random.default_rng(0)
    n_vocab = engines[0].info.n_vocab
    seq = np.repeat(np.arange(n_seqs, dtype=np.int32), prompt_len)
    pos = np.tile(np.arange(prompt_len, dtype=np.int32), n_seqs)
    tok = rng.integers(1, n_vocab, size=seq.shape[0]).astype(np.int32)
    codec_time: List[float] = []
    logits = _step(engines, seq, pos, tok, codec, codec_time)
    ids = np.arange(n_seqs, dtype=np.int32)
    cur = np.full(n_seqs, prompt_len, dtype=np.int32)
    times = []
    codec_time.clear()
    for _ in range(steps):
        dev = engines[-1].last_sampled  # greedy tokens picked on the device, where it samples there
        nxt = dev.copy() if dev is not None and (dev >= 0).all() else np.argmax(logits, axis=1).astype(np.int32)
        t0 = time.perf_counter()
        logits = _step(engines, ids, cur, nxt, codec, codec_time)
        times.append(time.perf_counter() - t0)
        cur += 1
    for e in engines:
        e.clear()
    return statistics.median(times) * 1e3, (sum(codec_time) / max(1, steps)) * 1e3


def bench_engine(model: str, *, stages: int = 2, seqs: Sequence[int] = (1, 8, 32), steps: int = 16,
                 prompt_len: int = 8, codec: str = "f16", n_gpu_layers: int = 0,
                 n_threads: Optional[int] = None, out=print) -> List[EngineBenchRow]:
    """Print and return the chain/whole decode step-time table."""
    info = read_model_info(model)
    ranges = even_ranges(info.n_layer, stages)
    n_ctx = max(seqs) * (prompt_len + steps + 4)
    kw = dict(n_ctx=n_ctx, n_seq_max=max(seqs), n_gpu_layers=n_gpu_layers, n_threads=n_threads)
    whole = [StageEngine(model, **kw)]
    chain = [StageEngine(stage_gguf(model, r), **kw) for r in ranges]
    rows = []
    out(f"model {info.name} ({info.arch}, {info.n_layer} layers), chain {', '.join(str(r) for r in ranges)}, "
        f"codec {codec}, {steps} decode steps, median step time")
    out(f"{'seqs':>5} {'whole ms':>10} {'chain ms':>10} {'codec ms':>9} {'chain/whole':>12} {'whole tok/s':>12} {'chain tok/s':>12}")
    try:
        for n in seqs:
            _time_decode(whole, n, prompt_len, 2, codec)  # warm-up
            w, _ = _time_decode(whole, n, prompt_len, steps, codec)
            _time_decode(chain, n, prompt_len, 2, codec)
            c, cc = _time_decode(chain, n, prompt_len, steps, codec)
            row = EngineBenchRow(n, w, c, cc)
            rows.append(row)
            out(f"{n:>5} {w:>10.2f} {c:>10.2f} {cc:>9.3f} {row.ratio:>12.3f} {n / w * 1e3:>12.1f} {n / c * 1e3:>12.1f}")
    finally:
        for e in whole + chain:
            e.close()
    return rows


__all__ = ["bench_engine", "EngineBenchRow", "LayerRange"]
