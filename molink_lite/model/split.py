"""Partial GGUF writer: one GGUF per stage, holding only that stage's layers.

The file is written byte for byte: unchanged metadata is copied as raw byte ranges
of the source file, tensor data is copied without decoding (quantized blocks stay
as they are), and only the keys and tensors a stage needs changed are re-encoded.
Results are cached by model fingerprint + layer range.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .archs import PER_LAYER_KEYS, SplitContext, UnsupportedArchitecture, rule_for
from .gguf_meta import GGUFFile, GGUFFormatError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
SPLIT_FORMAT = 3  # bump when the stage GGUF content changes: old cache entries are then ignored
PROGRESS_MIN_BYTES = 256 * 1024 * 1024
_COPY_CHUNK = 16 * 1024 * 1024
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGUF value types
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(13)
_SCALAR_FMT = {T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
               T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d"}
GGML_TYPE_F32 = 0


class SplitError(ValueError):
    """A layer range or model that cannot be split, with a message saying why."""


@dataclass(frozen=True)
class LayerRange:
    """Half-open range of absolute layer indices [start, stop)."""

    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.start}-{self.stop - 1}"

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ModelInfo:
    """Identity and shape of a whole GGUF model."""

    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    fingerprint: str
    name: str


# ---------------------------------------------------------------- ranges

def parse_range(text: str) -> LayerRange:
    """Parse ``"a-b"`` (inclusive, like the CLI) or ``"a"`` into a :class:`LayerRange`."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise SplitError(f"bad layer range '{text}': expected 'first-last', e.g. '0-8'")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise SplitError(f"bad layer range '{text}': last layer {b} is before first layer {a} (empty range)")
    return LayerRange(a, b + 1)


def parse_ranges(text: str, n_layer: Optional[int] = None, *, tile: bool = True) -> List[LayerRange]:
    """Parse ``"0-8,9-17"``; check bounds, overlaps and gaps (``tile``: must cover all layers)."""
    parts = [p for p in text.split(",")]
    if not parts or any(not p.strip() for p in parts):
        raise SplitError(f"bad layer ranges '{text}': empty entry")
    ranges = [parse_range(p) for p in parts]
    check_ranges(ranges, n_layer, tile=tile)
    return ranges


