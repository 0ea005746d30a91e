#!/usr/bin/env python3
"""GPU benchmark: a model split into stage processes over loopback WebSockets vs the whole model.

Two parts (``--part``):

``pipeline`` (issue 6, one GPU): the whole model in this process (``StageEngine`` over all
layers, greedy decode loop: the floor) against the real stage servers (``molink-lite stage``
processes started by :func:`molink_lite.serving.launcher.start_stages`) driven by the scheduler's
:class:`~molink_lite.serving.scheduler.Pipeline` in this process, for 1 (the whole model served), 2
and 3 stages. Decode throughput and time per decode round (one token for every sequence)
at each concurrency, TTFT of a long prompt, and a per-step breakdown from the stages'
counters (llama_decode, hidden-state capture, the rest of the stage's step: codec encode,
sampling, Python; and what is left: sockets, frame decode, scheduler).

``gateway`` (issue 7, several GPUs): the same stages, each pinned to its own GPU with
``CUDA_VISIBLE_DEVICES``, behind ``molink-lite gateway`` (OpenAI API), driven over HTTP
with aiohttp at several concurrencies and micro-batch settings, against the whole model
on one GPU behind the same gateway.

By default the model is a random-weight Llama-3-8B-shaped GGUF (32 layers, 4096 wide,
GQA 32/8, FFN 14336, vocab 128256, Q8_0) written by ``tests/testmodels.py``; ``--shape 32b``
writes a 32B shape (64 layers, 5120 wide, GQA 40/8, FFN 27648, vocab 152064; e.g. ``--qtype q4_k``);
``--tiny`` uses a small one (CPU dry runs). Results: a table on stdout and ``--json``.

``--baseline layer-split,layer-split-bs,rpc`` (gateway part) adds llama.cpp itself, driven by the
same HTTP load driver: ``llama-server`` with the whole model split by layer over the same GPUs
(``--split-mode layer``, one process; ``-bs``: its backend sampling), and llama.cpp RPC (one
``ggml-rpc-server`` per GPU, ``llama-server --rpc``). The binaries come from ``--tools`` (default
``--lib``): ``python kernels/build.py --backend cuda --with-tools --out DIR`` builds them from the
same source as the libraries, so every system runs the same kernels.

    python tests/bench/gpu_pipeline.py --part pipeline --lib kernels/build/cuda/lib --model /tmp/l8b.gguf
    python tests/bench/gpu_pipeline.py --part gateway --gpus 0,1 --lib ... --model /tmp/l8b.gguf
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tests"):  # the package, and tests/testmodels.py (test-only, not installed)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["pipeline", "gateway", "both"], default="pipeline")
    ap.add_argument("--model", default=None, help="GGUF to use; written (random weights) if missing")
    ap.add_argument("--qtype", default="q8_0", choices=["q8_0", "q4_0", "q4_k", "f16"])
    ap.add_argument("--shape", default="8b", choices=["8b", "32b"], help="random model shape (default Llama-3-8B)")
    ap.add_argument("--device-sampling", default="off", choices=["on", "off"],
                    help="greedy tokens picked on the device (StageEngine device_sampling) in every engine")
    ap.add_argument("--baseline", default="", help="gateway part: llama.cpp baselines, any of "
                                                   "layer-split,layer-split-bs,rpc")
    ap.add_argument("--tools", default=None, help="folder with llama-server and ggml-rpc-server (default: --lib)")
    ap.add_argument("--profile", default=None, help="gateway part: py-spy (if on PATH) samples every server process "
                                                    "during the largest concurrency run; collapsed stacks go here")
    ap.add_argument("--gpu-util", default=None, help="file: nvidia-smi samples GPU utilisation every 100 ms for the "
                                                     "whole run; each HTTP row records its wall-clock window")
    ap.add_argument("--tiny", action="store_true", help="small random model (CPU dry run)")
    ap.add_argument("--lib", default=None, help="llama.cpp library folder (kernels/build.py --out)")
    ap.add_argument("--gpus", default="0", help="GPU ids; stage i runs on gpus[i %% len] (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--stages", default="1,2,3", help="stage counts to serve (1 = the whole model served)")
    ap.add_argument("--seqs", default="1,16,64", help="concurrent sequences (pipeline part)")
    ap.add_argument("--conc", default="1,16,64,128", help="concurrent HTTP requests (gateway part)")
    ap.add_argument("--lanes", default="1", help="gateway part: --lanes settings of the stages, e.g. 1,2")
    ap.add_argument("--micro-batches", default="1,S", help="micro-batch settings; S = number of stages, S+1 ...")
    ap.add_argument("--steps", type=int, default=48, help="decode tokens per sequence (pipeline part)")
    ap.add_argument("--http-tokens", type=int, default=64, help="max_tokens per HTTP request (gateway part)")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens of the throughput runs")
    ap.add_argument("--ttft-prompt", type=int, default=2048, help="prompt tokens of the TTFT run")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512, help="llama.cpp n_batch of every engine")
    ap.add_argument("--ctx", type=int, default=0, help="KV cells per engine (default: enough for the runs)")
    ap.add_argument("--codec", default="f16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--workdir", default=None, help="stage logs / ready files (default: a temp folder)")
    ap.add_argument("--skip-whole-engine", action="store_true")
    ap.add_argument("--chain", default="", help="stage counts for the in-process engine-chain breakdown, e.g. 2,3")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; skip remaining runs after this")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="gateway part: a `molink-lite link` relay adding this delay each way in front of every stage "
                         "after the first (and of every ggml-rpc-server of the rpc baseline), as on another host")
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="gateway part: the relay's rate limit each way")
    ap.add_argument("--gateway-delay-ms", type=float, default=0.0,
                    help="gateway part: the gateway on a host of its own, a relay of this delay each way in front of "
                         "the first stage too (default 0: the gateway beside the first stage)")
    ap.add_argument("--stage-output", default="",
                    help="how non-last stages hand on their output, each in turn (MOLINK_STAGE_OUTPUT): graph "
                         "(the engine patch), callback (the pristine API's eval callback), e.g. callback,graph; "
                         "default: what the library offers")
    ap.add_argument("--ring", default="",
                    help="the --ring settings to run side by side, e.g. off,on (default: the gateway's own default); "
                         "gateway part: with a relay the ring's link crosses one too; pipeline part: a ringing round "
                         "goes last stage -> first stage without the gateway, so the per-hop table is left out")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="gateway part: every request asks for all max_tokens (ignore_eos), on every system")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.part in ("pipeline", "both"):
    # this process runs the whole-model engine: pin it to the first GPU like the stages
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", ARGS.gpus.split(",")[0])
if ARGS.lib:
    from molink_lite.stage.libpath import use_library_dir

    use_library_dir(ARGS.lib)

import llama_cpp  # noqa: E402,F401 - loads libllama; before numpy (segfault with some CUDA builds)
import llama_cpp.llama_cpp as _ll  # noqa: E402

import asyncio  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

from molink_lite.stage.engine import StageEngine  # noqa: E402
from molink_lite.serving.launcher import start_stages, stop_stages  # noqa: E402
from molink_lite.stage.sampling import SamplerPool, SamplingParams  # noqa: E402
from molink_lite.serving.pipeline import Pipeline  # noqa: E402
from molink_lite.serving.router import Router  # noqa: E402
from molink_lite.serving.sequence import GenRequest  # noqa: E402
from molink_lite.model.split import even_ranges, read_model_info, stage_gguf  # noqa: E402
from serving import stop_processes  # noqa: E402
from testmodels import write_random_gguf  # noqa: E402
from molink_lite.wire.codec import decode_frame  # noqa: E402
from molink_lite.wire.protocol import StepFrame  # noqa: E402

T_START = time.perf_counter()
DEVICE_SAMPLING = ARGS.device_sampling == "on"
RESULTS: Dict[str, object] = {"args": vars(ARGS)}


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def out_of_time() -> bool:
    return bool(ARGS.deadline) and time.perf_counter() - T_START > ARGS.deadline


def save() -> None:
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(RESULTS, indent=1, default=str))


def micro_batch_list(n_stages: int) -> List[int]:
    """--micro-batches for a stage count: numbers, S (= stages), kS or S+k; A (0): the gateway's own choice
    (gateway part: no --micro-batches, so link_policy decides)."""
    out = set()
    for m in ARGS.micro_batches.split(","):
        m = m.strip()
        if m == "A":
            out.add(0)
        elif m.startswith("S+"):
            out.add(n_stages + int(m[2:]))
        elif m.endswith("S"):  # S, 2S ...
            out.add(n_stages * int(m[:-1] or 1))
        else:
            out.add(int(m))
    return sorted(out)


# ----------------------------------------------------------------------------- model
def ensure_model() -> str:
    if ARGS.tiny:
        shape = dict(n_layer=6, n_embd=256, n_head=8, n_head_kv=2, n_ff=512, n_vocab=4096)
    elif ARGS.shape == "32b":  # Qwen2.5-32B's sizes in a llama-3 graph
        shape = dict(n_layer=64, n_embd=5120, n_head=40, n_head_kv=8, n_ff=27648, n_vocab=152064)
    else:  # Llama-3-8B
        shape = dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
    tag = "tiny" if ARGS.tiny else {"8b": "l8b", "32b": "l32b"}[ARGS.shape]
    path = ARGS.model or str(Path(tempfile.gettempdir()) / f"molink-bench-{tag}-{ARGS.qtype}.gguf")
    if not Path(path).is_file():
        say(f"writing random-weight model {path} ({shape}, {ARGS.qtype})")
        t0 = time.perf_counter()
        write_random_gguf(path, "llama", variant="llama3", qtype=ARGS.qtype, n_ctx_train=8192, **shape)
        say(f"  wrote {Path(path).stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    RESULTS["model"] = {"path": path, "bytes": Path(path).stat().st_size, "qtype": ARGS.qtype, **shape}
    if ARGS.model and Path(ARGS.model).is_file():  # a given model: describe it, not the random shape
        info = read_model_info(path)
        RESULTS["model"].update(n_layer=info.n_layer, n_embd=info.n_embd, n_vocab=info.n_vocab, qtype=info.arch)
    return path


def backend_desc() -> dict:
    lib = _ll._lib
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    devs = []
    for i in range(lib.ggml_backend_dev_count()):
        d = lib.ggml_backend_dev_get(i)
        devs.append(f"{lib.ggml_backend_dev_name(d).decode()}: {lib.ggml_backend_dev_description(d).decode()}")
    return {"lib": lib._name, "gpu_offload": bool(_ll.llama_supports_gpu_offload()), "devices": devs}



# ----------------------------------------------------------------------------- whole model, in process
def whole_engine(model: str, seqs: List[int]) -> dict:
    """Greedy decode with the whole model in this process: the floor for the served runs."""
    n_ctx = ARGS.ctx or max(max(seqs) * (ARGS.prompt_len + ARGS.steps + 8), ARGS.ttft_prompt + 64)
    say(f"whole model in process: n_ctx {n_ctx}, n_batch {ARGS.batch}")
    t0 = time.perf_counter()
    eng = StageEngine(model, n_ctx=n_ctx, n_seq_max=max(seqs), n_batch=ARGS.batch,
                      n_gpu_layers=ARGS.n_gpu_layers, n_threads=ARGS.threads, device_sampling=DEVICE_SAMPLING)
    load_s = time.perf_counter() - t0
    say(f"  device sampling: {eng.device_sampling}")
    pool = SamplerPool(eng.info.n_vocab, on_greedy=eng.set_device_greedy)
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for n in seqs:
            if out_of_time():
                break
            for s in range(n):
                pool.start(s, greedy)
            ids = np.arange(n, dtype=np.int32)
            seq = np.repeat(ids, ARGS.prompt_len)
            pos = np.tile(np.arange(ARGS.prompt_len, dtype=np.int32), n)
            tok = rng.integers(3, eng.info.n_vocab, size=seq.shape[0]).astype(np.int32)
            logits = eng.forward(seq, pos, tokens=tok)
            nxt = pool.sample(ids, logits, None, eng.last_sampled)
            cur = np.full(n, ARGS.prompt_len, dtype=np.int32)
            steps, decode, sample, fwd = [], [], [], []
            for k in range(ARGS.steps):
                d0 = eng.times.decode
                t1 = time.perf_counter()
                logits = eng.forward(ids, cur, tokens=nxt)
                t2 = time.perf_counter()
                nxt = pool.sample(ids, logits, None, eng.last_sampled)
                t3 = time.perf_counter()
                cur += 1
                if k >= 3:  # warm-up steps (CUDA graphs, allocations)
                    steps.append(t3 - t1)
                    decode.append(eng.times.decode - d0)
                    fwd.append(t2 - t1)
                    sample.append(t3 - t2)
            eng.clear()
            for s in range(n):
                pool.drop(s)
            st = statistics.median(steps)
            row = {"seqs": n, "step_ms": st * 1e3, "decode_ms": statistics.median(decode) * 1e3,
                   "sample_ms": statistics.median(sample) * 1e3, "forward_ms": statistics.median(fwd) * 1e3,
                   "tok_s": n / st}
            row["overhead_us"] = (row["step_ms"] - row["decode_ms"]) * 1e3
            rows.append(row)
            say(f"  whole engine {n:>3} seqs: step {row['step_ms']:.2f} ms (forward {row['forward_ms']:.2f}, of which "
                f"llama_decode call {row['decode_ms']:.2f}; "
                f"argmax {row['sample_ms']:.2f}), {row['tok_s']:.0f} tok/s")
        # TTFT: a long prompt in prefill_chunk pieces, then the first token
        ttft = []
        for rep in range(3):
            if out_of_time():
                break
            prompt = rng.integers(3, eng.info.n_vocab, size=ARGS.ttft_prompt).astype(np.int32)
            t0 = time.perf_counter()
            for a in range(0, ARGS.ttft_prompt, ARGS.prefill_chunk):
                b = min(ARGS.ttft_prompt, a + ARGS.prefill_chunk)
                logits = eng.forward(np.zeros(b - a, np.int32), np.arange(a, b, dtype=np.int32), tokens=prompt[a:b])
            pool.sample(np.zeros(1, np.int32), logits[-1:], None, eng.last_sampled)
            ttft.append(time.perf_counter() - t0)
            eng.clear()
        res = {"load_s": load_s, "rows": rows, "ttft_ms": [x * 1e3 for x in ttft],
               "ttft_ms_best": min(ttft) * 1e3 if ttft else None}
        if ttft:
            say(f"  whole engine TTFT ({ARGS.ttft_prompt}-token prompt, chunks of {ARGS.prefill_chunk}): "
                f"{res['ttft_ms_best']:.1f} ms (runs {', '.join(f'{x * 1e3:.0f}' for x in ttft)})")
        return res
    finally:
        eng.close()


# ----------------------------------------------------------------------------- served stages
def stage_output_modes() -> List[str]:
    return [m for m in ARGS.stage_output.split(",") if m] or [""]


def launch(model: str, n_stages: int, n_ctx: int, max_seqs: int, gpus: List[str], workdir: Path, lanes: int = 1,
           stage_output: str = ""):
    """Start one ``molink-lite stage`` process per range, stage i on GPU gpus[i % len(gpus)]; ``stage_output``:
    MOLINK_STAGE_OUTPUT of the stages (graph or callback; "" leaves the library's default)."""
    info = read_model_info(model)
    ranges = even_ranges(info.n_layer, n_stages)
    for r in ranges:
        stage_gguf(model, r)
    extra = ["--ctx", str(n_ctx), "--max-seqs", str(max_seqs), "--n-gpu-layers", str(ARGS.n_gpu_layers),
             "--batch", str(ARGS.batch), "--codec", "f16" if ARGS.codec == "auto" else ARGS.codec,
             "--device-sampling", ARGS.device_sampling,
             "--lanes", str(lanes)]
    if ARGS.threads:
        extra += ["--threads", str(ARGS.threads)]
    if ARGS.lib:
        extra += ["--lib", str(Path(ARGS.lib).resolve())]
    procs = []
    try:
        for i, r in enumerate(ranges):
            wd = workdir / f"s{n_stages}-l{lanes}-{i}{stage_output}"
            wd.mkdir(parents=True, exist_ok=True)
            env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)], "NCCL_NVLS_ENABLE": "0"}
            if stage_output:
                env["MOLINK_STAGE_OUTPUT"] = stage_output
            procs += start_stages(model, [r], extra_args=extra, env=env, workdir=str(wd), timeout=600)
    except BaseException:
        stop_stages(procs)
        raise
    for sp in procs:
        for line in sp.log_tail(40).splitlines():
            if "backend" in line or "offloaded" in line:
                say(f"  stage {sp.layers}: {line.split(' INFO ')[-1]}")
    return ranges, procs


