"""Images between the gateway and a first stage that holds a vision projector (``molink-lite stage --mmproj``).

The gateway never runs the projector (it loads no llama.cpp). For a chat message with an image it sends the
image's bytes to the first stage (:class:`MediaPut`, frame ``media``); the stage checks the image's header
(:func:`sniff_image`), decodes and encodes it with llama.cpp's ``mtmd`` library, keeps the embedding rows under
the image's id (SHA-256 of its bytes, 32 hex digits) and answers with the image's :class:`MediaLayout`: the
text tokens mtmd puts around it (Qwen2-VL's ``<|vision_start|>`` / ``<|vision_end|>``), how many rows it takes,
how many positions (an M-RoPE image of nx x ny tokens advances the position by max(nx, ny)) and each row's 4
M-RoPE positions relative to the image's start.

The gateway then writes the image into the prompt as rows of token id -1 (:data:`IMAGE_TOKEN`), and a step that
carries them names the image (``StepFrame.media``) so that the first stage feeds its stored rows there; every
row of such a sequence carries its 4 positions (``StepFrame.mpos``) to every stage. Pure Python: both sides
import it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace
from typing import List, Sequence, Tuple

import numpy as np

from .protocol import MAX_MEDIA_ROWS, MEDIA, ProtocolError, is_media_id

IMAGE_TOKEN = -1            # the token id of an image's rows in a step's tokens (the first stage feeds its rows)
MAX_IMAGE_SIDE = 16384      # pixels: a larger header is refused before anything decodes it
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_ROWS = MAX_MEDIA_ROWS  # rows one image may take (its layout is checked against this on the gateway)
MEDIA_STORE_BYTES = 64 << 20     # a first stage keeps this much of encoded images' rows (least recently used out)
VISION_COMPUTE_BYTES = 256 << 20  # the vision encoder's compute buffers, as placement counts them


def projector_bytes(path: str) -> int:
    """Memory a vision projector adds to the first stage (placement): its weights (the GGUF's size), the encoder's
    compute buffers and the stored images' rows."""
    import os

    return os.path.getsize(path) + VISION_COMPUTE_BYTES + MEDIA_STORE_BYTES


def text_pos4(p: np.ndarray) -> np.ndarray:
    """4 positions per row for rows at 1-D positions ``p``: (p, p, p, 0), as llama.cpp expands a text token's
    position for M-RoPE (and as an image of a 1-D model takes one position per row)."""
    p = np.asarray(p, dtype=np.int32)
    out = np.zeros((p.shape[0], 4), dtype=np.int32)
    out[:, 0] = out[:, 1] = out[:, 2] = p
    return out


def media_id(data: bytes) -> str:
    """An image's id: the first 32 hex digits of the SHA-256 of its bytes (the same image has one id everywhere)."""
    return hashlib.sha256(data).hexdigest()[:32]


def sniff_image(data: bytes) -> Tuple[str, int, int]:
    """(format, width, height) from an image's header: PNG, JPEG, GIF or BMP (what llama.cpp's image decoder
    reads). :class:`ProtocolError` for anything else, a truncated header, or a size over the limits (so that a
    small file cannot ask the decoder for gigabytes)."""
    fmt, w, h = _header(data)
    if w <= 0 or h <= 0:
        raise ProtocolError(f"the {fmt} image says it is {w}x{h} pixels")
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise ProtocolError(f"the {fmt} image is {w}x{h} pixels; at most {MAX_IMAGE_SIDE} a side and "
                            f"{MAX_IMAGE_PIXELS} in all are taken")
    return fmt, w, h


def _header(d: bytes) -> Tuple[str, int, int]:
    if d[:8] == b"\x89PNG\r\n\x1a\n":
        if len(d) < 24 or d[12:16] != b"IHDR":
            raise ProtocolError("a truncated PNG image")
        w, h = struct.unpack(">II", d[16:24])
        return "PNG", w, h
    if d[:6] in (b"GIF87a", b"GIF89a"):
        if len(d) < 10:
            raise ProtocolError("a truncated GIF image")
        w, h = struct.unpack("<HH", d[6:10])
        return "GIF", w, h
    if d[:2] == b"BM":
        if len(d) < 26:
            raise ProtocolError("a truncated BMP image")
        w, h = struct.unpack("<ii", d[18:26])
        return "BMP", abs(w), abs(h)
    if d[:2] == b"\xff\xd8":
        return ("JPEG",) + _jpeg_size(d)
    raise ProtocolError("the image is not PNG, JPEG, GIF or BMP")


def _jpeg_size(d: bytes) -> Tuple[int, int]:
    i = 2
    while i + 4 <= len(d):
        if d[i] != 0xFF:
            raise ProtocolError("a malformed JPEG image")
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        seg = struct.unpack(">H", d[i + 2:i + 4])[0]
        if seg < 2:
            raise ProtocolError("a malformed JPEG image")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > len(d):
                break
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return w, h
        i += 2 + seg
    raise ProtocolError("a truncated JPEG image (no frame header)")


@dataclass(frozen=True)
class MediaPut:
    """``media``: an image's bytes (array ``data``, uint8) for the first stage's projector."""

    data: bytes

    def to_wire(self) -> Tuple[dict, dict]:
        return {"type": MEDIA}, {"data": np.frombuffer(self.data, dtype=np.uint8)}

    @classmethod
    def decode(cls, arrays: dict, max_bytes: int) -> "MediaPut":
        a = arrays.get("data")
        if a is None or a.ndim != 1 or a.dtype != np.uint8:
            raise ProtocolError("a 'media' frame carries the image as a 1-D uint8 array 'data'")
        if a.shape[0] > max_bytes:
            raise ProtocolError(f"the image is {a.shape[0]} bytes; this stage takes at most {max_bytes}")
        data = a.tobytes()
        sniff_image(data)
        return cls(data)


@dataclass(frozen=True)
class MediaLayout:
    """Where an image goes in a prompt: ``before`` / ``after`` (text tokens mtmd puts around it), ``rows`` (its
    embedding rows), ``n_pos`` (positions it advances), ``rel`` (int32 [rows, 4]: each row's (t, y, x, z)
    relative to the image's first position; absolute = rel + (p0, p0, p0, 0))."""

    id: str
    before: Tuple[int, ...]
    rows: int
    n_pos: int
    rel: np.ndarray
    after: Tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        """Prompt rows the image takes, with the text tokens around it."""
        return len(self.before) + self.rows + len(self.after)

    def to_wire(self) -> dict:
        return {"type": MEDIA, "id": self.id, "before": list(self.before), "rows": self.rows, "n_pos": self.n_pos,
                "rel": self.rel.astype(np.int32).reshape(-1).tolist(), "after": list(self.after)}

    @classmethod
    def decode(cls, meta: dict, n_vocab: int) -> "MediaLayout":
        """A stage's answer, checked (the gateway trusts its stages' identity, not their arithmetic)."""
        mid, rows, n_pos = meta.get("id"), meta.get("rows"), meta.get("n_pos")
        if not is_media_id(mid):
            raise ProtocolError("a media layout needs the image's id")
        if not (isinstance(rows, int) and not isinstance(rows, bool) and 1 <= rows <= MAX_IMAGE_ROWS):
            raise ProtocolError(f"a media layout's rows must be in 1..{MAX_IMAGE_ROWS}")
        if not (isinstance(n_pos, int) and not isinstance(n_pos, bool) and 1 <= n_pos <= rows):
            raise ProtocolError("a media layout's n_pos must be in 1..rows")
        rel = meta.get("rel")
        if (not isinstance(rel, list) or len(rel) != 4 * rows
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_IMAGE_ROWS for v in rel)):
            raise ProtocolError("a media layout's rel must hold 4 small positions per row")
        tok = []
        for k in ("before", "after"):
            t = meta.get(k)
            if (not isinstance(t, list) or len(t) > 16
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_vocab for v in t)):
                raise ProtocolError(f"a media layout's '{k}' must be at most 16 token ids")
            tok.append(tuple(t))
        return cls(mid, tok[0], rows, n_pos, np.asarray(rel, dtype=np.int32).reshape(rows, 4), tok[1])


