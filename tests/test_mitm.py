"""A man in the middle that passes the handshake through, on the join link and on a gateway-stage link
(issue 23, findings 1-3), with real processes: with the default settings (a cluster secret, no TLS) and
with TLS. Nothing it sends is accepted, no file is written, and the victim logs why.

Also: stages join a ``--tls auto`` gateway over ``https://`` and serve text equal to the whole model.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401 - before numpy

import asyncio
import os
import time
from pathlib import Path

import orjson
import pytest

from molink_lite.model.split import LayerRange
from molink_lite.serving.launcher import start_stages, stop_stages
from molink_lite.wire import auth
from molink_lite.wire.auth import AuthError, LinkKey, new_secret
from molink_lite.wire.codec import encode_frame
from molink_lite.wire.tls import self_signed

from chain import whole_model_greedy_texts
from mitm import MITMThread, closed_by
from serving import free_port, http, spawn_cli, stop_processes

pytestmark = pytest.mark.slow
SECRET = new_secret()
KEY = LinkKey.from_secret(SECRET)


def _spawn(args, log: Path, cache: Path):
    return spawn_cli(args, log, {"MOLINK_SECRET": SECRET, "MOLINK_CACHE": str(cache)})


def _wait_for(pred, timeout: float, what: str, logs: Path = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    shown = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in logs.glob("*.log")) if logs else ""
    raise AssertionError(f"timed out waiting for {what}\n{shown}")


def _wait_listening(url: str, timeout: float = 60) -> None:
    def up() -> bool:
        try:
            http("GET", url + "/health", timeout=2)
            return True
        except OSError:
            return False
    _wait_for(up, timeout, f"{url} to listen")


@pytest.mark.parametrize("tls", [False, True], ids=["secret", "secret+tls"])
def test_a_man_in_the_middle_on_the_join_link_writes_no_file(tiny_models, tmp_path, tls):
    """Finding 1: the proxy relays the handshake, then speaks as the gateway: ``assign`` with an absolute
    path as the fingerprint. Before: the stage downloaded the attacker's bytes into /tmp/x/f."""
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    target = tmp_path / "owned"   # where the forged assignment points
    port = free_port()
    scheme = "https" if tls else "http"
    gw = _spawn(["gateway", "--model", model, "--port", str(port), "--join-settle", "1"] + (["--tls", "auto"] if tls else []),
                tmp_path / "gw.log", tmp_path / "gwcache")
    forged = {"t": "assign", "layers": "0-3", "fingerprint": str(target), "file": "f", "size": 5,
              "sha256": __import__("hashlib").sha256(b"owned").hexdigest(), "n_ctx": 256, "n_seqs": 2, "codec": "f32"}

    async def attack(stage, gateway, log):
        try:
            await asyncio.wait_for(stage.recv(), 10)   # the stage's (sealed) join message: unreadable
        except Exception:  # noqa: BLE001
            pass
        await stage.send(orjson.dumps(forged).decode())            # as the old plaintext protocol
        await stage.send(b"\x01" + os.urandom(200))                 # as a forged sealed message
        await stage.send(b"owned")                                  # the file's bytes
        log.append(f"stage closed with {await closed_by(stage)}")

    mitm = None
    stage = None
    try:
        _wait_listening(f"{scheme}://127.0.0.1:{port}", 60)
        mitm_cert = self_signed(tmp_path / "mitm-tls") if tls else None
        mitm = MITMThread(f"{'wss' if tls else 'ws'}://127.0.0.1:{port}", attack=attack, tls=mitm_cert)
        join_url = mitm.url.replace("wss://", "https://").replace("ws://", "http://")
        stage = _spawn(["stage", "--join", join_url, "--host", "127.0.0.1", "--port", "0", "--name", "victim"],
                       tmp_path / "stage.log", tmp_path / "stagecache")
        stage_log = tmp_path / "stage.log"
        if tls:  # the proxy shows its own certificate: the handshake itself fails on both sides
            # (the gateway checks first: it refuses the relayed answer, and the stage is told the join was refused)
            _wait_for(lambda: "refused" in stage_log.read_text(errors="replace"), 60, "the stage's refusal", tmp_path)
            _wait_for(lambda: "wrong or missing cluster secret" in (tmp_path / "gw.log").read_text(errors="replace"),
                      30, "the gateway's refusal")
            assert mitm.mitm.handshakes == 0
        else:
            _wait_for(lambda: any("stage closed" in x for x in mitm.mitm.log), 60, "the stage to drop the link")
            text = stage_log.read_text(errors="replace")
            assert "failed authentication" in text or "unsealed message" in text, text[-3000:]
            assert f"stage closed with {auth.CLOSE_AUTH}" in mitm.mitm.log, mitm.mitm.log
        assert not target.exists() and not (target / "f").exists()
        assert not list((tmp_path / "stagecache").rglob("f")) and not list((tmp_path / "stagecache").rglob("*.gguf"))
    finally:
        stop_processes([p for p in (stage, gw) if p is not None])
        if mitm is not None:
            mitm.stop()


