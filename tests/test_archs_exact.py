"""Every architecture in ``archs.RULES`` splits at its stated level: the last stage of a 2- or
3-stage chain gives bit-identical logits to the whole model (level ``exact``, f32 wire), or logits
within the rule's stated ``max_logit_diff`` with identical greedy tokens, each handed-on hidden
value reaching the next stage's graph within 1 float32 ulp (level ``ulp``), over a batched prefill
of 3 sequences of different lengths and 16 greedy decode steps.

Tiny random-weight models (6 layers, 64 wide) from :mod:`testmodels` (tests/testmodels.py); the whole
model's reference run is computed once per model and shared by all its splits.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401  # import before numpy

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from molink_lite.model import archs
from molink_lite.stage.engine import StageEngine
from molink_lite.model.split import LayerRange, SplitError, read_model_info, stage_gguf

from chain import greedy_run

N_LAYER = 6
PROMPT_LENS = (5, 12, 3)  # batched together; 12 + 16 steps crosses the 8-token sliding windows
N_STEPS = 16
N_CTX = 256
BASE_KW = dict(n_layer=N_LAYER, n_embd=64, n_head=4, n_vocab=160)

# Cuts used for every model unless the case names its own: 2 stages at the first, middle and last
# layer boundary, and two 3-stage chains (one with a 1-layer middle stage).
DEFAULT_CUTS: Tuple[Tuple[int, ...], ...] = ((1,), (3,), (5,), (2, 4), (1, 2))

# case id -> (arch, extra write_random_gguf kwargs, cuts or None for DEFAULT_CUTS)
CASES: Dict[str, Tuple[str, dict, Tuple[Tuple[int, ...], ...] | None]] = {}


def _case(cid: str, arch: str, cuts=None, **kw) -> None:
    CASES[cid] = (arch, kw, cuts)


for _arch in sorted(archs.RULES):
    _case(_arch, _arch)

# llama variants
_case("llama3", "llama", variant="llama3")            # rope_freqs.weight on every stage
_case("mistral", "llama", variant="mistral")          # GQA
_case("mixtral", "llama", variant="mixtral")          # 8 experts, 2 used
# sliding-window patterns: gemma3 period 6 (SWA 0-4, full 5), cohere2 period 4 (SWA 0-2, full 3, SWA 4-5)
_case("gemma3", "gemma3", cuts=((5,), (4,), (1,), (2, 5), (1, 3)))
_case("cohere2", "cohere2", cuts=((3,), (4,), (1,), (2, 4), (1, 3)))
# dense leading block (layer 0) then MoE: cut right after it and inside the MoE part
_case("deepseek", "deepseek", cuts=((1,), (3,), (1, 2), (2, 4)))
_case("deepseek2", "deepseek2", cuts=((1,), (3,), (1, 2), (2, 4)))

# OLMo 3 style: sliding window on layers 0-2 and 4-5, full attention on 3
_case("olmo2-swa", "olmo2", cuts=((3,), (4,), (2, 4), (3, 4), (1, 3)), sliding_window=8)
# no RoPE on every 4th layer, counted per stage: only stages starting at a multiple of 4
_case("smollm3", "smollm3", cuts=((4,), (8,), (4, 8)), n_layer=12)

# gemma/gemma2 multiply any input by sqrtf(n_embd): a width whose root is no power of two (96)
_case("gemma", "gemma", n_embd=96)
# gemma2: sliding window on even layers: every stage must hold one (cuts at even layers)
_case("gemma2", "gemma2", cuts=((2,), (4,), (2, 4), (2, 3)), n_embd=96)
# baichuan picks RoPE (32 layers, stages written as llama) or ALiBi (40 layers, as refact) by layer count
_case("baichuan", "baichuan", cuts=((1,), (16,), (31,), (10, 20)), n_layer=32)
# gpt-oss: sliding window on even layers (period 2): every stage must hold one
_case("gpt-oss", "gpt-oss", cuts=((2,), (4,), (2, 4)))
# llama4: no RoPE every 4th layer and MoE every 2nd, counted per stage: stages start at multiples of 4
_case("llama4", "llama4", cuts=((4,), (8,), (4, 8)), n_layer=12)
# glm4 (level bounded): later stages sum q.k in another order; head size 128 as in GLM-4-9B, with grouped-query
# attention as there and without (where the reordered sums show)
_case("glm4-h128", "glm4", n_embd=256, n_head=2, n_head_kv=1)
_case("glm4-h128-mha", "glm4", n_embd=256, n_head=2, n_head_kv=2)
# ... quantized (Q4_K): the q/k rows move as whole quantized rows
_case("glm4-q4k", "glm4", cuts=((2,), (2, 4)), n_embd=256, n_head=2, n_head_kv=1, qtype="q4_k")
# glm4moe: 6 blocks, the last a NextN block (not run): a 5-layer trunk, dense layer 0 then MoE
_case("glm4moe", "glm4moe", cuts=((1,), (3,), (4,), (1, 2), (2, 4)))
# hybrids: attention on layers 2, 5, 8, recurrent elsewhere; every stage needs both kinds
_case("lfm2", "lfm2", cuts=((3,), (6,), (3, 6)), n_layer=9)
_case("granitehybrid", "granitehybrid", cuts=((3,), (6,), (3, 6)), n_layer=9)
_case("lfm2moe", "lfm2moe", cuts=((3,), (6,), (3, 6)), n_layer=9)
# Phi-4-mini: phi3 with GQA, partial rotary and LongRoPE factors (global tensors on every stage)
_case("phi4-mini", "phi3", variant="phi4-mini", n_head_kv=2)
# Ministral 3: attention temperature tuning by absolute position
_case("ministral3", "mistral3", variant="ministral3", n_head_kv=2)
# Qwen3.5: full attention on layers 3, 7, 11 (interval 4), gated delta-net elsewhere
_case("qwen35", "qwen35", cuts=((4,), (6,), (4, 8), (5, 8)), n_layer=12, n_head_kv=2)
_case("qwen35moe", "qwen35moe", cuts=((4,), (6,), (4, 8)), n_layer=12, n_head_kv=2)
_case("qwen3next", "qwen3next", cuts=((4,), (6,), (5, 8)), n_layer=12, n_head_kv=2)
_case("baichuan-13b", "baichuan", cuts=((20,), (39,), (1, 2)), n_layer=40)


def _params():
    out = []
    for cid, (arch, kw, cuts) in CASES.items():
        for c in cuts or DEFAULT_CUTS:
            out.append(pytest.param(cid, c, id=f"{cid}-{'-'.join(map(str, c))}"))
    return out


def _prompts(n_vocab: int) -> List[List[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(3, n_vocab, size=n).tolist() for n in PROMPT_LENS]


def _engine(path) -> StageEngine:
    return StageEngine(path, n_ctx=N_CTX, n_seq_max=len(PROMPT_LENS), n_threads=1)


def _whole_greedy(path, prompts) -> Tuple[List[np.ndarray], list]:
    """The whole model's logits per step (copies: the engine's buffer goes with it) and greedy tokens."""
    whole = [_engine(path)]
    try:
        want, want_tok = greedy_run(whole, prompts, N_STEPS)
        return [np.array(a, copy=True) for a in want], want_tok
    finally:
        whole[0].close()


@pytest.fixture(scope="module")
def model_for(tiny_models):
    """case id -> (path, whole-model logits per step, greedy tokens), computed once per case."""
    cache: Dict[str, tuple] = {}

    def get(cid: str):
        if cid not in cache:
            arch, kw, _ = CASES[cid]
            path = tiny_models(arch, **{**BASE_KW, **kw})
            info = read_model_info(path)
            want, want_tok = _whole_greedy(path, _prompts(info.n_vocab))
            cache[cid] = (path, want, want_tok, info)
        return cache[cid]

    return get


@pytest.mark.parametrize("cid,cuts", _params())
def test_split_is_exact(model_for, cid, cuts):
    path, want, want_tok, info = model_for(cid)
    bounds = [0, *cuts, info.n_layer]
    engines = []
    try:
        for a, b in zip(bounds, bounds[1:]):
            engines.append(_engine(stage_gguf(path, LayerRange(a, b))))
        got, got_tok = greedy_run(engines, _prompts(info.n_vocab), N_STEPS)
    finally:
        for e in engines:
            e.close()
    assert len(got) == N_STEPS + 1
    rule = archs.RULES[info.arch]
    worst = 0.0
    for step, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape == (len(PROMPT_LENS), info.n_vocab)
        assert np.isfinite(a).all()
        if rule.level == archs.EXACT:
            assert np.array_equal(a, b), f"step {step}: max |diff| {np.abs(a - b).max()}"
        worst = max(worst, float(np.abs(a - b).max()))
    if rule.level in (archs.ULP, archs.BOUNDED):
        print(f"{cid} {cuts}: max logit difference {worst:.3g}")
        assert worst <= rule.max_logit_diff, f"max |diff| {worst} above the stated {rule.max_logit_diff}"
    assert np.array_equal(want_tok, got_tok)
    # the reference is not degenerate: sequences and steps differ
    assert len({tuple(r) for r in want_tok.tolist()}) > 1


def test_every_rule_is_covered():
    covered = {arch for arch, _, _ in CASES.values()}
    assert set(archs.RULES) <= covered
    assert len(archs.RULES) >= 45
    assert not set(archs.RULES) & set(archs.UNSUPPORTED)
    for rule in archs.RULES.values():
        assert rule.level in archs.LEVELS
        assert (rule.level in (archs.ULP, archs.BOUNDED)) == (rule.max_logit_diff is not None) == bool(rule.measured)


# ------------------------------------------------------------------ level ulp: what a later stage starts from

def _capture(engine: StageEngine, name: str) -> None:
    """Make a non-last stage capture tensor ``name`` instead of its last layer's output."""
    engine._target = name.encode()


