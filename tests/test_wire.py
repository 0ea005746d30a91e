"""Tests for molink_lite.wire.codec: the binary frame codec."""

from __future__ import annotations

import struct
import time
import warnings

import numpy as np
import orjson
import pytest

from molink_lite.wire import codec as wire
from molink_lite.wire.codec import (
    CODECS,
    F16_MAX,
    MAGIC,
    FrameError,
    codec_bytes_per_value,
    decode_frame,
    encode_frame,
    validate_hidden,
)

RNG = np.random.default_rng(1234)


def hidden(rows: int = 5, dim: int = 64, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal((rows, dim)) * scale).astype(np.float32)


def raw_frame(header, payload: bytes = b"", hlen=None) -> bytes:
    """Hand-built frame (for malformed-input tests)."""
    h = header if isinstance(header, bytes) else orjson.dumps(header)
    return MAGIC + struct.pack("<I", len(h) if hlen is None else hlen) + h + payload


def entry(**kw):
    e = {"name": "x", "dtype": "i32", "shape": [2], "codec": None, "nbytes": 8}
    e.update(kw)
    return e


def row_rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Max abs error per row divided by the row's absmax."""
    g = got.reshape(-1, got.shape[-1]).astype(np.float64)
    w = want.reshape(-1, want.shape[-1]).astype(np.float64)
    return np.abs(g - w).max(axis=1) / np.maximum(np.abs(w).max(axis=1), 1e-30)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_every_codec(codec):
    x = hidden(7, 128)
    meta = {"seq": 3, "pos": [0, 1, 2], "nested": {"a": None, "b": "s", "c": 1.5}}
    ids = np.arange(7, dtype=np.int32)
    data = encode_frame(meta, {"h": x, "ids": ids}, codec=codec)
    assert isinstance(data, bytes) and data[:4] == MAGIC
    got_meta, arrs = decode_frame(data)
    assert got_meta == meta
    assert list(arrs) == ["h", "ids"]
    h = arrs["h"]
    assert h.dtype == np.float32 and h.shape == x.shape and h.flags.c_contiguous
    np.testing.assert_array_equal(arrs["ids"], ids)
    tol = {"f32": 0.0, "f16": 2**-11, "f16-clamp": 2**-11, "int8": 0.5 / 127 + 1e-6}[codec]
    assert row_rel_err(h, x).max() <= tol


