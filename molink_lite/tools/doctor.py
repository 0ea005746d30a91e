"""``molink-lite doctor``: which engine wheel fits this machine (and the pip command), which llama.cpp library
is loaded, what it was built as, whether its C structs match the Python bindings, its devices, and how many
layers a model would offload.

Run it after installing (or give the stage's options): every line is something that, when wrong, makes a
stage slow (a CPU build on a GPU host) or crash (a library of another llama.cpp version). The first part
(:func:`host_report`) reads only the machine, so it is printed even where llama.cpp cannot load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

# The engine wheels the project publishes (kernels/wheel.py VARIANTS, .github/workflows/wheels.yml, README
# Install): variant -> (operating systems, what it needs). tests/test_kernels.py keeps this in step with wheel.py.
WHEEL_VARIANTS = {
    "cpu": ("linux windows macos", "x86-64 with AVX2/FMA/F16C (2013+), or Apple silicon (Metal)"),
    "cu12": ("linux windows", "NVIDIA GPU, compute capability 6.1-9.0 (later ones through PTX), driver 525.60.13+ "
                              "(Windows 527.41+)"),
    "cu13": ("linux", "NVIDIA GPU, compute capability 7.5-12.0, driver 580+"),
    "vulkan": ("linux windows", "a GPU whose driver supports Vulkan 1.2+ (AMD, Intel, NVIDIA), x86-64 with AVX2 "
                                "(Linux: glibc 2.35+)"),
}
INDEX = "<pages>/whl"  # <pages>: the repository's GitHub Pages address (README, Install)


def pip_command(variant: str) -> str:
    return f"pip install molink-lite --only-binary llama-cpp-python --extra-index-url {INDEX}/{variant}"


def _os() -> str:
    return "windows" if sys.platform == "win32" else "macos" if sys.platform == "darwin" else \
        "linux" if sys.platform.startswith("linux") else sys.platform


def recommend(os_name: str, arch: str, cpu: dict, cuda: Optional[dict], vk: Optional[dict]) -> Tuple[Optional[str], List[str]]:
    """(the engine wheel variant that fits, or None when none does; the reasons, one per line)."""
    why: List[str] = []
    if os_name == "macos":
        if arch == "arm64":
            return "cpu", ["Apple silicon: the cpu wheel (llama.cpp's Metal backend is built in)"]
        return None, ["no wheel for Intel Macs: `pip install molink-lite` compiles the engine (Xcode command line tools)"]
    if arch != "x86_64" or os_name not in ("linux", "windows"):
        return None, [f"no prebuilt engine wheel for {os_name} {arch}: `pip install molink-lite` compiles it "
                      "(CMake and a C++ compiler), or build a wheel once with kernels/wheel.py"]
    gpus = (cuda or {}).get("gpus") or []
    ver = (cuda or {}).get("cuda")
    if gpus:
        lo = min(g["cc"] for g in gpus)
        if ver is not None and ver >= (13, 0) and lo >= (7, 5) and "cu13" in WHEEL_VARIANTS and \
                os_name in WHEEL_VARIANTS["cu13"][0].split():
            return "cu13", [f"NVIDIA driver runs CUDA {ver[0]}.{ver[1]}, every GPU is compute capability 7.5+"]
        if ver is not None and ver >= (12, 0) and lo >= (6, 1):
            return "cu12", [f"NVIDIA driver runs CUDA {ver[0]}.{ver[1]}"]
        if lo < (6, 1):
            why.append(f"the GPUs' compute capability {lo[0]}.{lo[1]} is older than the CUDA wheels support (6.1)")
        else:
            why.append(f"the NVIDIA driver is too old for the CUDA wheels (it runs CUDA "
                       f"{'%d.%d' % ver if ver else '?'}; cu12 needs 12.0: driver 525.60.13+, Windows 527.41+): "
                       "update the driver to use the GPU")
    elif cuda and cuda.get("error"):
        why.append(f"NVIDIA driver found but no usable GPU ({cuda['error']})")
    vk_gpus = [d for d in (vk or {}).get("devices") or [] if d["type"] != "CPU"]
    if vk_gpus and not gpus:
        if "vulkan" in WHEEL_VARIANTS and cpu.get("avx2") is not False:  # its CPU code is x86-64-v3 too
            return "vulkan", why + [f"Vulkan GPU: {vk_gpus[0]['name']} ({vk_gpus[0]['type']})"]
        why.append(f"Vulkan GPU {vk_gpus[0]['name']}: this version has no Vulkan engine wheel; the CPU wheel runs")
    if cpu.get("avx2") is False:
        return None, why + ["this CPU has no AVX2: the cpu wheel would stop with an illegal instruction. "
                            "`pip install molink-lite` (without --only-binary) compiles the engine for this CPU"]
    return "cpu", why + ["CPU: " + ("AVX2 present" if cpu.get("avx2") else
                                    f"AVX2 unknown ({cpu.get('source')}); the cpu wheel needs it")]


def host_report() -> List[str]:
    """Which engine wheel fits this machine, and why: the CPU's AVX2, the NVIDIA driver's CUDA version, the
    Vulkan loader and devices. Needs no llama.cpp."""
    from ..stage import hostinfo

    arch, os_name = hostinfo.machine(), _os()
    cpu = hostinfo.cpu_features()
    lines = [f"machine: {os_name} {arch}"]
    if arch == "x86_64":
        feats = ", ".join(f"{k.upper()} {'yes' if v else 'no' if v is False else '?'}"
                          for k, v in cpu.items() if k != "source")
        lines.append(f"CPU features: {feats} ({cpu['source']})")
    cuda = vk = None
    try:
        cuda = hostinfo.cuda_driver()
    except Exception as e:  # noqa: BLE001 - a broken driver install must not stop the report
        cuda = {"cuda": None, "driver": None, "gpus": [], "error": f"{type(e).__name__}: {e}"}
    if cuda is None:
        lines.append("NVIDIA driver: none")
    else:
        ver = cuda.get("cuda")
        lines.append(f"NVIDIA driver: {cuda.get('driver') or 'found'}"
                     + (f", runs CUDA up to {ver[0]}.{ver[1]}" if ver else "")
                     + (f"; {cuda['error']}" if cuda.get("error") else ""))
        for g in cuda.get("gpus") or []:
            lines.append(f"  GPU {g['name']} (compute capability {g['cc'][0]}.{g['cc'][1]})")
    try:
        vk = hostinfo.vulkan()
    except Exception as e:  # noqa: BLE001
        vk = {"loader": "?", "devices": [], "error": f"{type(e).__name__}: {e}"}
    if vk is None:
        lines.append("Vulkan: no loader")
    else:
        lines.append(f"Vulkan: loader {vk['loader']}" + (f"; {vk['error']}" if vk.get("error") else
                                                         f", {len(vk['devices'])} device(s)"))
        for d in vk["devices"]:
            lines.append(f"  Vulkan device {d['name']} ({d['type']}, Vulkan {d['api']})")
    variant, why = recommend(os_name, arch, cpu, cuda, vk)
    if variant:
        lines.append(f"wheel for this machine: {variant} ({WHEEL_VARIANTS[variant][1]})")
    else:
        lines.append("wheel for this machine: none prebuilt")
    lines += [f"  {w}" for w in why]
    if variant:
        lines.append(f"  install: {pip_command(variant)}   (<pages>: see README, Install)")
    return lines


def build_info(lib_dir: Path) -> str:
    """How the loaded library was built: a project wheel (molink_build.json), kernels/build.py
    (build_info.json), or unknown (e.g. compiled by pip from the sdist)."""
    for name, fmt in (("molink_build.json", "molink-lite {variant} wheel of llama-cpp-python {version}"),
                      ("build_info.json", "kernels/build.py {backend} build")):
        f = lib_dir / name
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
                return fmt.format(**{k: d.get(k, "?") for k in ("variant", "version", "backend")}) + \
                    (f", CUDA archs {d['cuda_archs']}" if d.get("cuda_archs") else "")
            except (ValueError, KeyError):
                pass
    return "built elsewhere (e.g. compiled by pip from the source distribution)"


def vulkan_hint(lib: Optional[Path], devs: List[dict]) -> Optional[str]:
    """A Vulkan build (ggml-vulkan next to the llama library) with no Vulkan device in llama.cpp's list: why."""
    from ..stage import hostinfo
    from ..stage.libpath import find_sibling

    if lib is None or find_sibling("ggml-vulkan", lib.parent) is None or \
            any(d["name"].startswith("Vulkan") for d in devs):
        return None
    try:
        vk = hostinfo.vulkan() or {}
    except Exception:  # noqa: BLE001 - a hint only
        vk = {}
    kinds = [d["type"] for d in vk.get("devices") or []]
    if not kinds:
        why = ("no Vulkan driver answers (install the GPU driver's Vulkan support: Linux mesa-vulkan-drivers for "
               "AMD/Intel, the NVIDIA driver for NVIDIA GPUs), so layers run on the CPU")
    elif all(k == "CPU" for k in kinds):
        why = ("the only Vulkan device is a CPU one (e.g. Mesa's lavapipe, 'llvmpipe'), which llama.cpp skips; "
               "GGML_VK_VISIBLE_DEVICES=0 selects it (for testing: slower than the CPU backend)")
    else:
        why = ("llama.cpp found the Vulkan GPU unsuitable (it needs 16-bit storage buffer access); update the "
               "GPU driver, or pick a device with GGML_VK_VISIBLE_DEVICES")
    return f"Vulkan: this is a Vulkan build but llama.cpp uses no Vulkan device: {why}"


