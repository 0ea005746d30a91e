"""Smoke test: llama.cpp's multimodal library (mtmd) through llama-cpp-python's bindings
(``llama_cpp.mtmd_cpp``) loads a random-weight Qwen2-VL projector together with a
random-weight ``qwen2vl`` text model and turns a small RGB image into embeddings that
the text model decodes (CPU only).

Two ways of feeding the image are checked to give the same logits:

* mtmd's own helper, ``mtmd_helper_eval_chunks`` (encodes the image, decodes the chunks);
* by hand, as a split pipeline would: ``mtmd_encode_chunk`` + ``mtmd_get_output_embd``
  give the image embeddings [n_image_tokens, n_embd]; they are decoded with a plain
  ``llama_batch`` whose ``embd`` is set and whose ``pos`` holds 4 M-RoPE positions per
  token, section-major (``pos[j * n_tokens + i]``, j = t, y, x, z), taken from
  ``mtmd_image_tokens_get_decoder_pos``; the text after the image continues at
  ``n_past + max(nx, ny)`` (``mtmd_input_chunk_get_n_pos``), not ``n_past + n_tokens``;
* as a later pipeline stage would see it: every row (text rows as token_embd rows, i.e. a
  stage boundary at layer 0, and the image rows) in one embedding batch with 4 positions per
  row: (p, p, p, 0) for text, (t, y, x, 0) for image rows.

Perturbing the image rows, or giving them text-style positions, changes the logits.

Run as a script for a printed summary: ``python tests/test_vision_mtmd.py``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from typing import Dict, List

import llama_cpp  # noqa: I001  (import before numpy: see tests/testmodels.py)
from llama_cpp import mtmd_cpp as mtmd

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testmmproj import describe_chunks, random_image, write_random_mmproj  # noqa: E402
from testmodels import write_random_gguf  # noqa: E402

N_EMBD_TEXT = 64
N_THREADS = 2
PROMPT_TAIL = " describe it."


def _tokenize_text(vocab, text: bytes, add_special: bool) -> List[int]:
    buf = (llama_cpp.llama_token * (len(text) + 8))()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, len(buf), add_special, True)
    assert n >= 0
    return list(buf[:n])


class _Batch:
    """A llama_batch with arrays owned by Python; ``pos`` may be longer than n_tokens (M-RoPE)."""

    def __init__(self, n: int, *, tokens: List[int] | None = None, embd: np.ndarray | None = None,
                 pos: List[int] | np.ndarray, logits_last: bool = True, seq_id: int = 0):
        self.b = llama_cpp.llama_batch()
        self.b.n_tokens = n
        self._keep = []
        if tokens is not None:
            self.tok = (llama_cpp.llama_token * n)(*tokens)
            self.b.token = self.tok
        if embd is not None:
            self.embd = np.ascontiguousarray(embd, dtype=np.float32)
            self.b.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.pos = (llama_cpp.llama_pos * len(pos))(*[int(p) for p in pos])
        self.b.pos = self.pos
        self.n_seq = (ctypes.c_int32 * n)(*([1] * n))
        self.b.n_seq_id = self.n_seq
        self.sid = [(llama_cpp.llama_seq_id * 1)(seq_id) for _ in range(n)]
        self.sid_ptrs = (ctypes.POINTER(llama_cpp.llama_seq_id) * n)(
            *[ctypes.cast(s, ctypes.POINTER(llama_cpp.llama_seq_id)) for s in self.sid])
        self.b.seq_id = self.sid_ptrs
        self.lg = (ctypes.c_int8 * n)(*([0] * (n - 1) + [1 if logits_last else 0]))
        self.b.logits = self.lg


def _token_embd(path: str) -> np.ndarray:
    """token_embd.weight of an f32 GGUF as [n_vocab, n_embd]."""
    from gguf import GGUFReader
    t = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    return np.asarray(t.data, dtype=np.float32).reshape(-1, N_EMBD_TEXT).copy()


def _logits(lctx, n_vocab: int) -> np.ndarray:
    p = llama_cpp.llama_get_logits_ith(lctx, -1)
    return np.ctypeslib.as_array(p, shape=(n_vocab,)).copy()


def run_vision_smoke(tmpdir: str, *, image_side: int = 56, image_min_tokens: int = 0,
                     n_gen: int = 4, variant: str = "qwen2vl") -> Dict[str, object]:
    """Load text model + projector, evaluate "<text><image><text>" two ways, decode greedily.
    Returns a dict of what was observed (see the asserts in the tests)."""
    text_path = write_random_gguf(os.path.join(tmpdir, "text.gguf"), "qwen2vl", n_layer=2, n_embd=N_EMBD_TEXT,
                                  n_head=4, n_vocab=256)
    mmproj_path = write_random_mmproj(os.path.join(tmpdir, "mmproj.gguf"), N_EMBD_TEXT, n_embd=32, n_layer=2,
                                      n_head=2, image_size=image_side, patch_size=14, variant=variant)
    out: Dict[str, object] = {}

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mparams)
    assert model, "llama_model_load_from_file failed"
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    out["rope_type"] = llama_cpp.llama_model_rope_type(model)

    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 512
    cparams.n_batch = 512
    cparams.n_ubatch = 512
    cparams.n_threads = N_THREADS
    cparams.n_threads_batch = N_THREADS
    lctxs = [llama_cpp.llama_init_from_model(model, cparams) for _ in range(2)]
    assert all(lctxs), "llama_init_from_model failed"

    mp = mtmd.mtmd_context_params_default()
    mp.use_gpu = False
    mp.n_threads = N_THREADS
    mp.print_timings = False
    mp.warmup = False  # the default warmup encodes a 46x46-token image: slow on CPU
    if image_min_tokens:
        mp.image_min_tokens = image_min_tokens
    mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, mp)
    assert mctx, "mtmd_init_from_file failed"
    chunks = None
    bitmap = None
    try:
        out["support_vision"] = mtmd.mtmd_support_vision(mctx)
        out["use_mrope"] = mtmd.mtmd_decode_use_mrope(mctx)
        marker = mtmd.mtmd_default_marker()
        out["marker"] = marker

        img = random_image(image_side)
        data = (ctypes.c_uint8 * img.nbytes).from_buffer_copy(img.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(image_side, image_side, data)
        assert bitmap

        prompt = b"look:" + marker + PROMPT_TAIL.encode()
        text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
        assert rc == 0, f"mtmd_tokenize returned {rc}"

        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        desc = describe_chunks(chunks)
        out["chunks"] = desc
        out["n_tokens_total"] = mtmd.mtmd_helper_get_n_tokens(chunks)
        out["n_pos_total"] = mtmd.mtmd_helper_get_n_pos(chunks)

        # --- (a) mtmd's helper -------------------------------------------------------------
        new_n_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(mctx, lctxs[0], chunks, 0, 0, 512, True, ctypes.byref(new_n_past))
        assert rc == 0, f"mtmd_helper_eval_chunks returned {rc}"
        out["helper_n_past"] = new_n_past.value
        logits_a = _logits(lctxs[0], n_vocab)

        # --- (b) by hand: encode, then decode embeddings with explicit M-RoPE positions -------
        lctx = lctxs[1]
        n_past = 0
        for i in range(n_chunks):
            ch = mtmd.mtmd_input_chunks_get(chunks, i)
            last = i == n_chunks - 1
            if mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                toks = desc[i]["tokens"]
                b = _Batch(len(toks), tokens=toks, pos=list(range(n_past, n_past + len(toks))), logits_last=last)
                assert llama_cpp.llama_decode(lctx, b.b) == 0
                n_past += len(toks)
                continue
            rc = mtmd.mtmd_encode_chunk(mctx, ch)
            assert rc == 0, f"mtmd_encode_chunk returned {rc}"
            n_tok = desc[i]["n_tokens"]
            p = mtmd.mtmd_get_output_embd(mctx)
            embd = np.ctypeslib.as_array(p, shape=(n_tok, N_EMBD_TEXT)).copy()
            out["embd_shape"] = embd.shape
            out["embd_finite"] = bool(np.isfinite(embd).all())
            out["embd_std"] = float(embd.std())
            it = mtmd.mtmd_input_chunk_get_tokens_image(ch)
            rel = [mtmd.mtmd_image_tokens_get_decoder_pos(it, n_past, j) for j in range(n_tok)]
            # section-major: all t, then all y (rows), then all x (cols), then z (0)
            pos = ([r.t for r in rel] + [r.y for r in rel] + [r.x for r in rel] + [r.z for r in rel])
            out["image_pos_t_y_x_z"] = [(r.t, r.y, r.x, r.z) for r in rel]
            b = _Batch(n_tok, embd=embd, pos=pos, logits_last=last)
            assert llama_cpp.llama_decode(lctx, b.b) == 0
            n_past += mtmd.mtmd_input_chunk_get_n_pos(ch)
        out["manual_n_past"] = n_past
        logits_b = _logits(lctx, n_vocab)
        out["logits_finite"] = bool(np.isfinite(logits_a).all() and np.isfinite(logits_b).all())
        out["logits_max_abs_diff"] = float(np.abs(logits_a - logits_b).max())

        # --- greedy decoding after the prompt (on the helper's context) -----------------------
        gen = []
        pos = out["helper_n_past"]
        logits = logits_a
        for _ in range(n_gen):
            tok = int(np.argmax(logits))
            gen.append(tok)
            b = _Batch(1, tokens=[tok], pos=[pos])
            assert llama_cpp.llama_decode(lctxs[0], b.b) == 0
            pos += 1
            logits = _logits(lctxs[0], n_vocab)
            assert np.isfinite(logits).all()
        out["generated"] = gen

        # --- (c) a later stage's view: every row arrives as an embedding (here: stage boundary
        # at layer 0, so text rows are token_embd rows), one batch, 4 positions per row ----------
        tok_embd = _token_embd(str(text_path))
        rows, pos4 = [], []
        p0 = 0
        for i in range(n_chunks):
            ch = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                toks = desc[i]["tokens"]
                rows.append(tok_embd[toks])
                pos4 += [(p, p, p, 0) for p in range(p0, p0 + len(toks))]  # as llama.cpp expands text positions
                p0 += len(toks)
            else:
                rows.append(embd)
                pos4 += out["image_pos_t_y_x_z"]
                p0 += mtmd.mtmd_input_chunk_get_n_pos(ch)
        all_rows = np.concatenate(rows)
        pos_sm = np.asarray(pos4, dtype=np.int32).T.reshape(-1)  # section-major
        lctx = lctxs[1]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
        b = _Batch(len(all_rows), embd=all_rows, pos=pos_sm)
        assert llama_cpp.llama_decode(lctx, b.b) == 0
        logits_c = _logits(lctx, n_vocab)
        out["later_stage_rows"] = all_rows.shape
        out["later_stage_max_abs_diff"] = float(np.abs(logits_a - logits_c).max())

        # the image rows matter: perturb them (same positions) and the logits move
        all_rows2 = all_rows.copy()
        img_lo = len(desc[0]["tokens"])
        all_rows2[img_lo: img_lo + embd.shape[0]] += np.float32(0.5) * np.random.default_rng(7).standard_normal(
            embd.shape, dtype=np.float32)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
        b = _Batch(len(all_rows2), embd=all_rows2, pos=pos_sm)
        assert llama_cpp.llama_decode(lctx, b.b) == 0
        out["perturbed_image_logit_diff"] = float(np.abs(logits_a - _logits(lctx, n_vocab)).max())
        # and so do the 2-D positions: image rows with text-style positions (p, p, p, 0) give other logits
        pos_1d = []
        p0 = 0
        for d in desc:
            n = d["n_tokens"]
            pos_1d += [(p, p, p, 0) for p in range(p0, p0 + n)]
            p0 += n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
        b = _Batch(len(all_rows), embd=all_rows, pos=np.asarray(pos_1d, dtype=np.int32).T.reshape(-1))
        assert llama_cpp.llama_decode(lctx, b.b) == 0
        out["1d_positions_logit_diff"] = float(np.abs(logits_a - _logits(lctx, n_vocab)).max())
    finally:
        if chunks is not None:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap is not None:
            mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(mctx)
        for c in lctxs:
            llama_cpp.llama_free(c)
        llama_cpp.llama_model_free(model)
    return out


def _check(r: Dict[str, object], n_img: int, nx: int, ny: int) -> None:
    assert r["support_vision"] and r["use_mrope"]
    assert r["rope_type"] == llama_cpp.LLAMA_ROPE_TYPE_MROPE
    img = [c for c in r["chunks"] if c["type"] == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    assert len(img) == 1 and img[0]["n_tokens"] == n_img and (img[0]["nx"], img[0]["ny"]) == (nx, ny)
    assert img[0]["n_pos"] == max(nx, ny)
    assert r["embd_shape"] == (n_img, N_EMBD_TEXT) and r["embd_finite"] and r["embd_std"] > 0
    assert r["helper_n_past"] == r["manual_n_past"] == r["n_pos_total"]
    assert r["logits_finite"]
    assert r["logits_max_abs_diff"] < 1e-3, r["logits_max_abs_diff"]
    assert r["later_stage_max_abs_diff"] < 1e-3, r["later_stage_max_abs_diff"]
    assert r["perturbed_image_logit_diff"] > 1e-3
    assert r["1d_positions_logit_diff"] > 1e-5  # deterministic CPU run: any difference is the positions


def test_qwen2vl_mtmd_image_min_tokens():
    # 56x56 with patch 14 and 2x2 merge is 2x2 = 4 image tokens once the minimum allows it
    with tempfile.TemporaryDirectory() as d:
        r = run_vision_smoke(d, image_side=56, image_min_tokens=4)
    _check(r, 4, 2, 2)


def test_qwen2vl_mtmd_default_limits():
    # default minimum 8 tokens: mtmd upscales the 56x56 image (to 84x84: 3x3 tokens)
    with tempfile.TemporaryDirectory() as d:
        r = run_vision_smoke(d, image_side=56)
    img = [c for c in r["chunks"] if c["type"] == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE][0]
    _check(r, img["nx"] * img["ny"], img["nx"], img["ny"])
    assert img["nx"] * img["ny"] >= 8


def test_qwen25vl_mtmd_window_attention():
    # Qwen2.5-VL projector (RMSNorm, SiLU-gated FFN, windowed attention every other block): 112x112 -> 4x4 tokens
    with tempfile.TemporaryDirectory() as d:
        r = run_vision_smoke(d, image_side=112, variant="qwen25vl")
    _check(r, 16, 4, 4)


if __name__ == "__main__":
    import pprint
    with tempfile.TemporaryDirectory() as d:
        for kw in ({"image_side": 56, "image_min_tokens": 4}, {"image_side": 56}, {"image_side": 64}):
            res = run_vision_smoke(d, **kw)
            print(kw)
            pprint.pprint({k: v for k, v in res.items() if k != "image_pos_t_y_x_z"})
            print("image positions (t, y, x, z):", res["image_pos_t_y_x_z"])


# ---------------------------------------------------------------- the image prompt through two stage engines
def test_a_two_stage_split_takes_image_rows_and_reproduces_the_whole_model(tmp_path):
    """The first stage feeds the projector's image rows (``StageEngine.forward(embeddings=, pos4=)``), the second
    takes their hidden states with the same M-RoPE positions (``pos4``); text rows travel as today. The split's
    logits after "<text><image><text>" equal mtmd's own evaluation of the whole model, bit for bit (qwen2vl splits
    exactly). The wire, the gateway and the projector on a stage process are not built yet (issue 30)."""
    from molink_lite.model.split import LayerRange, stage_gguf
    from molink_lite.stage.engine import StageEngine

    text_path = write_random_gguf(str(tmp_path / "text.gguf"), "qwen2vl", n_layer=4, n_embd=N_EMBD_TEXT, n_head=4,
                                  n_vocab=256)
    mmproj_path = write_random_mmproj(str(tmp_path / "mmproj.gguf"), N_EMBD_TEXT, n_embd=32, n_layer=2, n_head=2,
                                      image_size=56, patch_size=14)
    whole = StageEngine(str(text_path), n_ctx=512, n_seq_max=1, n_threads=1, flash_attn=False)
    stages = [StageEngine(stage_gguf(str(text_path), r, cache_dir=str(tmp_path)), n_ctx=512, n_seq_max=1,
                          n_threads=1, flash_attn=False) for r in (LayerRange(0, 2), LayerRange(2, 4))]
    mp = mtmd.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.print_timings, mp.warmup = False, 1, False, False
    mp.image_min_tokens = 4
    mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), whole.model_ptr, mp)
    assert mctx
    try:
        img = random_image(56)
        data = (ctypes.c_uint8 * img.nbytes).from_buffer_copy(img.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(56, 56, data)
        prompt = b"describe " + mtmd.mtmd_default_marker() + b" in words"
        text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
        chunks = mtmd.mtmd_input_chunks_init()
        assert mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        # the whole model, as mtmd evaluates it (its own helper, on the whole engine's context)
        n_past = llama_cpp.llama_pos(0)
        lctx = whole._lanes[0].ctx
        assert mtmd.mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        want = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(256,)).copy()
        # the split, chunk by chunk
        p0, got = 0, None
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        for i in range(n_chunks):
            ch = mtmd.mtmd_input_chunks_get(chunks, i)
            last = i == n_chunks - 1
            if mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                toks = np.array([ptr[j] for j in range(n.value)], dtype=np.int32)
                pos = np.arange(p0, p0 + len(toks), dtype=np.int32)
                seq = np.zeros(len(toks), np.int32)
                h = stages[0].forward(seq, pos, tokens=toks)
                out = np.zeros(len(toks), bool)
                out[-1] = last
                got = stages[1].forward(seq, pos, hidden=h, output_rows=out)
                p0 += len(toks)
                continue
            assert mtmd.mtmd_encode_chunk(mctx, ch) == 0
            n_tok = mtmd.mtmd_input_chunk_get_n_tokens(ch)
            embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(mctx), shape=(n_tok, N_EMBD_TEXT)).copy()
            it = mtmd.mtmd_input_chunk_get_tokens_image(ch)
            rel = [mtmd.mtmd_image_tokens_get_decoder_pos(it, p0, j) for j in range(n_tok)]
            pos4 = np.array([(r.t, r.y, r.x, r.z) for r in rel], dtype=np.int32)
            seq = np.zeros(n_tok, np.int32)
            h = stages[0].forward(seq, pos4[:, 0], embeddings=embd, pos4=pos4)
            stages[1].forward(seq, pos4[:, 0], hidden=h, pos4=pos4, output_rows=np.zeros(n_tok, bool))
            p0 += mtmd.mtmd_input_chunk_get_n_pos(ch)
        assert p0 == n_past.value and got is not None
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(got[-1], want)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(mctx)
        for e in (*stages, whole):
            e.close()
