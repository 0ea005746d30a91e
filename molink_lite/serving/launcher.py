"""Start local stage processes (portable: subprocess, no fork) and wait until they listen.

The stages die with the process that started them, however it ends: on Windows they are put in a Job
Object that kills its processes when its last handle closes (the parent's, closed by the OS when the parent
ends, ``TerminateProcess`` included: there ``Popen.terminate()`` and ``send_signal(SIGTERM)`` run no
handler); and on every OS each stage watches its parent (:func:`watch_parent`) and exits when it is gone
(``kill -9`` on Linux). SIGTERM and Ctrl-C still stop them the orderly way (:func:`stop_stages`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from ..model.split import LayerRange, plan_ranges, read_model_info, stage_gguf
from ..wire.auth import SECRET_ENV, LinkKey, new_secret
from ..wire.tls import server_context
from .config import ServeConfig, StageTemplate

log = logging.getLogger(__name__)
PARENT_ENV = "MOLINK_PARENT_PID"  # set for the stage children: the pid they watch (watch_parent)


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


def stage_argv(stage: StageTemplate, model: str, layers: LayerRange, port: int, ready_file: Path) -> List[str]:
    """``molink-lite stage`` options of one local stage: ``stage`` (a StageConfig) with this stage's model,
    layers, loopback address and ready file put in (checked again by the config)."""
    one: Any = replace(stage, model=model, layers=str(layers), host="127.0.0.1", port=port,  # type: ignore
                       ready_file=str(ready_file),
                       mmproj=stage.mmproj if layers.start == 0 else None)   # the projector: first stage only
    return one.to_argv()


def start_stages(model: str, ranges: Sequence[LayerRange], *, ports: Optional[Sequence[int]] = None,
                 extra_args: Sequence[str] = (), env: Optional[dict] = None, timeout: float = 300.0,
                 workdir: Optional[str] = None, secret: Optional[str] = None,
                 stage: Optional[StageTemplate] = None) -> List[StageProcess]:
    """Launch one stage process per range on 127.0.0.1 and wait until all listen (or one fails).

    ``stage``: the settings of every stage (a ``StageConfig``); each child's argv is made from it
    (``to_argv``) with this stage's model, layers, address and ready file put in. Without it the children
    get ``extra_args`` after those. ``secret``: the cluster secret the stages require (handed over in the
    environment, never on the command line, where other users of the machine could read it)."""
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
            if stage is not None:
                args = [*stage_argv(stage, model, r, port, ready), *extra_args]
            else:
                args = ["--model", model, "--layers", str(r), "--host", "127.0.0.1", "--port", str(port),
                        "--ready-file", str(ready), *extra_args]
            cmd = [sys.executable, "-m", "molink_lite.cli", "stage", *args]
            out = open(logf, "wb")
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **env, PARENT_ENV: str(os.getpid())})
            out.close()
            procs.append(StageProcess(r, p, ready, logf))
            _kill_with_parent(p)
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


_JOB = None  # Windows: the Job Object of this process's stage children (its handle is never closed by hand)


def _windows_job():
    """A Job Object whose processes are killed when its last handle closes (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE):
    this process holds the only handle, so the OS kills the stages when this process ends in any way."""
    global _JOB
    if _JOB is not None:
        return _JOB
    import ctypes
    from ctypes import wintypes

    class _Basic(ctypes.Structure):  # JOBOBJECT_BASIC_LIMIT_INFORMATION
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                    ("SchedulingClass", wintypes.DWORD)]

    class _Extended(ctypes.Structure):  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION
        _fields_ = [("BasicLimitInformation", _Basic), ("IoInfo", ctypes.c_uint64 * 6),
                    ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                    ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    k32.CreateJobObjectW.restype = wintypes.HANDLE
    k32.CreateJobObjectW.argtypes = [ctypes.c_void_p, wintypes.LPCWSTR]
    k32.SetInformationJobObject.restype = wintypes.BOOL
    k32.SetInformationJobObject.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
    k32.AssignProcessToJobObject.restype = wintypes.BOOL
    k32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
    job = k32.CreateJobObjectW(None, None)
    if not job:
        raise OSError(ctypes.get_last_error(), "CreateJobObjectW failed")
    info = _Extended()
    info.BasicLimitInformation.LimitFlags = 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    if not k32.SetInformationJobObject(job, 9, ctypes.byref(info), ctypes.sizeof(info)):  # ExtendedLimitInformation
        raise OSError(ctypes.get_last_error(), "SetInformationJobObject failed")
    _JOB = (k32, job)
    return _JOB


def _kill_with_parent(p: subprocess.Popen) -> None:
    """Windows: put child ``p`` in this process's kill-on-close Job Object (elsewhere: nothing to do here;
    the child's own :func:`watch_parent` covers a parent killed without its handlers running)."""
    if sys.platform != "win32":
        return
    import ctypes

    try:
        k32, job = _windows_job()
        if not k32.AssignProcessToJobObject(job, int(p._handle)):  # type: ignore[attr-defined]
            raise OSError(ctypes.get_last_error(), "AssignProcessToJobObject failed")
    except OSError as e:  # e.g. a job that forbids nesting: the stage's parent watch remains
        log.warning("stage process %d not tied to this process's lifetime by a Job Object (%s); it exits when it "
                    "sees this process gone", p.pid, e)