def report(model: Optional[str] = None, n_gpu_layers: int = -1,
           mmproj: Optional[str] = None) -> Tuple[List[str], bool]:
    """Lines to print, and whether everything is usable."""
    import llama_cpp
    import llama_cpp.llama_cpp as ll

    from ..stage import hostinfo
    from ..stage.libpath import LibraryPathError, StructSizeMismatch, check_struct_sizes, loaded_library

    ok = True
    lib = loaded_library()
    lines = [f"library: {lib} (llama-cpp-python bindings {llama_cpp.__version__})"]
    lines.append(f"build: {build_info(lib.parent) if lib else '?'}")
    try:
        sizes = check_struct_sizes()
        lines.append(f"struct sizes: match the bindings ({len(sizes)} structs checked)")
    except StructSizeMismatch as e:
        ok = False
        lines.append(f"struct sizes: MISMATCH: {e}")
    except LibraryPathError:
        lines.append("struct sizes: not recorded for this library (only project wheels and kernels/build.py "
                     "record them); the version pin is the only guard")
    lines.append(patches_line())
    gpu = bool(ll.llama_supports_gpu_offload())
    lines.append(f"backend: {'GPU offload available' if gpu else 'CPU only'}")
    try:
        devs = hostinfo.devices(strict=True)  # from ggml's own library (ggml.dll, libggml.so, ...)
    except LibraryPathError as e:
        ok = False
        devs = []
        lines.append(f"devices: UNAVAILABLE: {e}")
    for d in devs:
        lines.append(f"  device {d['name']} ({d['type']}): {d['description']}, "
                     f"{d['free'] / 2**30:.1f} of {d['total'] / 2**30:.1f} GiB free")
    hint = vulkan_hint(lib, devs)
    if hint:
        lines.append(hint)
    from ..stage.libpath import PRELOADED

    if PRELOADED:
        lines.append("CUDA runtime from NVIDIA's wheels: " + ", ".join(Path(p).name for p in PRELOADED)
                     + f" ({Path(PRELOADED[0]).parent})")
    lines.append(f"RAM: {hostinfo.free_ram() / 2**30:.1f} GiB available")
    if model:
        from ..model.archs import split_support
        from ..model.split import read_model_info

        info = read_model_info(model)
        n = info.n_layer
        off = 0 if not gpu else n if n_gpu_layers < 0 else min(n, n_gpu_layers)
        lines.append(f"model {Path(model).name}: {n} layers, {off} would be offloaded to the GPU "
                     f"(--n-gpu-layers {n_gpu_layers})")
        level, why = split_support(info.arch)
        lines.append(f"split: {why}")
        ok = ok and level is not None
    if mmproj:
        from ..model.archs import vision_support
        from ..model.gguf_meta import GGUFFile, GGUFFormatError

        try:
            ptype = str(GGUFFile(mmproj).value("clip.projector_type") or "?")
            good, why = vision_support(ptype)
        except (OSError, GGUFFormatError) as e:
            good, why = False, f"vision projector {mmproj}: unreadable ({e})"
        lines.append(f"vision: {why}")
        ok = ok and good
    return lines, ok


def patches_line() -> str:
    """The project's engine patches the loaded library carries (kernels/patches/), and what lacking them costs."""
    from ..stage.libpath import engine_patches

    names = engine_patches()
    if names:
        return (f"engine patches: {', '.join(names)} (kernels/patches/: non-last stages end their graph at the "
                "last layer, with no LM head, no logits buffer and no per-node callback)")
    return ("engine patches: none (a pristine llama.cpp build: non-last stages capture their output through the "
            "eval callback, which is slower on GPUs; the project's wheels and kernels/build.py carry the patches)")


def summary_line() -> str:
    """One line for a stage's log: library, build, backend."""
    import llama_cpp.llama_cpp as ll

    from ..stage.libpath import loaded_library

    lib = loaded_library()
    from ..stage.libpath import engine_patches

    return (f"llama.cpp: {lib} ({build_info(lib.parent) if lib else '?'}); "
            f"{'GPU offload available' if ll.llama_supports_gpu_offload() else 'CPU only'}; "
            f"engine patches: {', '.join(engine_patches()) or 'none'}")
