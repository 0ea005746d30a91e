"""Random-weight Qwen2-VL / Qwen2.5-VL vision projector ("mmproj") GGUFs for tests.

:func:`write_random_mmproj` writes a small CLIP-style GGUF that llama.cpp's multimodal
library ``mtmd`` (``tools/mtmd/clip.cpp``) loads as projector type ``qwen2vl_merger``
(or ``qwen2.5vl_merger``), to pair with a random ``qwen2vl`` text model from
:func:`tests.testmodels.write_random_gguf` whose ``n_embd`` equals ``n_embd_text``.

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

Weights are f32 (matrices optionally f16; the conv kernels may be f16 too).
"""

from __future__ import annotations

import os
import pathlib
from typing import List, Tuple

import numpy as np

from gguf import GGMLQuantizationType, GGUFWriter

__all__ = ["write_random_mmproj"]

_W_STD = 0.02


def write_random_mmproj(path: str | os.PathLike, n_embd_text: int, *, n_embd: int = 32, n_ff: int | None = None,
                        n_layer: int = 2, n_head: int = 2, image_size: int = 56, patch_size: int = 14,
                        variant: str = "qwen2vl", n_wa_pattern: int = 2, wtype: str = "f32",
                        seed: int = 0) -> pathlib.Path:
    """Write a random-weight Qwen2-VL (``variant="qwen2vl"``) or Qwen2.5-VL (``"qwen25vl"``)
    vision projector GGUF whose output embeddings are ``n_embd_text`` wide.

    ``n_embd`` / ``n_ff`` / ``n_layer`` / ``n_head``: the vision transformer (defaults: 32 wide,
    FFN 4x, 2 blocks, 2 heads of 16). ``image_size``/``patch_size``: metadata (the image is
    resized by mtmd anyway). ``wtype``: ``f32`` or ``f16`` for the 2-D weight matrices and conv
    kernels. Same arguments give a byte-identical file. Returns the path written.
    """
    if variant not in ("qwen2vl", "qwen25vl"):
        raise ValueError(f"unsupported variant {variant!r}")
    if wtype not in ("f32", "f16"):
        raise ValueError(f"unsupported wtype {wtype!r}")
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ValueError("n_embd / n_head must be an integer multiple of 4")
    if n_ff is None:
        n_ff = 4 * n_embd
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
        w.add_string("clip.projector_type", "qwen2.5vl_merger" if qwen25 else "qwen2vl_merger")
        w.add_uint32("clip.vision.image_size", image_size)
        w.add_uint32("clip.vision.patch_size", P)
        w.add_uint32("clip.vision.embedding_length", W)
        w.add_uint32("clip.vision.feed_forward_length", F)
        w.add_uint32("clip.vision.block_count", n_layer)
        w.add_uint32("clip.vision.attention.head_count", n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_uint32("clip.vision.projection_dim", E)
        w.add_uint32("clip.vision.spatial_merge_size", 2)
        w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
        w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
        if qwen25:
            w.add_uint32("clip.vision.n_wa_pattern", n_wa_pattern)
            w.add_bool("clip.use_silu", True)
        for name, ne, kind in tensors:
            shape = tuple(reversed(ne))
            if kind == "w":
                a = rng.standard_normal(shape, dtype=np.float32) * np.float32(_W_STD)
                if name.startswith("v.patch_embd"):
                    a *= np.float32(5.0)  # inputs are normalized pixels: give patches a useful scale
                if wtype == "f16":
                    a = a.astype(np.float16)
            elif kind == "norm":
                a = np.float32(1.0) + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            else:
                a = rng.standard_normal(shape, dtype=np.float32) * np.float32(_W_STD)
            w.add_tensor(name, np.ascontiguousarray(a),
                         raw_dtype=GGMLQuantizationType.F16 if a.dtype == np.float16 else GGMLQuantizationType.F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path