@dataclass(frozen=True)
class MediaPlan:
    """A prompt's images as the gateway schedules them: ``spans`` (start, stop) of each image's rows in the
    prompt, ``ids``, and ``mpos`` (int32 [prompt rows, 4]: every prompt row's M-RoPE positions; text rows
    (p, p, p, 0)); rows past the prompt (generated tokens) sit at ``shift`` positions from their index."""

    spans: Tuple[Tuple[int, int], ...]
    ids: Tuple[str, ...]
    mpos: np.ndarray
    shift: int
    mrope: bool = True    # the model takes 4 positions per row (else image rows take one position each: no mpos)
    non_causal: bool = False   # each image goes in a step of its own, decoded with causal attention off (Gemma 3)
    data: Tuple[bytes, ...] = field(default=(), repr=False, compare=False)   # the images (sent again on a replay)

    def positions(self, a: int, b: int) -> np.ndarray:
        """The 4 positions of rows a..b-1 (prompt or generated)."""
        n_p = int(self.mpos.shape[0])
        out = np.empty((b - a, 4), dtype=np.int32)
        k = max(0, min(b, n_p) - a)
        if k:
            out[:k] = self.mpos[a:a + k]
        if b > n_p:
            out[k:] = text_pos4(np.arange(max(a, n_p), b, dtype=np.int32) + self.shift)
        return out

    def cut(self, a: int, take: int) -> int:
        """How many prompt rows from row ``a`` a step may carry, at most ``take``: an image goes whole and alone
        (its rows, one batch on every stage, as llama.cpp's mtmd helper decodes it), text stops at the next
        image. 0 when the image at ``a`` does not fit in ``take``."""
        for s, e in self.spans:
            if a < s:
                return min(take, s - a)
            if a == s:
                return e - s if e - s <= take else 0
        return take

    def at_image(self, a: int) -> bool:
        """Row ``a`` is an image's first row."""
        return any(s == a for s, _ in self.spans)

    @property
    def largest(self) -> int:
        """Rows of the largest image (0: none)."""
        return max((e - s for s, e in self.spans), default=0)

    def images_in(self, a: int, b: int) -> List[str]:
        """Ids of the images whose rows lie in rows a..b-1 (whole images, as :meth:`cut` makes steps)."""
        return [i for (s, e), i in zip(self.spans, self.ids) if a <= s < b]


