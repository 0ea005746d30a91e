"""Test helper: run stage processes and a gateway process on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Iterator, List, Optional, Sequence, Tuple


# Gateways whose answers are compared bit for bit with a fresh whole model (or a seeded answer with its repeat)
# run without the prefix cache: llama.cpp's logits for a request move with where its KV cells lie among other
# sequences' cells (without flash attention), and cached entries keep other cells there. The cache's own
# exactness is tested in tests/test_prefix_cache_e2e.py.
NO_CACHE = ["--prefix-cache", "off"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Optional[object] = None, raw: Optional[bytes] = None, timeout: float = 120,
         key: Optional[str] = None):
    """(status, parsed JSON or text) of an HTTP request; ``key``: sent as the API key (Bearer)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    # https: the gateway's self-signed certificate (--tls auto); tests check the data, not a CA chain
    ctx = ssl._create_unverified_context() if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def spawn_cli(args: Sequence[str], log: Path, env: dict, append: bool = False) -> subprocess.Popen:
    """``python -m molink_lite.cli ARGS`` as a child process, output to ``log``, ``env`` added to ours."""
    out = open(log, "ab" if append else "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "molink_lite.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
    finally:
        out.close()


async def events_to_end(s, timeout: float = 120) -> list:
    """A submitted sequence's events up to its last one (done or error), waiting at most ``timeout`` s for each."""
    import asyncio

    events = []
    while True:
        ev = await asyncio.wait_for(s.events.get(), timeout)
        events.append(ev)
        if ev.kind != "text":
            return events


def wait_healthy(url: str, proc: Optional[subprocess.Popen] = None, timeout: float = 180) -> bool:
    """Poll ``url``/health until it answers 200 (True), ``proc`` exits or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if http("GET", url + "/health", timeout=2)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def stop_processes(procs, timeout: float = 20) -> None:
    """Terminate child processes (all at once), wait for them, kill those that do not end in ``timeout`` s."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


class GatewayProcess:
    """``molink-lite gateway`` as a child process."""

    def __init__(self, pipelines: Sequence[Sequence[str]], extra: Sequence[str] = (), log_dir: Optional[Path] = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "molink_lite.cli", "gateway", "--port", str(self.port), "--connect-timeout", "60"]
        for p in pipelines:
            cmd += ["--pipeline", ",".join(p)]
        cmd += list(extra)
        self.log = (log_dir or Path("."))/f"gateway-{self.port}.log"
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.output()}")
            try:
                status, _ = http("GET", self.url + "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not ready: {self.output()}")

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_processes([self.proc], 10)
        self._out.close()


def run_gateway_expect_failure(pipelines: List[List[str]], timeout: float = 120,
                               extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Start a gateway that should refuse its pipeline; return the finished process."""
    cmd = [sys.executable, "-m", "molink_lite.cli", "gateway", "--port", str(free_port()), "--connect-timeout", "20"]
    for p in pipelines:
        cmd += ["--pipeline", ",".join(p)]
    cmd += list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def served_pipeline(model: str, ranges, stage_args: Sequence[str], workdir: Path, gateway_extra: Sequence[str] = (),
                    secret: Optional[str] = None,
                    log_dir: Optional[Path] = None) -> Iterator[Tuple[GatewayProcess, list]]:
    """Stage processes of ``model`` (one per layer range, ``stage_args`` their options, ``secret`` the cluster secret
    they require) and a ready gateway over them as one pipeline; yields (gateway, stages), stops all on exit."""
    from molink_lite.serving.launcher import start_stages, stop_stages

    procs = start_stages(model, ranges, extra_args=stage_args, workdir=str(workdir), secret=secret)
    try:
        gw = GatewayProcess([[s.url for s in procs]], extra=gateway_extra, log_dir=log_dir or workdir)
        try:
            gw.wait_ready()
            yield gw, procs
        finally:
            gw.stop()
    finally:
        stop_stages(procs)


@contextlib.contextmanager
def replica_stages(model: str, ranges, stage_args: Sequence[str], workdir: Path) -> Iterator[Tuple[list, list]]:
    """Two copies of the same chain of stage processes (in ``workdir``/a and /b); yields (a, b), stops all on exit."""
    from molink_lite.serving.launcher import start_stages, stop_stages

    procs: list = []
    try:
        for name in ("a", "b"):
            (workdir / name).mkdir(exist_ok=True)
            procs.append(start_stages(model, ranges, extra_args=stage_args, workdir=str(workdir / name)))
        yield procs[0], procs[1]
    finally:
        stop_stages([sp for chain in procs for sp in chain])


@contextlib.asynccontextmanager
async def replica_router(a: list, b: list, recover_timeout: float = 30) -> AsyncIterator[tuple]:
    """Pipelines A and B (f32 wire) over the stage chains ``a`` and ``b``, connected, and a Router over both;
    yields (A, B, router), closes the pipelines on exit."""
    from molink_lite.serving.pipeline import Pipeline
    from molink_lite.serving.router import Router

    pa = Pipeline([sp.url for sp in a], codec="f32", name="A")
    pb = Pipeline([sp.url for sp in b], codec="f32", name="B")
    try:
        await pa.connect(60)
        await pb.connect(60)
        yield pa, pb, Router([pa, pb], recover_timeout=recover_timeout)
    finally:
        await pa.close()
        await pb.close()
