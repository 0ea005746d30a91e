"""A stage that dies and does not come back: after --recover-timeout the request ends with an explicit error,
nothing hangs, new work gets 503."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.model.split import LayerRange

from serving import GatewayProcess, http

pytestmark = pytest.mark.slow  # real stage and gateway processes


def test_stage_death_mid_stream_ends_requests_with_errors(tiny_models, tmp_path):
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    procs = start_stages(model, [LayerRange(0, 2), LayerRange(2, 4)],
                         extra_args=["--threads", "1", "--ctx", "4096", "--max-seqs", "4"], workdir=str(tmp_path))
    gw = GatewayProcess([[s.url for s in procs]], extra=["--recover-timeout", "3"], log_dir=tmp_path)
    try:
        gw.wait_ready()
        events: list = []

        def stream() -> None:
            body = json.dumps({"prompt": "hello there", "max_tokens": 3000, "ignore_eos": True,
                               "stream": True}).encode()
            req = urllib.request.Request(gw.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    for line in r:
                        if line.startswith(b"data: "):
                            events.append(line[6:].strip())
            except Exception as e:  # noqa: BLE001 - recorded; the assertions below then fail
                events.append(f"exception: {e}".encode())

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 60
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(events) >= 5, events
        procs[1].proc.kill()  # the last stage dies mid-stream
        t.join(60)
        assert not t.is_alive(), "the streaming request hung after a stage died"
        errors = [json.loads(e)["error"] for e in events[-3:] if e.startswith(b'{"error"')]
        assert errors and "came back within 3 s" in errors[0]["message"], events[-3:]  # an explicit SSE error event
        assert events[-1] == b"[DONE]"
        status, body = http("POST", gw.url + "/v1/completions", {"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert status == 503 and body["error"]["message"], body
        status, _ = http("GET", gw.url + "/health", timeout=30)
        assert status == 503
    finally:
        gw.stop()
        stop_stages(procs)
