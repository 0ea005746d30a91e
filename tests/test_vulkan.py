"""The Vulkan variant on Mesa's lavapipe (a CPU Vulkan device): no GPU needed.

llama.cpp's Vulkan backend is built by ``kernels/build.py --backend vulkan --portable`` (the x86-64-v3 CPU code
of the cpu wheel plus ``GGML_VULKAN=ON``) from the pinned llama-cpp-python sdist, and cached under
``~/.cache/molink-lite/vulkan/<key>`` (``$MOLINK_VULKAN_CACHE`` overrides the folder), ``<key>`` being the
hash of the sdist, build.py and the platform; the CMake tree next to it (``cmake/``) is kept, so a new key
rebuilds incrementally. A cold build took 250 s on 2 cores here (most of it the shaders and ggml-vulkan.cpp), a
new key over a kept CMake tree 2 s. Debian's ``libvulkan-dev glslc spirv-headers mesa-vulkan-drivers`` are
installed when missing (root and apt-get needed; otherwise the tests are skipped, saying why).
``$MOLINK_LLAMA_SDIST`` may point at a local llama-cpp-python sdist instead of downloading it with pip;
``$MOLINK_VULKAN_LIB`` at the ``llama_cpp/lib`` folder of a vulkan wheel (``kernels/wheel.py build --variant
vulkan``) to test that instead.

Checked on lavapipe (``VK_DRIVER_FILES`` points the loader at it alone; llama.cpp skips CPU Vulkan devices
unless ``GGML_VK_VISIBLE_DEVICES`` names one):

- ``molink-lite doctor --lib`` shows the llvmpipe device, and says why no device is used without
  ``GGML_VK_VISIBLE_DEVICES``;
- tests/test_split_exact.py's check (tiny llama and gemma3): a split's logits are bit-identical to the whole
  model's, over the f32 wire, when each layer runs on the same backend in both (all Vulkan, all CPU, or CPU
  layers then Vulkan layers); Vulkan and CPU kernels round differently (about 1e-3 relative on these models);
- a stage with ``--n-gpu-layers -1`` puts its layers on the Vulkan device (llama.cpp's own load log);
- a 2-stage split of gemma3-270m, a CPU stage (layers 0-8, a process without a Vulkan device) and a Vulkan stage
  (9-17 and the output), f32 wire, behind a real gateway, serves the greedy text of the whole model run with the
  same per-layer backends. The whole model on the CPU alone (or on Vulkan alone) is not that reference: for
  gemma3-270m Q4_K_M the first logits differ by up to 2.5 (of 59) between lavapipe and the CPU (whose Q4_K
  kernels quantize activations to 8 bits; lavapipe's, without integer dot products, do not), and greedy texts
  part after some tokens.

Warm, the module takes about 45 s here (2 cores; 1.5 minutes while another build runs).
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - import before numpy

import ctypes.util
import glob
import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving import NO_CACHE, GatewayProcess, free_port, http, stop_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
ROOT = Path(__file__).resolve().parents[1]
BUILD_PY = ROOT / "kernels" / "build.py"
APT_PACKAGES = ("libvulkan-dev", "glslc", "spirv-headers", "mesa-vulkan-drivers")
STAGE_ARGS = ["--threads", "1", "--ctx", "512", "--max-seqs", "4", "--flash-attn", "off"]
CUT = 9  # gemma3-270m: 18 layers; CPU stage 0-8, Vulkan stage 9-17
N_TOKENS = 16


def _log(msg: str) -> None:
    print(f"[vulkan] {msg}", flush=True)


def _cache_root() -> Path:
    env = os.environ.get("MOLINK_VULKAN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "molink-lite" / "vulkan"


def _lavapipe_icd() -> str | None:
    found = sorted(glob.glob("/usr/share/vulkan/icd.d/lvp_icd*.json"))
    return found[0] if found else None


def _missing() -> list:
    """What building llama.cpp's Vulkan backend and running it on lavapipe needs and this machine lacks."""
    sdk = os.environ.get("VULKAN_SDK")
    miss = []
    if not shutil.which("glslc"):
        miss.append("glslc")
    if not (Path("/usr/include/vulkan/vulkan.hpp").is_file() or (sdk and Path(sdk, "include/vulkan/vulkan.hpp").is_file())):
        miss.append("Vulkan headers")
    if not (glob.glob("/usr/share/cmake*/SPIRV-Headers/SPIRV-HeadersConfig.cmake")
            or glob.glob("/usr/lib/*/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake")
            or (sdk and glob.glob(f"{sdk}/**/SPIRV-HeadersConfig.cmake", recursive=True))):
        miss.append("SPIRV-Headers")
    if not ctypes.util.find_library("vulkan"):
        miss.append("the Vulkan loader")
    if not _lavapipe_icd():
        miss.append("lavapipe (mesa-vulkan-drivers)")
    return miss


