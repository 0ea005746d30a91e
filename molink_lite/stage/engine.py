"""llama.cpp stage engine: tokens or hidden states in, hidden states or logits out, batched.

One :class:`StageEngine` runs one stage GGUF (see :mod:`molink_lite.model.split`). A step
takes the rows of many sequences at once (each row: sequence id, position, and a
token id on the first stage or a hidden-state row on later stages) and runs them
through one ``llama_decode``. Non-last stages hand on the output of their last layer
(``l_out-{n-1}``) and skip the LM head; the last stage returns next-token logits for the
rows asked for.

How a non-last stage gets its last layer's output (``StageEngine.stage_output``):

- ``"graph"``, with the project's engine patch (``kernels/patches/0001-stage-output.patch``,
  carried by its wheels and ``kernels/build.py``): llama.cpp's graph ends at ``l_out``, which is
  read back asynchronously like embeddings; no LM head, no logits buffer, no Python callback.
- ``"callback"``, with a pristine library (pip's source build): the scheduler's eval callback
  asks Python about every graph node, copies ``l_out`` out synchronously and stops the graph
  there. ``MOLINK_STAGE_OUTPUT=callback`` forces it on a patched library (for comparisons).

Both give the same rows, bit for bit (tests/test_kernels.py runs the split-exactness tests on a
patched build).

Device sampling (last stage, opt-in): every sequence slot whose sampler is plain
greedy gets a llama.cpp backend sampler chain (``llama_set_sampler``), so the argmax
runs in the same graph on the device and only the token ids come back
(``last_sampled``); llama.cpp then skips copying the logits of a batch whose output
rows all belong to such slots (33 MB per 64 rows at a 128k vocabulary). Other slots
(temperature, penalties) keep the raw logits path. Off by default: measured slower on
an H100 (BENCHMARKS_GPU.md), since llama.cpp builds one sampler subgraph per sequence.

Batches are filled from numpy arrays by pointer: no per-token Python loop.
"""

from __future__ import annotations

import llama_cpp  # noqa: I001 - must be imported before numpy (segfault on some CUDA builds)
import llama_cpp.llama_cpp as _llama

import ctypes
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..model.archs import RULES, SplitContext, prescale, rule_for, split_equal_order

from .libpath import ggml_function, llama_patch_function

