"""The split-exactness check of tests/test_split_exact.py as a script, for the Windows python under Wine.

Same assertion (a chain of layer ranges over the f32 wire gives logits bit-identical to the whole model's, 4
batched sequences, prefill plus greedy steps), with one engine thread: ggml's thread pool spin-waits, and
under Wine on a shared 2-core machine two threads make a tiny model's step 50x slower.

usage: python tests/wine_split_exact.py GEMMA3_GGUF WORK_DIR   (prints one "EXACT ..." line per case)
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chain.py, testmodels.py

from chain import greedy_run  # noqa: E402
from testmodels import write_random_gguf  # noqa: E402

from molink_lite.model.split import LayerRange, read_model_info, stage_gguf  # noqa: E402
from molink_lite.stage.engine import StageEngine  # noqa: E402

PROMPT_LENS = (5, 11, 3, 17)  # as tests/test_split_exact.py


def exact(path: str, cuts, n_steps: int, cache: Path) -> None:
    info = read_model_info(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, min(info.n_vocab, 5000), size=n).tolist() for n in PROMPT_LENS]
    bounds = [0, *cuts, info.n_layer]
    kw = dict(n_ctx=512, n_seq_max=4, n_threads=1)
    whole = [StageEngine(path, **kw)]
    split = [StageEngine(stage_gguf(path, LayerRange(a, b), cache_dir=cache), **kw) for a, b in zip(bounds, bounds[1:])]
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
        assert np.array_equal(a, b), f"{Path(path).name} cuts {cuts} step {step}: max |diff| {np.abs(a - b).max()}"
    assert np.array_equal(want_tok, got_tok)


def main() -> int:
    gemma, work = sys.argv[1], Path(sys.argv[2])
    cache = work / "stages"
    cases = [(gemma, (9,), 32), (gemma, (5, 11), 16)]
    for arch in ("llama", "gemma3"):
        tiny = work / f"tiny-{arch}.gguf"
        if not tiny.exists():
            write_random_gguf(tiny, arch, n_layer=7, n_embd=64, n_head=4, n_vocab=256)
        cases += [(str(tiny), (3,), 32), (str(tiny), (2, 5), 32)]
    for path, cuts, steps in cases:
        t = time.monotonic()
        exact(path, cuts, steps, cache)
        print(f"EXACT {Path(path).name} cuts {cuts} {steps} steps: logits bit-identical "
              f"({time.monotonic() - t:.1f} s)", flush=True)
    print(f"ALL EXACT {len(cases)} cases on {llama_cpp.llama_cpp._lib._name} ({sys.platform}, pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
