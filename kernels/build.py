#!/usr/bin/env python3
"""Build llama.cpp's shared libraries (CPU, CUDA or Vulkan) for the pinned llama-cpp-python.

Only the ``llama`` target and the ggml libraries it links are built from the
llama.cpp source vendored in the llama-cpp-python sdist, with the project's patch set
(``kernels/patches/``, see ``kernels/patchset.py``; ``--no-patches`` builds the pristine
source), so a CUDA build takes
minutes instead of a full ``pip install`` from source.  The libraries land in one
folder; point the Python bindings at it with ``LLAMA_CPP_LIB_PATH`` (or
``molink_lite.stage.libpath.use_library_dir``) *before* ``llama_cpp`` is imported.

Usage::

    python kernels/build.py --backend cpu [--portable] [--out DIR] [--src SDIST] [--jobs N]
    python kernels/build.py --backend cuda [--cuda-arch 90|native|"86;89"] [--out DIR]
    python kernels/build.py --backend vulkan [--portable] [--out DIR]     # AMD, Intel, NVIDIA GPUs

Pure Python standard library; runs on Linux, macOS and Windows.  Needs cmake
(>= 3.18; ``pip install cmake`` works), a C/C++ compiler (gcc/clang, or MSVC on
Windows) and, for ``--backend cuda``, the CUDA toolkit (nvcc); for ``--backend vulkan``,
the Vulkan headers and loader, ``glslc`` and SPIRV-Headers (Debian/Ubuntu: ``apt-get install
libvulkan-dev glslc spirv-headers``; Windows: the LunarG Vulkan SDK, ``$VULKAN_SDK``).  Ninja is used
when found (``pip install ninja``); otherwise CMake's default generator.

Next to the libraries it writes ``struct_sizes.json`` (``sizeof`` of the main
llama.h structs, from a tiny C program compiled against the same headers; see
``molink_lite.stage.libpath.check_struct_sizes``) and ``build_info.json`` (what was
built and how).  Running it again with the same settings into the same ``--out``
is a no-op (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import patchset  # noqa: E402 - kernels/patchset.py: the project's llama.cpp patches

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # must match the pinned llama-cpp-python bindings
KERNELS_DIR = Path(__file__).resolve().parent
# From a source checkout builds go under kernels/build/; an installed package (``molink-lite build-lib``)
# has no writable kernels folder, so they go to the user's cache instead.
BUILD_ROOT = (KERNELS_DIR / "build" if (KERNELS_DIR.parent / "pyproject.toml").is_file()
              else Path(os.environ.get("MOLINK_CACHE", Path.home() / ".cache" / "molink-lite")) / "kernels-build")
MIN_CMAKE = (3, 18)  # ggml-cuda's CMakeLists needs 3.18; "native" CUDA arch needs 3.24

# Structs whose layout the Python bindings must agree with (passed by value or filled from Python).
STRUCTS = [
    "llama_model_params",
    "llama_context_params",
    "llama_batch",
    "llama_sampler_chain_params",
    "llama_token_data",
    "llama_token_data_array",
    "llama_model_quantize_params",
    "llama_logit_bias",
    "llama_chat_message",
    "llama_perf_context_data",
]


class BuildError(RuntimeError):
    """A clear, user-facing build failure."""


def log(msg: str) -> None:
    print(f"[kernels] {msg}", flush=True)


# --------------------------------------------------------------------------- platform
def is_windows() -> bool:
    return sys.platform == "win32"


def is_macos() -> bool:
    return sys.platform == "darwin"


def lib_patterns() -> List[str]:
    """Glob patterns of the shared libraries to collect (llama + ggml*)."""
    if is_windows():
        return ["llama.dll", "ggml*.dll"]
    if is_macos():
        return ["libllama*.dylib", "libggml*.dylib", "libllama*.so", "libggml*.so"]
    return ["libllama.so*", "libggml*.so*"]


def main_lib_names() -> List[str]:
    """Names under which llama_cpp looks for the llama library (see llama_cpp._ctypes_extensions)."""
    if is_windows():
        return ["llama.dll", "libllama.dll"]
    if is_macos():
        return ["libllama.so", "libllama.dylib"]
    return ["libllama.so"]


def export_line(path: Path) -> List[str]:
    if is_windows():
        return [f'set LLAMA_CPP_LIB_PATH={path}', f'$env:LLAMA_CPP_LIB_PATH = "{path}"   # PowerShell']
    return [f"export LLAMA_CPP_LIB_PATH={path}"]


# --------------------------------------------------------------------------- tools
def run(cmd: Sequence[str], *, cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
        capture: bool = False, what: str = "command") -> subprocess.CompletedProcess:
    log("$ " + " ".join(_quote(c) for c in cmd))
    try:
        p = subprocess.run(list(cmd), cwd=cwd, env=env, text=True,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.STDOUT if capture else None)
    except FileNotFoundError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]!r}: {e}") from e
    if p.returncode != 0:
        if capture and p.stdout:
            sys.stdout.write(p.stdout[-20000:])
        raise BuildError(f"{what} failed with exit code {p.returncode}")
    return p


def _quote(s: str) -> str:
    return f'"{s}"' if (" " in s or ";" in s) else s


def find_cmake() -> str:
    exe = shutil.which("cmake")
    if not exe:
        raise BuildError("cmake not found on PATH. Install it (https://cmake.org/download/, your package "
                         "manager, or `pip install cmake`) and run again.")
    out = subprocess.run([exe, "--version"], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if m and (int(m.group(1)), int(m.group(2))) < MIN_CMAKE:
        raise BuildError(f"cmake {m.group(1)}.{m.group(2)} is too old; llama.cpp needs >= "
                         f"{MIN_CMAKE[0]}.{MIN_CMAKE[1]} (`pip install cmake` gives a recent one)")
    return exe


def cmake_version(cmake: str) -> tuple:
    out = subprocess.run([cmake, "--version"], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_ninja() -> Optional[str]:
    exe = shutil.which("ninja")
    if exe:
        return exe
    # `pip install ninja` puts the binary next to the interpreter's scripts
    scripts = Path(sys.executable).parent
    for name in ("ninja.exe", "ninja") if is_windows() else ("ninja",):
        cand = scripts / name
        if cand.is_file():
            return str(cand)
    return None


def check_compiler() -> Optional[str]:
    """Best-effort early check for a C++ compiler; returns a warning or raises BuildError."""
    if os.environ.get("CXX"):
        return None
    if is_windows():
        if shutil.which("cl") or shutil.which("clang-cl"):
            return None
        # CMake's Visual Studio generator finds MSVC by itself (vswhere); only warn here
        return ("cl.exe is not on PATH; relying on CMake's Visual Studio generator to find MSVC. If configure "
                "fails, install 'Visual Studio Build Tools' with the 'Desktop development with C++' workload, "
                "or run from a 'x64 Native Tools Command Prompt'.")
    for cand in ("c++", "g++", "clang++"):
        if shutil.which(cand):
            return None
    hint = "xcode-select --install" if is_macos() else "e.g. `apt-get install build-essential` or `dnf install gcc-c++`"
    raise BuildError(f"no C/C++ compiler found (looked for $CXX, c++, g++, clang++). Install one: {hint}")


def find_nvcc() -> str:
    cands = []
    if os.environ.get("CUDACXX"):
        cands.append(Path(os.environ["CUDACXX"]))
    exe = shutil.which("nvcc")
    if exe:
        cands.append(Path(exe))
    for var in ("CUDA_PATH", "CUDA_HOME", "CUDA_ROOT", "CUDAToolkit_ROOT"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "bin" / ("nvcc.exe" if is_windows() else "nvcc"))
    if not is_windows():
        cands.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in cands:
        if c.is_file():
            return str(c)
    raise BuildError("nvcc (CUDA toolkit) not found: looked at $CUDACXX, PATH, $CUDA_PATH, $CUDA_HOME"
                     + ("" if is_windows() else ", /usr/local/cuda/bin")
                     + ". Install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads) or put nvcc on "
                       "PATH. Without a compiler, see kernels/README.md for prebuilt CUDA wheels.")


VULKAN_SDK_HINT = ("the Vulkan backend is built with the Vulkan headers and loader, glslc (shader compiler) and "
                   "SPIRV-Headers: apt-get install libvulkan-dev glslc spirv-headers (Debian 12+/Ubuntu 24.04+), "
                   "dnf install vulkan-loader-devel glslc spirv-headers-devel (Fedora), or the LunarG Vulkan SDK "
                   "(https://vulkan.lunarg.com; Windows, macOS, older Linux) with $VULKAN_SDK set")


# Force-included (gcc/clang) into the C++ sources of a Vulkan build: ggml-vulkan uses VK_EXT_layer_settings
# without a version guard, which the Vulkan headers of Debian 12 (1.3.239) and Ubuntu 22.04 lack.
VULKAN_COMPAT_H = """/* molink-lite (kernels/build.py): force-included into C++ sources of Vulkan builds. ggml-vulkan uses
   VK_EXT_layer_settings (Vulkan headers 1.3.261+) without a version guard; older headers (Debian 12:
   1.3.239, Ubuntu 22.04: 1.3.204) lack it. This declares the types with the layout of the Vulkan spec,
   only in ggml-vulkan's own sources and only where the headers lack them. */
