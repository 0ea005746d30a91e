"""kernels/build.py builds llama.cpp libraries that the bindings load via LLAMA_CPP_LIB_PATH.

The CPU build (``--portable``) takes about 5 minutes on 2 cores the first time; its output
is cached under ``~/.cache/molink-lite/kernels/<hash>`` (``$MOLINK_KERNELS_CACHE``
overrides), keyed by build.py's content and the platform, so later runs take seconds.
``$MOLINK_LLAMA_SDIST`` may point at a local llama-cpp-python sdist (tarball or folder)
instead of downloading it with pip.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - import before numpy

import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from molink_lite.stage import libpath
from molink_lite.stage.libpath import LibraryPathError, StructSizeMismatch

ROOT = Path(__file__).resolve().parents[1]
BUILD_PY = ROOT / "kernels" / "build.py"

# Runs in a fresh interpreter: LLAMA_CPP_LIB_PATH only counts before llama_cpp is imported.
PROBE = r"""
import json, os, sys
from molink_lite.stage.libpath import use_library_dir, check_struct_sizes
lib_dir, model_path, logits_path = sys.argv[1:4]
if lib_dir:
    use_library_dir(lib_dir)
import llama_cpp                      # loads libllama now
import llama_cpp.llama_cpp as L
out = {"lib": L._lib._name, "version": llama_cpp.__version__}
if lib_dir:
    out["sizes"] = check_struct_sizes(lib_dir)
if os.path.exists("/proc/self/maps"):
    with open("/proc/self/maps") as f:
        maps = f.read().split()
    out["loaded"] = sorted({p for p in maps if "libggml" in p or "libllama" in p})
import numpy as np
from molink_lite.stage.engine import StageEngine
sys.path.insert(0, "tests")  # tests/testmodels.py (cwd is the repository root)
from testmodels import write_random_gguf
if not os.path.exists(model_path):
    write_random_gguf(model_path, "llama", n_layer=2, n_embd=64, n_head=4, n_vocab=256)
with StageEngine(model_path, n_ctx=64, n_seq_max=2, n_batch=16, n_threads=2) as eng:
    tokens = np.array([1, 5, 9, 200, 3, 7], dtype=np.int32)
    seqs = np.array([0, 0, 0, 0, 1, 1], dtype=np.int32)
    pos = np.array([0, 1, 2, 3, 0, 1], dtype=np.int32)
    # a copy: forward() returns a view of llama.cpp's logits buffer, freed with the context
    logits = eng.forward(seqs, pos, tokens=tokens).copy()
