"""The cluster-secret handshake and TLS pinning, over real WebSockets in one process."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from molink_lite.wire import auth
from molink_lite.wire.auth import AuthError, LinkKey
from molink_lite.wire.tls import client_context, fingerprint_file, self_signed, server_context

KEY = LinkKey.from_secret("a" * 64)
OTHER = LinkKey.from_secret("b" * 64)


async def _server(key, cert_fp="", ssl_ctx=None):
    """A server that runs the handshake and records its outcome per connection."""
    results = []

    async def handler(ws):
        try:
            role, link = await auth.server_handshake(ws, key, cert_fp, timeout=5)
            results.append(("ok", role))
            await link.send("welcome")
        except AuthError as e:
            results.append(("refused", str(e)))
            await ws.close(auth.CLOSE_AUTH, f"authentication failed: {e}"[:120])

    srv = await websockets.serve(handler, "127.0.0.1", 0, ssl=ssl_ctx)
    port = next(iter(srv.sockets)).getsockname()[1]
    return srv, port, results


def run(coro):
    return asyncio.run(coro)


def test_matching_secrets_authenticate_both_ways():
    async def main():
        srv, port, results = await _server(KEY)
        ws = await auth.connect(f"ws://127.0.0.1:{port}", KEY, "gateway", max_size=1 << 20)
        assert await ws.recv() == "welcome"
        await ws.close()
        srv.close()
        return results
    assert run(main()) == [("ok", "gateway")]


@pytest.mark.parametrize("server_key,client_key,client_msg,server_msg", [
    (KEY, OTHER, "closed the connection", "wrong or missing cluster secret"),
    (KEY, None, "requires the cluster secret", None),
    (None, KEY, "has no cluster secret", None),
])
def test_mismatched_secrets_are_refused_with_a_clear_reason(server_key, client_key, client_msg, server_msg):
    async def main():
        srv, port, results = await _server(server_key)
        with pytest.raises(AuthError, match=client_msg):
            await auth.connect(f"ws://127.0.0.1:{port}", client_key, "gateway", max_size=1 << 20)
        await asyncio.sleep(0.2)
        srv.close()
        return results
    results = run(main())
    if server_msg:
        assert results and results[0][0] == "refused" and server_msg in results[0][1]
    assert not any(r[0] == "ok" for r in results)


def test_the_secret_never_crosses_the_wire():
    secret = "s3cr3t-" + "x" * 40
    seen = []

    async def main():
        key = LinkKey.from_secret(secret)

        async def handler(ws):
            orig_recv = ws.recv

            async def recv():
                m = await orig_recv()
                seen.append(m)
                return m
            ws.recv = recv
            await auth.server_handshake(ws, key, "", timeout=5)
        srv = await websockets.serve(handler, "127.0.0.1", 0)
        port = next(iter(srv.sockets)).getsockname()[1]
        ws = await auth.connect(f"ws://127.0.0.1:{port}", key, "upstream", max_size=1 << 20)
        await ws.close()
        srv.close()
    run(main())
    assert seen and not any(secret in m or key_hex(secret) in m for m in seen)


def key_hex(secret: str) -> str:
    return LinkKey.from_secret(secret).key.hex()


def test_a_replayed_handshake_is_refused():
    """Record a good client's answer, then send it again on a new connection: the nonce differs."""
    async def main():
        srv, port, results = await _server(KEY)
        url = f"ws://127.0.0.1:{port}"
        raw = await websockets.connect(url)
        challenge = json.loads(await raw.recv())
        ns = bytes.fromhex(challenge["nonce"])
        nc = bytes(32)
        answer = json.dumps({"t": "auth", "role": "gateway", "nonce": nc.hex(),
                             "mac": KEY.mac(b"client", ns, nc, "gateway", "")})
        await raw.send(answer)
        assert json.loads(await raw.recv())["t"] == "ok"
        await raw.close()
        replay = await websockets.connect(url)
        await replay.recv()  # a fresh challenge
        await replay.send(answer)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
            await replay.recv()
        await asyncio.sleep(0.1)
        srv.close()
        return results, e.value
    results, closed = run(main())
    assert [r[0] for r in results] == ["ok", "refused"]
    assert closed.rcvd.code == auth.CLOSE_AUTH and "authentication failed" in closed.rcvd.reason


def test_silent_peer_times_out():
    async def main():
        srv, port, results = await _server(KEY)
        raw = await websockets.connect(f"ws://127.0.0.1:{port}")
        await raw.recv()
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(raw.recv(), 10)
        srv.close()
        return results
    results = run(main())
    assert results[0][0] == "refused" and "within" in results[0][1]


def test_tls_with_a_pinned_self_signed_certificate(tmp_path):
    cert, key = self_signed(tmp_path / "a")
    assert self_signed(tmp_path / "a") == (cert, key)  # cached

    async def main():
        srv, port, results = await _server(KEY, fingerprint_file(cert), server_context(cert, key))
        ws = await auth.connect(f"wss://127.0.0.1:{port}", KEY, "gateway", max_size=1 << 20)
        assert ws.transport.get_extra_info("ssl_object") is not None
        assert await ws.recv() == "welcome"
        await ws.close()
        srv.close()
        return results
    assert run(main()) == [("ok", "gateway")]


def test_a_man_in_the_middle_with_another_certificate_is_refused(tmp_path):
    """A TLS proxy presenting its own certificate relays the handshake: the certificate binding fails."""
    cert, key = self_signed(tmp_path / "stage")
    mitm_cert, mitm_key = self_signed(tmp_path / "mitm")

    async def main():
        srv, port, results = await _server(KEY, fingerprint_file(cert), server_context(cert, key))

        async def relay(client_ws):
            async with websockets.connect(f"wss://127.0.0.1:{port}", ssl=client_context()) as up:
                async def pump(a, b):
                    try:
                        async for m in a:
                            await b.send(m)
                    except websockets.exceptions.ConnectionClosed:
                        pass
                    await b.close()
                await asyncio.gather(pump(client_ws, up), pump(up, client_ws))

        mitm = await websockets.serve(relay, "127.0.0.1", 0, ssl=server_context(mitm_cert, mitm_key))
        mport = next(iter(mitm.sockets)).getsockname()[1]
        with pytest.raises(AuthError):
            await auth.connect(f"wss://127.0.0.1:{mport}", KEY, "gateway", max_size=1 << 20)
        await asyncio.sleep(0.2)
        mitm.close()
        srv.close()
        return results
    results = run(main())
    assert results and all(r[0] == "refused" for r in results)


def test_short_secrets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="too short"):
        LinkKey.from_secret("short")
    f = tmp_path / "k"
    auth.write_secret(str(f), auth.new_secret())
    assert auth.load_secret(str(f)) is not None
    with pytest.raises(FileExistsError):
        auth.write_secret(str(f), auth.new_secret())
    with pytest.raises(ValueError, match="cannot read"):
        auth.load_secret(str(tmp_path / "missing"))
