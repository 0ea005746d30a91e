"""`molink-lite bench` runs end to end (real stage processes, relay, gateway, HTTP streaming).

A smoke test of the tool, not a performance test: figures are only checked to exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from molink_lite.tools.bench_serve import LevelResult, SystemResult, format_table, svg_chart


@pytest.mark.slow
def test_bench_runs_with_relay_and_writes_json_and_chart(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    out, chart = tmp_path / "b.json", tmp_path / "b.svg"
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "bench", "--model", model, "--concurrency", "1,2",
                        "--requests", "2", "--prompt-len", "8", "--max-tokens", "4", "--delay-ms", "5",
                        "--rate-mbit", "50", "--threads", "1", "--ctx", "512", "--json", str(out), "--chart",
                        str(chart), "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "relay 5 ms one-way" in r.stdout
    data = json.loads(out.read_text())
    (mol,) = data["results"]
    assert mol["system"] == "molink" and [lv["concurrency"] for lv in mol["levels"]] == [1, 2]
    for lv in mol["levels"]:
        assert lv["errors"] == 0 and lv["output_tokens"] == 2 * 4 and lv["tok_s"] > 0
    assert {"stage0", "stage1", "link1", "gateway"} <= set(mol["peak_rss_mb"])
    assert chart.read_text().startswith("<svg")


def test_format_table_ratios():
    lv = lambda c, t: LevelResult(c, 4, 100, 1.0, t, 1, 2, 3, 4, 0)  # noqa: E731
    text = format_table([SystemResult("molink", [lv(1, 20.0), lv(16, 100.0)]),
                         SystemResult("rpc", [lv(1, 10.0), lv(16, 10.0)])])
    assert "molink-lite / rpc throughput: c=1: 2.00x, c=16: 10.00x" in text
    assert svg_chart([SystemResult("molink", [lv(1, 20.0)])], "t").count("<circle") == 1


@pytest.mark.slow
def test_bench_speculative_runs_off_and_on_in_one_invocation(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["abc abc abc abc abc abc", {"prompt": "one two one two one two one"}]))
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "bench", "--model", model, "--concurrency", "1",
                        "--requests", "2", "--max-tokens", "16", "--delay-ms", "5", "--threads", "1", "--ctx", "512",
                        "--speculative", "ngram", "--prompts", str(prompts), "--json", str(out),
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    off, on = data["results"]
    assert (off["system"], on["system"]) == ("molink", "spec")
    assert off["levels"][0]["spec"]["drafted"] == 0
    s = on["levels"][0]["spec"]
    assert on["levels"][0]["output_tokens"] == 2 * 16 and s["decode_entries"] > 0
    assert "speculation on / off, c=1:" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "molink_lite.cli", "bench", "--model", model, "--prompts",
                          str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--prompts" in bad.stderr


def test_baselines_find_the_tools_build_script_in_an_editable_install(monkeypatch):
    """`molink-lite bench --baseline ...` builds llama-server with kernels/build_tools.py. The script is found through
    the package (molink_lite.kernels maps the top-level kernels/ folder), so an editable install (`pip install -e`,
    where molink_lite/ has no kernels/ folder of its own) finds it too, instead of failing every baseline."""
    from molink_lite.tools import bench_serve

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="LLAMA_TOOLS_DIR=/tools/bin\n")

    monkeypatch.delenv("MOLINK_LLAMA_BIN", raising=False)
    monkeypatch.setattr(bench_serve.subprocess, "run", fake_run)
    assert str(bench_serve.llama_tools(bench_serve.BenchConfig(model="m.gguf"))) == "/tools/bin"
    script = Path(seen[0][1])
    assert script.name == "build_tools.py" and script.is_file()