np.save(logits_path, logits)
out["shape"] = list(logits.shape)
print("RESULT " + json.dumps(out))
"""


def _cache_root() -> Path:
    env = os.environ.get("MOLINK_KERNELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "molink-lite" / "kernels"


def _run_probe(lib_dir: str, model: Path, logits: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != libpath.ENV}
    p = subprocess.run([sys.executable, "-c", PROBE, lib_dir, str(model), str(logits)], cwd=ROOT, env=env,
                       text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert p.returncode == 0, p.stdout[-5000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, p.stdout[-5000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def cpu_lib_dir(tmp_path_factory) -> Path:
    """Portable CPU libraries built by kernels/build.py (cached across runs)."""
    patches = b"".join(f.read_bytes() for f in sorted((ROOT / "kernels" / "patches").glob("*.patch")))
    key = hashlib.sha256(BUILD_PY.read_bytes() + (ROOT / "kernels" / "patchset.py").read_bytes() + patches +
                         f"cpu-portable {sys.platform} {platform.machine()}".encode())
    out = _cache_root() / key.hexdigest()[:16]
    work = tmp_path_factory.mktemp("kernels-build")
    cmd = [sys.executable, str(BUILD_PY), "--backend", "cpu", "--portable", "--out", str(out),
           "--build-dir", str(work / "cmake"), "--download-dir", str(work / "src"),
           "--jobs", str(os.cpu_count() or 2), "--clean-build"]
    if os.environ.get("MOLINK_LLAMA_SDIST"):
        cmd += ["--src", os.environ["MOLINK_LLAMA_SDIST"]]
    p = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.returncode == 0, f"kernels/build.py failed:\n{p.stdout[-8000:]}"
    assert f"LLAMA_CPP_LIB_PATH={out}" in p.stdout
    return out


@pytest.mark.slow  # builds llama.cpp (minutes) unless kernels/build.py's output is cached
@pytest.mark.timeout(2400)
def test_cpu_build_loads_and_runs(cpu_lib_dir: Path, tmp_path: Path) -> None:
    info = json.loads((cpu_lib_dir / "build_info.json").read_text())
    assert info["backend"] == "cpu" and info["portable"] is True
    assert info["llama_cpp_python"] == llama_cpp.__version__
    assert libpath.find_library(cpu_lib_dir) is not None

    model = tmp_path / "tiny-llama.gguf"
    built = _run_probe(str(cpu_lib_dir), model, tmp_path / "built.npy")
    # the bindings loaded the built libllama, and (Linux) every llama/ggml library came from that folder
    assert os.path.samefile(Path(built["lib"]).parent, cpu_lib_dir), built["lib"]
    for p in built.get("loaded", []):
        assert os.path.samefile(Path(p).parent, cpu_lib_dir), f"{p} was loaded from outside {cpu_lib_dir}"
    # struct sizes recorded at build time match the bindings
    assert set(libpath.REQUIRED_STRUCTS) <= set(built["sizes"])
    assert all(v["c"] == v["python"] for v in built["sizes"].values()), built["sizes"]
    assert built["shape"] == [2, 256]

    # the same forward with the wheel's own libraries gives the same logits
    bundled = _run_probe("", model, tmp_path / "bundled.npy")
    assert not os.path.samefile(Path(bundled["lib"]).parent, cpu_lib_dir)
    import numpy as np

    a, b = np.load(tmp_path / "built.npy"), np.load(tmp_path / "bundled.npy")
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.abs(b).max()))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_patched_build_splits_every_architecture_exactly_through_the_graph_output(cpu_lib_dir: Path) -> None:
    """The build carries the engine patch set (kernels/patches/); on it every non-last stage ends its graph at the
    last layer (no eval callback), and the per-architecture split tests hold at their levels, as they do on the
    pristine library the rest of the suite runs on."""
    info = json.loads((cpu_lib_dir / "build_info.json").read_text())
    assert info["patches"] == [p.name for p in sorted((ROOT / "kernels" / "patches").glob("*.patch"))]
    env = {**os.environ, libpath.ENV: str(cpu_lib_dir), "MOLINK_EXPECT_STAGE_OUTPUT": "graph"}
    env.pop("MOLINK_STAGE_OUTPUT", None)
    doc = subprocess.run([sys.executable, "-m", "molink_lite.cli", "doctor"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert "engine patches: stage-output" in doc.stdout, doc.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_archs_exact.py",
                          "tests/test_split_exact.py", "tests/test_stage_features.py"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
    print(run.stdout[-600:])
    assert run.returncode == 0, run.stdout[-5000:]


# ----------------------------------------------------------------------------- libpath errors
@pytest.fixture
def no_env(monkeypatch):
    # setenv first so that monkeypatch records the variable's prior state (absent, usually) and restores it;
    # delenv of an absent variable records nothing, and a value set by the test would leak to later tests
    monkeypatch.setenv(libpath.ENV, "")
    monkeypatch.delenv(libpath.ENV)


def test_use_library_dir_missing(tmp_path, no_env):
    with pytest.raises(LibraryPathError, match="does not exist"):
        libpath.use_library_dir(tmp_path / "nope")
    assert libpath.ENV not in os.environ


def test_use_library_dir_not_a_folder(tmp_path, no_env):
    f = tmp_path / libpath.library_names()[0]
    f.write_bytes(b"")
    with pytest.raises(LibraryPathError, match="not a folder"):
        libpath.use_library_dir(f)


def test_use_library_dir_without_library(tmp_path, no_env):
    (tmp_path / "libggml.so").write_bytes(b"")
    with pytest.raises(LibraryPathError, match="holds no llama library") as e:
        libpath.use_library_dir(tmp_path)
    assert "libggml.so" in str(e.value)
    assert libpath.ENV not in os.environ


def test_use_library_dir_after_import_with_other_dir(tmp_path, no_env):
    (tmp_path / libpath.library_names()[0]).write_bytes(b"")  # passes the folder check
    assert libpath.loaded_library() is not None  # llama_cpp is imported in this process
    with pytest.raises(LibraryPathError, match="already imported"):
        libpath.use_library_dir(tmp_path)
    assert libpath.ENV not in os.environ


def test_use_library_dir_after_import_with_same_dir(no_env):
    loaded = libpath.loaded_library()
    libpath.use_library_dir(loaded.parent)
    assert os.path.samefile(os.environ[libpath.ENV], loaded.parent)


def test_check_struct_sizes_wrong_dir(tmp_path):
    with pytest.raises(LibraryPathError, match="llama_cpp loaded"):
        libpath.check_struct_sizes(tmp_path)


def test_check_struct_sizes_without_record():
    if (libpath.loaded_library().parent / libpath.STRUCT_SIZES_FILE).exists():
        pytest.skip("the loaded library has a struct_sizes.json")
    with pytest.raises(LibraryPathError, match="no struct_sizes.json"):
        libpath.check_struct_sizes()


def test_compare_struct_sizes():
    import llama_cpp.llama_cpp as L

    recorded = {"pointer": ctypes.sizeof(ctypes.c_void_p),
                "structs": {n: ctypes.sizeof(getattr(L, n)) for n in libpath.REQUIRED_STRUCTS}}
    res = libpath.compare_struct_sizes(recorded)
    assert set(res) == set(libpath.REQUIRED_STRUCTS)
    recorded["structs"]["llama_batch"] += 8
    del recorded["structs"]["llama_token_data"]
    with pytest.raises(StructSizeMismatch) as e:
        libpath.compare_struct_sizes(recorded)
    msg = str(e.value)
    assert "llama_batch: C sizeof" in msg and "llama_token_data: not recorded" in msg


def test_with_tools_builds_llama_cpp_servers_from_the_same_configuration():
    """kernels/build.py --with-tools: llama-server and ggml-rpc-server against the same libraries (the GPU
    benchmark's llama.cpp baselines), with no web UI (it needs npm or the network); without it, libraries only."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
    try:
        import build as kb
    finally:
        sys.path.pop(0)
    plain = kb.configure_args(kb.parse_args(["--backend", "cpu"]))
    tools = kb.configure_args(kb.parse_args(["--backend", "cpu", "--with-tools"]))
    assert "-DLLAMA_BUILD_SERVER=OFF" in plain and not any(a.endswith("=ON") and "SERVER" in a for a in plain)
    base = [a for a in plain if not a.startswith(("-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS="))]   # the compiler's, last
    assert tools[:len(base)] == base  # the same libraries; the later -D values switch the tools on
    for flag in ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DGGML_RPC=ON",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"):
        assert flag in tools
    assert kb.TOOLS == ("llama-server", "ggml-rpc-server")