def test_f32_bit_identical():
    x = hidden(9, 33, scale=1e3)
    x[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    x[1, :3] = [1e-45, 3.4e38, -1.2e-38]  # subnormal, near max, near min normal
    _, arrs = decode_frame(encode_frame({}, {"x": x}, codec="f32"))
    assert arrs["x"].dtype == np.float32
    np.testing.assert_array_equal(arrs["x"].view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("codec", CODECS)
def test_float_input_dtypes_decode_to_float32(dtype, codec):
    x = hidden(4, 16).astype(dtype)
    _, arrs = decode_frame(encode_frame({}, {"x": x}, codec=codec))
    assert arrs["x"].dtype == np.float32 and arrs["x"].flags.c_contiguous
    tol = 0.5 / 127 + 1e-6 if codec == "int8" else 2**-11
    assert row_rel_err(arrs["x"], x.astype(np.float32)).max() <= tol
    if codec.startswith("f16") and dtype == np.float16:  # float16 -> f16 is lossless
        np.testing.assert_array_equal(arrs["x"], x.astype(np.float32))


@pytest.mark.parametrize(
    "dtype,wire_dtype",
    [(np.int32, "i32"), (np.int64, "i64"), (np.uint8, "u8"), (np.int8, "i8"), (np.bool_, "u8")],
)
@pytest.mark.parametrize("codec", CODECS)
def test_int_arrays_raw(dtype, wire_dtype, codec):
    if dtype is np.bool_:
        a = RNG.random((3, 5)) > 0.5
    else:
        info = np.iinfo(dtype)
        a = RNG.integers(info.min, info.max, size=(3, 5), dtype=dtype, endpoint=True)
    data = encode_frame({}, {"a": a}, codec=codec)
    hlen = struct.unpack_from("<I", data, 4)[0]
    (e,) = orjson.loads(data[8 : 8 + hlen])["arrays"]
    assert e["dtype"] == wire_dtype and e["codec"] is None and e["nbytes"] == a.size * a.itemsize
    _, arrs = decode_frame(data)
    want = a.astype(np.uint8) if dtype is np.bool_ else a
    assert arrs["a"].dtype == want.dtype
    np.testing.assert_array_equal(arrs["a"], want)


def test_f16_large_rows_are_scaled_not_inf():
    x = hidden(4, 256, scale=100.0)
    x[1, 3] = 1e5
    x[1, 10] = 41897.0
    x[2, 0] = -3e7
    x[3, 5] = 65510.0  # above f16 max, would round down to 65504 unscaled
    data = encode_frame({}, {"h": x}, codec="f16")
    _, arrs = decode_frame(data)
    h = arrs["h"]
    assert np.isfinite(h).all()
    err = row_rel_err(h, x)
    assert err.max() <= 1e-3
    # elementwise relative error of the big values ~ f16 precision
    for r, c in [(1, 3), (1, 10), (2, 0), (3, 5)]:
        assert abs(h[r, c] - x[r, c]) / abs(x[r, c]) <= 2**-11
    # the unscaled row 0 is exactly what plain f16 gives
    np.testing.assert_array_equal(h[0], x[0].astype(np.float16).astype(np.float32))
    hlen = struct.unpack_from("<I", data, 4)[0]
    (e,) = orjson.loads(data[8 : 8 + hlen])["arrays"]
    assert e["scaled"] is True and e["nbytes"] == 4 * 4 + x.size * 2


def test_f16_scaled_rows_keep_f16_precision():
    # power-of-two scaling: a scaled row decodes like f16 of (row / 2**k) * 2**k
    x = hidden(3, 64, scale=1e4)
    x[0, 0] = 2.5e5  # needs 2**2
    _, arrs = decode_frame(encode_frame({}, {"h": x}))
    want0 = (x[0] / 4).astype(np.float16).astype(np.float32) * 4
    np.testing.assert_array_equal(arrs["h"][0], want0)
    np.testing.assert_array_equal(arrs["h"][1:], x[1:].astype(np.float16).astype(np.float32))


def test_f16_without_big_values_omits_scales():
    x = hidden(6, 32, scale=1000.0)
    x[0, 0] = F16_MAX
    x[1, 0] = -F16_MAX
    data = encode_frame({}, {"h": x})
    hlen = struct.unpack_from("<I", data, 4)[0]
    (e,) = orjson.loads(data[8 : 8 + hlen])["arrays"]
    assert e["scaled"] is False and e["nbytes"] == x.size * 2
    assert len(data) == 8 + hlen + x.size * 2
    _, arrs = decode_frame(data)
    np.testing.assert_array_equal(arrs["h"], x.astype(np.float16).astype(np.float32))


def test_f16_nan_and_inf_pass_through():
    x = hidden(4, 16)
    x[0, 1] = np.nan
    x[1, 2] = np.inf
    x[1, 3] = 2e5  # same row as +inf: scaled, inf stays inf
    x[2, 4] = -np.inf
    x[3, 5] = np.nan
    x[3, 6] = -7e4  # NaN row that also needs scaling
    _, arrs = decode_frame(encode_frame({}, {"h": x}))
    h = arrs["h"]
    assert np.isnan(h[0, 1]) and np.isnan(h[3, 5])
    assert h[1, 2] == np.inf and h[2, 4] == -np.inf
    fin = np.isfinite(x)
    assert np.array_equal(np.isfinite(h), fin)
    rel = np.abs(h[fin] - x[fin]) / np.maximum(np.abs(x[fin]), 1e-3)
    assert rel.max() <= 2**-10
    # rows whose only oddity is NaN/inf are not scaled
    data = encode_frame({}, {"h": x[[0, 2]]})
    hlen = struct.unpack_from("<I", data, 4)[0]
    assert orjson.loads(data[8 : 8 + hlen])["arrays"][0]["scaled"] is False


def test_f16_clamp_clamps():
    x = np.array([[1e5, -1e5, 41897.0, 65519.0, np.inf, -np.inf, np.nan, 1.0]], np.float32)
    _, arrs = decode_frame(encode_frame({}, {"h": x}, codec="f16-clamp"))
    h = arrs["h"][0]
    np.testing.assert_array_equal(h[:2], [F16_MAX, -F16_MAX])
    assert abs(h[2] - 41897.0) <= 16
    np.testing.assert_array_equal(h[3:6], [F16_MAX, F16_MAX, -F16_MAX])
    assert np.isnan(h[6]) and h[7] == 1.0


def test_float16_input_sent_as_is():
    x = np.array([[1.0, -np.inf, np.inf, np.nan, F16_MAX, 6e-8]], np.float16)
    _, a = decode_frame(encode_frame({}, {"h": x}, codec="f16"))
    np.testing.assert_array_equal(a["h"], x.astype(np.float32))
    _, b = decode_frame(encode_frame({}, {"h": x}, codec="f16-clamp"))
    want = x.astype(np.float32)
    want[0, 1:3] = [-F16_MAX, F16_MAX]
    np.testing.assert_array_equal(b["h"], want)
    assert x[0, 1] == -np.inf  # input untouched


def test_f16_vs_clamp_fidelity():
    x = hidden(8, 128, scale=1000.0)
    x[:, 7] = 3e5  # one massive channel, as in some real models
    _, a = decode_frame(encode_frame({}, {"h": x}, codec="f16"))
    _, b = decode_frame(encode_frame({}, {"h": x}, codec="f16-clamp"))
    assert row_rel_err(a["h"], x).max() < 1e-3
    assert row_rel_err(b["h"], x).max() > 0.5


def test_int8_error_bound_and_zero_rows():
    x = hidden(6, 100, scale=5.0)
    x[2] = 0.0
    x[4] *= 1e-30  # tiny but normal
    x[5, 0] = -1e30
    data = encode_frame({}, {"h": x}, codec="int8")
    hlen = struct.unpack_from("<I", data, 4)[0]
    (e,) = orjson.loads(data[8 : 8 + hlen])["arrays"]
    assert e["dtype"] == "i8" and e["nbytes"] == 6 * 4 + x.size
    _, arrs = decode_frame(data)
    h = arrs["h"]
    assert np.all(h[2] == 0.0)
    err = row_rel_err(h, x)
    assert err.max() <= 0.5 / 127 * (1 + 1e-5)
    # absmax element of each row survives almost exactly
    i = np.abs(x).argmax(axis=1)
    r = np.arange(6)
    assert np.allclose(h[r, i], x[r, i], rtol=1e-6, atol=0)


def test_int8_subnormal_rows():
    x = np.array([[1e-40, -3e-41, 0.0], [1e-45, 0.0, -1e-45]], np.float32)
    _, arrs = decode_frame(encode_frame({}, {"h": x}, codec="int8"))
    h = arrs["h"]
    assert np.isfinite(h).all() and np.all(np.abs(h) <= np.abs(x).max(axis=1, keepdims=True) * 1.01)


def test_int8_rejects_non_finite():
    x = hidden(2, 8)
    x[1, 1] = np.nan
    with pytest.raises(FrameError, match="int8 codec needs finite values"):
        encode_frame({}, {"h": x}, codec="int8")
    x[1, 1] = np.inf
    with pytest.raises(FrameError, match="int8 codec needs finite values"):
        encode_frame({}, {"h": x}, codec="int8")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", [(0, 64), (0,), (3, 0), (0, 0), (2, 0, 4), (1, 1, 1, 0)])
def test_empty_arrays(codec, shape):
    x = np.zeros(shape, np.float32)
    ids = np.zeros(shape, np.int64)
    _, arrs = decode_frame(encode_frame({"n": 0}, {"h": x, "ids": ids}, codec=codec))
    assert arrs["h"].shape == shape and arrs["h"].dtype == np.float32
    assert arrs["ids"].shape == shape and arrs["ids"].dtype == np.int64


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 5), (2, 1, 3, 4)])
def test_other_ranks(codec, shape):
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    if x.ndim:
        x.reshape(-1)[0] = 9e4 if codec != "int8" else 9.0
    _, arrs = decode_frame(encode_frame({}, {"x": x}, codec=codec))
    got = arrs["x"]
    assert got.shape == shape and got.dtype == np.float32
    want = x.astype(np.float64)
    if codec == "f16-clamp":
        want = np.clip(want, -F16_MAX, F16_MAX)
    scale = np.abs(want).max() if want.size else 1.0
    tol = {"f32": 0, "f16": 2**-11, "f16-clamp": 2**-11, "int8": 0.51 / 127}[codec]
    assert np.abs(got - want).max() <= tol * scale


