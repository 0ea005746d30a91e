"""Command-line errors a user can hit: clear message, non-zero exit, nothing started."""

from __future__ import annotations

import subprocess
import sys


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
