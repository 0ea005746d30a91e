"""Soak: 1,000 requests at concurrency 32, mixed prompt and output lengths, random client disconnects.

Asserts the behaviour (nothing lost or hung, every slot and KV cell free at the end, memory flat after
warm-up) and prints the figures.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import random
import time

import aiohttp
import pytest

from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.model.split import LayerRange

from serving import GatewayProcess, http

pytestmark = pytest.mark.slow
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu river stone cloud".split()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _soak(url: str, n: int, conc: int, pids: dict, warm: int) -> dict:
    rng = random.Random(5)
    sem = asyncio.Semaphore(conc)
    counts = {"ok": 0, "disconnected": 0, "errors": 0}
    rss = {}
    done = 0
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as sess:
        async def one(i: int) -> None:
            nonlocal done
            async with sem:
                body = {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 48))),
                        "max_tokens": rng.randint(1, 16), "ignore_eos": True, "stream": rng.random() < 0.5,
                        "temperature": rng.choice([0, 0.8])}
                leave = rng.random() < 0.1  # the client goes away early
                async with sess.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    if leave:
                        await r.content.read(1)
                        r.close()
                        counts["disconnected"] += 1
                    elif body["stream"]:
                        data = await r.read()
                        if b'"error"' in data or not data.rstrip().endswith(b"data: [DONE]"):
                            counts["errors"] += 1
                        else:
                            counts["ok"] += 1
                    else:
                        res = await r.json()
                        ok = res["usage"]["completion_tokens"] == body["max_tokens"]
                        counts["ok" if ok else "errors"] += 1
                done += 1
                if done == warm:
                    rss["warm"] = {k: rss_mb(p) for k, p in pids.items()}
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 1500)
    rss["end"] = {k: rss_mb(p) for k, p in pids.items()}
    return {"counts": counts, "rss": rss}


def test_soak_nothing_lost_memory_flat(gemma3_path, tmp_path):
    procs = start_stages(gemma3_path, [LayerRange(0, 14), LayerRange(14, 18)],
                         extra_args=["--threads", "1", "--ctx", "8192", "--max-seqs", "32"], workdir=str(tmp_path))
    gw = GatewayProcess([[sp.url for sp in procs]], log_dir=tmp_path)
    try:
        gw.wait_ready()
        pids = {"gateway": gw.proc.pid, **{f"stage{i}": sp.proc.pid for i, sp in enumerate(procs)}}
        t0 = time.monotonic()
        res = asyncio.run(_soak(gw.url, 1000, 32, pids, warm=200))
        wall = time.monotonic() - t0
        time.sleep(1.0)  # the last frees travel with the next (empty) step
        status, st = http("GET", gw.url + "/v1/stats")
        pipe = st["pipelines"][0]
        print(f"\nsoak: 1000 requests at concurrency 32 in {wall:.0f} s: {res['counts']}; "
              f"RSS MB after 200 {res['rss']['warm']}, at the end {res['rss']['end']}; "
              f"stage live sequences {[s['live_seqs'] for s in pipe['stages']]}")
        c = res["counts"]
        assert c["ok"] + c["disconnected"] == 1000 and c["errors"] == 0
        assert pipe["running"] == 0 and pipe["queued"] == 0
        # what the stages still hold is the prefix cache's entries, within its budget
        pc = pipe["prefix_cache"]
        assert pc["cells"] <= pc["budget"]
        assert all(s["live_seqs"] == pc["entries"] and s["kv_positions"] == pc["cells"] for s in pipe["stages"])
        for k, v in res["rss"]["end"].items():
            assert v <= 1.10 * res["rss"]["warm"][k], f"{k} RSS grew from {res['rss']['warm'][k]:.0f} to {v:.0f} MB"
        status, body = http("POST", gw.url + "/v1/completions", {"prompt": "The capital of France is",
                                                                 "max_tokens": 4, "temperature": 0})
        assert status == 200
    finally:
        gw.stop()
        stop_stages(procs)
