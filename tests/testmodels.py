"""Random-weight GGUF models for tests and benchmarks.

:func:`write_random_gguf` writes a small (or, for benchmarks, full-size) model of a
given llama.cpp architecture with random weights and a tiny byte-level BPE
tokenizer, so that llama.cpp (through llama-cpp-python) can load it, tokenize
ASCII text and produce finite, non-degenerate logits.

Weights are drawn from a numpy ``Generator`` seeded by ``seed``: matrices with std
~0.02, norm weights around 1.0, biases small. Tensors are generated and written
one at a time, so memory use stays around the size of the largest tensor. For
``q8_0``/``q4_0`` the quantized blocks are produced directly as random bytes
(with a fixed fp16 scale per block), which is fast enough for 8B-sized models.

Architectures are named as llama.cpp names them (``general.architecture``) and
described by data, not code: :data:`_SPECS` holds per architecture its metadata
rows and a table of tensor shapes (expressions over the model's dimensions, read
from the loaders in llama.cpp's ``src/models/<arch>.cpp``); a variant is a spec
named ``"<arch>:<variant>"``. :data:`SUPPORTED_TEST_ARCHS` lists those verified to
load and run.

Note: ``import llama_cpp`` before ``numpy`` in processes that also load models
(a known segfault otherwise on some builds); this module only needs numpy/gguf.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

__all__ = ["MIN_LAYERS", "SUPPORTED_TEST_ARCHS", "write_random_gguf"]

_QTYPES: Dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_k": GGMLQuantizationType.Q4_K,
}

# llama_ftype values for general.file_type (informational)
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k": 15}

_W_STD = 0.02  # std of random matrix entries


# --------------------------------------------------------------------------- #
# model description
# --------------------------------------------------------------------------- #

@dataclass
class _Params:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    variant: Optional[str]
    sliding_window: int = 0
    head_dim_: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.n_embd // self.n_head


@dataclass
class _Tensor:
    name: str
    ne: Tuple[int, ...]              # ggml order: ne[0] is the contiguous (row) dimension
    kind: str = "w"                  # w | norm | bias | zeros | ones | const | custom
    value: float = 0.0               # for const
    fn: Optional[Callable[[np.random.Generator, Tuple[int, ...]], np.ndarray]] = None  # custom, numpy shape
    quant: bool = True               # may be stored quantized (only for kind "w")
    std: float = _W_STD


@dataclass
class _Model:
    arch: str
    kv: List[Tuple[str, object, GGUFValueType, Optional[GGUFValueType]]] = field(default_factory=list)
    tensors: List[_Tensor] = field(default_factory=list)

    def _key(self, key: str) -> str:
        if key.startswith(("general.", "tokenizer.")):
            return key
        return f"{self.arch}.{key}"

    def u32(self, key: str, v: int) -> None:
        self.kv.append((self._key(key), int(v), GGUFValueType.UINT32, None))

    def i32(self, key: str, v: int) -> None:
        self.kv.append((self._key(key), int(v), GGUFValueType.INT32, None))

    def f32(self, key: str, v: float) -> None:
        self.kv.append((self._key(key), float(v), GGUFValueType.FLOAT32, None))

    def flag(self, key: str, v: bool) -> None:
        self.kv.append((self._key(key), bool(v), GGUFValueType.BOOL, None))

    def string(self, key: str, v: str) -> None:
        self.kv.append((self._key(key), str(v), GGUFValueType.STRING, None))

    def arr(self, key: str, v: Sequence, sub: GGUFValueType) -> None:
        self.kv.append((self._key(key), list(v), GGUFValueType.ARRAY, sub))

    def t(self, name: str, ne: Sequence[int], kind: str = "w", **kw) -> None:
        self.tensors.append(_Tensor(name, tuple(int(x) for x in ne), kind, **kw))


# --------------------------------------------------------------------------- #
# tokenizer: byte-level BPE (GPT-2 style) with a few merges
# --------------------------------------------------------------------------- #

def _bytes_to_unicode() -> Dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 (pad, bos, eos)
_MIN_VOCAB = 3 + 98 + 1  # specials + printable ASCII/whitespace bytes + at least one merged token


def _vocab(n_vocab: int) -> Tuple[List[str], List[int], List[str]]:
    """Token strings, token types and BPE merges for a vocab of exactly n_vocab tokens."""
    if n_vocab < _MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {_MIN_VOCAB}, got {n_vocab}")
    b2u = _bytes_to_unicode()
    # byte tokens, most useful first: printable ASCII, space, newline, tab, then the rest
    order = list(range(33, 127)) + [32, 10, 9, 13]
    order += [b for b in range(256) if b not in order]
    tokens: List[str] = list(_SPECIALS)
    types: List[int] = [int(gguf.TokenType.CONTROL)] * len(_SPECIALS)
    # keep room for some merged (multi-byte) tokens: gguf cannot store an empty merges list
    n_merged_min = max(1, min(32, n_vocab - _MIN_VOCAB + 1))
    n_bytes = min(256, n_vocab - len(tokens) - n_merged_min)
    byte_chars = [b2u[b] for b in order[:n_bytes]]
    tokens += byte_chars
    types += [int(gguf.TokenType.NORMAL)] * n_bytes
    merges: List[str] = []
    if len(tokens) < n_vocab:
        # multi-character tokens, built by merges of shorter ones (shorter strings first)
        alphabet = [b2u[ord(c)] for c in (" etaoinshrdlcumwfgypbvkjxqz"
                                           "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")]
        need = n_vocab - len(tokens)
        prev = list(alphabet)
        new: List[str] = []
        while len(new) < need:
            level = []
            for p in prev:
                for c in alphabet:
                    level.append(p + c)
                    if len(new) + len(level) >= need:
                        break
                if len(new) + len(level) >= need:
                    break
            for s in level:
                merges.append(f"{s[:-1]} {s[-1]}")
            new += level
            prev = level
        tokens += new
        types += [int(gguf.TokenType.NORMAL)] * len(new)
    assert len(tokens) == n_vocab
    return tokens, types, merges


def _add_tokenizer(w: GGUFWriter, n_vocab: int) -> None:
    tokens, types, merges = _vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# --------------------------------------------------------------------------- #
# weight generation
# --------------------------------------------------------------------------- #

def _np_shape(ne: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(reversed(ne))


def _rand_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random bytes as a writable uint8 array (fast: raw 64-bit draws)."""
    return rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]


def _float_data(rng: np.random.Generator, t: _Tensor) -> np.ndarray:
    shape = _np_shape(t.ne)
    if t.kind == "w":
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(t.std)
    elif t.kind == "norm":
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(0.05)
        a += np.float32(1.0)
    elif t.kind == "bias":
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(t.std)
    elif t.kind == "zeros":
        a = np.zeros(shape, dtype=np.float32)
    elif t.kind == "ones":
        a = np.ones(shape, dtype=np.float32)
    elif t.kind == "const":
        a = np.full(shape, t.value, dtype=np.float32)
    elif t.kind == "custom":
        assert t.fn is not None
        a = np.ascontiguousarray(t.fn(rng, shape), dtype=np.float32)
        assert a.shape == shape, (t.name, a.shape, shape)
    else:  # pragma: no cover
        raise ValueError(t.kind)
    return a


def _quant_blocks(rng: np.random.Generator, t: _Tensor, qt: GGMLQuantizationType) -> np.ndarray:
    """Random Q8_0 / Q4_0 / Q4_K blocks as uint8, numpy shape (..., bytes per row)."""
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
    ne = t.ne
    n_blocks = math.prod(ne) // block
    data = _rand_bytes(rng, n_blocks * tsize)
    blocks = data.reshape(n_blocks, tsize)
    if qt == GGMLQuantizationType.Q4_K:
        # value = d * scale * q - dmin * min with random 6-bit scales/mins and 4-bit q (benchmark shapes only):
        # dmin = 7.5 d centres the values (E[scale q] = 7.5 E[min]); their spread is then about 257 d
        d = t.std / 257.0
        blocks[:, 0:2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(7.5 * d).tobytes(), dtype=np.uint8)
        return data.reshape(*_np_shape(ne)[:-1], ne[0] // block * tsize)
    if qt == GGMLQuantizationType.Q8_0:
        q_std = math.sqrt((256.0 ** 2 - 1) / 12.0)   # uniform int8
    else:
        # Q4_0 value = (nibble - 8) * d: remap nibble 0 (-8) to 8 (0) so that values are
        # symmetric in -7..7 (zero-mean weights), 0 having twice the probability
        tmp = np.empty_like(data)
        np.bitwise_and(data, 0x0F, out=tmp)
        np.equal(tmp, 0, out=tmp.view(np.bool_))
        np.left_shift(tmp, 3, out=tmp)
        np.bitwise_or(data, tmp, out=data)
        np.bitwise_and(data, 0xF0, out=tmp)
        np.equal(tmp, 0, out=tmp.view(np.bool_))
        np.left_shift(tmp, 7, out=tmp)
        np.bitwise_or(data, tmp, out=data)
        del tmp
        q_std = math.sqrt(2.0 * sum(k * k for k in range(1, 8)) / 16.0)
    scale = np.frombuffer(np.float16(t.std / q_std).tobytes(), dtype=np.uint8)
    blocks[:, :2] = scale
    row_bytes = ne[0] // block * tsize
    return data.reshape(*_np_shape(ne)[:-1], row_bytes)


def _storage(t: _Tensor, qtype: str) -> GGMLQuantizationType:
    if qtype == "f32" or t.kind != "w" or not t.quant or len(t.ne) < 2:
        return GGMLQuantizationType.F32
    qt = _QTYPES[qtype]
    if qt in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0) and t.ne[0] % 32 != 0:
        return GGMLQuantizationType.F16
    if qt == GGMLQuantizationType.Q4_K and t.ne[0] % 256 != 0:
        return GGMLQuantizationType.Q8_0 if t.ne[0] % 32 == 0 else GGMLQuantizationType.F16
    return qt