#if defined(__cplusplus) && defined(ggml_vulkan_EXPORTS)
#include <vulkan/vulkan_core.h> /* C header: ggml's later vulkan.hpp setup (dynamic dispatcher) stays first */
#if !defined(VK_EXT_layer_settings)
#include <cstdint>
#include <vector>
namespace vk {
enum class LayerSettingTypeEXT : int32_t {
    eBool32 = 0, eInt32 = 1, eInt64 = 2, eUint32 = 3, eUint64 = 4, eFloat32 = 5, eFloat64 = 6, eString = 7
};
struct LayerSettingEXT {
    const char *pLayerName;
    const char *pSettingName;
    LayerSettingTypeEXT type;
    uint32_t valueCount;
    const void *pValues;
};
struct LayerSettingsCreateInfoEXT {
    int32_t sType = 1000496000; /* VK_STRUCTURE_TYPE_LAYER_SETTINGS_CREATE_INFO_EXT */
    const void *pNext = nullptr;
    uint32_t settingCount = 0;
    const LayerSettingEXT *pSettings = nullptr;
    explicit LayerSettingsCreateInfoEXT(const std::vector<LayerSettingEXT> &s)
        : settingCount(static_cast<uint32_t>(s.size())), pSettings(s.data()) {}
};
}  /* namespace vk */
#endif
#endif
"""


def write_vulkan_compat(build: Path) -> Path:
    """VULKAN_COMPAT_H in the CMake build folder (rewritten only when it changed: every C++ object depends on it)."""
    build.mkdir(parents=True, exist_ok=True)
    f = build / "molink-vulkan-compat.h"
    if not f.is_file() or f.read_text(encoding="utf-8") != VULKAN_COMPAT_H:
        f.write_text(VULKAN_COMPAT_H, encoding="utf-8")
    return f


def find_glslc() -> str:
    """The glslc shader compiler ggml-vulkan compiles its shaders with (PATH, then $VULKAN_SDK/bin)."""
    exe = shutil.which("glslc")
    if exe:
        return exe
    sdk = os.environ.get("VULKAN_SDK")
    if sdk:
        for sub in ("bin", "Bin"):
            cand = Path(sdk) / sub / ("glslc.exe" if is_windows() else "glslc")
            if cand.is_file():
                return str(cand)
    raise BuildError("glslc not found (PATH, $VULKAN_SDK/bin): " + VULKAN_SDK_HINT)


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def detect_cuda_arch() -> Optional[str]:
    """Compute capabilities of the local GPUs as CMake wants them ("90", "86;89"), via nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi and is_windows():
        cand = Path(os.environ.get("ProgramFiles", r"C:\Program Files")) / "NVIDIA Corporation" / "NVSMI" / "nvidia-smi.exe"
        smi = str(cand) if cand.is_file() else None
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = sorted({c.strip().replace(".", "") for c in out.splitlines() if re.fullmatch(r"\s*\d+\.\d+\s*", c)}, key=int)
    return ";".join(caps) or None