def plan_media(pieces: Sequence[np.ndarray], layouts: Sequence[MediaLayout], mrope: bool,
               non_causal: bool = False) -> Tuple[np.ndarray, MediaPlan]:
    """The prompt of text ``pieces`` (token arrays) with an image between each two (``layouts``; len(pieces) ==
    len(layouts) + 1): its tokens (:data:`IMAGE_TOKEN` at image rows) and :class:`MediaPlan`. Positions follow
    mtmd (``mtmd_helper_eval_chunks``): text rows one position each; an image's rows at rel + its first
    position (M-RoPE) or one each; the text after an image goes on at its first position + ``n_pos``."""
    if len(pieces) != len(layouts) + 1:
        raise ValueError("one more text piece than images")
    toks: List[np.ndarray] = []
    pos: List[np.ndarray] = []
    spans: List[Tuple[int, int]] = []
    row = p = 0

    def text(t: Sequence[int]) -> None:
        nonlocal row, p
        n = len(t)
        if n:
            toks.append(np.asarray(t, dtype=np.int32))
            pos.append(text_pos4(np.arange(p, p + n)))
        row += n
        p += n

    for i, piece in enumerate(pieces):
        text(piece)
        if i == len(layouts):
            break
        lay = layouts[i]
        text(lay.before)
        toks.append(np.full(lay.rows, IMAGE_TOKEN, dtype=np.int32))
        if mrope:
            r = lay.rel.astype(np.int32).copy()
            r[:, :3] += p
        else:
            r = text_pos4(np.arange(p, p + lay.rows))
        pos.append(r)
        spans.append((row, row + lay.rows))
        row += lay.rows
        p += lay.n_pos if mrope else lay.rows
        text(lay.after)
    tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    mpos = np.concatenate(pos) if pos else np.zeros((0, 4), np.int32)
    return tokens, MediaPlan(tuple(spans), tuple(lay.id for lay in layouts), mpos, p - row, mrope, non_causal)


def with_data(plan: MediaPlan, data: Sequence[bytes]) -> MediaPlan:
    """``plan`` holding the images' bytes (a pipeline the request moves to is sent them again)."""
    return replace(plan, data=tuple(data))