def _tensor_payload(rng: np.random.Generator, t: _Tensor, st: GGMLQuantizationType) -> np.ndarray:
    if st == GGMLQuantizationType.F32:
        return _float_data(rng, t)
    if st == GGMLQuantizationType.F16:
        return _float_data(rng, t).astype(np.float16)
    return _quant_blocks(rng, t, st)


def _tensor_nbytes(t: _Tensor, st: GGMLQuantizationType) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(numpy shape given to add_tensor_info, numpy dtype, nbytes)."""
    shape = _np_shape(t.ne)
    n = math.prod(t.ne)
    if st == GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32), 4 * n
    if st == GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16), 2 * n
    block, tsize = gguf.GGML_QUANT_SIZES[st]
    return (*shape[:-1], t.ne[0] // block * tsize), np.dtype(np.uint8), n // block * tsize


# --------------------------------------------------------------------------- #
# helpers for the architecture table
# --------------------------------------------------------------------------- #

def _common_hp(m: _Model, p: _Params) -> None:
    m.u32("context_length", p.n_ctx_train)
    m.u32("embedding_length", p.n_embd)
    m.u32("block_count", p.n_layer)
    m.u32("feed_forward_length", p.n_ff)
    m.u32("attention.head_count", p.n_head)
    m.u32("attention.head_count_kv", p.n_head_kv)


def _n_ff_exp(p: _Params) -> int:
    return max(32, _round_up(p.n_ff // 2, 32))


def _rope_freqs(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    # llama3-style frequency factors: 1 for high frequencies, 8 for low ones, a smooth ramp between
    n = shape[0]
    lo, hi = n // 3, (2 * n) // 3
    f = np.ones(n, dtype=np.float32)
    f[lo:hi] = np.linspace(1.0, 8.0, hi - lo, dtype=np.float32)
    f[hi:] = 8.0
    return f


def _ssm_a_range(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    d_inner, d_state = shape
    return -np.broadcast_to(np.arange(1, d_state + 1, dtype=np.float32), shape).copy()


def _ssm_dt_bias(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=shape)).astype(np.float32)
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # inverse softplus


# --------------------------------------------------------------------------- #
# data-driven architectures: a table of metadata and tensor shapes per architecture
# --------------------------------------------------------------------------- #
#
# Each _Spec lists metadata rows (key, type, expression) and tensor rows (name, shape, kind,
# condition). Expressions are Python evaluated over the dimensions of the model being written:
#   L layers, E n_embd, H heads, K kv heads, D head size, F n_ff, V n_vocab, C n_ctx_train,
#   X experts, XU experts used, FX expert FFN size, i the layer index (tensor rows and "[...]"
#   per-layer arrays), plus the spec's own ``dims`` (name -> expression over the above).
#   VAR the variant ("" for none), SWOPT the optional sliding window (0: none), LEAD the dense lead layers.
# Metadata types: u32 | i32 | f32 | bool | str; "u32[]" a per-layer array (expression over i), "i32*" a
# fixed array (expression giving the list). A row's optional last element is a condition.
# Tensor names starting with "blk." are per layer ("blk.attn_q.weight" -> "blk.{i}.attn_q.weight").
# A shape is a comma-separated list of expressions in ggml order (ne[0] first).

#: llama.cpp architectures that need more than one layer to run (see the _SPECS comments)
MIN_LAYERS: Dict[str, int] = {"llama4": 4, "qwen35": 4, "qwen35moe": 4, "qwen3next": 4}

_KV_TYPES = {"u32": GGUFValueType.UINT32, "i32": GGUFValueType.INT32, "f32": GGUFValueType.FLOAT32,
             "bool": GGUFValueType.BOOL, "str": GGUFValueType.STRING}


@dataclass(frozen=True)
class _Spec:
    kv: Tuple[Tuple[str, ...], ...]                       # (key, type, expression[, condition])
    tensors: Tuple[Tuple[str, ...], ...]                  # (name, shape[, kind[, condition]])
    dims: Tuple[Tuple[str, str], ...] = ()                # extra dimensions, evaluated in order
    moe: Tuple[int, int] = (0, 0)                         # default (experts, used) when none are asked for
    base_kv: bool = True                                  # write the usual context/embedding/block/ff/head keys


def _dims(p: _Params, spec: _Spec) -> Dict[str, object]:
    d: Dict[str, object] = dict(L=p.n_layer, E=p.n_embd, H=p.n_head, K=p.n_head_kv, D=p.head_dim, F=p.n_ff,
                                V=p.n_vocab, C=p.n_ctx_train, X=p.n_expert, XU=p.n_expert_used,
                                FX=_n_ff_exp(p), SW=p.sliding_window or 8, SWOPT=p.sliding_window,
                                VAR=p.variant or "", LEAD=1 if p.n_layer > 1 else 0, max=max, min=min)
    for name, expr in spec.dims:
        d[name] = eval(expr, {}, d)  # noqa: S307 - expressions of this module's own table
    return d


def _kind_args(kind: str) -> Tuple[str, dict]:
    """'w' | 'w0.3' (std) | 'f32w' / 'f32w0.3' (matrix kept F32) | 'norm' | 'bias' / 'bias0.1' (std) | 'zeros' |
    'ones' | a name in _CUSTOM."""
    if kind.startswith("bias") and kind[4:]:
        return "bias", {"std": float(kind[4:])}
    if kind.startswith("f32w"):
        return "w", {"quant": False, **({"std": float(kind[4:])} if kind[4:] else {})}
    if kind.startswith("w") and kind[1:]:
        return "w", {"std": float(kind[1:])}
    if kind in _CUSTOM:
        return "custom", {"fn": _CUSTOM[kind]}
    return kind, {}


def _from_spec(m: _Model, p: _Params, spec: _Spec) -> None:
    d = _dims(p, spec)
    if spec.base_kv:
        _common_hp(m, p)
    for key, typ, expr, *cond in spec.kv:
        if cond and not eval(cond[0], {}, d):  # noqa: S307
            continue
        if typ.endswith("*"):  # a fixed array
            m.arr(key, eval(expr, {}, d), _KV_TYPES[typ[:-1]])  # noqa: S307
            continue
        if typ.endswith("[]"):
            vals = [eval(expr, {}, {**d, "i": i}) for i in range(p.n_layer)]  # noqa: S307
            m.kv = [row for row in m.kv if row[0] != m._key(key)]
            m.arr(key, vals, _KV_TYPES[typ[:-2]])
            continue
        v = eval(expr, {}, d)  # noqa: S307
        m.kv = [row for row in m.kv if row[0] != m._key(key)]
        m.kv.append((m._key(key), v, _KV_TYPES[typ], None))
    # global tensors first, then layer by layer (each layer's tensors in table order)
    glob = [r for r in spec.tensors if not r[0].startswith("blk.")]
    per_layer = [r for r in spec.tensors if r[0].startswith("blk.")]
    for i, rows in [(None, glob)] + [(il, per_layer) for il in range(p.n_layer)]:
        env = {**d, "i": i}
        for row in rows:
            name, shape = row[0], row[1]
            kind = row[2] if len(row) > 2 else "w"
            if len(row) > 3 and not eval(row[3], {}, env):  # noqa: S307
                continue
            kind_name, kw = _kind_args(kind)
            ne = tuple(int(eval(x, {}, env)) for x in shape.split(","))  # noqa: S307
            m.t(name if i is None else f"blk.{i}.{name[4:]}", ne, kind_name, **kw)


def _ssm_a_neg(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    return -np.exp(rng.uniform(0.0, 1.5, size=shape)).astype(np.float32)


_CUSTOM: Dict[str, Callable[[np.random.Generator, Tuple[int, ...]], np.ndarray]] = {
    "ssm_a": _ssm_a_neg,
    "dt_bias": _ssm_dt_bias,
    "ssm_a_range": _ssm_a_range,
    "rope_freqs": _rope_freqs,
}

_EMB = (("token_embd.weight", "E, V"), ("output_norm.weight", "E", "norm"))
_OUT = (("output.weight", "E, V"),)


def _when(cond: str, rows) -> Tuple[Tuple[str, ...], ...]:
    """Rows that only exist where ``cond`` holds (per-layer rows)."""
    return tuple((r[0], r[1], r[2] if len(r) > 2 else "w", cond) for r in rows)



# ---- building blocks (row tuples) for the spec table
def _n(name: str, dim: str = "E", bias: bool = False) -> Tuple[Tuple[str, ...], ...]:
    """A norm's weight (and bias)."""
    return ((f"{name}.weight", dim, "norm"),) + (((f"{name}.bias", dim, "bias"),) if bias else ())


def _attn_rows(bias_qkv: bool = False, bias_o: bool = False, qk_norm: bool = False) -> Tuple[Tuple[str, ...], ...]:
    rows = [("blk.attn_q.weight", "E, H*D"), ("blk.attn_k.weight", "E, K*D"), ("blk.attn_v.weight", "E, K*D")]
    if bias_qkv:
        rows += [("blk.attn_q.bias", "H*D", "bias"), ("blk.attn_k.bias", "K*D", "bias"), ("blk.attn_v.bias", "K*D", "bias")]
    rows.append(("blk.attn_output.weight", "H*D, E"))
    if bias_o:
        rows.append(("blk.attn_output.bias", "E", "bias"))
    if qk_norm:
        rows += [("blk.attn_q_norm.weight", "D", "norm"), ("blk.attn_k_norm.weight", "D", "norm")]
    return tuple(rows)


