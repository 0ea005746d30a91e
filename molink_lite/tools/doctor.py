"""``molink-lite doctor``: which llama.cpp library is loaded, what it was built as, whether its C structs
match the Python bindings, its devices, and how many layers a model would offload.

Run it after installing (or give the stage's options): every line is something that, when wrong, makes a
stage slow (a CPU build on a GPU host) or crash (a library of another llama.cpp version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple


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


def report(model: Optional[str] = None, n_gpu_layers: int = -1) -> Tuple[List[str], bool]:
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
    gpu = bool(ll.llama_supports_gpu_offload())
    lines.append(f"backend: {'GPU offload available' if gpu else 'CPU only'}")
    for d in hostinfo.devices():
        lines.append(f"  device {d['name']} ({d['type']}): {d['description']}, "
                     f"{d['free'] / 2**30:.1f} of {d['total'] / 2**30:.1f} GiB free")
    from ..stage.libpath import PRELOADED

    if PRELOADED:
        lines.append("CUDA runtime from NVIDIA's wheels: " + ", ".join(Path(p).name for p in PRELOADED)
                     + f" ({Path(PRELOADED[0]).parent})")
    lines.append(f"RAM: {hostinfo.free_ram() / 2**30:.1f} GiB available")
    if model:
        from ..model.split import read_model_info

        n = read_model_info(model).n_layer
        off = 0 if not gpu else n if n_gpu_layers < 0 else min(n, n_gpu_layers)
        lines.append(f"model {Path(model).name}: {n} layers, {off} would be offloaded to the GPU "
                     f"(--n-gpu-layers {n_gpu_layers})")
    return lines, ok


def summary_line() -> str:
    """One line for a stage's log: library, build, backend."""
    import llama_cpp.llama_cpp as ll

    from ..stage.libpath import loaded_library

    lib = loaded_library()
    return (f"llama.cpp: {lib} ({build_info(lib.parent) if lib else '?'}); "
            f"{'GPU offload available' if ll.llama_supports_gpu_offload() else 'CPU only'}")
