"""Gateway and ``serve`` settings as checked values: :class:`GatewayConfig`, :class:`ServeConfig`.

``molink-lite gateway`` / ``serve`` build one of these once from their options (``cli.gateway_config``,
``cli.serve_config``) and hand it whole to :func:`molink_lite.serving.gateway.start_gateway` /
:func:`molink_lite.serving.launcher.serve_local`. Groups:

* :class:`PipelineConfig`: what each :class:`~molink_lite.serving.pipeline.Pipeline` gets
  (:meth:`PipelineConfig.pipeline_kwargs`), for the ``--pipeline`` replicas and for joined stages alike;
* :class:`HttpLimits`: the HTTP listener's connection caps and timeouts (:mod:`.http_limits`);
* :class:`GatewaySecurity`: cluster secret, TLS and API keys as given (file names; they are read at start);
* :class:`ClusterConfig`: join mode (``gateway --model``: stages join and are placed).

This module imports no llama.cpp and nothing from ``stage/``: a ``serve`` config carries its stage
template (a ``stage.config.StageConfig``, built by the CLI) through the small :class:`StageTemplate`
protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from ..wire.codec import CODECS
from .http_limits import (DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEPALIVE_TIMEOUT,
                          DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, DEFAULT_MAX_REQUESTS_PER_KEY,
                          DEFAULT_WRITE_TIMEOUT)
from .models import valid_name
from .speculative import SpecConfig

TLS_MODES = ("auto", "off")
SPLITS = ("balanced", "even")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the command-line option."""


def _positive(value: float, opt: str) -> None:
    if not value > 0:
        raise ConfigError(f"{opt} must be > 0, got {value}")


