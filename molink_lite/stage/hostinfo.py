"""What this host offers a cluster: backend, devices with free memory, free RAM, and a measured speed.

Devices come from llama.cpp's own device list (``ggml_backend_dev_*``: the devices the loaded library
will really use, CUDA or otherwise, with free and total memory); RAM from ``psutil``. The speed is a short
calibration: a one-layer GGUF with this model's layer shape and tensor types (all weights zero: the cost
of a matrix product does not depend on the values, and zeros travel as a sparse file) is loaded and timed
for a few decode steps of ``n_rows`` sequences.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from typing import List, Optional

log = logging.getLogger(__name__)
_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}  # enum ggml_backend_dev_type


def devices() -> List[dict]:
    """llama.cpp's devices: name, description, type, free and total bytes."""
    import llama_cpp.llama_cpp as ll

    lib = ll._lib
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype, lib.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
        lib.ggml_backend_dev_memory.restype = None
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
    except AttributeError:  # a library without the device API
        return []
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({"name": (lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                    "description": (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                    "type": _TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
                    "free": int(free.value), "total": int(total.value)})
    return out


def process_rss() -> int:
    """This process's resident memory in bytes (model weights paged in, KV cache, buffers); 0 if unknown."""
    import psutil

    try:
        return int(psutil.Process().memory_info().rss)
    except (psutil.Error, OSError):
        return 0


def free_ram() -> int:
    """Available RAM in bytes (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def offer(max_memory: Optional[int], gpu: bool) -> dict:
    """What to report when joining: backend, the memory layers may use (free VRAM of the GPUs when layers
    are offloaded, else free RAM; capped by ``--max-memory``), and the device list."""
    devs = devices()
    gpus = [d for d in devs if d["type"] in ("gpu", "igpu")]
    ram = free_ram()
    if gpu and gpus:
        backend, memory = "cuda" if any("CUDA" in d["name"].upper() for d in gpus) else "gpu", sum(d["free"] for d in gpus)
    else:
        backend, memory = "cpu", ram
    if max_memory is not None:
        memory = min(memory, max_memory)
    return {"backend": backend, "memory_bytes": int(memory), "ram_free": ram, "devices": devs}


def calibrate(path: str, *, n_rows: int, n_threads: Optional[int], n_gpu_layers: int, budget_s: float = 1.0,
              max_steps: int = 12) -> float:
    """Median seconds of one decode step of ``n_rows`` sequences through the one-layer GGUF at ``path``."""
    import llama_cpp  # noqa: F401 - before numpy (engine notes)
    import numpy as np

    from .engine import StageEngine

    n_rows = max(1, min(int(n_rows), 64))
    n_ctx = ((n_rows * (max_steps + 2)) // 256 + 1) * 256
    eng = StageEngine(path, n_ctx=n_ctx, n_seq_max=n_rows, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    try:
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((n_rows, eng.info.n_embd_inp)).astype(np.float32)
        seqs = np.arange(n_rows, dtype=np.int32)
        times: List[float] = []
        t_end = time.perf_counter() + budget_s
        for step in range(max_steps + 1):
            t0 = time.perf_counter()
            eng.forward(seqs, np.full(n_rows, step, dtype=np.int32), hidden=hidden)
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
            if step >= 3 and time.perf_counter() > t_end:
                break
        return float(statistics.median(times))
    finally:
        eng.close()
