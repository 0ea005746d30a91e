#!/usr/bin/env python3
"""Build llama.cpp's own ``llama-server`` and ``ggml-rpc-server`` (CPU, ``-DGGML_RPC=ON``) for benchmarks.

``molink-lite bench --baseline whole,rpc`` compares molink-lite with llama.cpp serving the whole model
(``llama-server``) and with llama.cpp's RPC backend (``llama-server --rpc`` + ``ggml-rpc-server``), built
from the same llama.cpp source that the pinned llama-cpp-python vendors, so all three run the same
kernels.  The binaries are cached (``~/.cache/molink-lite/llama-tools/<version>/bin`` or
``$MOLINK_TOOLS_DIR``); later runs print the folder at once.

Usage::

    python kernels/build_tools.py [--out DIR] [--src SDIST] [--jobs N]

Needs cmake and a C/C++ compiler.  Prints ``LLAMA_TOOLS_DIR=<folder>`` on its last line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import (LLAMA_CPP_PYTHON_VERSION, BuildError, compiler_flag_args, extract, fetch_sdist, find_cmake,  # noqa: E402
                   find_ninja, generator_args, llama_cpp_root, log)

TOOLS = ("llama-server", "ggml-rpc-server")


def default_out() -> Path:
    env = os.environ.get("MOLINK_TOOLS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "molink-lite" / "llama-tools" / LLAMA_CPP_PYTHON_VERSION


def tool_path(out: Path, name: str) -> Path:
    return out / "bin" / (name + (".exe" if sys.platform == "win32" else ""))


def built(out: Path) -> bool:
    """True when every tool is already in ``out/bin``."""
    return all(tool_path(out, t).is_file() for t in TOOLS)


def build_tools(out: Path, src: Optional[Path] = None, jobs: Optional[int] = None) -> Path:
    """Build the tools into ``out/bin`` (no-op when present); returns ``out/bin``."""
    if built(out):
        return out / "bin"
    t0 = time.perf_counter()
    work = out / "work"
    if src is None:
        src = fetch_sdist(work / "download", LLAMA_CPP_PYTHON_VERSION)
    if src.is_file():
        src = extract(src, work / "src")
    root = llama_cpp_root(src)
    cmake = find_cmake()
    build = work / "build"
    cfg = [cmake, "-S", str(root), "-B", str(build), *generator_args(cmake, find_ninja()),
           "-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
           "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
           "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", *compiler_flag_args(native=True)]
    log("configuring llama.cpp tools: " + " ".join(cfg[3:]))
    subprocess.run(cfg, check=True)
    j = str(jobs or os.cpu_count() or 2)
    log(f"building {', '.join(TOOLS)} with {j} jobs (several minutes on 2 cores)")
    subprocess.run([cmake, "--build", str(build), "--config", "Release", "-j", j, "--target", *TOOLS], check=True)
    (out / "bin").mkdir(parents=True, exist_ok=True)
    for t in TOOLS:
        found = sorted(build.rglob(tool_path(Path("."), t).name))
        found = [f for f in found if f.is_file()]
        if not found:
            raise BuildError(f"{t} was not produced under {build}")
        shutil.copy2(found[0], tool_path(out, t))
    shutil.rmtree(build, ignore_errors=True)
    log(f"built in {time.perf_counter() - t0:.0f} s")
    return out / "bin"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the cache)")
    p.add_argument("--src", type=Path, default=None, help="llama-cpp-python sdist (.tar.gz or folder)")
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: all cores)")
    a = p.parse_args(argv)
    try:
        bin_dir = build_tools(a.out or default_out(), a.src, a.jobs)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"[kernels] ERROR: {e}", file=sys.stderr)
        return 1
    print(f"LLAMA_TOOLS_DIR={bin_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