@pytest.mark.parametrize("cid", sorted(c for c, (a, _, _) in CASES.items() if archs.RULES[a].hidden_input_scale(
    archs.SplitContext(a, 2, 1, 2, {f"{a}.embedding_length": 96})) != 1.0))
def test_handed_on_hidden_within_one_ulp(tiny_models, cid, monkeypatch):
    """llama.cpp's own scaled input of a later stage (``inp_scaled``) is the first stage's output within 1 ulp."""
    monkeypatch.setenv("MOLINK_STAGE_OUTPUT", "callback")  # this test captures another tensor: the callback path
    arch, kw, cuts = CASES[cid]
    path = tiny_models(arch, **{**BASE_KW, **kw})
    info = read_model_info(path)
    cut = (cuts or DEFAULT_CUTS)[0][0]
    first = _engine(stage_gguf(path, LayerRange(0, cut)))
    second = _engine(stage_gguf(path, LayerRange(cut, info.n_layer - 1)))  # non-last: it has the callback
    try:
        from chain import batch_for

        seq, pos, tok = batch_for(_prompts(info.n_vocab))
        h = first.forward(seq, pos, tokens=tok)
        assert second.input_scale != 1.0
        _capture(second, "inp_scaled")
        seen = second.forward(seq, pos, hidden=h)
    finally:
        first.close()
        second.close()
    assert seen.shape == h.shape and np.isfinite(h).all()
    ulps = np.abs(seen.astype(np.float64) - h) / np.spacing(np.abs(h)).astype(np.float64)
    exact = float((ulps == 0).mean())
    print(f"{cid}: {exact:.1%} of handed-on values exact, max {ulps.max():.0f} ulp")
    assert ulps.max() <= 1.0
    assert exact > 0.5


