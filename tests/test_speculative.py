"""Speculative decoding (issue 16): drafts, verification on the last stage, KV trims, the draft policy.

In-process parts drive step frames through real :class:`StageServer` objects (validation, trims, frees,
sampling exactly as the stage worker runs them) on a tiny f32 model split in two stages.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401

import math
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import pytest

from molink_lite.serving.sequence import GenRequest, SeqState
from molink_lite.serving.speculative import SpecState, StepCost, allocate, auto_enabled, linear, propose
from molink_lite.wire.protocol import SamplingParams, SeqStart, StepError, StepFrame

from spec_chain import close, kv_max_pos, run_step, servers_for


# ------------------------------------------------------------------ drafting and policy (pure)
def test_propose_takes_the_latest_longest_match():
    ctx = np.array([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3], np.int32)
    # "2 3" occurs at 1 and 6; the trigram "1 2 3" only at 0 -> its continuation 4 5 9
    assert propose(ctx, 3, 3).tolist() == [4, 5, 9]
    assert propose(ctx, 2, 2).tolist() == [7, 8]     # latest bigram match
    assert propose(ctx, 3, 0).tolist() == []
    assert propose(np.array([5, 6, 7], np.int32), 3, 4).tolist() == []  # no earlier occurrence
    # the continuation runs into the end: the text repeats with that period, and so do the drafts
    assert propose(np.array([4, 4, 4, 4], np.int32), 2, 5).tolist() == [4, 4, 4, 4, 4]
    words = np.array([7, 1, 2, 3, 1, 2, 3, 1, 2], np.int32)   # "1 2 3" repeating, last match 3 back
    assert propose(words, 2, 7).tolist() == [3, 1, 2, 3, 1, 2, 3]
    assert propose(words, 2, 2).tolist() == [3, 1]


def test_allocate_backs_off_with_batch_size_and_low_acceptance():
    cost = linear(0.030, 0.001)  # 30 ms of links per step, 1 ms per row
    assert allocate([0.8], [8], 1, 1, cost, 100) == [8]                       # one stream: all drafts pay
    assert allocate([0.05], [8], 1, 1, cost, 100)[0] >= 1                     # even a weak draft is nearly free
    many = allocate([0.3] * 16, [8] * 16, 16, 16, cost, 500)
    assert sum(many) < 16 and max(many) <= 1                                  # 16 busy sequences: few drafts
    assert allocate([0.9] * 16, [8] * 16, 16, 16, cost, 500) != [0] * 16      # unless they are very good
    assert sum(allocate([0.8] * 4, [8] * 4, 4, 4, cost, 5)) == 5              # row budget
    assert allocate([0.8], [8], 1, 1, linear(0.0001, 0.01), 100) == [0]      # compute-bound, no link: none


# Gemma 3 270M on one CPU thread per stage (layers 0-16 | layer 17 + the LM head), ms per step of n rows, every row
# an output (measured: BENCHMARKS.md, issue 28 session 9). The LM head's kernels work on tiles of 4 rows.
_S0 = [6.6, 9.0, 12.9, 14.8, 20.2, 21.8, 24.4, 28.2, 32.4, 33.5, 36.6, 38.2, 41.2, 44.5, 46.4, 46.6]
_S1 = [12.3, 32.8, 38.5, 38.9, 66.5, 71.2, 76.2, 55.1, 79.9, 84.9, 88.7, 66.7, 91.4, 95.7, 103.8, 78.0]
GEMMA_CPU = {"s0": dict(enumerate(_S0, 1)), "s1": dict(enumerate(_S1, 1))}


def _gemma_cost(links_s: float = 0.023) -> StepCost:
    c = StepCost(links_s + 0.01, 0.001)
    c.set_stages([sorted((n, ms / 1e3) for n, ms in GEMMA_CPU[k].items()) for k in ("s0", "s1")], links_s)
    return c


def test_allocate_fills_the_tile_a_line_stops_short_of():
    """A line fitted through 1-4 rows stops a single stream at 2-3 drafts; the stages' measured costs show that 8
    rows cost less than 5-7 and pay for 7 drafts (the single-stream CPU bench: 34.7 -> 51 tok/s)."""
    c = _gemma_cost()
    assert abs(c.seconds(8) - (0.023 + 0.0282 + 0.0551)) < 1e-9
    assert c.seconds(6) > c.seconds(8)                                  # between entries: interpolated, 5-7 > 8
    one = allocate([0.84], [8], 1, 1, lambda r: c.seconds(r, 1), 100)
    assert one == [7], one                                              # 8 rows, not 5, 6 or 7
    fit = StepCost(0.033, 0.001)
    for rows in [1, 2, 3, 4] * 8:                                       # what the old policy saw and fitted
        fit.observe(rows, c.seconds(rows))
    a, b = fit.params()
    assert allocate([0.84], [8], 1, 1, linear(a, b), 100)[0] < 7
    # two micro-batches of 8 sequences: the LM head stage bounds them (55 ms for 8 rows); good drafts fill it to
    # 16 rows, each sequence one draft, where 9-15 rows would cost more per token than 8
    two = allocate([0.9] * 8, [8] * 8, 8, 8, lambda r: c.seconds(r, 2), 100)
    assert sum(two) % 4 == 0 and sum(two) >= 4, two
    assert allocate([0.2] * 8, [8] * 8, 8, 8, lambda r: c.seconds(r, 2), 100) == [0] * 8  # poor drafts: none


def test_step_cost_fit_and_acceptance_rate():
    c = StepCost(0.05, 0.002)
    assert c.params() == (0.05, 0.002)
    for rows in [1, 5, 9, 2, 7, 3, 1, 9] * 4:
        c.observe(rows, 0.020 + 0.0005 * rows)
    a, b = c.params()
    assert abs(a - 0.020) < 1e-6 and abs(b - 0.0005) < 1e-7
    s = SpecState.for_prompt(np.arange(5, dtype=np.int32), 10)
    r0 = s.rate
    s.verified(4, 0)
    assert s.rate < r0
    for _ in range(5):
        s.verified(4, 4)
    assert s.rate > 0.8
    assert auto_enabled(0.020) and not auto_enabled(0.0004) and not auto_enabled(None)


def test_replay_resets_pipeline_state_and_keeps_tokens():
    import asyncio

    req = GenRequest(np.array([1, 2, 3], np.int32), SamplingParams(temperature=0.0), 8)
    s = SeqState(req, asyncio.Queue())
    s.spec = SpecState.for_prompt(req.prompt, 8)
    for t in (4, 5, 6):
        s.take_token(t, False, "", 0.0)
    s.kv_len, s.spec.drafts = 9, np.array([7, 8], np.int32)
    s.prepare_replay()
    assert s.kv_len == 0 and s.spec.drafts.size == 0
    assert s.spec.buf[:s.spec.length].tolist() == [1, 2, 3, 4, 5, 6]
    assert s.feed.tolist() == [1, 2, 3, 4, 5, 6]
    assert s.start_params().spec is True


# ------------------------------------------------------------------ in-process stages
@pytest.fixture(scope="module")
def tiny_servers(tiny_models):
    path = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=256)
    srv = servers_for(path, [2], n_seq_max=8)
    yield srv
    close(srv)


def _start(p: dict) -> SeqStart:
    """A sequence's start from sampling parameters plus an optional ``spec`` flag."""
    return SeqStart(SamplingParams(**{k: v for k, v in p.items() if k != "spec"}), spec=bool(p.get("spec")))


