"""Start local stage processes (portable: subprocess, no fork) and wait until they listen."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..model.split import LayerRange, plan_ranges, read_model_info, stage_gguf
from ..wire.auth import SECRET_ENV, LinkKey, new_secret
from ..wire.tls import server_context

log = logging.getLogger(__name__)


@dataclass
class StageProcess:
    """A running ``molink-lite stage`` child."""

    layers: LayerRange
    proc: subprocess.Popen
    ready_file: Path
    log_file: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_stages(model: str, ranges: Sequence[LayerRange], *, ports: Optional[Sequence[int]] = None,
                 extra_args: Sequence[str] = (), env: Optional[dict] = None, timeout: float = 300.0,
                 workdir: Optional[str] = None, secret: Optional[str] = None) -> List[StageProcess]:
    """Launch one stage process per range on 127.0.0.1 and wait until all listen (or one fails).

    ``secret``: the cluster secret the stages require (handed over in the environment, never on the
    command line, where other users of the machine could read it)."""
    env = dict(env or {})
    if secret is not None:
        env[SECRET_ENV] = secret
    for r in ranges:  # write the stage GGUFs here, once, before the children race for the cache
        stage_gguf(model, r)
    wd = Path(workdir or tempfile.mkdtemp(prefix="molink-"))
    procs: List[StageProcess] = []
    try:
        for i, r in enumerate(ranges):
            ready = wd / f"stage{i}.port"
            logf = wd / f"stage{i}.log"
            ready.unlink(missing_ok=True)
            port = ports[i] if ports else 0
            cmd = [sys.executable, "-m", "molink_lite.cli", "stage", "--model", model, "--layers", str(r),
                   "--host", "127.0.0.1", "--port", str(port), "--ready-file", str(ready), *extra_args]
            out = open(logf, "wb")
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
            out.close()
            procs.append(StageProcess(r, p, ready, logf))
        deadline = time.monotonic() + timeout
        for sp in procs:
            while not sp.ready_file.exists() or not sp.ready_file.read_text().strip():
                if sp.proc.poll() is not None:
                    raise RuntimeError(f"stage {sp.layers} exited with code {sp.proc.returncode}:\n{sp.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stage {sp.layers} did not start within {timeout:.0f} s:\n{sp.log_tail()}")
                time.sleep(0.1)
            sp.port = int(sp.ready_file.read_text().strip())
    except BaseException:
        stop_stages(procs)
        raise
    return procs


def stop_stages(procs: Sequence[StageProcess], timeout: float = 10.0) -> None:
    """Terminate stage processes (kill those that do not exit in time)."""
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.terminate()
    end = time.monotonic() + timeout
    for sp in procs:
        try:
            sp.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            sp.proc.kill()
            sp.proc.wait()


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks run and child processes are stopped."""
    import signal

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread, or unsupported: Ctrl-C still works
        pass


def serve_local(model: str, *, stages: int = 2, host: str = "127.0.0.1", port: int = 8000, base_port: int = 0,
                ctx: int = 8192, max_seqs: int = 16, threads: Optional[int] = None, n_gpu_layers: int = -1,
                codec: str = "f16", micro_batches: Optional[int] = None, flash_attn: str = "auto", lanes: int = 1,
                device_sampling: str = "off",
                split: str = "balanced", api_keys: Sequence[str] = (), tls: Optional[Tuple[Path, Path]] = None,
                max_connections: int = 512, header_timeout: float = 15.0, gateway_kw: Optional[dict] = None) -> int:
    """``molink-lite serve``: local stages + gateway until Ctrl-C (the stages get a fresh cluster secret)."""
    from .gateway import start_gateway

    info = read_model_info(model)
    ranges = plan_ranges(model, stages, split)
    extra = ["--ctx", str(ctx), "--max-seqs", str(max_seqs), "--n-gpu-layers", str(n_gpu_layers), "--codec", codec,
             "--flash-attn", flash_attn, "--lanes", str(lanes), "--device-sampling", device_sampling]
    if threads:
        extra += ["--threads", str(threads)]
    ports = [base_port + i for i in range(stages)] if base_port else None
    print(f"molink-lite: {info.name} ({info.arch}, {info.n_layer} layers) as {stages} stage(s): "
          f"{', '.join(str(r) for r in ranges)}", flush=True)
    _exit_on_sigterm()  # `kill`, `docker stop`, systemd: stop the stage processes too, as Ctrl-C does
    secret = new_secret()  # a fresh cluster secret per run: other local users cannot drive the stages
    procs = start_stages(model, ranges, ports=ports, extra_args=extra, secret=secret)

    async def main() -> None:
        runner = await start_gateway([[sp.url for sp in procs]], host=host, port=port, codec=codec,
                                     max_inflight=micro_batches, key=LinkKey.from_secret(secret),
                                     api_keys=api_keys, ssl_context=server_context(*tls) if tls else None,
                                     max_connections=max_connections, header_timeout=header_timeout,
                                     **(gateway_kw or {}))
        scheme = "https" if tls else "http"
        auth_hdr = " -H \"Authorization: Bearer $MOLINK_API_KEY\"" if api_keys else ""
        print(f"\nmolink-lite is serving at {scheme}://{host}:{port}/v1\n\ntry:\n"
              f"  curl {'-k ' if tls else ''}{scheme}://{host}:{port}/v1/completions{auth_hdr} "
              f"-H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'\n\n"
              f"dashboard: {scheme}://{host}:{port}/   (or: molink-lite status {scheme}://{host}:{port})\n\n"
              f"Ctrl-C stops everything.", flush=True)
        try:
            while all(sp.proc.poll() is None for sp in procs):
                await asyncio.sleep(0.5)
            dead = [sp for sp in procs if sp.proc.poll() is not None]
            print(f"stage {dead[0].layers} exited (code {dead[0].proc.returncode}):\n{dead[0].log_tail()}",
                  file=sys.stderr)
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
        return 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    finally:
        stop_stages(procs)