# ------------------------------------------------------------------ refusals

def test_gemma2_27b_attention_scale(tiny_models):
    """A 46-layer gemma2 (llama.cpp takes it for the 27B: attention scale 1/sqrt(n_embd/n_head), here
    1/sqrt(24), where its stages would use 1/sqrt(head_dim) = 1/sqrt(32)): the ratio is carried by RoPE's
    attn_factor on q and k; logits stay within the stated difference with identical greedy tokens (F16
    weights: the rule must not need F32 tensors)."""
    kw = {**BASE_KW, "n_layer": 46, "n_embd": 96, "head_dim": 32, "qtype": "f16"}
    path = tiny_models("gemma2", **kw)
    info = read_model_info(path)
    prompts = _prompts(info.n_vocab)
    want, want_tok = _whole_greedy(path, prompts)
    engines = [_engine(stage_gguf(path, LayerRange(a, b))) for a, b in ((0, 20), (20, 46))]
    try:
        got, got_tok = greedy_run(engines, prompts, N_STEPS)
    finally:
        for e in engines:
            e.close()
    worst = max(float(np.abs(a - b).max()) for a, b in zip(want, got))
    print(f"gemma2 46 layers: max logit difference {worst:.3g}")
    assert worst <= archs.MAXDIFF_GEMMA2_27B
    assert np.array_equal(want_tok, got_tok)