def _port(value: int, opt: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{opt} must be a port number in 0..65535, got {value!r}")


@dataclass(frozen=True)
class PipelineConfig:
    """Per-pipeline settings: the keywords of ``Pipeline(urls, ...)`` other than the URLs, name and key."""

    codec: str = "auto"                    # --codec: hidden-state wire codec (auto: from the links, link_policy)
    max_inflight: Optional[int] = None     # --micro-batches (None or 0: one per stage and lane)
    prefill_chunk: Optional[int] = None    # --prefill-chunk (None or 0: from the measured links)
    max_batch_tokens: int = 512            # --max-batch-tokens
    step_timeout: float = 300.0
    heartbeat_interval: float = 1.0        # --heartbeat-interval
    heartbeat_timeout: float = 3.0         # --heartbeat-timeout
    relink_s: float = 300.0                # --relink-interval: links measured again this often (0: at connect only)
    spec: Optional[SpecConfig] = None      # --speculative/--spec-k/--spec-n (None: off)
    takeover: bool = False                 # --takeover
    prefix_cache: bool = True              # --prefix-cache on|off: keep finished sequences' KV for reuse
    prefix_cache_cells: int = 0            # --prefix-cache-cells (0: every KV cell live sequences do not reserve)
    prefix_cache_per_key: bool = False     # --prefix-cache per-key: reuse only between requests of one API key
    ring: str = "auto"                     # --ring: the last stage sends tokens straight to the first (stage/ring.py)
    ring_via: Tuple[Tuple[str, str], ...] = ()  # --ring-via FIRST=URL: where the last stage reaches a first stage

    def __post_init__(self) -> None:
        if self.codec not in CODECS + ("auto",):
            raise ConfigError(f"--codec must be auto or one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.max_inflight is not None and self.max_inflight < 0:
            raise ConfigError(f"--micro-batches must be >= 1 (or left out), got {self.max_inflight}")
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise ConfigError(f"--prefill-chunk must be >= 1 (or left out), got {self.prefill_chunk}")
        if self.max_batch_tokens < 1:
            raise ConfigError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        if self.prefix_cache_cells < 0:
            raise ConfigError(f"--prefix-cache-cells must be >= 0 (0 = every KV cell live sequences do not reserve), "
                              f"got {self.prefix_cache_cells}")
        _positive(self.step_timeout, "step_timeout")
        _positive(self.heartbeat_interval, "--heartbeat-interval")
        _positive(self.heartbeat_timeout, "--heartbeat-timeout")
        if not self.relink_s >= 0:
            raise ConfigError(f"--relink-interval must be >= 0 seconds (0: only at connect), got {self.relink_s}")
        if self.ring not in ("auto", "on", "off"):
            raise ConfigError(f"--ring must be auto, on or off, got {self.ring!r}")
        for first, via in self.ring_via:
            if not all(u.startswith(("ws://", "wss://")) for u in (first, via)):
                raise ConfigError(f"--ring-via takes FIRST_STAGE_URL=URL, both ws:// or wss:// URLs, got "
                                  f"{first}={via}")
        if self.spec is not None:
            try:
                self.spec.validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def pipeline_kwargs(self, **extra: Any) -> Dict[str, Any]:
        """Keywords for ``Pipeline(urls, **kw)``; ``extra`` adds the rest (name, key)."""
        return dict(codec=self.codec, max_inflight=self.max_inflight, prefill_chunk=self.prefill_chunk,
                    max_batch_tokens=self.max_batch_tokens, step_timeout=self.step_timeout,
                    heartbeat_interval=self.heartbeat_interval, heartbeat_timeout=self.heartbeat_timeout,
                    spec=self.spec, takeover=self.takeover, prefix_cache=self.prefix_cache, relink_s=self.relink_s,
                    prefix_cache_cells=self.prefix_cache_cells, prefix_cache_per_key=self.prefix_cache_per_key,
                    ring=self.ring, ring_via=dict(self.ring_via), **extra)


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP listener's caps and timeouts (see :mod:`molink_lite.serving.http_limits`)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS                           # --max-connections
    max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS   # --max-connections-per-address
    header_timeout: float = DEFAULT_HEADER_TIMEOUT                           # --header-timeout (0: none)
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT                     # --keepalive-timeout
    write_timeout: float = DEFAULT_WRITE_TIMEOUT                             # --write-timeout (0: never)
    max_requests_per_key: int = DEFAULT_MAX_REQUESTS_PER_KEY                 # --max-requests-per-key (0: no cap)
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be >= 1")
        for opt, v in (("--max-connections-per-address", self.max_connections_per_address),
                       ("--max-requests-per-key", self.max_requests_per_key), ("--write-timeout", self.write_timeout),
                       ("--header-timeout", self.header_timeout)):
            if v < 0:
                raise ConfigError(f"{opt} must be >= 0 (0 = no limit)")
        _positive(self.keepalive_timeout, "--keepalive-timeout")
        _positive(self.body_timeout, "body_timeout")


@dataclass(frozen=True)
class GatewaySecurity:
    """Secrets and TLS as given on the command line (read when the gateway starts, not here)."""

    secret_file: Optional[str] = None            # --secret-file (else $MOLINK_SECRET)
    tls: str = "off"                             # --tls auto | off
    tls_cert: Optional[str] = None               # --tls-cert
    tls_key: Optional[str] = None                # --tls-key
    insecure: bool = False                       # --insecure
    api_keys: Optional[Tuple[str, ...]] = None   # --api-key (repeated)
    api_key_file: Optional[str] = None           # --api-key-file (else $MOLINK_API_KEY)

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError(f"--tls must be one of {', '.join(TLS_MODES)}, got {self.tls!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.api_keys is not None and not isinstance(self.api_keys, tuple):
            object.__setattr__(self, "api_keys", tuple(self.api_keys))


@dataclass(frozen=True)
class ModelSpec:
    """One model a gateway serves, given by its GGUF (``--model [NAME=]PATH``; join mode and ``serve``).

    ``name``: the id clients send as ``model`` ("" : the GGUF's own name); ``aliases``: other names for it."""

    path: str
    name: str = ""
    aliases: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("--model needs a GGUF path")
        for n in ((self.name,) if self.name else ()) + tuple(self.aliases):
            if not valid_name(n):
                raise ConfigError(f"model name {n!r} is not valid: printable, at most 128 characters, no '=' or ','")
        object.__setattr__(self, "aliases", tuple(self.aliases))


def _model_specs(models: Sequence[Any], model: Optional[str]) -> Tuple[ModelSpec, ...]:
    """``models`` as ModelSpecs (a bare string is a path), or the one ``model`` path."""
    out = tuple(m if isinstance(m, ModelSpec) else ModelSpec(path=str(m)) for m in models)
    if not out and model:
        out = (ModelSpec(path=model),)
    paths = [m.path for m in out]
    if len(set(paths)) != len(paths):
        raise ConfigError("the same GGUF is given twice with --model (one model, one entry; replicas come from "
                          "more hosts)")
    return out


@dataclass(frozen=True)
class ClusterConfig:
    """Join mode: this gateway holds ``models`` (the first also as ``model``); stages that join are placed for
    ``n_ctx`` / ``n_seqs`` over all of them at once (:mod:`molink_lite.serving.cluster_set`)."""

    model: Optional[str] = None      # --model (None: no join mode); the first of ``models``
    n_ctx: int = 8192                # --ctx
    n_seqs: int = 16                 # --max-seqs
    settle: float = 3.0              # --join-settle
    ready_timeout: float = 120.0     # --join-ready-timeout
    rejoin_grace: float = 15.0       # --join-rejoin-grace
    models: Tuple[ModelSpec, ...] = ()   # --model [NAME=]PATH (repeated)
    mmproj: Optional[str] = None     # --mmproj: the (one) model's vision projector; the stage given layer 0 fetches it

    def __post_init__(self) -> None:
        models = _model_specs(self.models, self.model)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "model", models[0].path if models else None)
        if self.mmproj and len(models) != 1:
            raise ConfigError("--mmproj goes with one --model (the joined model whose projector it is)")
        if self.n_ctx < 1:
            raise ConfigError(f"--ctx must be >= 1, got {self.n_ctx}")
        if not 1 <= self.n_seqs <= 256:
            raise ConfigError(f"--max-seqs must be in 1..256, got {self.n_seqs}")
        if self.settle < 0:
            raise ConfigError(f"--join-settle must be >= 0, got {self.settle}")
        _positive(self.ready_timeout, "--join-ready-timeout")
        _positive(self.rejoin_grace, "--join-rejoin-grace")


def _pipelines(value: Sequence[Sequence[str]]) -> Tuple[Tuple[str, ...], ...]:
    out = tuple(tuple(urls) for urls in value)
    for urls in out:
        if not urls:
            raise ConfigError("a pipeline needs at least one stage URL")
        for u in urls:
            if not (u.startswith("ws://") or u.startswith("wss://")):
                raise ConfigError(f"stage URL must start with ws:// or wss://, got {u!r}")
    return out


@dataclass(frozen=True)
class GatewayConfig:
    """One gateway: its pipelines (stage URLs in layer order, one tuple per replica) and everything else."""

    pipelines: Tuple[Tuple[str, ...], ...] = ()   # --pipeline [NAME=]URLS (repeated)
    pipeline_models: Tuple[str, ...] = ()         # the model each pipeline serves ("": the first model)
    host: str = "127.0.0.1"                       # --host
    port: int = 8000                              # --port (0: any free port)
    connect_timeout: float = 120.0                # --connect-timeout
    model_name: Optional[str] = None              # --model-name
    chat_template: Optional[str] = None           # --chat-template
    recover_timeout: float = 60.0                 # --recover-timeout
    max_queue: int = 1024                         # --max-queue
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    http: HttpLimits = field(default_factory=HttpLimits)
    security: GatewaySecurity = field(default_factory=GatewaySecurity)
    join: ClusterConfig = field(default_factory=ClusterConfig)
    draft_model: Optional[str] = None             # --draft-model: a small model of the same vocabulary drafts tokens
    draft_gpu_layers: int = 0                     # --draft-gpu-layers
    aliases: Tuple[Tuple[str, str], ...] = ()     # --alias ALIAS=NAME (repeated): other names clients may use
    idle_unload: float = 0.0                      # --idle-unload SEC: release an idle model's stages (0: never)
    image_urls: bool = False                      # --allow-image-urls: fetch http(s) image_url parts

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipelines", _pipelines(self.pipelines))
        tags = tuple(self.pipeline_models) or ("",) * len(self.pipelines)
        if len(tags) != len(self.pipelines):
            raise ConfigError("pipeline_models needs one entry per pipeline")
        object.__setattr__(self, "pipeline_models", tags)
        for n in [t for t in tags if t] + [x for a in self.aliases for x in a]:
            if not valid_name(n):
                raise ConfigError(f"model name {n!r} is not valid: printable, at most 128 characters, no '=' or ','")
        object.__setattr__(self, "aliases", tuple(tuple(a) for a in self.aliases))
        if any(len(a) != 2 for a in self.aliases):
            raise ConfigError("--alias takes ALIAS=NAME")
        if not self.idle_unload >= 0:
            raise ConfigError(f"--idle-unload must be >= 0 seconds (0: never), got {self.idle_unload}")
        if self.draft_model is not None and self.pipeline.spec is not None and self.pipeline.spec.mode == "off":
            raise ConfigError("--draft-model drafts for speculative decoding: it needs --speculative auto or ngram")
        _port(self.port, "--port")
        _positive(self.connect_timeout, "--connect-timeout")
        _positive(self.recover_timeout, "--recover-timeout")
        if self.max_queue < 1:
            raise ConfigError("--max-queue must be >= 1")


class StageTemplate(Protocol):
    """What ``serve`` needs of its stage settings (a ``molink_lite.stage.config.StageConfig``, a frozen
    dataclass): :func:`dataclasses.replace` of model/layers/host/port/ready_file per stage, then the argv."""

    codec: str

    def to_argv(self) -> List[str]: ...


@dataclass(frozen=True)
class ServeConfig:
    """``molink-lite serve``: ``stages`` local stage processes made from ``stage`` (one layer range each) and a
    gateway over them (``gateway``; its pipelines are filled in once the stages listen)."""

    stage: StageTemplate                           # engine options and codec of every stage (StageConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    model: Optional[str] = None                    # --model (None: the demo model, resolved by the CLI)
    stages: int = 2                                # --stages
    split: str = "balanced"                        # --split
    stage_port: int = 0                            # --stage-port: first stage port (0: free ports)
    models: Tuple[ModelSpec, ...] = ()             # --model [NAME=]PATH (repeated; the first is also ``model``)

    def __post_init__(self) -> None:
        models = _model_specs(self.models, self.model)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "model", models[0].path if models else None)
        if not callable(getattr(self.stage, "to_argv", None)):
            raise ConfigError("ServeConfig.stage must be a StageConfig (with to_argv)")
        if self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        _port(self.stage_port, "--stage-port")
        if self.stage_port and self.stage_port + self.stages - 1 > 65535:
            raise ConfigError(f"--stage-port {self.stage_port} leaves no room for {self.stages} stage ports")
        if self.gateway.pipeline.codec != "auto" and self.stage.codec != self.gateway.pipeline.codec:
            raise ConfigError(f"the stages' codec {self.stage.codec!r} differs from the gateway's "
                              f"{self.gateway.pipeline.codec!r}")
        if self.gateway.pipelines or self.gateway.join.model:
            raise ConfigError("serve starts its own stages: its gateway takes no pipelines and no join model")
        if self.gateway.security.secret_file:
            raise ConfigError("serve makes a fresh cluster secret for its stages: no secret file")


__all__ = ["GatewayConfig", "ModelSpec", "PipelineConfig", "HttpLimits", "GatewaySecurity", "ClusterConfig", "ServeConfig",
           "StageTemplate", "ConfigError", "SpecConfig"]