def _ensure_tools() -> None:
    """Install Debian's Vulkan packages where something is missing, or skip saying why it cannot be."""
    miss = _missing()
    if not miss:
        return
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the lavapipe test runs on Linux (this is {sys.platform})")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{', '.join(miss)} missing and no apt-get to install {' '.join(APT_PACKAGES)}")
    if os.geteuid() != 0:
        pytest.skip(f"{', '.join(miss)} missing and installing {' '.join(APT_PACKAGES)} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log(f"apt-get install {' '.join(APT_PACKAGES)} (missing: {', '.join(miss)})")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    for cmd in (install, ["apt-get", "update", "-q"], install):  # the package lists may be stale: update, retry
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
        if p.returncode == 0 and cmd is install:
            break
        if p.returncode != 0 and cmd is not install:
            pytest.skip(f"apt-get update failed (no network to the Debian mirror?): {(p.stderr or p.stdout)[-400:]}")
    else:
        pytest.skip(f"apt-get install {' '.join(APT_PACKAGES)} failed: {(p.stderr or p.stdout)[-400:]}")
    still = _missing()
    if still:
        pytest.skip(f"installed {' '.join(APT_PACKAGES)} but {', '.join(still)} still missing")


def vk_env(device: bool = True) -> dict:
    """Environment of a process that sees lavapipe alone (``device``: and llama.cpp uses it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GGML_VK_VISIBLE_DEVICES", "LLAMA_CPP_LIB_PATH")}
    icd = _lavapipe_icd()
    env["VK_DRIVER_FILES"] = env["VK_ICD_FILENAMES"] = icd  # the loader enumerates lavapipe only
    if device:
        env["GGML_VK_VISIBLE_DEVICES"] = "0"
    return env


@pytest.fixture(scope="module")
def vulkan_lib() -> Path:
    """The Vulkan build of kernels/build.py (cached; built here when missing, progress in the log), or the
    ``llama_cpp/lib`` folder of an installed or unpacked vulkan wheel given as ``$MOLINK_VULKAN_LIB``."""
    _ensure_tools()
    if os.environ.get("MOLINK_VULKAN_LIB"):
        return Path(os.environ["MOLINK_VULKAN_LIB"])
    sys.path.insert(0, str(ROOT / "kernels"))
    try:
        libbuild = importlib.import_module("build")
    finally:
        sys.path.pop(0)
    root = _cache_root()
    if os.environ.get("MOLINK_LLAMA_SDIST"):
        sdist = Path(os.environ["MOLINK_LLAMA_SDIST"])
    else:
        sdist = libbuild.fetch_sdist(root / "src", libbuild.LLAMA_CPP_PYTHON_VERSION)  # pip download, once
    h = hashlib.sha256()
    h.update(sdist.read_bytes() if sdist.is_file() else str(sdist.resolve()).encode())
    h.update(BUILD_PY.read_bytes())
    h.update(f"vulkan portable {sys.platform} {platform.machine()}".encode())
    out = root / h.hexdigest()[:16] / "lib"
    cmd = [sys.executable, str(BUILD_PY), "--backend", "vulkan", "--portable", "--out", str(out),
           "--build-dir", str(root / "cmake"), "--download-dir", str(root / "src"), "--src", str(sdist),
           "--jobs", str(os.cpu_count() or 2)]
    t = time.monotonic()
    cached = (out / "build_info.json").is_file()
    _log(("checking the cached build " if cached else "building (cold: about 4 minutes on 2 cores) ") + str(out))
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "CXXFLAGS")}  # the same build everywhere
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = []
    for line in p.stdout:  # progress as it comes
        tail = (tail + [line])[-200:]
        if not cached or "ERROR" in line:
            print(line, end="", flush=True)
    assert p.wait() == 0, "kernels/build.py --backend vulkan failed:\n" + "".join(tail)
    info = json.loads((out / "build_info.json").read_text())
    _log(f"build ready in {time.monotonic() - t:.0f} s (its own build took {info.get('total_seconds')} s)")
    assert info["backend"] == "vulkan" and "-DGGML_VULKAN=ON" in info["configure_args"]
    assert (out / "libggml-vulkan.so").exists()
    return out


def test_doctor_shows_lavapipe(vulkan_lib):
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "doctor", "--lib", str(vulkan_lib)], cwd=ROOT,
                       env=vk_env(), capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"^Vulkan: loader .*, 1 device\(s\)$", out, re.M), out
    assert re.search(r"^  Vulkan device llvmpipe .*\(CPU, Vulkan 1\.\d+", out, re.M), out
    assert re.search(r"^build: (kernels/build.py vulkan build|molink-lite vulkan wheel of llama-cpp-python)", out,
                     re.M), out
    assert "struct sizes: match the bindings" in out, out
    assert "backend: GPU offload available" in out, out
    assert re.search(r"^  device Vulkan0 \(gpu\): llvmpipe", out, re.M), out
    assert "wheel for this machine: cpu" in out, out  # a CPU Vulkan device is no reason for the vulkan wheel

    # without GGML_VK_VISIBLE_DEVICES llama.cpp skips the CPU device: doctor says so, and how to pick it
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "doctor", "--lib", str(vulkan_lib)], cwd=ROOT,
                       env=vk_env(device=False), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backend: CPU only" in r.stdout and "device Vulkan0" not in r.stdout, r.stdout
    assert "llama.cpp uses no Vulkan device" in r.stdout and "GGML_VK_VISIBLE_DEVICES=0" in r.stdout, r.stdout


# A whole model with some layers on the CPU and a Vulkan device in the process keeps those layers' weights in
# Vulkan's pinned host buffer, where the CPU backend uses other (not repacked) kernels than in a process without
# a GPU: 2.8 apart in gemma3-270m's first logits. ``no_host`` keeps them in CPU buffers, as a CPU stage has them;
# GGML_OP_OFFLOAD_MIN_BATCH keeps large batches of CPU layers on the CPU (no op offload to Vulkan).
NO_HOST = """
import llama_cpp, llama_cpp.llama_cpp as L
_default = L.llama_model_default_params
def _no_host():
    p = _default()
    p.no_host = True
    return p
L.llama_model_default_params = _no_host
"""
REF_ENV = {"GGML_OP_OFFLOAD_MIN_BATCH": "1000000"}


def _run_json(code: str, args, env: dict, tag: str, timeout: float = 900):
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.split(tag + " ", 1)[1])


def _reference_texts(lib: Path, model: str, prompts, n_gpu_layers: int, device: bool = True) -> list:
    """The whole model's greedy texts on the Vulkan build (a fresh process: a library loads once)."""
    code = ("import json, sys; sys.path.insert(0, 'tests')\n" + NO_HOST +
            "from chain import whole_model_greedy_texts\n"
            "a = json.loads(sys.argv[2])\n"
            "print('TEXTS ' + json.dumps(whole_model_greedy_texts(sys.argv[1], a['prompts'], a['n'], a['ngl'])))")
    env = {**vk_env(device), **REF_ENV, "LLAMA_CPP_LIB_PATH": str(lib)}
    return _run_json(code, [model, json.dumps({"prompts": prompts, "n": N_TOKENS, "ngl": n_gpu_layers})], env, "TEXTS")


SPLIT_EXACT = """
import json, sys
sys.path.insert(0, 'tests')
""" + NO_HOST + """
import numpy as np
from chain import greedy_run
from testmodels import write_random_gguf
from molink_lite.model.split import LayerRange, stage_gguf
from molink_lite.stage.engine import StageEngine

tmp, out = sys.argv[1], {}
rng = np.random.default_rng(0)
prompts = [rng.integers(1, 256, size=n).tolist() for n in (5, 11, 3, 17)]
n_layer, cut = 7, 3

def run(path, cuts, ngls):
    bounds = [0, *cuts, n_layer]
    engs = [StageEngine(path if len(ngls) == 1 else stage_gguf(path, LayerRange(a, b), cache_dir=tmp), n_ctx=256,
                        n_seq_max=4, n_threads=1, n_gpu_layers=g, flash_attn=False)
            for (a, b), g in zip(zip(bounds, bounds[1:]), ngls)]
    try:
        return np.stack(greedy_run(engs, prompts, 8)[0])
    finally:
        for e in engs:
            e.close()

for arch in ("llama", "gemma3"):
    path = f"{tmp}/{arch}.gguf"
    write_random_gguf(path, arch, n_layer=n_layer, n_embd=64, n_head=4, n_vocab=256)
    vk, cpu = run(path, [], [-1]), run(path, [], [0])
    mixed = run(path, [], [n_layer + 1 - cut])  # layers 3-6 and the output on Vulkan
    res = {"vulkan split == whole": bool(np.array_equal(run(path, [cut], [-1, -1]), vk)),
           "cpu split == whole": bool(np.array_equal(run(path, [cut], [0, 0]), cpu)),
           "cpu+vulkan split == whole on the same backends": bool(np.array_equal(run(path, [cut], [0, -1]), mixed)),
           "vulkan vs cpu max |d|": float(np.abs(vk - cpu).max()),
           "vulkan vs cpu relative": float(np.abs(vk - cpu).max() / np.abs(cpu).max())}
    out[arch] = res
print("EXACT " + json.dumps(out))
"""


def test_split_logits_bit_identical_on_the_same_backends(vulkan_lib, tmp_path):
    """tests/test_split_exact.py's check on lavapipe (tiny random llama and gemma3, 7 layers cut at 3, 4 prompts
    batched, 8 greedy steps, f32 wire): every step's logits of a split equal the whole model's bit for bit when
    each layer runs on the same backend in both (all Vulkan; all CPU; CPU then Vulkan). Vulkan and CPU kernels
    round differently (about 1e-3 relative), so split-vs-whole across backends is close, not exact."""
    env = {**vk_env(), **REF_ENV, "LLAMA_CPP_LIB_PATH": str(vulkan_lib)}
    res = _run_json(SPLIT_EXACT, [str(tmp_path)], env, "EXACT", timeout=600)
    _log(json.dumps(res))
    for arch, r in res.items():
        for k, v in r.items():
            if "==" in k:
                assert v, (arch, k, r)
        assert 0 < r["vulkan vs cpu relative"] < 0.05, (arch, r)


@pytest.fixture(scope="module")
def split_cluster(vulkan_lib, gemma3_path, tmp_path_factory):
    """A CPU stage (0-8, no Vulkan device) and a Vulkan stage (9-17 on lavapipe, llama.cpp's log on) behind a
    gateway with the f32 wire."""
    tmp = tmp_path_factory.mktemp("vulkan-split")
    ports = [free_port(), free_port()]
    logs = [tmp / "stage-cpu.log", tmp / "stage-vulkan.log"]
    envs = [vk_env(device=False), {**vk_env(), "MOLINK_LLAMA_LOG": "1"}]
    specs = [(f"0-{CUT - 1}", "0"), (f"{CUT}-17", "-1")]
    procs, outs = [], []
    gw = None
    try:
        for (layers, ngl), port, log, env in zip(specs, ports, logs, envs):
            out = open(log, "wb")
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "molink_lite.cli", "stage", "--lib", str(vulkan_lib), "--model", gemma3_path,
                 "--layers", layers, "--n-gpu-layers", ngl, "--host", "127.0.0.1", "--port", str(port),
                 "--cache-dir", str(tmp / "cache"), *STAGE_ARGS], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT))
        gw = GatewayProcess([[f"ws://127.0.0.1:{p}" for p in ports]], extra=["--codec", "f32", *NO_CACHE], log_dir=tmp)
        gw.wait_ready(300)
        yield gw, logs
    finally:
        if gw is not None:
            gw.stop()
        stop_processes(procs, 20)
        for out in outs:
            out.close()


