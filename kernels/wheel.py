#!/usr/bin/env python3
"""Build installable wheels of the pinned llama-cpp-python, and lay them out as a PEP 503 wheel index.

llama-cpp-python 0.3.36 is published only as a source distribution, so every ``pip install`` compiles
llama.cpp (minutes, and CMake plus a C++ toolchain; on Windows, Visual Studio). This script builds the
wheels the project publishes instead: the same version and the same Python bindings, compiled once::

    python kernels/wheel.py build --variant cpu  [--out dist/wheels]      # portable x86-64 CPU
    python kernels/wheel.py build --variant cpu --platform win_amd64      # Windows, cross-built with MinGW-w64
    python kernels/wheel.py build --variant cu12 [--cuda-arch "61;70;75;80;86;89;90"]
    python kernels/wheel.py build --variant vulkan                         # AMD, Intel, NVIDIA GPUs (Vulkan)
    python kernels/wheel.py index --wheels dist/wheels --out site          # site/cpu/, site/cu12/ (PEP 503)

Variants:

- ``cpu``: ``GGML_NATIVE=OFF`` with the x86-64-v3 baseline (AVX2, FMA, F16C, BMI2; no AVX-512, no AMX),
  so one wheel runs on any x86-64 CPU from 2013 on, and never enters ggml's AMX kernels (which crash on
  Q4_K weights in this llama.cpp version). On arm64 the compiler's baseline is used.
- ``cu12`` (and ``cu13``, the same for CUDA 13 toolkits and drivers): the same CPU code plus ``GGML_CUDA=ON`` for compute capabilities 6.1 (Pascal, GTX 10xx)
  through 9.0 (H100) by default. The CUDA runtime and cuBLAS are *not* bundled: the wheel depends on
  NVIDIA's registry wheels ``nvidia-cuda-runtime-cu12`` and ``nvidia-cublas-cu12``, which
  :func:`molink_lite.stage.libpath.preload_cuda_runtime` loads before llama.cpp, so a user needs only the
  NVIDIA driver.
- ``vulkan``: the same CPU code plus ``GGML_VULKAN=ON``: one wheel for AMD, Intel and NVIDIA GPUs through the
  GPU driver's Vulkan (1.2+) support; nothing is bundled but the shaders (the Vulkan loader, ``libvulkan.so.1`` /
  ``vulkan-1.dll``, comes with the GPU driver). Building it needs the Vulkan headers, ``glslc`` and
  SPIRV-Headers (Debian/Ubuntu: ``apt-get install libvulkan-dev glslc spirv-headers``; Windows: the LunarG
  Vulkan SDK); older Vulkan headers (Debian 12's 1.3.239) get build.py's ``VULKAN_COMPAT_H`` shim. Mesa's
  lavapipe (a CPU Vulkan device) runs it without a GPU: tests/test_vulkan.py.

``--platform win_amd64`` on Linux cross-compiles the same sources with MinGW-w64 (Debian/Ubuntu:
``apt-get install mingw-w64``; the posix-thread ``x86_64-w64-mingw32-g++-posix``) into
``llama_cpp_python-<version>-py3-none-win_amd64.whl``: the same x86-64-v3 CPU code, ggml's own thread pool
(no OpenMP), libgcc/libstdc++/winpthread linked in statically, so the DLLs import only KERNEL32, ADVAPI32
and msvcrt. It is the wheel the Wine job (tests/test_windows.py) tests; the release workflow keeps building
the Windows wheels with MSVC on Windows. Its struct sizes are the target compiler's own ``sizeof``, read
from its assembly output (nothing has to run on Windows to record them). Rebuilds are keyed by the
sdist's hash, this script's and build.py's content and the flags (``--work`` keeps the CMake tree, so a
changed key rebuilds incrementally).

Every wheel also carries ``llama_cpp/lib/struct_sizes.json`` (the C ``sizeof`` of the structs the
bindings pass by value, probed against the same headers) and ``llama_cpp/lib/molink_build.json`` (the
variant and flags), which ``molink-lite doctor`` reports. Needs, at build time only: pip, CMake >= 3.18,
a C/C++ compiler, and for ``cu12`` the CUDA 12 toolkit. Pure standard library.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as libbuild  # noqa: E402 - kernels/build.py: sdist download, struct-size probe
import patchset  # noqa: E402 - kernels/patchset.py: the project's llama.cpp patches

VERSION = libbuild.LLAMA_CPP_PYTHON_VERSION
VARIANTS = ("cpu", "cu12", "cu13", "vulkan")
# compute capabilities: CUDA 12 reaches back to Pascal (6.1, GTX 10xx); CUDA 13 starts at Turing (7.5) and adds
# Blackwell (10.0 B200, 12.0 RTX 50xx)
DEFAULT_CUDA_ARCHS = {"cu12": "61;70;75;80;86;89;90", "cu13": "75;80;86;89;90;100;120"}
# the CUDA runtime and cuBLAS come from NVIDIA's registry wheels (CUDA 13 dropped the -cuXX suffix)
CUDA_REQUIRES = {"cu12": ("nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12"),
                 "cu13": ("nvidia-cuda-runtime==13.*", "nvidia-cublas==13.*")}
X86 = platform.machine().lower() in ("x86_64", "amd64")
PLATFORMS = ("native", "win_amd64")
MINGW = "x86_64-w64-mingw32"


def cmake_args(variant: str, cuda_arch: str, x86: bool = X86) -> List[str]:
    """CMake arguments of a variant (what ``CMAKE_ARGS`` gets for llama-cpp-python's build)."""
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF"]
    if x86:
        args += ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
                 "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    if variant.startswith("cu"):
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    if variant == "vulkan":
        args.append("-DGGML_VULKAN=ON")
    return args


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def add_to_wheel(wheel: Path, files: Dict[str, bytes], requires: Sequence[str]) -> None:
    """Add ``files`` and ``Requires-Dist`` lines to a wheel, rewriting its RECORD (in place)."""
    with zipfile.ZipFile(wheel) as z:
        entries = {i.filename: z.read(i.filename) for i in z.infolist()}
    dist_info = next(n.split("/")[0] for n in entries if n.endswith(".dist-info/METADATA"))
    meta = entries[f"{dist_info}/METADATA"].decode()
    head, sep, body = meta.partition("\n\n")
    for r in requires:
        if f"Requires-Dist: {r}" not in head:
            head += f"\nRequires-Dist: {r}"
    entries[f"{dist_info}/METADATA"] = (head + sep + body).encode()
    entries.update(files)
    record = f"{dist_info}/RECORD"
    rows = [f"{n},{_record_hash(d)},{len(d)}" for n, d in entries.items() if n != record] + [f"{record},,"]
    entries[record] = ("\n".join(rows) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in entries.items():
            z.writestr(n, d)
    os.replace(tmp, wheel)


def patch_key(args: argparse.Namespace) -> str:
    return "none" if getattr(args, "no_patches", False) else patchset.digest(patchset.patch_files())


def patched_sdist(sdist: Path, work: Path, args: argparse.Namespace) -> Tuple[Path, List[str]]:
    """The sdist as a folder under ``work`` with the patch set applied to its vendor/llama.cpp (none with
    --no-patches), and the names applied. A folder given as --sdist is copied first, never patched in place."""
    root = libbuild.extract(sdist, work / "src") if sdist.is_file() else libbuild.own_copy(sdist, work / "src")
    patches = [] if getattr(args, "no_patches", False) else patchset.patch_files()
    try:
        return root, patchset.ensure(libbuild.llama_cpp_root(root), patches, log=libbuild.log)
    except patchset.PatchError as e:
        raise libbuild.BuildError(f"the patch set does not apply to {root}: {e} (--no-patches builds it as is)")


def build(args: argparse.Namespace) -> Path:
    if getattr(args, "platform", "native") == "win_amd64" and not libbuild.is_windows():
        return build_mingw(args)
    out = Path(args.out).expanduser().resolve() / args.variant
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "build.json"
    key = {"version": VERSION, "variant": args.variant, "patches": patch_key(args),
           "cmake_args": cmake_args(args.variant, args.cuda_arch) + list(args.cmake_arg or []),
           "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "platform": sys.platform,
           "machine": platform.machine()}
    compat = args.variant == "vulkan" and not libbuild.is_windows()  # older Vulkan headers: build.py's shim
    if compat:
        key["vulkan_compat"] = hashlib.sha256(libbuild.VULKAN_COMPAT_H.encode()).hexdigest()[:16]
    if stamp.is_file() and not args.force:
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in key} == key and Path(done.get("wheel", "")).is_file():
            libbuild.log(f"up to date: {done['wheel']}")
            return Path(done["wheel"])
    work = Path(args.work or tempfile.mkdtemp(prefix="molink-wheel-")).resolve()
    sdist = Path(args.sdist).resolve() if args.sdist else libbuild.fetch_sdist(work / "sdist", VERSION)
    sdist, applied = patched_sdist(sdist, work, args)
    env = {**os.environ, "CMAKE_ARGS": " ".join(key["cmake_args"]), "FORCE_CMAKE": "1"}
    if args.jobs:
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(args.jobs)
    # this script's own flags decide the CPU code: drop -march/-mno-amx style flags of the caller's shell
    for v in ("CFLAGS", "CXXFLAGS"):
        env.pop(v, None)
    if args.variant == "vulkan":
        libbuild.log(f"glslc: {libbuild.find_glslc()}")
    if compat:
        env["CXXFLAGS"] = f"-include {libbuild.write_vulkan_compat(work / 'vulkan-compat')}"
    t0 = time.perf_counter()
    libbuild.log(f"building the {args.variant} wheel of llama-cpp-python {VERSION} (CMAKE_ARGS={env['CMAKE_ARGS']})")
    wdir = work / "wheel"
    shutil.rmtree(wdir, ignore_errors=True)
    isolation = ["--no-build-isolation"] if args.no_build_isolation else []
    libbuild.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", *isolation, "-w", str(wdir),
                  str(sdist)], env=env, what="pip wheel of llama-cpp-python")
    wheels = sorted(wdir.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise libbuild.BuildError(f"pip wheel finished but left no wheel in {wdir}")
    built = time.perf_counter() - t0
    src = libbuild.llama_cpp_root(libbuild.extract(sdist, work / "src")) if sdist.is_file() else \
        libbuild.llama_cpp_root(sdist)
    probe_ns = argparse.Namespace(ninja=libbuild.find_ninja())
    sizes = libbuild.probe_struct_sizes(libbuild.find_cmake(), src, work / "probe", probe_ns)
    info = {**key, "patches_applied": applied, "cuda_archs": args.cuda_arch if args.variant.startswith("cu") else None,
            "requires": list(CUDA_REQUIRES.get(args.variant, ())),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(built, 1)}
    wheel = out / wheels[0].name
    shutil.copy2(wheels[0], wheel)
    add_to_wheel(wheel, {"llama_cpp/lib/struct_sizes.json": json.dumps(sizes, indent=1).encode(),
                         "llama_cpp/lib/molink_build.json": json.dumps(info, indent=1).encode()},
                 info["requires"])
    stamp.write_text(json.dumps({**info, "wheel": str(wheel), "size": wheel.stat().st_size}, indent=1))
    libbuild.log(f"wrote {wheel} ({wheel.stat().st_size / 2**20:.1f} MiB) in {built:.0f} s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return wheel


# ----------------------------------------------------------------------------- Windows, cross-built with MinGW-w64
MINGW_TOOLCHAIN = f"""# CMake toolchain: Windows x86_64 with MinGW-w64, posix thread model (std::thread needs it with gcc 12)
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR AMD64)
set(CMAKE_C_COMPILER   {MINGW}-gcc-posix)
set(CMAKE_CXX_COMPILER {MINGW}-g++-posix)
set(CMAKE_RC_COMPILER  {MINGW}-windres)
set(CMAKE_FIND_ROOT_PATH /usr/{MINGW})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
"""
# force-included into C sources: mingw-w64 v10 (Debian 12) lacks THREAD_POWER_THROTTLING_STATE (v11+ has it),
# which ggml-cpu.c uses; layout per the Windows SDK
MINGW_COMPAT_H = """#if defined(_WIN32) && !defined(THREAD_POWER_THROTTLING_CURRENT_VERSION)
#define THREAD_POWER_THROTTLING_CURRENT_VERSION 1
#define THREAD_POWER_THROTTLING_EXECUTION_SPEED 0x1
#define THREAD_POWER_THROTTLING_VALID_FLAGS (THREAD_POWER_THROTTLING_EXECUTION_SPEED)
typedef struct _THREAD_POWER_THROTTLING_STATE {
    unsigned long Version;
    unsigned long ControlMask;
    unsigned long StateMask;
} THREAD_POWER_THROTTLING_STATE, *PTHREAD_POWER_THROTTLING_STATE;
#endif
"""
MINGW_DLLS = ("ggml-base.dll", "ggml-cpu.dll", "ggml.dll", "libllama.dll")


def mingw_cmake_args(variant: str) -> List[str]:
    return [*cmake_args(variant, "", x86=True), "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DGGML_CCACHE=OFF",
            # libgcc, libstdc++ and winpthread linked in, and not re-exported by ggml-base.dll
            "-DCMAKE_SHARED_LINKER_FLAGS=-static -static-libgcc -static-libstdc++ -Wl,--exclude-libs,ALL"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mingw_tools() -> Dict[str, str]:
    tools = {}
    for tool in (f"{MINGW}-gcc-posix", f"{MINGW}-g++-posix", f"{MINGW}-objdump"):
        exe = shutil.which(tool)
        if not exe:
            raise libbuild.BuildError(f"{tool} not found: the win_amd64 wheel is cross-built with MinGW-w64 "
                                      "(Debian/Ubuntu: apt-get install mingw-w64)")
        tools[tool] = exe
    return tools


def _dll_imports(objdump: str, dll: Path) -> List[str]:
    out = subprocess.run([objdump, "-p", str(dll)], text=True, capture_output=True).stdout
    return sorted({m.strip() for m in re.findall(r"DLL Name:\s*(\S+)", out)})


def pack_windows_wheel(sdist_root: Path, dlls: Sequence[Path], out: Path, tag: str = "py3-none-win_amd64") -> Path:
    """llama-cpp-python's Python package from the sdist plus the DLLs (in ``llama_cpp/lib/``), as the wheel
    pip installs like the official ones. File dates are fixed: the same inputs give the same bytes."""
    from email.parser import Parser

    meta = (sdist_root / "PKG-INFO").read_text(encoding="utf-8")
    info = Parser().parsestr(meta)
    name, version = info["Name"].replace("-", "_"), info["Version"]
    dist_info = f"{name}-{version}.dist-info"
    entries: Dict[str, bytes] = {}
    pkg = sdist_root / "llama_cpp"
    for root, dirs, files in os.walk(pkg):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "lib"))
        for f in sorted(files):
            if not f.endswith((".pyc", ".pyo")):
                p = Path(root) / f
                entries[p.relative_to(sdist_root).as_posix()] = p.read_bytes()
    for d in dlls:
        entries[f"llama_cpp/lib/{d.name}"] = d.read_bytes()
    if (sdist_root / "LICENSE.md").is_file():
        entries[f"{dist_info}/licenses/LICENSE.md"] = (sdist_root / "LICENSE.md").read_bytes()
    entries[f"{dist_info}/METADATA"] = meta.encode()
    entries[f"{dist_info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: molink-lite kernels/wheel.py\n"
                                     f"Root-Is-Purelib: false\nTag: {tag}\n").encode()
    entries[f"{dist_info}/top_level.txt"] = b"llama_cpp\n"
    record = f"{dist_info}/RECORD"
    entries[record] = ("\n".join([f"{n},{_record_hash(d)},{len(d)}" for n, d in entries.items()] + [f"{record},,"])
                       + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{name}-{version}-{tag}.whl"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in entries.items():
            z.writestr(zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0)), d, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, wheel)
    return wheel


