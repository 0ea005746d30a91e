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

``--workload chat-turns`` (:func:`run_chat_bench`) measures the prefix cache instead: multi-turn conversations,
each turn resending the conversation so far plus a new user message, on molink-lite with the gateway's
``--prefix-cache on`` and ``off`` in the same invocation; time to first token per turn side by side, and turn
N / turn 1 for each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Dict, List, Optional, Sequence

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
    gateway_delay_ms: float = 0.0     # > 0: the gateway reaches the first stage through a relay (its own host)
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
    workload: str = "concurrency"     # concurrency (levels of independent prompts) | chat-turns (prefix cache)
    turns: int = 5                    # chat-turns: turns per conversation
    turn_len: int = 400               # chat-turns: ~tokens of each new user message
    reply_tokens: int = 16            # chat-turns: max_tokens of each reply (temperature 0, stops at EOS)
    conversations: int = 3            # chat-turns: conversations per system (TTFT per turn: their median)
    prefix_cache_cells: Optional[int] = None  # chat-turns: --prefix-cache-cells of the cache-on gateway


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

async def _sse(r: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON messages of a server-sent event stream, until ``[DONE]``."""
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
                return
            yield json.loads(data)


class StreamError(RuntimeError):
    """A streamed request that failed: its HTTP status, or an error the server sent in the stream."""


async def _stream(session: aiohttp.ClientSession, url: str, body: dict) -> AsyncIterator[dict]:
    """POST ``body`` (a streaming request) to ``url`` and yield its messages; :class:`StreamError` for a status
    other than 200 or an ``error`` message."""
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise StreamError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for msg in _sse(r):
            if "error" in msg:
                raise StreamError(str(msg["error"]))
            yield msg


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: time to first token, inter-token gaps, tokens (or an error)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage_tokens = None
    t0 = time.perf_counter()
    stamps: List[float] = []
    try:
        async for msg in _stream(session, url + "/v1/completions", body):
            if msg.get("usage"):
                usage_tokens = msg["usage"].get("completion_tokens")
            ch = msg.get("choices") or []
            if ch and (ch[0].get("text") or "") != "":
                stamps.append(time.perf_counter())
    except StreamError as e:
        return {"error": str(e)}
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


def _relay(procs: Procs, name: str, target_port: int, cfg: BenchConfig, delay_ms: Optional[float] = None) -> int:
    port = _free_port()
    cmd = [sys.executable, "-m", "molink_lite.cli", "link", "--listen", f"127.0.0.1:{port}",
           "--to", f"127.0.0.1:{target_port}", "--delay-ms", str(cfg.delay_ms if delay_ms is None else delay_ms),
           "--rate-mbit", str(cfg.rate_mbit)]
    p = procs.spawn(name, cmd)
    _wait_tcp(port, p, name, 60)
    return port


def _threads(cfg: BenchConfig, n_procs: int) -> int:
    return cfg.threads or max(1, (os.cpu_count() or 2) // n_procs)


def _linked(cfg: BenchConfig) -> bool:
    return cfg.delay_ms > 0 or cfg.rate_mbit > 0


def start_molink(cfg: BenchConfig, procs: Procs, ranges: List[LayerRange], secure: bool = False,
                 speculative: Optional[str] = None, sealed: bool = False, prefix_cache: Optional[str] = None,
                 ring: Optional[str] = None) -> str:
    """Stages + gateway; ``sealed``: every link authenticated with a cluster secret, every message sealed
    (AES-256-GCM); ``secure``: that and TLS on every link too; ``prefix_cache``: the gateway's
    ``--prefix-cache on|off`` (None: its default), with ``cfg.prefix_cache_cells`` when on; ``ring``: its
    ``--ring`` (None: its default). With a relay, the last stage reaches the first through one too (the ring)."""
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
    if cfg.gateway_delay_ms > 0:   # the gateway on a host of its own: its link to the first stage is slow too
        urls[0] = f"{scheme}://127.0.0.1:{_relay(procs, 'gateway-link', procs.stages[0].port, cfg, cfg.gateway_delay_ms)}"
    port = _free_port()
    cmd = [sys.executable, "-m", "molink_lite.cli", "gateway", "--port", str(port), "--pipeline", ",".join(urls),
           "--codec", cfg.codec]
    if cfg.micro_batches:
        cmd += ["--micro-batches", str(cfg.micro_batches)]
    if cfg.prefill_chunk:
        cmd += ["--prefill-chunk", str(cfg.prefill_chunk)]
    if speculative:
        cmd += ["--speculative", speculative, "--spec-k", str(cfg.spec_k), "--spec-n", str(cfg.spec_n)]
    if ring:
        cmd += ["--ring", ring]
    if _linked(cfg) and len(urls) > 1 and ring != "off":   # the ring's link crosses the emulated network too
        cmd += ["--ring-via", f"{urls[0]}={scheme}://127.0.0.1:{_relay(procs, 'ring', procs.stages[0].port, cfg)}"]
    cmd += prefix_cache_args(prefix_cache, cfg.prefix_cache_cells)
    gw = procs.spawn("gateway", cmd, env={SECRET_ENV: secret} if secret else None)
    _wait_http(f"http://127.0.0.1:{port}", gw, "gateway")
    return f"http://127.0.0.1:{port}"


def prefix_cache_args(mode: Optional[str], cells: Optional[int] = None) -> List[str]:
    """The gateway's prefix-cache options: none for None (its default), else ``--prefix-cache on|off`` and, when
    on with a budget, ``--prefix-cache-cells N``."""
    if mode is None:
        return []
    if mode not in ("on", "off"):
        raise ValueError(f"prefix cache mode {mode!r}: expected 'on' or 'off'")
    out = ["--prefix-cache", mode]
    if mode == "on" and cells is not None:
        out += ["--prefix-cache-cells", str(cells)]
    return out


def llama_tools(cfg: BenchConfig) -> Path:
    """Folder holding llama-server and ggml-rpc-server (built once by kernels/build_tools.py)."""
    if cfg.llama_bin:
        return Path(cfg.llama_bin)
    env = os.environ.get("MOLINK_LLAMA_BIN")
    if env:
        return Path(env)
    # molink_lite.kernels is the top-level kernels/ folder (package-dir): ask the import system where it is, since
    # an editable install maps it there and the package's own folder has no kernels/ beside it
    try:
        spec = importlib.util.find_spec("molink_lite.kernels.build_tools")
    except ImportError:
        spec = None
    script = Path(spec.origin) if spec and spec.origin else None
    if script is None or not script.is_file():
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
        if system in ("molink", "sealed", "secure", "spec", "ring-on", "ring-off"):
            # with --speculative, "molink" is the same system with speculation off (same invocation)
            mode = cfg.speculative if system == "spec" else ("off" if cfg.speculative else None)
            url = start_molink(cfg, procs, ranges, secure=system == "secure", speculative=mode,
                               sealed=system == "sealed", ring=system[5:] if system.startswith("ring-") else None)
        elif system in ("whole", "rpc"):
            url = start_llama_server(cfg, procs, ranges, rpc=system == "rpc")
        else:
            raise ValueError(f"unknown system {system!r} (molink, sealed, secure, whole, rpc)")
        asyncio.run(run_level(url, 1, 1, 8, 4))  # warm-up
        prompts = load_prompts(cfg.prompts)
        molink = system in ("molink", "sealed", "secure", "spec", "ring-on", "ring-off")
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
    by_sys = {r.system: r for r in results if r.levels}
    if "ring-on" in by_sys and "ring-off" in by_sys:   # closing the ring, measured alone
        off_c = {lv.concurrency: lv for lv in by_sys["ring-off"].levels}
        ratios = [f"c={lv.concurrency}: {lv.tok_s / off_c[lv.concurrency].tok_s:.2f}x"
                  for lv in by_sys["ring-on"].levels if lv.concurrency in off_c and off_c[lv.concurrency].tok_s]
        lines.append(f"ring on / off throughput: {', '.join(ratios)}")
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
            else "loopback, no relay") + (f"; the gateway {cfg.gateway_delay_ms:g} ms from the first stage"
                                          if cfg.gateway_delay_ms > 0 else "")
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


# ------------------------------------------------------------------ chat-turns workload (prefix cache)
# A multi-turn chat: every turn sends the whole conversation so far (earlier user messages and the replies the
# server actually returned) plus a new user message of ~cfg.turn_len tokens, so turn k+1's prompt starts with
# turn k's prompt and reply. With the prefix cache on, the gateway reuses the stages' KV of that shared prefix
# and prefills only what is new; off, every turn prefills the whole conversation. Both systems run at once
# (idle while the other is measured), conversations alternate between them (on/off, off/on, ...) so drift of a
# shared machine's load falls on both; time to first token per turn is the median over the conversations.

CHAT_WORDS = ("the river carried a silver lantern past the quiet harbor while morning light crossed every "
              "bridge and window of the old town where letters waited in velvet pockets for a candle to "
              "burn beside the meadow garden music of thunder over paper forests and engines humming near "
              "stone walls that remembered each traveler who walked home").split()

CHAT_PREFIX = "User: "
CHAT_SUFFIX = "\nAssistant:"


def has_chat_template(model: str) -> bool:
    """Whether the GGUF carries a chat template (``tokenizer.chat_template``): then the workload talks
    /v1/chat/completions; else (a base model) /v1/completions with the conversation as plain text."""
    from ..model.gguf_meta import GGUFFile

    return any(k == "tokenizer.chat_template" or k.startswith("tokenizer.chat_template.")
               for k in GGUFFile(model).fields)


def chat_user_message(conv: int, turn: int, n_tokens: int) -> str:
    """A deterministic user message of about ``n_tokens`` tokens (counting a word or a full stop as one, the
    heading as eight: exact for the demo model's tokenizer, close for others), distinct per conversation and turn
    from its first words on (so conversations share no prefix beyond the role marker)."""
    rng = random.Random(f"chat-turns {conv} {turn}")   # seeded from a string: the same text on every platform
    words: List[str] = []
    budget = n_tokens - 8
    while budget > 0:
        for _ in range(rng.randint(6, 14)):       # a sentence: a few words, then a full stop
            last = budget <= 2
            w = rng.choice(CHAT_WORDS)
            words.append(w + "." if last else w)
            budget -= 2 if last else 1
            if last:
                break
        else:
            words[-1] += "."
            budget -= 1
    return " ".join([f"Conversation {conv}, part {turn}:"] + words)


def completion_turn_prompt(prev_prompt: str, prev_reply: str, user_message: str) -> str:
    """Turn k+1's /v1/completions prompt: exactly turn k's prompt, then its reply as returned, then the new
    user message (for the first turn, ``prev_prompt`` and ``prev_reply`` are empty)."""
    if not prev_prompt:
        return f"{CHAT_PREFIX}{user_message}{CHAT_SUFFIX}"
    return f"{prev_prompt}{prev_reply}\n{CHAT_PREFIX}{user_message}{CHAT_SUFFIX}"


def chat_turn_messages(prev_messages: List[dict], prev_reply: Optional[str], user_message: str) -> List[dict]:
    """Turn k+1's /v1/chat/completions messages: turn k's, its reply as returned, the new user message."""
    out = [dict(m) for m in prev_messages]
    if prev_reply is not None:
        out.append({"role": "assistant", "content": prev_reply})
    out.append({"role": "user", "content": user_message})
    return out


async def _stream_turn(session: aiohttp.ClientSession, url: str, body: dict, chat: bool) -> dict:
    """One streamed turn: time to first token, the reply text as returned, usage (prompt tokens, cached)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first: Optional[float] = None
    parts: List[str] = []
    usage: dict = {}
    finish = None
    try:
        async for msg in _stream(session, url + ("/v1/chat/completions" if chat else "/v1/completions"), body):
            if msg.get("usage"):
                usage = msg["usage"]
            for ch in msg.get("choices") or []:
                text = ((ch.get("delta") or {}).get("content") or "") if chat else (ch.get("text") or "")
                if text:
                    parts.append(text)
                # the first token: its text, or the end (a reply that is EOS at once has no text)
                if first is None and (text or ch.get("finish_reason")):
                    first = time.perf_counter()
                finish = ch.get("finish_reason") or finish
    except StreamError as e:
        return {"error": str(e)}
    if first is None:
        return {"error": "no tokens"}
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_ms": 1e3 * (first - t0), "reply": "".join(parts), "finish_reason": finish,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": details.get("cached_tokens")}


async def run_conversation(url: str, conv: int, cfg: BenchConfig, chat: bool) -> List[dict]:
    """One conversation of ``cfg.turns`` turns, each sending everything so far plus a new user message; a
    failed turn ends it (the next turn needs its reply)."""
    out: List[dict] = []
    prompt, reply, messages = "", "", []  # type: ignore[var-annotated]
    timeout = aiohttp.ClientTimeout(total=3600)
    async with _session(timeout) as session:
        for turn in range(1, cfg.turns + 1):
            user = chat_user_message(conv, turn, cfg.turn_len)
            body: dict = {"max_tokens": cfg.reply_tokens, "temperature": 0}
            if chat:
                messages = chat_turn_messages(messages, reply if turn > 1 else None, user)
                body["messages"] = messages
            else:
                prompt = completion_turn_prompt(prompt, reply, user)
                body["prompt"] = prompt
            before = _reused_tokens(url)
            res = await _stream_turn(session, url, body, chat)
            res["turn"] = turn
            after = _reused_tokens(url) if "error" not in res else None
            res["reused_tokens"] = after - before if before is not None and after is not None else None
            out.append(res)
            if "error" in res:
                break
            reply = res["reply"]
    return out


def _reused_tokens(url: str) -> Optional[int]:
    """Prompt tokens the gateway has so far taken from the prefix cache instead of prefilling, summed over its
    pipelines (/v1/stats); None when it does not say."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/v1/stats", timeout=30) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    total, seen = 0, False
    for p in body.get("pipelines", []):
        v = (p.get("scheduler") or {}).get("prefix_tokens_reused")
        if v is None:
            v = (p.get("prefix_cache") or {}).get("tokens_reused")
        if isinstance(v, (int, float)):
            total, seen = total + int(v), True
    return total if seen else None


def _median(values: Sequence[float]) -> Optional[float]:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def summarize_chat(runs: Dict[str, List[List[dict]]], turns: int) -> dict:
    """Per turn and per system ('on', 'off'): median TTFT over the conversations, prompt tokens, cached tokens,
    errors; and TTFT of the last turn over the first for each system (None where either is missing)."""
    rows = []
    for t in range(1, turns + 1):
        row: dict = {"turn": t}
        for mode, convs in runs.items():
            res = [c[t - 1] for c in convs if len(c) >= t]
            ok = [r for r in res if "error" not in r]
            row[f"ttft_{mode}_ms"] = _median([r["ttft_ms"] for r in ok])
            row[f"ttft_{mode}_all_ms"] = [round(r["ttft_ms"], 2) for r in ok]
            row[f"prompt_tokens_{mode}"] = _median([r["prompt_tokens"] for r in ok if r.get("prompt_tokens")])
            cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
            row[f"cached_tokens_{mode}"] = _median(cached) if cached else None
            reused = [r["reused_tokens"] for r in ok if r.get("reused_tokens") is not None]
            row[f"reused_tokens_{mode}"] = _median(reused) if reused else None
            row[f"errors_{mode}"] = len(convs) - len(ok)
        rows.append(row)
    ratios = {}
    for mode in runs:
        a = rows[0].get(f"ttft_{mode}_ms") if rows else None
        b = rows[-1].get(f"ttft_{mode}_ms") if rows else None
        ratios[mode] = b / a if a and b is not None else None
    return {"turns": rows, f"ttft_turn{turns}_over_turn1": ratios}


def _fmt_ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _fmt_tok(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_chat_table(summary: dict, turns: int) -> str:
    """Side by side: turn, prompt tokens, prompt tokens the cache-on gateway reused (from its /v1/stats, else the
    usage's cached_tokens), TTFT cache on, TTFT cache off, on/off; then turn N / turn 1 for each."""
    lines = [f"{'turn':>4} {'prompt tokens':>13} {'reused (on)':>11} {'TTFT cache on':>14} {'TTFT cache off':>15} "
             f"{'on/off':>7}"]
    for row in summary["turns"]:
        p_on, p_off = row.get("prompt_tokens_on"), row.get("prompt_tokens_off")
        ptok = _fmt_tok(p_on if p_on is not None else p_off)
        if p_on is not None and p_off is not None and round(p_on) != round(p_off):
            ptok = f"{p_on:.0f}/{p_off:.0f}"   # the replies differed, so the conversations did
        on, off = row.get("ttft_on_ms"), row.get("ttft_off_ms")
        ratio = f"{on / off:.2f}x" if on is not None and off else "-"
        err = [f"{row[k]} failed ({k[7:]})" for k in ("errors_on", "errors_off") if row.get(k)]
        reused = row.get("reused_tokens_on")
        if reused is None:
            reused = row.get("cached_tokens_on")
        lines.append(f"{row['turn']:>4} {ptok:>13} {_fmt_tok(reused):>11} {_fmt_ms(on):>14} {_fmt_ms(off):>15} "
                     f"{ratio:>7}"
                     + (f"  {', '.join(err)}" if err else ""))
    r = summary[f"ttft_turn{turns}_over_turn1"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines.append(f"TTFT turn {turns} / turn 1: cache on {fmt(r.get('on'))}, cache off {fmt(r.get('off'))}")
    return "\n".join(lines)


def _prefix_stats(url: str) -> dict:
    """Whatever the gateway's /v1/stats says about the prefix cache (every key naming it, anywhere)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/v1/stats", timeout=30) as r:
            body = json.loads(r.read())
    except (OSError, ValueError) as e:
        return {"error": str(e)}
    found: dict = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                p = f"{path}.{k}" if path else str(k)
                if "prefix" in str(k).lower():
                    found[p] = v
                else:
                    walk(v, p)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(body, "")
    return found


def run_chat_bench(cfg: BenchConfig, json_out: Optional[str] = None) -> dict:
    """The chat-turns workload on molink-lite with the prefix cache on and off, in this one invocation."""
    info = read_model_info(cfg.model)
    ranges = plan_ranges(cfg.model, cfg.stages, cfg.split)
    chat = has_chat_template(cfg.model)
    link = (f"relay {cfg.delay_ms:g} ms one-way, {cfg.rate_mbit:g} Mbit/s between stages" if _linked(cfg)
            else "loopback, no relay") + (f"; the gateway {cfg.gateway_delay_ms:g} ms from the first stage"
                                          if cfg.gateway_delay_ms > 0 else "")
    print(f"bench chat-turns: {info.name}, {cfg.stages} stages ({', '.join(map(str, ranges))}), {link}; "
          f"{cfg.conversations} conversation(s) per system of {cfg.turns} turns, ~{cfg.turn_len} new tokens per "
          f"turn, {cfg.reply_tokens} reply tokens (temperature 0), "
          f"{'/v1/chat/completions' if chat else '/v1/completions (no chat template: concatenated text)'}; "
          f"prefix cache on vs off; {os.cpu_count()} CPU cores", flush=True)
    if cfg.baselines or cfg.speculative:
        print("  (chat-turns: --baseline and --speculative are ignored)", file=sys.stderr, flush=True)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="molink-bench-"))
    modes = ("on", "off")
    procs = {m: Procs(workdir / f"prefix-cache-{m}") for m in modes}
    runs: Dict[str, List[List[dict]]] = {m: [] for m in modes}
    out: dict = {"workload": "chat-turns", "config": asdict(cfg), "model": info.name, "link": link,
                 "endpoint": "/v1/chat/completions" if chat else "/v1/completions", "notes": ""}
    try:
        urls = {}
        for m in modes:
            procs[m].workdir.mkdir(parents=True, exist_ok=True)
            urls[m] = start_molink(cfg, procs[m], ranges, prefix_cache=m)
            asyncio.run(run_level(urls[m], 1, 1, 8, 4))  # warm-up (a prompt no conversation shares)
        for c in range(cfg.conversations):
            for m in (modes if c % 2 == 0 else modes[::-1]):
                conv = asyncio.run(run_conversation(urls[m], c, cfg, chat))
                runs[m].append(conv)
                ttft = ", ".join(f"{r['ttft_ms']:.0f}" if "error" not in r else "error" for r in conv)
                print(f"  cache {m:>3} conversation {c + 1}: TTFT per turn {ttft} ms", flush=True)
                for r in conv:
                    if "error" in r:
                        print(f"    turn {r['turn']} failed: {r['error']}", file=sys.stderr, flush=True)
        out["prefix_stats"] = {m: _prefix_stats(urls[m]) for m in modes}
        out["peak_rss_mb"] = {m: procs[m].peak_rss() for m in modes}
    except Exception as e:  # noqa: BLE001 - report what was measured
        out["notes"] = f"failed: {e}"
        print(f"  chat-turns: {out['notes']}", file=sys.stderr, flush=True)
        for m in modes:
            for name, _ in procs[m].items:
                tail = procs[m].log_tail(name)
                if tail:
                    print(f"--- cache {m}: {name} log tail ---\n{tail}", file=sys.stderr)
    finally:
        for m in modes:
            procs[m].stop()
    out.update(summarize_chat(runs, cfg.turns))
    out["conversations"] = runs
    out["replies_match"] = [all(a.get("reply") == b.get("reply") for a, b in zip(x, y))
                            for x, y in zip(runs["on"], runs["off"])]
    out["ok"] = not out["notes"] and all(len(c) == cfg.turns and all("error" not in r for r in c)
                                         for m in modes for c in runs[m]) and all(len(runs[m]) for m in modes)
    print()
    print(f"chat-turns, median of {cfg.conversations} conversation(s) per turn ({link}):")
    print(format_chat_table(out, cfg.turns))
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2))
        print(f"JSON: {json_out}")
    return out
