"""Random-weight Qwen2-VL / Qwen2.5-VL / Gemma 3 vision projector ("mmproj") GGUFs for tests.

:func:`write_random_mmproj` writes a small CLIP-style GGUF that llama.cpp's multimodal
library ``mtmd`` (``tools/mtmd/clip.cpp``) loads as projector type ``qwen2vl_merger``
(or ``qwen2.5vl_merger``), to pair with a random ``qwen2vl`` text model from
:func:`tests.testmodels.write_random_gguf` whose ``n_embd`` equals ``n_embd_text``; or
(``variant="gemma3"``) as projector type ``gemma3``, to pair with a random ``gemma3``
text model (layout of that one at the end of this docstring).

Layout, read from clip.cpp (``load_hparams`` / ``load_tensors``) and
``tools/mtmd/models/qwen2vl.cpp`` (llama.cpp as vendored in llama-cpp-python 0.3.36);
shapes are in ggml order (ne[0] first), W = vision width, F = vision FFN size,
P = patch size, E = text n_embd:

metadata
    ``general.architecture = "clip"``, ``clip.has_vision_encoder = true``,
    ``clip.projector_type``, ``clip.vision.{embedding_length, feed_forward_length,
    block_count, attention.head_count, attention.layer_norm_epsilon, projection_dim,
    image_size, patch_size, image_mean, image_std}`` (all required), optional
    ``clip.vision.spatial_merge_size`` (default 2) and, required for Qwen2.5-VL only,
    ``clip.vision.n_wa_pattern`` (full attention every n-th block, else windowed).
    No ``clip.use_gelu``/``use_silu``: the vision FFN then uses quick-GELU (Qwen2-VL).
tensors
    ``v.patch_embd.weight`` and ``v.patch_embd.weight.1``  [P, P, 3, W]  (conv kernels of
    the 2 temporal patches; a still image goes through both and the results are added;
    no patch bias, no class embedding, no position embedding: positions are 2-D RoPE);
    per block ``v.blk.N.{ln1,ln2}.{weight,bias}`` [W] (LayerNorm; RMSNorm weights only in
    2.5), ``attn_{q,k,v,out}.weight`` [W, W] + ``.bias`` [W], ``ffn_up.weight`` [W, F] +
    bias [F], ``ffn_down.weight`` [F, W] + bias [W] (2.5: also ``ffn_gate`` [W, F], SiLU);
    ``v.post_ln.{weight,bias}`` [W] (HF ``merger.ln_q``); merger MLP over 2x2 merged patches
    ``mm.0.weight`` [4W, 4W] + bias [4W], GELU, ``mm.2.weight`` [4W, E] + bias [E].

The output width (``mm.2.bias`` ne[0]) must equal the text model's n_embd, or
``mtmd_init_from_file`` fails ("mismatch between text model (n_embd = ...) and mmproj").
Head size W / n_head must be a multiple of 4 (the vision M-RoPE splits it in 4 sections).
The vision graph needs the image sides to be multiples of 2 * P; mtmd's preprocessor
resizes images to that (and to between 8 and 4096 output tokens by default).

Gemma 3 (``variant="gemma3"``), read from clip.cpp and ``tools/mtmd/models/siglip.cpp``
(the SigLIP graph, shared with idefics3/lfm2/...); N = (image_size / P)^2 patches, k = the
pooling kernel ``pool_size``:

metadata
    the same required ``clip.vision.*`` keys as above (``projection_dim`` is informational),
    ``clip.projector_type = "gemma3"``, ``clip.use_gelu = true`` (SigLIP's tanh-GELU; without
    it the FFN would be quick-GELU), ``clip.vision.projector.scale_factor = k`` (optional in
    clip.cpp, default 4 as in every real Gemma 3; only the tinygemma3 test model sets it),
    image mean/std 0.5 as in the real preprocessor.
tensors
    ``v.patch_embd.weight`` [P, P, 3, W] + ``v.patch_embd.bias`` [W] (one conv, stride P);
    ``v.position_embd.weight`` [W, N] (learned, added to the patches as is, so the image
    must give exactly N patches: mtmd's fixed-size preprocessor resizes every image to
    image_size x image_size (bilinear), whatever its size);
    per block ``v.blk.N.{ln1,ln2}.{weight,bias}`` [W] (LayerNorm), ``attn_{q,k,v,out}.weight``
    [W, W] + ``.bias`` [W], ``ffn_up.weight`` [W, F] + bias [F], GELU, ``ffn_down.weight``
    [F, W] + bias [W]; ``v.post_ln.{weight,bias}`` [W]; then the (image_size/P) x
    (image_size/P) patch grid is average-pooled with a k x k kernel and stride k,
    ``mm.soft_emb_norm.weight`` [W] (RMSNorm weight, multiplied as is; HF's
    Gemma3RMSNorm stores weight - 1, the converter adds the 1 back) and
    ``mm.input_projection.weight`` [E, W] (ggml order; clip.cpp multiplies by its transpose,
    and ``clip_n_mmproj_embd`` is its ne[0]).

So an image gives (image_size / P / k)^2 tokens (defaults 56 / 14 / 2: 2 x 2 = 4), whatever
``image_min_tokens``/``image_max_tokens`` say; image_size / P must be a multiple of k and the
grid square. mtmd wraps them in ``<start_of_image>`` ... ``<end_of_image>``, tokenized as
plain text (the test vocab gives byte tokens; no special tokens are needed), uses normal
1-D positions (n_pos == n_tokens) and decodes the image tokens with non-causal attention
(``mtmd_decode_use_non_causal`` is true for gemma3). The text model is not checked to be
gemma3; only its n_embd must equal E.

clip.cpp swaps ``ffn_up``/``ffn_down`` ("legacy naming") for qwen2vl, qwen2.5vl and gemma3
when ``ffn_down.weight`` ne[0] == W, so n_ff must differ from n_embd.

Weights are f32 (matrices optionally f16; the conv kernels may be f16 too; position
embeddings and all 1-D tensors stay f32).
"""