class TimedPipeline(Pipeline):
    """Pipeline that records when results arrive (time, tokens in the result)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.marks: List[tuple] = []
        self.sent: Dict[int, float] = {}   # step id -> when the gateway sent it
        self.got: Dict[int, float] = {}    # step id -> when its result arrived

    def _send(self, lane, plan):
        super()._send(lane, plan)
        self.sent[max(self.inflight)] = time.perf_counter()

    def _on_result(self, meta, arrays):  # noqa: D401
        n = int(arrays.get("seq", np.zeros(0)).shape[0])
        now = time.perf_counter()
        self.marks.append((now, n))
        if isinstance(meta.get("step"), int):
            self.got[meta["step"]] = now
        super()._on_result(meta, arrays)


def round_hops(pipe: "TimedPipeline", timelines: List[list]) -> Optional[Dict[str, float]]:
    """Where a decode round goes, one micro-batch (medians over the steps every stage ran, in ms): the gateway's
    send to the first stage's start (frame travel, decode and check), each stage's step, each hand-over between
    stages (encode, socket, decode, check), the last stage's end to the result at the gateway, and the gateway's
    turn from a result to its next step. perf_counter is one clock for every process of a host."""
    per = [{e[0]: (e[1], e[2]) for e in tl if isinstance(e, (list, tuple)) and len(e) == 3} for tl in timelines]
    steps = sorted(k for k in pipe.sent if k in pipe.got and all(k in p for p in per))
    if len(steps) < 4:
        return None
    cols: Dict[str, List[float]] = {}

    def add(name: str, v: float) -> None:
        cols.setdefault(name, []).append(v * 1e3)
    for k in steps:
        add("gw->s0", per[0][k][0] - pipe.sent[k])
        for i, p in enumerate(per):
            add(f"s{i}", p[k][1] - p[k][0])
            if i + 1 < len(per):
                add(f"s{i}->s{i + 1}", per[i + 1][k][0] - p[k][1])
        add(f"s{len(per) - 1}->gw", pipe.got[k] - per[-1][k][1])
        if k + 1 in pipe.sent:
            add("gw turn", pipe.sent[k + 1] - pipe.got[k])
    return {k: float(np.median(v)) for k, v in cols.items()}


async def _drain(s) -> None:
    while True:
        ev = await s.events.get()
        if ev.kind in ("done", "error"):
            if ev.kind == "error":
                raise RuntimeError(ev.message)
            return


def _stage_sum(before: List[dict], after: List[dict]) -> List[dict]:
    keys = ("steps", "busy_s", "engine_decode_s", "engine_capture_s", "rows", "engine_steps", "engine_graphs_reused")
    return [{k: float(a.get(k, 0)) - float(b.get(k, 0)) for k in keys} for b, a in zip(before, after)]


async def pipeline_runs(urls: List[str], mb: int, seqs: List[int], n_vocab: int, n_embd: int,
                        ring: str = "auto") -> dict:
    pipe = TimedPipeline(urls, codec=ARGS.codec, max_inflight=mb, prefill_chunk=ARGS.prefill_chunk,
                         max_batch_tokens=max(ARGS.batch, max(seqs)), ring=ring)
    await pipe.connect(timeout=120)
    router = Router([pipe])
    rng = np.random.default_rng(1)
    greedy = SamplingParams(temperature=0.0)
    rows = []
    try:
        # warm-up (CUDA graphs, allocations, connections)
        await asyncio.gather(*(_drain(router.submit(GenRequest(rng.integers(3, n_vocab, ARGS.prompt_len), greedy, 8)))
                               for _ in range(max(seqs))))
        for n in seqs:
            if out_of_time():
                break
            before = await pipe.stage_stats()
            steps0, rings0 = pipe.stats["steps"], pipe.stats["ring_rounds"]
            pipe.marks.clear()
            pipe.sent.clear()
            pipe.got.clear()
            t0 = time.perf_counter()
            states = [router.submit(GenRequest(rng.integers(3, n_vocab, ARGS.prompt_len).astype(np.int64), greedy,
                                             ARGS.steps)) for _ in range(n)]
            await asyncio.gather(*(_drain(s) for s in states))
            t1 = time.perf_counter()
            after = await pipe.stage_stats()
            n_steps = pipe.stats["steps"] - steps0
            gen = sum(len(s.generated) for s in states)
            # steady decode window: from the moment every sequence had its first token
            # to the first finish; results in between are pure decode
            t_all = max(s.t_first for s in states)
            ends = [t for t, _ in pipe.marks]
            t_end = min(t1, max(ends))
            win = [(t, k) for t, k in pipe.marks if t_all < t <= t_end]
            win_tok = sum(k for _, k in win)
            win_s = (win[-1][0] - t_all) if win else float("nan")
            tok_s = win_tok / win_s if win and win_s > 0 else gen / (t1 - t0)
            per = _stage_sum(before, after)
            st_steps = max(1.0, per[0]["steps"])
            dec = sum(p["engine_decode_s"] for p in per) / st_steps
            cap = sum(p["engine_capture_s"] for p in per) / st_steps
            busy = sum(p["busy_s"] for p in per) / st_steps
            round_ms = n / tok_s * 1e3
            ring_rounds = pipe.stats["ring_rounds"] - rings0   # rounds the last stage sent on to the first itself
            row = {"seqs": n, "micro_batches": mb, "tok_s": tok_s, "round_ms": round_ms,
                   "e2e_tok_s": gen / (t1 - t0), "generated": gen, "steps": n_steps, "ring_rounds": ring_rounds,
                   "ring": pipe.ring_state(),
                   "per_stage": per, "decode_ms": dec * 1e3, "capture_ms": cap * 1e3,
                   "stage_other_ms": (busy - dec - cap) * 1e3,
                   # wall time of a step not spent inside any stage's step: sockets, frame decode, scheduler
                   "outside_ms": (t1 - t0) / st_steps * 1e3 - busy * 1e3 if mb == 1 else None}
            if mb == 1:
                row["overhead_us"] = (round_ms - row["decode_ms"]) * 1e3
                row["graph_reuse"] = [p["engine_graphs_reused"] / max(1.0, p["engine_steps"]) for p in per]
                say("    llama.cpp graphs reused, per stage: " + ", ".join(f"{x:.0%}" for x in row["graph_reuse"]))
                hops = round_hops(pipe, [a.get("timeline") or [] for a in after])
                if hops:
                    row["hops_ms"] = hops
                    say("    round, per hop (ms, medians): " + ", ".join(f"{k} {v:.3f}" for k, v in hops.items()))
            rows.append(row)
            say(f"  {len(urls)} stage(s) mb={mb} {n:>3} seqs: {tok_s:7.0f} tok/s decode, round {round_ms:6.2f} ms "
                f"(Σ llama_decode {row['decode_ms']:.2f}, capture {row['capture_ms']:.2f}, stage other "
                f"{row['stage_other_ms']:.2f} ms/step; {n_steps} steps, {ring_rounds} ring rounds, {gen} tokens)")
        # TTFT of a long prompt (alone in the pipeline)
        ttft = []
        for rep in range(3):
            if out_of_time():
                break
            s = router.submit(GenRequest(rng.integers(3, n_vocab, ARGS.ttft_prompt).astype(np.int64), greedy, 1))
            await _drain(s)
            ttft.append(s.t_first - s.t_submit)
        if ttft:
            say(f"  {len(urls)} stage(s) mb={mb} TTFT {ARGS.ttft_prompt} tokens: {min(ttft) * 1e3:.1f} ms "
                f"(runs {', '.join(f'{x * 1e3:.0f}' for x in ttft)})")
        return {"rows": rows, "ttft_ms": [x * 1e3 for x in ttft], "ttft_ms_best": min(ttft) * 1e3 if ttft else None}
    finally:
        await pipe.close()


def chain_engine(model: str, n_stages: int, seqs: List[int]) -> dict:
    """The stages' engines in this process, run one after the other with a real codec round trip
    between them: per-stage forward time (llama_decode + GPU wait + capture), codec and argmax,
    without processes or sockets."""
    info = read_model_info(model)
    ranges = even_ranges(info.n_layer, n_stages)
    n_ctx = ARGS.ctx or max(max(seqs) * (ARGS.prompt_len + ARGS.steps + 8), 256)
    engines = [StageEngine(stage_gguf(model, r), n_ctx=n_ctx, n_seq_max=max(seqs), n_batch=ARGS.batch,
                           n_gpu_layers=ARGS.n_gpu_layers, n_threads=ARGS.threads, device_sampling=DEVICE_SAMPLING)
               for r in ranges]
    pool = SamplerPool(info.n_vocab, on_greedy=engines[-1].set_device_greedy)
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for n in seqs:
            if out_of_time():
                break
            for s in range(n):
                pool.start(s, greedy)
            ids = np.arange(n, dtype=np.int32)

            def step(seq, pos, tok, rec):
                h = None
                for i, e in enumerate(engines):
                    d0, c0 = e.times.decode, e.times.capture
                    t0 = time.perf_counter()
                    o = e.forward(seq, pos, tokens=tok) if i == 0 else e.forward(seq, pos, hidden=h)
                    t1 = time.perf_counter()
                    if rec is not None:
                        rec["fwd"][i].append(t1 - t0)
                        rec["dec"][i].append(e.times.decode - d0)
                        rec["cap"][i].append(e.times.capture - c0)
                    if i < len(engines) - 1:
                        frame = StepFrame(0, seq, pos, hidden=o).encode(ARGS.codec)
                        h = decode_frame(frame)[1]["hidden"]
                        if rec is not None:
                            rec["codec"].append(time.perf_counter() - t1)
                return o

            seq = np.repeat(ids, ARGS.prompt_len)
            pos = np.tile(np.arange(ARGS.prompt_len, dtype=np.int32), n)
            tok = rng.integers(3, info.n_vocab, size=seq.shape[0]).astype(np.int32)
            nxt = pool.sample(ids, step(seq, pos, tok, None), None, engines[-1].last_sampled)
            cur = np.full(n, ARGS.prompt_len, dtype=np.int32)
            rec = {"fwd": [[] for _ in engines], "dec": [[] for _ in engines], "cap": [[] for _ in engines],
                   "codec": [], "argmax": [], "step": []}
            for k in range(ARGS.steps):
                r = rec if k >= 3 else None
                t0 = time.perf_counter()
                logits = step(ids, cur, nxt, r)
                t1 = time.perf_counter()
                nxt = pool.sample(ids, logits, None, engines[-1].last_sampled)
                t2 = time.perf_counter()
                cur += 1
                if r is not None:
                    rec["argmax"].append(t2 - t1)
                    rec["step"].append(t2 - t0)
            for e in engines:
                e.clear()
            for s in range(n):
                pool.drop(s)
            med = lambda xs: statistics.median(xs) * 1e3 if xs else 0.0  # noqa: E731
            k = len(rec["step"])
            row = {"seqs": n, "step_ms": med(rec["step"]),
                   "forward_ms": [med(x) for x in rec["fwd"]], "llama_decode_ms": [med(x) for x in rec["dec"]],
                   "capture_ms": [med(x) for x in rec["cap"]],
                   "codec_ms": sum(rec["codec"]) / max(1, k) * 1e3, "argmax_ms": med(rec["argmax"])}
            row["tok_s"] = n / row["step_ms"] * 1e3
            rows.append(row)
            say(f"  chain x{n_stages} in process {n:>3} seqs: step {row['step_ms']:.2f} ms = forward "
                f"{' + '.join(f'{x:.2f}' for x in row['forward_ms'])} (llama_decode call "
                f"{' + '.join(f'{x:.2f}' for x in row['llama_decode_ms'])}, capture "
                f"{' + '.join(f'{x:.2f}' for x in row['capture_ms'])}) + codec {row['codec_ms']:.2f} + argmax "
                f"{row['argmax_ms']:.2f}")
        return {"ranges": [str(r) for r in ranges], "rows": rows}
    finally:
        for e in engines:
            e.close()


def codec_cost(n_embd: int, seqs: List[int]) -> Dict[int, float]:
    """Encode + decode of one step's hidden states (µs), as a stage boundary does."""
    out = {}
    for n in seqs:
        h = np.random.default_rng(0).standard_normal((n, n_embd), dtype=np.float32)
        frame = StepFrame(1, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), hidden=h)
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            decode_frame(frame.encode(ARGS.codec))
            ts.append(time.perf_counter() - t0)
        out[n] = statistics.median(ts) * 1e6
    return out


