"""f16 codec speed at 64 x 4096: run once per converter (MOLINK_F16_CAST=bits|numpy, or neither for ggml's SIMD converters)."""
import llama_cpp  # noqa
import sys, time, numpy as np
from molink_lite.wire import codec
from molink_lite.wire.protocol import StepFrame
x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
frame = StepFrame(0, np.zeros(64, np.int32), np.arange(64, dtype=np.int32), hidden=x)  # one sequence's 64 rows
def best(fn, k=50):
    ts = []
    for _ in range(k):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts) * 1e6
data = frame.encode("f16")
enc = best(lambda: frame.encode("f16"))
dec = best(lambda: codec.decode_frame(data))
print(f"{sys.argv[1]:>6}: encode {enc:.0f} us, decode {dec:.0f} us (64 x 4096 f16 frame)")
