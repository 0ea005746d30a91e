"""tests/bench/gpu_pipeline.py keeps working between GPU sessions: a --tiny dry run on the CPU (both parts, lanes,
pipelined prefill through the gateway), with the JSON the GPU runs are read from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the bench script starts stage and gateway processes
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "gpu_pipeline.py"), "--tiny", "--part", "both",
                        "--model", str(tmp_path / "tiny.gguf"), "--stages", "1,2", "--lanes", "1,2",
                        "--micro-batches", "S", "--seqs", "2", "--conc", "4", "--steps", "6", "--http-tokens", "8",
                        "--ttft-prompt", "96", "--prefill-chunk", "32", "--threads", "1", "--json", str(out),
                        "--workdir", str(tmp_path / "wd")],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["seqs"] for r in res["whole_engine"]["rows"]] == [2]
    assert set(res["served"]) == {"1x_mb1", "2x_mb2"}
    gw = res["gateway"]
    assert set(gw) == {"1x_mb1", "2x_mb2", "2x_l2_mb2"}, gw.keys()
    for key, r in gw.items():
        assert "error" not in r, (key, r)
        assert r["rows"][0]["tokens"] == 4 * 8 and r["ttft_ms_best"] > 0
    assert "issue 7" in p.stdout and "2x_l2_mb2" in p.stdout


def test_gpu_bench_gateway_over_an_emulated_link(tmp_path):
    """--delay-ms/--rate-mbit put a relay in front of the second stage; --ignore-eos asks for every token."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "gpu_pipeline.py"), "--tiny", "--part", "gateway",
                        "--model", str(tmp_path / "tiny.gguf"), "--stages", "2", "--micro-batches", "A", "--conc", "1,4",
                        "--http-tokens", "8", "--ttft-prompt", "64", "--threads", "1", "--delay-ms", "2",
                        "--rate-mbit", "100", "--ignore-eos", "--codec", "auto", "--json", str(out),
                        "--workdir", str(tmp_path / "wd")],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())["gateway"]["2x_mbauto_auto"]  # the gateway's own link-aware choice
    assert "error" not in r, r
    assert r["stats"]["pipelines"][0]["link_choice"]["micro_batches"] == 2  # CPU stages: one per stage
    assert "gateway chose: codec f16" in p.stdout
    assert [row["tokens"] for row in r["rows"]] == [8, 4 * 8]
    assert (tmp_path / "wd" / "gw" / "relay1.log").is_file()


def test_gpu_bench_engine_chain_with_the_ring(tmp_path):
    """--ring off,on in the pipeline part: the same stages measured with the gateway closing every round, then with
    the last stage sending each round on to the first itself (the gateway gets the tokens only)."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "gpu_pipeline.py"), "--tiny", "--part", "pipeline",
                        "--model", str(tmp_path / "tiny.gguf"), "--stages", "2", "--micro-batches", "1",
                        "--seqs", "1,4", "--steps", "12", "--ttft-prompt", "64", "--threads", "1", "--ring", "off,on",
                        "--skip-whole-engine", "--json", str(out), "--workdir", str(tmp_path / "wd")],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    served = json.loads(out.read_text())["served"]
    assert set(served) == {"2x_mb1_ringoff", "2x_mb1_ringon"}, served.keys()
    for key, rings in (("2x_mb1_ringoff", 0), ("2x_mb1_ringon", None)):
        rows = served[key]["rows"]
        assert [r["seqs"] for r in rows] == [1, 4]
        for r in rows:
            assert r["generated"] == r["seqs"] * 12
            if rings == 0:
                assert r["ring_rounds"] == 0 and r["ring"].startswith("off: --ring off")
            else:
                assert r["ring_rounds"] > 0 and r["ring"] == "on"
