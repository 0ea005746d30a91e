"""Vision-language models split (issue 30; Qwen2-VL, Qwen2.5-VL, Gemma 3): the first stage holds the projector (``--mmproj``), an image sent as
a ``data:`` URL through ``/v1/chat/completions`` on a 2-stage split gives the whole model's logits bit for bit.

The whole model is llama.cpp's own multimodal path: mtmd's helper (``mtmd_helper_eval_chunks``) evaluates the same
prompt text with the same image on one whole-model context; greedy decoding goes on there. The split's first
generated tokens' logprobs (log-softmax of the logits, top 5) must equal that reference's exactly, token after token.

Pure logic first (image headers, data URLs, the prompt's layout and positions, the step frame's new fields), then
real stage processes and a real gateway.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401,I001 - before numpy

import base64
import ctypes
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from molink_lite.wire.media import MediaLayout, media_id, plan_media, sniff_image
from molink_lite.wire.protocol import FrameLimits, ProtocolError, StepError, StepFrame

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testmmproj import png_bytes as png, random_image  # noqa: E402

N_EMBD = 64
SIDE = 56


def image(seed: int = 1, side: int = SIDE) -> np.ndarray:
    return random_image(side, side, seed)


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode()


# ---------------------------------------------------------------- pure logic
def test_image_headers_are_read_and_oversized_or_unknown_ones_refused():
    assert sniff_image(png(image())) == ("PNG", SIDE, SIDE)
    huge = bytearray(png(image()))
    huge[16:24] = struct.pack(">II", 100000, 100000)   # a small file claiming 10^10 pixels
    with pytest.raises(ProtocolError, match="at most"):
        sniff_image(bytes(huge))
    for bad in (b"", b"hello world", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF"):
        with pytest.raises(ProtocolError):
            sniff_image(bad)
    gif = b"GIF89a" + struct.pack("<HH", 7, 9) + b"\x00" * 8
    assert sniff_image(gif) == ("GIF", 7, 9)
    jpeg = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 4) + b"ab" + b"\xff\xc0" + struct.pack(">HBHH", 11, 8, 30, 40)
    assert sniff_image(jpeg) == ("JPEG", 40, 30)


@pytest.mark.parametrize("url, message", [
    ("data:text/plain;base64,aGk=", "data:image"),
    ("data:image/png,rawbytes", "data:image"),
    ("data:image/png;base64,@@@", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not PNG"),
    ("http://example.invalid/cat.png", "--allow-image-urls"),
    ("file:///etc/passwd", "data: URL"),
])
def test_image_urls_are_refused_with_reasons(url, message):
    import asyncio

    from molink_lite.serving.images import ImageError, load_image

    with pytest.raises(ImageError, match=message):
        asyncio.run(load_image(url))


def test_an_image_over_the_size_limit_is_refused_before_decoding():
    import asyncio

    from molink_lite.serving.images import ImageError, load_image

    with pytest.raises(ImageError, match="larger than"):
        asyncio.run(load_image(data_url(png(image())), max_bytes=100))
    assert asyncio.run(load_image(data_url(png(image())))) == png(image())


def _layout(rows: int = 4, nx: int = 2) -> MediaLayout:
    ny = rows // nx
    rel = np.array([(0, y, x, 0) for y in range(ny) for x in range(nx)], np.int32)
    return MediaLayout("ab" * 16, (7,), rows, max(nx, ny), rel, (8,))


def test_a_prompt_with_an_image_lays_out_rows_and_mrope_positions_as_mtmd():
    tokens, plan = plan_media([np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)], [_layout()], mrope=True)
    # text 1 2 3, vision_start 7, 4 image rows, vision_end 8, text 4 5
    assert tokens.tolist() == [1, 2, 3, 7, -1, -1, -1, -1, 8, 4, 5]
    assert plan.spans == ((4, 8),)
    # the image starts at position 4: (t, y, x) = (4, 4 + y, 4 + x); the text after it goes on at 4 + max(nx, ny)
    assert plan.mpos[4:8].tolist() == [[4, 4, 4, 0], [4, 4, 5, 0], [4, 5, 4, 0], [4, 5, 5, 0]]
    assert plan.mpos[8].tolist() == [6, 6, 6, 0] and plan.mpos[10].tolist() == [8, 8, 8, 0]
    assert plan.shift == 9 - 11
    # generated rows (index 11, 12) sit at their index + shift
    assert plan.positions(10, 13).tolist() == [[8, 8, 8, 0], [9, 9, 9, 0], [10, 10, 10, 0]]
    # steps cut at the image and take it whole or not at all
    assert plan.cut(0, 100) == 4 and plan.cut(2, 1) == 1
    assert plan.cut(4, 100) == 4 and plan.cut(4, 3) == 0
    assert plan.cut(8, 100) == 100
    assert plan.images_in(4, 8) == ["ab" * 16] and plan.images_in(0, 4) == []
    # without M-RoPE the image rows take one position each
    _, flat = plan_media([np.array([1], np.int32), np.zeros(0, np.int32)], [_layout()], mrope=False)
    assert flat.mpos[:, 0].tolist() == list(range(7)) and flat.shift == 0


LIM = FrameLimits(n_seq_max=4, n_ctx=64, max_rows=32, n_vocab=100, n_embd_inp=4, is_first=True, is_last=False,
                  mrope=True)


def _frame(**kw) -> StepFrame:
    base = dict(step=1, seq=np.zeros(4, np.int32), pos=np.arange(4, dtype=np.int32),
                tokens=np.array([5, -1, -1, 6], np.int32), media={0: ("ab" * 16,)},
                mpos=np.array([[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 2, 0], [3, 3, 3, 0]], np.int32))
    base.update(kw)
    return StepFrame(**base)


def test_step_frames_carry_images_and_positions_and_refuse_misuse():
    f = StepFrame.decode(*_frame().to_wire(), LIM)
    assert f.media == {0: ("ab" * 16,)} and f.mpos.tolist()[2] == [1, 1, 2, 0]
    assert f.forward(np.zeros((4, 4), np.float32)).media == {}
    bad = [
        (dict(media={}), "-1: an image"),
        (dict(tokens=np.array([5, -2, -1, 6], np.int32)), "-1: an image"),
        (dict(media={0: ("xyz",)}), "image ids"),
        (dict(mpos=np.zeros((3, 4), np.int32)), "mpos"),
        (dict(mpos=np.full((4, 4), -1, np.int32)), "outside"),
        (dict(ring={0: (2, True)}, out=np.array([0, 0, 0, 1], bool)), "may not ring"),
    ]
    for change, message in bad:
        with pytest.raises(StepError, match=message):
            StepFrame.decode(*_frame(**change).to_wire(), LIM)
    with pytest.raises(StepError, match="M-RoPE"):
        StepFrame.decode(*_frame().to_wire(), FrameLimits(**{**LIM.__dict__, "mrope": False}))
    later = FrameLimits(**{**LIM.__dict__, "is_first": False})
    meta, arrays = _frame().to_wire()
    arrays.pop("tokens")
    arrays["hidden"] = np.zeros((4, 4), np.float32)
    with pytest.raises(StepError, match="first stage only"):
        StepFrame.decode(meta, arrays, later)


def test_media_ids_are_content_hashes():
    assert media_id(b"x") == media_id(b"x") != media_id(b"y") and len(media_id(b"x")) == 32


# ---------------------------------------------------------------- real stages, real gateway
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
STAGE_ARGS = ["--threads", "1", "--ctx", "512", "--max-seqs", "4", "--codec", "f32", "--flash-attn", "off"]
N_GEN = 6
TOP = 5


@pytest.fixture(scope="module", params=["qwen2vl", "qwen25vl", "gemma3"])
def vl_model(request, tmp_path_factory):
    """(text model, projector, chat template, image side, layers): Qwen2-VL (56 px: 2x2 tokens, M-RoPE), Qwen2.5-VL
    (windowed attention; 112 px: 4x4 tokens) or Gemma 3 (4 tokens a image, attending to each other both ways;
    6 layers, so that the last one attends globally past the 8-token sliding window of the random model)."""
    from testmmproj import write_random_mmproj
    from testmodels import write_random_gguf

    v = request.param
    d = tmp_path_factory.mktemp(v)
    side = 2 * SIDE if v == "qwen25vl" else SIDE
    n_layer = 6 if v == "gemma3" else 4
    text = write_random_gguf(str(d / "text.gguf"), "gemma3" if v == "gemma3" else "qwen2vl", n_layer=n_layer,
                             n_embd=N_EMBD, n_head=4, n_vocab=256)
    proj = write_random_mmproj(str(d / "mmproj.gguf"), N_EMBD, n_embd=32, n_layer=2, n_head=2, image_size=side,
                               patch_size=14, variant=v)
    (d / "template.jinja").write_text(TEMPLATE)
    return str(text), str(proj), str(d / "template.jinja"), side, n_layer


def whole_model_reference(text: str, proj: str, prompt: str, img: bytes, n_gen: int, min_tokens: int = 4,
                          add_special: bool = False):
    """mtmd's own evaluation of the whole model: (prompt rows, [(top ids, top logprobs, chosen)] per token)."""
    from llama_cpp import mtmd_cpp as mtmd

    from molink_lite.stage.engine import StageEngine
    from molink_lite.stage.sampling import log_softmax_top

    whole = StageEngine(text, n_ctx=512, n_seq_max=1, n_threads=1, flash_attn=False)
    mp = mtmd.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.print_timings, mp.warmup = False, 1, False, False
    mp.image_min_tokens = min_tokens
    mctx = mtmd.mtmd_init_from_file(proj.encode(), whole.model_ptr, mp)
    assert mctx
    out = []
    try:
        buf = (ctypes.c_uint8 * len(img)).from_buffer_copy(img)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(mctx, buf, len(img), False)
        p = prompt.encode()
        txt = mtmd.mtmd_input_text(p, len(p), add_special, True)   # a Jinja template writes BOS itself
        chunks = mtmd.mtmd_input_chunks_init()
        assert mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(txt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        n_rows = mtmd.mtmd_helper_get_n_tokens(chunks)
        n_past = llama_cpp.llama_pos(0)
        lctx = whole._lanes[0].ctx
        assert mtmd.mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(256,)).copy()
        pos = n_past.value
        for i in range(n_gen):
            tok = int(np.argmax(logits))
            _, ids, lps = log_softmax_top(logits[None, :], np.array([0]), np.array([tok]), np.array([TOP]), TOP)
            out.append((ids[0].tolist(), lps[0].tolist(), tok))
            if i == n_gen - 1:
                break
            logits = whole.forward(np.zeros(1, np.int32), np.array([pos], np.int32), tokens=np.array([tok], np.int32),
                                   output_rows=np.ones(1, bool))[0].copy()
            pos += 1
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(mctx)
        whole.close()
    return n_rows, out


