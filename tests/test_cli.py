"""Command-line errors a user can hit: clear message, non-zero exit, nothing started."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molink_lite.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_stage_lib_missing_folder(tmp_path):
    r = _cli("stage", "--lib", str(tmp_path / "nope"), "--layers", "0-1")
    assert r.returncode == 2 and "--lib" in r.stderr and "does not exist" in r.stderr


def test_stage_rejects_bad_layer_range(tiny_models):
    r = _cli("stage", "--model", tiny_models("llama", n_layer=4), "--layers", "2-9", "--port", "0")
    assert r.returncode == 2 and "error" in r.stderr.lower()


def test_split_rejects_gap(tiny_models, tmp_path):
    r = _cli("split", tiny_models("llama", n_layer=4), "--layers", "0-1,3-3", "-o", str(tmp_path))
    assert r.returncode == 2 and "gap between layer ranges 0-1 and 3-3" in r.stderr


def test_bench_rejects_unknown_baseline():
    r = _cli("bench", "--baseline", "vllm")
    assert r.returncode == 2 and "unknown baseline" in r.stderr


def test_bench_help_documents_options():
    out = _cli("bench", "--help").stdout
    for opt in ("--concurrency", "--prompt-len", "--max-tokens", "--delay-ms", "--rate-mbit", "--baseline",
                "--long-prompt", "--json", "--chart", "--split", "--micro-batches", "--prefill-chunk"):
        assert opt in out, opt


def _procs_with(text: str):
    """Pids of this machine's processes whose command line mentions ``text`` (psutil: any OS)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if text in " ".join(p.cmdline()):
                out.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


def _start_serve(tiny_models, tmp_path, name: str):
    import shutil

    from serving import free_port

    model = str(tmp_path / name)
    shutil.copy(tiny_models("llama", n_layer=4), model)
    p = subprocess.Popen([sys.executable, "-m", "molink_lite.cli", "serve", "--model", model, "--port",
                          str(free_port()), "--threads", "1", "--ctx", "256"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "serving at" in line:
            break
    else:
        p.kill()
        raise AssertionError("serve did not start")
    return p, model


def _wait_gone(text: str, timeout: float = 15) -> list:
    import time

    deadline = time.monotonic() + timeout
    while _procs_with(text) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _procs_with(text)


@pytest.mark.slow
def test_serve_sigterm_stops_stage_processes(tiny_models, tmp_path):
    """`kill` / `docker stop` on `serve` must not leave stage processes behind. On Windows ``send_signal(SIGTERM)``
    is ``TerminateProcess``: no handler runs there, and the stages go with serve's Job Object (the Wine job runs
    this test under Windows Python)."""
    import signal

    p, model = _start_serve(tiny_models, tmp_path, "serve-sigterm.gguf")
    try:
        assert len(_procs_with(model)) == 3  # serve + 2 stages
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        assert _wait_gone(model) == []
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.slow
def test_serve_killed_outright_takes_its_stages_along(tiny_models, tmp_path):
    """`kill -9` (Linux) / ``TerminateProcess`` (Windows) runs no cleanup in serve: each stage notices its
    parent gone (and on Windows the Job Object kills it) and exits."""
    p, model = _start_serve(tiny_models, tmp_path, "serve-kill.gguf")
    try:
        assert len(_procs_with(model)) == 3
        p.kill()
        p.wait(30)
        assert _wait_gone(model) == []
    finally:
        if p.poll() is None:
            p.kill()
