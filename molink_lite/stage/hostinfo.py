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


def devices(strict: bool = False) -> List[dict]:
    """llama.cpp's devices: name, description, type, free and total bytes.

    The ``ggml_backend_dev_*`` functions are looked up in ggml's own libraries (``ggml.dll``,
    ``ggml-base.dll``, ``libggml.so``...), which export them (Windows does not search ``llama.dll``'s
    dependencies). Where they cannot be found the reason is logged (``strict``: raised) and the list is empty."""
    import llama_cpp.llama_cpp as ll  # noqa: F401 - loads the libraries

    from .libpath import MissingSymbolError, ggml_function

    p, sz = ctypes.c_void_p, ctypes.c_size_t
    try:
        count = ggml_function("ggml_backend_dev_count", sz, [])  # the registry: ggml
        get = ggml_function("ggml_backend_dev_get", p, [sz])
        name = ggml_function("ggml_backend_dev_name", ctypes.c_char_p, [p])  # the device interface: ggml-base
        desc = ggml_function("ggml_backend_dev_description", ctypes.c_char_p, [p])
        typ = ggml_function("ggml_backend_dev_type", ctypes.c_int, [p])
        memory = ggml_function("ggml_backend_dev_memory", None, [p, ctypes.POINTER(sz), ctypes.POINTER(sz)])
    except MissingSymbolError as e:  # a library without the device API
        if strict:
            raise
        log.warning("no device list: %s", e)
        return []
    out = []
    for i in range(count()):
        dev = get(i)
        free, total = sz(0), sz(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({"name": (name(dev) or b"").decode(errors="replace"),
                    "description": (desc(dev) or b"").decode(errors="replace"),
                    "type": _TYPES.get(typ(dev), "other"),
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


# --------------------------------------------------------------------------- what the machine has (doctor)
# These read the machine, not llama.cpp: they work before (and without) llama_cpp being importable, so
# `molink-lite doctor` can say which engine wheel fits even where the installed one cannot load.
def machine() -> str:
    import platform

    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "arm64", "aarch64": "arm64"}.get(m, m)


def cpu_features() -> dict:
    """x86-64 SIMD features the CPU wheels need (AVX2, FMA, F16C, BMI2): ``{feature: True/False/None}`` plus
    ``"source"``. None: could not tell. Linux: /proc/cpuinfo; Windows: IsProcessorFeaturePresent (AVX2 only);
    macOS: sysctl."""
    import sys

    feats = {"avx2": None, "fma": None, "f16c": None, "bmi2": None}
    if machine() != "x86_64":
        return {**feats, "source": f"not x86-64 ({machine()})"}
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        return {**{k: k in flags for k in feats}, "source": "/proc/cpuinfo"}
        except OSError:
            pass
        return {**feats, "source": "unknown (/proc/cpuinfo unreadable)"}
    if sys.platform == "win32":
        try:
            k32 = ctypes.WinDLL("kernel32")
            k32.IsProcessorFeaturePresent.restype = ctypes.c_int
            k32.IsProcessorFeaturePresent.argtypes = [ctypes.c_uint]
            # PF_AVX2_INSTRUCTIONS_AVAILABLE = 40 (Windows 10+; FMA, F16C and BMI2 come with AVX2 on every CPU
            # that has it: Intel Haswell, AMD Excavator/Zen and later)
            avx2 = bool(k32.IsProcessorFeaturePresent(40))
            return {"avx2": avx2, "fma": avx2 or None, "f16c": avx2 or None, "bmi2": avx2 or None,
                    "source": "IsProcessorFeaturePresent"}
        except (OSError, AttributeError):
            return {**feats, "source": "unknown"}
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.leaf7_features", "machdep.cpu.features"],
                                 capture_output=True, text=True, timeout=10).stdout.upper().split()
            return {"avx2": "AVX2" in out, "fma": "FMA" in out, "f16c": "F16C" in out, "bmi2": "BMI2" in out,
                    "source": "sysctl"}
        except (OSError, subprocess.SubprocessError):
            pass
    return {**feats, "source": "unknown"}


def _load(names) -> Optional[ctypes.CDLL]:
    import sys

    for n in names:
        try:
            return ctypes.WinDLL(n) if sys.platform == "win32" else ctypes.CDLL(n)
        except OSError:
            continue
    return None


def cuda_driver() -> Optional[dict]:
    """The NVIDIA driver, if one is installed: ``{"cuda": (12, 4), "driver": "550.54.15" or None,
    "gpus": [{"name", "cc": (8, 9)}], "error": str or None}`` (``cuda``: the newest CUDA version the driver
    runs, from cuDriverGetVersion). None without a driver."""
    import sys

    lib = _load(["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"])
    if lib is None:
        return None
    info: dict = {"cuda": None, "driver": None, "gpus": [], "error": None}
    v = ctypes.c_int(0)
    try:
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            info["cuda"] = (v.value // 1000, (v.value % 1000) // 10)
        rc = lib.cuInit(0)
        if rc != 0:
            info["error"] = f"cuInit failed (CUDA error {rc}: no usable GPU, or driver and kernel module disagree)"
        else:
            n = ctypes.c_int(0)
            lib.cuDeviceGetCount(ctypes.byref(n))
            for i in range(n.value):
                dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
                name = ctypes.create_string_buffer(256)
                lib.cuDeviceGet(ctypes.byref(dev), i)
                lib.cuDeviceGetName(name, 256, dev)
                lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # COMPUTE_CAPABILITY_MAJOR
                lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # COMPUTE_CAPABILITY_MINOR
                info["gpus"].append({"name": name.value.decode(errors="replace"), "cc": (major.value, minor.value)})
    except AttributeError as e:
        info["error"] = f"not a CUDA driver library: {e}"
    nvml = _load(["nvml.dll"] if sys.platform == "win32" else ["libnvidia-ml.so.1"])
    try:
        if nvml is not None and nvml.nvmlInit_v2() == 0:
            buf = ctypes.create_string_buffer(96)
            if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
                info["driver"] = buf.value.decode(errors="replace")
            nvml.nvmlShutdown()
    except AttributeError:
        pass
    return info


_VK_TYPES = {0: "other", 1: "integrated GPU", 2: "discrete GPU", 3: "virtual GPU", 4: "CPU"}


def vulkan() -> Optional[dict]:
    """The Vulkan loader and its physical devices: ``{"loader": name, "devices": [{"name", "type", "api"}],
    "error": str or None}``; None without a loader. (AMD, Intel and NVIDIA GPUs all show here; a "CPU" type
    is a software rasterizer such as Mesa's lavapipe.)"""
    import sys

    names = (["vulkan-1.dll"] if sys.platform == "win32" else
             ["libvulkan.1.dylib", "libMoltenVK.dylib"] if sys.platform == "darwin" else ["libvulkan.so.1"])
    lib = _load(names)
    if lib is None:
        return None
    info: dict = {"loader": getattr(lib, "_name", names[0]), "devices": [], "error": None}

    class AppInfo(ctypes.Structure):
        _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                    ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                    ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]

    class InstanceInfo(ctypes.Structure):
        _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                    ("pApplicationInfo", ctypes.POINTER(AppInfo)), ("enabledLayerCount", ctypes.c_uint32),
                    ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                    ("ppEnabledExtensionNames", ctypes.c_void_p)]

    try:
        lib.vkCreateInstance.restype = ctypes.c_int
        lib.vkCreateInstance.argtypes = [ctypes.POINTER(InstanceInfo), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.vkEnumeratePhysicalDevices.restype = ctypes.c_int
        lib.vkEnumeratePhysicalDevices.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
        lib.vkGetPhysicalDeviceProperties.restype = None
        lib.vkGetPhysicalDeviceProperties.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.vkDestroyInstance.restype = None
        lib.vkDestroyInstance.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        app = AppInfo(0, None, b"molink-lite doctor", 1, b"molink-lite", 1, (1 << 22) | (1 << 12))  # API 1.1
        ci = InstanceInfo(1, None, 0, ctypes.pointer(app), 0, None, 0, None)
        inst = ctypes.c_void_p()
        rc = lib.vkCreateInstance(ctypes.byref(ci), None, ctypes.byref(inst))
        if rc != 0:
            info["error"] = f"vkCreateInstance failed (VkResult {rc}: no Vulkan driver installed?)"
            return info
        try:
            n = ctypes.c_uint32(0)
            lib.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), None)
            devs = (ctypes.c_void_p * n.value)()
            lib.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), devs)
            for d in devs[:n.value]:
                props = ctypes.create_string_buffer(2048)  # VkPhysicalDeviceProperties: 824 bytes on 64-bit
                lib.vkGetPhysicalDeviceProperties(d, props)
                api, _drv, _vendor, _dev, kind = (int.from_bytes(props.raw[i:i + 4], sys.byteorder)
                                                  for i in range(0, 20, 4))
                name = props.raw[20:276].split(b"\0", 1)[0].decode(errors="replace")
                info["devices"].append({"name": name, "type": _VK_TYPES.get(kind, "other"),
                                        "api": f"{api >> 22}.{(api >> 12) & 0x3FF}.{api & 0xFFF}"})
        finally:
            lib.vkDestroyInstance(inst, None)
    except AttributeError as e:
        info["error"] = f"not a Vulkan loader: {e}"
    return info
