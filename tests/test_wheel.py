"""The Linux CPU engine wheel built by kernels/wheel.py installs with no compiler and runs the split.

The wheel is built once per machine (cached in ~/.cache/molink-lite/wheels; a build takes about 5
minutes on 2 cores). A fresh virtualenv gets it on a PATH holding no C compiler and no CMake (CC/CXX
unset), so pip cannot fall back to compiling; then `molink-lite doctor` must report the project wheel
with matching struct sizes, and the split-exact, serving and codec-fidelity tests run against it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("MOLINK_WHEEL_CACHE", Path.home() / ".cache" / "molink-lite" / "wheels"))
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "cmake", "nvcc")


def _bare_path(d: Path, venv: Path) -> str:
    """A PATH with the venv and a few shell tools, and no compiler or CMake."""
    d.mkdir()
    for tool in ("sh", "env", "uname", "ldconfig"):
        exe = shutil.which(tool)
        if exe:
            (d / tool).symlink_to(exe)
    return os.pathsep.join([str(venv / "bin"), str(d)])


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="the wheel test builds the Linux x86_64 CPU wheel")
def test_cpu_wheel_installs_without_a_compiler_and_splits_exactly(tmp_path):
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("building the wheel needs cmake and a C++ compiler on this machine")
    b = subprocess.run([sys.executable, str(ROOT / "kernels" / "wheel.py"), "build", "--variant", "cpu",
                        "--out", str(WHEELS)], capture_output=True, text=True, timeout=3000)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    wheel = Path(b.stdout.strip().splitlines()[-1])
    print(f"\nwheel {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CC", "CXX", "CMAKE_ARGS", "VIRTUAL_ENV", "PYTHONPATH", "LLAMA_CPP_LIB_PATH")}
    env["PATH"] = _bare_path(tmp_path / "bin", venv)
    for c in COMPILERS:
        assert shutil.which(c, path=env["PATH"]) is None, c
    # the README's command, against a PEP 503 index laid out by kernels/wheel.py (as the release workflow does)
    idx = subprocess.run([sys.executable, str(ROOT / "kernels" / "wheel.py"), "index", "--wheels", str(WHEELS),
                          "--out", str(tmp_path / "index")], capture_output=True, text=True, timeout=300)
    assert idx.returncode == 0, idx.stderr
    assert (tmp_path / "index" / "cpu" / "llama-cpp-python" / wheel.name).is_file()
    py = str(venv / "bin" / "python")
    inst = subprocess.run([py, "-m", "pip", "install", "--only-binary", "llama-cpp-python", "--extra-index-url",
                           (tmp_path / "index" / "cpu").as_uri(), f"{ROOT}[test]"], capture_output=True, text=True,
                          env=env, timeout=1800, cwd=tmp_path)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]

    doc = subprocess.run([str(venv / "bin" / "molink-lite"), "doctor"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    print(doc.stdout)
    assert doc.returncode == 0, doc.stdout + doc.stderr
    assert str(venv) in doc.stdout  # the library comes from the fresh venv's wheel
    assert "molink-lite cpu wheel of llama-cpp-python 0.3.36" in doc.stdout
    assert "struct sizes: match" in doc.stdout
    assert "engine patches: stage-output" in doc.stdout  # the wheel carries kernels/patches/
    assert "wheel for this machine: " in doc.stdout and "install: pip install molink-lite" in doc.stdout

    # the split-exact and serving tests, run by the fresh venv against the wheel's engine
    tests = tmp_path / "t"
    shutil.copytree(ROOT / "tests", tests / "tests")
    shutil.copy2(ROOT / "pyproject.toml", tests / "pyproject.toml")
    # (and the codec fidelity bounds, which must hold on this x86-64-v3 build as on a native one)
    # every non-last stage on the patched engine ends its graph at the last layer (conftest checks each engine)
    run = subprocess.run([py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_split_exact.py",
                          "tests/test_archs_exact.py", "tests/test_serving_e2e.py", "tests/test_codec_fidelity.py"],
                         capture_output=True, text=True, env={**env, "MOLINK_EXPECT_STAGE_OUTPUT": "graph"},
                         timeout=2400, cwd=tests)
    print(run.stdout[-1500:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
