"""Stages that join a gateway: placement by declared memory, each fetching only its layers.

Real processes: a gateway holding a tiny model file, three stage processes that were never given the
model (each with its own cache directory), `--join` over the authenticated cluster link.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molink_lite.wire.auth import new_secret

from chain import whole_model_greedy_texts
from serving import free_port, http, spawn_cli, stop_processes, wait_healthy

pytestmark = pytest.mark.slow
SECRET = new_secret()


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _spawn(args, log: Path, cache: Path):
    return spawn_cli(args, log, {"MOLINK_SECRET": SECRET, "MOLINK_CACHE": str(cache)})


def test_three_stages_join_place_fetch_and_serve_exactly(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=12, n_embd=256, n_head=4, n_vocab=512)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _spawn(["gateway", "--model", model, "--port", str(port), "--codec", "f32", "--ctx", "512",
                 "--max-seqs", "4", "--join-settle", "2"], tmp_path / "gateway.log", tmp_path / "gwcache")
    stages = []
    try:
        for i, mem in enumerate(["60MiB", "60MiB", "60MiB", "30MiB"]):  # the last cannot hold even one layer
            cache = tmp_path / f"cache{i}"
            cache.mkdir()
            stages.append((_spawn(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--max-memory", mem,
                                   "--name", f"h{i}", "--threads", "1", "--flash-attn", "off"],
                                  tmp_path / f"stage{i}.log", cache), cache))
            time.sleep(0.3)
        wait_healthy(url, gw, 180)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))
        assert http("GET", url + "/health", timeout=5)[0] == 200, logs
        status, st = http("GET", url + "/v1/stats")
        plan = st["placement"][0]
        stages_plan = plan["pipelines"][0]["stages"]
        ranges = [s["layers"] for s in stages_plan]
        print(f"\nplan: {[(s['host']['name'], s['layers']) for s in stages_plan]}; "
              f"unused: {[(u['host']['name'], u['reason']) for u in plan['unused']]}")
        assert ranges == ["0-3", "4-7", "8-11"]  # covers every layer, once
        assert all(s["host"]["sec_per_layer"] > 0 for s in stages_plan)  # each stage measured its speed
        assert plan["unused"][0]["host"]["name"] == "h3" and "needs at least" in plan["unused"][0]["reason"]
        assert stages[3][0].wait(60) == 2  # told why and not used
        assert "cannot serve a layer" in (tmp_path / "stage3.log").read_text()
        # each stage stores only its share of the model (4 of 12 layers plus embeddings or head)
        size = Path(model).stat().st_size
        held = [_dir_bytes(c) for _, c in stages[:3]]
        print(f"model {size / 2**20:.1f} MiB; stage caches {[round(h / 2**20, 1) for h in held]} MiB")
        for h in held:
            assert h <= 1.05 * size * 4 / 12 + (1 << 20)
        # greedy output over the f32 wire equals the whole model's, token for token (ignore_eos: full length;
        # the reference text is decoded by the same incremental detokenizer the last stage uses)
        prompts = ([1, 5, 9, 200, 31], [7, 7, 300])
        for prompt, want in zip(prompts, whole_model_greedy_texts(model, prompts, 12)):
            status, body = http("POST", url + "/v1/completions",
                                {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 12
            assert body["choices"][0]["text"] == want
        # the placement and its hosts in `molink-lite status` and /metrics
        r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "status", url], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        names = [s["host"]["name"] for s in stages_plan]
        assert "placement:" in r.stdout and f"j0: layers 4-7 on {names[1]}" in r.stdout, r.stdout
        assert f"j0: link {names[0]} -> {names[1]} direct" in r.stdout, r.stdout
        status, text = http("GET", url + "/metrics")
        assert status == 200
        assert text.count("molink_stage_info{") == 3 and re.search(r'molink_pipeline_state\{model="[^"]+",pipeline="j0",state="up"\} 1\.0', text)
        if shutil.which("chromium"):  # the dashboard shows the placement and the routes of the links
            r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
                                url + "/"], capture_output=True, text=True, timeout=90)
            dom = r.stdout
            assert dom.count('<tr class="stage"') == 3 and 'id="placement-box" hidden' not in dom, dom[-3000:]
            assert f"<td>{names[0]}</td><td>{names[1]}</td><td>direct</td>" in dom, dom[-3000:]
            shots = Path(os.environ.get("MOLINK_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
            shots.mkdir(parents=True, exist_ok=True)
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium'}",
                            "--virtual-time-budget=5000", f"--screenshot={shots / 'dashboard-join.png'}",
                            "--window-size=1400,1100", url + "/"], capture_output=True, timeout=90)
    finally:
        stop_processes([p for p, _ in stages] + [gw])


def test_join_with_a_wrong_secret_is_refused(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    port = free_port()
    gw = _spawn(["gateway", "--model", model, "--port", str(port)], tmp_path / "gw.log", tmp_path / "c0")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                http("GET", f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        env = {**os.environ, "MOLINK_SECRET": "w" * 64, "MOLINK_CACHE": str(tmp_path / "c1")}
        p = subprocess.run([sys.executable, "-m", "molink_lite.cli", "stage", "--join", f"http://127.0.0.1:{port}",
                            "--host", "127.0.0.1", "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 2 and "refused" in p.stderr
    finally:
        gw.terminate()
        gw.wait(20)


def _wait_health(url: str, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("GET", url + "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("the joined cluster never came up")


def test_a_download_killed_midway_resumes_and_a_later_host_becomes_a_replica(tiny_models, tmp_path):
    """Stages fetch through a 10 Mbit/s relay; one is killed mid-download and started again: it takes its
    layers back and resumes the file where it stopped. A fourth host joining later forms a replica that
    takes load."""
    model = tiny_models("llama", n_layer=12, n_embd=256, n_head=4, n_vocab=512)
    port, rport = free_port(), free_port()
    gw = _spawn(["gateway", "--model", model, "--port", str(port), "--codec", "f32", "--ctx", "512",
                 "--max-seqs", "4", "--join-settle", "2"], tmp_path / "gateway.log", tmp_path / "gwcache")
    relay = _spawn(["link", "--listen", f"127.0.0.1:{rport}", "--to", f"127.0.0.1:{port}", "--rate-mbit", "10"],
                   tmp_path / "relay.log", tmp_path / "rc")
    via = f"http://127.0.0.1:{rport}"
    procs = []

    def stage(i: int, mem: str, url: str):
        cache = tmp_path / f"cache{i}"
        cache.mkdir(exist_ok=True)
        p = _spawn(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--max-memory", mem,
                    "--name", f"h{i}", "--threads", "1", "--flash-attn", "off"], tmp_path / f"stage{i}-{len(procs)}.log",
                   cache)
        procs.append(p)
        return p, cache

    try:
        first, cache0 = stage(0, "60MiB", via)
        stage(1, "60MiB", via)
        stage(2, "60MiB", via)
        deadline = time.monotonic() + 120
        part = None
        while time.monotonic() < deadline:
            parts = list(cache0.rglob("*.part"))
            if parts and parts[0].stat().st_size > (2 << 20):
                part = parts[0]
                break
            time.sleep(0.05)
        assert part is not None, "no download started"
        first.kill()
        first.wait(10)
        got = part.stat().st_size
        again, _ = stage(0, "60MiB", via)
        _wait_health(f"http://127.0.0.1:{port}", procs)
        log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("stage0-*.log"))
        assert "resuming the download at" in log, log[-3000:]
        print(f"\nkilled after {got / 2**20:.1f} MiB; the restarted stage resumed there")
        # a fourth host with room for the whole model joins later: a replica pipeline that takes load
        stage(3, "200MiB", f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, st = http("GET", f"http://127.0.0.1:{port}/v1/stats")
            if len([p for p in st["pipelines"] if p["state"] == "up"]) == 2:
                break
            time.sleep(0.5)
        assert len([p for p in st["pipelines"] if p["state"] == "up"]) == 2, st
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            res = list(pool.map(lambda i: http("POST", f"http://127.0.0.1:{port}/v1/completions",
                                               {"prompt": [1, 2, 3, i + 4], "max_tokens": 8, "ignore_eos": True}),
                                range(8)))
        assert all(r[0] == 200 for r in res)
        done = [p["scheduler"]["completed"] for p in http("GET", f"http://127.0.0.1:{port}/v1/stats")[1]["pipelines"]]
        assert min(done) >= 1, done
        # a stage of the first pipeline leaves with requests in flight: none is lost (replayed on the replica),
        # and the next host that joins takes its layers over (re-placement)
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(http, "POST", f"http://127.0.0.1:{port}/v1/completions",
                                {"prompt": [1, 2, 3, i + 4], "max_tokens": 300, "ignore_eos": True, "seed": i})
                    for i in range(8)]
            time.sleep(1.0)
            procs[1].kill()  # h1: the middle stage of pipeline j0
            res = [f.result() for f in futs]
        assert all(r[0] == 200 and r[1]["usage"]["completion_tokens"] == 300 for r in res), res
        st = http("GET", f"http://127.0.0.1:{port}/v1/stats")[1]
        print(f"requests replayed after the stage left: {st['router']['replayed']}")
        assert st["router"]["replayed"] >= 1, st["router"]
        t0 = time.monotonic()
        stage(4, "60MiB", f"http://127.0.0.1:{port}")
        while time.monotonic() < t0 + 120:
            st = http("GET", f"http://127.0.0.1:{port}/v1/stats")[1]
            if any(r["host"] == "h4" for r in st["replacements"]) and all(p["state"] == "up" for p in st["pipelines"]):
                break
            time.sleep(0.2)
        # (h0, killed mid-download and started again, took its own layers back before j0 first came up: listed too)
        moved = [r for r in st["replacements"] if r["host"] == "h4"]
        assert moved and moved[0]["after"] == "left", st["replacements"]
        print(f"re-placement: {moved[0]} (test saw it after {time.monotonic() - t0:.2f} s)")
        assert http("POST", f"http://127.0.0.1:{port}/v1/completions", {"prompt": [1, 2], "max_tokens": 4})[0] == 200
    finally:
        stop_processes(procs + [relay, gw])


def test_a_gateway_with_the_default_codec_places_joined_stages(tiny_models, tmp_path):
    """The gateway's default --codec auto is chosen from the links once a pipeline connects: a joining stage is
    assigned a codec it can start with (f16), then configured with the chosen one, and serves."""
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=256)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _spawn(["gateway", "--model", model, "--port", str(port), "--ctx", "256", "--max-seqs", "2",
                 "--join-settle", "1"], tmp_path / "gateway.log", tmp_path / "gwcache")
    (tmp_path / "cache").mkdir()
    stage = _spawn(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--name", "h0", "--threads", "1"],
                   tmp_path / "stage.log", tmp_path / "cache")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and gw.poll() is None and stage.poll() is None:
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))
        assert http("GET", url + "/health", timeout=5)[0] == 200, logs
        status, body = http("POST", url + "/v1/completions", {"prompt": [1, 5, 9], "max_tokens": 4, "temperature": 0,
                                                               "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        pipe = http("GET", url + "/v1/stats")[1]["pipelines"][0]
        assert pipe["codec"] == "f16" and pipe["link_choice"]["codec"] == "f16"
        assert [s["codec"] for s in pipe["stages"]] == ["f16"]
    finally:
        stop_processes([stage, gw])