def _served(text, proj, template, workdir: Path, n_layer: int, gateway_extra=()):
    from serving import GatewayProcess

    from molink_lite.model.split import LayerRange
    from molink_lite.serving.launcher import start_stages, stop_stages

    for sub in ("a", "b"):
        (workdir / sub).mkdir(exist_ok=True)
    h = n_layer // 2
    first = start_stages(text, [LayerRange(0, h)], extra_args=[*STAGE_ARGS, "--mmproj", proj,
                                                               "--image-min-tokens", "4"], workdir=str(workdir / "a"))
    rest = start_stages(text, [LayerRange(h, n_layer)], extra_args=STAGE_ARGS, workdir=str(workdir / "b"))
    gw = GatewayProcess([[first[0].url, rest[0].url]], extra=["--chat-template", template, "--ring", "off", "--codec", "f32",
                                                              *gateway_extra], log_dir=workdir)

    def stop():
        gw.stop()
        stop_stages(first + rest)
    try:
        gw.wait_ready()
    except BaseException:
        stop()
        raise
    return gw, stop


def _chat(url: str, content, **kw):
    from serving import http

    body = {"messages": [{"role": "user", "content": content}], "max_tokens": N_GEN, "temperature": 0,
            "logprobs": True, "top_logprobs": TOP, **kw}
    return http("POST", url + "/v1/chat/completions", body)


