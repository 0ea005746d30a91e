"""What an image costs on a split (issue 30): a 2-stage random-weight Qwen2-VL split with its projector, one request
at a time, against a text prompt of the same number of rows in the same run.

    python tests/bench/vision_cost.py [--side 224] [--n 10]

Prints, per kind of request, the median latency of a 1-token answer (the prompt's prefill and one token): a new
image (sent, encoded by the first stage's projector, its rows fed), the same image again (kept by the first stage:
not encoded again), and text of the same length; then the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from serving import http  # noqa: E402
from test_vision_split import _served, data_url, image, png  # noqa: E402
from testmmproj import write_random_mmproj  # noqa: E402
from testmodels import write_random_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=224, help="image side in pixels (224: 8x8 = 64 rows)")
    ap.add_argument("--n", type=int, default=10, help="requests of each kind")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="vision-cost-"))
    text = write_random_gguf(str(d / "text.gguf"), "qwen2vl", n_layer=4, n_embd=64, n_head=4, n_vocab=256)
    proj = write_random_mmproj(str(d / "mmproj.gguf"), 64, n_embd=32, n_layer=2, n_head=2, image_size=a.side,
                               patch_size=14)
    (d / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    gw, stop = _served(str(text), str(proj), str(d / "t.jinja"), d, 4)

    def ask(content) -> tuple:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
        t0 = time.perf_counter()
        status, r = http("POST", gw.url + "/v1/chat/completions", body)
        assert status == 200, r
        return time.perf_counter() - t0, r["usage"]["prompt_tokens"]

    try:
        new, again, txt = [], [], []
        rows = 0
        for i in range(a.n):
            url = data_url(png(image(seed=100 + i, side=a.side)))
            dt, rows = ask([{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": url}}])
            new.append(dt)
            again.append(ask([{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": url}}])[0])
        for i in range(a.n):   # a new text each time (from its first token: the prefix cache reuses nothing)
            dt, n_text = ask(f"{chr(65 + i % 26)}{i} " + "a " * max(1, rows - 6))
            txt.append(dt)
        med = {k: statistics.median(v) * 1e3 for k, v in (("new image", new), ("same image", again), ("text", txt))}
        print(f"{a.side}x{a.side} image: {rows} prompt rows with it; text prompt: {n_text} rows; {a.n} requests each")
        for k, v in med.items():
            print(f"  {k:10s} {v:7.1f} ms   ({v / med['text']:.2f}x text)")
    finally:
        stop()


if __name__ == "__main__":
    main()