@pytest.mark.parametrize("arch", sorted(archs.UNSUPPORTED))
def test_unsupported_arch_is_refused(tiny_models, arch, tmp_path):
    from testmodels import SUPPORTED_TEST_ARCHS

    if arch not in SUPPORTED_TEST_ARCHS:
        pytest.skip(f"no test model generator for {arch}")
    path = tiny_models(arch, **BASE_KW)
    with pytest.raises(SplitError) as e:
        stage_gguf(path, LayerRange(0, 3), cache_dir=tmp_path)
    msg = str(e.value)
    assert f"'{arch}' is not supported" in msg
    assert archs.UNSUPPORTED[arch][:40] in msg
    assert "supported: " in msg and "llama" in msg and "qwen2" in msg


def test_unknown_arch_is_refused(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(path, "no-such-arch")
    w.add_block_count(4)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SplitError, match=r"architecture 'no-such-arch' is not supported .*supported: .*llama"):
        stage_gguf(path, LayerRange(0, 2), cache_dir=tmp_path)
    with pytest.raises(archs.UnsupportedArchitecture, match="supported: "):
        archs.rule_for("no-such-arch")


def test_cohere2_stage_without_swa_layer_is_refused(tiny_models, tmp_path):
    path = tiny_models("cohere2", **BASE_KW)
    with pytest.raises(SplitError, match="no sliding-window layer"):
        stage_gguf(path, LayerRange(3, 4), cache_dir=tmp_path)


@pytest.mark.parametrize("start", [1, 2, 3, 5])
def test_smollm3_stage_off_the_rope_period_is_refused(tiny_models, tmp_path, start):
    kw = {**BASE_KW, **CASES["smollm3"][1]}
    path = tiny_models("smollm3", **kw)
    with pytest.raises(SplitError, match="multiple of 4"):
        stage_gguf(path, LayerRange(start, kw["n_layer"]), cache_dir=tmp_path)


def test_stage_written_under_another_arch_reports_the_models(tiny_models, tmp_path):
    path = tiny_models("bloom", **BASE_KW)
    first, later = (stage_gguf(path, LayerRange(a, b), cache_dir=tmp_path) for a, b in ((0, 3), (3, 6)))
    with _engine(first) as e0, _engine(later) as e1:
        assert (e0.info.arch, e0.info.model_arch) == ("bloom", "bloom")
        assert (e1.info.arch, e1.info.model_arch) == ("mpt", "bloom")


def test_baichuan_without_position_encoding_is_refused(tiny_models, tmp_path):
    path = tiny_models("baichuan", **BASE_KW)  # 6 layers: baichuan.cpp uses neither RoPE nor ALiBi
    with pytest.raises(SplitError, match="neither"):
        stage_gguf(path, LayerRange(0, 3), cache_dir=tmp_path)


@pytest.mark.parametrize("arch", ["lfm2", "lfm2moe", "granitehybrid", "qwen35"])
@pytest.mark.parametrize("start,stop", [(0, 2), (2, 3)])
def test_hybrid_stage_needs_both_layer_kinds(tiny_models, tmp_path, arch, start, stop):
    path = tiny_models(arch, **{**BASE_KW, **CASES[arch][1]})
    with pytest.raises(SplitError, match="at least one attention and one recurrent layer"):
        stage_gguf(path, LayerRange(start, stop), cache_dir=tmp_path)


@pytest.mark.parametrize("start", [1, 2, 6])
def test_llama4_stage_off_the_period_is_refused(tiny_models, tmp_path, start):
    path = tiny_models("llama4", **{**BASE_KW, **CASES["llama4"][1]})
    with pytest.raises(SplitError, match="multiple of 4"):
        stage_gguf(path, LayerRange(start, 12), cache_dir=tmp_path)