# ggml's tensor functions, from ggml-base (ggml-base.dll, libggml-base.so, libggml-base.dylib), which exports them:
# Windows does not search a DLL's dependencies for a symbol (llama.dll exports no ggml_*)
_ggml_get_name = ggml_function("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p])
_ggml_nbytes = ggml_function("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p])
_ggml_backend_tensor_get = ggml_function("ggml_backend_tensor_get", None,
                                         [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t])
# the engine patch (kernels/patches/0001-stage-output.patch); None on a pristine library
_stage_output_fn = llama_patch_function("llama_molink_stage_output", ctypes.c_bool, [ctypes.c_void_p])

log = logging.getLogger(__name__)
_logged: set = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


_backend_lock = threading.Lock()
_backend_ready = False
_log_cb = None
GGML_TYPE_F32 = 0
_LOG_LEVEL_ERROR = 4
# A non-last stage marks every row as an output (so its last layer computes them all), and llama.cpp then
# reserves, clears and fills n_vocab floats per output row that nobody reads: 1 MiB per row for a 262k
# vocabulary, 512 MiB for a 512-row batch on a first stage (it keeps the tokenizer). Such stages decode in
# chunks small enough to keep that buffer under this size (at least 32 rows per chunk).
OUTPUT_BUFFER_BUDGET = 128 << 20


class EngineError(RuntimeError):
    """A stage could not be loaded or a batch could not be run; the message says why."""


def _init_backend() -> None:
    global _backend_ready, _log_cb
    with _backend_lock:
        if _backend_ready:
            return
        _llama.llama_backend_init()
        if not os.environ.get("MOLINK_LLAMA_LOG"):
            def _quiet(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                if level >= _LOG_LEVEL_ERROR and text:
                    os.write(2, text)
            _log_cb = _llama.llama_log_callback(_quiet)
            _llama.llama_log_set(_log_cb, ctypes.c_void_p())
        _backend_ready = True


def _meta(model: ctypes.c_void_p, key: str) -> Optional[str]:
    buf = ctypes.create_string_buffer(256)
    n = _llama.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode() if n >= 0 else None


@dataclass
class StageInfo:
    """What a loaded stage is: its layer range within the whole model and its shapes."""

    path: str
    arch: str
    layer_start: int
    layer_stop: int
    n_layer_total: int
    n_embd: int
    n_embd_inp: int
    n_vocab: int
    fingerprint: str
    name: str = ""
    # the whole model's architecture where the stage is written under another (archs.ArchRule.stage_arch)
    model_arch: str = ""

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_stop == self.n_layer_total


@dataclass
class StepTimes:
    """Accumulated time (seconds) spent in the engine, for benchmarks."""

    decode: float = 0.0
    capture: float = 0.0
    steps: int = 0
    rows: int = 0
    seqs_max: int = 0
    extra: Dict[str, float] = field(default_factory=dict)


class StageEngine:
    """Runs one stage GGUF with llama.cpp; many sequences per ``llama_decode``."""

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_seq_max: int = 16,
                 n_batch: int = 512, n_gpu_layers: int = 0, n_threads: Optional[int] = None,
                 flash_attn: Optional[bool] = None, device_sampling: bool = False, lanes: int = 1):
        _init_backend()
        self.path = str(model_path)
        # what a stage that released its model for being idle loads again with (StageServer.restore)
        self.init_kwargs = dict(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, n_gpu_layers=n_gpu_layers,
                                n_threads=n_threads, flash_attn=flash_attn, device_sampling=device_sampling,
                                lanes=lanes)
        if not Path(self.path).is_file():
            raise EngineError(f"stage model not found: {self.path}")
        if not 1 <= n_seq_max <= 256:
            raise EngineError(f"n_seq_max must be in 1..256, got {n_seq_max}")
        if not 1 <= int(lanes) <= min(8, n_seq_max):
            raise EngineError(f"lanes must be in 1..{min(8, n_seq_max)}, got {lanes}")
        self.lanes = int(lanes)
        mparams = _llama.llama_model_default_params()
        mparams.n_gpu_layers = int(n_gpu_layers)
        mparams.load_mode = _llama.LLAMA_LOAD_MODE_MMAP
        self._progress_cb = _llama.llama_progress_callback(lambda _p, _u: True)  # silence loader dots
        mparams.progress_callback = self._progress_cb
        self._model = _llama.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.path} (see the error above)")
        self.info = self._read_info()
        self.n_batch = int(n_batch)
        self._n_vocab_out = _llama.llama_vocab_n_tokens(_llama.llama_model_get_vocab(self._model))
        # how a non-last stage hands on its last layer's output (module docstring): the patched graph output where
        # the library has it, else the eval callback
        want_graph = (not self.info.is_last and _stage_output_fn is not None
                      and os.environ.get("MOLINK_STAGE_OUTPUT", "graph") != "callback")
        self.stage_output = "" if self.info.is_last else "graph" if want_graph else "callback"
        self.n_chunk = self._chunk_rows()
        self.n_seq_max = int(n_seq_max)
        self.times = StepTimes()
        n_layer = self.info.layer_stop - self.info.layer_start
        # layers llama.cpp puts on a GPU (none without GPU offload support; -1 means all)
        self.n_gpu_layers = (0 if not _llama.llama_supports_gpu_offload() else
                             n_layer if n_gpu_layers < 0 else min(n_layer, int(n_gpu_layers)))

        # hidden-state capture on non-last stages
        self._target = f"l_out-{llama_cpp.llama_model_n_layer(self._model) - 1}".encode()
        cparams = _llama.llama_context_default_params()
        cparams.n_ctx = max(1, int(n_ctx) // self.lanes)  # each lane holds its own sequences' KV
        cparams.n_seq_max = self.n_seq_max
        cparams.kv_unified = True
        # device sampling is opt-in: on an H100 (Llama-3-8B shape, 64 sequences) llama.cpp's backend sampler made a
        # step 3.3 ms slower (it builds one sampler subgraph per sequence), more than the logits copy it saves
        self.device_sampling = bool(device_sampling) and self.info.is_last
        if self.device_sampling:
            # a sequence may own several output rows (speculative drafts, or rows the head asks for)
            cparams.n_outputs_max_per_seq = self.n_chunk
        rule = RULES.get(self.info.arch)
        if not self.info.is_last and rule is not None and rule.embeddings_on_inner_stages:
            # llama.cpp then splits recurrent batches by sequence, in batch order (see archs.py: mamba)
            cparams.embeddings = True
        # hybrid memory: captured rows come back in split_equal ubatch order (archs.equal_split_on_inner_stages)
        self._equal_split = not self.info.is_last and rule is not None and rule.equal_split_on_inner_stages
        if rule is not None and rule.no_flash_attn:
            if flash_attn:
                log.warning("flash attention stays off for %s: %s", self.info.arch, rule.no_flash_attn)
            flash_attn = False
        threads = int(n_threads or os.cpu_count() or 1)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        cparams.flash_attn_type = (_llama.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else
                                   _llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else
                                   _llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._cb = _llama.ggml_backend_sched_eval_callback(self._eval_cb)
        self._lanes: List[_Lane] = []
        if not self._make_lanes(cparams, n_ctx) and self.stage_output == "graph":
            # the patched library refused this model (a pooling type, an output width other than n_embd)
            log_once(f"{Path(self.path).name}: llama.cpp's stage output is not available for this model; "
                     "capturing the last layer's output through the eval callback")
            self.stage_output = "callback"
            self.n_chunk = self._chunk_rows()
            if not self._make_lanes(cparams, n_ctx):
                raise EngineError("llama.cpp refused the eval callback path")  # pragma: no cover
        self._ctx, self._mem = self._lanes[0].ctx, self._lanes[0].mem  # lane 0 (the only one by default)
        # llama.cpp caps a decode at min(n_ctx asked, n_batch) rows (before it rounds n_ctx up to 256) and aborts
        # on more: a context smaller than the batch decodes in chunks of what it takes
        self.n_chunk = min(self.n_chunk, int(_llama.llama_n_batch(self._ctx)))
        self.n_ctx_lane = _llama.llama_n_ctx(self._ctx)
        self.n_ctx = self.n_ctx_lane * self.lanes
        ctx = SplitContext(self.info.arch, self.info.n_layer_total, self.info.layer_start, self.info.layer_stop,
                           {f"{self.info.arch}.embedding_length": self.info.n_embd})
        # M-RoPE models take 4 positions per embedding row (section-major)
        # M-RoPE (Qwen2-VL family): an embedding row takes 4 positions (t, y, x, z); token rows 1 (llama.cpp expands)
        self.mrope = _llama.llama_model_rope_type(self._model) in (8, 40)
        self.input_scale = 1.0 if self.info.is_first else float(rule_for(self.info.arch).hidden_input_scale(ctx))
        self._ones = np.ones(self.n_chunk, dtype=np.int32)
        self._lock = threading.Lock()  # the engine's own state (open/closed, device-sampler chains)
        self._local = threading.local()  # last_sampled of the step this thread ran
        # device sampling: one greedy chain per sequence slot, attached while that slot samples greedily
        self._chains: list = []
        self._on_device = np.zeros(self.n_seq_max, dtype=bool)
        if self.device_sampling:
            self._chains = [None] * self.n_seq_max
            for s in range(self.n_seq_max):
                self._attach(s, True)

    def _chunk_rows(self) -> int:
        """Rows per llama_decode: all of n_batch, except on callback-path non-last stages with a large vocabulary,
        whose logits buffer llama.cpp sizes by the rows (OUTPUT_BUFFER_BUDGET)."""
        if self.info.is_last or self.stage_output == "graph":
            return self.n_batch
        return max(32, min(self.n_batch, OUTPUT_BUFFER_BUDGET // max(1, 4 * self._n_vocab_out)))

    def _make_lanes(self, cparams, n_ctx: int) -> bool:
        """One llama.cpp context per lane, all on the same model weights. False (nothing kept) where the patched
        stage output was asked for and llama.cpp refused it."""
        cparams.n_batch = self.n_chunk
        cparams.n_ubatch = self.n_chunk
        callback = self.stage_output == "callback"
        cparams.cb_eval = self._cb if callback else _llama.ggml_backend_sched_eval_callback(0)
        for i in range(self.lanes):
            cparams.cb_eval_user_data = ctypes.c_void_p(i + 1 if callback else 0)  # which lane's capture buffer
            c = _llama.llama_init_from_model(self._model, cparams)
            if not c:
                self._free_lanes()
                _llama.llama_model_free(self._model)
                self._model = None
                raise EngineError(f"llama.cpp could not create a context for {self.path} (n_ctx={n_ctx}, "
                                  f"lane {i + 1} of {self.lanes})")
            self._lanes.append(_Lane(c, _llama.llama_get_memory(c), self.n_chunk, self.info.n_embd))
            if self.stage_output == "graph" and not _stage_output_fn(c):
                self._free_lanes()
                return False
        return True

    def _free_lanes(self) -> None:
        for lane in self._lanes:
            _llama.llama_free(lane.ctx)
        self._lanes = []

    # ------------------------------------------------------------------ info
    def _read_info(self) -> StageInfo:
        m = self._model
        arch = _meta(m, "general.architecture") or "unknown"
        n_layer = _llama.llama_model_n_layer(m)
        start = int(_meta(m, "molink.layer_start") or 0)
        stop = int(_meta(m, "molink.layer_stop") or n_layer)
        total = int(_meta(m, "molink.n_layer_total") or n_layer)
        if stop - start != n_layer:
            raise EngineError(f"{self.path}: molink.layer_* metadata says {stop - start} layers, the model has {n_layer}")
        vocab = _llama.llama_model_get_vocab(m)
        fp = _meta(m, "molink.source_fingerprint")
        if fp is None:
            from ..model.split import fingerprint
            fp = fingerprint(self.path)
        name = _meta(m, "molink.source_name") or Path(self.path).stem
        return StageInfo(self.path, arch, start, stop, total, _llama.llama_model_n_embd(m),
                         _llama.llama_model_n_embd_inp(m), _llama.llama_vocab_n_tokens(vocab), fp, name,
                         _meta(m, "molink.source_arch") or arch)

    # ------------------------------------------------------------------ capture
    def _eval_cb(self, t: int, ask: bool, user: int) -> bool:
        if ask:
            return _ggml_get_name(t) == self._target
        try:
            lane = self._lanes[(user or 1) - 1]
            nbytes = _ggml_nbytes(t)
            ttype = ctypes.cast(t, ctypes.POINTER(ctypes.c_int32))[0]
            rows = nbytes // (4 * self.info.n_embd)
            if ttype != GGML_TYPE_F32 or rows * 4 * self.info.n_embd != nbytes:
                lane.cap_error = f"captured {self._target.decode()} has type {ttype} and {nbytes} bytes"
                return False
            end = lane.cap_rows + rows
            if end > lane.cap_buf.shape[0]:
                lane.cap_error = f"captured {end} rows, buffer holds {lane.cap_buf.shape[0]}"
                return False
            _ggml_backend_tensor_get(t, lane.cap_buf[lane.cap_rows:end].ctypes.data, 0, nbytes)
            lane.cap_rows = end
        except Exception as e:  # noqa: BLE001 - never let an exception cross into C
            self._lanes[0].cap_error = f"capture failed: {e}"
        return False  # skip the rest of the graph (the LM head)

    def lane_of(self, seq_id: int) -> int:
        """The lane (llama.cpp context) holding a sequence: sequence id modulo the lane count."""
        return int(seq_id) % self.lanes

    @property
    def last_sampled(self) -> Optional[np.ndarray]:
        """Device-sampled token per output row of the last step this thread ran (see :meth:`_read_sampled`)."""
        return getattr(self._local, "sampled", None)

    def forget_sampled(self) -> None:
        """No device-sampled tokens for the last step (it ran as several batches: a runner samples on the host)."""
        self._local.sampled = None

    # ------------------------------------------------------------------ device sampling
    def _attach(self, seq_id: int, on: bool) -> None:
        # llama.cpp initialises a chain for the device once (a second init aborts): a slot that comes back gets a
        # fresh chain, and a detached one is freed (llama.cpp forgot it and rebuilds its graph before the next step)
        if bool(self._on_device[seq_id]) == on:
            return
        if on:
            chain = _llama.llama_sampler_chain_init(_llama.llama_sampler_chain_default_params())
            _llama.llama_sampler_chain_add(chain, _llama.llama_sampler_init_greedy())
            if not _llama.llama_set_sampler(self._lanes[self.lane_of(seq_id)].ctx, seq_id, chain):
                _llama.llama_sampler_free(chain)
                log_once("llama.cpp could not put a greedy sampler on the device; those slots sample on the CPU")
                return
            self._chains[seq_id] = chain
        else:
            _llama.llama_set_sampler(self._lanes[self.lane_of(seq_id)].ctx, seq_id, None)
            _llama.llama_sampler_free(self._chains[seq_id])
            self._chains[seq_id] = None
        self._on_device[seq_id] = on

    def set_device_greedy(self, seq_id: int, on: bool) -> None:
        """Sequence ``seq_id`` samples greedily (``on``: its token comes from the device) or with a chain that
        needs the raw logits. A change takes effect at the next step (llama.cpp then re-reserves its graph)."""
        if self.device_sampling and 0 <= seq_id < self.n_seq_max:
            lane = self._lanes[self.lane_of(seq_id)]
            with lane.lock:  # not while that lane decodes
                if self._ctx is not None:
                    self._attach(int(seq_id), bool(on))

    # ------------------------------------------------------------------ stepping
    def forward(self, seq_ids: np.ndarray, positions: np.ndarray, *, tokens: Optional[np.ndarray] = None,
                hidden: Optional[np.ndarray] = None, output_rows: Optional[np.ndarray] = None,
                embeddings: Optional[np.ndarray] = None, pos4: Optional[np.ndarray] = None,
                causal: bool = True) -> np.ndarray:
        """Run one batch of rows through the stage.

        ``seq_ids``/``positions``: int32 per row. First stage: ``tokens`` (int32 per row), or ``embeddings``
        (float32 [rows, n_embd_inp]: an image's rows from a vision projector, fed instead of token embeddings);
        later stages: ``hidden`` (float32/float16 [rows, n_embd]). ``pos4``: int32 [rows, 4], each embedding or
        hidden row's M-RoPE position (t, y, x, z) on models that use it (default (p, p, p, 0), as llama.cpp gives
        text tokens). ``causal=False``: the rows attend to each other both ways (one image of Gemma 3, as
        llama.cpp's mtmd helper decodes it). Non-last stages return the hidden states [rows, n_embd] (float32, a fresh array). The last
        stage returns logits [len(output_rows), n_vocab] for the rows flagged in ``output_rows`` (bool per row;
        default: the last row of each sequence in the batch).
        """
        seq_ids = np.ascontiguousarray(seq_ids, dtype=np.int32)
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        n = int(seq_ids.shape[0])
        if positions.shape != (n,):
            raise EngineError(f"positions has shape {positions.shape}, expected ({n},)")
        if n == 0:
            raise EngineError("empty batch")
        if seq_ids.min() < 0 or seq_ids.max() >= self.n_seq_max:
            raise EngineError(f"sequence ids must be in 0..{self.n_seq_max - 1}")
        if self.info.is_first and embeddings is not None:
            if tokens is not None or hidden is not None:
                raise EngineError("a batch of embedding rows carries no token ids or hidden states")
            if embeddings.ndim != 2 or embeddings.shape != (n, self.info.n_embd_inp):
                raise EngineError(f"embeddings have shape {tuple(embeddings.shape)}, expected "
                                  f"({n}, {self.info.n_embd_inp})")
            hidden = np.ascontiguousarray(embeddings, dtype=np.float32)
        elif self.info.is_first:
            if tokens is None or hidden is not None:
                raise EngineError("the first stage takes token ids, not hidden states")
            tokens = np.ascontiguousarray(tokens, dtype=np.int32)
            if tokens.shape != (n,):
                raise EngineError(f"tokens has shape {tokens.shape}, expected ({n},)")
            if n and (tokens.min() < 0 or tokens.max() >= self.info.n_vocab):
                raise EngineError(f"token ids must be in 0..{self.info.n_vocab - 1}")
        else:
            if hidden is None or tokens is not None:
                raise EngineError(f"stage {self.info.layer_start}-{self.info.layer_stop - 1} takes hidden states, not token ids")
            if hidden.ndim != 2 or hidden.shape != (n, self.info.n_embd_inp):
                raise EngineError(f"hidden states have shape {tuple(hidden.shape)}, expected ({n}, {self.info.n_embd_inp})")
            hidden = np.ascontiguousarray(hidden, dtype=np.float32)
            if self.input_scale != 1.0:  # llama.cpp multiplies this input by input_scale (archs.prescale)
                hidden = prescale(hidden, self.input_scale)
        if pos4 is not None:
            pos4 = np.ascontiguousarray(pos4, dtype=np.int32)
            if not self.mrope or hidden is None or pos4.shape != (n, 4):
                raise EngineError(f"pos4 ([{n}, 4]) is for embedding or hidden rows of an M-RoPE model")
        if output_rows is None:
            output_rows = last_row_of_each_seq(seq_ids)
        output_rows = np.ascontiguousarray(output_rows, dtype=np.int8)
        if output_rows.shape != (n,):
            raise EngineError(f"output_rows has shape {output_rows.shape}, expected ({n},)")

        li = int(seq_ids[0]) % self.lanes
        if self.lanes > 1 and (seq_ids % self.lanes != li).any():
            raise EngineError(f"a step's sequences must share a lane (sequence id modulo {self.lanes})")
        lane = self._lanes[li]
        with lane.lock:  # other lanes decode at the same time, from their own threads
            if self._ctx is None:
                raise EngineError("engine is closed")
            outs = []
            lane.sampled_parts = []
            if not causal:
                if n > self.n_chunk:
                    raise EngineError(f"{n} rows decoded non-causally do not fit one batch of {self.n_chunk}")
                _llama.llama_set_causal_attn(lane.ctx, False)
            try:
                for a in range(0, n, self.n_chunk):
                    b = min(n, a + self.n_chunk)
                    outs.append(self._decode_chunk(lane, seq_ids[a:b], positions[a:b],
                                                   None if tokens is None else tokens[a:b],
                                                   None if hidden is None else hidden[a:b], output_rows[a:b],
                                                   None if pos4 is None else pos4[a:b]))
            finally:
                if not causal:
                    _llama.llama_set_causal_attn(lane.ctx, True)
            self.times.steps += 1
            self.times.rows += n
            self.times.seqs_max = max(self.times.seqs_max, len(np.unique(seq_ids)))
            parts = lane.sampled_parts
            self._local.sampled = (None if not parts else parts[0] if len(parts) == 1 else np.concatenate(parts))
            return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def _decode_chunk(self, lane: "_Lane", seq_ids: np.ndarray, positions: np.ndarray, tokens: Optional[np.ndarray],
                      hidden: Optional[np.ndarray], output_rows: np.ndarray,
                      pos4: Optional[np.ndarray] = None) -> np.ndarray:
        n = int(seq_ids.shape[0])
        last = self.info.is_last
        logits_flags = output_rows if last else self._ones[:n].astype(np.int8)
        lane.seq_storage[:n] = seq_ids
        batch = _llama.llama_batch()
        batch.n_tokens = n
        if tokens is not None:
            batch.token = tokens.ctypes.data_as(ctypes.POINTER(_llama.llama_token))
        if hidden is not None:
            batch.embd = hidden.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if pos4 is not None:   # M-RoPE rows with their own (t, y, x, z): section-major, as llama.cpp reads them
            positions = np.ascontiguousarray(pos4.T).reshape(-1)
        elif hidden is not None and self.mrope:
            # as llama.cpp expands the positions of text tokens (llm_graph_input_pos::set_input):
            # sections 0-2 at the position, section 3 at 0, section-major
            positions = np.concatenate([positions, positions, positions, np.zeros_like(positions)])
        batch.pos = positions.ctypes.data_as(ctypes.POINTER(_llama.llama_pos))
        batch.n_seq_id = self._ones.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(lane.seq_ptrs.ctypes.data, ctypes.POINTER(ctypes.POINTER(_llama.llama_seq_id)))
        batch.logits = logits_flags.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        lane.cap_rows = 0
        lane.cap_error = None
        t0 = time.perf_counter()
        rc = _llama.llama_decode(lane.ctx, batch)
        t1 = time.perf_counter()
        self.times.decode += t1 - t0
        if lane.cap_error:
            raise EngineError(lane.cap_error)
        if rc == 1:
            raise EngineError(f"KV cache full: no room for {n} more tokens (n_ctx={self.n_ctx_lane}"
                              f"{' per lane' if self.lanes > 1 else ''}); free sequences or raise --ctx")
        # the eval callback stops the graph once it has the rows: llama_decode then reports the stop, which is fine
        stopped_by_capture = self.stage_output == "callback" and lane.cap_rows == n
        if rc != 0 and not stopped_by_capture:
            raise EngineError(f"llama_decode failed with code {rc} (check positions continue each sequence)")
        if self.stage_output == "graph":
            return self._read_stage_output(lane, n, t1)
        if last:
            k = int(np.count_nonzero(output_rows))
            if self.device_sampling:
                lane.sampled_parts.append(self._read_sampled(lane.ctx, seq_ids, output_rows, k))
            ptr = _llama.llama_get_logits(lane.ctx)
            return np.ctypeslib.as_array(ptr, shape=(k, self.info.n_vocab))
        if lane.cap_rows != n:
            raise EngineError(f"captured {lane.cap_rows} hidden rows for a batch of {n}")
        if self._equal_split:
            out = np.empty((n, self.info.n_embd), dtype=np.float32)
            out[np.asarray(split_equal_order(seq_ids.tolist(), self.n_chunk), dtype=np.int64)] = lane.cap_buf[:n]
        else:
            out = lane.cap_buf[:n].copy()
        self.times.capture += time.perf_counter() - t1
        return out

    def _read_stage_output(self, lane: "_Lane", n: int, t1: float) -> np.ndarray:
        """The patched graph's last-layer rows of the chunk just decoded (llama.cpp's embeddings buffer, batch
        order; waits for the device)."""
        ptr = _llama.llama_get_embeddings(lane.ctx)
        if not ptr:
            raise EngineError("llama.cpp returned no stage output")
        out = np.ctypeslib.as_array(ptr, shape=(n, self.info.n_embd)).copy()
        self.times.capture += time.perf_counter() - t1
        return out

    def _read_sampled(self, ctx: ctypes.c_void_p, seq_ids: np.ndarray, output_rows: np.ndarray, k: int) -> np.ndarray:
        """Device-sampled token per output row of the chunk just decoded; -1 where the row's slot samples on the
        CPU (llama.cpp's buffer holds stale ids there, so those rows are never read)."""
        out = np.full(k, -1, dtype=np.int32)
        rows = np.flatnonzero(output_rows)  # batch index of each output row
        dev = np.flatnonzero(self._on_device[seq_ids[rows]])
        if dev.size:
            # one C call per output row: llama.cpp exports no bulk accessor (64 rows: about 30 us)
            out[dev] = np.fromiter(map(_llama.llama_get_sampled_token_ith, itertools.repeat(ctx, dev.size),
                                       rows[dev].tolist()), dtype=np.int32, count=dev.size)
            if (out[dev] < 0).any() or (out[dev] >= self.info.n_vocab).any():
                raise EngineError("the device sampler returned no token for an output row")
        return out

    # ------------------------------------------------------------------ memory
    def free(self, seq_id: int) -> None:
        """Forget a sequence's KV entries."""
        lane = self._lanes[self.lane_of(seq_id)]
        with lane.lock:
            if self._ctx is not None:
                _llama.llama_memory_seq_rm(lane.mem, int(seq_id), -1, -1)

    def trim(self, seq_id: int, pos: int) -> None:
        """Forget a sequence's KV entries at positions ``pos`` and later (rejected speculative drafts)."""
        lane = self._lanes[self.lane_of(seq_id)]
        with lane.lock:
            if self._ctx is not None:
                if not _llama.llama_memory_seq_rm(lane.mem, int(seq_id), int(pos), -1):
                    raise EngineError(f"could not remove positions {pos}.. of sequence {seq_id} from the KV cache")

    @property
    def prefix_reuse(self) -> str:
        """How much of a sequence's KV a copy may take: "any" prefix, or only the "whole" of it. Sliding-window
        attention lets llama.cpp reuse a sequence's cells that fell out of its window (so positions before the last
        window may be gone), and recurrent state holds no positions at all."""
        m = self._model
        if _llama.llama_model_n_swa(m) > 0 or _llama.llama_model_is_recurrent(m) or _llama.llama_model_is_hybrid(m):
            return "whole"
        return "any"

    def copy_seq(self, parent: int, child: int, n: int = -1) -> None:
        """The child sequence holds the parent's positions 0..n-1 (-1: all; ``llama_memory_seq_cp`` in their lane's
        context: KV cells are shared, not copied). Both must live in one lane; the child should hold nothing."""
        lane_i = self.lane_of(parent)
        if self.lane_of(child) != lane_i:
            raise EngineError(f"sequences {parent} and {child} live in different lanes")
        lane = self._lanes[lane_i]
        with lane.lock:
            if self._ctx is not None:
                _llama.llama_memory_seq_cp(lane.mem, int(parent), int(child), 0, int(n) if n >= 0 else -1)

    def clear(self, lane: Optional[int] = None) -> None:
        """Forget every sequence (of one lane)."""
        for i, ln in enumerate(self._lanes):
            if lane is None or i == lane:
                with ln.lock:
                    if self._ctx is not None:
                        _llama.llama_memory_clear(ln.mem, True)

    def graphs_reused(self) -> int:
        """How many decodes llama.cpp ran on the graph it built for an earlier one (every lane; a decode step that
        rebuilds its graph costs host time, and a CUDA build then cannot replay it as a CUDA graph)."""
        with self._lock:
            return sum(int(_llama.llama_perf_context(lane.ctx).n_reused) for lane in self._lanes if lane.ctx)

    @property
    def ctx_ptr(self) -> ctypes.c_void_p:
        return self._ctx

    @property
    def model_ptr(self) -> ctypes.c_void_p:
        return self._model

    def close(self) -> None:
        """Free the llama.cpp context and model."""
        with self._lock:
            for lane in getattr(self, "_lanes", []):
                with lane.lock:
                    if lane.ctx is not None:
                        _llama.llama_free(lane.ctx)
                        lane.ctx = None
            self._ctx = None
            if self._model is not None:
                _llama.llama_model_free(self._model)
                self._model = None
            for chain in self._chains:  # the context never owned them
                if chain is not None:
                    _llama.llama_sampler_free(chain)
            self._chains = []

    def __enter__(self) -> "StageEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class _Lane:
    """One llama.cpp context of a stage: its KV cache, batch buffers and capture buffer, used by one thread at a
    time (its lock). Several lanes share the model's weights; while one waits for the GPU another builds and
    launches its graph."""

    def __init__(self, ctx: ctypes.c_void_p, mem: ctypes.c_void_p, n_chunk: int, n_embd: int):
        self.ctx, self.mem = ctx, mem
        self.lock = threading.Lock()
        self.cap_buf = np.empty((n_chunk, n_embd), dtype=np.float32)
        self.cap_rows = 0
        self.cap_error: Optional[str] = None
        self.seq_storage = np.zeros(n_chunk, dtype=np.int32)
        self.seq_ptrs = (self.seq_storage.ctypes.data + 4 * np.arange(n_chunk, dtype=np.uint64)).astype(np.uint64)
        self.sampled_parts: list = []


def last_row_of_each_seq(seq_ids: np.ndarray) -> np.ndarray:
    """Bool mask of the last row of each sequence id in a batch."""
    n = seq_ids.shape[0]
    mask = np.zeros(n, dtype=bool)
    _, idx = np.unique(seq_ids[::-1], return_index=True)
    mask[n - 1 - idx] = True
    return mask