def test_stage_offloads_its_layers_to_lavapipe(split_cluster):
    _, (cpu_log, vk_log) = split_cluster
    text = vk_log.read_text(errors="replace")
    # llama.cpp's own load log: 9 layers plus the output layer on Vulkan0 (lavapipe)
    assert re.search(r"offloaded 10/10 layers to GPU", text), text[-4000:]
    assert re.search(r"Vulkan0 model buffer size = +\d", text), text[-4000:]
    assert "llvmpipe" in text, text[-4000:]
    assert re.search(r"backend: GPU offload available; 9 of 9 layers offloaded", text), text[-4000:]
    cpu = cpu_log.read_text(errors="replace")
    assert re.search(r"backend: CPU only.*; 0 of 9 layers offloaded", cpu), cpu[-4000:]


def test_split_cpu_and_vulkan_stage_serves_the_whole_models_text(split_cluster, vulkan_lib, gemma3_path):
    gw, _ = split_cluster
    ll = llama_cpp.Llama(model_path=gemma3_path, n_ctx=256, n_threads=1, verbose=False, vocab_only=True)
    prompts = [ll.tokenize(p.encode()) for p in ("The capital of France is", "def fibonacci(n):")]
    ll.close()
    n_layer = 18
    same = n_layer + 1 - CUT  # llama.cpp offloads the last layers: 9-17 and the output on Vulkan, 0-8 on the CPU
    want = _reference_texts(vulkan_lib, gemma3_path, prompts, same)
    on_cpu = _reference_texts(vulkan_lib, gemma3_path, prompts, 0, device=False)
    got, t_total = [], 0.0
    for prompt in prompts:
        t = time.monotonic()
        status, body = http("POST", gw.url + "/v1/completions",
                            {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True},
                            timeout=600)
        t_total += time.monotonic() - t
        assert status == 200, (body, gw.output())
        got.append(body["choices"][0]["text"])
    _log(f"served {N_TOKENS * len(prompts)} tokens in {t_total:.1f} s ({N_TOKENS * len(prompts) / t_total:.1f} tok/s, "
         "one request at a time, prefill included; lavapipe: a sanity figure only)")
    for i, prompt in enumerate(prompts):
        _log(f"{prompt}: split {got[i]!r}; whole on the same backends {want[i]!r}; whole on the CPU {on_cpu[i]!r}")
    # the level measured: bit-identical logits with each layer on the backend the whole model runs it on
    assert got == want, (got, want)
