"""Binary frame codec for the arrays pipeline stages exchange over WebSockets.

Frame layout (all integers little-endian)::

    b"MLK1" | uint32 header length | orjson header | payload

The header is a JSON object ``{"meta": {...}, "arrays": [...]}``: ``meta`` is
the caller's JSON-able metadata and ``arrays`` describes the payload segments,
in payload order, one entry per array::

    {"name": str, "dtype": "i32"|"i64"|"u8"|"i8"|"f32"|"f16",
     "shape": [int, ...], "codec": None|"f32"|"f16"|"f16-clamp"|"int8",
     "nbytes": int}                    # + "scaled": bool when codec == "f16"

The payload is the segments concatenated, nothing else.  The header is padded
with trailing spaces so that the payload starts at a multiple of 8 bytes.

Integer arrays (int32, int64, uint8, int8; bool goes as uint8) travel raw
(``codec`` is ``None``).  Floating arrays (float16/32/64) are encoded with a
codec and always decode to C-contiguous float32.  Codecs work per *row*: a row
is the last axis (a 1-D or 0-D array is a single row), so for a hidden state of
shape ``[n_tokens, n_embd]`` each token has its own scale.

* ``f32`` -- raw float32, bit-exact round trip (float64 input is first cast to
  float32; values beyond the float32 range become +-inf).
* ``f16`` -- float16 that never overflows: a row whose largest finite
  magnitude exceeds 65504 is divided by the smallest power of two that makes it
  fit, and its scale is sent as float32.  Power-of-two scaling is exact, so a
  scaled row keeps float16's ~2**-11 relative precision.  When some row is
  scaled the segment is ``rows * float32 scales`` followed by the float16
  values and the entry has ``"scaled": true``; otherwise it is just the float16
  values (``"scaled": false``).  NaN and +-inf inputs pass through unchanged.
  float16 input is sent as is (lossless).
* ``f16-clamp`` -- float16 with values clamped to +-65504 (also +-inf); NaN
  passes through.  Kept to compare fidelity with ``f16``.
* ``int8`` -- per-row ``scale = absmax / 127`` (float32), values
  ``round(x / scale)``; segment = ``rows * float32 scales`` then the int8
  values.  All-zero rows are fine; NaN/inf inputs raise :class:`FrameError`.

Decoding returns zero-copy (aligned, C-contiguous) views into ``data`` for
arrays that need no conversion -- integer arrays and the ``f32`` codec -- which
are read-only when ``data`` is ``bytes`` and alias ``data`` otherwise; they are
copied only when the segment happens to be misaligned.  All other float arrays
are freshly allocated.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from math import prod
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import orjson

__all__ = [
    "CODECS",
    "DTYPES",
    "F16_MAX",
    "MAGIC",
    "MAX_NDIM",
    "FrameError",
    "codec_bytes_per_value",
    "decode_frame",
    "encode_frame",
    "validate_hidden",
]

MAGIC = b"MLK1"
CODECS = ("f16", "f32", "int8", "f16-clamp")
MAX_NDIM = 4
F16_MAX = 65504.0
#: Cap on the product of the (non-zero) dims of one array, so a corrupt header
#: can never ask numpy for an absurd shape, even an empty one.
MAX_ELEMENTS = 1 << 40

_PREFIX = struct.Struct("<4sI")
_PAD = 8  # payload starts at a multiple of this many bytes from the frame start

#: Wire dtype name -> numpy dtype (little-endian).
DTYPES: Dict[str, np.dtype] = {
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u8": np.dtype("u1"),
    "i8": np.dtype("i1"),
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
}
_INT_WIRE = ("i32", "i64", "u8", "i8")
# Integer numpy dtypes sent raw -> wire name.
_RAW_BY_DTYPE = {
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
    np.dtype(np.int8): "i8",
    np.dtype(np.bool_): "u8",
}
# Codec -> wire dtype of its values.
_CODEC_DTYPE = {"f32": "f32", "f16": "f16", "f16-clamp": "f16", "int8": "i8"}
_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "f16-clamp": 2.0, "int8": 1.0}
_ENTRY_KEYS = frozenset(("name", "dtype", "shape", "codec", "nbytes"))
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")

ArrayDict = Dict[str, np.ndarray]


class FrameError(ValueError):
    """A frame (or the input to :func:`encode_frame`) is malformed."""


# --------------------------------------------------------------------------- helpers


def codec_bytes_per_value(codec: str) -> float:
    """Payload bytes per float value for ``codec``.

    Per-row overhead is not included: ``int8`` adds a 4-byte scale per row, and
    ``f16`` adds 4 bytes per row only in frames where some row needed scaling.
    """
    try:
        return _BYTES_PER_VALUE[codec]
    except (KeyError, TypeError):
        raise FrameError(f"unknown codec {codec!r}; expected one of {CODECS}") from None


def validate_hidden(arr: np.ndarray, n_rows: int, n_embd: int) -> None:
    """Raise :class:`FrameError` unless ``arr`` is a float array of shape ``(n_rows, n_embd)``."""
    if not isinstance(arr, np.ndarray):
        raise FrameError(f"hidden state must be a numpy array, got {type(arr).__name__}")
    if arr.shape != (n_rows, n_embd):
        raise FrameError(
            f"hidden state shape {tuple(arr.shape)} does not match expected {(n_rows, n_embd)}"
        )
    if arr.dtype.kind != "f":
        raise FrameError(f"hidden state dtype {arr.dtype} is not floating point")


def _row_layout(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """(rows, row length) for per-row codecs: rows run along the last axis."""
    if len(shape) >= 2:
        return prod(shape[:-1]), shape[-1]
    return 1, (shape[0] if shape else 1)


def _segment_nbytes(dtype: str, codec: Optional[str], shape: Tuple[int, ...], scaled: bool) -> int:
    """Exact byte size of one array's payload segment."""
    n = prod(shape) * DTYPES[dtype].itemsize
    if codec == "int8" or (codec == "f16" and scaled):
        n += 4 * _row_layout(shape)[0]
    return n


