"""Join across separate hosts: the gateway and three stages each in their own network namespace (own
address, own loopback, own firewall), joined by veth pairs on a bridge. One stage accepts no inbound
connection (an iptables rule dropping every incoming TCP SYN, like a home router): the gateway finds that
neither it nor the upstream stage can reach it, both links into it go through the gateway's relay, the
plan shows those links as relayed with their measured cost, and greedy text over the f32 wire still
equals the whole model's."""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import os
import subprocess
import sys
import time

import pytest

from molink_lite.wire.auth import new_secret

import netns
import serving
from chain import whole_model_greedy_texts

pytestmark = pytest.mark.slow
WHY = netns.unavailable()
API_KEY = new_secret()


def http(method: str, url: str, body=None, timeout: float = 120):
    """With the API key: the gateway listens on a non-loopback address, so keys are required."""
    return serving.http(method, url, body, timeout=timeout, key=API_KEY)


@pytest.mark.skipif(WHY is not None, reason=f"network namespaces unavailable: {WHY}")
def test_stages_on_separate_hosts_one_behind_nat(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=12, n_embd=256, n_head=4, n_vocab=512)
    env = {**os.environ, "MOLINK_SECRET": new_secret(), "MOLINK_API_KEY": API_KEY}
    procs = []

    def spawn(host: str, args, name: str):
        out = open(tmp_path / f"{name}.log", "wb")
        e = {**env, "MOLINK_CACHE": str(tmp_path / f"cache-{name}")}
        p = subprocess.Popen(hosts.cmd(host, [sys.executable, "-m", "molink_lite.cli", *args]), stdout=out,
                             stderr=subprocess.STDOUT, env=e, cwd=os.getcwd())
        out.close()
        procs.append(p)
        return p

    with netns.Hosts(["gw", "a", "b", "nat"]) as hosts:  # "nat" also serves over TLS (--tls auto)
        how = hosts.drop_inbound("nat")
        gw_url = f"http://{hosts.addr['gw']}:8000"
        gw = spawn("gw", ["gateway", "--model", model, "--host", hosts.addr["gw"], "--port", "8000", "--codec", "f32",
                     "--ctx", "512", "--max-seqs", "4", "--join-settle", "2"], "gateway")
        try:
            for h in ("a", "b", "nat"):
                listen = ["--host", "0.0.0.0"] if how or h != "nat" else \
                    ["--host", "127.0.0.1", "--advertise", f"wss://{hosts.addr['nat']}:7000"]  # no iptables: loopback only
                tls = ["--tls", "auto"] if h == "nat" else []  # TLS runs end to end inside the relay's tunnel
                spawn(h, ["stage", "--join", gw_url, *listen, *tls, "--port", "7000", "--max-memory", "60MiB",
                          "--name", h, "--threads", "1", "--flash-attn", "off"], f"stage-{h}")
            deadline = time.monotonic() + 180
            up = False
            while time.monotonic() < deadline and not up and gw.poll() is None:
                try:
                    up = http("GET", gw_url + "/health", timeout=2)[0] == 200
                except OSError:
                    time.sleep(0.5)
            logs = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.log"))
            assert up, logs
            _, st = http("GET", gw_url + "/v1/stats")
            pipe = st["placement"][0]["pipelines"][0]
            assert [s["layers"] for s in pipe["stages"]] == ["0-3", "4-7", "8-11"]
            order = [s["host"]["name"] for s in pipe["stages"]]
            links = pipe["links"]
            print(f"\nhosts {hosts.addr}; inbound blocked on 'nat' by {how or 'binding to loopback'}; order {order}")
            for k in links:
                print(f"  {k['from']:>7} -> {k['to']:<4} {k['route']:<18} rtt {k.get('rtt_ms')} ms"
                      f"{'' if 'mbit' not in k else ', %s Mbit/s' % k['mbit']}  ({k['check']})")
            for k in links:
                assert (k["route"] != "direct") == (k["to"] == "nat"), links
                assert k.get("rtt_ms") is not None, links
            assert sum(k["to"] == "nat" for k in links) == (1 if order[0] == "nat" else 2)

            prompts = ([1, 5, 9, 200, 31], [7, 7, 300])
            for prompt, want in zip(prompts, whole_model_greedy_texts(model, prompts, 12)):
                status, body = http("POST", gw_url + "/v1/completions",
                                    {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
                assert status == 200, body
                assert body["choices"][0]["text"] == want
        finally:
            serving.stop_processes(procs)