def test_meta_and_no_arrays():
    meta = {"type": "any", "ids": [1, 2], "f": 0.25, "ok": True, "none": None, "u": "é✓"}  # the codec reads no type
    for arrays in (None, {}):
        m, arrs = decode_frame(encode_frame(meta, arrays))
        assert m == meta and arrs == {}


def test_meta_numpy_values_serialized():
    m, _ = decode_frame(encode_frame({"n": np.int64(3), "v": np.arange(3, dtype=np.int32)}))
    assert m == {"n": 3, "v": [0, 1, 2]}


def test_payload_is_8_byte_aligned_and_arrays_aligned():
    for name_len in range(1, 12):
        data = encode_frame({}, {"h" * name_len: np.ones((2, 3), np.float32)}, codec="f32")
        hlen = struct.unpack_from("<I", data, 4)[0]
        assert (8 + hlen) % 8 == 0
    # a segment after an odd-sized one is misaligned: decode still gives aligned arrays
    data = encode_frame({}, {"b": np.ones(3, np.uint8), "x": hidden(2, 5), "i": np.arange(3)},
                        codec="f32")
    _, arrs = decode_frame(data)
    for a in arrs.values():
        assert a.flags.aligned and a.flags.c_contiguous


def test_decode_views_and_input_types():
    x = hidden(3, 8)
    ids = np.arange(3, dtype=np.int64)
    data = encode_frame({}, {"ids": ids, "x": x}, codec="f32")
    _, a = decode_frame(data)
    assert not a["ids"].flags.writeable  # zero-copy view of immutable bytes
    _, b = decode_frame(bytearray(data))
    assert b["ids"].flags.writeable
    _, c = decode_frame(memoryview(data))
    _, d = decode_frame(np.frombuffer(data, np.uint8))
    for r in (a, b, c, d):
        np.testing.assert_array_equal(r["ids"], ids)
        np.testing.assert_array_equal(r["x"], x)
    # f16 decode always allocates fresh, writable float32
    _, e = decode_frame(encode_frame({}, {"x": x}))
    assert e["x"].flags.writeable


