"""Several models behind one gateway (issue 29): routing by ``model``, placement over all models, on-demand loading.

Pure logic first (the model table, tags, the joint placement rule, the settings), then real processes: ``serve``
with the demo model and a tiny llama, and join mode with three hosts shared by two models.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import concurrent.futures as cf
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molink_lite.serving.cluster_set import Need, joint_plan, pick_model
from molink_lite.serving.config import ClusterConfig, ConfigError, GatewayConfig, ModelSpec
from molink_lite.serving.models import ModelTable, ServedModel, UnknownModel, split_tagged, valid_name
from molink_lite.serving.placement import HostSpec, parse_size
from molink_lite.wire.auth import new_secret

from chain import whole_model_greedy_texts
from serving import events_to_end, free_port, http, spawn_cli, stop_processes, wait_healthy

MiB = 1 << 20


# ---------------------------------------------------------------------- pure logic
class _Router:
    def __init__(self):
        self.pipelines = []
        self.queued = 0


def test_the_model_table_resolves_ids_and_aliases():
    a, b = ServedModel("chat", _Router(), aliases=("gpt-4o-mini",)), ServedModel("code", _Router())
    t = ModelTable([a, b])
    assert t.resolve(None) is a and t.resolve("gpt-4o-mini") is a and t.resolve("code") is b
    with pytest.raises(UnknownModel) as e:
        t.resolve("Chat")   # ids are exact, as OpenAI's are
    assert e.value.served == ["chat", "code"]
    with pytest.raises(ValueError, match="used by two models"):
        ModelTable([a, ServedModel("gpt-4o-mini", _Router())])
    with pytest.raises(ValueError, match="used by two models"):
        ModelTable([ServedModel("x", _Router()), ServedModel("x", _Router())])


def test_tags_on_the_command_line():
    assert split_tagged("chat=ws://a:1,ws://b:2", "urls") == ("chat", "ws://a:1,ws://b:2")
    assert split_tagged("ws://a:1/relay/t?x=1,ws://b:2", "urls") == ("", "ws://a:1/relay/t?x=1,ws://b:2")
    assert split_tagged("qwen2.5:7b=/m/q.gguf", "path") == ("qwen2.5:7b", "/m/q.gguf")
    assert split_tagged(__file__, "path") == ("", __file__)   # an existing file is never split
    assert valid_name("Gemma 3 270m") and valid_name("org/model") and not valid_name("a=b") and not valid_name(" a")


def test_settings_are_checked():
    cfg = GatewayConfig(pipelines=[["ws://a:1"], ["ws://b:1"]], pipeline_models=["", "code"],
                        aliases=[("small", "code")], idle_unload=600)
    assert cfg.pipeline_models == ("", "code") and cfg.aliases == (("small", "code"),)
    assert GatewayConfig(pipelines=[["ws://a:1"]]).pipeline_models == ("",)
    with pytest.raises(ConfigError, match="one entry per pipeline"):
        GatewayConfig(pipelines=[["ws://a:1"]], pipeline_models=["a", "b"])
    with pytest.raises(ConfigError, match="--idle-unload"):
        GatewayConfig(idle_unload=-1)
    with pytest.raises(ConfigError, match="not valid"):
        GatewayConfig(aliases=[("a=b", "c")])
    j = ClusterConfig(models=[ModelSpec("/a.gguf", "a"), ModelSpec("/b.gguf")])
    assert j.model == "/a.gguf" and ClusterConfig(model="/x.gguf").models == (ModelSpec("/x.gguf"),)
    with pytest.raises(ConfigError, match="twice"):
        ClusterConfig(models=[ModelSpec("/a.gguf"), ModelSpec("/a.gguf", "b")])
    # the command line: --model NAME=PATH or --model-name NAME=PATH, tagged pipelines, aliases, 10m
    from molink_lite.cli import build_parser, gateway_config

    a = build_parser().parse_args(["gateway", "--model", "/m/a.gguf", "--model", "code=/m/b.gguf", "--model-name",
                                   "chat=a.gguf", "--pipeline", "code=ws://x:1,ws://y:1", "--alias", "gpt=chat",
                                   "--idle-unload", "10m"])
    cfg = gateway_config(a)
    assert [(s.name, s.path) for s in cfg.join.models] == [("chat", "/m/a.gguf"), ("code", "/m/b.gguf")]
    assert cfg.pipelines == (("ws://x:1", "ws://y:1"),) and cfg.pipeline_models == ("code",)
    assert cfg.idle_unload == 600 and cfg.aliases == (("gpt", "chat"),) and cfg.model_name is None
    assert gateway_config(build_parser().parse_args(["gateway", "--pipeline", "ws://x:1", "--model-name", "m"])
                          ).model_name == "m"


def test_a_joining_host_goes_where_it_is_needed():
    small, big = Need(min_host=10, pipeline_bytes=100), Need(min_host=50, pipeline_bytes=400)
    # first the models without a pipeline, in order, until their joined hosts could hold one
    assert pick_model([small, big], 200) == 0
    small.waiting = 200
    assert pick_model([small, big], 200) == 1
    assert pick_model([small, big], 20) == 0          # too small for a layer of the big model
    assert pick_model([small, big], 5) == 0           # too small for either: refused by the closest one
    big.waiting = 400
    # then replicas: the busiest model first, then the one with fewer pipelines
    small.pipelines, big.pipelines, small.waiting, big.waiting = 1, 1, 0, 0
    big.load = 3.0
    assert pick_model([small, big], 500) == 1
    big.load, small.pipelines = 0.0, 2
    assert pick_model([small, big], 500) == 1
    # a pipeline that lost a host comes first, if this host can hold the vacated layers
    small.vacated = (300,)
    assert pick_model([small, big], 500) == 0 and pick_model([small, big], 200) == 1


def test_the_joint_plan_shares_hosts_between_models(tiny_models, gemma3_path):
    tiny = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    hosts = [HostSpec(name=f"h{i}", backend="cpu", memory_bytes=parse_size(m))
             for i, m in enumerate(["2GB", "200MB", "2GB", "10MB"])]
    out = joint_plan([gemma3_path, tiny], hosts, n_ctx=1024, n_seqs=4)
    (g, gp, gwhy), (t, tp, twhy) = out
    assert gp is not None and tp is not None, (gwhy, twhy)
    g_hosts = {s.host.name for pipe in gp.pipelines for s in pipe}
    t_hosts = {s.host.name for pipe in tp.pipelines for s in pipe}
    # h0 holds the demo model, h1 the tiny one, h2 is a replica of the first (both have one pipeline: in order)
    assert g_hosts == {"h0", "h2"} and len(gp.pipelines) == 2 and t_hosts == {"h1"}, (g_hosts, t_hosts)
    assert [h.name for h, _ in tp.unused] == ["h3"]   # too small for a layer of either: told by the closest
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "plan", "--model", gemma3_path, "--model", tiny,
                        "--host", "2GB,cpu,name=a", "--host", "200MB,cpu,name=b", "--ctx", "1024", "--max-seqs", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("== ") == 2 and "on a" in r.stdout and "on b" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "plan", "--model", gemma3_path, "--model", tiny,
                        "--host", "2GB,cpu,name=a", "--ctx", "1024", "--max-seqs", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot be placed: no host was left for it" in r.stdout, r.stdout


# ---------------------------------------------------------------------- serve: the demo model and a tiny llama
ENGINE = ["--codec", "f32", "--ctx", "512", "--max-seqs", "4", "--threads", "1", "--flash-attn", "off",
          "--prefix-cache", "off"]


def _complete(url: str, model: str, prompt, n: int = 8):
    return http("POST", url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0, "ignore_eos": True})


def _stage_rss(url: str, model: str) -> int:
    st = http("GET", url + "/v1/stats")[1]
    return sum(int(s["rss_bytes"]) for p in st["pipelines"] if p["model"] == model for s in p.get("stages", []))


@pytest.mark.slow
def test_two_models_behind_one_gateway(gemma3_path, tiny_models, tmp_path, monkeypatch):
    """`serve --model DEMO --model tiny=TINY`: each answer equals its whole model's, /v1/models lists both, an
    unknown name is a 404, an alias works, metrics and stats are per model, the SDKs pick each model by name, and
    with --idle-unload an idle model's stage memory drops and the next request loads it again."""
    tiny = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = spawn_cli(["serve", "--model", gemma3_path, "--model", f"tiny={tiny}", "--alias", "small=tiny",
                      "--port", str(port), "--idle-unload", "4", *ENGINE], log, {})
    try:
        assert wait_healthy(url, proc, 240), log.read_text(errors="replace")[-3000:]
        status, models = http("GET", url + "/v1/models")
        ids = [m["id"] for m in models["data"]]
        assert status == 200 and ids == ["Gemma 3 270m", "tiny"], models
        assert models["data"][1]["aliases"] == ["small"] and models["data"][1]["meta"]["n_vocab"] == 512
        assert models["data"][0]["meta"]["arch"] == "gemma3"
        # each request's text equals the whole model's for the model it named (greedy, f32 wire)
        prompts = {"Gemma 3 270m": ([2, 818, 5279, 529, 7001, 563], gemma3_path), "tiny": ([1, 5, 9, 200], tiny)}
        want = {m: whole_model_greedy_texts(path, [p], 8)[0] for m, (p, path) in prompts.items()}
        loaded_rss = {}
        for m, (p, _) in prompts.items():
            status, body = _complete(url, m, p)
            assert status == 200 and body["model"] == m and body["choices"][0]["text"] == want[m], body
            loaded_rss[m] = _stage_rss(url, m)
        status, body = _complete(url, "small", prompts["tiny"][0])
        assert status == 200 and body["choices"][0]["text"] == want["tiny"], body
        status, body = _complete(url, "gpt-4", [1, 2])
        assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        assert "'Gemma 3 270m', 'tiny'" in body["error"]["message"]
        # tokenization is the named model's
        assert http("POST", url + "/tokenize", {"model": "tiny", "content": "hello"})[1]["tokens"] != \
            http("POST", url + "/tokenize", {"model": "Gemma 3 270m", "content": "hello"})[1]["tokens"]
        # per-model metrics and stats
        text = http("GET", url + "/metrics")[1]
        assert 'molink_generation_tokens_total{model="tiny"} 16.0' in text, text
        assert 'molink_generation_tokens_total{model="Gemma 3 270m"} 8.0' in text
        assert 'molink_requests_total{endpoint="completions",model="",status="404"} 1.0' in text
        st = http("GET", url + "/v1/stats")[1]
        assert [m["name"] for m in st["models"]] == ["Gemma 3 270m", "tiny"]
        assert st["models"][1]["metrics"]["generation_tokens"] == 16 and st["models"][1]["aliases"] == ["small"]
        assert {p["model"] for p in st["pipelines"]} == {"Gemma 3 270m", "tiny"}
        r = subprocess.run([sys.executable, "-m", "molink_lite.cli", "status", url], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "model Gemma 3 270m" in r.stdout and "model tiny" in r.stdout, r.stdout
        # the dashboard: one section per model, each pipeline under its model (a real browser)
        import shutil

        if shutil.which("chromium"):
            dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                  f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000",
                                  "--dump-dom", url + "/"], capture_output=True, text=True, timeout=90).stdout
            assert 'id="models-box" hidden' not in dom and dom.count('class="model-section"') == 2, dom[-3000:]
            assert 'data-model="tiny" data-state="serving"' in dom and 'data-model="Gemma 3 270m"' in dom
            assert dom.count('<div class="pipeline" data-model="tiny">') == 1
            assert dom.count('<tr class="stage"') == 4 and "also: small" in dom
        # the SDKs pick each model by name
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["Gemma 3 270m", "tiny"]
        for m, (p, _) in prompts.items():
            r = client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            assert r.model == m and r.choices[0].text == want[m]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=1)
        monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        litellm = pytest.importorskip("litellm")
        for m in prompts:
            r = litellm.text_completion(model=f"openai/{m}", api_base=url + "/v1", api_key="unused",
                                        prompt=prompts[m][0], max_tokens=8, temperature=0, ignore_eos=True)
            assert r.choices[0].text == want[m]
        lc = pytest.importorskip("langchain_openai")
        for m in prompts:   # LangChain sends text: the same text as a plain request for that model
            llm = lc.OpenAI(base_url=url + "/v1", api_key="unused", model=m, temperature=0, max_tokens=8,
                            extra_body={"ignore_eos": True})
            assert llm.invoke("The capital of France is") == _complete(url, m, "The capital of France is")[1][
                "choices"][0]["text"]
        # --idle-unload 4: both models go idle, their stages give memory back, the next request loads them again
        end = time.monotonic() + 60
        while time.monotonic() < end and {m["state"] for m in http("GET", url + "/v1/models")[1]["data"]} \
                != {"unloaded"}:
            time.sleep(0.5)
        states = http("GET", url + "/v1/models")[1]["data"]
        assert [m["state"] for m in states] == ["unloaded", "unloaded"], states
        released = _stage_rss(url, "Gemma 3 270m")
        size = Path(gemma3_path).stat().st_size
        print(f"\ndemo model stages' resident memory: loaded {loaded_rss['Gemma 3 270m'] / MiB:.0f} MiB, released "
              f"{released / MiB:.0f} MiB (file {size / MiB:.0f} MiB)")
        assert released < loaded_rss["Gemma 3 270m"] - size // 2
        t0 = time.perf_counter()
        status, body = _complete(url, "Gemma 3 270m", prompts["Gemma 3 270m"][0])
        took = time.perf_counter() - t0
        assert status == 200 and body["choices"][0]["text"] == want["Gemma 3 270m"], body
        print(f"first request after the release (loads the model again): {took:.2f} s")
        states = {m["id"]: m["state"] for m in http("GET", url + "/v1/models")[1]["data"]}
        assert states == {"Gemma 3 270m": "serving", "tiny": "unloaded"}, states
        assert _stage_rss(url, "Gemma 3 270m") > released + size // 2
        idle = next(m for m in http("GET", url + "/v1/stats")[1]["models"] if m["name"] == "Gemma 3 270m")["idle"]
        assert idle["released"] >= 1 and idle["loaded"] >= 1 and idle["history"][-1]["event"] == "loaded"
        out = log.read_text(errors="replace")
        assert "loaded again in" in out and "Traceback" not in out
    finally:
        stop_processes([proc])