def hot_path_cost(n_embd: int, n_vocab: int, n: int) -> Dict[str, float]:
    """Micro-benchmark of the last stage's greedy argmax and the f16 codec at ``n`` rows (µs, medians)."""
    from molink_lite.stage import sampling
    from molink_lite.wire import codec as wire

    def med(fn, reps: int = 20) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, n_vocab), dtype=np.float32)
    out = np.empty(n, dtype=np.int32)
    fast = np.ones(n, dtype=bool)
    res = {"argmax_copy": med(lambda: np.argmax(logits[fast], axis=1)),
           "argmax_direct": med(lambda: np.argmax(logits, axis=1))}
    for k in (2, 4, 8):
        res[f"argmax_threads{k}"] = med(lambda: sampling.argmax_rows(logits, out, threads=k))
    res["argmax_default"] = med(lambda: sampling.argmax_rows(logits, out))
    h = rng.standard_normal((n, n_embd), dtype=np.float32)
    h16 = h.astype(np.float16)
    saved = (wire._FAST_F16, wire._FAST_F16_DEC, wire.CODEC_THREADS)
    res["codec_default"] = f"bits enc {saved[0]} dec {saved[1]}, threads {saved[2]}"
    try:
        for enc_bits in (True, False):
            for th in (1, 4):
                wire._FAST_F16 = wire._FAST_F16_DEC = enc_bits
                wire.CODEC_THREADS = th
                tag = f"{'bits' if enc_bits else 'numpy'}_t{th}"
                res[f"f32to16_{tag}"] = med(lambda: wire._f32_to_f16(h))
                res[f"f16to32_{tag}"] = med(lambda: wire._f16_to_f32(h16))
    finally:
        wire._FAST_F16, wire._FAST_F16_DEC, wire.CODEC_THREADS = saved
    res["astype_f16"] = med(lambda: h.astype(np.float16))
    say(f"hot paths at {n} rows (µs): " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k}: {v}"
                                                      for k, v in res.items()))
    return res