def test_non_contiguous_and_big_endian_inputs():
    base = hidden(6, 10)
    x = base[::2, ::3]  # non-contiguous
    be = base.astype(">f4")
    ib = np.arange(6, dtype=">i4")
    for codec in CODECS:
        _, arrs = decode_frame(encode_frame({}, {"x": x, "be": be, "ib": ib}, codec=codec))
        assert arrs["x"].shape == x.shape
        assert row_rel_err(arrs["x"], x).max() <= 0.51 / 127
        assert row_rel_err(arrs["be"], base).max() <= 0.51 / 127
        np.testing.assert_array_equal(arrs["ib"], np.arange(6))
        assert arrs["ib"].dtype == np.dtype("<i4")


def test_float_names_selects_codec():
    h = hidden(3, 16)
    logits = hidden(3, 16)
    data = encode_frame({}, {"h": h, "logits": logits}, codec="int8", float_names={"h", "other"})
    hlen = struct.unpack_from("<I", data, 4)[0]
    codecs = {e["name"]: e["codec"] for e in orjson.loads(data[8 : 8 + hlen])["arrays"]}
    assert codecs == {"h": "int8", "logits": "f32"}
    _, arrs = decode_frame(data)
    np.testing.assert_array_equal(arrs["logits"], logits)
    with pytest.raises(FrameError, match="float_names but has dtype int32"):
        encode_frame({}, {"ids": np.arange(3, dtype=np.int32)}, float_names=["ids"])
    with pytest.raises(FrameError, match="not a str"):
        encode_frame({}, {"h": h}, float_names="h")