def _look_at(img: bytes) -> list:
    """The test's user message: text, the image as a data URL, text (the template renders it as LOOK_PROMPT)."""
    return [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": data_url(img)}},
            {"type": "text", "text": " describe it."}]


LOOK_PROMPT = "user: look: <__media__> describe it.\nassistant:"   # TEMPLATE's rendering of _look_at


def test_an_image_through_the_api_on_a_two_stage_split_equals_the_whole_model(vl_model, tmp_path):
    text, proj, template, side, n_layer = vl_model
    img = png(image(side=side))
    gw, stop = _served(text, proj, template, tmp_path, n_layer)
    try:
        content = _look_at(img)
        status, r = _chat(gw.url, content)
        assert status == 200, r
        n_rows, want = whole_model_reference(text, proj, LOOK_PROMPT, img, N_GEN)
        assert r["usage"]["prompt_tokens"] == n_rows
        got = r["choices"][0]["logprobs"]["content"]
        assert len(got) == N_GEN
        for i, (g, (ids, lps, tok)) in enumerate(zip(got, want)):
            assert [t["logprob"] for t in g["top_logprobs"]] == [float(np.float32(x)) for x in lps], i
            assert g["logprob"] == float(np.float32(lps[0])), i
        # the same image again is not encoded again (the first stage keeps it); a different one changes the answer
        status2, r2 = _chat(gw.url, content)
        assert status2 == 200 and r2["choices"][0]["message"] == r["choices"][0]["message"]
        other = [content[0], {"type": "image_url", "image_url": {"url": data_url(png(image(9, side)))}}, content[2]]
        status3, r3 = _chat(gw.url, other)
        assert status3 == 200
        assert ([t["logprob"] for t in r3["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
                != [t["logprob"] for t in got[0]["top_logprobs"]])
        # refusals: a remote URL without --allow-image-urls, garbage, n > 1, an image in a system message
        for bad, message in (
                ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}], "allow-image-urls"),
                ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "not PNG"),
                ([{"type": "text", "text": "<__media__>"}, content[1]], "marker")):
            status, r = _chat(gw.url, bad)
            assert status == 400 and message in r["error"]["message"], r
        status, r = _chat(gw.url, content, n=2)
        assert status == 400 and "n > 1" in r["error"]["message"]
        # text-only requests still work on the same pipeline
        status, r = _chat(gw.url, "hello there")
        assert status == 200 and r["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        stop()


def test_a_model_without_a_projector_refuses_images_clearly(vl_model, tmp_path):
    from serving import GatewayProcess, http

    from molink_lite.model.split import LayerRange
    from molink_lite.serving.launcher import start_stages, stop_stages

    text, _, template, _, n_layer = vl_model
    procs = start_stages(text, [LayerRange(0, n_layer)], extra_args=STAGE_ARGS, workdir=str(tmp_path))
    gw = GatewayProcess([[procs[0].url]], extra=["--chat-template", template], log_dir=tmp_path)
    try:
        gw.wait_ready()
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png(image()))}}]}], "max_tokens": 2}
        status, r = http("POST", gw.url + "/v1/chat/completions", body)
        assert status == 400 and "--mmproj" in r["error"]["message"], r
    finally:
        gw.stop()
        stop_stages(procs)