def watch_parent(interval: float = 0.5) -> Optional[int]:
    """In a stage started by :func:`start_stages` (``$MOLINK_PARENT_PID``): exit this process as soon as that
    parent is gone, however it ended. Returns the pid watched, or None when there is none to watch.

    Windows: a handle to the parent, opened now, is waited on (signalled when the parent ends; a handle
    also keeps the pid from being reused under us). Elsewhere: the parent pid (``os.getppid()``) changes
    when the parent dies and this process is re-parented."""
    import threading

    val = os.environ.pop(PARENT_ENV, "")
    try:
        pid = int(val)
    except ValueError:
        return None

    def gone() -> None:
        try:
            sys.stderr.write(f"molink-lite: the parent process {pid} is gone: stopping this stage\n")
            sys.stderr.flush()
        finally:
            os._exit(1)

    if sys.platform == "win32":
        import ctypes
        from ctypes import wintypes

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.OpenProcess.restype = wintypes.HANDLE
        k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
        k32.WaitForSingleObject.restype = wintypes.DWORD
        k32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
        handle = k32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            gone()  # already gone (or never ours)

        def wait() -> None:
            while k32.WaitForSingleObject(handle, 0xFFFFFFFF) != 0:  # INFINITE; 0 = WAIT_OBJECT_0
                time.sleep(interval)
            gone()
    else:
        if os.getppid() != pid:
            gone()

        def wait() -> None:
            while os.getppid() == pid:
                time.sleep(interval)
            gone()

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()
    return pid


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


def serve_local(cfg: ServeConfig, *, api_keys: Sequence[str] = (), tls: Optional[Tuple[Path, Path]] = None,
                drafter: Optional[object] = None) -> int:
    """``molink-lite serve``: local stages + gateway until Ctrl-C (the stages get a fresh cluster secret).

    ``cfg.model`` must be set; ``api_keys`` and ``tls`` (cert, key) are what the CLI loaded from
    ``cfg.gateway.security``."""
    from .gateway import start_gateway

    if not cfg.models:
        raise ValueError("serve_local needs cfg.model (a whole-model GGUF)")
    several = len(cfg.models) > 1
    plans = []   # (name, path, ranges) per model
    for spec in cfg.models:
        info = read_model_info(spec.path)
        ranges = plan_ranges(spec.path, cfg.stages, cfg.split)
        plans.append((spec.name or info.name, spec.path, ranges))
        print(f"molink-lite: {info.name} ({info.arch}, {info.n_layer} layers) as {cfg.stages} stage(s): "
              f"{', '.join(str(r) for r in ranges)}" + (f", served as '{plans[-1][0]}'" if several else ""),
              flush=True)
    names = [n for n, _, _ in plans]
    if several and len(set(names)) != len(names):
        raise ValueError(f"two models are called the same ({', '.join(names)}): name them with --model NAME=PATH")
    _exit_on_sigterm()  # `kill`, `docker stop`, systemd: stop the stage processes too, as Ctrl-C does
    secret = new_secret()  # a fresh cluster secret per run: other local users cannot drive the stages
    procs: List[StageProcess] = []
    groups: List[List[StageProcess]] = []
    try:
        for i, (_, path, ranges) in enumerate(plans):
            at = cfg.stage_port + i * cfg.stages
            ports = [at + k for k in range(cfg.stages)] if cfg.stage_port else None
            group = start_stages(path, ranges, ports=ports, stage=cfg.stage, secret=secret)
            groups.append(group)
            procs.extend(group)
    except BaseException:
        stop_stages(procs)
        raise
    host, port = cfg.gateway.host, cfg.gateway.port

    async def main() -> None:
        # one pipeline per model, tagged with its name (one model: untagged, named by --model NAME= if given)
        gw = replace(cfg.gateway, pipelines=[[sp.url for sp in g] for g in groups],
                     pipeline_models=[n for n, _, _ in plans] if several else [""],
                     model_name=cfg.gateway.model_name or cfg.models[0].name or None)
        runner = await start_gateway(gw, key=LinkKey.from_secret(secret), api_keys=api_keys, drafter=drafter,
                                     ssl_context=server_context(*tls) if tls else None)
        scheme = "https" if tls else "http"
        auth_hdr = " -H \"Authorization: Bearer $MOLINK_API_KEY\"" if api_keys else ""
        print(f"\nmolink-lite is serving at {scheme}://{host}:{port}/v1\n\ntry:\n"
              f"  curl {'-k ' if tls else ''}{scheme}://{host}:{port}/v1/completions{auth_hdr} "
              f"-H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'\n\n"
              + (f"models (pick one with \"model\"): {', '.join(names)}\n\n" if several else "") +
              f"dashboard: {scheme}://{host}:{port}/   (or: molink-lite status {scheme}://{host}:{port})\n\n"
              f"Ctrl-C stops everything.", flush=True)
        try:
            # a stage that exits takes its model down, not the others: serve goes on while any model has all of
            # its stages (one model: it ends with its first stage that exits, as ever)
            told: set = set()
            while True:
                for (name, _, _), g in zip(plans, groups):
                    dead = [sp for sp in g if sp.proc.poll() is not None]
                    if dead and name not in told:
                        told.add(name)
                        print(f"stage {dead[0].layers} of {name} exited (code {dead[0].proc.returncode}):\n"
                              f"{dead[0].log_tail()}", file=sys.stderr)
                if len(told) == len(groups):
                    break
                await asyncio.sleep(0.5)
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
