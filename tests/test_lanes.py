"""Lanes (issue 15): several llama.cpp contexts on one stage's weights, run side by side.

Sequence s lives in lane s % N on every stage; a step carries one lane's sequences; each lane has its own
worker thread, so one lane builds and launches its graph (or samples) while another waits for the device.
Exactness: a lane computes exactly what a one-lane engine computes for the same sequences.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401

import concurrent.futures as cf
import time
from collections import deque

import numpy as np
import pytest

from molink_lite.model.split import LayerRange, stage_gguf
from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.serving.scheduler import admit
from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.stage.engine import EngineError, StageEngine
from molink_lite.stage.server import StageServer
from molink_lite.wire.protocol import SamplingParams, StepError, StepFrame, lane_of

from chain import whole_model_greedy_texts
from serving import NO_CACHE, GatewayProcess, http, stop_processes

SHAPE = dict(n_layer=4, n_embd=64, n_head=4, n_vocab=256)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama", **SHAPE)


def _chain_logits(stages, seq: int, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decode of one sequence through the stages (f32 hand-over); the last stage's logits per step."""
    out = []
    pos = np.arange(prompt.shape[0], dtype=np.int32)
    toks = prompt
    for _ in range(steps):
        ids = np.full(toks.shape[0], seq, np.int32)
        h = stages[0].forward(ids, pos, tokens=toks)
        for st in stages[1:]:
            h = st.forward(ids, pos, hidden=h)
        out.append(np.array(h[-1], copy=True))
        toks = np.array([int(np.argmax(h[-1]))], np.int32)
        pos = np.array([pos[-1] + 1], np.int32)
    return np.stack(out)


def test_lanes_run_side_by_side_and_reproduce_the_whole_model(tiny, tmp_path):
    kw = dict(n_ctx=512, n_seq_max=4, n_threads=1, flash_attn=False)
    prompts = {0: np.array([1, 5, 9, 200, 31], np.int32), 1: np.array([7, 7, 300 % 256, 2], np.int32),
               2: np.array([3, 4], np.int32), 3: np.array([11, 12, 13], np.int32)}
    with StageEngine(tiny, **kw) as whole:
        want = {s: _chain_logits([whole], s, p, 10) for s, p in prompts.items()}
    stages = [StageEngine(stage_gguf(tiny, r, str(tmp_path)), **kw, lanes=2) for r in (LayerRange(0, 2), LayerRange(2, 4))]
    try:
        assert [e.lanes for e in stages] == [2, 2] and stages[0].n_ctx == 2 * stages[0].n_ctx_lane
        with cf.ThreadPoolExecutor(2) as ex:  # lane 0 (sequences 0, 2) and lane 1 (1, 3) at the same time
            def lane(seqs):
                return {s: _chain_logits(stages, s, prompts[s], 10) for s in seqs}
            got = {**ex.submit(lane, [0, 2]).result(), **ex.submit(lane, [1, 3]).result()}
        for s in prompts:
            np.testing.assert_array_equal(got[s], want[s])  # bit-identical (f32 hand-over)
        with pytest.raises(EngineError, match="share a lane"):
            stages[0].forward(np.array([0, 1], np.int32), np.array([20, 20], np.int32), tokens=np.array([1, 2], np.int32))
        stages[0].free(1)
        stages[0].clear(0)
    finally:
        for e in stages:
            e.close()


def test_a_step_naming_another_lanes_sequence_is_rejected(tiny, tmp_path):
    srv = StageServer(StageEngine(stage_gguf(tiny, LayerRange(0, 2), str(tmp_path)), n_ctx=256, n_seq_max=4,
                                  n_threads=1, lanes=2), codec="f32")
    try:
        assert srv.describe()["lanes"] == 2

        def step(free, lane=0):  # rows of sequences 0 and 2 (both in lane 0)
            return StepFrame(1, np.array([0, 2], np.int32), np.zeros(2, np.int32), tokens=np.array([1, 2], np.int32),
                             out=np.ones(2, bool), free=free, lane=lane).to_wire()

        assert srv.runner.limits.lanes == 2
        with pytest.raises(StepError, match="sequence 3 is not in lane 0"):
            srv.runner.check(*step([3]))
        assert srv.runner.check(*step([2])).lane == 0
        with pytest.raises(StepError, match="not in lane 1"):
            srv.runner.check(*step([2], lane=1))
        with pytest.raises(StepError, match="'lane' must be"):
            srv.runner.check(*step([2], lane=2))
        assert not srv.runner.seq_len.any()  # nothing applied
    finally:
        srv.runner.close()
        srv.engine.close()


