"""End to end with the default f16 wire: 3 stage processes + gateway, against the whole model.

On this Q4_K model llama.cpp quantizes activations to 8 bits before each matmul, so any change to a
hidden state (even one f32 ulp) moves the logits by about 2% and flips greedy near-ties; see
``molink-lite bench fidelity``. The served f16 text must therefore (1) equal, token for token, an
in-process chain of the same stages with the same codec (the distributed system adds nothing beyond
the codec), and (2) equal the whole model's text for most prompts.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401

import pytest

from molink_lite.stage.engine import StageEngine
from molink_lite.model.split import LayerRange, stage_gguf

from chain import greedy_run
from serving import NO_CACHE, served_pipeline

pytestmark = pytest.mark.slow  # real stage and gateway processes
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are"]
RANGES = [LayerRange(0, 6), LayerRange(6, 12), LayerRange(12, 18)]
N = 24


@pytest.fixture(scope="module")
def gateway(gemma3_path, tmp_path_factory):
    with served_pipeline(gemma3_path, RANGES,
                         ["--threads", "1", "--ctx", "2048", "--max-seqs", "4", "--flash-attn", "off"],
                         tmp_path_factory.mktemp("stages"), gateway_extra=NO_CACHE,
                         log_dir=tmp_path_factory.mktemp("gw")) as (gw, _):
        yield gw  # default codec: f16


def test_f16_wire_against_in_process_chain_and_whole_model(gateway, gemma3_path):
    from openai import OpenAI

    client = OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    served = []
    for prompt in PROMPTS:
        got = client.completions.create(model="gemma-3-270m-q4_k_m", prompt=prompt, max_tokens=N,
                                        temperature=0).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="gemma-3-270m-q4_k_m", prompt=prompt, max_tokens=N, temperature=0, stream=True) if c.choices)
        assert streamed == got, prompt
        served.append(got)

    llm = llama_cpp.Llama(model_path=gemma3_path, n_ctx=512, n_threads=1, verbose=False)
    kw = dict(n_ctx=512, n_seq_max=1, n_threads=1, flash_attn=False)
    chain = [StageEngine(stage_gguf(gemma3_path, r), **kw) for r in RANGES]
    try:
        whole_same = 0
        for prompt, got in zip(PROMPTS, served):
            toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            _, ids = greedy_run(chain, [toks], N - 1, codec="f16")
            assert got == llm.detokenize(ids[0].tolist()).decode("utf-8", "replace"), prompt
            llm.reset()  # no prompt-prefix reuse from the previous call
            want = llm.create_completion(prompt, max_tokens=N, temperature=0.0, top_k=1,
                                         repeat_penalty=1.0)["choices"][0]["text"]
            whole_same += got == want
        assert whole_same >= len(PROMPTS) - 1, f"only {whole_same} of {len(PROMPTS)} prompts match the whole model"
    finally:
        for e in chain:
            e.close()
        llm.close()