# --------------------------------------------------------------------------- source
def fetch_sdist(dest: Path, version: str) -> Path:
    """Download the llama-cpp-python sdist with pip (PyPI or the configured index) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz")) + sorted(dest.glob(f"llama-cpp-python-{version}.tar.gz"))
    if found:
        log(f"using downloaded sdist {found[0]}")
        return found[0]
    run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={version}", "-d", str(dest)], what="pip download of the llama-cpp-python sdist")
    found = sorted(dest.glob(f"llama*cpp*python-{version}.tar.gz")) + sorted(dest.glob(f"llama*cpp*python-{version}.zip"))
    if not found:
        raise BuildError(f"pip download finished but no llama_cpp_python-{version} sdist is in {dest}")
    return found[0]


def extract(archive: Path, dest: Path) -> Path:
    """Extract a .tar.gz/.zip sdist into ``dest`` (once); returns the extracted root folder."""
    stamp = dest / (archive.name + ".extracted")
    if stamp.is_file():
        root = Path(stamp.read_text().strip())
        if root.is_dir():
            return root
    log(f"extracting {archive.name}")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="x-", dir=dest))
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(tmp, filter="data")
            else:  # pragma: no cover - old Pythons: refuse path escapes ourselves
                for m in t.getmembers():
                    if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts:
                        raise BuildError(f"unsafe path in {archive}: {m.name}")
                t.extractall(tmp)
    tops = [p for p in tmp.iterdir()]
    inner = tops[0] if len(tops) == 1 and tops[0].is_dir() else tmp
    root = dest / inner.name if inner is not tmp else dest / archive.name.split(".tar")[0]
    if root.exists():
        shutil.rmtree(root)
    shutil.move(str(inner), str(root))
    shutil.rmtree(tmp, ignore_errors=True)
    stamp.write_text(str(root))
    return root


def llama_cpp_root(src: Path) -> Path:
    """The llama.cpp source root inside an sdist (vendor/llama.cpp) or a llama.cpp checkout itself."""
    for cand in (src / "vendor" / "llama.cpp", src):
        if (cand / "CMakeLists.txt").is_file() and (cand / "include" / "llama.h").is_file():
            return cand
    raise BuildError(f"{src} is neither a llama-cpp-python sdist (vendor/llama.cpp/) nor a llama.cpp source tree "
                     "(CMakeLists.txt + include/llama.h)")


def own_copy(src: Path, dest: Path) -> Path:
    """A copy of a llama.cpp folder this script may patch (kept under ``dest``, refreshed when the source changes
    its version file or the copy is missing)."""
    copy = dest / f"{src.name}-{hashlib.sha256(str(src).encode()).hexdigest()[:10]}"
    stamp = copy / ".molink-copied-from"
    if not stamp.is_file() or stamp.read_text(encoding="utf-8") != str(src):
        log(f"copying {src} to {copy} (the patch set is applied there, not in your folder)")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns(".git", "build", patchset.STATE_DIR))
        stamp.write_text(str(src), encoding="utf-8")
    return copy


def sdist_version(src: Path) -> Optional[str]:
    """llama-cpp-python version of an sdist folder (llama_cpp/__init__.py), if it is one."""
    init = src / "llama_cpp" / "__init__.py"
    if init.is_file():
        m = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text(encoding="utf-8", errors="replace"))
        if m:
            return m.group(1)
    return None


def installed_bindings_version() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- configure / build
def generator_args(cmake: str, ninja: Optional[str]) -> List[str]:
    if ninja and (not is_windows() or shutil.which("cl") or os.environ.get("CXX")):
        return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return []  # CMake's default: Unix Makefiles, or the newest Visual Studio on Windows


def cmake_cache_generator(build: Path) -> Optional[str]:
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return None
    m = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.M)
    return m.group(1).strip() if m else None


# A native x86-64 build on a CPU with AMX (Xeon Sapphire Rapids and newer) compiles in llama.cpp 0.3.36's AMX matmul
# kernels, which crash the first Q4_K decode (a segfault, or an illegal instruction where the VM hides AMX from the
# kernel); engine-notes.md. GCC and Clang leave them out with these.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def compiler_flag_args(native: bool, cxx_extra: str = "") -> List[str]:
    """-DCMAKE_C_FLAGS / -DCMAKE_CXX_FLAGS where the build needs flags of its own: $CFLAGS / $CXXFLAGS (which a
    -DCMAKE_*_FLAGS replaces), plus NO_AMX for a native x86-64 build outside MSVC, plus ``cxx_extra``."""
    amx = NO_AMX if native and not is_windows() and platform.machine().lower() in ("x86_64", "amd64") else ""
    if not amx and not cxx_extra:
        return []
    c = " ".join(f for f in (os.environ.get("CFLAGS", "").strip(), amx) if f)
    cxx = " ".join(f for f in (os.environ.get("CXXFLAGS", "").strip(), amx, cxx_extra) if f)
    return ([f"-DCMAKE_C_FLAGS={c}"] if amx else []) + [f"-DCMAKE_CXX_FLAGS={cxx}"]


def configure_args(args: argparse.Namespace) -> List[str]:
    cxx_extra = ""
    a = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        # only the libraries: no tests, examples, tools, server, unified app, common lib
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_OPENSSL=OFF",
        f"-DGGML_NATIVE={'OFF' if args.portable else 'ON'}",
    ]
    if not is_windows():
        # libllama finds its libggml* next to itself wherever the folder is moved
        a += ["-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
              f"-DCMAKE_INSTALL_RPATH={'@loader_path' if is_macos() else '$ORIGIN'}"]
    if args.no_openmp:
        a.append("-DGGML_OPENMP=OFF")
    if args.with_tools:
        # llama.cpp's own llama-server and ggml-rpc-server against the same libraries (benchmark baselines);
        # later -D values override the OFFs above
        # (no web UI: building it needs npm, fetching it needs the network; the API works without it)
        a += ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_COMMON=ON", "-DGGML_RPC=ON",
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    if args.backend == "cuda":
        a += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}",
              f"-DCMAKE_CUDA_COMPILER={args.nvcc}"]
    elif args.backend == "vulkan":
        a.append("-DGGML_VULKAN=ON")  # one build for AMD, Intel and NVIDIA GPUs (and Mesa's lavapipe)
        if getattr(args, "vulkan_compat", None):  # older Vulkan headers (see VULKAN_COMPAT_H)
            cxx_extra = f"-include {args.vulkan_compat}"
    elif is_macos():
        a.append("-DGGML_METAL=OFF")  # llama.cpp turns Metal on by default on macOS; "cpu" means CPU only
    a += compiler_flag_args(not args.portable, cxx_extra)
    a += list(args.cmake_arg or [])
    return a


def configure_hint(text: str, backend: str) -> Optional[str]:
    low = text.lower()
    if "no cmake_cxx_compiler could be found" in low or "no cmake_c_compiler could be found" in low:
        return "CMake found no C/C++ compiler: install gcc/clang (Linux/macOS) or Visual Studio Build Tools (Windows)."
    if "generator" in low and "could not find any instance of visual studio" in low:
        return "No Visual Studio found: install 'Visual Studio Build Tools' with 'Desktop development with C++'."
    if backend == "cuda" and ("cuda toolkit not found" in low or "failed to find nvcc" in low
                              or "no cmake_cuda_compiler could be found" in low):
        return "CMake could not use the CUDA toolkit: check nvcc runs and $CUDA_PATH/$CUDA_HOME point at it."
    if backend == "cuda" and "unsupported gnu version" in low:
        return ("nvcc does not support this host compiler version; pass an older one with "
                "--cmake-arg=-DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-12 (for example).")
    if backend == "cuda" and "native" in low and "architectures" in low:
        return "CUDA arch 'native' needs a visible GPU (and CMake >= 3.24): pass --cuda-arch explicitly, e.g. 90."
    if backend == "vulkan" and "spirv-headers" in low:
        return ("ggml-vulkan needs SPIRV-Headers' CMake package: apt-get install spirv-headers (Debian/Ubuntu), "
                "or the LunarG Vulkan SDK with $VULKAN_SDK set.")
    if backend == "vulkan" and ("could not find vulkan" in low or "glslc" in low):
        return VULKAN_SDK_HINT
    return None


def configure(cmake: str, src: Path, build: Path, args: argparse.Namespace) -> None:
    gen = generator_args(cmake, args.ninja)
    old = cmake_cache_generator(build)
    if old is not None and (old == "Ninja") != bool(gen):
        log(f"build folder was configured with {old!r}; starting it afresh")
        shutil.rmtree(build)
    build.mkdir(parents=True, exist_ok=True)
    cmd = [cmake, "-S", str(src), "-B", str(build), *gen, *configure_args(args)]
    log("$ " + " ".join(_quote(c) for c in cmd))
    p = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (build / "molink-configure.log").write_text(p.stdout or "", encoding="utf-8")
    if p.returncode != 0:
        sys.stdout.write((p.stdout or "")[-15000:])
        hint = configure_hint(p.stdout or "", args.backend)
        raise BuildError("cmake configure failed" + (f": {hint}" if hint else f" (full log: {build / 'molink-configure.log'})"))
    for line in (p.stdout or "").splitlines():
        if any(k in line for k in ("CUDA Toolkit found", "Using CUDA architectures", "CMAKE_BUILD_TYPE", "llama.cpp version",
                                   "Including CPU backend", "Including CUDA backend", "Including METAL backend",
                                   "Including Vulkan backend", "Found Vulkan", "not supported by glslc",
                                   "OpenMP found", "Adding CPU backend variant")):
            log("  " + line.strip())


TOOLS = ("llama-server", "ggml-rpc-server")


def build_llama(cmake: str, build: Path, jobs: int, tools: bool = False) -> None:
    targets = ["llama", *(TOOLS if tools else ())]
    run([cmake, "--build", str(build), "--target", *targets, "--config", "Release", "-j", str(jobs)],
        what=f"cmake --build (targets {' '.join(targets)})")


def collect_tools(build: Path, out: Path) -> List[str]:
    """Copy llama-server and ggml-rpc-server next to the libraries (their RPATH is their own folder), with the
    shared libraries only they use (llama-server's own, llama.cpp's common library)."""
    got = []
    for d in (build / "bin" / "Release", build / "bin"):
        for f in sorted(d.glob("*.dll" if is_windows() else "*.dylib" if is_macos() else "*.so*")) if d.is_dir() else []:
            if not (out / f.name).exists():
                if f.is_symlink():
                    os.symlink(os.readlink(f), out / f.name)
                else:
                    shutil.copy2(f, out / f.name)
                got.append(f.name)
    for t in TOOLS:
        name = t + (".exe" if is_windows() else "")
        found = [f for f in sorted(build.rglob(name)) if f.is_file()]
        if not found:
            raise BuildError(f"{name} was not produced under {build}")
        shutil.copy2(found[0], out / name)
        got.append(name)
    return got


# --------------------------------------------------------------------------- collect / probe
def collect(build: Path, out: Path) -> List[str]:
    """Copy libllama + libggml* from the build tree into ``out`` (keeping .so version symlinks)."""
    bins = [d for d in (build / "bin" / "Release", build / "bin") if d.is_dir()]
    if not bins:
        raise BuildError(f"no {build / 'bin'} folder after the build")
    out.mkdir(parents=True, exist_ok=True)
    for pat in lib_patterns():  # clear libraries of an older build
        for old in out.glob(pat):
            if old.is_file() or old.is_symlink():
                old.unlink()
    copied: List[str] = []
    for d in bins:
        for pat in lib_patterns():
            for f in sorted(d.glob(pat)):
                if f.name in copied or f.is_dir():
                    continue
                dst = out / f.name
                if f.is_symlink():
                    os.symlink(os.readlink(f), dst)
                else:
                    shutil.copy2(f, dst)
                copied.append(f.name)
    if not any((out / n).exists() for n in main_lib_names()):
        raise BuildError(f"the build produced none of {main_lib_names()} in {[str(d) for d in bins]}")
    return sorted(copied)


def copy_cuda_runtime(nvcc: str, out: Path) -> List[str]:
    """Windows: put the CUDA runtime DLLs the libraries need next to them (as the official wheels do)."""
    if not is_windows():
        return []
    copied = []
    tk_bin = Path(nvcc).parent
    for pat in ("cudart64_*.dll", "cublas64_*.dll", "cublasLt64_*.dll"):
        for f in list(tk_bin.glob(pat)) + list(tk_bin.glob("x64/" + pat)):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


PROBE_C = r"""
#include <stdio.h>
#include "llama.h"
int main(void) {
    printf("{\n  \"pointer\": %llu,\n  \"structs\": {\n", (unsigned long long) sizeof(void *));
@STRUCTS@
    printf("\n  }\n}\n");
    return 0;
}
"""


def probe_struct_sizes(cmake: str, src: Path, work: Path, args: argparse.Namespace) -> Dict[str, object]:
    """Compile and run a tiny C program printing sizeof() of the llama.h structs."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    lines = []
    for i, name in enumerate(STRUCTS):
        sep = '",\\n"' if i else '""'
        lines.append(f'    printf("%s    \\"{name}\\": %llu", {sep}, (unsigned long long) sizeof(struct {name}));')
    (work / "struct_sizes.c").write_text(PROBE_C.replace("@STRUCTS@", "\n".join(lines)), encoding="utf-8")
    inc = [str(src / "include").replace("\\", "/"), str(src / "ggml" / "include").replace("\\", "/")]
    (work / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\n"
        "project(molink_struct_sizes C)\n"
        "add_executable(struct_sizes struct_sizes.c)\n"
        f'target_include_directories(struct_sizes PRIVATE "{inc[0]}" "{inc[1]}")\n', encoding="utf-8")
    bdir = work / "build"
    run([cmake, "-S", str(work), "-B", str(bdir), *generator_args(cmake, args.ninja), "-DCMAKE_BUILD_TYPE=Release"],
        capture=True, what="configure of the struct-size probe")
    run([cmake, "--build", str(bdir), "--config", "Release"], capture=True, what="build of the struct-size probe")
    exe_name = "struct_sizes.exe" if is_windows() else "struct_sizes"
    exes = [p for p in (bdir / exe_name, bdir / "Release" / exe_name) if p.is_file()]
    if not exes:
        raise BuildError(f"struct-size probe built but {exe_name} not found under {bdir}")
    p = subprocess.run([str(exes[0])], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise BuildError(f"struct-size probe exited with {p.returncode}: {p.stdout}")
    return json.loads(p.stdout)


def probe_struct_sizes_asm(cc: Sequence[str], src: Path, work: Path) -> Dict[str, object]:
    """``sizeof`` of the same structs as :func:`probe_struct_sizes`, for a target this machine cannot run
    (a cross-compiler: ``x86_64-w64-mingw32-gcc``): the target compiler lays the sizes out as a constant
    array, and they are read back from its assembly output (``.quad N``), so no target code has to run."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    names = ["pointer", *STRUCTS]
    sizes = ["sizeof(void *)"] + [f"sizeof(struct {n})" for n in STRUCTS]
    (work / "struct_sizes.c").write_text(
        '#include "llama.h"\n'
        "const unsigned long long molink_struct_sizes[] = {\n    " + ",\n    ".join(sizes) + "\n};\n",
        encoding="utf-8")
    asm = work / "struct_sizes.s"
    run([*cc, "-S", "-O0", "-o", str(asm), "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
         str(work / "struct_sizes.c")], capture=True, what="cross-compile of the struct-size probe")
    text = asm.read_text(encoding="utf-8", errors="replace")
    m = re.search(r"molink_struct_sizes:\s*\n((?:\s*\.quad\s+\d+\s*\n)+)", text)
    values = [int(v) for v in re.findall(r"\.quad\s+(\d+)", m.group(1))] if m else []
    if len(values) != len(names):
        raise BuildError(f"struct-size probe: expected {len(names)} sizes in {asm}, found {len(values)}")
    return {"pointer": values[0], "structs": dict(zip(STRUCTS, values[1:])),
            "method": "sizeof() read from the target compiler's assembly output (" + os.path.basename(cc[0]) + ")"}


# --------------------------------------------------------------------------- main
def config_key(args: argparse.Namespace, version: str) -> str:
    """Hash of everything that decides the build's output (build.py itself included)."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    cfg = [version, args.backend, args.cuda_arch or "", str(args.portable), str(args.no_openmp), str(args.with_tools),
           sys.platform, platform.machine(), *(args.cmake_arg or []),
           "patches:" + ("none" if args.no_patches else patchset.digest(patchset.patch_files()))]
    h.update("\0".join(cfg).encode())
    return h.hexdigest()[:20]