def _glu(ff: str = "F") -> Tuple[Tuple[str, ...], ...]:
    return (("blk.ffn_gate.weight", f"E, {ff}"), ("blk.ffn_down.weight", f"{ff}, E"), ("blk.ffn_up.weight", f"E, {ff}"))


def _moe(ff: str = "FX") -> Tuple[Tuple[str, ...], ...]:
    return (("blk.ffn_gate_inp.weight", "E, X", "f32w"), ("blk.ffn_gate_exps.weight", f"E, {ff}, X"),
            ("blk.ffn_down_exps.weight", f"{ff}, E, X"), ("blk.ffn_up_exps.weight", f"E, {ff}, X"))


def _shexp_rows(ff: str = "FX") -> Tuple[Tuple[str, ...], ...]:
    return (("blk.ffn_gate_shexp.weight", f"E, {ff}"), ("blk.ffn_down_shexp.weight", f"{ff}, E"),
            ("blk.ffn_up_shexp.weight", f"E, {ff}"))


# ungated MLP with biases (GPT-2 style)
_FFN_B = (("blk.ffn_up.weight", "E, F"), ("blk.ffn_up.bias", "F", "bias"), ("blk.ffn_down.weight", "F, E"),
          ("blk.ffn_down.bias", "E", "bias"))
_UP_DOWN = (("blk.ffn_down.weight", "F, E"), ("blk.ffn_up.weight", "E, F"))
_QKV = (("blk.attn_qkv.weight", "E, E + 2*K*D"),)
_QKV_B = _QKV + (("blk.attn_qkv.bias", "E + 2*K*D", "bias"),)


def _emb(tied: bool = False, out_norm_bias: bool = False) -> Tuple[Tuple[str, ...], ...]:
    return (("token_embd.weight", "E, V"),) + _n("output_norm", bias=out_norm_bias) + (() if tied else _OUT)


def _rms(eps: str = "1e-5") -> Tuple[Tuple[str, str, str], ...]:
    return (("attention.layer_norm_rms_epsilon", "f32", eps),)


def _ln(eps: str = "1e-5") -> Tuple[Tuple[str, str, str], ...]:
    return (("attention.layer_norm_epsilon", "f32", eps),)


def _rope(n_rot: str = "D", base: str = "10000.0") -> Tuple[Tuple[str, str, str], ...]:
    return (("rope.dimension_count", "u32", n_rot), ("rope.freq_base", "f32", base))


_KVLEN = (("attention.key_length", "u32", "D"), ("attention.value_length", "u32", "D"))
_MOE_KV = (("expert_count", "u32", "X", "X > 0"), ("expert_used_count", "u32", "XU", "X > 0"))
# GPT-NeoX/StarCoder/CodeShell blocks: LayerNorm(+bias), fused biased QKV, biased GELU MLP
_GELU_BLOCK = (*_n("blk.attn_norm", bias=True), *_QKV_B, ("blk.attn_output.weight", "E, E"),
               ("blk.attn_output.bias", "E", "bias"), *_n("blk.ffn_norm", bias=True), *_FFN_B)
