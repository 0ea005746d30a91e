"""Fidelity of the lossy wire codecs (f16 by default) against the whole model."""

from __future__ import annotations

import llama_cpp  # noqa: F401

import numpy as np
import pytest

from molink_lite.stage.engine import StageEngine
from molink_lite.tools.fidelity import NOISE_FLOOR, measure_fidelity
from molink_lite.model.split import LayerRange, stage_gguf

from chain import greedy_run


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_f16_greedy_text_identical_on_unquantized_models(tiny_models, arch):
    """Without activation quantization (f32 weights) the f16 wire keeps 64 greedy tokens identical."""
    path = tiny_models(arch, n_layer=6, n_embd=64, n_head=4, n_vocab=256)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (4, 9, 13, 6)]
    kw = dict(n_ctx=512, n_seq_max=4, n_threads=2)
    whole = [StageEngine(path, **kw)]
    split = [StageEngine(stage_gguf(path, LayerRange(0, 3)), **kw), StageEngine(stage_gguf(path, LayerRange(3, 6)), **kw)]
    try:
        _, want = greedy_run(whole, prompts, 63)
        logits, got = greedy_run(split, prompts, 63, codec="f16")
    finally:
        for e in whole + split:
            e.close()
    assert np.array_equal(want, got)


def test_f16_on_gemma3_270m_is_at_the_engine_noise_floor(gemma3_path):
    """gemma3-270m (Q4_K): the f16 wire's logit error is of the order of moving every value by one f32 ulp.

    llama.cpp quantizes activations to 8 bits before each Q4_K matmul, so any perturbation of a hidden
    state is amplified to a few percent of logit error; measured (cut 9, 8 prompts x 64 tokens): 1ulp
    2.2-3.3% mean relative error, f16 3.4-4.1%, int8 39%.
    """
    rows = {r.codec: r for r in measure_fidelity(gemma3_path, [9], n_tokens=24, codecs=("f32", NOISE_FLOOR, "f16", "int8"),
                                                 prompts=("The capital of France is", "def fibonacci(n):",
                                                          "The three primary colors are"), n_threads=2)}
    assert rows["f32"].max_rel_error == 0.0 and rows["f32"].identical_prompts == rows["f32"].n_prompts
    floor = rows[NOISE_FLOOR].mean_rel_error
    assert floor > 0.005  # the floor is real: a 1-ulp change moves logits
    assert rows["f16"].mean_rel_error <= 3.0 * floor
    assert rows["f16"].top1_agreement >= 0.95
    assert rows["int8"].mean_rel_error > rows["f16"].mean_rel_error  # the ranking the docs report