# ---------------------------------------------------------------------- join: three hosts, two models
SECRET = new_secret()


def _spawn(args, log: Path, cache: Path):
    return spawn_cli(args, log, {"MOLINK_SECRET": SECRET, "MOLINK_CACHE": str(cache)})


@pytest.mark.slow
def test_joined_hosts_are_shared_and_one_models_failure_spares_the_other(tiny_models, tmp_path):
    """gateway --model A --model B with three joining hosts: A gets two (two replicas), B one; killing a stage of
    A loses no request of A (replayed on A's other replica) and B's requests go on."""
    a = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    b = tiny_models("qwen2", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = _spawn(["gateway", "--model", f"A={a}", "--model", f"B={b}", "--port", str(port), "--codec", "f32",
                 "--ctx", "512", "--max-seqs", "4", "--join-settle", "2", "--heartbeat-timeout", "2",
                 "--prefix-cache", "off"], tmp_path / "gateway.log", tmp_path / "gwcache")
    stages = []
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                http("GET", url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        states = {m["id"]: m["state"] for m in http("GET", url + "/v1/models")[1]["data"]}
        assert states == {"A": "placing", "B": "placing"}, states
        for i in range(3):
            cache = tmp_path / f"cache{i}"
            cache.mkdir()
            stages.append(_spawn(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--max-memory",
                                  "200MiB", "--name", f"h{i}", "--threads", "1", "--flash-attn", "off"],
                                 tmp_path / f"stage{i}.log", cache))
            time.sleep(0.5)
        logs = lambda: "\n".join(p.read_text(errors="replace")[-2500:] for p in sorted(tmp_path.glob("*.log")))  # noqa
        end = time.monotonic() + 180
        while time.monotonic() < end:
            st = http("GET", url + "/v1/stats")[1]
            ups = [(p["model"], p["state"]) for p in st["pipelines"]]
            if sorted(ups) == [("A", "up"), ("A", "up"), ("B", "up")]:
                break
            time.sleep(0.5)
        assert sorted(ups) == [("A", "up"), ("A", "up"), ("B", "up")], (ups, logs())
        assert [m["state"] for m in http("GET", url + "/v1/models")[1]["data"]] == ["serving", "serving"]
        want_a = whole_model_greedy_texts(a, [[1, 5, 9, 200]], 48)[0]
        want_b = whole_model_greedy_texts(b, [[7, 7, 300]], 16)[0]
        # which host serves which pipeline
        hosts = {}
        for m in st["models"]:
            for plan in m["placement"] or []:
                for p in plan["pipelines"]:
                    for s in p["stages"]:
                        hosts[s["host"]["name"]] = (m["name"], p.get("name"))
        assert sorted(v[0] for v in hosts.values()) == ["A", "A", "B"], hosts
        victim = next(int(h[1:]) for h, (m, _) in hosts.items() if m == "A")

        def run_b(n: int) -> tuple:
            t0, ok = time.perf_counter(), 0
            for _ in range(n):
                status, body = _complete(url, "B", [7, 7, 300], 16)
                assert status == 200 and body["choices"][0]["text"] == want_b, body
                ok += 1
            return ok * 16 / (time.perf_counter() - t0)

        def run_a(seconds: float) -> list:   # requests of A back to back for a while
            out, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                out.append(_complete(url, "A", [1, 5, 9, 200], 48))
            return out

        def b_beside_a(kill: bool) -> tuple:   # B's rate while A is busy, with or without A losing a host
            with cf.ThreadPoolExecutor(8) as pool:
                futs = [pool.submit(run_a, 4.0) for _ in range(4)]
                during = pool.submit(run_b, 8)
                if kill:
                    time.sleep(1.5)
                    stages[victim].kill()   # a host of A goes away mid-generation
                results = [r for f in futs for r in f.result(timeout=180)]
                return during.result(timeout=180), results

        before, _ = b_beside_a(kill=False)
        rate, results = b_beside_a(kill=True)
        for status, body in results:   # no request of A lost: each completes, replayed on A's other replica
            assert status == 200 and body["usage"]["completion_tokens"] == 48, body
        print(f"\nB's throughput beside a busy A: {before:.1f} tok/s, {rate:.1f} tok/s while a stage of A died "
              f"({rate / before:.2f}x)")
        assert rate > 0.4 * before   # 2 cores shared by 3 stages, the gateway and 5 clients: noisy
        st = http("GET", url + "/v1/stats")[1]
        mb = next(m for m in st["models"] if m["name"] == "B")
        assert mb["router"]["replayed"] == 0 and mb["state"] == "serving"
        ma = next(m for m in st["models"] if m["name"] == "A")
        assert ma["state"] == "serving" and ma["router"]["replayed"] >= 1, ma   # some were running on the victim
        print(f"A: {len(results)} requests, {ma['router']['replayed']} replayed, none lost")
        status, body = _complete(url, "A", [1, 5, 9, 200], 48)
        assert status == 200 and body["choices"][0]["text"] == want_a, body
    finally:
        stop_processes(stages + [gw])


# ---------------------------------------------------------------------- a stage that released its model
@pytest.mark.slow
def test_a_released_stage_refuses_work_clearly_and_loads_again(tiny_models, tmp_path):
    """release/restore on real stage processes: hello still answers, tokenize and steps get a clear error (no
    crash, the stage lives on), only the pipeline head may release, and after restore a request's tokens equal the
    whole model's."""
    from molink_lite.model.split import LayerRange
    from molink_lite.serving.launcher import start_stages, stop_stages

    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    procs = start_stages(model, [LayerRange(0, 2), LayerRange(2, 4)], workdir=str(tmp_path),
                         extra_args=["--threads", "1", "--flash-attn", "off", "--ctx", "256", "--max-seqs", "2"])
    try:
        import asyncio

        asyncio.run(_release_restore([sp.url for sp in procs], model))
        assert all(sp.proc.poll() is None for sp in procs)
        assert "Traceback" not in "".join(sp.log_tail(200) for sp in procs)
    finally:
        stop_stages(procs)


async def _release_restore(urls, model):
    import asyncio

    from molink_lite.serving.chain import _connect
    from molink_lite.serving.pipeline import Pipeline
    from molink_lite.serving.router import Router
    from molink_lite.serving.sequence import GenRequest
    from molink_lite.wire.channel import RemoteError
    from molink_lite.wire.protocol import SamplingParams

    import numpy as np

    want = whole_model_greedy_texts(model, [[1, 5, 9, 200]], 12)[0]
    p = Pipeline(urls, codec="f32", name="A")
    router = Router([p], recover_timeout=5)
    await p.connect(60)
    try:
        async def run() -> tuple:
            s = router.submit(GenRequest(np.array([1, 5, 9, 200], dtype=np.int32), SamplingParams(temperature=0.0),
                                         12, ignore_eos=True))
            return (await events_to_end(s, 60))[-1], s.text
        ev, text = await run()
        assert ev.kind == "done" and text == want
        before = [st["rss_bytes"] for st in await p.stage_stats()]
        replies = await p.release()
        assert [r["type"] for r in replies] == ["released", "released"]
        assert all(r["rss_bytes"] <= b for r, b in zip(replies, before))
        assert (await p.release())[0]["type"] == "released"   # again: nothing to do
        hello, _ = await p.chain.channels[0].request({"type": "hello"})
        assert hello["layer_start"] == 0 and hello["n_vocab"] == 512 and hello["layer_stop"] == 2
        with pytest.raises(RemoteError, match="released its model"):
            await p.tokenize("hello")
        assert hello["released"] is True and p.released
        # another gateway link (not the pipeline head) may not release or restore
        other = await _connect(urls[1], time.monotonic() + 10, None, (1.0, 3.0))

        async def ignore(meta, arrays) -> None:
            return None
        reader = asyncio.ensure_future(other.serve(ignore))   # replies are read by serve()
        try:
            for kind in ("release", "restore"):
                with pytest.raises(RemoteError, match="only the pipeline head"):
                    await other.request({"type": kind})
        finally:
            await other.close()
            reader.cancel()
        # a request for the released pipeline loads its stages again first, then runs exactly as before
        ev, text = await run()
        assert ev.kind == "done" and text == want, (ev, text)
        assert not p.released and p.stats["failures"] == 0
        assert all(st["rss_bytes"] > r["rss_bytes"] for st, r in zip(await p.stage_stats(), replies))
        assert (await p.restore())[0]["type"] == "restored"   # again: nothing to do
        # an upstream link (what the previous stage holds) may not send them at all
        from molink_lite.wire import auth
        from molink_lite.wire.channel import Channel

        up = Channel(await auth.connect(urls[1], None, "upstream", max_size=1 << 20), name="upstream")
        reader = asyncio.ensure_future(up.serve(ignore))
        try:
            with pytest.raises(RemoteError, match="may not send 'release'"):
                await up.request({"type": "release"})
        finally:
            await up.close()
            reader.cancel()
    finally:
        await p.close()


def test_a_model_the_joined_hosts_cannot_hold_says_why():
    """/v1/models' state for a join-mode model: placing while hosts join, then 'no capacity' with the placement's
    reason once a placement failed (and serving once a pipeline is up)."""
    class _Cluster:
        settle = 3.0
        waiting: list = []
        _problem = ""

        @property
        def capacity_problem(self):
            return self._problem

        def placing_detail(self):
            return "waiting for stages to join"

    c = _Cluster()
    m = ServedModel("big", _Router(), cluster=c)
    assert m.state_detail() == ("placing", "waiting for stages to join")
    c._problem = "the hosts cannot hold big: it needs at least 9.0 GiB, 1 usable host(s) with 6.0 GiB in total"
    state, why = m.state_detail()
    assert state == "no capacity" and "needs at least 9.0 GiB" in why
    assert m.entry()["state"] == "no capacity" and "meta" not in m.entry()
