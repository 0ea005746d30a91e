"""Test helper: run a batch through a chain of stage engines, or the whole model."""

from __future__ import annotations

import llama_cpp  # noqa: F401

from typing import List, Sequence

import numpy as np

from molink_lite.stage.engine import StageEngine
from molink_lite.wire.codec import decode_frame, encode_frame


def batch_for(prompts: Sequence[Sequence[int]]):
    """Flatten prompts into (seq_ids, positions, tokens) rows."""
    seq = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(prompts)])
    pos = np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts])
    tok = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    return seq, pos, tok


def chain_forward(stages: List[StageEngine], seq, pos, tok, codec: str = "f32") -> np.ndarray:
    """Tokens through every stage; hidden states cross a real encode/decode of the wire codec."""
    h = None
    for i, st in enumerate(stages):
        if i == 0:
            out = st.forward(seq, pos, tokens=tok)
        else:
            out = st.forward(seq, pos, hidden=h)
        if i < len(stages) - 1:
            _, arrays = decode_frame(encode_frame({"t": "h"}, {"hidden": out}, codec=codec))
            h = arrays["hidden"]
        else:
            return np.array(out, copy=True)
    raise AssertionError("empty chain")


def greedy_run(stages: List[StageEngine], prompts, n_steps: int, codec: str = "f32"):
    """Prefill all prompts in one batch, then ``n_steps`` greedy decode steps; logits of every step."""
    seq, pos, tok = batch_for(prompts)
    logits = [chain_forward(stages, seq, pos, tok, codec)]
    cur = np.array([len(p) for p in prompts], np.int32)
    ids = np.arange(len(prompts), dtype=np.int32)
    tokens = [logits[-1].argmax(1).astype(np.int32)]
    for _ in range(n_steps):
        logits.append(chain_forward(stages, ids, cur, tokens[-1], codec))
        tokens.append(logits[-1].argmax(1).astype(np.int32))
        cur += 1
    for st in stages:
        for s in ids:
            st.free(int(s))
    return logits, np.stack(tokens, axis=1)


def whole_model_greedy_texts(model: str, prompts, n_tokens: int, n_gpu_layers: int = 0) -> list:
    """What the whole model says greedily after each prompt (``n_tokens`` tokens, no stop at EOS), decoded by
    the same incremental detokenizer the last stage uses: the reference a served split must equal.
    ``n_gpu_layers``: as llama.cpp counts them (the last layers first; n_layer + 1 puts the output on the GPU too)."""
    import numpy as np

    from molink_lite.model.vocab import Detokenizer, Vocab
    from molink_lite.stage.engine import StageEngine

    whole = StageEngine(model, n_ctx=512, n_seq_max=4, n_threads=1, flash_attn=False, n_gpu_layers=n_gpu_layers)
    try:
        detok = Detokenizer(Vocab(whole.model_ptr))
        out = []
        for i, prompt in enumerate(prompts):
            _, toks = greedy_run([whole], [list(prompt)], n_tokens - 1)
            detok.start(i)
            out.append("".join(detok.pieces(np.full(n_tokens, i), toks[0], np.arange(n_tokens) == n_tokens - 1)))
        return out
    finally:
        whole.close()
