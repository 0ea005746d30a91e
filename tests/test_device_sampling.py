"""Device sampling (issue 15): greedy tokens picked inside llama.cpp's graph on the last stage.

Opt-in (measured slower on an H100 at 64 sequences); these tests turn it on with the CPU backend, where
llama.cpp runs the same backend sampler graph, and check that it changes no token: the whole engine, a mixed batch
(device-greedy, greedy-with-penalties and seeded temperature rows together), and speculative verification
(several output rows per sequence) through real stage servers.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401

from typing import List

import numpy as np
import pytest

from molink_lite.stage.engine import StageEngine
from molink_lite.stage.sampling import SamplerPool, SamplingParams

from spec_chain import close, servers_for
from test_speculative import _generate, _prompts, propose


@pytest.fixture(scope="module")
def tiny_path(tiny_models):
    return tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=256)


def _greedy_run(eng: StageEngine, n_seqs: int, steps: int, off: List[int] = (), ids=None) -> np.ndarray:
    pool = SamplerPool(eng.info.n_vocab, on_greedy=eng.set_device_greedy)
    rng = np.random.default_rng(3)
    ids = np.arange(n_seqs, dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
    for s in off:  # these slots sample through llama.cpp's chain (a penalty): never on the device
        pool.start(s, SamplingParams(temperature=0.0, repetition_penalty=1.2))
    seq = np.repeat(ids, 5)
    pos = np.tile(np.arange(5, dtype=np.int32), n_seqs)
    logits = eng.forward(seq, pos, tokens=rng.integers(1, 256, size=seq.shape[0]).astype(np.int32))
    nxt = pool.sample(ids, logits, None, eng.last_sampled)
    out = [nxt]
    cur = np.full(n_seqs, 5, np.int32)
    for _ in range(steps):
        logits = eng.forward(ids, cur, tokens=nxt)
        dev = eng.last_sampled
        if eng.device_sampling:
            assert dev is not None and dev.shape == (n_seqs,)
            assert ((dev >= 0) == ~np.isin(ids, off)).all()  # device tokens exactly on the greedy slots
        nxt = pool.sample(ids, logits, None, dev)
        out.append(nxt)
        cur += 1
    eng.clear()
    for s in ids.tolist():  # as a stage frees a finished sequence: its slot goes back to the device
        pool.drop(s)
    return np.stack(out)


def test_engine_device_greedy_equals_cpu_argmax(tiny_path):
    kw = dict(n_ctx=512, n_seq_max=6, n_threads=1, flash_attn=False)
    with StageEngine(tiny_path, **kw, device_sampling=False) as cpu:
        assert not cpu.device_sampling and cpu.last_sampled is None
        want = _greedy_run(cpu, 6, 12)
        want_mixed = _greedy_run(cpu, 6, 12, off=[1, 4])
    with StageEngine(tiny_path, **kw, device_sampling=True) as dev:
        assert dev.device_sampling
        np.testing.assert_array_equal(_greedy_run(dev, 6, 12), want)
        # two slots leave the device (llama.cpp's chain needs their logits) and come back after
        np.testing.assert_array_equal(_greedy_run(dev, 6, 12, off=[1, 4]), want_mixed)
        np.testing.assert_array_equal(_greedy_run(dev, 6, 12), want)


def test_device_sampling_per_lane(tiny_path):
    """With lanes each sequence's sampler sits in its own lane's context."""
    kw = dict(n_ctx=512, n_seq_max=6, n_threads=1, flash_attn=False)
    with StageEngine(tiny_path, **kw) as cpu:
        want = [_greedy_run(cpu, 3, 8, ids=ids) for ids in ([0, 2, 4], [1, 3, 5])]
    with StageEngine(tiny_path, **kw, device_sampling=True, lanes=2) as dev:
        got = [_greedy_run(dev, 3, 8, ids=ids) for ids in ([0, 2, 4], [1, 3, 5])]
        got_off = _greedy_run(dev, 3, 8, off=[3], ids=[1, 3, 5])  # a chain slot in lane 1, the rest on the device
    with StageEngine(tiny_path, **kw) as cpu:
        want_off = _greedy_run(cpu, 3, 8, off=[3], ids=[1, 3, 5])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got_off, want_off)


def test_off_by_default_and_only_on_the_last_stage(tiny_path, tmp_path):
    from molink_lite.model.split import LayerRange, stage_gguf

    with StageEngine(tiny_path, n_ctx=256, n_seq_max=2, n_threads=1) as e:
        assert not e.device_sampling
    first = stage_gguf(tiny_path, LayerRange(0, 2), str(tmp_path))
    with StageEngine(first, n_ctx=256, n_seq_max=2, n_threads=1, device_sampling=True) as e:
        assert not e.device_sampling  # a non-last stage has no tokens to pick
        e.set_device_greedy(0, True)  # a no-op there


def test_pool_takes_device_tokens_and_never_reads_their_logits():
    pool = SamplerPool(16)
    pool.start(2, SamplingParams(temperature=0.8, seed=5))
    logits = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    ref = logits.copy()
    dev = np.array([7, -1, 3, 9], np.int32)  # row 1: plain greedy on the CPU; row 2: a chain (its -1 is implied)
    logits[0] = logits[3] = np.nan           # llama.cpp did not copy these rows back
    dev[2] = -1
    got = pool.sample(np.array([0, 1, 2, 3]), logits, np.zeros(4, np.int64), dev)
    assert got[0] == 7 and got[3] == 9
    assert got[1] == int(np.argmax(ref[1]))
    other = SamplerPool(16)
    other.start(2, SamplingParams(temperature=0.8, seed=5))
    assert got[2] == other.sample([2], ref[2:3], np.zeros(1, np.int64))[0]  # the seeded chain, unchanged
    # a stale device token on a row whose slot samples with a chain is ignored
    pool.start(2, SamplingParams(temperature=0.8, seed=5))
    again = pool.sample(np.array([2]), ref[2:3], np.zeros(1, np.int64), np.array([11], np.int32))
    assert again[0] == got[2]


def test_pool_tells_the_engine_which_slots_are_plain_greedy():
    calls = []
    pool = SamplerPool(16, on_greedy=lambda s, g: calls.append((s, g)))
    pool.start(1, SamplingParams(temperature=0.0))                   # plain greedy: stays on the device
    pool.start(2, SamplingParams(temperature=0.7))                   # needs logits
    pool.start(3, SamplingParams(temperature=0.0, presence_penalty=0.5))
    pool.drop(1)
    pool.drop(2)
    pool.drop(3)
    assert calls == [(2, False), (3, False), (2, True), (3, True)]


def test_stage_servers_spec_and_mixed_sampling_unchanged(tiny_path):
    """Through real stage servers: greedy sequences with drafts (k+1 output rows each: the device sampler
    picks each row), a plain one, one greedy with a penalty and a seeded temperature one in the same steps
    give the tokens of the same run with device sampling off."""
    prompts = _prompts(6)
    params = ([{"temperature": 0.0}] * 4 + [{"temperature": 0.0, "repetition_penalty": 1.3, "penalty_last_n": 8}]
              + [{"temperature": 0.9, "seed": 42}])

    def drafts(i, ctx):
        if i in (3, 5):
            return np.zeros(0, np.int32)
        d = propose(ctx, 3, 6)
        if i == 1 and len(d):
            d = np.r_[d, 200].astype(np.int32)  # a wrong draft: a rejection mid-way
        return d.astype(np.int32)

    runs = []
    for device in (False, True):
        srv = servers_for(tiny_path, [2], n_seq_max=8, device_sampling=device)
        try:
            assert srv[-1].engine.device_sampling is device
            plain, _ = _generate(srv, prompts, 30, params)
            spec, (drafted, accepted) = _generate(srv, prompts, 30, params, drafts, check_kv=True)
            assert drafted > 0 and accepted > 0
            runs.append((plain, spec))
        finally:
            close(srv)
    assert runs[1] == runs[0]
    assert runs[0][1][:5] == runs[0][0][:5]  # greedy rows: drafts change nothing
