#!/usr/bin/env python3
"""Build installable wheels of the pinned llama-cpp-python, and lay them out as a PEP 503 wheel index.

llama-cpp-python 0.3.36 is published only as a source distribution, so every ``pip install`` compiles
llama.cpp (minutes, and CMake plus a C++ toolchain; on Windows, Visual Studio). This script builds the
wheels the project publishes instead: the same version and the same Python bindings, compiled once::

    python kernels/wheel.py build --variant cpu  [--out dist/wheels]      # portable x86-64 CPU
    python kernels/wheel.py build --variant cu12 [--cuda-arch "61;70;75;80;86;89;90"]
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
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as libbuild  # noqa: E402 - kernels/build.py: sdist download, struct-size probe

VERSION = libbuild.LLAMA_CPP_PYTHON_VERSION
VARIANTS = ("cpu", "cu12", "cu13")
# compute capabilities: CUDA 12 reaches back to Pascal (6.1, GTX 10xx); CUDA 13 starts at Turing (7.5) and adds
# Blackwell (10.0 B200, 12.0 RTX 50xx)
DEFAULT_CUDA_ARCHS = {"cu12": "61;70;75;80;86;89;90", "cu13": "75;80;86;89;90;100;120"}
# the CUDA runtime and cuBLAS come from NVIDIA's registry wheels (CUDA 13 dropped the -cuXX suffix)
CUDA_REQUIRES = {"cu12": ("nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12"),
                 "cu13": ("nvidia-cuda-runtime==13.*", "nvidia-cublas==13.*")}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def cmake_args(variant: str, cuda_arch: str) -> List[str]:
    """CMake arguments of a variant (what ``CMAKE_ARGS`` gets for llama-cpp-python's build)."""
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF"]
    if X86:
        args += ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
                 "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    if variant.startswith("cu"):
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
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


def build(args: argparse.Namespace) -> Path:
    out = Path(args.out).expanduser().resolve() / args.variant
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "build.json"
    key = {"version": VERSION, "variant": args.variant,
           "cmake_args": cmake_args(args.variant, args.cuda_arch) + list(args.cmake_arg or []),
           "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "platform": sys.platform,
           "machine": platform.machine()}
    if stamp.is_file() and not args.force:
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in key} == key and Path(done.get("wheel", "")).is_file():
            libbuild.log(f"up to date: {done['wheel']}")
            return Path(done["wheel"])
    work = Path(args.work or tempfile.mkdtemp(prefix="molink-wheel-")).resolve()
    sdist = Path(args.sdist).resolve() if args.sdist else libbuild.fetch_sdist(work / "sdist", VERSION)
    env = {**os.environ, "CMAKE_ARGS": " ".join(key["cmake_args"]), "FORCE_CMAKE": "1"}
    if args.jobs:
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(args.jobs)
    # this script's own flags decide the CPU code: drop -march/-mno-amx style flags of the caller's shell
    for v in ("CFLAGS", "CXXFLAGS"):
        env.pop(v, None)
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
    info = {**key, "cuda_archs": args.cuda_arch if args.variant.startswith("cu") else None,
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
    b.add_argument("--out", default="dist/wheels", help="wheels go to OUT/<variant>/ (default %(default)s)")
    b.add_argument("--sdist", default=None, help="llama-cpp-python sdist (.tar.gz); default: pip download")
    b.add_argument("--work", default=None, help="work folder (kept); default: a temporary one")
    b.add_argument("--jobs", "-j", type=int, default=os.cpu_count(), help="parallel compile jobs")
    b.add_argument("--force", action="store_true", help="rebuild even when OUT/<variant> is up to date")
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