def _prefill(servers, slots: List[int], prompts: List[np.ndarray], params: List[dict]) -> Dict[int, int]:
    frame = StepFrame(0, seq=np.concatenate([np.full(len(p), s, np.int32) for s, p in zip(slots, prompts)]),
                      pos=np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts]),
                      tokens=np.concatenate(prompts).astype(np.int32),
                      out=np.concatenate([np.r_[np.zeros(len(p) - 1), 1] for p in prompts]).astype(bool),
                      start={s: _start(p) for s, p in zip(slots, params)})
    seq, tok = run_step(servers, *frame.to_wire())
    return dict(zip(seq.tolist(), tok.tolist()))


def _generate(servers, prompts: List[np.ndarray], n_tokens: int, params: List[dict], drafts_for=None,
              slots: Optional[List[int]] = None, check_kv: bool = False):
    """Batched generation; ``drafts_for(i, ctx) -> drafts`` per sequence and step (None: plain decoding).

    Returns tokens per sequence and (drafted, accepted). With ``check_kv`` every stage's KV must hold exactly
    the positions the gateway thinks after every step (rejected drafts removed by the next step's trim).
    """
    slots = slots or list(range(len(prompts)))
    first = _prefill(servers, slots, prompts, params)
    out = [[first[s]] for s in slots]
    kv = [len(p) for p in prompts]
    drafted = accepted = 0
    while min(len(o) for o in out) < n_tokens:
        trim, drafts, parts = {}, {}, []
        for i, s in enumerate(slots):
            ctx = np.concatenate([prompts[i], np.asarray(out[i], np.int32)])
            pos0 = len(ctx) - 1
            d = np.zeros(0, np.int32) if drafts_for is None else drafts_for(i, ctx)
            d = d[:max(0, n_tokens - len(out[i]) - 1)]
            if kv[i] > pos0:
                trim[s] = pos0
            if len(d):
                drafts[s] = d.astype(np.int32)
            parts.append((np.full(len(d) + 1, s, np.int32), np.arange(pos0, pos0 + len(d) + 1, dtype=np.int32),
                          np.r_[out[i][-1], d].astype(np.int32)))
            kv[i] = pos0 + len(d) + 1
            drafted += len(d)
        rows = np.concatenate([p[0] for p in parts])
        frame = StepFrame(1, seq=rows, pos=np.concatenate([p[1] for p in parts]),
                          tokens=np.concatenate([p[2] for p in parts]), out=np.ones(rows.shape[0], bool),
                          trim=trim, drafts=drafts)
        seq, tok = run_step(servers, *frame.to_wire())
        for i, s in enumerate(slots):
            got = tok[seq == s].tolist()
            accepted += len(got) - 1
            out[i].extend(got)
            if check_kv:
                for srv in servers:
                    assert kv_max_pos(srv, s) == kv[i] - 1
                    assert int(srv.runner.seq_len[s]) == kv[i]
    for srv in servers:
        for s in slots:
            srv.runner.free(s)
    return [o[:n_tokens] for o in out], (drafted, accepted)