def part_pipeline(model: str) -> None:
    seqs = [int(x) for x in ARGS.seqs.split(",")]
    info = read_model_info(model)
    gpus = ARGS.gpus.split(",")[:1]  # issue 6: everything on one GPU
    if not ARGS.skip_whole_engine:
        RESULTS["whole_engine"] = whole_engine(model, seqs)
        save()
    RESULTS["codec_us"] = codec_cost(info.n_embd, seqs)
    RESULTS["hot_path_us"] = hot_path_cost(info.n_embd, info.n_vocab, max(seqs))
    if ARGS.chain:
        chains = RESULTS.setdefault("chain_engine", {})
        for ns in [int(x) for x in ARGS.chain.split(",")]:
            if not out_of_time():
                chains[str(ns)] = chain_engine(model, ns, seqs)
                save()
    n_ctx = ARGS.ctx or max(max(seqs) * (ARGS.prompt_len + ARGS.steps + 8) + 64, ARGS.ttft_prompt + 64)
    served = RESULTS.setdefault("served", {})
    wd = Path(ARGS.workdir or tempfile.mkdtemp(prefix="molink-bench-"))
    for ns, mode in [(int(x), m) for x in ARGS.stages.split(",") if x for m in stage_output_modes()]:
        if out_of_time():
            break
        if ns == 1 and mode != stage_output_modes()[0]:
            continue  # one stage has no non-last stage: the mode changes nothing
        say(f"starting {ns} stage process(es) on GPU {gpus[0]}" + (f", stage output {mode}" if mode else ""))
        t0 = time.perf_counter()
        ranges, procs = launch(model, ns, n_ctx, max(seqs), gpus, wd, stage_output=mode)
        say(f"  up in {time.perf_counter() - t0:.1f} s: {', '.join(str(r) for r in ranges)}")
        try:
            mbs = micro_batch_list(ns)
            rings = ARGS.ring.split(",") if ARGS.ring and ns > 1 else [""]
            for mb, ring in [(m, r) for m in mbs for r in rings]:
                if out_of_time():
                    break
                served[f"{ns}x_mb{mb}" + (f"_{mode}" if mode and ns > 1 else "") + (f"_ring{ring}" if ring else "")] \
                    = asyncio.run(pipeline_runs([sp.url for sp in procs], mb, seqs, info.n_vocab, info.n_embd,
                                                ring or "auto"))
                save()
        finally:
            stop_stages(procs)
    print_pipeline_table(seqs)