def build_mingw(args: argparse.Namespace) -> Path:
    """The win_amd64 wheel, cross-compiled with MinGW-w64 (on Linux)."""
    if args.variant != "cpu":
        raise libbuild.BuildError(f"--platform win_amd64 cross-builds only the cpu variant (not {args.variant}): "
                                  "CUDA wheels for Windows are built on Windows (the release workflow)")
    tools = _mingw_tools()
    cxx = tools[f"{MINGW}-g++-posix"]
    gcc_version = subprocess.run([cxx, "-dumpfullversion"], text=True, capture_output=True).stdout.strip()
    out = Path(args.out).expanduser().resolve() / args.variant
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="molink-wheel-win-")).resolve()
    sdist = Path(args.sdist).resolve() if args.sdist else libbuild.fetch_sdist(work / "sdist", VERSION)
    here = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    sources.update(_sha256_file(sdist).encode() if sdist.is_file() else str(sdist).encode())
    for f in (here / "wheel.py", here / "build.py"):
        sources.update(f.read_bytes())
    key = {"version": VERSION, "variant": args.variant, "platform": "win_amd64",
           "cmake_args": mingw_cmake_args(args.variant) + list(args.cmake_arg or []),
           "compiler": f"{MINGW}-g++-posix {gcc_version}", "sources": sources.hexdigest()[:24],
           "patches": patch_key(args)}
    stamp = out / "build-win_amd64.json"
    if stamp.is_file() and not args.force:
        try:
            done = json.loads(stamp.read_text())
        except ValueError:
            done = {}
        if {k: done.get(k) for k in key} == key and Path(done.get("wheel", "")).is_file():
            libbuild.log(f"up to date: {done['wheel']}")
            return Path(done["wheel"])
    t0 = time.perf_counter()
    root, applied = patched_sdist(sdist, work, args)
    src = libbuild.llama_cpp_root(root)
    tc = work / "mingw"
    tc.mkdir(parents=True, exist_ok=True)
    (tc / "toolchain.cmake").write_text(MINGW_TOOLCHAIN, encoding="utf-8")
    (tc / "mingw-compat.h").write_text(MINGW_COMPAT_H, encoding="utf-8")
    bdir = work / "build-win_amd64"
    cmake = libbuild.find_cmake()
    ninja = libbuild.find_ninja()
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    libbuild.log(f"cross-building the win_amd64 {args.variant} wheel of llama-cpp-python {VERSION} with "
                 f"{MINGW}-g++-posix {gcc_version}")
    libbuild.run([cmake, "-S", str(src), "-B", str(bdir), *gen, f"-DCMAKE_TOOLCHAIN_FILE={tc / 'toolchain.cmake'}",
                  "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_FLAGS=-include {tc / 'mingw-compat.h'}", *key["cmake_args"]],
                 capture=True, what="cmake configure (MinGW-w64)")
    libbuild.run([cmake, "--build", str(bdir), "--target", "llama", "ggml", "ggml-base", "ggml-cpu",
                  "-j", str(args.jobs or 2)], what="cmake --build (MinGW-w64)")
    built = time.perf_counter() - t0
    dlls = []
    for name in MINGW_DLLS:
        found = sorted(bdir.rglob(name))
        if not found:
            raise libbuild.BuildError(f"the MinGW build produced no {name} under {bdir}")
        dlls.append(found[0])
    allowed = {"kernel32.dll", "advapi32.dll", "msvcrt.dll", *(d.name.lower() for d in dlls)}
    for d in dlls:  # nothing a Windows machine would miss: no libgcc/libstdc++/winpthread DLLs
        extra = [i for i in _dll_imports(tools[f"{MINGW}-objdump"], d) if i.lower() not in allowed]
        if extra:
            raise libbuild.BuildError(f"{d.name} imports {', '.join(extra)}, which a Windows machine may not have")
    sizes = libbuild.probe_struct_sizes_asm([tools[f"{MINGW}-gcc-posix"]], src, work / "probe-win_amd64")
    sizes["llama_cpp_python"] = libbuild.sdist_version(root) or VERSION
    info = {**key, "patches_applied": applied, "cuda_archs": None, "requires": [], "python": "py3", "machine": "AMD64",
            "threads": "ggml thread pool (GGML_OPENMP=OFF)",
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(built, 1)}
    wheel = pack_windows_wheel(root, dlls, out)
    add_to_wheel(wheel, {"llama_cpp/lib/struct_sizes.json": json.dumps(sizes, indent=1).encode(),
                         "llama_cpp/lib/molink_build.json": json.dumps(info, indent=1).encode()}, ())
    stamp.write_text(json.dumps({**info, "wheel": str(wheel), "size": wheel.stat().st_size}, indent=1))
    libbuild.log(f"wrote {wheel} ({wheel.stat().st_size / 2**20:.1f} MiB) in {built:.0f} s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return wheel


def index(args: argparse.Namespace) -> None:
    """``<out>/<variant>/index.html`` and ``<out>/<variant>/llama-cpp-python/index.html``. The wheels are copied
    next to the index, or, with ``--base-url`` (``{variant}`` is replaced), linked where they are hosted:
    CUDA wheels are hundreds of MB, past what a static site holds, so releases host them."""
    src, out = Path(args.wheels).resolve(), Path(args.out).resolve()
    for variant in VARIANTS:
        wheels = sorted((src / variant).glob("*.whl")) if (src / variant).is_dir() else []
        if not wheels:
            continue
        proj = out / variant / "llama-cpp-python"
        proj.mkdir(parents=True, exist_ok=True)
        links = []
        for w in wheels:
            if args.base_url:
                href = args.base_url.replace("{variant}", variant).rstrip("/") + "/" + w.name
            else:
                shutil.copy2(w, proj / w.name)
                href = w.name
            digest = hashlib.sha256(w.read_bytes()).hexdigest()
            links.append(f'<a href="{html.escape(href)}#sha256={digest}">{html.escape(w.name)}</a><br>')
        (proj / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "\n".join(links) + "\n</body></html>\n")
        (out / variant / "index.html").write_text(
            '<!DOCTYPE html>\n<html><body>\n<a href="llama-cpp-python/">llama-cpp-python</a>\n</body></html>\n')
        libbuild.log(f"index {out / variant}: {len(wheels)} wheel(s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build one wheel variant")
    b.add_argument("--variant", choices=VARIANTS, required=True)
    b.add_argument("--cuda-arch", default=None,
                   help="CUDA compute capabilities (default: cu12 %s; cu13 %s)" % (DEFAULT_CUDA_ARCHS["cu12"],
                                                                              DEFAULT_CUDA_ARCHS["cu13"]))
    b.add_argument("--platform", choices=PLATFORMS, default="native",
                   help="native (this machine's OS; default) or win_amd64: on Linux, cross-compile the cpu "
                        "variant for Windows x64 with MinGW-w64")
    b.add_argument("--out", default="dist/wheels", help="wheels go to OUT/<variant>/ (default %(default)s)")
    b.add_argument("--sdist", default=None, help="llama-cpp-python sdist (.tar.gz); default: pip download")
    b.add_argument("--work", default=None, help="work folder (kept); default: a temporary one")
    b.add_argument("--jobs", "-j", type=int, default=os.cpu_count(), help="parallel compile jobs")
    b.add_argument("--force", action="store_true", help="rebuild even when OUT/<variant> is up to date")
    b.add_argument("--no-patches", action="store_true",
                   help="build the pristine llama.cpp source, without kernels/patches/")
    b.add_argument("--no-build-isolation", action="store_true",
                   help="build with the packages already installed (scikit-build-core): for machines without a "
                        "package registry")
    b.add_argument("--cmake-arg", action="append", metavar="ARG", help="extra CMake argument (repeatable)")
    i = sub.add_parser("index", help="lay built wheels out as PEP 503 indexes, one per variant")
    i.add_argument("--wheels", default="dist/wheels")
    i.add_argument("--out", default="dist/index")
    i.add_argument("--base-url", default=None,
                   help="link the wheels at this URL instead of copying them ({variant} is replaced), e.g. "
                        "https://github.com/OWNER/REPO/releases/download/engine-{variant}")
    args = ap.parse_args(argv)
    if args.cmd == "build" and args.cuda_arch is None:
        args.cuda_arch = DEFAULT_CUDA_ARCHS.get(args.variant, "")
    try:
        if args.cmd == "build":
            print(build(args))
        else:
            index(args)
    except libbuild.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