def test_llama4_stage_of_under_4_layers_is_refused(tiny_models, tmp_path):
    path = tiny_models("llama4", **{**BASE_KW, **CASES["llama4"][1]})
    with pytest.raises(SplitError, match="at least 4 layers"):
        stage_gguf(path, LayerRange(4, 6), cache_dir=tmp_path)


def test_gpt_oss_stage_without_swa_layer_is_refused(tiny_models, tmp_path):
    path = tiny_models("gpt-oss", **BASE_KW)
    with pytest.raises(SplitError, match="no sliding-window layer"):
        stage_gguf(path, LayerRange(3, 4), cache_dir=tmp_path)


def test_command_r_plus_layer_count_is_refused(tmp_path):
    from testmodels import write_random_gguf

    path = write_random_gguf(tmp_path / "cr.gguf", "command-r", n_layer=64, n_embd=32, n_head=2, n_vocab=128)
    with pytest.raises(SplitError, match="64\\+ layers"):
        stage_gguf(path, LayerRange(0, 32), cache_dir=tmp_path)


# ------------------------------------------------------------------ helpers behind the levels

@pytest.mark.parametrize("n_embd", [96, 2048, 2304, 3072, 3584, 4608])  # tiny, Gemma 2B/7B, Gemma 2 2B/9B/27B
def test_prescale_hands_on_within_one_ulp(n_embd):
    """fl(prescale(h) * sqrtf(n_embd)) (what ggml_scale computes) is h or 1 ulp off, over 1M values of every
    magnitude; the plain division is not better anywhere."""
    s = float(np.sqrt(np.float32(n_embd)))
    rng = np.random.default_rng(n_embd)
    h = (rng.standard_normal(1 << 20) * np.exp(rng.uniform(-8, 12, 1 << 20))).astype(np.float32)
    got = archs.prescale(h, s) * np.float32(s)
    ulps = np.abs(got.astype(np.float64) - h) / np.spacing(np.abs(h)).astype(np.float64)
    naive = np.abs((h / np.float32(s) * np.float32(s)).astype(np.float64) - h)
    assert ulps.max() <= 1.0
    assert (np.abs(got.astype(np.float64) - h) <= naive).all()
    assert 0.8 < float((ulps == 0).mean()) < 1.0  # most exact; the rest are values no x reaches


def test_prescale_power_of_two_is_exact():
    h = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    assert np.array_equal(archs.prescale(h, 8.0) * np.float32(8.0), h)


def test_split_equal_order():
    # sequences of lengths 2, 3, 1 interleaved: a ubatch of 1 row of each sequence, then 1 row of seqs 1 and 0
    # (in the order of their first unused row), then the last row of seq 1 (llama.cpp's split_equal)
    seq = [0, 1, 1, 2, 0, 1]
    assert archs.split_equal_order(seq, 512) == [0, 1, 3, 2, 4, 5]
    assert archs.split_equal_order([3, 3, 3], 512) == [0, 1, 2]
    assert sorted(archs.split_equal_order([5, 1, 5, 2, 1, 9, 9, 9], 4)) == list(range(8))


# ------------------------------------------------------------------ gemma3n: the refusal, measured

# Gemma 3n is refused (archs.UNSUPPORTED); this measures what a split would give anyway, by lifting the refusal
# inside the test only. llama.cpp hard-codes 4 AltUp streams and 256 per-layer-input values per layer
# (llama-hparams.h), activation sparsity on layers 0-9 and KV reuse from layer 20 on (models/gemma3n.cpp): a
# 24-layer model runs all of these in the whole model.
GEMMA3N_KW = {**BASE_KW, "n_layer": 24}
GEMMA3N_CUTS = (4, 12, 22)
GEMMA3N_N_ALTUP = 4
GEMMA3N_N_EMBD_ALTUP = 256


def _gemma3n_lift_refusal(monkeypatch) -> None:
    """Let the splitter and the stage engine take gemma3n, as a plain rule with its sliding-window pattern (period
    5, as llama.cpp's gemma3n loader): only for this test."""
    monkeypatch.setitem(archs.RULES, "gemma3n", archs.ArchRule("gemma3n", swa=archs.SwaRule(period=5)))