def print_pipeline_table(seqs: List[int]) -> None:
    whole = {r["seqs"]: r for r in (RESULTS.get("whole_engine") or {}).get("rows", [])}
    served = RESULTS.get("served", {})
    m = RESULTS["model"]
    print()
    print(f"== issue 6: one GPU, {m['n_layer']} layers x {m['n_embd']}, {m['qtype']}, {m['bytes'] / 1e9:.2f} GB; "
          f"decode {ARGS.steps} tokens/seq after a {ARGS.prompt_len}-token prompt; codec {ARGS.codec}")
    print(f"   devices: {RESULTS.get('backend', {}).get('devices')}")
    hdr = (f"{'config':<16}{'seqs':>5}{'tok/s':>9}{'round ms':>10}{'ratio':>7}{'Σdecode':>9}{'capture':>9}"
           f"{'stage py':>9}{'outside':>9}{'ovh µs':>9}")
    print(hdr)
    for n in seqs:
        w = whole.get(n)
        if w:
            print(f"{'whole (engine)':<16}{n:>5}{w['tok_s']:>9.0f}{w['step_ms']:>10.2f}{1.0:>7.3f}{w['decode_ms']:>9.2f}"
                  f"{0.0:>9.2f}{w['sample_ms']:>9.2f}{0.0:>9.2f}{w['overhead_us']:>9.0f}")
        for key, res in served.items():
            for r in res["rows"]:
                if r["seqs"] != n:
                    continue
                ratio = r["round_ms"] / w["step_ms"] if w else float("nan")
                outside = r.get("outside_ms")
                print(f"{key:<16}{n:>5}{r['tok_s']:>9.0f}{r['round_ms']:>10.2f}{ratio:>7.3f}{r['decode_ms']:>9.2f}"
                      f"{r['capture_ms']:>9.2f}{r['stage_other_ms']:>9.2f}"
                      f"{(outside if outside is not None else float('nan')):>9.2f}{r.get('overhead_us', float('nan')):>9.0f}")
    chains = RESULTS.get("chain_engine", {})
    if chains:
        print("in-process engine chain (no processes/sockets): step = Σ forward (llama_decode + GPU wait + capture) "
              "+ codec + argmax, ms")
        for n in seqs:
            w = whole.get(n)
            if w:
                print(f"  whole   {n:>3} seqs: step {w['step_ms']:.2f} = forward {w.get('forward_ms', float('nan')):.2f}"
                      f" + argmax {w['sample_ms']:.2f}")
            for ns, c in chains.items():
                for r in c["rows"]:
                    if r["seqs"] == n:
                        ratio = r["step_ms"] / w["step_ms"] if w else float("nan")
                        print(f"  chain{ns}  {n:>3} seqs: step {r['step_ms']:.2f} (x{ratio:.3f}) = forward "
                              f"{' + '.join(f'{x:.2f}' for x in r['forward_ms'])} + codec {r['codec_ms']:.2f} + argmax "
                              f"{r['argmax_ms']:.2f}; capture {' + '.join(f'{x:.2f}' for x in r['capture_ms'])}")
    print("ratio = round time / whole-engine step time (round: one token for every sequence). Σdecode/capture/"
          "stage py: per step, summed over stages; outside: step wall time not inside any stage step (sockets, "
          "frame decode, scheduler; mb=1 only); ovh µs: round time minus Σ llama_decode (mb=1).")
    cu = RESULTS.get("codec_us", {})
    print("codec encode+decode per boundary (µs): " + ", ".join(f"{k} seqs {v:.0f}" for k, v in cu.items()))
    w = RESULTS.get("whole_engine") or {}
    line = [f"whole engine {w['ttft_ms_best']:.1f}"] if w.get("ttft_ms_best") else []
    line += [f"{k} {v['ttft_ms_best']:.1f}" for k, v in served.items() if v.get("ttft_ms_best")]
    print(f"TTFT {ARGS.ttft_prompt}-token prompt (ms, best of 3): " + "; ".join(line))


