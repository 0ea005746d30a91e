"""Fast GGUF header reader: metadata and tensor table without decoding big arrays.

gguf.GGUFReader builds a Python object per vocabulary entry (10 s for a 262k-token
vocabulary); stages only need the small keys, the raw byte span of each key and
the tensor table, so this reader skips string arrays and decodes values lazily.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(13)
SCALAR_DTYPES = {T_UINT8: "<u1", T_INT8: "<i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4", T_INT32: "<i4",
                 T_FLOAT32: "<f4", T_BOOL: "?", T_UINT64: "<u8", T_INT64: "<i8", T_FLOAT64: "<f8"}
# ggml type -> (block size, bytes per block)
GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
              10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
              16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
              22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
              29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17)}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass
class Field:
    key: str
    offset: int       # absolute offset of the key-value record
    size: int         # byte size of the whole record
    vtype: int
    sub_type: Optional[int]
    count: int        # number of array elements (1 for scalars)
    value_offset: int


@dataclass
class TensorInfo:
    name: str
    ne: Tuple[int, ...]
    ggml_type: int
    offset: int       # absolute offset of the data in the file
    nbytes: int


class GGUFFile:
    """Parsed GGUF header: ``fields`` by key (file order), ``tensors`` in file order."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                self._buf = f.read(_header_bytes(f))
        except FileNotFoundError:
            raise GGUFFormatError(f"model file not found: {path}") from None
        self.fields: Dict[str, Field] = {}
        self.tensors: List[TensorInfo] = []
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, KeyError) as e:
            raise GGUFFormatError(f"{path} is not a valid GGUF file ({e})") from None

    # -- parsing
    def _parse(self) -> None:
        b = self._buf
        if b[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path} is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {version}")
        off = 24
        for _ in range(n_kv):
            start = off
            klen, = struct.unpack_from("<Q", b, off)
            key = b[off + 8: off + 8 + klen].decode("utf-8")
            off += 8 + klen
            vtype, = struct.unpack_from("<I", b, off)
            off += 4
            voff = off
            sub, count = None, 1
            if vtype == T_ARRAY:
                sub, count = struct.unpack_from("<IQ", b, off)
                off += 12
                if sub == T_STRING:
                    for _ in range(count):
                        n, = struct.unpack_from("<Q", b, off)
                        off += 8 + n
                else:
                    off += count * np.dtype(SCALAR_DTYPES[sub]).itemsize
            elif vtype == T_STRING:
                n, = struct.unpack_from("<Q", b, off)
                off += 8 + n
            else:
                off += np.dtype(SCALAR_DTYPES[vtype]).itemsize
            self.fields[key] = Field(key, start, off - start, vtype, sub, count, voff)
        align = int(self.value("general.alignment", 32))
        infos = []
        for _ in range(n_tensors):
            nlen, = struct.unpack_from("<Q", b, off)
            name = b[off + 8: off + 8 + nlen].decode("utf-8")
            off += 8 + nlen
            nd, = struct.unpack_from("<I", b, off)
            ne = struct.unpack_from(f"<{nd}Q", b, off + 4)
            off += 4 + 8 * nd
            gtype, toff = struct.unpack_from("<IQ", b, off)
            off += 12
            infos.append((name, tuple(int(x) for x in ne), gtype, toff))
        data_start = off + (align - off % align) % align
        for name, ne, gtype, toff in infos:
            if gtype not in GGML_BLOCK:
                raise GGUFFormatError(f"{self.path}: tensor {name} has unknown ggml type {gtype}")
            bs, ts = GGML_BLOCK[gtype]
            n = int(np.prod(ne, dtype=np.int64)) if ne else 1
            self.tensors.append(TensorInfo(name, ne, gtype, data_start + toff, n // bs * ts))
        self.data_start = data_start
        self.alignment = align

    # -- access
    def raw(self, key: str) -> bytes:
        """The exact bytes of a key-value record, for copying it unchanged."""
        f = self.fields[key]
        return self._buf[f.offset: f.offset + f.size]

    def value(self, key: str, default: object = None) -> object:
        """Decoded value (arrays as lists; string arrays are decoded too, so avoid them for vocabularies)."""
        f = self.fields.get(key)
        if f is None:
            return default
        b, off = self._buf, f.value_offset
        if f.vtype == T_STRING:
            n, = struct.unpack_from("<Q", b, off)
            return b[off + 8: off + 8 + n].decode("utf-8")
        if f.vtype == T_ARRAY:
            off += 12
            if f.sub_type == T_STRING:
                out = []
                for _ in range(f.count):
                    n, = struct.unpack_from("<Q", b, off)
                    out.append(b[off + 8: off + 8 + n].decode("utf-8"))
                    off += 8 + n
                return out
            return np.frombuffer(b, dtype=SCALAR_DTYPES[f.sub_type], count=f.count, offset=off).tolist()
        return np.frombuffer(b, dtype=SCALAR_DTYPES[f.vtype], count=1, offset=off).tolist()[0]

    def read_tensor_bytes(self, t: TensorInfo) -> bytes:
        """A tensor's data as stored (any ggml type)."""
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise GGUFFormatError(f"{t.name}: the file ends inside its data")
        return data

    def read_tensor_f32(self, t: TensorInfo) -> np.ndarray:
        """Read an F32 tensor's data (numpy order)."""
        if t.ggml_type != 0:
            raise GGUFFormatError(f"{t.name} is not F32")
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            return np.frombuffer(f.read(t.nbytes), dtype="<f4").reshape(tuple(reversed(t.ne)))


def _header_bytes(f) -> int:
    """Read the file prefix holding the header; grows until the header parses (tensor data is not read)."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    # Header of a GGUF with a 262k vocabulary is ~6 MB; read generously but not the weights.
    want = min(size, 64 * 1024 * 1024)
    probe = f.read(min(size, 24))
    if len(probe) < 24:
        raise GGUFFormatError("file too small to be GGUF")
    f.seek(0)
    return want