def test_the_first_stage_checks_a_steps_images_against_its_store(vl_model):
    """A step naming an image the stage does not hold (never sent, evicted), or the wrong number of image rows, is
    rejected before anything runs; a stage without a projector takes no images at all."""
    from molink_lite.stage.engine import StageEngine
    from molink_lite.stage.runner import StepRunner
    from molink_lite.stage.vision import MediaStore

    if vl_model[4] != 4 or vl_model[3] != SIDE:
        pytest.skip("checked once, on the Qwen2-VL model")
    text = vl_model[0]
    eng = StageEngine(text, n_ctx=256, n_seq_max=2, n_threads=1, flash_attn=False)
    try:
        r = StepRunner(eng, None, {}, codec="f32", deliver=lambda *a: None, report=lambda *a: None)
        assert r.limits.mrope
        mid = "cd" * 16
        frame = StepFrame(1, np.zeros(4, np.int32), np.arange(4, dtype=np.int32),
                          tokens=np.array([3, -1, -1, 4], np.int32), media={0: (mid,)},
                          mpos=np.array([[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 2, 0], [2, 2, 2, 0]], np.int32))
        meta, arrays = frame.to_wire()
        with pytest.raises(StepError, match="no vision projector"):
            r.check(meta, arrays)
        r.media = MediaStore(1 << 20)
        with pytest.raises(StepError, match="not on this stage"):
            r.check(meta, arrays)
        rel = np.array([[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]], np.int32)
        r.media.put(MediaLayout(mid, (), 3, 2, rel, ()), np.zeros((3, N_EMBD), np.float32))
        with pytest.raises(StepError, match="2 image rows"):
            r.check(meta, arrays)
        r.media.put(MediaLayout(mid, (), 2, 2, rel[:2], ()), np.ones((2, N_EMBD), np.float32))
        got = r.check(meta, arrays)
        out = r._forward_media(got)   # the whole model here: logits of the last row
        assert out.shape == (1, 256) and np.isfinite(out).all()
        # the store keeps at most its budget: the oldest image goes first
        small = MediaStore(3 * N_EMBD * 4)
        for i in range(3):
            small.put(MediaLayout(f"{i:032x}", (), 2, 2, rel[:2], ()), np.zeros((2, N_EMBD), np.float32))
        assert small.layout(f"{0:032x}") is None and small.layout(f"{2:032x}") is not None
        assert small.stats["images_evicted"] == 2
    finally:
        eng.close()


