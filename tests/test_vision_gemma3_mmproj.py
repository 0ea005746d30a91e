"""Smoke test: llama.cpp's multimodal library (mtmd) through llama-cpp-python's bindings loads a
random-weight Gemma 3 vision projector (:func:`tests.testmmproj.write_random_mmproj` with
``variant="gemma3"``) together with a random-weight ``gemma3`` text model and turns a PNG (encoded
here with zlib + struct, decoded by mtmd's ``mtmd_helper_bitmap_init_from_buf``) into image tokens
that the text model decodes (CPU only, one thread).

Checked: the projector says vision, non-causal image decoding and no M-RoPE; "look: <__media__> ok"
becomes text / image / text chunks, the image wrapped in ``<start_of_image>`` ... ``<end_of_image>``
(plain text for the test vocab); the image chunk has (image_size / patch / pool)^2 tokens and as
many positions, whatever the PNG's size (mtmd resizes it to image_size x image_size);
``mtmd_helper_eval_chunks`` runs to the end with finite logits, and another image gives other logits.

The text model has 6 layers: the random gemma3 has llama.cpp's pattern (5 sliding-window layers of 8
tokens, then one global layer), and " ok" after ``<end_of_image>`` is 16 byte tokens here, so with 2
(sliding-window only) layers the last token could not see the image at all (identical logits).
Non-M-RoPE models get nx = n_tokens, ny = 1 from mtmd.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict, List

import llama_cpp  # noqa: I001  (import before numpy: see tests/testmodels.py)
from llama_cpp import mtmd_cpp as mtmd

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testmmproj import describe_chunks, png_bytes, random_image, write_random_mmproj  # noqa: E402
from testmodels import write_random_gguf  # noqa: E402

N_EMBD_TEXT = 64
N_VOCAB = 256


def _detok(vocab, toks: List[int]) -> str:
    arr = (llama_cpp.llama_token * len(toks))(*toks)
    buf = ctypes.create_string_buffer(64 * len(toks) + 16)
    n = llama_cpp.llama_detokenize(vocab, arr, len(toks), buf, len(buf), False, False)
    assert n >= 0
    return buf.raw[:n].decode("utf-8", "replace")


def run_gemma3_vision(tmpdir: str, pngs: List[bytes], *, image_size: int = 56, patch_size: int = 14,
                      pool_size: int = 2) -> Dict[str, object]:
    """Load the gemma3 text model + Gemma 3 projector; for each PNG evaluate "look: <image> ok" with
    mtmd's helper (fresh KV cache each time). Returns what was observed."""
    text_path = write_random_gguf(os.path.join(tmpdir, "text.gguf"), "gemma3", n_layer=6, n_embd=N_EMBD_TEXT,
                                  n_head=4, n_vocab=N_VOCAB)
    mmproj_path = write_random_mmproj(os.path.join(tmpdir, "mmproj.gguf"), N_EMBD_TEXT, n_embd=32, n_layer=2,
                                      n_head=2, image_size=image_size, patch_size=patch_size, pool_size=pool_size,
                                      variant="gemma3")
    out: Dict[str, object] = {"runs": []}

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mparams)
    assert model, "llama_model_load_from_file failed"
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 512
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = 1
    lctx = llama_cpp.llama_init_from_model(model, cparams)
    assert lctx, "llama_init_from_model failed"

    mp = mtmd.mtmd_context_params_default()
    mp.use_gpu, mp.warmup, mp.n_threads, mp.print_timings = False, False, 1, False
    mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, mp)
    try:
        assert mctx, "mtmd_init_from_file failed"
        out["support_vision"] = bool(mtmd.mtmd_support_vision(mctx))
        out["non_causal"] = bool(mtmd.mtmd_decode_use_non_causal(mctx, None))
        out["use_mrope"] = bool(mtmd.mtmd_decode_use_mrope(mctx))
        prompt = b"look: " + mtmd.mtmd_default_marker() + b" ok"
        for png in pngs:
            r: Dict[str, object] = {}
            buf = (ctypes.c_uint8 * len(png)).from_buffer_copy(png)
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(mctx, buf, len(png), False)
            assert bitmap, "mtmd_helper_bitmap_init_from_buf failed"
            chunks = mtmd.mtmd_input_chunks_init()
            try:
                text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
                rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
                assert rc == 0, f"mtmd_tokenize returned {rc}"
                desc = describe_chunks(chunks)
                for d in desc:
                    if "tokens" in d:
                        d["text"] = _detok(vocab, d["tokens"])
                r["chunks"] = desc
                r["n_pos_total"] = mtmd.mtmd_helper_get_n_pos(chunks)
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
                n_past = llama_cpp.llama_pos(0)
                rc = mtmd.mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
                assert rc == 0, f"mtmd_helper_eval_chunks returned {rc}"
                r["n_past"] = n_past.value
                r["logits"] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).copy()
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
            out["runs"].append(r)
    finally:
        if mctx:
            mtmd.mtmd_free(mctx)
        llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)
    return out