# ----------------------------------------------------------------------------- gateway / HTTP
def start_gateway_proc(urls: List[str], mb: int, port: int, logf: Path, ring: str = "",
                       ring_via: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "molink_lite.cli", "gateway", "--port", str(port), "--codec", ARGS.codec,
           *(["--micro-batches", str(mb)] if mb else []), "--prefill-chunk", str(ARGS.prefill_chunk),
           "--max-batch-tokens", str(max(ARGS.batch, 256)), "--pipeline", ",".join(urls)]
    if ring:
        cmd += ["--ring", ring]
    if ring_via:
        cmd += ["--ring-via", f"{urls[0]}={ring_via}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "NCCL_NVLS_ENABLE": "0"}
    f = open(logf, "wb")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    f.close()
    return p


async def http_runs(port: int, concs: List[int], n_vocab: int, alive=None, stats: bool = True,
                    profile: Optional[Dict[str, int]] = None, tag: str = "") -> dict:
    """The one load driver for every system: N concurrent /v1/completions (token-id prompts, greedy), then the
    TTFT of a long streamed prompt. ``alive``: returns False once the server process died."""
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(2)
    # limit=0: no cap on connections (aiohttp's default 100 held the 128-concurrent rows back)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        t_up = time.perf_counter() + 900  # llama-server loads the whole model before /health answers 200
        while True:
            try:
                async with http.get(base + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.perf_counter() > t_up or (alive is not None and not alive()):
                raise RuntimeError("the server did not come up")
            await asyncio.sleep(0.2)

        async def one(max_tokens: int, prompt_len: int) -> dict:
            body = {"prompt": rng.integers(3, n_vocab, prompt_len).tolist(), "max_tokens": max_tokens,
                    "temperature": 0.0}
            if ARGS.ignore_eos:
                body["ignore_eos"] = True
            async with http.post(base + "/v1/completions", json=body) as r:
                data = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {data}")
                return data["usage"]

        async def ttft(prompt_len: int) -> float:
            body = {"prompt": rng.integers(3, n_vocab, prompt_len).tolist(), "max_tokens": 2, "temperature": 0.0,
                    "stream": True}
            t0 = time.perf_counter()
            async with http.post(base + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data:") and b"[DONE]" not in line:
                        t = time.perf_counter() - t0
                        try:
                            async for _ in r.content:
                                pass
                        except aiohttp.ClientError:  # llama-server may close the stream without its last chunk
                            pass
                        return t
            return float("nan")

        await asyncio.gather(*(one(8, ARGS.prompt_len) for _ in range(min(16, max(concs)))))  # warm-up
        rows = []
        for c in concs:
            if out_of_time():
                break
            spies = start_profilers(profile, f"{tag}-c{c}") if c == max(concs) else []
            w0 = time.time()
            t0 = time.perf_counter()
            usage = await asyncio.gather(*(one(ARGS.http_tokens, ARGS.prompt_len) for _ in range(c)))
            dt = time.perf_counter() - t0
            stop_profilers(spies)
            toks = sum(u["completion_tokens"] for u in usage)
            rows.append({"conc": c, "tok_s": toks / dt, "wall_s": dt, "tokens": toks, "window": [w0, w0 + dt]})
            say(f"    {c:>3} concurrent: {toks / dt:7.0f} tok/s ({toks} tokens in {dt:.2f} s)")
        tt = []
        for _ in range(3):
            if out_of_time():
                break
            try:
                tt.append(await ttft(ARGS.ttft_prompt))
            except aiohttp.ClientError as e:  # keep the throughput rows measured above
                say(f"    TTFT run failed: {e!r}")
        if tt:
            say(f"    TTFT {ARGS.ttft_prompt} tokens: {min(tt) * 1e3:.1f} ms")
        st = None
        if stats:
            async with http.get(base + "/v1/stats") as r:
                st = await r.json()
        return {"rows": rows, "ttft_ms": [x * 1e3 for x in tt], "ttft_ms_best": min(tt) * 1e3 if tt else None,
                "stats": st}


def linked() -> bool:
    return ARGS.delay_ms > 0 or ARGS.rate_mbit > 0


def start_relay(target_port: int, port: int, logf: Path, delay_ms: Optional[float] = None) -> subprocess.Popen:
    """A ``molink-lite link`` relay on ``port`` in front of ``target_port`` (--delay-ms each way, --rate-mbit)."""
    cmd = [sys.executable, "-m", "molink_lite.cli", "link", "--listen", f"127.0.0.1:{port}",
           "--to", f"127.0.0.1:{target_port}", "--delay-ms", str(ARGS.delay_ms if delay_ms is None else delay_ms),
           "--rate-mbit", str(ARGS.rate_mbit)]
    with open(logf, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT),
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    t_end = time.time() + 60
    while time.time() < t_end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            if p.poll() is not None:
                break
            time.sleep(0.1)
    raise RuntimeError(f"relay on :{port} did not start: {logf.read_text()[-2000:]}")


def stage_urls(procs, wd: Path, relays: List[subprocess.Popen], base_port: int) -> List[str]:
    """The stages' URLs as the gateway sees them: stage 0 direct (through a relay of --gateway-delay-ms when the
    gateway is on a host of its own), later stages through a relay when linked."""
    urls = [procs[0].url]
    if ARGS.gateway_delay_ms > 0:
        relays.append(start_relay(procs[0].port, base_port, wd / "relay-gateway.log", ARGS.gateway_delay_ms))
        urls[0] = f"ws://127.0.0.1:{base_port}"
    for i, sp in enumerate(procs[1:], 1):
        if linked():
            port = base_port + i
            relays.append(start_relay(sp.port, port, wd / f"relay{i}.log"))
            urls.append(f"ws://127.0.0.1:{port}")
        else:
            urls.append(sp.url)
    return urls


def part_gateway(model: str) -> None:
    concs = [int(x) for x in ARGS.conc.split(",")]
    info = read_model_info(model)
    gpus = ARGS.gpus.split(",")
    n_ctx = ARGS.ctx or max(max(concs) * (ARGS.prompt_len + ARGS.http_tokens + 8) + 64, ARGS.ttft_prompt + 64)
    res = RESULTS.setdefault("gateway", {})
    wd = Path(ARGS.workdir or tempfile.mkdtemp(prefix="molink-bench-")) / "gw"
    wd.mkdir(parents=True, exist_ok=True)
    port = 8400
    for ns, mode in [(int(x), m) for x in ARGS.stages.split(",") if x for m in stage_output_modes()]:
        if ns == 1 and mode != stage_output_modes()[0]:
            continue
        for lanes in [int(x) for x in ARGS.lanes.split(",") if x]:
            if out_of_time():
                break
            tag = f"{ns}x" + (f"_l{lanes}" if lanes > 1 else "") + (f"_{mode}" if mode and ns > 1 else "")
            say(f"gateway part: {ns} stage(s) on GPU(s) {', '.join(gpus[i % len(gpus)] for i in range(ns))}, "
                f"{lanes} lane(s), ctx {n_ctx}" + (f", stage output {mode}" if mode else ""))
            ranges, procs = launch(model, ns, n_ctx, max(concs), gpus, wd, lanes, stage_output=mode)
            try:
                for mb, ring in [(m, r) for m in micro_batch_list(ns) for r in (ARGS.ring.split(",") if ARGS.ring else [""])]:
                    if out_of_time():
                        break
                    if 0 < mb < lanes:
                        continue
                    port += 1
                    key = (f"{tag}_mb{mb or 'auto'}" + (f"_{ARGS.codec}" if ARGS.codec != "f16" else "")
                           + (f"_ring{ring}" if ring else ""))
                    say(f"  gateway --micro-batches {mb}" + (f" --ring {ring}" if ring else "") + f" on :{port}")
                    relays: List[subprocess.Popen] = []
                    urls = stage_urls(procs, wd, relays, port + 500)
                    via = ""
                    if linked() and ns > 1 and ring != "off":   # the ring's link crosses the emulated network too
                        relays.append(start_relay(procs[0].port, port + 600, wd / f"relay-ring-{key}.log"))
                        via = f"ws://127.0.0.1:{port + 600}"
                    gw = start_gateway_proc(urls, mb, port, wd / f"gateway-{key}.log", ring, via)
                    try:
                        pids = {"gateway": gw.pid, **{f"stage{i}": sp.proc.pid for i, sp in enumerate(procs)}}
                        res[key] = asyncio.run(http_runs(port, concs, info.n_vocab, alive=lambda: gw.poll() is None,
                                                         profile=pids, tag=key))
                        pl = ((res[key].get("stats") or {}).get("pipelines") or [{}])[0]
                        if pl.get("link_choice"):
                            say(f"    gateway chose: {pl['link_choice']['why']}")
                        if pl.get("ring"):
                            say(f"    ring: {pl['ring']}")
                    except Exception as e:  # noqa: BLE001
                        say(f"  FAILED: {e}\n{(wd / f'gateway-{key}.log').read_text()[-3000:]}")
                        res[key] = {"error": str(e)}
                    finally:
                        stop_processes([gw, *relays], 10)
                    save()
            finally:
                stop_stages(procs)
    for name in [b for b in ARGS.baseline.split(",") if b]:
        if out_of_time():
            break
        port += 1
        res[name] = run_baseline(name, model, gpus, n_ctx, max(concs), concs, info.n_vocab, port, wd)
        save()
    print_gateway_table(concs, gpus)


def start_profilers(pids: Optional[Dict[str, int]], tag: str) -> List[subprocess.Popen]:
    """py-spy on each named process (collapsed stacks, native frames), while one run lasts."""
    spy = shutil.which("py-spy")
    if not pids or not ARGS.profile or not spy:
        return []
    Path(ARGS.profile).mkdir(parents=True, exist_ok=True)
    out = []
    for name, pid in pids.items():
        f = Path(ARGS.profile) / f"{tag}-{name}.txt"
        out.append(subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads",
                                     "--nonblocking", "-o", str(f)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
    time.sleep(0.5)  # py-spy attaches
    return out


def stop_profilers(spies: List[subprocess.Popen]) -> None:
    import signal

    for p in spies:
        p.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
    for p in spies:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


# ----------------------------------------------------------------------------- llama.cpp baselines
def _tool(name: str) -> str:
    d = ARGS.tools or ARGS.lib
    exe = Path(d) / name if d else None
    if exe is None or not exe.is_file():
        raise RuntimeError(f"{name} not found in --tools/--lib {d!r}: build it with kernels/build.py --with-tools")
    return str(exe)


def run_baseline(name: str, model: str, gpus: List[str], n_ctx: int, n_par: int, concs: List[int], n_vocab: int,
                 port: int, wd: Path) -> dict:
    """llama.cpp over the same GPUs, behind its own OpenAI server: ``layer-split`` (one llama-server process,
    ``--split-mode layer``), ``layer-split-bs`` (the same with its backend sampling), ``rpc`` (one
    ggml-rpc-server per GPU, llama-server --rpc). Same unified KV cache size as the stages (``-kvu -c``)."""
    if name not in ("layer-split", "layer-split-bs", "rpc"):
        raise SystemExit(f"unknown baseline {name!r}")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    procs: List[subprocess.Popen] = []
    logs: List[Path] = []

    def start(cmd: List[str], env: dict, tag: str) -> subprocess.Popen:
        logf = wd / f"{name}-{tag}.log"
        logs.append(logf)
        with open(logf, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        procs.append(p)
        return p

    cmd = [_tool("llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-ngl", "999",
           "-sm", "layer", "-c", str(n_ctx), "-kvu", "-np", str(n_par), "-b", str(ARGS.batch),
           "-ub", str(ARGS.batch), "-fa", "auto", "--no-warmup"]
    if ARGS.threads:
        cmd += ["-t", str(ARGS.threads)]
    if name == "layer-split-bs":
        cmd.append("-bs")
    say(f"baseline {name}: llama.cpp on GPU(s) {','.join(gpus)}")
    try:
        if name == "rpc":
            eps = []
            for i, g in enumerate(gpus):
                rport = port + 100 + i
                start([_tool("ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rport)],
                      {**env, "CUDA_VISIBLE_DEVICES": g}, f"rpc{i}")
                eps.append(f"127.0.0.1:{rport}")
            time.sleep(3)
            if linked():  # llama-server reaches each RPC device over the same emulated link
                for i in range(len(eps)):
                    procs.append(start_relay(port + 100 + i, port + 200 + i, wd / f"{name}-relay{i}.log"))
                    eps[i] = f"127.0.0.1:{port + 200 + i}"
            cmd += ["--rpc", ",".join(eps)]
            srv = start(cmd, {**env, "CUDA_VISIBLE_DEVICES": ""}, "server")  # layers only on the RPC devices
        else:
            srv = start(cmd, {**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}, "server")
        say("  " + " ".join(cmd[1:]))
        out = asyncio.run(http_runs(port, concs, n_vocab, alive=lambda: srv.poll() is None, stats=False,
                                    profile={"server": srv.pid}, tag=name))
        out["cmd"] = cmd
        return out
    except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, the rest of the run goes on
        tail = "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.is_file())
        say(f"  {name} FAILED: {e}\n{tail}")
        return {"error": str(e)}
    finally:
        stop_processes(procs)


def print_gateway_table(concs: List[int], gpus: List[str]) -> None:
    res = RESULTS.get("gateway", {})
    m = RESULTS["model"]
    print()
    print(f"== issue 7: behind the gateway (HTTP, aiohttp clients), {m['n_layer']} layers x {m['n_embd']}, {m['qtype']}; "
          f"{ARGS.http_tokens} tokens per request after a {ARGS.prompt_len}-token prompt; stage i on GPU "
          f"gpus[i % {len(gpus)}] of {gpus}")
    keys = list(res)
    print(f"{'concurrent':>10}" + "".join(f"{k:>15}" for k in keys) + "   (tok/s, end to end)")
    for c in concs:
        vals = []
        for k in keys:
            r = next((r for r in res[k].get("rows", []) if r["conc"] == c), None)
            vals.append(f"{r['tok_s']:>15.0f}" if r else f"{'-':>15}")
        print(f"{c:>10}" + "".join(vals))
    for base in [next((k for k in keys if k.startswith("1x")), None), "layer-split", "layer-split-bs"]:
        if base not in res:
            continue
        for c in concs:
            b = next((r for r in res[base].get("rows", []) if r["conc"] == c), None)
            if not b:
                continue
            print(f"{c:>10}" + "".join(
                f"{(r['tok_s'] / b['tok_s']):>14.2f}x" if r else f"{'-':>15}"
                for r in (next((r for r in res[k].get("rows", []) if r["conc"] == c), None) for k in keys))
                + f"   (vs {base})")
    print(f"{'TTFT ms':>10}" + "".join(f"{(res[k].get('ttft_ms_best') or float('nan')):>15.1f}" for k in keys)
          + f"   ({ARGS.ttft_prompt}-token prompt, streamed, best of 3)")


def main() -> int:
    model = ensure_model()
    util = None
    if ARGS.gpu_util and shutil.which("nvidia-smi"):
        util = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                                 "--format=csv,noheader,nounits", "-lms", "100"], stdout=open(ARGS.gpu_util, "w"),
                                stderr=subprocess.DEVNULL)
    RESULTS["backend"] = backend_desc()
    say(f"library {RESULTS['backend']['lib']}; devices {RESULTS['backend']['devices']}")
    try:
        if ARGS.part in ("pipeline", "both"):
            part_pipeline(model)
        if ARGS.part in ("gateway", "both"):
            part_gateway(model)
    finally:
        RESULTS["total_s"] = time.perf_counter() - T_START
        save()
        if util is not None:
            util.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