def test_a_stage_refuses_a_projector_it_cannot_serve(vl_model, tmp_path):
    """``--mmproj`` on a later stage, a projector type not tested here, a file that is not there: one line, exit 2."""
    import subprocess

    if vl_model[4] != 4 or vl_model[3] != SIDE:
        pytest.skip("checked once, on the Qwen2-VL model")
    text, proj = vl_model[0], vl_model[1]
    other = tmp_path / "other.gguf"
    other.write_bytes(Path(proj).read_bytes().replace(b"qwen2vl_merger", b"qwen9vl_merger"))
    for layers, mm, message in (("2-3", proj, "goes to the first stage"),
                                ("0-1", str(other), "qwen9vl_merger: images are refused"),
                                ("0-1", str(tmp_path / "none.gguf"), "not a readable GGUF")):
        p = subprocess.run([sys.executable, "-m", "molink_lite.cli", "stage", "--model", text, "--layers", layers,
                            "--mmproj", mm, "--port", "0", "--host", "127.0.0.1", "--threads", "1"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], p.stderr[-500:]


def test_remote_image_urls_are_fetched_only_when_allowed_within_limits():
    """``--allow-image-urls``: an http(s) image is fetched (real HTTP), but not one over the size limit, one that
    does not arrive in time, an error status or something that is not an image."""
    import asyncio

    from aiohttp import web

    from molink_lite.serving.images import ImageError, load_image

    img = png(image())

    async def main():
        async def ok(_):
            return web.Response(body=img, content_type="image/png")

        async def slow(_):
            await asyncio.sleep(1.5)
            return web.Response(body=img)

        async def chunked(request):   # no Content-Length: the size limit applies while reading
            r = web.StreamResponse()
            await r.prepare(request)
            for _ in range(64):
                await r.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4096)
            return r

        async def moved(_):
            raise web.HTTPFound("/ok.png")

        app = web.Application()
        app.add_routes([web.get("/ok.png", ok), web.get("/slow.png", slow), web.get("/big.png", chunked),
                        web.get("/text", lambda _: web.Response(text="hello")),
                        web.get("/gone", lambda _: web.Response(status=404)), web.get("/moved", moved)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            with pytest.raises(ImageError, match="--allow-image-urls"):
                await load_image(base + "/ok.png")
            # the gateway is no door into its own network: loopback, private and link-local hosts are refused
            port = base.rsplit(":", 1)[1]
            for where in (base, f"http://localhost:{port}", "http://10.1.2.3", "http://169.254.169.254",
                          "http://[::1]:9", "http://192.168.0.1"):
                with pytest.raises(ImageError, match="non-public"):
                    await load_image(where + "/ok.png", allow_remote=True, timeout=2)
            # (the test server is on loopback: the rest of the checks allow that)
            assert await load_image(base + "/ok.png", allow_remote=True, allow_private=True) == img
            for path, message in (("/slow.png", "longer than"), ("/big.png", "larger than"),
                                  ("/text", "not PNG"), ("/gone", "HTTP 404"), ("/moved", "redirect")):
                with pytest.raises(ImageError, match=message):
                    await load_image(base + path, allow_remote=True, max_bytes=64 << 10, timeout=0.5,
                                     allow_private=True)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_requests_with_images_survive_a_killed_first_stage(vl_model, tmp_path):
    """Two replica pipelines, each first stage with the projector: the first stage of one is killed (-9) while
    requests with images decode; every request ends complete, the lost ones replayed on the other pipeline (which
    is sent their images first)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serving import GatewayProcess, http

    from molink_lite.model.split import LayerRange
    from molink_lite.serving.launcher import start_stages, stop_stages

    if vl_model[4] != 4 or vl_model[3] != SIDE:
        pytest.skip("checked once, on the Qwen2-VL model")
    text, proj, template = vl_model[:3]
    chains = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            args = [*STAGE_ARGS, "--ctx", "4096"]
            first = start_stages(text, [LayerRange(0, 2)], extra_args=[*args, "--mmproj", proj,
                                                                       "--image-min-tokens", "4"],
                                 workdir=str(tmp_path / name))
            (tmp_path / (name + "2")).mkdir()
            chains.append(first + start_stages(text, [LayerRange(2, 4)], extra_args=args,
                                               workdir=str(tmp_path / (name + "2"))))
        gw = GatewayProcess([[sp.url for sp in c] for c in chains],
                            extra=["--chat-template", template, "--codec", "f32", "--ring", "off"], log_dir=tmp_path)
        try:
            gw.wait_ready()

            def ask(i: int):
                content = [{"type": "text", "text": f"picture {i}: "},
                           {"type": "image_url", "image_url": {"url": data_url(png(image(20 + i)))}}]
                return http("POST", gw.url + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": content}], "max_tokens": 400,
                             "temperature": 0, "ignore_eos": True}, timeout=300)

            with ThreadPoolExecutor(4) as pool:
                futs = [pool.submit(ask, i) for i in range(4)]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:   # until pipeline A runs requests with images
                    _, st = http("GET", gw.url + "/v1/stats", timeout=30)
                    if st["pipelines"][0].get("running"):
                        break
                    time.sleep(0.05)
                chains[0][0].proc.kill()   # the first stage (with the projector) of pipeline A
                results = [f.result(300) for f in futs]
            for status, r in results:
                assert status == 200, r
                assert r["usage"]["completion_tokens"] == 400 and r["choices"][0]["finish_reason"] == "length"
            status, st = http("GET", gw.url + "/v1/stats", timeout=30)
            assert st["router"]["replayed"] >= 1, st["router"]
        finally:
            gw.stop()
    finally:
        stop_stages([sp for c in chains for sp in c])


def test_a_joined_first_stage_fetches_the_projector_from_the_gateway(vl_model, tmp_path):
    """Join mode: ``gateway --model M --mmproj P``; the stage given layer 0 downloads the projector next to its
    layers (verified like them) and serves images; placement counts the projector's memory."""
    from serving import free_port, http, spawn_cli, stop_processes, wait_healthy

    from molink_lite.wire.auth import new_secret

    if vl_model[4] != 4 or vl_model[3] != SIDE:
        pytest.skip("checked once, on the Qwen2-VL model")
    text, proj, template = vl_model[:3]
    env = {"MOLINK_SECRET": new_secret()}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = spawn_cli(["gateway", "--model", text, "--mmproj", proj, "--port", str(port), "--codec", "f32", "--ctx",
                    "512", "--max-seqs", "4", "--join-settle", "1", "--chat-template", template, "--ring", "off"],
                   tmp_path / "gateway.log", {**env, "MOLINK_CACHE": str(tmp_path / "gwcache")})
    cache = tmp_path / "cache"
    cache.mkdir()
    stage = spawn_cli(["stage", "--join", url, "--host", "127.0.0.1", "--port", "0", "--max-memory", "2GB",
                       "--name", "h0", "--threads", "1", "--flash-attn", "off", "--image-min-tokens", "4"],
                      tmp_path / "stage.log", {**env, "MOLINK_CACHE": str(cache)})
    try:
        wait_healthy(url, gw, 180)
        fetched = [f for f in cache.rglob("*") if f.is_file() and f.read_bytes() == Path(proj).read_bytes()]
        assert fetched, "the projector is not in the stage's cache"
        img = png(image())
        content = _look_at(img)
        status, r = _chat(url, content)
        assert status == 200, r
        n_rows, want = whole_model_reference(text, proj, LOOK_PROMPT, img, N_GEN)
        got = r["choices"][0]["logprobs"]["content"]
        assert [t["logprob"] for t in got[0]["top_logprobs"]] == [float(np.float32(x)) for x in want[0][1]]
        _, st = http("GET", url + "/v1/stats", timeout=30)
        assert st["placement"][0]["vision_bytes"] > Path(proj).stat().st_size
    finally:
        stop_processes([stage, gw])
    # a joined stage given --mmproj itself is told where the projector comes from
    p = __import__("subprocess").run([sys.executable, "-m", "molink_lite.cli", "stage", "--join", url, "--mmproj",
                                      proj], capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert p.returncode == 2 and "gateway --mmproj" in p.stderr




@pytest.mark.parametrize("mm, message", [
    ("x", "bad 'mmproj'"),
    ({"file": "../../etc/passwd", "size": 10, "sha256": "0" * 64}, "plain file name"),
    ({"file": "/abs.gguf", "size": 10, "sha256": "0" * 64}, "plain file name"),
    ({"file": "p.gguf", "size": -1, "sha256": "0" * 64}, "bad file size"),
    ({"file": "p.gguf", "size": 10, "sha256": "zz"}, "bad sha256"),
    ({"file": "layers.gguf", "size": 10, "sha256": "0" * 64}, "as the layer file"),
])
def test_a_joined_stage_refuses_a_hostile_projector_assignment(tmp_path, mm, message):
    """What the gateway says of the projector is checked before anything is written or asked for."""
    import asyncio

    from molink_lite.stage.join import JoinError, Membership

    m = Membership("http://127.0.0.1:9", None, tmp_path)
    assign = {"fingerprint": "f" * 16, "file": "layers.gguf", "size": 10, "sha256": "0" * 64, "layers": "0-1",
              "mmproj": mm}
    with pytest.raises(JoinError, match=message):
        asyncio.run(m.fetch_projector(assign))
    assert not any(tmp_path.rglob("*.gguf*"))


def test_serve_with_a_projector_gives_it_to_the_first_stage_only(vl_model, tmp_path):
    """``molink-lite serve --model M --mmproj P --stages 2``: the first of its stage processes holds the projector
    (a later one would refuse it), and the answer to an image equals the whole model's."""
    from serving import free_port, spawn_cli, stop_processes, wait_healthy

    if vl_model[4] != 4 or vl_model[3] != SIDE:
        pytest.skip("checked once, on the Qwen2-VL model")
    text, proj, template = vl_model[:3]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = spawn_cli(["serve", "--model", text, "--mmproj", proj, "--image-min-tokens", "4", "--stages", "2", "--port",
                   str(port), "--threads", "1", "--codec", "f32", "--flash-attn", "off", "--ctx", "512", "--max-seqs",
                   "4", "--ring", "off"], tmp_path / "serve.log", {})
    try:
        assert wait_healthy(url, p, 180), (tmp_path / "serve.log").read_text()[-3000:]
        img = png(image())
        content = _look_at(img)
        status, r = _chat(url, content)
        assert status == 200, r
        # the model has no template: the gateway uses llama.cpp's built-in one for the architecture, as here
        from molink_lite.serving.chat import render_chat

        cp = render_chat([{"role": "user", "content": "look: <__media__> describe it."}], template=None, arch="qwen2vl")
        _, want = whole_model_reference(text, proj, cp.text, img, N_GEN, add_special=cp.add_special)
        got = r["choices"][0]["logprobs"]["content"]
        assert [t["logprob"] for t in got[0]["top_logprobs"]] == [float(np.float32(x)) for x in want[0][1]]
    finally:
        stop_processes([p])


def test_media_frames_from_the_wire_are_checked_both_ways():
    """What a gateway sends a first stage (``MediaPut``) and what a stage answers (``MediaLayout``) are checked
    before anything is decoded or believed."""
    from molink_lite.wire.media import MediaPut

    img = png(image())
    meta, arrays = MediaPut(img).to_wire()
    assert meta["type"] == "media" and MediaPut.decode(arrays, 1 << 20).data == img
    for bad, message in ((np.frombuffer(img, np.uint8).astype(np.int16), "uint8"),
                         (np.frombuffer(img, np.uint8).reshape(1, -1), "1-D"),
                         (np.zeros(8, np.uint8), "not PNG")):
        with pytest.raises(ProtocolError, match=message):
            MediaPut.decode({"data": bad}, 1 << 20)
    with pytest.raises(ProtocolError, match="at most 100"):
        MediaPut.decode(arrays, 100)
    with pytest.raises(ProtocolError, match="uint8"):
        MediaPut.decode({}, 1 << 20)
    good = _layout().to_wire()
    assert MediaLayout.decode(good, 100).rows == 4
    for change, message in (({"id": "x"}, "id"), ({"rows": 0}, "rows"), ({"rows": True}, "rows"),
                            ({"n_pos": 9}, "n_pos"), ({"rel": [0] * 15}, "rel"), ({"rel": [-1] * 16}, "rel"),
                            ({"before": [100]}, "before"), ({"after": [0] * 17}, "after"),
                            ({"before": "abc"}, "before")):
        with pytest.raises(ProtocolError, match=message):
            MediaLayout.decode({**good, **change}, 100)
