"""Split-vs-whole fidelity per wire codec: top-1 agreement, relative logit error, greedy identity.

For each prompt the whole model generates greedily; the split chain is then fed the
same tokens (teacher forcing) so every step's logits can be compared, and it also
generates freely to check that the greedy text is identical.

The pseudo-codec ``1ulp`` moves every f32 value by one ulp: it shows the engine's own
noise floor. On quantized weights llama.cpp quantizes activations (Q8) before each
matmul, so any perturbation of a hidden state, however small, moves rounding
decisions and the logits by a few percent; no lossy codec can beat that floor.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..stage.engine import StageEngine
from ..model.split import LayerRange, read_model_info, stage_gguf
from ..wire.codec import decode_frame, encode_frame

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "A good recipe for pancakes needs",
    "The quick brown fox",
)


@dataclass
class FidelityRow:
    codec: str
    top1_agreement: float        # teacher-forced, over all prompts and steps
    max_rel_error: float         # max |split - whole| / max |whole| over rows
    mean_rel_error: float
    identical_prompts: int       # prompts whose free-running greedy tokens equal the whole model's
    n_prompts: int
    first_divergence: List[Optional[int]]


NOISE_FLOOR = "1ulp"  # pseudo-codec: f32 moved by one ulp in a random direction (the engine's own noise floor)
_rng = np.random.default_rng(0)


def _transfer(h: np.ndarray, codec: str) -> np.ndarray:
    if codec == NOISE_FLOOR:
        direction = np.where(_rng.random(h.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        return np.nextafter(h.astype(np.float32), direction)
    return decode_frame(encode_frame({}, {"hidden": h}, codec=codec))[1]["hidden"]


def _chain(engines: List[StageEngine], seq, pos, tok, codec: str) -> np.ndarray:
    h = None
    for i, e in enumerate(engines):
        out = e.forward(seq, pos, tokens=tok) if i == 0 else e.forward(seq, pos, hidden=h)
        if i < len(engines) - 1:
            h = _transfer(out, codec)
    return np.array(out, copy=True)


def _teacher_forced(engines, prompt: np.ndarray, forced: np.ndarray, codec: str) -> np.ndarray:
    n = prompt.shape[0]
    rows = [_chain(engines, np.zeros(n, np.int32), np.arange(n, dtype=np.int32), prompt, codec)[0]]
    for i, t in enumerate(forced[:-1]):
        rows.append(_chain(engines, np.zeros(1, np.int32), np.array([n + i], np.int32), np.array([t], np.int32), codec)[0])
    for e in engines:
        e.free(0)
    return np.stack(rows)


def _greedy(engines, prompt: np.ndarray, n_tokens: int, codec: str) -> np.ndarray:
    n = prompt.shape[0]
    logits = _chain(engines, np.zeros(n, np.int32), np.arange(n, dtype=np.int32), prompt, codec)
    out = []
    for i in range(n_tokens):
        t = int(np.argmax(logits[0]))
        out.append(t)
        if i + 1 < n_tokens:
            logits = _chain(engines, np.zeros(1, np.int32), np.array([n + i], np.int32), np.array([t], np.int32), codec)
    for e in engines:
        e.free(0)
    return np.array(out, dtype=np.int32)


def measure_fidelity(model: str, cuts: Sequence[int], prompts: Sequence[str] = DEFAULT_PROMPTS,
                     n_tokens: int = 64, codecs: Sequence[str] = ("f32", NOISE_FLOOR, "f16", "f16-clamp", "int8"),
                     n_threads: Optional[int] = None) -> List[FidelityRow]:
    """Compare a split chain (cut before each layer in ``cuts``) with the whole model, per codec."""
    info = read_model_info(model)
    bounds = [0, *cuts, info.n_layer]
    kw = dict(n_ctx=512, n_seq_max=1, n_threads=n_threads, flash_attn=False, device_sampling=False)  # reads logits
    whole = [StageEngine(model, **kw)]
    chain = [StageEngine(stage_gguf(model, LayerRange(a, b)), **kw) for a, b in zip(bounds, bounds[1:])]
    try:
        from ..model.vocab import Vocab

        vocab = Vocab(whole[0].model_ptr)
        toks = [vocab.tokenize(p, add_special=True, parse_special=True) for p in prompts]
        ref_tokens = [_greedy(whole, t, n_tokens, "f32") for t in toks]
        ref_logits = [_teacher_forced(whole, t, r, "f32") for t, r in zip(toks, ref_tokens)]
        rows = []
        for codec in codecs:
            agree, rels, ident, firsts = [], [], 0, []
            for t, r, rl in zip(toks, ref_tokens, ref_logits):
                lg = _teacher_forced(chain, t, r, codec)
                agree.append(lg.argmax(1) == rl.argmax(1))
                rels.append(np.abs(lg - rl).max(1) / np.abs(rl).max(1))
                g = _greedy(chain, t, n_tokens, codec)
                diff = np.flatnonzero(g != r)
                firsts.append(int(diff[0]) if diff.size else None)
                ident += int(diff.size == 0)
            a, rr = np.concatenate(agree), np.concatenate(rels)
            rows.append(FidelityRow(codec, float(a.mean()), float(rr.max()), float(rr.mean()), ident, len(prompts), firsts))
        return rows
    finally:
        for e in whole + chain:
            e.close()


def print_fidelity(rows: Sequence[FidelityRow], out=print) -> None:
    out(f"{'codec':>10} {'top-1 agree':>12} {'max rel err':>12} {'mean rel err':>13} {'identical greedy':>17}  first divergence")
    for r in rows:
        out(f"{r.codec:>10} {r.top1_agreement:>12.4f} {r.max_rel_error:>12.5f} {r.mean_rel_error:>13.5f} "
            f"{r.identical_prompts:>9}/{r.n_prompts:<7}  {r.first_divergence}")