PATTERN = np.array([5, 9, 12, 40, 77, 5, 9, 12, 40, 77, 5, 9], np.int32)


def _prompts(n: int, seed: int = 1) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [PATTERN] + [rng.integers(1, 256, size=int(rng.integers(4, 14))).astype(np.int32) for _ in range(n - 1)]


def test_rejected_drafts_leave_no_trace_in_any_stage(tiny_servers):
    """Greedy with wrong and right drafts (several sequences, one never speculating, in the same steps) gives
    the tokens of a run without drafts, and every stage's KV holds exactly the accepted positions."""
    prompts = _prompts(5)
    # the last one greedy through llama.cpp's chain (a repetition penalty): verified row by row
    greedy = [{"temperature": 0.0}] * 4 + [{"temperature": 0.0, "repetition_penalty": 1.3, "penalty_last_n": 8}]
    want, _ = _generate(tiny_servers, prompts, 40, greedy)
    rng = np.random.default_rng(7)

    def drafts(i, ctx):
        if i == 3:
            return np.zeros(0, np.int32)           # a plain sequence in the same steps
        d = propose(ctx, 3, 6)
        if rng.random() < 0.5:                   # corrupt some drafts: forced rejections mid-way
            d = np.r_[d, rng.integers(0, 256, size=3)].astype(np.int32)
            if len(d) > 1:
                d[rng.integers(0, len(d))] = rng.integers(0, 256)
        return d.astype(np.int32)

    got, (drafted, accepted) = _generate(tiny_servers, prompts, 40, greedy, drafts, check_kv=True)
    assert got == want
    assert drafted > 0 and 0 < accepted < drafted  # both acceptances and rejections happened
    last = tiny_servers[-1]
    assert last.stats["drafted"] >= drafted and 0 < last.stats["accepted"] <= last.stats["drafted"]
    for srv in tiny_servers:
        assert srv.stats["trims"] > 0
        assert int(srv.runner.seq_len.sum()) == 0