# --------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(meta={}, arrays={"x": np.ones(2)}, codec="bf16"), "unknown codec 'bf16'"),
        (dict(meta=[1], arrays=None), "meta must be a dict"),
        (dict(meta={"o": object()}, arrays=None), "meta is not JSON-serializable"),
        (dict(meta={1: 2}, arrays=None), "meta is not JSON-serializable"),
        (dict(meta={}, arrays=[np.ones(2)]), "arrays must be a mapping"),
        (dict(meta={}, arrays={1: np.ones(2)}), "array names must be str"),
        (dict(meta={}, arrays={"c": np.ones(2, np.complex64)}), "unsupported dtype complex64"),
        (dict(meta={}, arrays={"u": np.ones(2, np.uint16)}), "unsupported dtype uint16"),
        (dict(meta={}, arrays={"s": np.array(["a"])}), "unsupported dtype <U1"),
        (dict(meta={}, arrays={"o": np.array([None])}), "unsupported dtype object"),
        (dict(meta={}, arrays={"r": [[1.0], [2.0, 3.0]]}), "cannot convert"),
        (dict(meta={}, arrays={"d": np.zeros((1,) * 5)}), "5 dims, at most 4"),
    ],
)
def test_encode_errors(kwargs, match):
    with pytest.raises(FrameError, match=match):
        encode_frame(**kwargs)


def test_frame_error_is_value_error():
    assert issubclass(FrameError, ValueError)


# --------------------------------------------------------------------------- decode errors


def _valid_entry_frame(**overrides) -> bytes:
    e = entry(**overrides)
    return raw_frame({"meta": {}, "arrays": [e]}, b"\0" * 8)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "frame too short: 0 bytes"),
        (b"MLK1\x00\x00", "frame too short: 6 bytes"),
        (b"MLK2" + struct.pack("<I", 2) + b"{}", "bad magic b'MLK2'"),
        (b"XXXX" * 10, "bad magic"),
        (raw_frame(b"{}", hlen=100), "header length 100 exceeds the 2 bytes"),
        (raw_frame(b"{not json"), "header is not valid JSON"),
        (raw_frame(b"\xff\xfe"), "header is not valid JSON"),
        (raw_frame(b""), "header is not valid JSON"),
        (raw_frame([1, 2]), "header must be a JSON object, got list"),
        (raw_frame("str"), "header must be a JSON object, got str"),
        (raw_frame({"meta": {}}), "missing 'arrays'"),
        (raw_frame({"arrays": []}), "missing 'meta'"),
        (raw_frame({"meta": [], "arrays": []}), "'meta' must be a JSON object, got list"),
        (raw_frame({"meta": {}, "arrays": {}}), "'arrays' must be a list, got dict"),
        (raw_frame({"meta": {}, "arrays": None}), "'arrays' must be a list, got NoneType"),
        (raw_frame({"meta": {}, "arrays": [], "x": 1}), r"unexpected key\(s\) \['x'\]"),
        (raw_frame({"meta": {}, "arrays": [5]}), r"arrays\[0\] must be a JSON object, got int"),
        (raw_frame({"meta": {}, "arrays": [{"name": "x"}]}), r"arrays\[0\] is missing key\(s\)"),
        (_valid_entry_frame(extra=1), r"unexpected key\(s\) \['extra'\]"),
        (_valid_entry_frame(scaled=True), r"unexpected key\(s\) \['scaled'\]"),
        (_valid_entry_frame(name=3), r"arrays\[0\]: name must be a string, got int"),
        (_valid_entry_frame(dtype="f64"), "unknown dtype 'f64'"),
        (_valid_entry_frame(dtype=["i32"]), r"unknown dtype \['i32'\]"),
        (_valid_entry_frame(codec="zstd"), "unknown codec 'zstd'"),
        (_valid_entry_frame(codec=1), "unknown codec 1"),
        (_valid_entry_frame(dtype="f32"), "dtype 'f32' needs a codec"),
        (_valid_entry_frame(dtype="i32", codec="f16"), "codec 'f16' carries dtype 'f16'"),
        (_valid_entry_frame(dtype="f16", codec="int8"), "codec 'int8' carries dtype 'i8'"),
        (_valid_entry_frame(shape=[-2]), "shape entries must be non-negative integers"),
        (_valid_entry_frame(shape=[2.0]), "shape entries must be non-negative integers"),
        (_valid_entry_frame(shape=["2"]), "shape entries must be non-negative integers"),
        (_valid_entry_frame(shape=[True, 2]), "shape entries must be non-negative integers"),
        (_valid_entry_frame(shape=2), "shape must be a list, got int"),
        (_valid_entry_frame(shape=[1, 1, 1, 1, 2]), "5 dims, at most 4"),
        (_valid_entry_frame(shape=[0, 2**40, 2**40]), "too large"),
        (_valid_entry_frame(nbytes=4), "nbytes is 4 but shape \\[2\\]"),
        (_valid_entry_frame(nbytes=-8), "nbytes must be a non-negative integer"),
        (_valid_entry_frame(nbytes=8.0), "nbytes must be a non-negative integer"),
        (_valid_entry_frame(nbytes=None), "nbytes must be a non-negative integer"),
        (_valid_entry_frame(dtype="i64"), "nbytes is 8 but .* needs 16"),
        (
            _valid_entry_frame(dtype="f16", codec="f16", scaled="yes"),
            "'scaled' must be true or false",
        ),
        (
            _valid_entry_frame(dtype="f16", codec="f16", shape=[2, 2], scaled=True),
            r"nbytes is 8 but shape \[2, 2\] with codec 'f16' and dtype 'f16' needs 16",
        ),
        (_valid_entry_frame(dtype="i8", codec="int8"), "needs 6"),
        (
            raw_frame({"meta": {}, "arrays": [entry()]}, b"\0" * 7),
            "payload truncated: header describes 8 bytes, frame has 7",
        ),
        (
            raw_frame({"meta": {}, "arrays": [entry()]}, b"\0" * 9),
            "1 trailing bytes after the 8 payload bytes",
        ),
        (raw_frame({"meta": {}, "arrays": []}, b"\0"), "1 trailing bytes"),
        (
            raw_frame({"meta": {}, "arrays": [entry(), entry()]}, b"\0" * 16),
            "duplicate array name 'x'",
        ),
    ],
)
def test_decode_malformed(data, match):
    with pytest.raises(FrameError, match=match):
        decode_frame(data)