@pytest.mark.parametrize("image_size,patch_size,pool_size,side", [
    (56, 14, 2, 2),  # the defaults: 4x4 patches, pooled 2x2 -> 4 tokens
    (64, 4, 4, 4),   # Gemma 3's own pooling kernel (4): 16x16 patches -> 16 tokens
])
def test_gemma3_projector_encodes_an_image_for_a_gemma3_text_model(tmp_path, image_size, patch_size, pool_size, side):
    pngs = [png_bytes(random_image(image_size, image_size, 1)),
            png_bytes(255 - random_image(image_size, image_size, 1)),  # another image, same size
            png_bytes(random_image(37, 90, 1))]                        # any size: resized to image_size x image_size
    r = run_gemma3_vision(str(tmp_path), pngs, image_size=image_size, patch_size=patch_size, pool_size=pool_size)
    assert r["support_vision"] and r["non_causal"] and not r["use_mrope"]
    n_img = side * side
    for run in r["runs"]:
        types = [c["type"] for c in run["chunks"]]
        assert types == [mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT, mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE,
                         mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT], types
        before, img, after = run["chunks"]
        assert before["text"].endswith("<start_of_image>") and after["text"].startswith("<end_of_image>"), \
            (before["text"], after["text"])
        assert img["n_tokens"] == n_img and img["n_pos"] == n_img, img
        assert (img["nx"], img["ny"]) == (n_img, 1), img  # 1-D positions: mtmd keeps no grid
        assert run["n_past"] == run["n_pos_total"] == sum(c["n_tokens"] for c in run["chunks"])
        assert np.isfinite(run["logits"]).all() and run["logits"].std() > 0
    a, b, c = (run["logits"] for run in r["runs"])
    assert np.abs(a - b).max() > 1e-3, np.abs(a - b).max()  # the image matters
    assert np.abs(a - c).max() > 1e-3, np.abs(a - c).max()


def test_gemma3_projector_file_is_deterministic_and_checks_its_arguments(tmp_path):
    p1 = write_random_mmproj(tmp_path / "a.gguf", N_EMBD_TEXT, variant="gemma3")
    p2 = write_random_mmproj(tmp_path / "b.gguf", N_EMBD_TEXT, variant="gemma3")
    assert p1.read_bytes() == p2.read_bytes()
    with pytest.raises(ValueError):
        write_random_mmproj(tmp_path / "c.gguf", N_EMBD_TEXT, variant="gemma3", image_size=56, patch_size=14,
                            pool_size=3)  # 4 patches per side do not pool by 3
    with pytest.raises(ValueError):
        write_random_mmproj(tmp_path / "d.gguf", N_EMBD_TEXT, variant="gemma3", n_ff=32)  # == n_embd: clip.cpp swaps


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        res = run_gemma3_vision(d, [png_bytes(random_image(56, 56, 1)), png_bytes(random_image(56, 56, 2))])
        print({k: v for k, v in res.items() if k != "runs"})
        for run in res["runs"]:
            print(run["chunks"], run["n_past"], run["logits"][:5])