# --------------------------------------------------------------------------- float16 conversion
#
# numpy's float32 <-> float16 casts are scalar C loops unless numpy was built
# for F16C (the x86-64 wheels are not), ~3 ns per value.  The versions below
# are a dozen vectorized integer/float passes, bit-identical to numpy's casts
# (round to nearest even, subnormals, +-inf; NaN stays NaN).

_CHUNK = 1 << 16  # values per pass: bounds scratch memory, keeps it in cache
_U16, _U32, _I32 = np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32)
_LITTLE = sys.byteorder == "little"
_TWO_M112 = np.float32(2.0**-112)
_TWO_112 = np.float32(2.0**112)
#: Arrays of at least this many values are converted by several threads (numpy
#: releases the GIL in its loops); see :data:`CODEC_THREADS`.
_PAR_MIN = 1 << 17


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ[name]))
    except (KeyError, ValueError):
        return default


#: Threads for large float16 conversions (``MOLINK_CODEC_THREADS``, default 1).
#: On the H100 host (32 cores, numpy 2.5.2) 4 threads were slower than 1 for the
#: bit-trick kernels at 64 x 4096 (encode 763 vs 616 us, decode 425 vs 231 us).
CODEC_THREADS = _env_int("MOLINK_CODEC_THREADS", 1)
_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def _run_split(fn: Callable[[int, int], None], n: int) -> None:
    """``fn(a, b)`` over ``[0, n)``: in one call, or split over :data:`CODEC_THREADS` threads."""
    k = min(CODEC_THREADS, n // (_PAR_MIN // 2)) if n >= _PAR_MIN else 1
    if k <= 1:
        fn(0, n)
        return
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="molink-codec")
        pool = _pool
    bounds = [(n * j // k) & ~63 for j in range(k)] + [n]
    futs = [pool.submit(fn, bounds[j], bounds[j + 1]) for j in range(1, k)]
    fn(bounds[0], bounds[1])
    for f in futs:
        f.result()


@lru_cache(maxsize=None)
def _const(value: Union[int, float], dtype: str) -> np.ndarray:
    """Read-only array of ``_CHUNK`` copies of ``value``.

    numpy's maximum/minimum against a scalar take a slow non-SIMD path; against
    an array they are vectorized.
    """
    a = np.full(_CHUNK, value, dtype=dtype)
    a.flags.writeable = False
    return a


def _f32_to_f16_bits(xf: np.ndarray, out: np.ndarray, clamp: Optional[float]) -> None:
    """1-D float32 ``xf`` -> float16 bits in ``out`` (uint16, same length), chunk by chunk."""
    n = xf.size
    c = max(1, min(n, _CHUNK))
    a_buf = np.empty(c, dtype=_F32)
    m_buf = np.empty(c, dtype=_U32)
    floor = _const(0x3F000000, "u4")  # bits of 0.5 = 2**(-14 + 13)
    lim = None if clamp is None else _const(clamp, "f4")
    with np.errstate(all="ignore"):
        for s in range(0, n, c):
            k = min(c, n - s)
            xs, a, m = xf[s : s + k], a_buf[:k], m_buf[:k]
            np.abs(xs, out=a)
            if lim is not None:
                np.minimum(a, lim[:k], out=a)  # NaN propagates
            au = a.view(_U32)
            # m = 2**(E + 13) with E = max(exponent of |x|, -14): adding and
            # subtracting m rounds |x| to float16's grid (ulp 2**(E - 10)).
            np.bitwise_and(au, np.uint32(0x7F800000), out=m)
            m += np.uint32(13 << 23)
            np.maximum(m, floor[:k], out=m)
            mf = m.view(_F32)
            a += mf
            a -= mf
            # |x| is now float16-exact; scaling by 2**-112 (exact, also into
            # float32 subnormals) lines its bits up with float16's, 13 bits up.
            a *= _TWO_M112
            # Sign: bit 31 -> bit 28 (zero in |x| * 2**-112), bit 15 after >> 13.
            np.bitwise_and(xs.view(_U32), np.uint32(0x80000000), out=m)
            m >>= np.uint32(3)
            au |= m
            au >>= np.uint32(13)
            np.copyto(out[s : s + k], au, casting="unsafe")


def _f32_to_f16(x: np.ndarray, clamp: Optional[float] = None) -> np.ndarray:
    """C-contiguous float32 -> float16 (round to nearest even), same shape.

    Without ``clamp`` the caller guarantees no +-inf input and no finite
    magnitude >= 65520 (NaN is fine).  ``clamp=65536.0`` maps everything that
    large to +-inf like a plain cast; ``clamp=65504.0`` saturates instead.
    """
    xf = x.reshape(-1)
    n = xf.size
    g = _ggml()
    if g is not None and clamp != F16_MAX:  # a plain cast: overflow -> +-inf, as numpy
        out16 = np.empty(n, dtype=_F16)
        _run_split(lambda a, b: g.f32_to_f16(xf[a:b], out16[a:b]), n)
        return out16.reshape(x.shape)
    if not _FAST_F16:
        out16 = np.empty(n, dtype=_F16)

        def cast(a: int, b: int) -> None:
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(out16[a:b], xf[a:b], casting="unsafe")
                if clamp == F16_MAX:
                    np.clip(out16[a:b], -F16_MAX, F16_MAX, out=out16[a:b])

        _run_split(cast, n)
        return out16.reshape(x.shape)
    out = np.empty(n, dtype=_U16)
    _run_split(lambda a, b: _f32_to_f16_bits(xf[a:b], out[a:b], clamp), n)
    return out.view(_F16).reshape(x.shape)


def _f16_to_f32_bits(hb: np.ndarray, f: np.ndarray) -> None:
    """1-D float16 bits ``hb`` (int16 view) -> float32 values in ``f`` (same length)."""
    # Sign-extend, move exponent|mantissa to float32's position, drop the
    # extension bits; then the float32 is the value times 2**-112, exactly.
    w = f.view(_I32)
    np.copyto(w, hb, casting="unsafe")
    w <<= np.int32(13)
    w &= np.int32(0x8FFFFFFF - (1 << 32))
    f *= _TWO_112
    if f.size and not (f.max() < 65536.0 and f.min() > -65536.0):
        # float16 inf/NaN land at >= 65536: redo those few with numpy.
        u = hb.view(_U16)
        sp = np.flatnonzero((u & np.uint16(0x7C00)) == np.uint16(0x7C00))
        f[sp] = u[sp].view(_F16).astype(_F32)


def _f16_to_f32(h: np.ndarray) -> np.ndarray:
    """float16 array (any alignment) -> new C-contiguous float32 array."""
    hf = h.reshape(-1)
    f = np.empty(hf.size, dtype=_F32)
    g = _ggml()
    if g is not None:
        hf = np.ascontiguousarray(hf)  # (unaligned is fine: the SIMD loads are unaligned ones)
        _run_split(lambda a, b: g.f16_to_f32(hf[a:b], f[a:b]), hf.size)
        return f.reshape(h.shape)
    if not _FAST_F16_DEC:
        _run_split(lambda a, b: np.copyto(f[a:b], hf[a:b], casting="unsafe"), hf.size)
    else:
        hb = hf.view(np.int16)
        _run_split(lambda a, b: _f16_to_f32_bits(hb[a:b], f[a:b]), hf.size)
    return f.reshape(h.shape)


class _GgmlF16:
    """ggml's own SIMD converters (``ggml_cpu_fp32_to_fp16`` / ``ggml_cpu_fp16_to_fp32`` in the
    ``libggml-cpu`` next to the loaded llama library): F16C/NEON, bit-identical to numpy's casts, and
    10-20x faster than numpy on x86-64 wheels. ctypes releases the GIL during the call."""

    def __init__(self, lib: Any):
        import ctypes

        self.enc, self.dec = lib.ggml_cpu_fp32_to_fp16, lib.ggml_cpu_fp16_to_fp32
        self.enc.restype = self.dec.restype = None
        self.enc.argtypes = self.dec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.ggml_cpu_init.restype, lib.ggml_cpu_init.argtypes = None, []
        lib.ggml_cpu_init()  # its scalar tails use tables that this fills (done already where a model loaded)

    def f32_to_f16(self, x: np.ndarray, out: np.ndarray) -> None:
        self.enc(x.ctypes.data, out.ctypes.data, x.size)

    def f16_to_f32(self, h: np.ndarray, out: np.ndarray) -> None:
        self.dec(h.ctypes.data, out.ctypes.data, h.size)


def _load_ggml_f16() -> Optional[_GgmlF16]:
    """The converters of the ggml CPU library llama_cpp uses (or would load), else None."""
    if os.environ.get("MOLINK_F16_CAST", "").strip().lower() in ("bits", "numpy"):
        return None
    try:
        import ctypes

        # next to the llama library llama_cpp loaded (or would load), by this OS's file names (the wire layer
        # does not import stage/: stage.libpath does the same search for the other ggml libraries)
        path = _ggml_cpu_path()
        if path is None:
            return None
        conv = _GgmlF16(ctypes.CDLL(str(path)))
        # trust, but check: the special values and a tail shorter than a SIMD block
        probe = np.array([0.0, -0.0, 1.0, 65504.0, 65520.0, -np.inf, 6e-8, 1e-8, 3.14159, 2.0**-24, 7.0],
                         dtype=_F32)
        h = np.empty(probe.size, dtype=_F16)
        conv.f32_to_f16(probe, h)
        back = np.empty(probe.size, dtype=_F32)
        conv.f16_to_f32(h, back)
        with np.errstate(over="ignore"):
            same = h.view(_U16).tolist() == probe.astype(_F16).view(_U16).tolist() and \
                back.view(_U32).tolist() == h.astype(_F32).view(_U32).tolist()
        return conv if same else None
    except Exception:  # noqa: BLE001 - no usable library: numpy or bit tricks instead
        return None


def _ggml_cpu_path() -> "Optional[object]":
    """ggml-cpu's shared library beside llama_cpp's llama library, or None."""
    import importlib.util
    from pathlib import Path

    mod = sys.modules.get("llama_cpp.llama_cpp")
    name = getattr(getattr(mod, "_lib", None), "_name", None)
    if name:
        folder = Path(name).parent
    else:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.origin:
            return None
        folder = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(spec.origin).parent / "lib")
    names = (["ggml-cpu.dll", "libggml-cpu.dll"] if sys.platform == "win32" else
             ["libggml-cpu.dylib"] if sys.platform == "darwin" else ["libggml-cpu.so"])
    for n in names:
        if (folder / n).is_file():
            return folder / n
    if sys.platform not in ("win32", "darwin") and folder.is_dir():
        versioned = sorted(folder.glob("libggml-cpu.so.*"), key=lambda p: len(p.name))
        if versioned:
            return versioned[0]
    return None


_GGML: Optional[_GgmlF16] = None
_GGML_TRIED = False


def _ggml() -> Optional[_GgmlF16]:
    """Loaded on first use (not at import: the stage imports llama_cpp first, so its library is found)."""
    global _GGML, _GGML_TRIED
    if not _GGML_TRIED:
        _GGML_TRIED = True
        _GGML = _load_ggml_f16()
    return _GGML


def _pick_f16_kernels() -> Tuple[bool, bool]:
    """(bit-trick encode, bit-trick decode): whichever of them and numpy's own casts is faster here.

    numpy's float16 casts are scalar C loops unless numpy was built for F16C (most
    x86-64 wheels are not); then the bit tricks win by 3-10x.  Both give the same
    bits (NaN stays NaN), so this only picks the speed.  ``MOLINK_F16_CAST`` =
    ``bits`` or ``numpy`` forces the choice.
    """
    if not _LITTLE:
        return False, False
    force = os.environ.get("MOLINK_F16_CAST", "").strip().lower()
    if force in ("bits", "numpy"):
        return (force == "bits",) * 2
    try:
        x = np.random.default_rng(0).standard_normal(1 << 14, dtype=np.float32)
        h = x.astype(_F16)
        hb = h.view(np.int16)
        o16, o32 = np.empty(x.size, dtype=_U16), np.empty(x.size, dtype=_F32)

        def best(fn: Callable[[], Any]) -> float:
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        enc = best(lambda: _f32_to_f16_bits(x, o16, None)) < best(lambda: x.astype(_F16))
        dec = best(lambda: _f16_to_f32_bits(hb, o32)) < best(lambda: h.astype(_F32))
        return enc, dec
    except Exception:  # pragma: no cover - never fail an import over a timing
        return True, True


_FAST_F16, _FAST_F16_DEC = _pick_f16_kernels()


# --------------------------------------------------------------------------- encode


def _encode_f16(x: np.ndarray) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """C-contiguous float32 -> (per-row power-of-two scales or None, float16 values)."""
    rows, dim = _row_layout(x.shape)
    if x.size == 0:
        return None, x.astype(_F16)
    x2 = x.reshape(rows, dim)
    hi = x2.max(axis=1)
    lo = x2.min(axis=1)
    # NaN propagates into hi/lo, so rows holding NaN are looked at too.
    suspect = ~((hi <= F16_MAX) & (lo >= -F16_MAX))
    if not suspect.any():
        return None, _f32_to_f16(x)
    # Largest finite magnitude per row; rows with NaN/inf need a closer look.
    with np.errstate(invalid="ignore"):
        amax = np.maximum(hi, -lo)
    odd = np.flatnonzero(~np.isfinite(amax))
    clamp = None
    if odd.size:
        sub = x2[odd]
        if np.isinf(sub).any():
            clamp = 65536.0  # keeps +-inf as inf (the f16 cast needs it clamped)
        amax[odd] = np.where(np.isfinite(sub), np.abs(sub), 0).max(axis=1)
    need = amax > F16_MAX
    if not need.any():  # only NaN/inf made rows suspect: they pass through
        return None, _f32_to_f16(x, clamp)
    idx = np.flatnonzero(need)
    amax = amax[idx].astype(np.float64)
    k = np.ceil(np.log2(amax / F16_MAX)).astype(np.int32)
    k += np.ldexp(amax, -k) > F16_MAX  # guard against log2 rounding down
    scales = np.ones(rows, dtype=_F32)
    scales[idx] = np.ldexp(np.float32(1), k)
    inv = np.ones(rows, dtype=_F32)
    inv[idx] = np.ldexp(np.float32(1), -k)  # exact reciprocals of powers of two
    with np.errstate(under="ignore"):
        y = x2 * inv[:, None]
    return scales, _f32_to_f16(y, clamp).reshape(x.shape)


def _encode_int8(x: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """float32 -> (per-row float32 scales, int8 values)."""
    rows, dim = _row_layout(x.shape)
    if x.size == 0:
        return np.zeros(rows, dtype=_F32), np.zeros(x.shape, dtype=np.int8)
    x2 = x.reshape(rows, dim)
    absmax = np.maximum(x2.max(axis=1), -x2.min(axis=1))
    if not np.isfinite(absmax).all():
        raise FrameError(f"array {name!r}: int8 codec needs finite values (found NaN or inf)")
    scales = (absmax / np.float32(127)).astype(_F32)
    div = np.where(scales > 0, scales, np.float32(1))
    with np.errstate(over="ignore", under="ignore"):
        t = x2 / div[:, None]
    np.rint(t, out=t)
    # |x / scale| <= 127 * (1 + 2**-23) for normal scales, so rint stays in
    # [-127, 127]; a subnormal (imprecise) scale can overshoot.
    if ((scales > 0) & (scales < np.finfo(np.float32).tiny)).any():
        np.clip(t, -127, 127, out=t)
    return scales, t.astype(np.int8).reshape(x.shape)


def _encode_array(
    name: str, a: np.ndarray, codec: str
) -> Tuple[Dict[str, Any], List[np.ndarray]]:
    """One array -> (header entry, payload buffers)."""
    shape = tuple(int(d) for d in a.shape)
    entry: Dict[str, Any] = {"name": name, "dtype": None, "shape": list(shape), "codec": None}
    if a.dtype.kind != "f":
        wire = _RAW_BY_DTYPE.get(np.dtype(a.dtype.type)) if a.dtype.kind in "biu" else None
        if wire is None:
            raise FrameError(
                f"array {name!r}: unsupported dtype {a.dtype}; integer arrays must be "
                "int32, int64, uint8, int8 or bool, or use a floating dtype"
            )
        if a.dtype == np.bool_:
            a = np.ascontiguousarray(a).view(np.uint8)
        else:
            a = np.ascontiguousarray(a, dtype=DTYPES[wire])
        entry["dtype"] = wire
        bufs = [a]
    else:
        entry["dtype"] = _CODEC_DTYPE[codec]
        entry["codec"] = codec
        x = h16 = None
        if a.dtype.itemsize == 2:  # float16: f16 codecs send it as is
            h16 = np.ascontiguousarray(a, dtype=_F16)
            if codec not in ("f16", "f16-clamp"):
                x = _f16_to_f32(h16)
        elif a.dtype == _F32:
            x = np.ascontiguousarray(a)
        else:
            with np.errstate(over="ignore"):
                x = np.ascontiguousarray(a, dtype=_F32)
        if h16 is not None and x is None:
            if codec == "f16":
                entry["scaled"] = False  # float16 never exceeds 65504
            else:  # f16-clamp: only +-inf changes
                u = h16.view(_U16)
                inf = (u & np.uint16(0x7FFF)) == np.uint16(0x7C00)
                if inf.any():
                    u = u.copy()
                    u[inf] = (u[inf] & np.uint16(0x8000)) | np.uint16(0x7BFF)
                    h16 = u.view(_F16)
            bufs = [h16]
        elif codec == "f32":
            bufs = [x]
        elif codec == "f16":
            scales, h = _encode_f16(x)
            entry["scaled"] = scales is not None
            bufs = [h] if scales is None else [scales, h]
        elif codec == "f16-clamp":
            bufs = [_f32_to_f16(x, clamp=F16_MAX)]
        else:  # int8
            scales, q = _encode_int8(x, name)
            bufs = [scales, q]
    bufs = [b.reshape(-1).view(np.uint8) for b in bufs]
    entry["nbytes"] = sum(b.nbytes for b in bufs)
    return entry, bufs


def encode_frame(
    meta: Dict[str, Any],
    arrays: Optional[Mapping[str, np.ndarray]] = None,
    *,
    codec: str = "f16",
    float_names: Optional[Collection[str]] = None,
) -> bytes:
    """Encode ``meta`` and named ``arrays`` into one frame.

    ``codec`` applies to floating arrays.  With ``float_names`` given, only the
    floating arrays named there use ``codec``; other floating arrays go as
    lossless ``f32``.  Naming an integer array in ``float_names`` is an error;
    names absent from ``arrays`` are ignored.  Integer arrays always go raw.
    Raises :class:`FrameError` for bad input (unknown codec, unsupported dtype,
    more than 4 dims, meta not JSON-serializable, NaN/inf with ``int8`` ...).
    """
    if codec not in CODECS:
        raise FrameError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if not isinstance(meta, dict):
        raise FrameError(f"meta must be a dict, got {type(meta).__name__}")
    arrays = {} if arrays is None else arrays
    if not isinstance(arrays, Mapping):
        raise FrameError(f"arrays must be a mapping of name -> array, got {type(arrays).__name__}")
    if float_names is not None and isinstance(float_names, str):
        raise FrameError("float_names must be a collection of names, not a str")
    entries: List[Dict[str, Any]] = []
    bufs: List[np.ndarray] = []
    for name, arr in arrays.items():
        if not isinstance(name, str):
            raise FrameError(f"array names must be str, got {type(name).__name__}")
        try:
            a = np.asarray(arr)
        except (ValueError, TypeError) as e:
            raise FrameError(f"array {name!r}: cannot convert to a numpy array: {e}") from None
        if a.ndim > MAX_NDIM:
            raise FrameError(f"array {name!r}: {a.ndim} dims, at most {MAX_NDIM} are supported")
        c = codec
        if float_names is not None:
            if name in float_names:
                if a.dtype.kind != "f":
                    raise FrameError(
                        f"array {name!r} is listed in float_names but has dtype {a.dtype}"
                    )
            else:
                c = "f32"
        entry, b = _encode_array(name, a, c)
        entries.append(entry)
        bufs.extend(b)
    try:
        header = orjson.dumps(
            {"meta": meta, "arrays": entries}, option=orjson.OPT_SERIALIZE_NUMPY
        )
    except orjson.JSONEncodeError as e:
        raise FrameError(f"meta is not JSON-serializable: {e}") from None
    header += b" " * (-(_PREFIX.size + len(header)) % _PAD)
    if len(header) > 0xFFFFFFFF:
        raise FrameError(f"header too large: {len(header)} bytes")
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *bufs])