def _gemma3n_slice_per_layer_tensors(monkeypatch) -> None:
    """Stage files whose per-layer-input tensors hold the stage's own layers (llama.cpp sizes them by the stage's
    layer count), so that the stages load: the most a layer split could keep of them."""
    from molink_lite.model import split

    plan = split.plan_stage
    a = GEMMA3N_N_EMBD_ALTUP

    def sliced(path, layers, reader=None, **kw):
        kv, tensors, align = plan(path, layers, reader, **kw)
        r = reader if reader is not None else split._reader(path)
        src = {t.name: t for t in r.tensors}
        for t in tensors:
            if t.name == "per_layer_token_embd.weight":      # numpy [n_vocab, 256 * n_layer]
                v = r.read_tensor_f32(src[t.name])[:, a * layers.start:a * layers.stop]
            elif t.name == "per_layer_model_proj.weight":    # numpy [256 * n_layer, n_embd]
                v = r.read_tensor_f32(src[t.name])[a * layers.start:a * layers.stop, :]
            else:
                continue
            v = np.ascontiguousarray(v, dtype=np.float32)
            t.ne, t.data, t.nbytes = tuple(reversed(v.shape)), v.tobytes(), v.nbytes
        return kv, tensors, align

    monkeypatch.setattr(split, "plan_stage", sliced)


class _ActiveStreamEngine(StageEngine):
    """A non-last gemma3n stage handing on the active AltUp stream (stream 0, ``i_altup_act``) of its last layer's
    output, which holds 4 streams of n_embd per row: what a wire of n_embd per row can carry. Callback capture
    path only (``MOLINK_STAGE_OUTPUT=callback``)."""

    def _eval_cb(self, t, ask, user):
        if ask:
            return super()._eval_cb(t, ask, user)
        from molink_lite.stage import engine as eng

        lane = self._lanes[(user or 1) - 1]
        row = 4 * self.info.n_embd
        rows = eng._ggml_nbytes(t) // (GEMMA3N_N_ALTUP * row)  # l_out: [n_embd, n_tokens, n_altup], stream-major
        eng._ggml_backend_tensor_get(t, lane.cap_buf[lane.cap_rows:lane.cap_rows + rows].ctypes.data, 0, rows * row)
        lane.cap_rows += rows
        return False


def _load_errors(paths) -> List[str]:
    """llama.cpp's error for each stage file, loaded in a subprocess (an abort there would not end this test)."""
    import subprocess
    import sys

    code = ("import llama_cpp, sys\nfrom molink_lite.stage.engine import StageEngine\n"
            "StageEngine(sys.argv[1], n_ctx=64, n_seq_max=1, n_threads=1).close()\nprint('loaded')\n")
    out = []
    for p in paths:
        r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
        lines = (r.stdout + r.stderr).splitlines()
        out.append("loaded" if r.returncode == 0 and "loaded" in lines else
                   next((ln for ln in lines if "error loading model" in ln), f"rc {r.returncode}: {lines[-1:]}"))
    return out


def _gemma3n_greedy(path: str, cut: int, n_layer: int, cache_dir, prompts):
    """Whole model and a 2-stage split at ``cut`` (active stream handed on): (max |logit diff|, prefill's max
    |logit diff|, share of greedy tokens that differ, max |logit| of the whole model)."""
    want, want_tok = _whole_greedy(path, prompts)
    paths = [stage_gguf(path, LayerRange(a, b), cache_dir=cache_dir) for a, b in ((0, cut), (cut, n_layer))]
    engines = [_ActiveStreamEngine(paths[0], n_ctx=N_CTX, n_seq_max=len(PROMPT_LENS), n_threads=1), _engine(paths[1])]
    try:
        got, got_tok = greedy_run(engines, prompts, N_STEPS)
    finally:
        for e in engines:
            e.close()
    assert all(np.isfinite(a).all() for a in want + got)
    return (max(float(np.abs(a - b).max()) for a, b in zip(want, got)), float(np.abs(want[0] - got[0]).max()),
            float((want_tok != got_tok).mean()), max(float(np.abs(a).max()) for a in want))


