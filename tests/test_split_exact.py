"""A chain of layer ranges reproduces the whole model: bit-identical logits with the f32 wire."""

from __future__ import annotations

import llama_cpp  # noqa: F401

import numpy as np
import pytest

from molink_lite.stage.engine import StageEngine
from molink_lite.model.split import LayerRange, stage_gguf, read_model_info

from chain import greedy_run

PROMPT_LENS = (5, 11, 3, 17)  # 4 sequences of different lengths, batched together


def _prompts(n_vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_vocab, size=n).tolist() for n in PROMPT_LENS]


def _engines(path: str, cuts, n_ctx: int = 512):
    info = read_model_info(path)
    bounds = [0, *cuts, info.n_layer]
    return [StageEngine(stage_gguf(path, LayerRange(a, b)), n_ctx=n_ctx, n_seq_max=4, n_threads=2)
            for a, b in zip(bounds, bounds[1:])]


def _assert_exact(path: str, cuts, n_steps: int) -> None:
    info = read_model_info(path)
    prompts = _prompts(min(info.n_vocab, 5000))
    whole = [StageEngine(path, n_ctx=512, n_seq_max=4, n_threads=2)]
    split = _engines(path, cuts)
    try:
        want, want_tok = greedy_run(whole, prompts, n_steps)
        got, got_tok = greedy_run(split, prompts, n_steps)
    finally:
        for e in whole + split:
            e.close()
    assert len(got) == n_steps + 1
    for step, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape == (len(prompts), info.n_vocab)
        assert np.isfinite(a).all()
        assert np.array_equal(a, b), f"step {step}: max |diff| {np.abs(a - b).max()}"
    assert np.array_equal(want_tok, got_tok)


# gemma3-270m: 18 layers, sliding-window period 6 (full attention at 5, 11, 17); ~5 s a split on one core
@pytest.mark.slow
@pytest.mark.parametrize("cuts", [(9,), (4,), (13,), (5, 11), (3, 7), (1, 17)], ids=str)
def test_gemma3_270m_split_is_exact(gemma3_path, cuts):
    _assert_exact(gemma3_path, cuts, n_steps=32)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("cuts", [(3,), (1,), (2, 5), (4, 5)], ids=str)
def test_tiny_split_is_exact(tiny_models, arch, cuts):
    path = tiny_models(arch, n_layer=7, n_embd=64, n_head=4, n_vocab=256)
    _assert_exact(path, cuts, n_steps=32)


@pytest.mark.slow
def test_stage_without_sliding_window_pattern_differs(gemma3_path, tmp_path):
    """Guard for the SWA rule: a gemma3 stage written without the absolute pattern is not exact."""
    from molink_lite.model import archs

    rule = archs.RULES["gemma3"]
    broken = archs.ArchRule("gemma3", swa=None, tensor_fixes=rule.tensor_fixes)
    archs.RULES["gemma3"] = broken
    try:
        path = stage_gguf(gemma3_path, LayerRange(3, 18), cache_dir=tmp_path)
    finally:
        archs.RULES["gemma3"] = rule
    good = stage_gguf(gemma3_path, LayerRange(3, 18))
    first = stage_gguf(gemma3_path, LayerRange(0, 3))
    prompts = [list(range(2, 40))]  # longer than gemma3's window is not needed: pattern shifts layer types
    outs = []
    for last in (good, path):
        engines = [StageEngine(first, n_ctx=256, n_seq_max=1, n_threads=2),
                   StageEngine(last, n_ctx=256, n_seq_max=1, n_threads=2)]
        try:
            outs.append(greedy_run(engines, prompts, 0)[0][0])
        finally:
            for e in engines:
                e.close()
    assert not np.array_equal(outs[0], outs[1])