def check_ranges(ranges: Sequence[LayerRange], n_layer: Optional[int], *, tile: bool = True) -> None:
    """Raise :class:`SplitError` for out-of-bounds, overlapping, or (when ``tile``) gapped ranges."""
    if not ranges:
        raise SplitError("no layer ranges given")
    for r in ranges:
        if r.n <= 0:
            raise SplitError(f"layer range {r} is empty")
        if n_layer is not None and r.stop > n_layer:
            raise SplitError(f"layer range {r} is out of bounds: the model has {n_layer} layers (0-{n_layer - 1})")
    ordered = sorted(ranges, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise SplitError(f"layer ranges {a} and {b} overlap")
        if tile and b.start > a.stop:
            raise SplitError(f"gap between layer ranges {a} and {b}: layers {a.stop}-{b.start - 1} are not served")
    if tile and n_layer is not None:
        if ordered[0].start != 0:
            raise SplitError(f"layers 0-{ordered[0].start - 1} are not served: the first range must start at 0")
        if ordered[-1].stop != n_layer:
            raise SplitError(f"layers {ordered[-1].stop}-{n_layer - 1} are not served: the last range must end at {n_layer - 1}")


def even_ranges(n_layer: int, n_stages: int) -> List[LayerRange]:
    """Split ``n_layer`` layers into ``n_stages`` contiguous ranges of near-equal size."""
    if n_stages < 1 or n_stages > n_layer:
        raise SplitError(f"cannot split {n_layer} layers into {n_stages} stages")
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return [LayerRange(a, b) for a, b in zip(bounds, bounds[1:])]


SPLIT_POLICIES = ("balanced", "even")


def plan_ranges(path: str | os.PathLike, n_stages: int, policy: str = "balanced") -> List[LayerRange]:
    """Layer ranges for ``n_stages`` stages: ``balanced`` (by compute, LM head counted) or ``even`` (by count)."""
    if policy == "even":
        return even_ranges(read_model_info(path).n_layer, n_stages)
    if policy == "balanced":
        return balanced_ranges(path, n_stages)
    raise SplitError(f"unknown split policy {policy!r}: choose from {', '.join(SPLIT_POLICIES)}")


def stage_costs(path: str | os.PathLike) -> Tuple[List[int], int]:
    """Compute proxies read from a GGUF: weight elements of each layer, and of the LM head (last stage).

    The LM head (``output.weight``, or the tied ``token_embd.weight``) is multiplied by every output row,
    so it costs like a layer; for small models with big vocabularies it outweighs all layers together.
    """
    r = _reader(path)
    info = read_model_info(path, r)
    layers = [0] * info.n_layer
    head = tied = 0
    for t in r.tensors:
        m = _BLK.match(t.name)
        n = int(math.prod(t.ne))
        if m:
            il = int(m.group(1))
            if 0 <= il < info.n_layer:
                layers[il] += n
        elif t.name == "output.weight":
            head = n
        elif t.name == "token_embd.weight":
            tied = n
    return layers, head or tied


def balanced_ranges(path: str | os.PathLike, n_stages: int) -> List[LayerRange]:
    """Contiguous ranges minimizing the largest stage cost (:func:`stage_costs`, LM head on the last stage).

    With stages computing in parallel (micro-batches), throughput is set by the slowest stage; an even
    split by layer count leaves the last stage, which also runs the LM head, the bottleneck.
    """
    layers, head = stage_costs(path)
    if n_stages < 1 or n_stages > len(layers):
        raise SplitError(f"cannot split {len(layers)} layers into {n_stages} stages")
    bounds = _balanced_bounds(layers, head, n_stages)
    return [LayerRange(a, b) for a, b in zip(bounds, bounds[1:])]


def _balanced_bounds(layers: List[int], head: int, k: int) -> List[int]:
    """Stage boundaries: the smallest possible largest stage (binary search on it), the last stage as
    large as that allows, then the layers before it balanced the same way among the other stages."""
    n = len(layers)
    prefix = [0]
    for c in layers:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (head if b == n else 0)

    def fits(limit: int) -> bool:  # greedy from the end: fewest stages with every stage <= limit
        stages, b = 0, n
        while b > 0:
            a = b - 1
            if cost(a, b) > limit:
                return False
            while a > 0 and cost(a - 1, b) <= limit:
                a -= 1
            stages, b = stages + 1, a
        return stages <= k

    lo, hi = max(cost(i, i + 1) for i in range(n)), cost(0, n)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    if k == 1:
        return [0, n]
    start = n - 1
    while start > k - 1 and cost(start - 1, n) <= lo:
        start -= 1
    return _balanced_bounds(layers[:start], 0, k - 1) + [n]


# ---------------------------------------------------------------- model identity

def fingerprint(path: str | os.PathLike) -> str:
    """Fast content fingerprint: sha256 of the size and three 4 MiB samples (head, middle, tail)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    block = 4 * 1024 * 1024
    with open(p, "rb") as f:
        for off in (0, max(0, size // 2 - block // 2), max(0, size - block)):
            f.seek(off)
            h.update(f.read(block))
    return h.hexdigest()[:16]


def _reader(path: str | os.PathLike) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise SplitError(str(e)) from None


def _metadata(reader: GGUFFile, arch: str) -> Dict[str, object]:
    """Values of the small metadata keys (arch-prefixed and general.*), not the tokenizer arrays."""
    return {key: reader.value(key) for key in reader.fields
            if key.startswith(arch + ".") or key.startswith("general.") or key.startswith("molink.")}


def read_model_info(path: str | os.PathLike, reader: Optional[GGUFFile] = None) -> ModelInfo:
    """Architecture, layer count, width, vocabulary size and fingerprint of a GGUF model."""
    r = reader if reader is not None else _reader(path)
    if "general.architecture" not in r.fields:
        raise SplitError(f"{path}: no general.architecture key")
    arch = str(r.value("general.architecture"))
    meta = _metadata(r, arch)
    if f"{arch}.block_count" not in meta:
        raise SplitError(f"{path}: no {arch}.block_count key")
    # NextN (multi-token prediction) blocks are counted in block_count but not run: stages drop them
    n_layer = int(meta[f"{arch}.block_count"]) - int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    n_vocab = meta.get(f"{arch}.vocab_size")
    if n_vocab is None and "tokenizer.ggml.tokens" in r.fields:
        n_vocab = r.fields["tokenizer.ggml.tokens"].count
    return ModelInfo(
        path=str(path), arch=arch, n_layer=n_layer,
        n_embd=int(meta.get(f"{arch}.embedding_length", 0)), n_vocab=int(n_vocab or 0),
        fingerprint=str(meta.get("molink.source_fingerprint") or fingerprint(path)),
        name=str(meta.get("general.name", Path(path).stem)),
    )


# ---------------------------------------------------------------- GGUF encoding

def _pack_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _pack_scalar(vtype: int, value: object) -> bytes:
    if vtype == T_STRING:
        return _pack_str(value)  # type: ignore[arg-type]
    return struct.pack(_SCALAR_FMT[vtype], value)


def _pack_kv(key: str, vtype: int, value: object, sub_type: Optional[int] = None) -> bytes:
    out = _pack_str(key) + struct.pack("<I", vtype)
    if vtype == T_ARRAY:
        assert sub_type is not None
        values = list(value)  # type: ignore[call-overload]
        out += struct.pack("<IQ", sub_type, len(values))
        if sub_type == T_STRING:
            out += b"".join(_pack_str(v) for v in values)
        else:
            out += np.asarray(values, dtype=np.dtype(_SCALAR_FMT[sub_type])).tobytes()
        return out
    return out + _pack_scalar(vtype, value)


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


@dataclass
class _OutTensor:
    name: str
    ne: Tuple[int, ...]      # ggml order
    ggml_type: int
    nbytes: int
    src_offset: Optional[int] = None   # absolute offset in the source file to copy from
    data: Optional[bytes] = None       # replacement bytes


# ---------------------------------------------------------------- the writer

def plan_stage(path: str | os.PathLike, layers: LayerRange, reader: Optional[GGUFFile] = None, *,
               keep_head: bool = False) -> Tuple[List[bytes], List[_OutTensor], int]:
    """Work out the metadata and tensors of a stage GGUF (no file is written). ``keep_head``: a first stage that
    keeps the output head and says it is a whole model of ``layers.stop`` layers (a draft made from the model)."""
    r = reader if reader is not None else _reader(path)
    info = read_model_info(path, r)
    arch = info.arch
    try:
        rule = rule_for(arch)
    except UnsupportedArchitecture as e:
        raise SplitError(f"{path}: {e}") from None
    check_ranges([layers], info.n_layer, tile=False)
    meta = _metadata(r, arch)
    ctx = SplitContext(arch=arch, n_layer=info.n_layer, start=layers.start, stop=layers.stop, meta=meta,
                       n_vocab=info.n_vocab)
    middle_vocab = not ctx.is_first and not ctx.is_last
    refusal = rule.refusal(ctx)
    if refusal:
        raise SplitError(f"cannot split layers {layers}: {refusal}")

    # --- metadata
    overrides: Dict[str, Tuple[int, object, Optional[int]]] = {}
    overrides[f"{arch}.block_count"] = (T_UINT32, ctx.n_stage, None)
    n_block = int(r.value(f"{arch}.block_count"))
    if n_block != info.n_layer:  # NextN blocks (after the trunk's): not run, not kept
        overrides[f"{arch}.nextn_predict_layers"] = (T_UINT32, 0, None)
    for k in PER_LAYER_KEYS:
        key = f"{arch}.{k}"
        f = r.fields.get(key)
        if f is not None and f.vtype == T_ARRAY:
            vals = r.value(key)
            if len(vals) not in (info.n_layer, n_block):
                raise SplitError(f"{key} has {len(vals)} entries for {info.n_layer} layers")
            overrides[key] = (T_ARRAY, vals[layers.start:layers.stop], f.sub_type)
    if rule.swa is not None:
        pattern = rule.swa.layers(ctx)
        if pattern is not None:
            mine = pattern[layers.start:layers.stop]
            overrides[f"{arch}.attention.sliding_window_pattern"] = (T_ARRAY, mine, T_BOOL)
            if not any(mine):  # no SWA layer here: llama.cpp asserts on an SWA cache without SWA layers
                overrides[f"{arch}.attention.sliding_window"] = (T_UINT32, 0, None)
    if not ctx.is_first:
        for key, value in rule.later_stage_kv.items():
            k = f"{arch}.{key}"
            overrides[k] = (T_FLOAT32 if isinstance(value, float) else T_UINT32, value, None)
    for key, value in rule.stage_kv(ctx).items():
        k = f"{arch}.{key}"
        f = r.fields.get(k)
        if isinstance(value, list):  # a bool or int array (attention.recurrent_layers, rope.dimension_sections)
            overrides[k] = (T_ARRAY, value, T_BOOL if all(isinstance(v, bool) for v in value) else T_INT32)
            continue
        vtype = (f.vtype if f is not None and f.vtype != T_ARRAY else T_BOOL if isinstance(value, bool)
                 else T_FLOAT32 if isinstance(value, float) else T_UINT32)
        overrides[k] = (vtype, value, None)
    out_arch = rule.stage_arch(ctx) or arch
    if out_arch != arch:
        overrides["general.architecture"] = (T_STRING, out_arch, None)
        overrides["molink.source_arch"] = (T_STRING, arch, None)
        for key, value in rule.stage_arch_kv.items():
            overrides[f"{arch}.{key}"] = (T_FLOAT32 if isinstance(value, float) else T_UINT32, value, None)
    if middle_vocab:
        overrides[f"{arch}.vocab_size"] = (T_UINT32, 1, None)
        overrides["tokenizer.ggml.model"] = (T_STRING, "none", None)
    overrides["molink.source_fingerprint"] = (T_STRING, info.fingerprint, None)
    overrides["molink.source_name"] = (T_STRING, Path(path).stem, None)
    overrides["molink.layer_start"] = (T_UINT32, layers.start, None)
    overrides["molink.layer_stop"] = (T_UINT32, layers.stop, None)
    overrides["molink.n_layer_total"] = (T_UINT32, layers.stop if keep_head else info.n_layer, None)

    def renamed(key: str) -> str:  # "<arch>.x" -> "<out_arch>.x" for a stage written under another arch
        return out_arch + key[len(arch):] if out_arch != arch and key.startswith(arch + ".") else key

    kv: List[bytes] = []
    for key in r.fields:
        if middle_vocab and key.startswith("tokenizer."):
            continue
        if key in overrides:
            vtype, value, sub = overrides.pop(key)
            kv.append(_pack_kv(renamed(key), vtype, value, sub))
        elif renamed(key) != key:
            f = r.fields[key]
            kv.append(_pack_kv(renamed(key), f.vtype, r.value(key), f.sub_type))
        else:
            kv.append(r.raw(key))
    for key, (vtype, value, sub) in overrides.items():
        kv.append(_pack_kv(renamed(key), vtype, value, sub))

    # --- tensors
    tensors: List[_OutTensor] = []
    for t in r.tensors:
        ne = t.ne
        m = _BLK.match(t.name)
        if m:
            il = int(m.group(1))
            if not (layers.start <= il < layers.stop):
                continue
            name = f"blk.{il - layers.start}.{m.group(2)}"
        else:
            name = t.name
            if name.startswith("output.") and not ctx.is_last and not keep_head:
                if not rule.output_required:
                    continue
                if middle_vocab:  # one-row zero stand-in (vocab_size is 1 here)
                    n = 4 * math.prod(ne[:-1])
                    tensors.append(_OutTensor(name, (*ne[:-1], 1), GGML_TYPE_F32, n, data=bytes(n)))
                    continue
            if name == "token_embd.weight" and middle_vocab:
                tensors.append(_OutTensor(name, (ne[0], 1), GGML_TYPE_F32, 4 * ne[0], data=bytes(4 * ne[0])))
                continue
            if name in rule.first_stage_only and not ctx.is_first:
                continue
            if name in rule.zero_on_later_stages and not ctx.is_first:
                tensors.append(_OutTensor(name, ne, t.ggml_type, t.nbytes, data=bytes(t.nbytes)))
                continue
        out = _OutTensor(name, ne, t.ggml_type, t.nbytes, src_offset=t.offset)
        order_of = next((fn for suffix, fn in rule.row_orders.items() if name.endswith(suffix)), None)
        n_rows = math.prod(ne[1:]) if len(ne) > 1 else ne[0]
        order = order_of(ctx, name, n_rows) if order_of is not None else None
        if order is not None:   # whole rows move (a row is whole quantization blocks): any ggml type
            raw = np.frombuffer(r.read_tensor_bytes(t), dtype=np.uint8).reshape(n_rows, -1)
            out.data = np.ascontiguousarray(raw[np.asarray(order)]).tobytes()
        fix = next((fn for suffix, fn in rule.tensor_fixes.items() if name.endswith(suffix)), None)
        if fix is not None:
            if t.ggml_type != GGML_TYPE_F32:
                if fix(ctx, name, None) is None:
                    tensors.append(out)
                    continue
                raise SplitError(f"cannot split layers {layers}: the {arch} split rule rewrites {t.name} for "
                                 f"this layer range and needs it as F32, got ggml type {t.ggml_type}")
            fixed = fix(ctx, name, r.read_tensor_f32(t))
            if fixed is not None:
                out.data = np.ascontiguousarray(fixed, dtype=np.float32).tobytes()
        tensors.append(out)
    return kv, tensors, r.alignment


def _progress(total: int, label: str):
    if total < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)


def write_stage_gguf(path: str | os.PathLike, layers: LayerRange, dst: str | os.PathLike, *, reader: Optional[GGUFFile] = None,
                     keep_head: bool = False) -> Path:
    """Write the partial GGUF of ``layers`` to ``dst`` (atomically) and return its path."""
    r = reader if reader is not None else _reader(path)
    kv, tensors, align = plan_stage(path, layers, r, keep_head=keep_head)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    total = sum(t.nbytes for t in tensors)
    bar = _progress(total, f"layers {layers} -> {dst.name}")
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=str(dst.parent))
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            out.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv)))
            for b in kv:
                out.write(b)
            offset = 0
            for t in tensors:
                out.write(_pack_str(t.name) + struct.pack("<I", len(t.ne)))
                out.write(struct.pack(f"<{len(t.ne)}Q", *t.ne) + struct.pack("<IQ", t.ggml_type, offset))
                offset += t.nbytes + _pad(t.nbytes, align)
            out.write(bytes(_pad(out.tell(), align)))
            for t in tensors:
                if t.data is not None:
                    out.write(t.data)
                else:
                    _copy_range(src, out, t.src_offset or 0, t.nbytes, bar)
                out.write(bytes(_pad(t.nbytes, align)))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        if bar is not None:
            bar.close()
    return dst


def _copy_range(src: BinaryIO, out: BinaryIO, offset: int, n: int, bar) -> None:
    src.seek(offset)
    left = n
    while left > 0:
        chunk = src.read(min(_COPY_CHUNK, left))
        if not chunk:
            raise SplitError("source GGUF ended early while copying tensor data")
        out.write(chunk)
        left -= len(chunk)
        if bar is not None:
            bar.update(len(chunk))


def default_cache_dir() -> Path:
    """Where stage GGUFs are cached: $MOLINK_CACHE or ~/.cache/molink-lite."""
    env = os.environ.get("MOLINK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "molink-lite"


def stage_gguf(path: str | os.PathLike, layers: LayerRange, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Path of the stage GGUF for ``layers``, writing it on first use (cached by fingerprint + range)."""
    r = _reader(path)
    info = read_model_info(path, r)
    check_ranges([layers], info.n_layer, tile=False)
    if layers.start == 0 and layers.stop == info.n_layer:
        return Path(path)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = base / "splits" / f"v{SPLIT_FORMAT}" / info.fingerprint / f"{info.arch}-L{layers.start}-{layers.stop - 1}-of{info.n_layer}.gguf"
    if dst.exists():
        return dst
    return write_stage_gguf(path, layers, dst, reader=r)


def write_truncated_model(path: str | os.PathLike, n_layers: int, dst: str | os.PathLike) -> Path:
    """A whole model made of ``path``'s first ``n_layers`` layers and its output head (a draft model for
    speculative decoding: the same vocabulary by construction)."""
    info = read_model_info(path)
    if not 1 <= n_layers < info.n_layer:
        raise SplitError(f"a truncated model keeps 1..{info.n_layer - 1} of the {info.n_layer} layers, not {n_layers}")
    return write_stage_gguf(path, LayerRange(0, n_layers), dst, keep_head=True)


def split_model(path: str | os.PathLike, ranges: Iterable[LayerRange], out_dir: str | os.PathLike) -> List[Path]:
    """Write one stage GGUF per range into ``out_dir`` (the ranges must tile the model)."""
    r = _reader(path)
    info = read_model_info(path, r)
    ranges = list(ranges)
    check_ranges(ranges, info.n_layer, tile=True)
    stem = Path(path).stem
    return [write_stage_gguf(path, lr, Path(out_dir) / f"{stem}.L{lr.start}-{lr.stop - 1}.gguf", reader=r) for lr in ranges]