def test_gemma3n_split_is_far_from_exact(tiny_models, tmp_path, monkeypatch):
    """Re-measures archs.UNSUPPORTED["gemma3n"]: a 2-stage split of the random-weight gemma3n test model, over the
    prompts and steps of the exactness tests. (1) Stage files written as for other architectures do not load:
    per_layer_token_embd / per_layer_model_proj hold every layer's columns. (2) With those tensors sliced to the
    stage's layers, the first stage's last layer holds 4 AltUp streams per row: the engine refuses the capture.
    (3) Handing on the active stream, logits and greedy tokens are far from the whole model's, also with the
    per-layer inputs switched off (``blk.*.proj`` zeroed: AltUp alone, 6 layers: no KV reuse, sparsity on all)."""
    from gguf import GGUFReader
    from molink_lite.stage.engine import EngineError

    monkeypatch.setenv("MOLINK_STAGE_OUTPUT", "callback")
    n_layer = GEMMA3N_KW["n_layer"]
    path = tiny_models("gemma3n", **GEMMA3N_KW)
    prompts = _prompts(read_model_info(path).n_vocab)
    with pytest.raises(SplitError, match="gemma3n"):
        stage_gguf(path, LayerRange(0, 12), cache_dir=tmp_path / "refused")
    _gemma3n_lift_refusal(monkeypatch)

    # (1) as the splitter writes stages for other architectures
    naive = [stage_gguf(path, LayerRange(a, b), cache_dir=tmp_path / "naive") for a, b in ((0, 12), (12, n_layer))]
    errors = _load_errors(naive)
    print("gemma3n, stage files as written for other architectures:", errors)
    assert all("per_layer_token_embd.weight' has wrong shape" in e for e in errors), errors

    # (2) per-layer tensors sliced: the stages load, the hidden state is 4 streams per row
    _gemma3n_slice_per_layer_tensors(monkeypatch)
    sliced = tmp_path / "sliced"
    engines = [_engine(stage_gguf(path, LayerRange(a, b), cache_dir=sliced)) for a, b in ((0, 12), (12, n_layer))]
    try:
        with pytest.raises(EngineError, match="captured") as e:
            greedy_run(engines, prompts, N_STEPS)
    finally:
        for eng in engines:
            eng.close()
    n_rows = sum(PROMPT_LENS)
    print(f"gemma3n, per-layer tensors sliced: {e.value}")
    assert f"captured {GEMMA3N_N_ALTUP * n_rows} hidden rows for a batch of {n_rows}" in str(e.value)

    # (3) the active stream handed on
    bound = max(max(r.max_logit_diff or 0.0 for r in archs.RULES.values()), archs.MAXDIFF_GEMMA2_27B)
    for cut in GEMMA3N_CUTS:
        diff, prefill, mismatch, scale = _gemma3n_greedy(path, cut, n_layer, sliced, prompts)
        print(f"gemma3n {n_layer} layers, cut at {cut}: max logit difference {diff:.3g} (prefill {prefill:.3g}; "
              f"whole-model logits within +-{scale:.3g}), greedy tokens differing {mismatch:.0%}")
        assert diff > 100 * bound and prefill > 100 * bound
        assert mismatch > 0.5

    # AltUp alone: no per-layer inputs (their projection zeroed), 6 layers (no KV reuse; sparsity on every layer)
    alone = tmp_path / "gemma3n-no-per-layer-input.gguf"
    alone.write_bytes(Path(tiny_models("gemma3n", **BASE_KW)).read_bytes())
    r = GGUFReader(alone, "r+")
    for t in r.tensors:
        if t.name.startswith("blk.") and t.name.endswith(".proj.weight"):
            t.data[...] = 0
    r.data.flush()
    del r
    diff, prefill, mismatch, scale = _gemma3n_greedy(str(alone), 3, N_LAYER, tmp_path / "alone", prompts)
    print(f"gemma3n {N_LAYER} layers, per-layer inputs zeroed, cut at 3: max logit difference {diff:.3g} "
          f"(prefill {prefill:.3g}; whole-model logits within +-{scale:.3g}), greedy tokens differing {mismatch:.0%}")
    assert diff > 100 * bound and mismatch > 0.5