_LLAMA_LAYER = (*_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"), *_glu())
_SANDWICH = (*_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.post_attention_norm"), *_n("blk.ffn_norm"),
             *_glu(), *_n("blk.post_ffw_norm"))

_ATTN = _attn_rows()
_GLU = _glu()
_MOE = _moe()
_SHEXP = _shexp_rows()

_BASE_SPECS: Dict[str, _Spec] = {
    "llama": _Spec(
        kv=(*_rms(), *_rope("D", "{'llama3': 500000.0, 'mistral': 1000000.0}.get(VAR, 10000.0)"), *_MOE_KV),
        tensors=(*_emb(), ("rope_freqs.weight", "D // 2", "rope_freqs", "VAR == 'llama3'"),
                 *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"),
                 *_when("X > 0", _moe("F")), *_when("X == 0", _glu()))),
    "gemma3": _Spec(
        kv=(*_KVLEN, *_rms("1e-6"), ("attention.sliding_window", "u32", "8"), ("rope.freq_base", "f32", "1000000.0"),
            ("rope.freq_base_swa", "f32", "10000.0")),
        tensors=(*_emb(tied=True), *_SANDWICH)),
    "qwen2": _Spec(kv=(*_rms("1e-6"), *_rope("D", "1000000.0")),
                   tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(bias_qkv=True), *_n("blk.ffn_norm"), *_glu())),
    "qwen3": _Spec(kv=(*_rms("1e-6"), *_rope("D", "1000000.0"), *_KVLEN),
                   tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.ffn_norm"), *_glu())),
    "qwen3moe": _Spec(
        moe=(4, 2),
        kv=(*_rms("1e-6"), *_rope("D", "1000000.0"), *_KVLEN, *_MOE_KV, ("expert_feed_forward_length", "u32", "FX")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.ffn_norm"), *_moe())),
    "qwen2moe": _Spec(
        moe=(4, 2),
        kv=(*_rms("1e-6"), *_rope("D", "1000000.0"), *_MOE_KV, ("expert_feed_forward_length", "u32", "FX"),
            ("expert_shared_feed_forward_length", "u32", "F")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(bias_qkv=True), *_n("blk.ffn_norm"), *_moe(),
                 ("blk.ffn_gate_inp_shexp.weight", "E", "bias0.1"), ("blk.ffn_gate_shexp.weight", "E, F"),
                 ("blk.ffn_down_shexp.weight", "F, E"), ("blk.ffn_up_shexp.weight", "E, F"))),
    # fused qkv of 3*n_embd: no GQA (n_head_kv is n_head)
    "qwen": _Spec(kv=(*_rms("1e-6"), *_rope()),
                  tensors=(*_emb(), *_n("blk.attn_norm"), ("blk.attn_qkv.weight", "E, 3*E"),
                           ("blk.attn_qkv.bias", "3*E", "bias"), ("blk.attn_output.weight", "E, E"),
                           *_n("blk.ffn_norm"), *_glu("F // 2"))),
    "gemma": _Spec(kv=(*_rms("1e-6"), *_rope(), *_KVLEN), tensors=(*_emb(tied=True), *_LLAMA_LAYER)),
    "gemma2": _Spec(
        kv=(*_rms("1e-6"), *_rope(), *_KVLEN, ("attention.sliding_window", "u32", "8"),
            ("attn_logit_softcapping", "f32", "50.0"), ("final_logit_softcapping", "f32", "30.0")),
        tensors=(*_emb(tied=True), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.post_attention_norm"),
                 *_n("blk.ffn_norm"), *_glu(), *_n("blk.post_ffw_norm"))),
    "phi3": _Spec(kv=(*_rms(), *_rope()),
                  tensors=(*_emb(), *_n("blk.attn_norm"), *_QKV, ("blk.attn_output.weight", "E, E"),
                           *_n("blk.ffn_norm"), ("blk.ffn_up.weight", "E, 2*F"), ("blk.ffn_down.weight", "F, E"))),
    "phi2": _Spec(kv=(*_ln(), *_rope("D // 2")),
                  tensors=(*_emb(out_norm_bias=True), ("output.bias", "V", "bias"), *_n("blk.attn_norm", bias=True),
                           *_attn_rows(bias_qkv=True, bias_o=True), *_FFN_B)),
    "baichuan": _Spec(kv=(*_rms("1e-6"), *_rope()), tensors=(*_emb(), *_LLAMA_LAYER)),
    "bloom": _Spec(kv=_ln(), tensors=(("token_embd.weight", "E, V"), *_n("token_embd_norm", bias=True),
                                      *_n("output_norm", bias=True), *_GELU_BLOCK)),
    "gpt2": _Spec(kv=_ln(), tensors=(("token_embd.weight", "E, V"), ("position_embd.weight", "E, C", "f32w"),
                                     *_n("output_norm", bias=True), *_OUT, *_GELU_BLOCK)),
    "starcoder2": _Spec(kv=(*_ln(), *_rope("D", "100000.0")),
                        tensors=(*_emb(out_norm_bias=True), *_n("blk.attn_norm", bias=True),
                                 *_attn_rows(bias_qkv=True, bias_o=True), *_n("blk.ffn_norm", bias=True), *_FFN_B)),
    "falcon": _Spec(kv=(*_ln(), *_rope()),
                    tensors=(*_emb(out_norm_bias=True), *_n("blk.attn_norm", bias=True), *_QKV,
                             ("blk.attn_output.weight", "E, E"), ("blk.ffn_up.weight", "E, F"),
                             ("blk.ffn_down.weight", "F, E"))),
    "chatglm": _Spec(kv=(*_rms(), *_rope("D // 2")),
                     tensors=(*_emb(), *_n("blk.attn_norm"), *_QKV_B, ("blk.attn_output.weight", "E, E"),
                              *_n("blk.ffn_norm"), ("blk.ffn_up.weight", "E, 2*F"), ("blk.ffn_down.weight", "F, E"))),
    "glm4": _Spec(kv=(*_rms(), *_rope("D // 2")),
                  tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(bias_qkv=True), *_n("blk.post_attention_norm"),
                           *_n("blk.ffn_norm"), ("blk.ffn_up.weight", "E, 2*F"), ("blk.ffn_down.weight", "F, E"),
                           *_n("blk.post_ffw_norm"))),
    "command-r": _Spec(kv=(*_ln(), *_rope(), ("logit_scale", "f32", "0.0625")),
                       tensors=(*_emb(tied=True), *_n("blk.attn_norm"), *_attn_rows(), *_glu())),
    "cohere2": _Spec(kv=(*_ln(), *_rope("D", "50000.0"), ("logit_scale", "f32", "0.25"),
                         ("attention.sliding_window", "u32", "8")),
                     tensors=(*_emb(tied=True), *_n("blk.attn_norm"), *_attn_rows(), *_glu())),
    # OLMo 3: sliding window (write_random_gguf's sliding_window) on 3 of every 4 layers
    "olmo2": _Spec(kv=(*_rms("1e-6"), *_rope("D", "500000.0"),
                       ("attention.sliding_window", "u32", "SWOPT", "SWOPT > 0")),
                   tensors=(*_emb(), *_attn_rows(), *_n("blk.attn_q_norm"), *_n("blk.attn_k_norm", "K*D"),
                            *_n("blk.post_attention_norm"), *_glu(), *_n("blk.post_ffw_norm"))),
    "granite": _Spec(
        kv=(*_rms(), *_rope(), ("logit_scale", "f32", "8.0"), ("residual_scale", "f32", "0.22"),
            ("embedding_scale", "f32", "12.0"), ("attention.scale", "f32", "1.0 / D"), *_MOE_KV),
        tensors=(*_emb(tied=True), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"),
                 *_when("X > 0", _moe("F")), *_when("X == 0", _glu()))),
    # dense first layer (leading_dense_block_count 1), then MoE with a shared expert
    "deepseek": _Spec(
        moe=(4, 2),
        kv=(*_rms("1e-6"), *_rope(), *_MOE_KV, ("leading_dense_block_count", "u32", "LEAD"),
            ("expert_feed_forward_length", "u32", "FX"), ("expert_shared_count", "u32", "1"),
            ("expert_weights_scale", "f32", "1.0")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"), *_when("i < LEAD", _glu()),
                 *_when("i >= LEAD", _moe() + _shexp_rows()))),
    # DeepSeek-V3 style: MLA (absorbed, as written by current convert_hf_to_gguf) + sigmoid-gated MoE
    "deepseek2": _Spec(
        moe=(4, 2), base_kv=False,
        dims=(("NOPE", "D"), ("ROPE", "max(2, D // 2)"), ("VH", "D"), ("KVL", "max(32, -(-(E // 2) // 32) * 32)"),
              ("QL", "max(32, -(-(E // 2) // 32) * 32)")),
        kv=(("context_length", "u32", "C"), ("embedding_length", "u32", "E"), ("block_count", "u32", "L"),
            ("feed_forward_length", "u32", "F"), ("attention.head_count", "u32", "H"),
            ("attention.head_count_kv", "u32", "1"), ("attention.key_length", "u32", "KVL + ROPE"),
            ("attention.value_length", "u32", "KVL"), ("attention.key_length_mla", "u32", "NOPE + ROPE"),
            ("attention.value_length_mla", "u32", "VH"), ("attention.q_lora_rank", "u32", "QL"),
            ("attention.kv_lora_rank", "u32", "KVL"), *_rms("1e-6"), *_rope("ROPE"), *_MOE_KV,
            ("leading_dense_block_count", "u32", "LEAD"), ("expert_feed_forward_length", "u32", "FX"),
            ("expert_shared_count", "u32", "1"), ("expert_weights_scale", "f32", "2.5"),
            ("expert_weights_norm", "bool", "True"), ("expert_gating_func", "u32", "2")),
        tensors=(*_emb(), *_n("blk.attn_norm"), ("blk.attn_q_a.weight", "E, QL"), *_n("blk.attn_q_a_norm", "QL"),
                 ("blk.attn_q_b.weight", "QL, H * (NOPE + ROPE)"), ("blk.attn_kv_a_mqa.weight", "E, KVL + ROPE"),
                 *_n("blk.attn_kv_a_norm", "KVL"), ("blk.attn_k_b.weight", "NOPE, KVL, H"),
                 ("blk.attn_v_b.weight", "KVL, VH, H"), ("blk.attn_output.weight", "H * VH, E"), *_n("blk.ffn_norm"),
                 *_when("i < LEAD", _glu()),
                 *_when("i >= LEAD", _moe() + (("blk.exp_probs_b.bias", "X", "bias0.01"),) + _shexp_rows()))),
    "mamba": _Spec(
        base_kv=False,
        dims=(("DI", "2*E"), ("DS", "16"), ("DR", "max(1, -(-E // 16))")),
        kv=(("context_length", "u32", "C"), ("embedding_length", "u32", "E"), ("block_count", "u32", "L"),
            ("feed_forward_length", "u32", "0"), ("attention.head_count", "u32", "0"), *_rms(),
            ("ssm.conv_kernel", "u32", "4"), ("ssm.inner_size", "u32", "DI"), ("ssm.state_size", "u32", "DS"),
            ("ssm.time_step_rank", "u32", "DR")),
        tensors=(*_emb(), *_n("blk.attn_norm"), ("blk.ssm_in.weight", "E, 2*DI"),
                 ("blk.ssm_conv1d.weight", "4, DI", "f32w0.3"), ("blk.ssm_conv1d.bias", "DI", "bias"),
                 ("blk.ssm_x.weight", "DI, DR + 2*DS"), ("blk.ssm_dt.weight", "DR, DI", "w0.3"),
                 ("blk.ssm_dt.bias", "DI", "dt_bias"), ("blk.ssm_a", "DS, DI", "ssm_a_range"),
                 ("blk.ssm_d", "DI", "ones"), ("blk.ssm_out.weight", "DI, E"))),
    "internlm2": _Spec(kv=(*_rms(), *_rope("D", "1000000.0")), tensors=(*_emb(), *_LLAMA_LAYER)),
    "xverse": _Spec(kv=(*_rms("1e-6"), *_rope()), tensors=(*_emb(), *_LLAMA_LAYER)),
    "orion": _Spec(kv=(*_ln(), *_rope()),
                   tensors=(*_emb(out_norm_bias=True), *_n("blk.attn_norm", bias=True), *_attn_rows(),
                            *_n("blk.ffn_norm", bias=True), *_glu())),
    # StableLM 2: LayerNorm with bias, partial rotary (25%), q/k/v biases
    "stablelm": _Spec(kv=(*_ln(), *_rope("D // 4")),
                      tensors=(*_emb(out_norm_bias=True), *_n("blk.attn_norm", bias=True),
                               *_attn_rows(bias_qkv=True), *_n("blk.ffn_norm", bias=True), *_glu())),
    # OLMo 1: non-parametric LayerNorm (no norm tensors at all), optional QKV clamp
    "olmo": _Spec(kv=(*_ln(), *_rope(), ("attention.clamp_kqv", "f32", "8.0")),
                  tensors=(("token_embd.weight", "E, V"), *_OUT, *_attn_rows(), *_glu())),
    "exaone": _Spec(kv=(*_rms(), *_rope("D", "500000.0")),
                    tensors=(*_emb(), ("rope_freqs.weight", "D // 2", "rope_freqs"), *_LLAMA_LAYER)),
    # AFM: llama with a squared-ReLU MLP (no gate)
    "arcee": _Spec(kv=(*_rms(), *_rope()),
                   tensors=(*_emb(tied=True), ("rope_freqs.weight", "D // 2", "rope_freqs"), *_n("blk.attn_norm"),
                            *_attn_rows(), *_n("blk.ffn_norm"), *_UP_DOWN)),
    # no RoPE on every 4th layer (hard-coded n_no_rope_layer_step = 4 in smollm3.cpp)
    "smollm3": _Spec(kv=(*_rms("1e-6"), *_rope("D", "2000000.0")), tensors=(*_emb(tied=True), *_LLAMA_LAYER)),
    "mistral3": _Spec(kv=(*_rms(), *_rope("D", "1000000.0")), tensors=(*_emb(), *_LLAMA_LAYER)),
    # Ministral 3 / Mistral Small 3.x style: llama 4's attention temperature tuning by position (floor scale
    # from the original context, 8 here so the tests' positions cross it)
    "mistral3:ministral3": _Spec(
        kv=(*_rms(), *_rope("D", "1000000.0"), ("attention.temperature_scale", "f32", "0.1"),
            ("rope.scaling.original_context_length", "u32", "8")),
        tensors=(*_emb(), *_LLAMA_LAYER)),
    "ernie4_5": _Spec(kv=(*_rms(), *_rope("D", "500000.0")), tensors=(*_emb(tied=True), *_LLAMA_LAYER)),
    # no embedding_scale / residual_scale / logit_scale keys: llama.cpp's defaults apply
    # (12, 1.4/sqrt(n_layer), 256/n_embd), as in older MiniCPM GGUFs
    "minicpm": _Spec(kv=(*_rms(), *_rope()), tensors=(*_emb(tied=True), *_LLAMA_LAYER)),
    # ALiBi (max bias 8, hard-coded), no RoPE
    "refact": _Spec(kv=_rms(), tensors=(*_emb(), *_LLAMA_LAYER)),
    # ALiBi, LayerNorm without bias, GELU MLP, tied embeddings, QKV clamp
    "mpt": _Spec(kv=(*_ln(), ("attention.max_alibi_bias", "f32", "8.0"), ("attention.clamp_kqv", "f32", "6.0")),
                 tensors=(("token_embd.weight", "E, V"), *_n("output_norm"), *_n("blk.attn_norm"), *_QKV,
                          ("blk.attn_output.weight", "E, E"), *_n("blk.ffn_norm"), *_UP_DOWN)),
    "gptneox": _Spec(kv=(*_ln(), *_rope("D // 4"), ("use_parallel_residual", "bool", "True")),
                     tensors=(*_emb(out_norm_bias=True), *_GELU_BLOCK)),
    # learned absolute position embeddings (position_embd.weight, required)
    "starcoder": _Spec(kv=_ln(), tensors=(("token_embd.weight", "E, V"), ("position_embd.weight", "E, C", "f32w"),
                                          *_n("output_norm", bias=True), *_OUT, *_GELU_BLOCK)),
    "codeshell": _Spec(kv=(*_ln(), *_rope()), tensors=(*_emb(out_norm_bias=True), *_GELU_BLOCK)),
}


# Qwen3.5 (dense and MoE): keys and the attention / gated delta-net mixers of its layers
_QWEN35_KV = (("attention.layer_norm_rms_epsilon", "f32", "1e-6"), ("rope.dimension_count", "u32", "D"),
              ("rope.freq_base", "f32", "10000000.0"), ("attention.key_length", "u32", "D"),
              ("attention.value_length", "u32", "D"), ("full_attention_interval", "u32", "4"),
              ("ssm.conv_kernel", "u32", "4"), ("ssm.inner_size", "u32", "VD"), ("ssm.state_size", "u32", "DS"),
              ("ssm.time_step_rank", "u32", "NV"), ("ssm.group_count", "u32", "NG"),
              ("rope.dimension_sections", "i32*", "[D // 8, D // 8 + D // 16, D // 16, 0]"))
_QWEN35_ATTN = (("blk.attn_q.weight", "E, 2*H*D"), ("blk.attn_k.weight", "E, K*D"), ("blk.attn_v.weight", "E, K*D"),
                ("blk.attn_output.weight", "H*D, E"), ("blk.attn_q_norm.weight", "D", "norm"),
                ("blk.attn_k_norm.weight", "D", "norm"))
_QWEN35_MIXERS = (
    ("blk.attn_norm.weight", "E", "norm"), ("blk.post_attention_norm.weight", "E", "norm"),
    *_when("(i + 1) % 4 == 0", _QWEN35_ATTN),
    *_when("(i + 1) % 4 != 0", (("blk.attn_qkv.weight", "E, 2*KD + VD"), ("blk.attn_gate.weight", "E, VD"),
                                ("blk.ssm_conv1d.weight", "4, 2*KD + VD", "f32w0.3"),
                                ("blk.ssm_dt.bias", "NV", "dt_bias"), ("blk.ssm_a", "NV", "ssm_a"),
                                ("blk.ssm_beta.weight", "E, NV"), ("blk.ssm_alpha.weight", "E, NV"),
                                ("blk.ssm_norm.weight", "DS", "norm"), ("blk.ssm_out.weight", "VD, E"))))

_SPECS: Dict[str, _Spec] = {
    **_BASE_SPECS,
    # dots.llm1: q/k norms, dense leading block then sigmoid-gated experts (with a correction bias) + a shared one
    "dots1": _Spec(
        moe=(4, 2),
        kv=(*_rms("1e-6"), *_rope(), *_MOE_KV, ("leading_dense_block_count", "u32", "LEAD"),
            ("expert_feed_forward_length", "u32", "FX"), ("expert_shared_count", "u32", "1"),
            ("expert_weights_scale", "f32", "2.5"), ("expert_weights_norm", "bool", "True"),
            ("expert_gating_func", "u32", "2")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.ffn_norm"),
                 *_when("i < LEAD", _glu()),
                 *_when("i >= LEAD", _moe() + (("blk.exp_probs_b.bias", "X", "bias"),) + _shexp_rows()))),
    # Ling (bailingmoe): experts + a shared expert in every layer
    "bailingmoe": _Spec(
        moe=(4, 2),
        kv=(*_rms("1e-6"), *_rope(), *_MOE_KV, ("expert_feed_forward_length", "u32", "FX"),
            ("expert_shared_count", "u32", "1"), ("expert_weights_scale", "f32", "1.0"),
            ("expert_weights_norm", "bool", "False")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"), *_moe(), *_shexp_rows())),
    # PhiMoE: LayerNorms with biases, biased attention output and LM head, experts in every layer
    "phimoe": _Spec(
        moe=(4, 2), kv=(*_rms(), *_rope(), *_MOE_KV),
        tensors=(*_emb(out_norm_bias=True), ("output.bias", "V", "bias"), *_n("blk.attn_norm", bias=True),
                 *_attn_rows(bias_o=True), *_n("blk.ffn_norm", bias=True), *_moe("F"))),
    # DBRX: LayerNorm without bias, fused QKV clamped, a norm after attention, experts in every layer
    "dbrx": _Spec(
        moe=(4, 2), kv=(*_ln(), *_rope(), *_MOE_KV, ("attention.clamp_kqv", "f32", "8.0")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_QKV, ("blk.attn_output.weight", "E, E"),
                 *_n("blk.attn_output_norm"), *_moe("F"))),
    # Snowflake Arctic: a dense MLP (n_embd wide) beside normed experts in every layer
    "arctic": _Spec(
        moe=(4, 2), kv=(*_rms(), *_rope(), *_MOE_KV),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"), *_glu("E"),
                 ("blk.ffn_gate_inp.weight", "E, X", "f32w"), *_n("blk.ffn_norm_exps"),
                 ("blk.ffn_gate_exps.weight", "E, F, X"), ("blk.ffn_down_exps.weight", "F, E, X"),
                 ("blk.ffn_up_exps.weight", "E, F, X"))),
    # JAIS: ALiBi, LayerNorms with biases, fused biased QKV, a biased gated MLP
    "jais": _Spec(
        kv=(*_ln(), ("attention.max_alibi_bias", "f32", "8.0")),
        tensors=(*_emb(out_norm_bias=True), *_n("blk.attn_norm", bias=True), *_QKV_B, ("blk.attn_output.weight", "E, E"),
                 ("blk.attn_output.bias", "E", "bias"), *_n("blk.ffn_norm", bias=True),
                 ("blk.ffn_down.weight", "F, E"), ("blk.ffn_down.bias", "E", "bias"), ("blk.ffn_gate.weight", "E, F"),
                 ("blk.ffn_gate.bias", "F", "bias"), ("blk.ffn_up.weight", "E, F"), ("blk.ffn_up.bias", "F", "bias"))),
    # openPangu-Embedded: q/k/v and output biases
    "pangu-embedded": _Spec(kv=(*_rms(), *_rope()),
                            tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(bias_qkv=True, bias_o=True),
                                     *_n("blk.ffn_norm"), *_glu())),
    # OpenELM: head counts and MLP widths per layer (arrays the splitter slices), fused QKV, q/k norms, LM head
    # tied to the embeddings
    "openelm": _Spec(kv=(*_rms("1e-6"), *_rope(), *_KVLEN, ("attention.head_count", "u32[]", "H - i % 2"),
                         ("attention.head_count_kv", "u32[]", "K // 2 - i % 2"),
                         ("feed_forward_length", "u32[]", "F - 32 * (i % 3)")),
                     tensors=(("token_embd.weight", "E, V"), *_n("output_norm"), *_n("blk.attn_norm"),
                              ("blk.attn_qkv.weight", "E, (H - i % 2 + 2 * (K // 2 - i % 2))*D"),
                              ("blk.attn_q_norm.weight", "D", "norm"), ("blk.attn_k_norm.weight", "D", "norm"),
                              ("blk.attn_output.weight", "(H - i % 2)*D, E"), *_n("blk.ffn_norm"),
                              *_glu("F - 32 * (i % 3)"))),
    # PLaMo: one norm per layer (attention and MLP in parallel)
    "plamo": _Spec(kv=(*_rms(), *_rope()),
                   tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(), *_glu())),
    # Qwen2-VL's language model: qwen2 with M-RoPE (sections; text: every section at the token position)
    "qwen2vl": _Spec(kv=(*_rms("1e-6"), *_rope("D", "1000000.0"),
                         ("rope.dimension_sections", "i32*", "[D // 8, 3 * D // 16, 3 * D // 16, 0]")),
                     tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(bias_qkv=True), *_n("blk.ffn_norm"),
                              *_glu())),
    # Maincoder: llama with q/k norms
    "maincoder": _Spec(kv=(*_rms(), *_rope()),
                       tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.ffn_norm"),
                                *_glu())),
    # Mellum: q/k norms, experts in every layer
    "mellum": _Spec(
        moe=(4, 2), kv=(*_rms(), *_rope(), *_MOE_KV, ("expert_feed_forward_length", "u32", "FX")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.ffn_norm"), *_moe())),
    # Hunyuan-A13B: q/k norms, experts (n_ff wide) and a shared expert in every layer
    "hunyuan-moe": _Spec(
        moe=(4, 2), kv=(*_rms(), *_rope(), *_MOE_KV, ("expert_feed_forward_length", "u32", "F"),
                        ("expert_shared_feed_forward_length", "u32", "F")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.ffn_norm"), *_moe("F"),
                 *_shexp_rows("F"))),
    # BitNet b1.58: sub-norms inside attention and MLP, LM head tied to the embeddings
    "bitnet": _Spec(kv=(*_rms(), *_rope()),
                    tensors=(("token_embd.weight", "E, V"), *_n("output_norm"), *_n("blk.attn_norm"),
                             *_n("blk.attn_sub_norm"), *_attn_rows(), *_n("blk.ffn_norm"), *_n("blk.ffn_sub_norm", "F"),
                             *_glu())),
    # Mamba-2: multi-head selective state space layers with groups and a gated norm
    "mamba2": _Spec(
        base_kv=False,
        dims=(("DI", "2*E"), ("DS", "16"), ("NG", "1"), ("NH", "DI // 16")),
        kv=(("context_length", "u32", "C"), ("embedding_length", "u32", "E"), ("block_count", "u32", "L"),
            ("feed_forward_length", "u32", "0"), ("attention.head_count", "u32", "0"), *_rms(),
            ("ssm.conv_kernel", "u32", "4"), ("ssm.inner_size", "u32", "DI"), ("ssm.state_size", "u32", "DS"),
            ("ssm.time_step_rank", "u32", "NH"), ("ssm.group_count", "u32", "NG")),
        tensors=(*_emb(), *_n("blk.attn_norm"), ("blk.ssm_in.weight", "E, 2*DI + 2*NG*DS + NH"),
                 ("blk.ssm_conv1d.weight", "4, DI + 2*NG*DS", "f32w0.3"), ("blk.ssm_conv1d.bias", "DI + 2*NG*DS", "bias"),
                 ("blk.ssm_dt.bias", "NH", "dt_bias"), ("blk.ssm_a", "1, NH", "ssm_a"), ("blk.ssm_d", "1, NH", "ones"),
                 ("blk.ssm_norm.weight", "DI // NG, NG", "norm"), ("blk.ssm_out.weight", "DI, E"))),
    # MiniMax-M2: q/k norms over all heads at once, sigmoid-gated experts with a correction bias
    "minimax-m2": _Spec(
        moe=(4, 2), kv=(*_rms(), *_rope(), *_MOE_KV, ("expert_feed_forward_length", "u32", "F"),
                        ("expert_gating_func", "u32", "2")),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(), ("blk.attn_q_norm.weight", "H*D", "norm"),
                 ("blk.attn_k_norm.weight", "K*D", "norm"), *_n("blk.ffn_norm"), *_moe("F"),
                 ("blk.exp_probs_b.bias", "X", "bias"))),
    # EXAONE 4: no pre-norms, post-attention and post-FFN norms, q/k norms (the 1.2B shape: no sliding window)
    "exaone4": _Spec(kv=(*_rms(), *_rope("D", "1000000.0")),
                     tensors=(*_emb(), *_attn_rows(qk_norm=True), *_n("blk.post_attention_norm"), *_glu(),
                              *_n("blk.post_ffw_norm"))),
    # Nemotron: LayerNorm with bias, partial rotary, squared-ReLU MLP (up/down) without biases
    "nemotron": _Spec(kv=(*_ln(), *_rope("D // 2")),
                      tensors=(*_emb(out_norm_bias=True), *_n("blk.attn_norm", bias=True), *_attn_rows(),
                               *_n("blk.ffn_norm", bias=True), *_UP_DOWN)),
    # Phi-4-mini (phi3 arch): GQA through the fused QKV, partial rotary (3/4 of the head), LongRoPE factors
    # (global rope_factors_long/short; long ones used since tests run past the 128-token original context)
    "phi3:phi4-mini": _Spec(
        dims=(("R", "3 * D // 4"),),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "R"),
            ("rope.freq_base", "f32", "10000.0"), ("rope.scaling.original_context_length", "u32", "128"),
            ("rope.scaling.attn_factor", "f32", "1.19")),
        tensors=_EMB + (
            ("rope_factors_long.weight", "R // 2", "rope_freqs"), ("rope_factors_short.weight", "R // 2", "norm"),
            ("blk.attn_norm.weight", "E", "norm"), ("blk.attn_qkv.weight", "E, E + 2*K*D"),
            ("blk.attn_output.weight", "E, E"), ("blk.ffn_norm.weight", "E", "norm"),
            ("blk.ffn_up.weight", "E, 2*F"), ("blk.ffn_down.weight", "F, E"))),
    # Qwen3.5: gated delta-net (linear attention) layers and gated full-attention layers (every 4th,
    # full_attention_interval, counted by llama.cpp from the layer index), M-RoPE (text: sections at one position)
    "qwen35": _Spec(
        dims=(("DS", "16"), ("NG", "2"), ("NV", "4"), ("KD", "DS*NG"), ("VD", "DS*NV")),
        kv=_QWEN35_KV,
        tensors=_EMB + _OUT + _QWEN35_MIXERS + _GLU),
    # Qwen3.5 MoE: Qwen3.5's layers with a MoE FFN (experts + gated shared expert) everywhere
    "qwen35moe": _Spec(
        moe=(4, 2),
        dims=(("DS", "16"), ("NG", "2"), ("NV", "4"), ("KD", "DS*NG"), ("VD", "DS*NV")),
        kv=(*_QWEN35_KV, ("expert_count", "u32", "X"), ("expert_used_count", "u32", "XU"),
            ("expert_feed_forward_length", "u32", "FX"), ("expert_shared_feed_forward_length", "u32", "FX")),
        tensors=_EMB + _OUT + _QWEN35_MIXERS + _MOE + _SHEXP + (("blk.ffn_gate_inp_shexp.weight", "E", "bias"),)),
    # Qwen3-Next: gated delta-net layers with fused qkvz/ba projections, gated attention every 4th layer
    # (partial rotary, plain NEOX RoPE), MoE with a gated shared expert
    "qwen3next": _Spec(
        moe=(4, 2),
        dims=(("DS", "16"), ("NG", "2"), ("NV", "4"), ("KD", "DS*NG"), ("VD", "DS*NV")),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-6"), ("rope.dimension_count", "u32", "D // 4"),
            ("rope.freq_base", "f32", "10000000.0"), ("attention.key_length", "u32", "D"),
            ("attention.value_length", "u32", "D"), ("full_attention_interval", "u32", "4"),
            ("ssm.conv_kernel", "u32", "4"), ("ssm.inner_size", "u32", "VD"), ("ssm.state_size", "u32", "DS"),
            ("ssm.time_step_rank", "u32", "NV"), ("ssm.group_count", "u32", "NG"),
            ("expert_count", "u32", "X"), ("expert_used_count", "u32", "XU"),
            ("expert_feed_forward_length", "u32", "FX"), ("expert_shared_feed_forward_length", "u32", "FX")),
        tensors=_EMB + _OUT + (
            ("blk.attn_norm.weight", "E", "norm"), ("blk.post_attention_norm.weight", "E", "norm"),
            *_when("(i + 1) % 4 == 0", _QWEN35_ATTN),
            *_when("(i + 1) % 4 != 0", (("blk.ssm_in.weight", "E, 2*KD + 2*VD"),
                                        ("blk.ssm_conv1d.weight", "4, 2*KD + VD", "f32w0.3"),
                                        ("blk.ssm_dt.bias", "NV", "dt_bias"), ("blk.ssm_a", "NV", "ssm_a"),
                                        ("blk.ssm_ba.weight", "E, 2*NV"),
                                        ("blk.ssm_norm.weight", "DS", "norm"), ("blk.ssm_out.weight", "VD, E"))),
            *_MOE, *_SHEXP, ("blk.ffn_gate_inp_shexp.weight", "E", "bias"))),
    # Falcon-H1: every layer runs a Mamba-2 mixer and attention in parallel (hybrid memory), then a SwiGLU FFN
    # (its norm is stored without the ".weight" suffix)
    "falcon-h1": _Spec(
        dims=(("DI", "E"), ("DS", "16"), ("NG", "1"), ("NH", "DI // 16"), ("CD", "DI + 2*NG*DS")),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "D"),
            ("rope.freq_base", "f32", "100000.0"), ("attention.key_length", "u32", "D"),
            ("attention.value_length", "u32", "D"), ("ssm.conv_kernel", "u32", "4"),
            ("ssm.inner_size", "u32", "DI"), ("ssm.state_size", "u32", "DS"),
            ("ssm.time_step_rank", "u32", "NH"), ("ssm.group_count", "u32", "NG")),
        tensors=_EMB + _OUT + (
            ("blk.attn_norm.weight", "E", "norm"), *_ATTN, ("blk.ffn_norm", "E", "norm"), *_GLU,
            ("blk.ssm_in.weight", "E, DI + CD + NH"), ("blk.ssm_conv1d.weight", "4, CD", "f32w0.3"),
            ("blk.ssm_conv1d.bias", "CD", "bias"), ("blk.ssm_dt.bias", "NH", "dt_bias"),
            ("blk.ssm_a", "1, NH", "ssm_a"), ("blk.ssm_d", "1, NH", "ones"),
            ("blk.ssm_norm.weight", "DI // NG, NG", "norm"), ("blk.ssm_out.weight", "DI, E"))),
    # OLMoE: every layer MoE (no expert FFN size key: n_ff), q/k norms over the whole projection
    "olmoe": _Spec(
        moe=(4, 2),
        kv=(*_rms(), *_rope(), *_MOE_KV),
        tensors=(*_emb(), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.attn_q_norm"), *_n("blk.attn_k_norm"),
                 *_n("blk.ffn_norm"), *_moe("F"))),
    # Seed-OSS: q/k/v biases, post-attention norm before the FFN
    "seed_oss": _Spec(
        kv=(*_rms("1e-6"), *_rope("D", "10000000.0"), *_KVLEN),
        tensors=(*_emb(), *_attn_rows(bias_qkv=True), *_n("blk.attn_norm"), *_n("blk.post_attention_norm"),
                 *_glu())),
    # Granite MoE (3.x MoE, 4.0 shared-expert MoE): Granite's scales, experts with a shared expert
    "granitemoe": _Spec(
        moe=(4, 2),
        kv=(*_rms(), *_rope(), ("logit_scale", "f32", "8.0"), ("residual_scale", "f32", "0.22"),
            ("embedding_scale", "f32", "12.0"), ("attention.scale", "f32", "1.0 / D"), *_MOE_KV,
            ("expert_shared_feed_forward_length", "u32", "FX")),
        tensors=(*_emb(tied=True), *_n("blk.attn_norm"), *_attn_rows(), *_n("blk.ffn_norm"), *_moe("F"),
                 ("blk.ffn_gate_shexp.weight", "E, FX"), ("blk.ffn_up_shexp.weight", "E, FX"),
                 ("blk.ffn_down_shexp.weight", "FX, E"))),
    # LFM2 MoE: LFM2's layers, dense first layer then sigmoid-gated experts
    "lfm2moe": _Spec(
        moe=(4, 2),
        kv=(*_rms(), *_rope("D", "1000000.0"), ("shortconv.l_cache", "u32", "3"),
            ("attention.head_count_kv", "u32[]", "K if i % 3 == 2 or i == L - 1 else 0"),
            ("leading_dense_block_count", "u32", "1"), *_MOE_KV, ("expert_feed_forward_length", "u32", "FX"),
            ("expert_gating_func", "u32", "2")),
        tensors=(("token_embd.weight", "E, V"), ("token_embd_norm.weight", "E", "norm"),
                 ("blk.ffn_norm.weight", "E", "norm"), *_when("i < 1", _glu()),
                 *_when("i >= 1", _moe() + (("blk.exp_probs_b.bias", "X", "bias"),)),
                 ("blk.attn_norm.weight", "E", "norm"),
                 *_when("i % 3 == 2 or i == L - 1", _attn_rows() + (("blk.attn_q_norm.weight", "D", "norm"),
                                                                     ("blk.attn_k_norm.weight", "D", "norm"))),
                 *_when("not (i % 3 == 2 or i == L - 1)", (("blk.shortconv.conv.weight", "3, E", "f32w0.3"),
                                                           ("blk.shortconv.in_proj.weight", "E, 3*E"),
                                                           ("blk.shortconv.out_proj.weight", "E, E"))))),
    # gpt-oss: attention sinks, biased o-proj and experts, sliding window on even layers (period 2)
    "gpt-oss": _Spec(
        moe=(4, 2),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "D"),
            ("rope.freq_base", "f32", "150000.0"), ("attention.key_length", "u32", "D"),
            ("attention.value_length", "u32", "D"), ("attention.sliding_window", "u32", "SW"),
            ("expert_count", "u32", "X"), ("expert_used_count", "u32", "XU"),
            ("expert_feed_forward_length", "u32", "FX")),
        tensors=_EMB + _OUT + (
            ("blk.attn_norm.weight", "E", "norm"), ("blk.post_attention_norm.weight", "E", "norm"),
            *_ATTN, ("blk.attn_q.bias", "H*D", "bias"), ("blk.attn_k.bias", "K*D", "bias"),
            ("blk.attn_v.bias", "K*D", "bias"), ("blk.attn_output.bias", "E", "bias"),
            ("blk.attn_sinks.weight", "H", "bias"),
            *_MOE, ("blk.ffn_gate_inp.bias", "X", "bias"), ("blk.ffn_gate_exps.bias", "FX, X", "bias"),
            ("blk.ffn_up_exps.bias", "FX, X", "bias"), ("blk.ffn_down_exps.bias", "E, X", "bias"))),
    # Llama 4: MoE every 2nd layer (interleave step 2) with a shared expert, chunked attention on 3 of
    # every 4 layers, no RoPE (and no q/k norm) on every 4th layer; llama.cpp needs >= 4 layers (a
    # no-RoPE layer uses its temperature-tuning input, which is otherwise left unallocated)
    "llama4": _Spec(
        moe=(4, 1),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "D"),
            ("rope.freq_base", "f32", "500000.0"), ("expert_count", "u32", "X"), ("expert_used_count", "u32", "XU"),
            ("expert_feed_forward_length", "u32", "FX"), ("interleave_moe_layer_step", "u32", "2")),
        tensors=_EMB + _OUT + (
            ("rope_freqs.weight", "D//2", "rope_freqs"),
            ("blk.attn_norm.weight", "E", "norm"), *_ATTN, ("blk.ffn_norm.weight", "E", "norm"),
            *_when("(i + 1) % 2 != 0", _GLU), *_when("(i + 1) % 2 == 0", _MOE + _SHEXP))),
    # GLM-4.5: dense first layer, then sigmoid-gated MoE with a shared expert; q/k/v biases, q/k norms;
    # one NextN (multi-token prediction) block counted in block_count, as in the released GGUFs
    "glm4moe": _Spec(
        moe=(4, 2),
        dims=(("N", "1"), ("T", "L - N")),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "D//2"),
            ("rope.freq_base", "f32", "1000000.0"), ("attention.key_length", "u32", "D"),
            ("attention.value_length", "u32", "D"), ("expert_count", "u32", "X"),
            ("expert_used_count", "u32", "XU"), ("expert_feed_forward_length", "u32", "FX"),
            ("expert_shared_count", "u32", "1"), ("leading_dense_block_count", "u32", "1"),
            ("expert_weights_scale", "f32", "2.5"), ("expert_weights_norm", "bool", "True"),
            ("expert_gating_func", "u32", "2"), ("nextn_predict_layers", "u32", "N")),
        tensors=_EMB + _OUT + (
            ("blk.attn_norm.weight", "E", "norm"), *_ATTN, ("blk.attn_q.bias", "H*D", "bias"),
            ("blk.attn_k.bias", "K*D", "bias"), ("blk.attn_v.bias", "K*D", "bias"),
            ("blk.attn_q_norm.weight", "D", "norm"), ("blk.attn_k_norm.weight", "D", "norm"),
            ("blk.post_attention_norm.weight", "E", "norm"),
            *_when("i < 1", _GLU),
            *_when("i >= 1", _MOE + _SHEXP + (("blk.exp_probs_b.bias", "X", "bias"),)),
            *_when("i >= T", (("blk.nextn.eh_proj.weight", "2*E, E"), ("blk.nextn.enorm.weight", "E", "norm"),
                              ("blk.nextn.hnorm.weight", "E", "norm"),
                              ("blk.nextn.shared_head_norm.weight", "E", "norm"))))),
    # LFM2: short-convolution layers (head_count_kv 0) and attention layers (q/k norms); the final
    # norm is stored as token_embd_norm
    "lfm2": _Spec(
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "D"),
            ("rope.freq_base", "f32", "1000000.0"), ("shortconv.l_cache", "u32", "3"),
            ("attention.head_count_kv", "u32[]", "K if i % 3 == 2 or i == L - 1 else 0")),
        tensors=(("token_embd.weight", "E, V"), ("token_embd_norm.weight", "E", "norm"),
                 ("blk.attn_norm.weight", "E", "norm"), ("blk.ffn_norm.weight", "E", "norm"), *_GLU,
                 *_when("i % 3 == 2 or i == L - 1", _ATTN + (("blk.attn_q_norm.weight", "D", "norm"),
                                               ("blk.attn_k_norm.weight", "D", "norm"))),
                 *_when("not (i % 3 == 2 or i == L - 1)", (("blk.shortconv.conv.weight", "3, E", "f32w0.3"),
                                       ("blk.shortconv.in_proj.weight", "E, 3*E"),
                                       ("blk.shortconv.out_proj.weight", "E, E"))))),
    # Granite 4 hybrid: Mamba-2 layers (head_count_kv 0) and attention layers, Granite's scales
    "granitehybrid": _Spec(
        dims=(("DI", "2*E"), ("DS", "16"), ("NG", "1"), ("NH", "DI // 16")),
        kv=(("attention.layer_norm_rms_epsilon", "f32", "1e-5"), ("rope.dimension_count", "u32", "D"),
            ("rope.freq_base", "f32", "10000.0"), ("logit_scale", "f32", "8.0"),
            ("residual_scale", "f32", "0.22"), ("embedding_scale", "f32", "12.0"),
            ("attention.scale", "f32", "1.0 / D"), ("ssm.conv_kernel", "u32", "4"),
            ("ssm.inner_size", "u32", "DI"), ("ssm.state_size", "u32", "DS"),
            ("ssm.time_step_rank", "u32", "NH"), ("ssm.group_count", "u32", "NG"),
            ("attention.head_count_kv", "u32[]", "K if i % 3 == 2 or i == L - 1 else 0")),
        tensors=_EMB + (
            ("blk.attn_norm.weight", "E", "norm"), ("blk.ffn_norm.weight", "E", "norm"), *_GLU,
            *_when("i % 3 == 2 or i == L - 1", _ATTN),
            *_when("not (i % 3 == 2 or i == L - 1)", (("blk.ssm_in.weight", "E, 2*DI + 2*NG*DS + NH"),
                                  ("blk.ssm_conv1d.weight", "4, DI + 2*NG*DS", "f32w0.3"),
                                  ("blk.ssm_conv1d.bias", "DI + 2*NG*DS", "bias"),
                                  ("blk.ssm_dt.bias", "NH", "dt_bias"), ("blk.ssm_a", "1, NH", "ssm_a"),
                                  ("blk.ssm_d", "1, NH", "ones"), ("blk.ssm_norm.weight", "DI // NG, NG", "norm"),
                                  ("blk.ssm_out.weight", "DI, E"))))),
    # Gemma 3n (text part): 4 AltUp streams (altup_proj / altup_unembd_proj make and merge streams 1-3), a
    # LAuReL low-rank branch, per-layer inputs (per_layer_token_embd / per_layer_model_proj, 256 wide per layer),
    # sliding window on 4 of every 5 layers. llama.cpp hard-codes n_altup 4, laurel_rank 64, n_embd_altup 256
    # (no GGUF key read: the informational keys below are what convert_hf_to_gguf writes), activation sparsity on
    # layers 0-9 and KV reuse from layer 20 on (layers 20+ read layer 18's SWA / 19's full cache; their
    # attn_k/attn_v are loaded but unused), so a model needs >= 21 layers to exercise the latter
    "gemma3n": _Spec(
        dims=(("A", "256"), ("NA", "4"), ("LR", "64")),
        kv=(*_KVLEN, *_rms("1e-6"), ("attention.sliding_window", "u32", "8"), ("rope.freq_base", "f32", "1000000.0"),
            ("rope.freq_base_swa", "f32", "10000.0"), ("final_logit_softcapping", "f32", "30.0"),
            ("embedding_length_per_layer_input", "u32", "A"), ("altup.active_idx", "u32", "0"),
            ("altup.num_inputs", "u32", "NA"), ("attention.shared_kv_layers", "u32", "max(0, L - 20)")),
        tensors=(*_emb(tied=True), ("altup_proj.weight", "E, E, NA - 1"), ("altup_unembd_proj.weight", "E, E, NA - 1"),
                 ("per_layer_token_embd.weight", "A * L, V"), ("per_layer_model_proj.weight", "E, A * L"),
                 *_n("per_layer_proj_norm", "A"),
                 *_n("blk.attn_norm"), *_attn_rows(qk_norm=True), *_n("blk.post_attention_norm"),
                 *_n("blk.ffn_norm"), *_glu(), *_n("blk.post_ffw_norm"),
                 ("blk.inp_gate.weight", "E, A"), ("blk.proj.weight", "A, E"), *_n("blk.post_norm"),
                 ("blk.altup_correct_coef.weight", "NA, NA", "f32w"), *_n("blk.altup_correct_scale"),
                 ("blk.altup_predict_coef.weight", "NA, NA * NA", "f32w"), ("blk.altup_router.weight", "E, NA", "f32w"),
                 *_n("blk.altup_router_norm"), ("blk.laurel_l.weight", "E, LR"), ("blk.laurel_r.weight", "LR, E"),
                 *_n("blk.laurel_post_norm"))),
}