# --------------------------------------------------------------------------- decode


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_Spec = Tuple[str, str, Optional[str], Tuple[int, ...], bool, int]


def _check_entry(i: int, e: Any, seen: set) -> _Spec:
    """Validate one header entry -> (name, dtype, codec, shape, scaled, nbytes)."""
    where = f"arrays[{i}]"
    if not isinstance(e, dict):
        raise FrameError(f"{where} must be a JSON object, got {type(e).__name__}")
    missing = _ENTRY_KEYS - e.keys()
    if missing:
        raise FrameError(f"{where} is missing key(s) {sorted(missing)}")
    name, dtype, codec, shape, nbytes = e["name"], e["dtype"], e["codec"], e["shape"], e["nbytes"]
    allowed = _ENTRY_KEYS | {"scaled"} if codec == "f16" else _ENTRY_KEYS
    extra = e.keys() - allowed
    if extra:
        raise FrameError(f"{where} has unexpected key(s) {sorted(extra)}")
    if not isinstance(name, str):
        raise FrameError(f"{where}: name must be a string, got {type(name).__name__}")
    where = f"array {name!r}"
    if name in seen:
        raise FrameError(f"duplicate array name {name!r}")
    seen.add(name)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FrameError(f"{where}: unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    if codec is not None and (not isinstance(codec, str) or codec not in CODECS):
        raise FrameError(f"{where}: unknown codec {codec!r}; expected one of {CODECS} or null")
    if codec is None:
        if dtype not in _INT_WIRE:
            raise FrameError(f"{where}: dtype {dtype!r} needs a codec (raw arrays must be integer)")
    elif dtype != _CODEC_DTYPE[codec]:
        raise FrameError(
            f"{where}: codec {codec!r} carries dtype {_CODEC_DTYPE[codec]!r}, header says {dtype!r}"
        )
    if not isinstance(shape, list):
        raise FrameError(f"{where}: shape must be a list, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise FrameError(f"{where}: shape has {len(shape)} dims, at most {MAX_NDIM} are supported")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise FrameError(f"{where}: shape entries must be non-negative integers, got {shape!r}")
    if prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise FrameError(f"{where}: shape {shape!r} is too large")
    scaled = e.get("scaled", False)
    if not isinstance(scaled, bool):
        raise FrameError(f"{where}: 'scaled' must be true or false, got {scaled!r}")
    if not _is_int(nbytes) or nbytes < 0:
        raise FrameError(f"{where}: nbytes must be a non-negative integer, got {nbytes!r}")
    shape_t = tuple(shape)
    expected = _segment_nbytes(dtype, codec, shape_t, scaled)
    if nbytes != expected:
        raise FrameError(
            f"{where}: nbytes is {nbytes} but shape {shape!r} with codec {codec!r} "
            f"and dtype {dtype!r} needs {expected}"
        )
    return name, dtype, codec, shape_t, scaled, nbytes


def _view(
    mv: memoryview, dtype: np.dtype, count: int, offset: int, shape: Tuple[int, ...]
) -> np.ndarray:
    """Aligned, C-contiguous array over ``count`` items of ``mv`` at ``offset``."""
    a = np.frombuffer(mv, dtype=dtype, count=count, offset=offset)
    if not a.flags.aligned:
        a = a.copy()
    return a.reshape(shape)


def _scales(mv: memoryview, offset: int, rows: int, where: str, positive: bool) -> np.ndarray:
    s = np.frombuffer(mv, dtype=_F32, count=rows, offset=offset)
    ok = np.isfinite(s) & ((s > 0) if positive else (s >= 0))
    if not ok.all():
        bad = float(s[~ok][0])
        raise FrameError(f"{where}: invalid row scale {bad!r} (must be finite and "
                         f"{'> 0' if positive else '>= 0'})")
    return s


def decode_frame(data: Union[bytes, bytearray, memoryview]) -> Tuple[Dict[str, Any], ArrayDict]:
    """Decode a frame -> ``(meta, arrays)``; float arrays come back as float32.

    Checks the prefix, the header and every entry against the payload size
    before touching the payload, and rejects non-finite or negative row scales;
    any malformed input raises :class:`FrameError` saying what is wrong.
    Arrays needing no conversion may be views into ``data`` (see module doc).
    """
    try:
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise TypeError("buffer is not C-contiguous")
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
    except TypeError as e:
        raise FrameError(f"frame must be a contiguous bytes-like object ({e})") from None
    total = mv.nbytes
    if total < _PREFIX.size:
        raise FrameError(f"frame too short: {total} bytes, need at least {_PREFIX.size}")
    magic, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if hlen > total - _PREFIX.size:
        raise FrameError(
            f"header length {hlen} exceeds the {total - _PREFIX.size} bytes after the prefix"
        )
    try:
        header = orjson.loads(mv[_PREFIX.size : _PREFIX.size + hlen])
    except orjson.JSONDecodeError as e:
        raise FrameError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FrameError(f"header must be a JSON object, got {type(header).__name__}")
    extra = header.keys() - {"meta", "arrays"}
    if extra:
        raise FrameError(f"header has unexpected key(s) {sorted(extra)}")
    if "meta" not in header:
        raise FrameError("header is missing 'meta'")
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise FrameError(f"header 'meta' must be a JSON object, got {type(meta).__name__}")
    if "arrays" not in header:
        raise FrameError("header is missing 'arrays'")
    entries = header["arrays"]
    if not isinstance(entries, list):
        raise FrameError(f"header 'arrays' must be a list, got {type(entries).__name__}")

    seen: set = set()
    specs = [_check_entry(i, e, seen) for i, e in enumerate(entries)]
    offset = _PREFIX.size + hlen
    payload = total - offset
    described = sum(s[-1] for s in specs)
    if payload < described:
        raise FrameError(
            f"payload truncated: header describes {described} bytes, frame has {payload}"
        )
    if payload > described:
        raise FrameError(
            f"{payload - described} trailing bytes after the {described} payload bytes described"
        )

    out: ArrayDict = {}
    for name, dtype, codec, shape, scaled, nbytes in specs:
        count = prod(shape)
        dt = DTYPES[dtype]
        if codec is None or codec == "f32":
            out[name] = _view(mv, dt, count, offset, shape)
        elif codec == "f16-clamp" or (codec == "f16" and not scaled):
            vals = np.frombuffer(mv, dtype=dt, count=count, offset=offset)
            out[name] = _f16_to_f32(vals).reshape(shape)
        else:  # int8, or f16 with scales: rows * f32 scales, then values
            rows, dim = _row_layout(shape)
            where = f"array {name!r}"
            s = _scales(mv, offset, rows, where, positive=(codec == "f16"))
            vals = np.frombuffer(mv, dtype=dt, count=count, offset=offset + 4 * rows)
            x = vals.astype(_F32) if codec == "int8" else _f16_to_f32(vals)
            x2 = x.reshape(rows, dim)
            with np.errstate(over="ignore", invalid="ignore"):
                sel = np.flatnonzero(s != 1) if codec == "f16" else None
                if sel is None or sel.size > rows // 2:
                    x2 *= s[:, None]
                elif sel.size:
                    x2[sel] *= s[sel, None]
            out[name] = x.reshape(shape)
        offset += nbytes
    return meta, out