@pytest.mark.parametrize("bad", [None, "MLK1", 12, 3.5, object()])
def test_decode_non_bytes(bad):
    with pytest.raises(FrameError, match="bytes-like"):
        decode_frame(bad)


def test_decode_non_contiguous_buffer():
    arr = np.frombuffer(encode_frame({}, None) * 2, np.uint8)[::2]
    with pytest.raises(FrameError, match="contiguous bytes-like"):
        decode_frame(memoryview(arr))


@pytest.mark.parametrize(
    "codec,scale,match",
    [
        ("f16", np.nan, "invalid row scale nan"),
        ("f16", 0.0, "invalid row scale 0.0"),
        ("f16", -2.0, "invalid row scale -2.0"),
        ("f16", np.inf, "invalid row scale inf"),
        ("int8", -1.0, "invalid row scale -1.0"),
        ("int8", np.nan, "invalid row scale nan"),
    ],
)
def test_decode_bad_scales(codec, scale, match):
    x = hidden(3, 4)
    x[0, 0] = 1e6
    data = bytearray(encode_frame({}, {"h": x}, codec=codec))
    hlen = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<f", data, 8 + hlen + 4, scale)  # scale of row 1
    with pytest.raises(FrameError, match=match):
        decode_frame(data)


def test_int8_zero_scale_is_valid():
    x = np.zeros((2, 3), np.float32)
    _, arrs = decode_frame(encode_frame({}, {"h": x}, codec="int8"))
    np.testing.assert_array_equal(arrs["h"], x)


def test_hand_built_frame_decodes():
    # documents the layout: scales first, then values; header key order irrelevant
    scales = np.array([4.0, 1.0], np.float32)
    vals = np.array([[1.5, -2.0], [3.0, 0.5]], np.float16)
    e = {"nbytes": 16, "shape": [2, 2], "scaled": True, "codec": "f16", "dtype": "f16", "name": "h"}
    ids = np.array([7, 8], np.int64)
    data = raw_frame(
        {"arrays": [e, entry(name="ids", dtype="i64", nbytes=16)], "meta": {"k": 1}},
        scales.tobytes() + vals.tobytes() + ids.tobytes(),
    )
    meta, arrs = decode_frame(data)
    assert meta == {"k": 1}
    np.testing.assert_array_equal(arrs["h"], [[6.0, -8.0], [3.0, 0.5]])
    np.testing.assert_array_equal(arrs["ids"], ids)


# --------------------------------------------------------------------------- fuzz