from __future__ import annotations

import os
import pathlib
import struct
import zlib
from typing import List, Optional, Tuple

import numpy as np

from gguf import GGMLQuantizationType, GGUFWriter

__all__ = ["write_random_mmproj", "random_image", "png_bytes", "describe_chunks"]

_W_STD = 0.02


def write_random_mmproj(path: str | os.PathLike, n_embd_text: int, *, n_embd: int = 32, n_ff: int | None = None,
                        n_layer: int = 2, n_head: int = 2, image_size: int = 56, patch_size: int = 14,
                        variant: str = "qwen2vl", n_wa_pattern: int = 2, pool_size: int = 2, wtype: str = "f32",
                        seed: int = 0) -> pathlib.Path:
    """Write a random-weight Qwen2-VL (``variant="qwen2vl"``), Qwen2.5-VL (``"qwen25vl"``) or
    Gemma 3 (``"gemma3"``) vision projector GGUF whose output embeddings are ``n_embd_text`` wide.

    ``n_embd`` / ``n_ff`` / ``n_layer`` / ``n_head``: the vision transformer (defaults: 32 wide,
    FFN 4x, 2 blocks, 2 heads of 16). ``image_size``/``patch_size``: metadata (Qwen: the image is
    resized by mtmd anyway; Gemma 3: every image is resized to image_size x image_size and the
    position embeddings cover (image_size / patch_size)^2 patches). ``pool_size`` (Gemma 3 only):
    the average-pooling kernel per side, so an image gives (image_size / patch_size / pool_size)^2
    tokens (defaults: 4). ``wtype``: ``f32`` or ``f16`` for the 2-D weight matrices and conv
    kernels. Same arguments give a byte-identical file. Returns the path written.
    """
    if variant not in ("qwen2vl", "qwen25vl", "gemma3"):
        raise ValueError(f"unsupported variant {variant!r}")
    if wtype not in ("f32", "f16"):
        raise ValueError(f"unsupported wtype {wtype!r}")
    if n_ff is None:
        n_ff = 4 * n_embd
    if variant == "gemma3":
        return _write_gemma3(path, n_embd_text, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head,
                             image_size=image_size, patch_size=patch_size, pool_size=pool_size, wtype=wtype, seed=seed)
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ValueError("n_embd / n_head must be an integer multiple of 4")
    W, F, P, E = n_embd, n_ff, patch_size, n_embd_text
    M = 4 * W  # width after the 2x2 spatial merge
    qwen25 = variant == "qwen25vl"

    # (name, ne in ggml order, kind) ; kind: w (matrix) | norm | bias
    tensors: List[Tuple[str, Tuple[int, ...], str]] = [
        ("v.patch_embd.weight", (P, P, 3, W), "w"),
        ("v.patch_embd.weight.1", (P, P, 3, W), "w"),
    ]
    for i in range(n_layer):
        b = f"v.blk.{i}"
        tensors += [(f"{b}.ln1.weight", (W,), "norm")]
        if not qwen25:
            tensors += [(f"{b}.ln1.bias", (W,), "bias")]
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors += [(f"{b}.{n}.weight", (W, W), "w"), (f"{b}.{n}.bias", (W,), "bias")]
        tensors += [(f"{b}.ln2.weight", (W,), "norm")]
        if not qwen25:
            tensors += [(f"{b}.ln2.bias", (W,), "bias")]
        tensors += [(f"{b}.ffn_up.weight", (W, F), "w"), (f"{b}.ffn_up.bias", (F,), "bias")]
        if qwen25:
            tensors += [(f"{b}.ffn_gate.weight", (W, F), "w"), (f"{b}.ffn_gate.bias", (F,), "bias")]
        tensors += [(f"{b}.ffn_down.weight", (F, W), "w"), (f"{b}.ffn_down.bias", (W,), "bias")]
    tensors += [("v.post_ln.weight", (W,), "norm")]
    if not qwen25:
        tensors += [("v.post_ln.bias", (W,), "bias")]
    tensors += [("mm.0.weight", (M, M), "w"), ("mm.0.bias", (M,), "bias"),
                ("mm.2.weight", (M, E), "w"), ("mm.2.bias", (E,), "bias")]

    extra: List[Tuple[str, str, object]] = [
        ("uint32", "clip.vision.spatial_merge_size", 2),
        ("array", "clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073]),
        ("array", "clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])]
    if qwen25:
        extra += [("uint32", "clip.vision.n_wa_pattern", n_wa_pattern), ("bool", "clip.use_silu", True)]
    return _write_clip(path, "qwen2.5vl_merger" if qwen25 else "qwen2vl_merger", variant, seed, wtype, [],
                       dict(image_size=image_size, patch_size=P, W=W, F=F, n_layer=n_layer, n_head=n_head, E=E),
                       extra, tensors)


def _write_clip(path: str | os.PathLike, projector: str, variant: str, seed: int, wtype: str,
                first: List[Tuple[str, str, object]], hp: dict, extra: List[Tuple[str, str, object]],
                tensors: List[Tuple[str, Tuple[int, ...], str]]) -> pathlib.Path:
    """Write one clip GGUF: the header every projector needs, ``first`` (keys before the vision hyperparameters),
    the vision hyperparameters ``hp``, ``extra`` keys ((kind, key, value): kind a GGUFWriter ``add_*``), then the
    ``tensors`` drawn by :func:`_random_tensor` in order from one generator seeded with ``seed``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, "clip")
    try:
        w.add_name("molink random-weight test mmproj")
        w.add_description(f"random weights, projector={variant}, seed={seed}")
        w.add_file_type(1 if wtype == "f16" else 0)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_text_encoder", False)
        w.add_string("clip.projector_type", projector)
        for kind, key, value in first:
            getattr(w, f"add_{kind}")(key, value)
        w.add_uint32("clip.vision.image_size", hp["image_size"])
        w.add_uint32("clip.vision.patch_size", hp["patch_size"])
        w.add_uint32("clip.vision.embedding_length", hp["W"])
        w.add_uint32("clip.vision.feed_forward_length", hp["F"])
        w.add_uint32("clip.vision.block_count", hp["n_layer"])
        w.add_uint32("clip.vision.attention.head_count", hp["n_head"])
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_uint32("clip.vision.projection_dim", hp["E"])
        for kind, key, value in extra:
            getattr(w, f"add_{kind}")(key, value)
        for name, ne, kind in tensors:
            a = _random_tensor(rng, name, ne, kind, wtype)
            w.add_tensor(name, a,
                         raw_dtype=GGMLQuantizationType.F16 if a.dtype == np.float16 else GGMLQuantizationType.F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


def _random_tensor(rng: np.random.Generator, name: str, ne: Tuple[int, ...], kind: str, wtype: str) -> np.ndarray:
    """Draw one tensor (numpy shape = reversed ggml ne); kind ``pos``: an f32
    matrix (position embeddings are added to f32 activations, so they stay f32)."""
    shape = tuple(reversed(ne))
    if kind in ("w", "pos"):
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(_W_STD)
        if name.startswith("v.patch_embd") or kind == "pos":
            a *= np.float32(5.0)  # inputs are normalized pixels: give patches (and positions) a useful scale
        if kind == "w" and wtype == "f16":
            a = a.astype(np.float16)
    elif kind == "norm":
        a = np.float32(1.0) + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
    else:
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(_W_STD)
    return np.ascontiguousarray(a)


def _write_gemma3(path: str | os.PathLike, n_embd_text: int, *, n_embd: int, n_ff: int, n_layer: int, n_head: int,
                  image_size: int, patch_size: int, pool_size: int, wtype: str, seed: int) -> pathlib.Path:
    """The Gemma 3 (SigLIP + avg-pool + RMSNorm + projection) mmproj; see the module docstring."""
    W, F, P, E, k = n_embd, n_ff, patch_size, n_embd_text, pool_size
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if F == W:
        raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn_up/ffn_down)")
    if k < 1 or image_size % P or (image_size // P) % k:
        raise ValueError("image_size must be a multiple of patch_size * pool_size")
    side = image_size // P  # patches per side
    N = side * side

    tensors: List[Tuple[str, Tuple[int, ...], str]] = [
        ("v.patch_embd.weight", (P, P, 3, W), "w"),
        ("v.patch_embd.bias", (W,), "bias"),
        ("v.position_embd.weight", (W, N), "pos"),
    ]
    for i in range(n_layer):
        b = f"v.blk.{i}"
        tensors += [(f"{b}.ln1.weight", (W,), "norm"), (f"{b}.ln1.bias", (W,), "bias")]
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors += [(f"{b}.{n}.weight", (W, W), "w"), (f"{b}.{n}.bias", (W,), "bias")]
        tensors += [(f"{b}.ln2.weight", (W,), "norm"), (f"{b}.ln2.bias", (W,), "bias")]
        tensors += [(f"{b}.ffn_up.weight", (W, F), "w"), (f"{b}.ffn_up.bias", (F,), "bias"),
                    (f"{b}.ffn_down.weight", (F, W), "w"), (f"{b}.ffn_down.bias", (W,), "bias")]
    tensors += [("v.post_ln.weight", (W,), "norm"), ("v.post_ln.bias", (W,), "bias"),
                ("mm.soft_emb_norm.weight", (W,), "norm"),
                ("mm.input_projection.weight", (E, W), "w")]

    return _write_clip(path, "gemma3", "gemma3", seed, wtype, [("bool", "clip.use_gelu", True)],
                       dict(image_size=image_size, patch_size=P, W=W, F=F, n_layer=n_layer, n_head=n_head, E=E),
                       [("uint32", "clip.vision.projector.scale_factor", k),
                        ("array", "clip.vision.image_mean", [0.5, 0.5, 0.5]),
                        ("array", "clip.vision.image_std", [0.5, 0.5, 0.5])], tensors)


# ---------------------------------------------------------------- images and what mtmd makes of them
def random_image(h: int, w: Optional[int] = None, seed: int = 1) -> np.ndarray:
    """A random RGB image [h, w, 3] uint8 (square when ``w`` is None) with some structure: a red top half."""
    w = h if w is None else w
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img[: h // 2, :, 0] = 255
    return np.ascontiguousarray(img)


def png_bytes(img: np.ndarray) -> bytes:
    """A minimal PNG of ``img`` [h, w, 3] uint8 (8-bit RGB, filter 0 on every row)."""
    h, w, _ = img.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def describe_chunks(chunks) -> List[dict]:
    """What ``mtmd_tokenize`` made of a prompt: per chunk its type, rows and positions, and the text tokens of a
    text chunk (``tokens``) or the grid of an image chunk (``nx``, ``ny``)."""
    import ctypes

    from llama_cpp import mtmd_cpp as mtmd

    out = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        ch = mtmd.mtmd_input_chunks_get(chunks, i)
        typ = mtmd.mtmd_input_chunk_get_type(ch)
        d = {"type": typ, "n_tokens": mtmd.mtmd_input_chunk_get_n_tokens(ch), "n_pos": mtmd.mtmd_input_chunk_get_n_pos(ch)}
        if typ == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            it = mtmd.mtmd_input_chunk_get_tokens_image(ch)
            d["nx"] = mtmd.mtmd_image_tokens_get_nx(it)
            d["ny"] = mtmd.mtmd_image_tokens_get_ny(it)
        else:
            n = ctypes.c_size_t()
            toks = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
            d["tokens"] = list(toks[: n.value])
        out.append(d)
    return out
