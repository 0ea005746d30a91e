"""The CPU image of docker/Dockerfile, built and run for real: `serve` (2 stage processes + gateway) in a
container answers a completion.

Needs a Docker daemon (skips with the reason otherwise). No image registry is assumed: the base image is
$MOLINK_DOCKER_BASE, or python:3.11-slim when the daemon has it, or one made here with debootstrap
(Debian's packages: python3, python3-venv, libgomp1) and `docker import`, trusting the same CA
certificates as this host. The engine comes from the wheel kernels/wheel.py builds (cached per machine),
so the image build compiles nothing. Takes several minutes (the vfs storage driver copies every layer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving import free_port, http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("MOLINK_WHEEL_CACHE", Path.home() / ".cache" / "molink-lite" / "wheels"))
LOCAL_BASE = "molink-base:bookworm"
TAG = "molink-lite:cpu-test"


def _docker_unavailable() -> str:
    if not shutil.which("docker"):
        return "no docker command"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"no Docker daemon ({(r.stderr or r.stdout).strip().splitlines()[-1][:120]})"
    return ""


WHY = _docker_unavailable() if sys.platform == "linux" else "Linux only"


def _has_image(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def _base_image(tmp: Path) -> str:
    if os.environ.get("MOLINK_DOCKER_BASE"):
        return os.environ["MOLINK_DOCKER_BASE"]
    for name in ("python:3.11-slim", LOCAL_BASE):
        if _has_image(name):
            return name
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        pytest.skip("no base image: set MOLINK_DOCKER_BASE, or install debootstrap and run as root to make one")
    root = tmp / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,libgomp1,ca-certificates",
                    "bookworm", str(root), "http://deb.debian.org/debian"], check=True, capture_output=True,
                   timeout=1800)
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():  # behind a TLS-intercepting proxy the host's CAs are needed for pip
        shutil.copy2(host_ca, root / "etc/ssl/certs/ca-certificates.crt")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-c", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "-", LOCAL_BASE],
                   stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    return LOCAL_BASE


@pytest.mark.skipif(bool(WHY), reason=f"Docker unavailable: {WHY}")
def test_cpu_image_builds_and_serves(tmp_path):
    base = _base_image(tmp_path)
    b = subprocess.run([sys.executable, str(ROOT / "kernels" / "wheel.py"), "build", "--variant", "cpu",
                        "--out", str(WHEELS)], capture_output=True, text=True, timeout=3000)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    wheel = Path(b.stdout.strip().splitlines()[-1])
    ctx = tmp_path / "ctx"  # the build context: the repository's sources plus the engine wheel
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(ROOT / name, ctx / name)
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.whl")
    for name in ("molink_lite", "kernels", "docker"):
        shutil.copytree(ROOT / name, ctx / name, ignore=ignore)
    (ctx / "docker" / "wheels" / "cpu").mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, ctx / "docker" / "wheels" / "cpu" / wheel.name)
    t0 = time.monotonic()
    build = subprocess.run(["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "-t", TAG,
                            "--build-arg", f"BASE_IMAGE={base}", "."], cwd=ctx, capture_output=True, text=True,
                           timeout=3000, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-2000:]
    print(f"\nimage {TAG} built on {base} in {time.monotonic() - t0:.0f} s")
    port = free_port()
    name = f"molink-test-{os.getpid()}"
    run = subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host", TAG, "serve",
                          "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        up = False
        while time.monotonic() < deadline and not up:
            try:
                up = http("GET", url + "/health", timeout=3)[0] == 200
            except OSError:
                time.sleep(1)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout[-3000:]
        assert up, logs
        status, body = http("POST", url + "/v1/completions",
                            {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        print(f"container answered: {body['choices'][0]['text']!r}")
        assert body["usage"]["completion_tokens"] >= 1
        _, st = http("GET", url + "/v1/stats")
        assert len(st["pipelines"][0]["stages"]) == 2  # serve: two stage processes behind the gateway
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