def test_admission_balances_lanes_within_their_kv():
    def seq(need):
        return SeqState(GenRequest(np.zeros(need - 4, np.int32), SamplingParams(), 4), events=None)

    waiting = deque([seq(100), seq(100), seq(100), seq(301)])
    free, kv, active = [5, 4, 3, 2, 1, 0], [0, 0], {}
    admit(waiting, free, kv, 400, active)
    # lanes alternate while they hold as many sequences; the 301-cell one fits no lane (100 + 301 > 400 in lane
    # 1, 200 + 301 in lane 0) and waits, keeping the order
    assert {s: lane_of(a.slot, 2) for s, a in active.items()} == {0: 0, 1: 1, 2: 0}
    assert kv == [200, 100] and len(waiting) == 1 and sorted(free) == [3, 4, 5]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_lanes_overlap_on_a_stage_and_match_the_whole_model(tiny, tmp_path):
    """Two stage processes with --lanes 2, a gateway with 2 micro-batches, two concurrent greedy requests (one
    per lane, so every step holds one sequence, as the reference does): the texts equal the whole model's, and
    a stage ran steps of both lanes at the same time."""
    procs = start_stages(tiny, [LayerRange(0, 2), LayerRange(2, 4)], workdir=str(tmp_path),
                         extra_args=["--threads", "1", "--ctx", "1024", "--max-seqs", "4", "--lanes", "2",
                                     "--codec", "f32"])
    gw = GatewayProcess([[p.url for p in procs]], extra=["--micro-batches", "2", "--codec", "f32", *NO_CACHE],
                        log_dir=tmp_path)
    try:
        gw.wait_ready()
        prompts = ([1, 5, 9, 200, 31], [7, 7, 30])
        want = whole_model_greedy_texts(tiny, prompts, 40)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(2) as ex:
            got = list(ex.map(lambda p: http("POST", gw.url + "/v1/completions",
                                             {"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True},
                                             timeout=300), prompts))
        for (status, body), w in zip(got, want):
            assert status == 200, body
            assert body["choices"][0]["text"] == w
        st = http("GET", gw.url + "/v1/stats?timeline=1")[1]["pipelines"][0]
        assert (st["lanes"], st["micro_batches"]) == (2, 2)
        overlap = 0
        for stage in st["stages"]:
            tl = [e for e in stage["timeline"] if e[1] >= t0]
            overlap += sum(1 for i, a in enumerate(tl) for b in tl[i + 1:] if a[1] < b[2] and b[1] < a[2])
        assert overlap > 0, "no two steps ran at the same time on a stage"
    finally:
        gw.stop()
        stop_stages(procs)


@pytest.mark.slow
def test_a_pipeline_whose_stages_disagree_on_lanes_is_refused(tiny, tmp_path):
    """Sequence s must live in lane s % N on every stage: a gateway given a chain of stages with different --lanes
    says so and does not start."""
    common = ["--threads", "1", "--ctx", "512", "--max-seqs", "4"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_stages(tiny, [LayerRange(0, 2)], workdir=str(tmp_path / "a"), extra_args=common + ["--lanes", "2"])
    b = start_stages(tiny, [LayerRange(2, 4)], workdir=str(tmp_path / "b"), extra_args=common)
    gw = GatewayProcess([[a[0].url, b[0].url]], extra=["--connect-timeout", "5"], log_dir=tmp_path)
    try:
        rc = gw.proc.wait(90)  # the gateway names the mismatch and does not start
        assert rc != 0
        assert "different --lanes ([1, 2])" in gw.output()
    finally:
        gw.stop()
        stop_stages(a + b)


def test_token_pieces_are_right_when_lanes_detokenize_at_once(tiny):
    """The last stage's lanes turn tokens into text in two threads at once; a piece buffer shared between them
    once gave one lane the other's bytes (a wrong character in served text)."""
    from molink_lite.model.vocab import Vocab

    with StageEngine(tiny, n_ctx=256, n_seq_max=2, n_threads=1) as e:
        vocab = Vocab(e.model_ptr)
        toks = list(range(vocab.n_vocab))
        want = [vocab.piece(t) for t in toks]

        def run(order):
            return all(vocab.piece(t) == want[t] for _ in range(30) for t in order)

        with cf.ThreadPoolExecutor(4) as ex:
            oks = list(ex.map(run, [toks, toks[::-1], toks[1::2], toks[::3]]))
        assert all(oks)


@pytest.mark.slow
def test_serve_passes_lanes_to_its_stages_and_sizes_micro_batches(tiny, tmp_path):
    """`molink-lite serve --lanes 2`: the local stages get the lanes, and the gateway keeps one micro-batch per
    stage and lane in flight by default (2 stages x 2 lanes)."""
    import subprocess
    import sys

    from serving import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "molink_lite.cli", "serve", "--model", tiny, "--stages", "2",
                          "--lanes", "2", "--threads", "1", "--ctx", "512", "--max-seqs", "4", "--port", str(port)],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert p.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.3)
        st = http("GET", url + "/v1/stats")[1]["pipelines"][0]
        assert (st["lanes"], st["micro_batches"]) == (2, 4)
        status, body = http("POST", url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4,
                                                              "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    finally:
        stop_processes([p], 30)
        log.close()
