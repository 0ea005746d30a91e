"""``molink-lite bench``: serve a model, drive concurrent streaming requests, compare with llama.cpp.

Systems (each started by this module, on this machine, one after the other):

* ``molink`` -- stage processes + gateway; with ``--delay-ms``/``--rate-mbit`` a ``molink-lite link``
  relay sits in front of every stage after the first (gateway and previous stage reach it through the
  relay, as they would reach another host);
* ``whole``  -- llama.cpp's ``llama-server`` with the whole model (continuous batching, one slot per
  concurrent request);
* ``rpc``    -- llama.cpp's RPC backend: ``llama-server --rpc`` with the layers of stages 2.. on a
  ``ggml-rpc-server`` behind the same relay.

The llama.cpp binaries come from ``kernels/build_tools.py`` (built once from the vendored source of
the pinned llama-cpp-python, so all systems run the same kernels) or ``--llama-bin DIR``.
Figures: output tokens/s, time to first token and inter-token latency (p50/p99), peak resident
memory per process (Linux), printed as a table with ratios, and saved as JSON and an SVG chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import aiohttp

from ..serving.launcher import StageProcess, start_stages, stop_stages
from ..wire.auth import SECRET_ENV, new_secret
from ..model.split import LayerRange, plan_ranges, read_model_info

WORDS = ("river stone light garden music paper window silver morning forest letter bridge harbor "
         "candle meadow engine pocket thunder velvet lantern").split()


# ------------------------------------------------------------------ configuration and results
@dataclass
class BenchConfig:
    model: str
    stages: int = 2
    split: str = "balanced"           # layer split policy (split.plan_ranges)
    concurrency: Sequence[int] = (1, 16)
    prompt_len: int = 32
    max_tokens: int = 64
    requests: int = 0                 # per level; 0 = 2 x concurrency (at least 4)
    delay_ms: float = 0.0
    rate_mbit: float = 0.0
    threads: Optional[int] = None     # per stage process; default: cores / stages
    micro_batches: Optional[int] = None
    prefill_chunk: Optional[int] = None
    codec: str = "f16"
    baselines: Sequence[str] = ()
    long_prompt: int = 0              # 0 = skip the long-prompt interference run
    llama_bin: Optional[str] = None
    ctx: int = 8192
    workdir: Optional[str] = None
    speculative: Optional[str] = None  # off|ngram|auto: also run molink-lite with it, next to speculation off
    spec_k: int = 8
    spec_n: int = 3
    prompts: str = "default"          # default (generated words), grounded (tests/bench), or a JSON file


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    errors: int
    spec: Optional[dict] = None  # speculative decoding during this level: acceptance, tokens per round trip


@dataclass
class SystemResult:
    system: str
    levels: List[LevelResult] = field(default_factory=list)
    peak_rss_mb: Dict[str, float] = field(default_factory=dict)
    interference: Optional[dict] = None
    notes: str = ""


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (Linux /proc VmHWM; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


GROUNDED = Path(__file__).resolve().parents[2] / "tests" / "bench" / "grounded_prompts.json"


def load_prompts(which: str) -> Optional[List[str]]:
    """A fixed prompt set: ``grounded`` (input-grounded: repeat/edit a passage, code edits, extraction) or a
    JSON file holding a list of strings; None for ``default`` (generated word prompts)."""
    if which == "default":
        return None
    path = GROUNDED if which == "grounded" else Path(which)
    data = json.loads(path.read_text())
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in data]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: expected a JSON list of prompt strings (or objects with 'prompt')")
    return prompts


def make_prompt(i: int, n_words: int) -> str:
    """A distinct prompt of about ``n_words`` tokens (no shared prefix beyond the first word)."""
    words = [WORDS[(i * 7 + k * 3 + k * k) % len(WORDS)] for k in range(n_words - 1)]
    return f"{i}: " + " ".join(words)


# ------------------------------------------------------------------ load generation
def _session(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    # one connection per request: llama-server may close idle keep-alive connections under the client
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True, limit=0))

async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: time to first token, inter-token gaps, tokens (or an error)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage_tokens = None
    t0 = time.perf_counter()
    stamps: List[float] = []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = event.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    return {"error": str(msg["error"])}
                if msg.get("usage"):
                    usage_tokens = msg["usage"].get("completion_tokens")
                ch = msg.get("choices") or []
                if ch and (ch[0].get("text") or "") != "":
                    stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no tokens"}
    # tokens: the server's usage count; else one per streamed text event (a token whose text is held back,
    # e.g. half of a UTF-8 character, then goes uncounted)
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "n": usage_tokens or len(stamps), "end": stamps[-1]}


async def run_level(url: str, concurrency: int, n_requests: int, prompt_len: int, max_tokens: int,
                    offset: int = 0, prompts: Optional[List[str]] = None) -> LevelResult:
    """``n_requests`` streaming completions, at most ``concurrency`` at a time (``prompts``: a fixed set, in turn)."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with _session(timeout) as session:
        async def job(i: int) -> dict:
            async with sem:
                text = prompts[i % len(prompts)] if prompts else make_prompt(offset + i, prompt_len)
                return await _one(session, url, text, max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(job(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    errs = [r["error"] for r in res if "error" in r]
    if errs:
        print(f"  {len(errs)} request(s) failed, first: {errs[0]}", file=sys.stderr, flush=True)
    n_out = sum(r["n"] for r in ok)
    ttft = [1e3 * r["ttft"] for r in ok]
    itl = [1e3 * x for r in ok for x in r["itl"]]
    return LevelResult(concurrency, n_requests, n_out, wall, n_out / wall if wall else 0.0, _pct(ttft, 50),
                       _pct(ttft, 99), _pct(itl, 50), _pct(itl, 99), len(res) - len(ok))


async def run_interference(url: str, long_prompt: int, n_decoders: int = 8,
                           max_tokens: int = 96) -> dict:
    """Inter-token p99 of ``n_decoders`` decoding requests, alone and with one long prompt arriving."""
    async def decoders(with_long: bool) -> dict:
        timeout = aiohttp.ClientTimeout(total=3600)
        async with _session(timeout) as session:
            tasks = [asyncio.ensure_future(_one(session, url, make_prompt(1000 + i, 16), max_tokens))
                     for i in range(n_decoders)]
            long_res = None
            if with_long:
                await asyncio.sleep(1.0)
                long_res = await _one(session, url, make_prompt(5000, long_prompt), 4)
            res = await asyncio.gather(*tasks)
        ok = [r for r in res if "error" not in r]
        itl = [1e3 * x for r in ok for x in r["itl"]]
        out = {"itl_p50_ms": _pct(itl, 50), "itl_p99_ms": _pct(itl, 99), "itl_max_ms": max(itl) if itl else None,
               "errors": len(res) - len(ok)}
        if long_res is not None:
            out["long_ttft_ms"] = 1e3 * long_res["ttft"] if "ttft" in long_res else None
        return out

    alone = await decoders(False)
    loaded = await decoders(True)
    return {"long_prompt_words": long_prompt, "decoders": n_decoders, "alone": alone, "with_long_prompt": loaded,
            "p99_ratio": loaded["itl_p99_ms"] / alone["itl_p99_ms"] if alone["itl_p99_ms"] else None}


# ------------------------------------------------------------------ processes
class Procs:
    """Child processes of one system, stopped together."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.items: List[tuple] = []   # (name, Popen)
        self.stages: List[StageProcess] = []

    def spawn(self, name: str, cmd: List[str], env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        log.close()
        self.items.append((name, p))
        return p

    def peak_rss(self) -> Dict[str, float]:
        out = {f"stage{i}": _peak_rss_mb(sp.proc.pid) for i, sp in enumerate(self.stages)}
        out.update({n: _peak_rss_mb(p.pid) for n, p in self.items})
        return out

    def log_tail(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        for _, p in self.items:
            if p.poll() is None:
                p.terminate()
        for _, p in self.items:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        stop_stages(self.stages)


def _wait_tcp(port: int, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not healthy within {timeout:.0f} s")


def _relay(procs: Procs, name: str, target_port: int, cfg: BenchConfig) -> int:
    port = _free_port()
    cmd = [sys.executable, "-m", "molink_lite.cli", "link", "--listen", f"127.0.0.1:{port}",
           "--to", f"127.0.0.1:{target_port}", "--delay-ms", str(cfg.delay_ms), "--rate-mbit", str(cfg.rate_mbit)]
    p = procs.spawn(name, cmd)
    _wait_tcp(port, p, name, 60)
    return port


def _threads(cfg: BenchConfig, n_procs: int) -> int:
    return cfg.threads or max(1, (os.cpu_count() or 2) // n_procs)


def _linked(cfg: BenchConfig) -> bool:
    return cfg.delay_ms > 0 or cfg.rate_mbit > 0


def start_molink(cfg: BenchConfig, procs: Procs, ranges: List[LayerRange], secure: bool = False,
                 speculative: Optional[str] = None, sealed: bool = False) -> str:
    """Stages + gateway; ``sealed``: every link authenticated with a cluster secret, every message sealed
    (AES-256-GCM); ``secure``: that and TLS on every link too."""
    t = _threads(cfg, len(ranges))
    max_seqs = max(list(cfg.concurrency) + [16])
    extra = ["--threads", str(t), "--ctx", str(cfg.ctx), "--max-seqs", str(min(256, max_seqs))]
    secret = new_secret() if secure or sealed else None
    procs.stages = start_stages(cfg.model, ranges, extra_args=extra + (["--tls", "auto"] if secure else []),
                                workdir=str(procs.workdir), secret=secret)
    scheme = "wss" if secure else "ws"
    urls = [f"{scheme}://127.0.0.1:{procs.stages[0].port}"]
    for i, sp in enumerate(procs.stages[1:], 1):
        port = _relay(procs, f"link{i}", sp.port, cfg) if _linked(cfg) else sp.port
        urls.append(f"{scheme}://127.0.0.1:{port}")
    port = _free_port()
    cmd = [sys.executable, "-m", "molink_lite.cli", "gateway", "--port", str(port), "--pipeline", ",".join(urls),
           "--codec", cfg.codec]
    if cfg.micro_batches:
        cmd += ["--micro-batches", str(cfg.micro_batches)]
    if cfg.prefill_chunk:
        cmd += ["--prefill-chunk", str(cfg.prefill_chunk)]
    if speculative:
        cmd += ["--speculative", speculative, "--spec-k", str(cfg.spec_k), "--spec-n", str(cfg.spec_n)]
    gw = procs.spawn("gateway", cmd, env={SECRET_ENV: secret} if secret else None)
    _wait_http(f"http://127.0.0.1:{port}", gw, "gateway")
    return f"http://127.0.0.1:{port}"


def llama_tools(cfg: BenchConfig) -> Path:
    """Folder holding llama-server and ggml-rpc-server (built once by kernels/build_tools.py)."""
    if cfg.llama_bin:
        return Path(cfg.llama_bin)
    env = os.environ.get("MOLINK_LLAMA_BIN")
    if env:
        return Path(env)
    script = Path(__file__).resolve().parents[1] / "kernels" / "build_tools.py"
    if not script.is_file():
        raise RuntimeError("baselines need llama-server: pass --llama-bin DIR (llama-server, ggml-rpc-server)")
    print("building llama.cpp's llama-server and ggml-rpc-server (once; several minutes)...", flush=True)
    p = subprocess.run([sys.executable, str(script)], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("LLAMA_TOOLS_DIR=")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"building llama.cpp tools failed:\n{p.stdout[-3000:]}")
    return Path(lines[-1].split("=", 1)[1])


def start_llama_server(cfg: BenchConfig, procs: Procs, ranges: List[LayerRange], rpc: bool) -> str:
    bindir = llama_tools(cfg)
    server = shutil.which("llama-server", path=str(bindir))
    if not server:
        raise RuntimeError(f"no llama-server in {bindir}")
    n_par = max(list(cfg.concurrency) + ([9] if cfg.long_prompt else []))
    port = _free_port()
    # one KV cache of --ctx tokens shared by all slots, as molink-lite's stages have
    cmd = [server, "-m", cfg.model, "--host", "127.0.0.1", "--port", str(port), "-np", str(n_par),
           "-c", str(cfg.ctx), "--kv-unified", "--no-warmup", "--cache-ram", "0"]
    if rpc:
        rpc_bin = shutil.which("ggml-rpc-server", path=str(bindir))
        if not rpc_bin:
            raise RuntimeError(f"no ggml-rpc-server in {bindir}")
        rport = _free_port()
        rp = procs.spawn("rpc-server", [rpc_bin, "-H", "127.0.0.1", "-p", str(rport), "-t",
                                        str(_threads(cfg, len(ranges)))])
        _wait_tcp(rport, rp, "ggml-rpc-server", 60)
        target = _relay(procs, "link1", rport, cfg) if _linked(cfg) else rport
        remote_layers = sum(r.n for r in ranges[1:])
        cmd += ["--rpc", f"127.0.0.1:{target}", "-ngl", str(remote_layers), "-t", str(_threads(cfg, len(ranges)))]
    else:
        cmd += ["-ngl", "0", "-t", str(_threads(cfg, 1))]
    p = procs.spawn("llama-server", cmd)
    _wait_http(f"http://127.0.0.1:{port}", p, "llama-server")
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------ driver
def bench_system(system: str, cfg: BenchConfig, ranges: List[LayerRange], workdir: Path) -> SystemResult:
    procs = Procs(workdir / system)
    procs.workdir.mkdir(parents=True, exist_ok=True)
    res = SystemResult(system)
    try:
        if system in ("molink", "sealed", "secure", "spec"):
            # with --speculative, "molink" is the same system with speculation off (same invocation)
            mode = cfg.speculative if system == "spec" else ("off" if cfg.speculative else None)
            url = start_molink(cfg, procs, ranges, secure=system == "secure", speculative=mode,
                               sealed=system == "sealed")
        elif system in ("whole", "rpc"):
            url = start_llama_server(cfg, procs, ranges, rpc=system == "rpc")
        else:
            raise ValueError(f"unknown system {system!r} (molink, sealed, secure, whole, rpc)")
        asyncio.run(run_level(url, 1, 1, 8, 4))  # warm-up
        prompts = load_prompts(cfg.prompts)
        molink = system in ("molink", "sealed", "secure", "spec")
        for i, c in enumerate(cfg.concurrency):
            n = cfg.requests or max(4, 2 * c)
            before = _spec_counters(url) if molink else None
            lv = asyncio.run(run_level(url, c, n, cfg.prompt_len, cfg.max_tokens, offset=100 * i, prompts=prompts))
            if before is not None:
                lv.spec = _spec_delta(before, _spec_counters(url))
            res.levels.append(lv)
            sp = ""
            if lv.spec and lv.spec["drafted"]:
                sp = (f"  acceptance {lv.spec['acceptance']:.2f}, {lv.spec['tokens_per_round_trip']:.2f} tokens "
                      f"per round trip")
            print(f"  {system:>6} c={c:<4} {lv.tok_s:8.1f} tok/s  TTFT p50 {lv.ttft_p50_ms:7.0f} ms  "
                  f"ITL p50 {lv.itl_p50_ms:6.1f} p99 {lv.itl_p99_ms:7.1f} ms  errors {lv.errors}{sp}", flush=True)
        if cfg.long_prompt:
            res.interference = asyncio.run(run_interference(url, cfg.long_prompt))
            it = res.interference
            print(f"  {system:>6} long prompt ({cfg.long_prompt} words) during 8 decodes: ITL p99 "
                  f"{it['alone']['itl_p99_ms']:.1f} -> {it['with_long_prompt']['itl_p99_ms']:.1f} ms "
                  f"({it['p99_ratio']:.2f}x)", flush=True)
        res.peak_rss_mb = procs.peak_rss()
    except Exception as e:  # noqa: BLE001 - report and go on with the other systems
        res.notes = f"failed: {e}"
        print(f"  {system}: {res.notes}", file=sys.stderr, flush=True)
        for name, _ in procs.items:
            tail = procs.log_tail(name)
            if tail:
                print(f"--- {name} log tail ---\n{tail}", file=sys.stderr)
    finally:
        procs.stop()
    return res


SPEC_COUNTERS = ("drafted", "accepted", "decode_entries", "decode_tokens", "steps")


def _spec_counters(url: str) -> Dict[str, float]:
    """The gateway's speculation counters (summed over pipelines), from /v1/stats."""
    import urllib.request

    with urllib.request.urlopen(url + "/v1/stats", timeout=30) as r:
        body = json.loads(r.read())
    out: Dict[str, object] = {k: 0.0 for k in SPEC_COUNTERS}
    for p in body.get("pipelines", []):
        for k in SPEC_COUNTERS:
            out[k] += float(p.get("scheduler", {}).get(k, 0))
        out["step_cost_ms"] = (p.get("speculative") or {}).get("step_cost_ms")
    return out


def _spec_delta(a: Dict[str, float], b: Dict[str, float]) -> dict:
    d = {k: int(b[k] - a[k]) for k in SPEC_COUNTERS}
    d["step_cost_ms"] = b.get("step_cost_ms")  # the gateway's fitted round trip a + b x rows at the level's end
    d["acceptance"] = round(d["accepted"] / d["drafted"], 4) if d["drafted"] else None
    d["tokens_per_round_trip"] = round(d["decode_tokens"] / d["decode_entries"], 4) if d["decode_entries"] else None
    return d


def format_table(results: List[SystemResult]) -> str:
    """Side-by-side table with ratios of molink-lite to each baseline."""
    lines = [f"{'system':>8} {'conc':>5} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
             f"{'ITL p99':>8} {'err':>4}"]
    for r in results:
        for lv in r.levels:
            lines.append(f"{r.system:>8} {lv.concurrency:>5} {lv.tok_s:>9.1f} {lv.ttft_p50_ms:>8.0f}ms "
                         f"{lv.ttft_p99_ms:>7.0f}ms {lv.itl_p50_ms:>6.1f}ms {lv.itl_p99_ms:>6.1f}ms {lv.errors:>4}")
        if r.notes:
            lines.append(f"{r.system:>8} {r.notes}")
    mol = next((r for r in results if r.system == "molink"), None)
    spec = next((r for r in results if r.system == "spec"), None)
    if mol and spec:
        by_c = {lv.concurrency: lv for lv in mol.levels}
        for lv in spec.levels:
            off = by_c.get(lv.concurrency)
            if off is None or not off.tok_s:
                continue
            extra = ""
            if lv.spec and lv.spec.get("acceptance") is not None:
                extra = (f"; acceptance {lv.spec['acceptance']:.2f}, {lv.spec['tokens_per_round_trip']:.2f} tokens "
                         f"per round trip ({lv.spec['accepted']}/{lv.spec['drafted']} drafts)")
            elif lv.spec:
                extra = "; no drafts sent"
            lines.append(f"speculation on / off, c={lv.concurrency}: {lv.tok_s / off.tok_s:.2f}x{extra}")
    if mol:
        for base in (r for r in results if r.system not in ("molink", "spec") and r.levels):
            by_c = {lv.concurrency: lv for lv in base.levels}
            ratios = [f"c={lv.concurrency}: {lv.tok_s / by_c[lv.concurrency].tok_s:.2f}x"
                      for lv in mol.levels if lv.concurrency in by_c and by_c[lv.concurrency].tok_s]
            lines.append(f"molink-lite / {base.system} throughput: {', '.join(ratios)}")
    for r in results:
        if r.peak_rss_mb:
            lines.append(f"peak RSS {r.system}: " + ", ".join(f"{k} {v:.0f} MB" for k, v in r.peak_rss_mb.items()))
    return "\n".join(lines)


def svg_chart(results: List[SystemResult], title: str) -> str:
    """Throughput vs concurrency, one line per system (plain SVG, no plotting library)."""
    W, H, L, B = 640, 400, 70, 50
    pts = [(lv.concurrency, lv.tok_s) for r in results for lv in r.levels]
    if not pts:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    xs = sorted({c for c, _ in pts})
    ymax = max(t for _, t in pts) * 1.1 or 1.0

    def px(c: int) -> float:
        return L + (W - L - 20) * (xs.index(c) / max(1, len(xs) - 1))

    def py(t: float) -> float:
        return H - B - (H - B - 30) * t / ymax

    colors = {"molink": "#d62728", "whole": "#1f77b4", "rpc": "#7f7f7f"}
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' "
           f"font-size='12'>", f"<rect width='{W}' height='{H}' fill='white'/>",
           f"<text x='{W / 2}' y='18' text-anchor='middle' font-size='14'>{title}</text>",
           f"<line x1='{L}' y1='{H - B}' x2='{W - 20}' y2='{H - B}' stroke='black'/>",
           f"<line x1='{L}' y1='30' x2='{L}' y2='{H - B}' stroke='black'/>",
           f"<text x='{W / 2}' y='{H - 10}' text-anchor='middle'>concurrent requests</text>",
           f"<text x='15' y='{H / 2}' transform='rotate(-90 15 {H / 2})' text-anchor='middle'>output tokens/s</text>"]
    for c in xs:
        out.append(f"<text x='{px(c)}' y='{H - B + 16}' text-anchor='middle'>{c}</text>")
    for k in range(5):
        t = ymax * k / 4
        out.append(f"<text x='{L - 6}' y='{py(t) + 4}' text-anchor='end'>{t:.0f}</text>")
    for i, r in enumerate(x for x in results if x.levels):
        col = colors.get(r.system, "#2ca02c")
        line = " ".join(f"{px(lv.concurrency)},{py(lv.tok_s)}" for lv in r.levels)
        out.append(f"<polyline points='{line}' fill='none' stroke='{col}' stroke-width='2'/>")
        for lv in r.levels:
            out.append(f"<circle cx='{px(lv.concurrency)}' cy='{py(lv.tok_s)}' r='3' fill='{col}'/>")
        out.append(f"<text x='{L + 10}' y='{40 + 16 * i}' fill='{col}'>{r.system}</text>")
    out.append("</svg>")
    return "\n".join(out)


def run_bench(cfg: BenchConfig, json_out: Optional[str] = None, chart_out: Optional[str] = None) -> List[SystemResult]:
    """Run molink-lite and the baselines one after the other; print, save JSON and chart."""
    info = read_model_info(cfg.model)
    ranges = plan_ranges(cfg.model, cfg.stages, cfg.split)
    link = (f"relay {cfg.delay_ms:g} ms one-way, {cfg.rate_mbit:g} Mbit/s between stages" if _linked(cfg)
            else "loopback, no relay")
    print(f"bench: {info.name}, {cfg.stages} stages ({', '.join(map(str, ranges))}), {link}; "
          f"{'prompt ~%d tokens' % cfg.prompt_len if cfg.prompts == 'default' else 'prompt set ' + cfg.prompts}, "
          f"{cfg.max_tokens} output tokens, concurrency {list(cfg.concurrency)}, "
          f"{os.cpu_count()} CPU cores", flush=True)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="molink-bench-"))
    systems = ("molink", *(("spec",) if cfg.speculative else ()), *cfg.baselines)
    if cfg.speculative:
        print(f"speculative decoding: {cfg.speculative} (k<={cfg.spec_k}, n<={cfg.spec_n}) vs off; prompts: "
              f"{cfg.prompts}", flush=True)
    results = [bench_system(s, cfg, ranges, workdir) for s in systems]
    print()
    print(format_table(results))
    if json_out:
        Path(json_out).write_text(json.dumps({"config": asdict(cfg), "model": info.name,
                                              "results": [asdict(r) for r in results]}, indent=2))
        print(f"JSON: {json_out}")
    if chart_out:
        Path(chart_out).write_text(svg_chart(results, f"{info.name}: {cfg.stages} stages, {link}"))
        print(f"chart: {chart_out}")
    return results