_VARIANTS: Dict[str, Tuple[Optional[str], ...]] = {
    "llama": (None, "llama3", "mistral", "mixtral"),
    "phi3": (None, "phi4-mini"),
    "mistral3": (None, "ministral3"),
}

# MoE-only archs: default (n_expert, n_expert_used) when n_expert == 0
_MOE_ARCHS: Dict[str, Tuple[int, int]] = {a: spec.moe for a, spec in _SPECS.items() if spec.moe[0] and ":" not in a}

# default n_head_kv (by variant or arch) when not given
_DEFAULT_N_HEAD_KV: Dict[str, Callable[[int], int]] = {
    "mistral": lambda h: max(1, h // 4),
    "falcon": lambda h: 1,
}

# archs without GQA in llama.cpp's tensor shapes (qwen: fused qkv of 3*n_embd): n_head_kv is n_head
_NO_GQA = {"qwen"}

# archs whose sliding window is optional (write_random_gguf's sliding_window)
_OPTIONAL_SWA = {"olmo2"}

# archs whose head size may differ from n_embd // n_head (write_random_gguf's head_dim)
_FREE_HEAD_DIM = {"gemma2"}

# archs that can take experts
_MOE_CAPABLE = {"llama", "granite"} | set(_MOE_ARCHS)

#: llama.cpp architecture names verified to load and produce finite logits in llama_cpp 0.3.36
SUPPORTED_TEST_ARCHS: Tuple[str, ...] = (
    "llama", "gemma3", "qwen2", "gemma2", "gemma", "phi3", "qwen3",
    "baichuan", "bloom", "chatglm", "glm4", "command-r", "cohere2", "deepseek", "deepseek2",
    "falcon", "gpt2", "mamba", "phi2", "qwen", "qwen2moe", "qwen3moe", "starcoder2", "olmo2", "granite",
    "internlm2", "xverse", "orion", "stablelm", "olmo", "exaone", "arcee", "smollm3", "mistral3", "ernie4_5",
    "minicpm", "refact", "mpt", "gptneox", "starcoder", "codeshell",
    *(a for a in _SPECS if ":" not in a),
)
assert set(SUPPORTED_TEST_ARCHS) <= set(_SPECS)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #

def write_random_gguf(path: str | os.PathLike, arch: str = "llama", *, n_layer: int = 4, n_embd: int = 64,
                      n_head: int = 4, n_head_kv: int | None = None, n_ff: int | None = None,
                      n_vocab: int = 256, n_ctx_train: int = 2048, n_expert: int = 0, n_expert_used: int = 0,
                      qtype: str = "f32", seed: int = 0, variant: str | None = None,
                      sliding_window: int = 0, head_dim: int = 0) -> pathlib.Path:
    """Write a random-weight GGUF model of llama.cpp architecture ``arch`` to ``path``.

    Same arguments and seed give a byte-identical file. Head size is ``n_embd // n_head``;
    ``n_head_kv`` defaults to ``n_head`` (1 for falcon; deepseek2 is always MLA with one
    KV head; qwen has no GQA); ``n_ff`` defaults to ``4 * n_embd`` (MoE archs use
    ``n_ff // 2`` rounded to 32 per expert). ``n_vocab`` must be >= 102.

    ``variant`` (llama only): ``"llama3"`` adds ``rope_freqs.weight`` (llama3-style
    rope factors, rope base 5e5); ``"mistral"`` uses GQA (n_head_kv = n_head/4 unless
    given) and rope base 1e6; ``"mixtral"`` is a mixture of experts (8 experts, 2 used
    unless given). Experts can also be asked for directly with ``n_expert`` (llama,
    granite); MoE-only archs (deepseek, deepseek2, qwen2moe, qwen3moe) default to 4
    experts, 2 used.

    Embeddings are tied (no ``output.weight``) for gemma, gemma2, gemma3, bloom,
    command-r, cohere2 and granite, as in the real models; gemma2/gemma3/cohere2 get a
    sliding window of 8 tokens with llama.cpp's default layer pattern.

    ``sliding_window`` (olmo2 only, as in OLMo 3): a window of that many tokens on 3 of
    every 4 layers.

    ``head_dim`` (gemma2 only, as in Gemma 2 27B): a head size other than ``n_embd // n_head``.

    ``qtype``: ``f32`` | ``f16`` | ``q8_0`` | ``q4_0`` | ``q4_k`` for the weight matrices (norms,
    biases and other 1-D tensors stay f32; matrices whose rows are not a multiple of
    32 fall back to f16 for q8_0/q4_0). Returns the path written.
    """
    if n_layer < MIN_LAYERS.get(arch, 1):
        raise ValueError(f"{arch} needs n_layer >= {MIN_LAYERS[arch]} in llama.cpp")
    if arch not in _SPECS:
        raise ValueError(f"unsupported test arch {arch!r}; supported: {', '.join(sorted(a for a in _SPECS if ':' not in a))}")
    if qtype not in _QTYPES:
        raise ValueError(f"unsupported qtype {qtype!r}; use one of {', '.join(_QTYPES)}")
    allowed = _VARIANTS.get(arch, (None,))
    if variant not in allowed:
        raise ValueError(f"unsupported variant {variant!r} for {arch}; allowed: {allowed}")
    if n_vocab < _MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {_MIN_VOCAB}, got {n_vocab}")
    if n_layer < 1 or n_head < 1:
        raise ValueError("n_layer and n_head must be >= 1")
    if n_embd % n_head != 0:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head_kv is None:
        n_head_kv = _DEFAULT_N_HEAD_KV.get(variant or arch, lambda h: h)(n_head)
    if arch in _NO_GQA:
        n_head_kv = n_head
    if n_head % n_head_kv != 0:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if n_ff is None:
        n_ff = 4 * n_embd
    if variant == "mixtral" and n_expert == 0:
        n_expert = 8
    if arch in _MOE_ARCHS and n_expert == 0:
        n_expert = _MOE_ARCHS[arch][0]
    if n_expert > 0 and n_expert_used == 0:
        n_expert_used = min(2, n_expert) if arch not in _MOE_ARCHS else min(_MOE_ARCHS[arch][1], n_expert)
    if n_expert_used > n_expert:
        raise ValueError("n_expert_used must be <= n_expert")
    if n_expert > 0 and arch not in _MOE_CAPABLE:
        raise ValueError(f"arch {arch!r} has no mixture-of-experts form here (use one of {sorted(_MOE_CAPABLE)})")

    if sliding_window and arch not in _OPTIONAL_SWA:
        raise ValueError(f"sliding_window is only an option for {sorted(_OPTIONAL_SWA)}")
    if head_dim and arch not in _FREE_HEAD_DIM:
        raise ValueError(f"head_dim is only an option for {sorted(_FREE_HEAD_DIM)}")
    p = _Params(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                n_vocab=n_vocab, n_ctx_train=n_ctx_train, n_expert=n_expert, n_expert_used=n_expert_used,
                variant=variant, sliding_window=int(sliding_window), head_dim_=int(head_dim))
    m = _Model(arch)
    spec_key = f"{arch}:{variant}" if f"{arch}:{variant}" in _SPECS else arch
    _from_spec(m, p, _SPECS[spec_key])

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    w = GGUFWriter(path, arch)
    try:
        # general.name must not contain the arch: llama.cpp special-cases some model names
        # (e.g. "phi3" needs <unk>/<|endoftext|> tokens in the vocab)
        w.add_name("molink random-weight test model")
        w.add_description(f"random weights, arch={arch}, variant={variant}, qtype={qtype}, seed={seed}")
        w.add_file_type(_FILE_TYPES[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, val, vt, sub in m.kv:
            w.add_key_value(key, val, vt, sub_type=sub)
        _add_tokenizer(w, n_vocab)

        storage = []
        for t in m.tensors:
            st = _storage(t, qtype)
            shape, dtype, nbytes = _tensor_nbytes(t, st)
            w.add_tensor_info(t.name, shape, dtype, nbytes,
                              raw_dtype=st if st not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None)
            storage.append(st)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, st in zip(m.tensors, storage):
            w.write_tensor_data(_tensor_payload(rng, t, st))
    finally:
        w.close()
    return path


def _round_up(x: int, k: int) -> int:
    return (x + k - 1) // k * k
