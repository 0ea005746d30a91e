"""Random-weight GGUF generator: every supported arch loads in llama.cpp and gives sane logits."""

import llama_cpp  # noqa: F401  # must be imported before numpy (segfault otherwise on some builds)

import numpy as np
import pytest

from testmodels import MIN_LAYERS, SUPPORTED_TEST_ARCHS, write_random_gguf


def _last_logits(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    ptr = llm._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32).copy()


def _check(path, text=b"hello world"):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=False, verbose=False, n_threads=1)
    toks = llm.tokenize(text)
    assert len(toks) >= 3
    last = _last_logits(llm, toks)
    assert np.isfinite(last).all()
    assert float(last.std()) > 1e-4, "logits are (nearly) constant"
    # a different prompt gives different logits
    other = _last_logits(llm, llm.tokenize(b"Zq9 #"))
    assert np.isfinite(other).all()
    assert not np.allclose(last, other)
    # different tokens at the same position give different argmax somewhere
    argmaxes = {int(np.argmax(_last_logits(llm, [t]))) for t in range(3, 11)}
    assert len(argmaxes) > 1
    return last


@pytest.mark.parametrize("arch", SUPPORTED_TEST_ARCHS)
def test_arch_loads_and_runs(tmp_path, arch):
    path = write_random_gguf(tmp_path / f"{arch}.gguf", arch, n_layer=max(2, MIN_LAYERS.get(arch, 2)), n_embd=64, n_head=4)
    assert path.exists()
    _check(path)


_QTYPE_CASES = [(arch, qtype) for arch in SUPPORTED_TEST_ARCHS for qtype in ("f16", "q8_0", "q4_0")]


@pytest.mark.parametrize("arch,qtype", _QTYPE_CASES)
def test_qtypes(tmp_path, arch, qtype):
    path = write_random_gguf(tmp_path / f"{arch}-{qtype}.gguf", arch, n_layer=max(2, MIN_LAYERS.get(arch, 2)), qtype=qtype)
    _check(path)


@pytest.mark.parametrize("kw", [
    {"variant": "llama3"},
    {"variant": "mistral"},
    {"variant": "mixtral"},
    {"n_expert": 4, "n_expert_used": 2},
    {"n_head_kv": 2, "n_ff": 96, "n_vocab": 512},
])
def test_llama_variants(tmp_path, kw):
    path = write_random_gguf(tmp_path / "m.gguf", "llama", n_layer=2, **kw)
    _check(path)


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_deterministic(tmp_path, qtype):
    a = write_random_gguf(tmp_path / "a.gguf", "llama", seed=3, qtype=qtype)
    b = write_random_gguf(tmp_path / "b.gguf", "llama", seed=3, qtype=qtype)
    c = write_random_gguf(tmp_path / "c.gguf", "llama", seed=4, qtype=qtype)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_tokenizer_roundtrip(tmp_path):
    path = write_random_gguf(tmp_path / "m.gguf", "llama")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, vocab_only=True)
    toks = llm.tokenize(b"hello world", add_bos=False)
    assert llm.detokenize(toks) == b"hello world"


def test_bad_args(tmp_path):
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "no-such-arch")
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "llama", qtype="q5_k")
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "llama", n_vocab=50)
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "gemma3", variant="llama3")
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "gemma3", n_expert=4)
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "llama", sliding_window=8)


def test_olmo2_sliding_window(tmp_path):
    import gguf

    path = write_random_gguf(tmp_path / "m.gguf", "olmo2", n_layer=4, sliding_window=8)
    assert gguf.GGUFReader(path).get_field("olmo2.attention.sliding_window").contents() == 8
    _check(path)


def test_large_vocab_and_merges(tmp_path):
    path = write_random_gguf(tmp_path / "m.gguf", "qwen2", n_layer=1, n_vocab=5000, qtype="q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, vocab_only=True)
    assert llm.n_vocab() == 5000
    toks = llm.tokenize(b"the quick brown fox", add_bos=False)
    assert len(toks) < len(b"the quick brown fox")  # merges are used
    assert llm.detokenize(toks) == b"the quick brown fox"
    _check(path)


def test_phi4_mini_variant(tmp_path):
    path = write_random_gguf(tmp_path / "m.gguf", "phi3", n_layer=2, n_head_kv=2, variant="phi4-mini")
    _check(path)


def test_generator_is_not_in_the_runtime_package():
    import importlib.util

    assert importlib.util.find_spec("molink_lite.tools.testmodels") is None