def test_native_x86_builds_leave_out_the_amx_kernels(monkeypatch):
    """A native build on an AMX CPU compiled in llama.cpp's AMX matmul kernels, which crash the first Q4_K decode
    (engine-notes.md; `molink-lite bench --baseline whole` died with SIGILL here): native x86-64 builds, the engine's
    and the baselines' (build_tools.py), pass -mno-amx-*, keeping $CFLAGS/$CXXFLAGS and the Vulkan header shim."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
    try:
        import build as kb
        import build_tools
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(kb.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kb, "is_windows", lambda: False)
    monkeypatch.setenv("CFLAGS", "-O2")
    monkeypatch.delenv("CXXFLAGS", raising=False)
    flags = dict(a[2:].split("=", 1) for a in kb.configure_args(kb.parse_args(["--backend", "cpu"]))
                 if a.startswith("-DCMAKE_C"))
    assert flags == {"CMAKE_C_FLAGS": "-O2 " + kb.NO_AMX, "CMAKE_CXX_FLAGS": kb.NO_AMX}
    portable = kb.configure_args(kb.parse_args(["--backend", "cpu", "--portable"]))
    assert not any("amx" in a for a in portable)     # the x86-64-v3 baseline has no AMX
    shim = kb.compiler_flag_args(True, "-include compat.h")
    assert shim == [f"-DCMAKE_C_FLAGS=-O2 {kb.NO_AMX}", f"-DCMAKE_CXX_FLAGS={kb.NO_AMX} -include compat.h"]
    assert kb.compiler_flag_args(False, "-include compat.h") == ["-DCMAKE_CXX_FLAGS=-include compat.h"]
    monkeypatch.setattr(kb.platform, "machine", lambda: "aarch64")
    assert kb.compiler_flag_args(True) == []
    assert build_tools.compiler_flag_args is kb.compiler_flag_args


# ----------------------------------------------------------------------------- symbols from the library that exports them
def test_ggml_functions_come_from_the_library_that_exports_them():
    """engine.py and hostinfo.py take ggml's functions from ggml-base / ggml next to llama_cpp's library, not
    from libllama: Windows' GetProcAddress does not search a DLL's dependencies (the stage crashed at import)."""
    import molink_lite.stage.engine  # noqa: F401 - looks its ggml-base functions up at import
    from molink_lite.stage import hostinfo

    assert hostinfo.devices(strict=True)  # at least the CPU
    folder = libpath.library_dir()
    loaded = {Path(p).name for p in libpath._CDLLS}
    assert libpath.sibling_names("ggml-base")[0] in loaded and libpath.sibling_names("ggml")[0] in loaded, loaded
    assert all(os.path.samefile(Path(p).parent, folder) for p in libpath._CDLLS)
    # ggml_backend_dev_count is in ggml (the registry), ggml_backend_dev_name in ggml-base (as in ggml.dll and
    # ggml-base.dll): each found where it is exported
    base = libpath._cdll(libpath.find_sibling("ggml-base"))
    assert hasattr(base, "ggml_backend_dev_name")
    if sys.platform.startswith("linux"):  # dlsym on a handle searches that library and its dependencies only
        with pytest.raises(AttributeError):
            base.ggml_backend_dev_count


def test_sibling_names_per_os():
    assert libpath.sibling_names("ggml-base", "win32") == ["ggml-base.dll", "libggml-base.dll"]
    assert libpath.sibling_names("ggml", "darwin") == ["libggml.dylib", "libggml.so"]
    assert libpath.sibling_names("ggml-cpu", "linux") == ["libggml-cpu.so"]


def test_missing_symbol_is_a_clear_error():
    with pytest.raises(libpath.MissingSymbolError, match="ggml_no_such_function not found.*not exported by"):
        libpath.ggml_function("ggml_no_such_function", None, [])


def test_missing_sibling_library_falls_back_to_llama_and_says_where_it_looked(monkeypatch):
    monkeypatch.setattr(libpath, "find_sibling", lambda stem, folder=None: None)
    # libllama.so itself resolves ggml_nbytes through its dependencies on Linux (a monolithic build exports it)
    if sys.platform.startswith("linux"):
        assert libpath.ggml_function("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]) is not None
    with pytest.raises(libpath.MissingSymbolError, match=r"no .*ggml-nope.* in "):
        libpath.ggml_function("ggml_no_such_function", None, [], libraries=("ggml-nope",))


# ----------------------------------------------------------------------------- doctor: which wheel fits
def _kernels_module(name: str):
    sys.path.insert(0, str(ROOT / "kernels"))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_doctor_knows_every_wheel_variant():
    from molink_lite.tools.doctor import WHEEL_VARIANTS

    assert set(WHEEL_VARIANTS) == set(_kernels_module("wheel").VARIANTS)


X86 = {"avx2": True, "fma": True, "f16c": True, "bmi2": True, "source": "test"}


@pytest.mark.parametrize("os_name,arch,cpu,cuda,vk,variant,why", [
    ("linux", "x86_64", X86, None, None, "cpu", "AVX2 present"),
    ("windows", "x86_64", X86, None, None, "cpu", "AVX2 present"),
    ("linux", "x86_64", {**X86, "avx2": False}, None, None, None, "no AVX2"),
    ("linux", "x86_64", X86, {"cuda": (12, 4), "gpus": [{"name": "RTX 3090", "cc": (8, 6)}]}, None, "cu12", "CUDA 12.4"),
    ("linux", "x86_64", X86, {"cuda": (13, 0), "gpus": [{"name": "RTX 5090", "cc": (12, 0)}]}, None, "cu13", "13.0"),
    ("windows", "x86_64", X86, {"cuda": (13, 0), "gpus": [{"name": "RTX 5090", "cc": (12, 0)}]}, None, "cu12", "13.0"),
    ("linux", "x86_64", X86, {"cuda": (13, 0), "gpus": [{"name": "V100", "cc": (7, 0)}]}, None, "cu12", "13.0"),
    ("linux", "x86_64", X86, {"cuda": (11, 4), "gpus": [{"name": "T4", "cc": (7, 5)}]}, None, "cpu", "too old"),
    ("linux", "x86_64", X86, {"cuda": (12, 2), "gpus": [{"name": "K80", "cc": (3, 7)}]}, None, "cpu", "older than"),
    ("windows", "x86_64", X86, None, {"devices": [{"name": "AMD Radeon RX 7600", "type": "discrete GPU"}]}, "vulkan",
     "Vulkan GPU: AMD Radeon RX 7600"),
    ("linux", "x86_64", X86, None, {"devices": [{"name": "Intel(R) Arc(tm) A770", "type": "discrete GPU"}]}, "vulkan",
     "Vulkan GPU"),
    ("linux", "x86_64", {**X86, "avx2": False}, None, {"devices": [{"name": "AMD Radeon", "type": "integrated GPU"}]},
     None, "no AVX2"),
    ("linux", "x86_64", X86, {"cuda": (12, 4), "gpus": [{"name": "RTX 3090", "cc": (8, 6)}]},
     {"devices": [{"name": "NVIDIA GeForce RTX 3090", "type": "discrete GPU"}]}, "cu12", "CUDA 12.4"),
    ("linux", "x86_64", X86, None, {"devices": [{"name": "llvmpipe", "type": "CPU"}]}, "cpu", "AVX2 present"),
    ("macos", "arm64", {}, None, None, "cpu", "Metal"),
    ("linux", "arm64", {}, None, None, None, "no prebuilt engine wheel for linux arm64"),
])
def test_doctor_recommends_the_wheel_that_fits(os_name, arch, cpu, cuda, vk, variant, why):
    from molink_lite.tools.doctor import recommend

    got, reasons = recommend(os_name, arch, cpu, cuda, vk)
    assert got == variant and why in " ".join(reasons), reasons


def test_doctor_prints_the_wheel_and_pip_command_for_this_machine():
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "doctor"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wheel for this machine: " in r.stdout and "CPU features: AVX2 " in r.stdout
    assert "install: pip install molink-lite --only-binary llama-cpp-python --extra-index-url <pages>/whl/" in r.stdout
    assert "  device CPU (cpu): " in r.stdout


# ----------------------------------------------------------------------------- the win_amd64 wheel, without building it
def test_windows_wheel_layout_and_struct_size_probe(tmp_path):
    """pack_windows_wheel's layout (what pip needs) and, where MinGW-w64 is installed, the cross struct-size
    probe: the target compiler's sizeof of llama.h's structs, read from its assembly (nothing runs on Windows)."""
    import shutil
    import zipfile

    wheel_mod = _kernels_module("wheel")
    sdist = tmp_path / "sdist"
    (sdist / "llama_cpp" / "lib").mkdir(parents=True)
    (sdist / "llama_cpp" / "__init__.py").write_text('__version__ = "0.3.36"\n')
    (sdist / "llama_cpp" / "lib" / "stale.so").write_bytes(b"x")
    (sdist / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n\n")
    dll = tmp_path / "ggml-base.dll"
    dll.write_bytes(b"MZ")
    whl = wheel_mod.pack_windows_wheel(sdist, [dll], tmp_path / "out")
    assert whl.name == "llama_cpp_python-0.3.36-py3-none-win_amd64.whl"
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        assert "llama_cpp/lib/ggml-base.dll" in names and "llama_cpp/lib/stale.so" not in names
        assert "Tag: py3-none-win_amd64" in z.read("llama_cpp_python-0.3.36.dist-info/WHEEL").decode()
        assert "llama_cpp/__init__.py" in z.read("llama_cpp_python-0.3.36.dist-info/RECORD").decode()
    assert whl.read_bytes() == wheel_mod.pack_windows_wheel(sdist, [dll], tmp_path / "again").read_bytes()

    gcc = shutil.which("x86_64-w64-mingw32-gcc-posix") or shutil.which("x86_64-w64-mingw32-gcc")
    heads = sorted(Path.home().glob(".cache/molink-lite/wine/wheel-build/src/*/vendor/llama.cpp"))
    if gcc is None or not heads:
        pytest.skip("the cross probe needs MinGW-w64 and an unpacked llama-cpp-python sdist (the Wine job's cache)")
    build = _kernels_module("build")
    win = build.probe_struct_sizes_asm([gcc], heads[0], tmp_path / "probe")
    assert win["pointer"] == 8 and set(win["structs"]) == set(build.STRUCTS)
    import llama_cpp.llama_cpp as L

    # the same x86-64 layouts as this Linux build, except where C `long`/`bool` would differ (none do here)
    for name in libpath.REQUIRED_STRUCTS:
        assert win["structs"][name] == ctypes.sizeof(getattr(L, name)), name