def _fuzz_frames():
    h = hidden(3, 8, scale=10.0)
    h[1, 2] = 2e5
    ids = np.arange(3, dtype=np.int32)
    mask = np.array([1, 0, 1], np.uint8)
    meta = {"req": "abc", "pos": [0, 1, 2], "t": 0.5}
    for codec in CODECS:
        yield encode_frame(meta, {"h": h, "ids": ids, "mask": mask}, codec=codec)
    yield encode_frame({"only": "meta"})


def _decode_or_frame_error(data) -> bool:
    try:
        decode_frame(data)
        return True
    except FrameError:
        return False


def test_fuzz_truncations_and_bit_flips():
    rng = np.random.default_rng(99)
    ok = errors = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        for frame in _fuzz_frames():
            n = len(frame)
            hlen = struct.unpack_from("<I", frame, 4)[0]
            assert _decode_or_frame_error(frame)
            for cut in range(n):  # every truncation
                assert not _decode_or_frame_error(frame[:cut])
            for _ in range(1500):
                buf = bytearray(frame)
                # bias flips towards the prefix + header, where they matter most
                hi = 8 + hlen if rng.random() < 0.7 else n
                for _ in range(rng.integers(1, 4)):
                    pos = int(rng.integers(0, hi))
                    buf[pos] ^= 1 << int(rng.integers(0, 8))
                if _decode_or_frame_error(bytes(buf)):
                    ok += 1
                else:
                    errors += 1
            for _ in range(100):  # random byte overwrite + random length change
                buf = bytearray(frame)
                pos = int(rng.integers(0, n))
                buf[pos] = int(rng.integers(0, 256))
                if rng.random() < 0.5:
                    buf += bytes(rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8))
                _decode_or_frame_error(bytes(buf))
    assert ok > 0 and errors > 0


def test_fuzz_random_headers():
    """Structurally plausible headers with random field values never crash."""
    rng = np.random.default_rng(7)
    choices = {
        "name": ["x", "", 1, None, "y"],
        "dtype": ["i32", "i64", "u8", "i8", "f32", "f16", "bf16", None, 3],
        "codec": [None, "f16", "f32", "int8", "f16-clamp", "x", 0],
        "shape": [[], [0], [2], [2, 2], [-1], [1.5], "2", [2**62, 2**62], [0, 2**62], [1] * 6],
        "nbytes": [0, 2, 4, 8, 12, 16, -1, 2**64 - 1, 1.0, "8", True],
        "scaled": [True, False, None, 1],
    }
    keys = list(choices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2000):
            e = {}
            for k in keys:
                if rng.random() < 0.93:
                    opts = choices[k]
                    e[k] = opts[int(rng.integers(len(opts)))]
            payload = bytes(rng.integers(0, 256, size=int(rng.integers(0, 20)), dtype=np.uint8))
            _decode_or_frame_error(raw_frame({"meta": {}, "arrays": [e]}, payload))


# --------------------------------------------------------------------------- float16 kernels


def test_f16_decode_exhaustive_matches_numpy():
    allh = np.arange(65536, dtype=np.uint16).view(np.float16)
    ref = allh.astype(np.float32)
    got = wire._f16_to_f32(allh)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def _f16_test_inputs(rng, n):
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    e = rng.integers(90, 145, size=n).astype(np.uint32)  # mostly around the f16 range
    sel = rng.random(n) < 0.8
    bits[sel] = (bits[sel] & np.uint32(0x807FFFFF)) | (e[sel] << np.uint32(23))
    x = bits.view(np.float32)
    # every f16 value, every midpoint between neighbours, and +-1 ulp around each midpoint
    allf = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    s = np.unique(allf[np.isfinite(allf)])
    mids = ((s[:-1].astype(np.float64) + s[1:]) / 2).astype(np.float32)
    mu = mids.view(np.uint32)
    edge = np.float32([65519.99, 65520, 65520.01, 1e6, np.inf, -np.inf, np.nan, 3.4e38,
                       1e-45, -1e-45, 2**-25, 2**-24, -0.0, 0.0])
    return np.concatenate([x, s, mids, (mu + 1).view(np.float32), (mu - 1).view(np.float32), edge])


