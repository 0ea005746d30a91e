"""Seeing the cluster: Prometheus /metrics, the dashboard page (in headless Chromium), `molink-lite status`,
and the log of a gateway whose clients misbehave (2 real stage processes of a tiny model + a gateway process
with an API key)."""

from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest

from molink_lite.model.split import LayerRange
from molink_lite.serving.launcher import start_stages, stop_stages

from serving import GatewayProcess, http, served_pipeline

pytestmark = pytest.mark.slow
KEY = "test-key-0123456789abcdef"
ARTIFACTS = Path(os.environ.get("MOLINK_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def call(method: str, url: str, body: Any = None, key: Optional[str] = KEY, timeout: float = 60) -> Tuple[int, Any]:
    return http(method, url, body, timeout=timeout, key=key)


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    wd = tmp_path_factory.mktemp("obs")
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    keyfile = wd / "api.key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    with served_pipeline(model, [LayerRange(0, 2), LayerRange(2, 4)],
                         ["--threads", "1", "--ctx", "2048", "--max-seqs", "4", "--metrics-port", "0"], wd,
                         gateway_extra=["--api-key-file", str(keyfile)]) as (gw, procs):
        yield gw, procs, keyfile


@pytest.fixture(scope="module")
def traffic(cluster):
    """A few requests of known size; returns their usage blocks."""
    gw = cluster[0]
    usages = []
    for i in range(3):
        status, body = call("POST", gw.url + "/v1/completions",
                            {"prompt": f"hello number {i}", "max_tokens": 8, "ignore_eos": True})
        assert status == 200, body
        usages.append(body["usage"])
    status, body = call("POST", gw.url + "/v1/completions", {"prompt": "x", "max_tokens": -1})
    assert status == 400
    return usages


def _families(text: str) -> Dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: Dict[str, Any], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in fams[family].samples if s.name == sample and all(s.labels.get(k) == v
                                                                               for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, fams[family].samples)
    return found[0]


def test_metrics_count_requests_tokens_and_latency(cluster, traffic):
    gw = cluster[0]
    status, _ = call("GET", gw.url + "/metrics", key=None)
    assert status == 401  # behind the API key like every data endpoint
    status, text = call("GET", gw.url + "/metrics")
    assert status == 200 and isinstance(text, str)
    fams = _families(text)
    n = len(traffic)
    gen = sum(u["completion_tokens"] for u in traffic)
    prompt = sum(u["prompt_tokens"] for u in traffic)
    assert _value(fams, "molink_requests", "molink_requests_total", endpoint="completions", status="200") == n
    assert _value(fams, "molink_requests", "molink_requests_total", endpoint="completions", status="400") == 1
    assert _value(fams, "molink_generation_tokens", "molink_generation_tokens_total") == gen
    assert _value(fams, "molink_prompt_tokens", "molink_prompt_tokens_total") == prompt
    assert _value(fams, "molink_time_to_first_token_seconds", "molink_time_to_first_token_seconds_count") == n
    assert _value(fams, "molink_time_to_first_token_seconds", "molink_time_to_first_token_seconds_bucket",
                  le="+Inf") == n
    assert _value(fams, "molink_inter_token_latency_seconds", "molink_inter_token_latency_seconds_count") == gen - n
    assert _value(fams, "molink_inter_token_latency_seconds", "molink_inter_token_latency_seconds_sum") > 0
    assert fams["molink_time_to_first_token_seconds"].type == "histogram"
    assert fams["molink_requests"].type == "counter"
    # state read at scrape time: gateway, pipeline, links and both stages (fetched through the gateway)
    assert _value(fams, "molink_queue_length", "molink_queue_length") == 0
    assert _value(fams, "molink_running_sequences", "molink_running_sequences", pipeline="p0") == 0
    assert _value(fams, "molink_pipeline_state", "molink_pipeline_state", pipeline="p0", state="up") == 1
    assert _value(fams, "molink_pipeline_state", "molink_pipeline_state", pipeline="p0", state="down") == 0
    assert _value(fams, "molink_kv_cells_capacity", "molink_kv_cells_capacity", pipeline="p0") == 2048
    assert _value(fams, "molink_link_rtt_seconds", "molink_link_rtt_seconds", pipeline="p0", stage="0") > 0
    assert _value(fams, "molink_link_bandwidth_bytes_per_second", "molink_link_bandwidth_bytes_per_second",
                  pipeline="p0", stage="0") > 0
    infos = fams["molink_stage_info"].samples
    assert sorted(s.labels["layers"] for s in infos) == ["0-1", "2-3"]
    assert all(s.labels["backend"] == "cpu" for s in infos)
    assert _value(fams, "molink_prefix_cache_enabled", "molink_prefix_cache_enabled", pipeline="p0") == 1
    cached = _value(fams, "molink_prefix_cache_cells", "molink_prefix_cache_cells", pipeline="p0")
    assert cached <= _value(fams, "molink_prefix_cache_budget_cells", "molink_prefix_cache_budget_cells",
                            pipeline="p0")
    for stage in ("0", "1"):
        steps = _value(fams, "molink_stage_steps", "molink_stage_steps_total", pipeline="p0", stage=stage)
        assert steps >= gen / 4  # every token needs a step on every stage (steps may batch sequences)
        assert _value(fams, "molink_stage_step_seconds", "molink_stage_step_seconds", pipeline="p0", stage=stage) > 0
        assert _value(fams, "molink_stage_rows_per_step", "molink_stage_rows_per_step", pipeline="p0",
                      stage=stage) >= 1
        assert _value(fams, "molink_stage_memory_bytes", "molink_stage_memory_bytes", pipeline="p0", stage=stage) > 0
        # no sequence runs: what a stage still holds is the prefix cache's, the same cells on every stage
        assert _value(fams, "molink_kv_cells_used", "molink_kv_cells_used", pipeline="p0", stage=stage) == cached
        assert _value(fams, "molink_stage_up", "molink_stage_up", pipeline="p0", stage=stage) == 1
    assert _value(fams, "molink_router_events", "molink_router_events_total", event="replayed") == 0
    assert _value(fams, "molink_pipeline_recoveries", "molink_pipeline_recoveries_total", pipeline="p0") == 0
    # /v1/stats carries the same totals and the recent rates the dashboard and `status` show
    status, stats = call("GET", gw.url + "/v1/stats")
    assert stats["metrics"]["generation_tokens"] == gen and stats["metrics"]["requests"]["200"] == n
    assert stats["metrics"]["last_60s"]["tokens_per_s"] > 0
    assert [s["host"] for s in stats["pipelines"][0]["stage_info"]] == [socket.gethostname()] * 2
    pc = stats["pipelines"][0]["prefix_cache"]
    assert pc["enabled"] and pc["cells"] == cached and pc["lookups"] >= pc["hits"] >= 0


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


class _Traffic:
    """Streaming requests in a background thread while the browser looks."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.stop_flag, self.done = url, False, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_flag:
            status, _ = call("POST", self.url + "/v1/completions",
                             {"prompt": "tell me more", "max_tokens": 48, "ignore_eos": True})
            self.done += status == 200

    def stop(self) -> None:
        self.stop_flag = True
        self.thread.join(60)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Chromium is not installed (apt-get install chromium): the dashboard is not tested in a "
                           "browser")
def test_dashboard_in_headless_chromium(cluster, traffic, tmp_path):
    gw = cluster[0]
    status, page = call("GET", gw.url + "/", key=None)  # the page itself loads without a key; its data does not
    assert status == 200 and "<canvas" in page
    assert call("GET", gw.url + "/web/app.js", key=None)[0] == 200
    assert call("GET", gw.url + "/web/../gateway.py", key=None)[0] == 404
    assert call("GET", gw.url + "/v1/stats", key=None)[0] == 401
    load = _Traffic(gw.url)
    try:
        # without the key the page asks for one
        r = _chromium(f"--user-data-dir={tmp_path / 'profile0'}", "--virtual-time-budget=4000", "--dump-dom",
                      gw.url + "/")
        assert 'id="keybox"' in r.stdout and 'id="keybox" hidden' not in r.stdout, r.stdout[-2000:]
        # with the key (given in the address's #fragment, which the browser never sends, then kept in localStorage)
        url = f"{gw.url}/#key={KEY}"
        for attempt in range(3):  # a loaded machine may answer the page's first requests late: look again
            r = _chromium(f"--user-data-dir={tmp_path / f'profile1-{attempt}'}", "--virtual-time-budget=10000",
                          "--dump-dom", url)
            dom = r.stdout
            if '<tr class="stage"' in dom:
                break
        assert 'id="keybox" hidden' in dom, dom[-3000:]
        import re

        layers = re.findall(r'<tr class="stage" data-layers="([^"]+)"', dom)
        assert layers == ["0-1", "2-3"], dom[-3000:]
        tput = float(re.search(r'id="tput60">([^<]+)<', dom).group(1))
        assert tput > 0, dom[-3000:]
        assert re.search(r'id="status" class="badge ok"', dom)
        assert "Mbit/s" in dom  # the measured link between the two stages
        # the pipeline's prefix cache (from /v1/stats): its hit rate and the prompt tokens it saved, or "off"
        pc = re.search(r'<span class="prefix( muted)?" data-enabled="([01])"[^>]*>(prefix cache [^<]*)<', dom)
        assert pc, dom[-3000:]
        assert pc.group(2) == "0" or ("hits (" in pc.group(3) and "tokens reused" in pc.group(3)), pc.group(0)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        r = _chromium(f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=20000",
                      f"--screenshot={shot}", "--window-size=1400,1000", url)
        assert shot.exists() and shot.stat().st_size > 10000, r.stderr[-2000:]
    finally:
        load.stop()
    assert load.done >= 1


def test_status_command(cluster, traffic):
    gw, procs, keyfile = cluster
    cmd = [sys.executable, "-m", "molink_lite.cli", "status", gw.url + "/v1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs an API key" in r.stderr, r.stderr
    r = subprocess.run(cmd + ["--api-key-file", str(keyfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "status ok" in out and "pipeline p0  up" in out, out
    for sp in procs:  # both stages, with their layers, host and backend
        line = next(ln for ln in out.splitlines() if sp.url in ln and "link" not in ln)
        assert f"{sp.layers.start}-{sp.layers.stop - 1} of 4" in line and "cpu" in line and socket.gethostname() in line
    assert "link 0 -> " + procs[1].url in out and "Mbit/s" in out
    assert "tokens/s" in out and "requests " in out
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "status", f"http://127.0.0.1:{_closed_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr


def _closed_port() -> int:
    from serving import free_port

    return free_port()


def test_client_closing_a_stream_is_not_an_internal_error(cluster):
    """A client that goes away mid-stream: no `ERROR internal error` and no traceback in the gateway's log."""
    gw = cluster[0]
    body = json.dumps({"prompt": "a long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}).encode()
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 5:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        s.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the sequences are freed (nothing keeps generating for nobody)
        status, health = call("GET", gw.url + "/health")
        if health["pipelines"][0]["running"] == 0:
            break
        time.sleep(0.2)
    assert health["pipelines"][0]["running"] == 0, health
    status, text = call("GET", gw.url + "/metrics")
    assert re.search(r'molink_client_disconnects_total\{model="[^"]+"\} 3\.0', text), text
    assert re.search(r'molink_requests_total\{endpoint="completions",model="[^"]+",status="499"\} 3\.0', text), text
    log = gw.output()
    assert "internal error" not in log and "Traceback" not in log, log


def test_chat_without_template_warns_once(cluster):
    gw = cluster[0]
    for _ in range(2):
        status, body = call("POST", gw.url + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200, body
    log = gw.output()
    assert log.count("the model has no chat template") == 1, log


def test_stage_serves_its_own_metrics(cluster, traffic):
    """`stage --metrics-port`: the stage's own Prometheus endpoint (loopback, no gateway in between)."""
    import re

    procs = cluster[1]
    for sp in procs:
        m = re.search(r"stage metrics on http://127\.0\.0\.1:(\d+)/metrics", sp.log_file.read_text())
        assert m, sp.log_tail()
        status, text = call("GET", f"http://127.0.0.1:{m.group(1)}/metrics", key=None)
        assert status == 200
        fams = _families(text)
        assert _value(fams, "molink_stage_steps", "molink_stage_steps_total") > 0
        assert _value(fams, "molink_kv_cells_capacity", "molink_kv_cells_capacity") == 2048
        info = fams["molink_stage_info"].samples[0].labels
        assert info["layers"] == f"{sp.layers.start}-{sp.layers.stop - 1}" and info["backend"] == "cpu"


def test_status_over_https_with_a_self_signed_certificate(tiny_models, tmp_path):
    from molink_lite.wire.tls import self_signed

    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    procs = start_stages(model, [LayerRange(0, 4)], extra_args=["--threads", "1", "--ctx", "256", "--max-seqs", "2"],
                         workdir=str(tmp_path))
    cert, key = self_signed(tmp_path / "tls")
    gw = GatewayProcess([[procs[0].url]], extra=["--tls", "auto", "--tls-cert", str(cert), "--tls-key", str(key)], log_dir=tmp_path)
    try:
        url = f"https://localhost:{gw.port}"
        cmd = [sys.executable, "-m", "molink_lite.cli", "status", url, "--cacert", str(cert), "--timeout", "5"]
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline or gw.proc.poll() is not None:
                break
            time.sleep(0.5)
        assert r.returncode == 0, (r.stderr, gw.output())
        assert "pipeline p0  up" in r.stdout and "0-3 of 4" in r.stdout
        r = subprocess.run(cmd[:-4], capture_output=True, text=True, timeout=60)  # without --cacert: not trusted
        assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r.stderr
    finally:
        gw.stop()
        stop_stages(procs)
