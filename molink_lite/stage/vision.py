"""A first stage's vision projector (``molink-lite stage --mmproj``): llama.cpp's ``mtmd`` turns an image into
embedding rows for the text model, kept until a step feeds them (:class:`MediaStore`).

Only the first stage holds the projector: the image's rows enter the model there instead of token embeddings;
later stages see hidden states as for text, with each row's M-RoPE positions (``StepFrame.mpos``). What crosses
the wire is :mod:`molink_lite.wire.media`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np

from ..wire.media import MEDIA_STORE_BYTES, MediaLayout, media_id, sniff_image, text_pos4
from .engine import EngineError

log = logging.getLogger("molink_lite.stage.vision")


class Projector:
    """An ``mmproj`` GGUF loaded with mtmd next to the first stage's (partial) text model."""

    def __init__(self, path: str, model_ptr: ctypes.c_void_p, n_embd: int, *, use_gpu: bool, n_threads: int,
                 image_min_tokens: int = 0, image_max_tokens: int = 0):
        try:   # here, not at import: an engine build without mtmd still serves text
            from llama_cpp import mtmd_cpp as mtmd
        except (OSError, ImportError) as e:
            raise EngineError(f"this llama.cpp build has no multimodal library (mtmd), which --mmproj needs: {e} "
                              "(llama-cpp-python's own build has it; a --lib folder needs one built with the tools)"
                              ) from None
        self._mtmd = mtmd
        mp = mtmd.mtmd_context_params_default()
        mp.use_gpu = bool(use_gpu)
        mp.n_threads = int(n_threads)
        mp.print_timings = False
        mp.warmup = bool(use_gpu)   # warming up encodes a large image: minutes on a CPU
        if image_min_tokens:
            mp.image_min_tokens = int(image_min_tokens)
        if image_max_tokens:
            mp.image_max_tokens = int(image_max_tokens)
        self.path = str(path)
        self.ctx = mtmd.mtmd_init_from_file(self.path.encode(), model_ptr, mp)
        if not self.ctx:
            raise EngineError(f"could not load the vision projector {self.path} (an mmproj GGUF for this model?)")
        if not mtmd.mtmd_support_vision(self.ctx):
            self.close()
            raise EngineError(f"{self.path} holds no vision encoder")
        self.mrope = bool(mtmd.mtmd_decode_use_mrope(self.ctx))
        # Gemma 3: an image's rows attend to each other both ways (every stage decodes them with causal attention
        # off, in a step of their own)
        self.non_causal = bool(mtmd.mtmd_decode_use_non_causal(self.ctx, None))
        self.n_embd = int(n_embd)
        self.marker = mtmd.mtmd_default_marker()
        self._lock = threading.Lock()   # one image at a time through one mtmd context

    def describe(self) -> dict:
        return {"mrope": self.mrope, "non_causal": self.non_causal, "marker": self.marker.decode()}

    def encode(self, data: bytes) -> Tuple[MediaLayout, np.ndarray]:
        """The image's layout and its embedding rows (float32 [rows, n_embd]). :class:`EngineError` for an
        image mtmd cannot read or encode (after :func:`~molink_lite.wire.media.sniff_image` checked its size)."""
        sniff_image(data)
        with self._lock:
            if not self.ctx:
                raise EngineError("the vision projector was closed")
            return self._encode(data)

    def _encode(self, data: bytes) -> Tuple[MediaLayout, np.ndarray]:
        mtmd = self._mtmd
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(data), False)
        if not bitmap:
            raise EngineError("the image could not be decoded")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text(self.marker, len(self.marker), False, True)
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            if rc != 0:
                raise EngineError(f"mtmd could not lay out the image (mtmd_tokenize returned {rc})")
            before: list = []
            after: list = []
            image = None
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                ch = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                    (before if image is None else after).extend(int(ptr[j]) for j in range(n.value))
                elif image is None and mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    image = ch
                else:
                    raise EngineError("mtmd laid the image out as more than one image chunk")
            if image is None:
                raise EngineError("mtmd laid out no image chunk")
            rows = int(mtmd.mtmd_input_chunk_get_n_tokens(image))
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(image))
            rc = mtmd.mtmd_encode_chunk(self.ctx, image)
            if rc != 0:
                raise EngineError(f"the vision encoder failed (mtmd_encode_chunk returned {rc})")
            embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(rows, self.n_embd)).copy()
            if not np.isfinite(embd).all():
                raise EngineError("the vision encoder gave NaN or infinite rows")
            if self.mrope:
                it = mtmd.mtmd_input_chunk_get_tokens_image(image)
                raw = (mtmd.mtmd_decoder_pos * rows)()
                mtmd.mtmd_helper_image_get_decoder_pos(it, 0, raw)
                txyz = np.frombuffer(raw, dtype=np.uint32).reshape(rows, 4).astype(np.int32)
                rel = txyz[:, [0, 2, 1, 3]]   # (t, x, y, z) -> (t, y, x, z): llama.cpp's section order
            else:
                rel = text_pos4(np.arange(rows))
            return MediaLayout(media_id(data), tuple(before), rows, n_pos, rel, tuple(after)), embd
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        """Free the mtmd context (after an encode that is running now: it holds the lock)."""
        lock = getattr(self, "_lock", None)
        if lock is None:   # failed before the lock existed
            if getattr(self, "ctx", None):
                self._mtmd.mtmd_free(self.ctx)
                self.ctx = None
            return
        with lock:
            if self.ctx:
                self._mtmd.mtmd_free(self.ctx)
                self.ctx = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class MediaStore:
    """Encoded images by id, least recently used out first, at most ``max_bytes`` of rows. Shared by the
    event loop (puts) and the llama threads (reads)."""

    def __init__(self, max_bytes: int = MEDIA_STORE_BYTES):
        self.max_bytes = int(max_bytes)
        self._rows: "OrderedDict[str, Tuple[MediaLayout, np.ndarray]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats: Dict[str, int] = {"images_encoded": 0, "images_reused": 0, "images_evicted": 0}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def bytes(self) -> int:
        return self._bytes

    def layout(self, mid: str) -> Optional[MediaLayout]:
        with self._lock:
            got = self._rows.get(mid)
            if got is None:
                return None
            self._rows.move_to_end(mid)
            self.stats["images_reused"] += 1
            return got[0]

    def put(self, layout: MediaLayout, rows: np.ndarray) -> None:
        with self._lock:
            old = self._rows.pop(layout.id, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._rows[layout.id] = (layout, rows)
            self._bytes += rows.nbytes
            self.stats["images_encoded"] += 1
            while self._bytes > self.max_bytes and len(self._rows) > 1:
                _, (_, r) = self._rows.popitem(last=False)
                self._bytes -= r.nbytes
                self.stats["images_evicted"] += 1

    def rows(self, mid: str) -> Optional[np.ndarray]:
        with self._lock:
            got = self._rows.get(mid)
            return None if got is None else got[1]

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._bytes = 0