def up_to_date(out: Path, key: str) -> bool:
    info = out / "build_info.json"
    if not info.is_file() or not (out / "struct_sizes.json").is_file():
        return False
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return data.get("key") == key and any((out / n).exists() for n in main_lib_names())


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Then: export LLAMA_CPP_LIB_PATH=<out> (before llama_cpp is imported).")
    ap.add_argument("--backend", choices=["cpu", "cuda", "vulkan"], required=True)
    ap.add_argument("--cuda-arch", default=None,
                    help="CMAKE_CUDA_ARCHITECTURES: '90' (H100), '86;89', 'native', 'all-major' ... "
                         "(default: the local GPUs' compute capabilities from nvidia-smi)")
    ap.add_argument("--portable", action="store_true",
                    help="GGML_NATIVE=OFF: do not tune the CPU code for this machine's CPU (x86-64: AVX2/FMA/F16C "
                         "baseline), so the libraries run on other machines too")
    ap.add_argument("--no-openmp", action="store_true", help="GGML_OPENMP=OFF (ggml's own thread pool)")
    ap.add_argument("--with-tools", action="store_true",
                    help="also build llama.cpp's llama-server and ggml-rpc-server (RPC on) into --out, against the "
                         "same libraries: the baselines of tests/bench/gpu_pipeline.py --baseline (needs the "
                         "source's tools/ folder)")
    ap.add_argument("--out", type=Path, default=None, help="where the libraries go (default kernels/build/<backend>/lib in a checkout, "
                         "else ~/.cache/molink-lite/kernels-build/<backend>/lib)")
    ap.add_argument("--src", type=Path, default=None,
                    help="llama-cpp-python sdist (.tar.gz or unpacked folder) or a llama.cpp source folder "
                         "(default: pip download llama-cpp-python==%s)" % LLAMA_CPP_PYTHON_VERSION)
    ap.add_argument("--build-dir", type=Path, default=None,
                    help="CMake build folder (default kernels/build/<backend>/cmake)")
    ap.add_argument("--download-dir", type=Path, default=None,
                    help="where the sdist is downloaded and unpacked (default kernels/build/src)")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    ap.add_argument("--lcp-version", dest="lcp_version", default=LLAMA_CPP_PYTHON_VERSION,
                    help="llama-cpp-python sdist version to fetch (default %(default)s, the pinned one)")
    ap.add_argument("--cmake-arg", action="append", metavar="ARG", help="extra cmake configure argument (repeatable)")
    ap.add_argument("--no-patches", action="store_true",
                    help="build the pristine llama.cpp source, without kernels/patches/ (stages then use the pinned "
                         "API's slower paths; for comparisons)")
    ap.add_argument("--force", action="store_true", help="rebuild even if --out holds a build with these settings")
    ap.add_argument("--clean-build", action="store_true", help="delete the CMake build folder after a successful build")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    t_start = time.perf_counter()
    out = (args.out or BUILD_ROOT / args.backend / "lib").expanduser().resolve()
    build = (args.build_dir or BUILD_ROOT / args.backend / "cmake").expanduser().resolve()
    dl = (args.download_dir or BUILD_ROOT / "src").expanduser().resolve()
    args.nvcc = None
    args.ninja = None

    try:
        bound = installed_bindings_version()
        if bound and bound.split("+")[0] != args.lcp_version:
            log(f"WARNING: the installed llama-cpp-python is {bound} but this builds {args.lcp_version}; "
                "the bindings' structs may not match the libraries (check_struct_sizes will tell)")

        if args.backend == "cuda":
            if args.cuda_arch is None:
                args.cuda_arch = detect_cuda_arch()
                if args.cuda_arch is None:
                    raise BuildError("no GPU found with nvidia-smi to pick the CUDA architecture from; pass "
                                     "--cuda-arch (e.g. 90 for H100/H200, 89 for RTX 40xx/L4/L40, 86 for RTX 30xx/A10, "
                                     "80 for A100, 75 for T4)")
                log(f"CUDA architecture from nvidia-smi: {args.cuda_arch}")
        elif args.cuda_arch:
            raise BuildError("--cuda-arch only applies to --backend cuda")

        key = config_key(args, args.lcp_version)
        if not args.force and up_to_date(out, key):
            log(f"{out} already holds this build (build_info.json key {key}); --force rebuilds")
            for line in export_line(out):
                print(line)
            return 0

        cmake = find_cmake()
        if args.cuda_arch == "native" and cmake_version(cmake) < (3, 24):
            raise BuildError("--cuda-arch native needs cmake >= 3.24; pass the number (e.g. 90) instead")
        warn = check_compiler()
        if warn:
            log("WARNING: " + warn)
        if args.backend == "cuda":
            args.nvcc = find_nvcc()
            log(f"nvcc: {args.nvcc} (CUDA {nvcc_version(args.nvcc)})")
        if args.backend == "vulkan":
            log(f"glslc: {find_glslc()}")
        args.ninja = find_ninja()
        log(f"generator: {'Ninja (' + args.ninja + ')' if generator_args(cmake, args.ninja) else 'CMake default'}")

        # source
        if args.src is None:
            src_root = extract(fetch_sdist(dl, args.lcp_version), dl)
        else:
            s = args.src.expanduser().resolve()
            if not s.exists():
                raise BuildError(f"--src {s} does not exist")
            src_root = extract(s, dl) if s.is_file() else s
        llama_src = llama_cpp_root(src_root)
        if args.src is not None and args.src.expanduser().resolve().is_dir():
            llama_src = own_copy(llama_src, dl)  # a folder of the user's: patched (or restored) in a copy
        patches = [] if args.no_patches else patchset.patch_files()
        try:
            applied = patchset.ensure(llama_src, patches, log=log)
        except patchset.PatchError as e:
            raise BuildError(f"the patch set does not apply to {llama_src}: {e} (--no-patches builds it as is)")
        ver = sdist_version(src_root)
        if ver and ver != args.lcp_version:
            log(f"WARNING: --src is llama-cpp-python {ver}, not {args.lcp_version}")
        log(f"llama.cpp source: {llama_src}")

        t0 = time.perf_counter()
        if args.backend == "vulkan" and not is_windows():
            args.vulkan_compat = write_vulkan_compat(build)
        configure(cmake, llama_src, build, args)
        t1 = time.perf_counter()
        build_llama(cmake, build, args.jobs, args.with_tools)
        t2 = time.perf_counter()
        libs = collect(build, out)
        if args.with_tools:
            libs += collect_tools(build, out)
        if args.backend == "cuda":
            libs += copy_cuda_runtime(args.nvcc, out)
        sizes = probe_struct_sizes(cmake, llama_src, build.parent / (build.name + "-probe"), args)
        sizes["llama_cpp_python"] = ver or "unknown"
        (out / "struct_sizes.json").write_text(json.dumps(sizes, indent=2) + "\n", encoding="utf-8")
        t3 = time.perf_counter()
        info = {
            "key": key,
            "backend": args.backend,
            "llama_cpp_python": ver or "unknown",
            "cuda_arch": args.cuda_arch,
            "cuda_version": nvcc_version(args.nvcc) if args.nvcc else None,
            "portable": args.portable,
            "openmp": not args.no_openmp,
            "patches": applied,
            "platform": f"{sys.platform}-{platform.machine()}",
            "configure_args": configure_args(args),
            "libraries": libs,
            "jobs": args.jobs,
            "configure_seconds": round(t1 - t0, 1),
            "build_seconds": round(t2 - t1, 1),
            "total_seconds": round(t3 - t_start, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if args.clean_build:
            shutil.rmtree(build, ignore_errors=True)
            shutil.rmtree(build.parent / (build.name + "-probe"), ignore_errors=True)
    except BuildError as e:
        print(f"[kernels] ERROR: {e}", file=sys.stderr, flush=True)
        return 1

    log(f"libraries: {', '.join(libs)}")
    log(f"configure {t1 - t0:.1f} s, build {t2 - t1:.1f} s ({args.jobs} jobs), total {t3 - t_start:.1f} s")
    log(f"struct sizes -> {out / 'struct_sizes.json'}")
    log("use them (before llama_cpp is imported):")
    for line in export_line(out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
