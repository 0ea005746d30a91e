"""Every message after the handshake is sealed (issue 23): a man in the middle that passes the handshake
through can neither read nor inject, alter, replay or reorder a single message. Real WebSockets, one process."""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
import pytest
import websockets

from molink_lite.wire import auth
from molink_lite.wire.auth import LinkKey, SealError
from molink_lite.wire.channel import Channel
from molink_lite.wire.codec import encode_frame

from mitm import PassThroughMITM, closed_by

KEY = LinkKey.from_secret("k" * 64)


async def _echo_server(key=KEY):
    """Authenticates, then echoes every message back through its (sealed) link; records how each link ended."""
    ends = []

    async def handler(ws):
        role, link = await auth.server_handshake(ws, key, "", timeout=5)
        try:
            async for m in link:
                await link.send(m)
            ends.append("closed")
        except SealError as e:
            ends.append(f"sealerror: {e}")

    srv = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
    return srv, next(iter(srv.sockets)).getsockname()[1], ends


def run(coro):
    return asyncio.run(coro)


def test_sealed_messages_round_trip_and_are_opaque_on_the_wire():
    secret_text, secret_bytes = "the model path is /srv/models/x.gguf", os.urandom(1 << 16)

    async def main():
        srv, port, _ = await _echo_server()
        mitm = await PassThroughMITM(f"ws://127.0.0.1:{port}").start()  # an eavesdropper relaying everything
        link = await auth.connect(mitm.url, KEY, "gateway", max_size=1 << 20)
        assert isinstance(link, auth.SealedLink)
        for m in (secret_text, secret_bytes, b"", ""):
            await link.send(m)
            back = await link.recv()
            assert back == m and type(back) is type(m)
        await link.close()
        await mitm.close()
        srv.close()
        return mitm.seen

    seen = run(main())
    after = seen[3:]  # past the three handshake messages
    assert after and all(isinstance(m, bytes) for m in after)
    assert not any(secret_text.encode() in m or secret_bytes[:64] in m for m in after)


@pytest.mark.parametrize("attack", ["inject_text", "inject_frame", "forged_sealed", "tamper", "replay", "reorder"])
def test_a_pass_through_man_in_the_middle_cannot_inject_alter_replay_or_reorder(attack, caplog):
    """The proxy relays the handshake, then acts on the client's behalf towards the server."""

    async def act(client, server, log):
        if attack == "inject_text":
            await server.send('{"type": "hello"}')
        elif attack == "inject_frame":
            await server.send(encode_frame({"type": "hello", "rid": 1}))
        elif attack == "forged_sealed":
            await server.send(b"\x00" + os.urandom(64))
        else:
            first = await client.recv()   # a genuine sealed message from the client
            second = await client.recv()
            if attack == "tamper":
                bad = bytearray(first)
                bad[-20] ^= 1
                await server.send(bytes(bad))
            elif attack == "replay":
                await server.send(first)
                await server.send(first)
            else:  # reorder
                await server.send(second)
                await server.send(first)
        log.append(f"server closed with {await closed_by(server)}")
        await client.close()

    async def main():
        srv, port, ends = await _echo_server()
        mitm = await PassThroughMITM(f"ws://127.0.0.1:{port}", attack=act).start()
        link = await auth.connect(mitm.url, KEY, "gateway", max_size=1 << 20)
        for m in (b"one", b"two"):
            await link.send(m)
        await asyncio.sleep(0.5)
        await link.close()
        await mitm.close()
        srv.close()
        return ends, mitm.log

    with caplog.at_level(logging.WARNING, logger="molink_lite.wire.auth"):
        ends, log = run(main())
    assert ends and ends[0].startswith("sealerror"), ends
    assert f"server closed with {auth.CLOSE_AUTH}" in log, log
    assert "failed authentication" in caplog.text or "unsealed message" in caplog.text


def test_a_channel_over_a_sealed_link_drops_the_link_on_an_injected_frame():
    """What a stage sees: the Channel ends (no handler call) when a forged frame arrives."""
    handled = []

    async def main():
        done = asyncio.Event()

        async def handler(ws):
            _, link = await auth.server_handshake(ws, KEY, "", timeout=5)
            ch = Channel(link, name="victim")

            async def on(c, meta, arrays):
                handled.append(meta)
            await ch.serve(on)
            handled.append(("closed", ch.close_reason))
            done.set()

        srv = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
        port = next(iter(srv.sockets)).getsockname()[1]

        async def act(client, server, log):
            await server.send(encode_frame({"type": "configure", "next": "ws://evil:1"}, {"x": np.zeros(4)}))
            await closed_by(server)

        mitm = await PassThroughMITM(f"ws://127.0.0.1:{port}", attack=act).start()
        link = await auth.connect(mitm.url, KEY, "gateway", max_size=1 << 20)
        await asyncio.wait_for(done.wait(), 10)
        await link.close()
        await mitm.close()
        srv.close()

    run(main())
    assert len(handled) == 1 and handled[0][0] == "closed" and "sealed link" in handled[0][1], handled


def test_without_a_secret_there_is_no_seal():
    async def main():
        srv, port, _ = await _echo_server(key=None)
        link = await auth.connect(f"ws://127.0.0.1:{port}", None, "gateway", max_size=1 << 20)
        assert not isinstance(link, auth.SealedLink)
        await link.close()
        srv.close()
    run(main())


def test_session_keys_differ_per_link_and_direction():
    ns, nc = os.urandom(32), os.urandom(32)
    a = KEY.session(ns, nc, "gateway", "")
    assert a[0] != a[1]
    assert KEY.session(ns, os.urandom(32), "gateway", "") != a
    assert KEY.session(ns, nc, "upstream", "") != a
    assert KEY.session(ns, nc, "gateway", "f" * 64) != a
    assert LinkKey.from_secret("z" * 64).session(ns, nc, "gateway", "") != a