def test_f16_encode_matches_numpy_cast():
    x = _f16_test_inputs(np.random.default_rng(5), 1 << 20)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16)
    got = wire._f32_to_f16(x, clamp=65536.0)  # clamp=65536: exactly like a plain cast
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], ref.view(np.uint16)[~nan])
    # no clamp: valid for inputs without inf and below 65520 in magnitude (NaN ok)
    y = x[~(np.abs(x) >= 65520)]
    got = wire._f32_to_f16(y)
    with np.errstate(all="ignore"):
        ref = y.astype(np.float16)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], ref.view(np.uint16)[~nan])
    # saturating
    got = wire._f32_to_f16(x, clamp=F16_MAX).astype(np.float32)
    with np.errstate(all="ignore"):
        ref = np.clip(x, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, ref)


def test_f16_encode_chunking(monkeypatch):
    monkeypatch.setattr(wire, "_CHUNK", 1000)
    wire._const.cache_clear()
    try:
        x = hidden(7, 333, scale=100.0)
        np.testing.assert_array_equal(
            wire._f32_to_f16(x).view(np.uint16), x.astype(np.float16).view(np.uint16)
        )
        x[3, 3] = 1e6
        _, arrs = decode_frame(encode_frame({}, {"h": x}))
        assert row_rel_err(arrs["h"], x).max() <= 2**-11
    finally:
        wire._const.cache_clear()


# --------------------------------------------------------------------------- helpers


def test_validate_hidden():
    validate_hidden(np.zeros((3, 128), np.float32), 3, 128)
    validate_hidden(np.zeros((0, 16), np.float16), 0, 16)
    msg = r"hidden state shape \(3, 64\) does not match expected \(3, 128\)"
    with pytest.raises(FrameError, match=msg):
        validate_hidden(np.zeros((3, 64), np.float32), 3, 128)
    with pytest.raises(FrameError, match=r"hidden state shape \(384,\) does not match"):
        validate_hidden(np.zeros(384, np.float32), 3, 128)
    with pytest.raises(FrameError, match="not floating point"):
        validate_hidden(np.zeros((3, 128), np.int32), 3, 128)
    with pytest.raises(FrameError, match="must be a numpy array"):
        validate_hidden([[0.0]], 1, 1)


def test_codec_bytes_per_value():
    assert [codec_bytes_per_value(c) for c in CODECS] == [2.0, 4.0, 1.0, 2.0]
    with pytest.raises(FrameError, match="unknown codec 'bf16'"):
        codec_bytes_per_value("bf16")
    x = hidden(16, 256)
    for c in ("f16", "f32", "f16-clamp"):
        data = encode_frame({}, {"h": x}, codec=c)
        hlen = struct.unpack_from("<I", data, 4)[0]
        assert len(data) - 8 - hlen == x.size * codec_bytes_per_value(c)
    data = encode_frame({}, {"h": x}, codec="int8")
    hlen = struct.unpack_from("<I", data, 4)[0]
    assert len(data) - 8 - hlen == x.size * codec_bytes_per_value("int8") + 4 * 16


def test_speed_f16_64x4096():
    """Loose guard (shared CI machines are noisy): encode+decode well below 10 ms."""
    x = hidden(64, 4096)
    x[5, 9] = 1e5
    encode_frame({}, {"h": x})
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        data = encode_frame({"i": 1}, {"h": x})
        decode_frame(data)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.01


def test_ggml_f16_converters_are_bit_identical_to_numpy():
    """The codec converts with ggml's SIMD converters when llama.cpp's CPU library is found; they must give
    numpy's bits: every float16 value decoded, and encodes of every float16 value, every halfway point
    between neighbours (round to nearest even) and its float32 neighbours, at lengths that end in a
    scalar tail."""
    import llama_cpp  # noqa: F401 - the library whose converters are used

    from molink_lite.wire import codec

    if codec._ggml() is None:
        pytest.skip("no ggml CPU library with converters next to the loaded llama library")
    allh = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got, want = codec._f16_to_f32(allh), allh.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    fin = np.unique(want[np.isfinite(want)].astype(np.float64))
    mid = ((fin[1:] + fin[:-1]) / 2).astype(np.float32)
    x = np.concatenate([fin.astype(np.float32), mid, np.nextafter(mid, np.float32(np.inf)),
                        np.nextafter(mid, np.float32(-np.inf))])
    x = x[np.abs(x) < 65520]
    for n in (1, 7, 8, 9, 15, 17, 33, x.size):
        y = codec._f32_to_f16(x[:n].copy())
        assert np.array_equal(y.view(np.uint16), x[:n].astype(np.float16).view(np.uint16)), n