def test_hostile_spec_fields_are_rejected_without_effect(tiny_servers):
    first, last = tiny_servers
    p = PATTERN
    _prefill(tiny_servers, [0], [p], [{"temperature": 0.0}])
    n = len(p)
    before = [int(s.runner.seq_len[0]) for s in tiny_servers]

    def step(hostile=None, seq=None, out=None, **fields):
        """Rows 3, 4, 5 of sequence 0 (or ``seq``) after the prompt; ``hostile`` meta fields are put on the wire
        as given, over the frame built from ``fields``."""
        k = 2
        meta, arrays = StepFrame(5, seq=np.zeros(k + 1, np.int32) if seq is None else seq,
                                 pos=np.arange(n, n + k + 1, dtype=np.int32), tokens=np.array([3, 4, 5], np.int32),
                                 out=np.ones(k + 1, bool) if out is None else out, **fields).to_wire()
        meta.update(hostile or {})
        return run_step(tiny_servers, meta, arrays)

    bad = [({"trim": {"0": n + 1}}, "holds only"),                    # trim beyond what it holds
           ({"trim": {"0": -1}}, "position"),
           ({"trim": {"9999999": 1}}, "sequence id"),
           ({"trim": [1, 2]}, "must map"),
           ({"drafts": {"0": [4, 5, 6]}}, "drafts in"),               # more drafts than rows allow
           ({"drafts": {"0": [4, 6]}}, "differ from the tokens"),     # not the rows' tokens
           ({"drafts": {"0": [4, 999]}}, "token ids"),
           ({"drafts": {"0": []}}, "token ids"),
           ({"drafts": {"1": [4, 5]}}, "no rows"),
           ({"drafts": {"0": [4, 5]}, "start": {"0": {"temperature": 0.0, "spec": "yes"}}}, "'spec'")]
    for extra, msg in bad:
        with pytest.raises(StepError, match=msg):
            step(extra)
    with pytest.raises(StepError, match="must be outputs"):
        step(drafts={0: np.array([4, 5], np.int32)}, out=np.array([False, True, True]))
    assert [int(s.runner.seq_len[0]) for s in tiny_servers] == before
    assert all(kv_max_pos(s, 0) == n - 1 for s in tiny_servers)
    # a sampling sequence started without 'spec' cannot be sent drafts (its RNG would not allow verification)
    _prefill(tiny_servers, [1], [p], [{"temperature": 0.8, "seed": 3}])
    with pytest.raises(StepError, match="not started with 'spec'"):
        step(drafts={1: np.array([4, 5], np.int32)}, seq=np.ones(3, np.int32))
    # the valid form of the same step runs
    seq, tok = step(drafts={0: np.array([4, 5], np.int32)})
    assert seq.tolist() == [0] * len(tok) and 1 <= len(tok) <= 3
    for srv in tiny_servers:
        srv.runner.free(0)
        srv.runner.free(1)


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Chi-square quantile (Wilson-Hilferty); z = 3.719 is the 0.9999 normal quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2_two_sample(a: Counter, b: Counter, min_count: int = 5) -> "tuple[float, int]":
    na, nb = sum(a.values()), sum(b.values())
    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    big = [k for k in keys if a[k] + b[k] >= 2 * min_count]
    rest = (sum(a[k] for k in keys if k not in big), sum(b[k] for k in keys if k not in big))
    cells = [(a[k], b[k]) for k in big] + ([rest] if sum(rest) else [])
    stat = 0.0
    for x, y in cells:
        ex, ey = (x + y) * na / (na + nb), (x + y) * nb / (na + nb)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    return stat, max(1, len(cells) - 1)