def test_the_stage_refuses_unsafe_file_names_even_from_a_real_gateway(tmp_path):
    """Defence in depth (an insider lying): names are plain file names and the path stays in the cache."""
    from molink_lite.stage.join import JoinError, Membership

    m = Membership("http://127.0.0.1:1", KEY, tmp_path / "cache")
    ok = {"fingerprint": "abc123", "file": "llama-L0-3-of4.gguf"}
    assert m.layer_path(ok) == (tmp_path / "cache" / "joined" / "abc123" / "llama-L0-3-of4.gguf").resolve()
    for bad in ({"fingerprint": "/tmp/x", "file": "f"}, {"fingerprint": "..", "file": "f"},
                {"fingerprint": "a", "file": "../../etc/passwd"}, {"fingerprint": "a/b", "file": "f"},
                {"fingerprint": "a", "file": "f\\..\\g"}, {"fingerprint": "a", "file": ""},
                {"fingerprint": "a", "file": None}, {"fingerprint": "C:", "file": "f"}, {"fingerprint": "a", "file": "x" * 300}):
        with pytest.raises(JoinError, match="nothing was written|outside the cache"):
            m.layer_path(bad)
    for size in (-1, 0, True, "5", 1 << 50):
        with pytest.raises(JoinError):
            asyncio.run(m.fetch({**ok, "size": size, "sha256": "0" * 64, "layers": "0-3"}))
    with pytest.raises(JoinError):
        asyncio.run(m.fetch({**ok, "size": 5, "sha256": "../x", "layers": "0-3"}))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("tls", [False, True], ids=["secret", "secret+tls"])
def test_a_man_in_the_middle_on_a_gateway_stage_link_cannot_drive_the_stage(tiny_models, tmp_path, tls):
    """Finding 3: the proxy relays the handshake of a gateway's link, then sends its own ``hello`` to the
    stage. Before: the stage answered (model path included) and could be driven."""
    model = tiny_models("llama", n_layer=4, n_embd=64, n_head=4, n_vocab=512)
    procs = start_stages(model, [LayerRange(0, 4)], workdir=str(tmp_path), secret=SECRET,
                         extra_args=["--threads", "1", "--ctx", "256", "--max-seqs", "2"]
                         + (["--tls", "auto"] if tls else []),
                         env={"MOLINK_CACHE": str(tmp_path / "cache")})
    got = []

    async def attack(gateway, stage, log):
        await stage.send(encode_frame({"type": "hello", "rid": 1}))
        await stage.send(encode_frame({"type": "configure", "next": "ws://127.0.0.1:1", "rid": 2}))
        try:
            while True:
                got.append(await asyncio.wait_for(stage.recv(), 10))
        except Exception as e:  # noqa: BLE001
            code = getattr(getattr(e, "rcvd", None), "code", None)
            log.append(f"stage closed with {code}")

    mitm = None
    try:
        stage_url = f"{'wss' if tls else 'ws'}://127.0.0.1:{procs[0].port}"
        mitm = MITMThread(stage_url, attack=attack, tls=self_signed(tmp_path / "mitm-tls") if tls else None)

        async def as_gateway():
            try:
                link = await auth.connect(mitm.url, KEY, "gateway", max_size=1 << 20)
            except AuthError as e:
                return f"refused: {e}"
            await asyncio.sleep(3)
            await link.close()
            return "connected"
        outcome = asyncio.run(as_gateway())
        log_text = procs[0].log_file.read_text(errors="replace")
        if tls:
            assert outcome.startswith("refused") and mitm.mitm.handshakes == 0, outcome
            assert "authentication failed" in log_text
        else:
            _wait_for(lambda: any("stage closed" in x for x in mitm.mitm.log), 20, "the stage to drop the link")
            assert f"stage closed with {auth.CLOSE_AUTH}" in mitm.mitm.log, (mitm.mitm.log, got)
            assert "failed authentication" in log_text or "unsealed message" in log_text, log_text[-3000:]
        assert not got  # not a single answer: no model path, no configure
        seen = b"".join(m if isinstance(m, bytes) else m.encode() for m in mitm.mitm.seen)
        assert str(Path(model).name).encode() not in seen
    finally:
        if mitm is not None:
            mitm.stop()
        stop_stages(procs)


def test_stages_join_a_tls_gateway_over_https_and_serve_exactly(tiny_models, tmp_path):
    """Finding 2: joining over TLS was refused ("wrong or missing cluster secret"): the gateway bound an
    empty certificate fingerprint into the /cluster handshake."""
    model = tiny_models("llama", n_layer=12, n_embd=256, n_head=4, n_vocab=512)  # 2 x 70 MiB: two stages
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    gw = _spawn(["gateway", "--model", model, "--port", str(port), "--tls", "auto", "--codec", "f32", "--ctx", "512",
                 "--max-seqs", "4", "--join-settle", "2"], tmp_path / "gw.log", tmp_path / "gwcache")
    stages = []
    try:
        for i in range(2):
            stages.append(_spawn(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--tls", "auto",
                                  "--max-memory", "70MiB", "--name", f"t{i}", "--threads", "1", "--flash-attn", "off"],
                                 tmp_path / f"stage{i}.log", tmp_path / f"c{i}"))

        def healthy() -> bool:
            try:
                return http("GET", url + "/health", timeout=2)[0] == 200
            except OSError:
                return False
        try:
            _wait_for(healthy, 180, "the joined TLS cluster")
        except AssertionError:
            raise AssertionError("\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log")))
        st = http("GET", url + "/v1/stats")[1]
        assert len(st["placement"][0]["pipelines"][0]["stages"]) == 2
        prompts = ([1, 5, 9, 200, 31],)
        for prompt, want in zip(prompts, whole_model_greedy_texts(model, prompts, 10)):
            status, body = http("POST", url + "/v1/completions",
                                {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
            assert status == 200, body
            assert body["choices"][0]["text"] == want
        assert "wrong or missing cluster secret" not in (tmp_path / "gw.log").read_text(errors="replace")
    finally:
        stop_processes(stages + [gw])