def test_seeded_sampling_distribution_is_unchanged(tiny_servers):
    """Rejection rule: tokens sampled with drafts follow the distribution of llama.cpp's own sampler chain.

    Fixed seeds (not flaky): 480 sequences per arm, 8 per step, first 3 generated tokens; drafts are the
    n-gram proposal, alternated with a corrupted one so both acceptance and rejection paths run. Two-sample
    chi-square per position at the 0.9999 level, plus the joint distribution of the first two tokens.
    """
    n_seqs, batch, n_tok = 480, 8, 3
    prompt = PATTERN
    base = {"temperature": 0.03, "top_k": 40}  # the random model's logits are flat: a low temperature peaks them
    seeds = [[1000 * g + j + 1 for j in range(batch)] for g in range(n_seqs // batch)]
    plain: List[tuple] = []
    for group in seeds:
        toks, _ = _generate(tiny_servers, [prompt] * batch, n_tok, [{**base, "seed": s} for s in group])
        plain.extend(tuple(t) for t in toks)
    # drafts: the most frequent continuation seen in the plain arm (likely, not certain), sometimes corrupted
    follow: Dict[tuple, Counter] = {}
    for t in plain:
        for j in range(n_tok):
            follow.setdefault(t[:j], Counter())[t[j]] += 1
    rng = np.random.default_rng(11)

    def drafts(i, ctx):
        gen, d = tuple(ctx[len(prompt):].tolist()), []
        while len(d) < 3 and gen in follow:
            nxt = follow[gen].most_common(1)[0][0]
            d.append(nxt)
            gen = gen + (nxt,)
        if d and rng.random() < 0.3:
            d[-1] = int(rng.integers(0, 256))
        return np.asarray(d, np.int32)

    spec: List[tuple] = []
    drafted = accepted = 0
    for group in seeds:
        toks, (d, a) = _generate(tiny_servers, [prompt] * batch, n_tok,
                                 [{**base, "seed": s, "spec": True} for s in group], drafts)
        spec.extend(tuple(t) for t in toks)
        drafted, accepted = drafted + d, accepted + a
    assert drafted > 200 and 0.1 * drafted < accepted < 0.9 * drafted, (drafted, accepted)
    for j in range(n_tok):
        stat, df = _chi2_two_sample(Counter(t[j] for t in plain), Counter(t[j] for t in spec))
        assert df >= 3, "the distribution should not be (nearly) deterministic"
        assert stat < _chi2_critical(df), f"token {j}: chi2 {stat:.1f} with {df} dof"
    stat, df = _chi2_two_sample(Counter(t[:2] for t in plain), Counter(t[:2] for t in spec))
    assert stat < _chi2_critical(df), f"pairs: chi2 {stat:.1f} with {df} dof"


def test_seeded_spec_sampling_does_not_depend_on_drafts(tiny_servers):
    """A seeded spec-mode sequence draws the same tokens whatever drafts it is offered (the uniform number
    of each position depends only on seed and position): replies are reproducible with adaptive k."""
    params = [{"temperature": 1.0, "seed": 42, "spec": True}]
    none, _ = _generate(tiny_servers, [PATTERN], 24, params)
    some, (d, _) = _generate(tiny_servers, [PATTERN], 24, params, lambda i, ctx: propose(ctx, 3, 5))
    wrong, _ = _generate(tiny_servers, [PATTERN], 24, params, lambda i, ctx: (propose(ctx, 1, 4) + 1) % 256)
    assert d > 0
    assert none == some == wrong
