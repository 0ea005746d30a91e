"""Everything one stage process needs, as one checked value: :class:`StageConfig`.

``molink-lite stage`` builds it once from its options (``cli.stage_config``) and hands it whole to
:func:`molink_lite.stage.server.run_stage`; ``serve`` starts its stage children with the argv made from
one (:meth:`StageConfig.to_argv`), so the options a child gets and the config cannot drift apart.

Standard library only: importing this module must not load llama.cpp (or numpy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

CODECS = ("f16", "f32", "int8", "f16-clamp")   # hidden-state wire codecs (wire/codec.py)
FLASH_ATTN = ("auto", "on", "off")
TLS_MODES = ("auto", "off")
MAX_SEQS = 256     # StageEngine's n_seq_max limit
MAX_LANES = 8      # StageEngine's lane limit


class ConfigError(ValueError):
    """A setting that cannot work; the message names the command-line option."""


def _port(value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{what} must be a port number in 0..65535, got {value!r}")


def _url(value: Optional[str], what: str, schemes: Tuple[str, ...]) -> None:
    if value is not None and not str(value).startswith(tuple(f"{s}://" for s in schemes)):
        raise ConfigError(f"{what} must start with {' or '.join(s + '://' for s in schemes)}, got {value!r}")


def check_layer_range(text: str) -> None:
    """The format of ``--layers`` (``first-last`` or ``n``, inclusive), as model.split.parse_range reads it."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise ConfigError(f"bad layer range '{text}': expected 'first-last', e.g. '0-8'")
    a, b = int(m.group(1)), int(m.group(2)) if m.group(2) is not None else int(m.group(1))
    if b < a:
        raise ConfigError(f"bad layer range '{text}': last layer {b} is before first layer {a} (empty range)")


@dataclass(frozen=True)
class EngineConfig:
    """llama.cpp settings of a stage (:class:`molink_lite.stage.engine.StageEngine`)."""

    n_ctx: int = 8192                 # --ctx: KV cache tokens, shared by all sequences (and split between lanes)
    max_seqs: int = 16                # --max-seqs
    n_batch: int = 512                # --batch
    n_gpu_layers: int = -1            # --n-gpu-layers (-1 = all)
    threads: Optional[int] = None     # --threads (None or 0: all cores)
    flash_attn: str = "auto"          # --flash-attn auto | on | off
    lanes: int = 1                    # --lanes
    device_sampling: bool = False     # --device-sampling on | off

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ConfigError(f"--ctx must be >= 1, got {self.n_ctx}")
        if not 1 <= self.max_seqs <= MAX_SEQS:
            raise ConfigError(f"--max-seqs must be in 1..{MAX_SEQS}, got {self.max_seqs}")
        if self.n_batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.n_batch}")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: all cores), got {self.threads}")
        if self.flash_attn not in FLASH_ATTN:
            raise ConfigError(f"--flash-attn must be one of {', '.join(FLASH_ATTN)}, got {self.flash_attn!r}")
        if not 1 <= self.lanes <= min(MAX_LANES, self.max_seqs):
            raise ConfigError(f"--lanes must be in 1..{min(MAX_LANES, self.max_seqs)} (at most {MAX_LANES} and at "
                              f"most --max-seqs), got {self.lanes}")

    def engine_kwargs(self, **override: Any) -> Dict[str, Any]:
        """Keywords for ``StageEngine(path, **kw)``; ``override`` replaces some (join: n_ctx, n_seq_max)."""
        kw = dict(n_ctx=self.n_ctx, n_seq_max=self.max_seqs, n_batch=self.n_batch, n_gpu_layers=self.n_gpu_layers,
                  n_threads=self.threads, flash_attn={"auto": None, "on": True, "off": False}[self.flash_attn],
                  device_sampling=self.device_sampling, lanes=self.lanes)
        kw.update(override)
        return kw


@dataclass(frozen=True)
class LinkSecurity:
    """How a stage's links are protected: the cluster secret (file, else $MOLINK_SECRET) and TLS."""

    secret_file: Optional[str] = None  # --secret-file
    tls: str = "off"                   # --tls auto | off
    tls_cert: Optional[str] = None     # --tls-cert (with tls_key)
    tls_key: Optional[str] = None      # --tls-key
    insecure: bool = False             # --insecure: listen off loopback without a secret

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError(f"--tls must be one of {', '.join(TLS_MODES)}, got {self.tls!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")


@dataclass(frozen=True)
class JoinConfig:
    """``stage --join``: the gateway assigns the layers (``url`` None: not joining)."""

    url: Optional[str] = None          # --join: the gateway's http(s):// address
    max_memory: Optional[str] = None   # --max-memory, e.g. "6GB" (parsed where it is used)
    advertise: Optional[str] = None    # --advertise ws(s)://host:port
    name: Optional[str] = None         # --name (default: hostname)

    def __post_init__(self) -> None:
        _url(self.url, "--join", ("http", "https", "ws", "wss"))
        _url(self.advertise, "--advertise", ("ws", "wss"))


@dataclass(frozen=True)
class StageConfig:
    """One stage process: which layers, where it listens, how it computes, how its links are protected."""

    model: Optional[str] = None        # --model: whole-model GGUF (None: the demo model, or joined)
    layers: Optional[str] = None       # --layers "first-last" (None: all layers)
    host: str = "0.0.0.0"              # --host
    port: int = 9001                   # --port (0: any free port)
    next_url: Optional[str] = None     # --next ws(s)://host:port (None: told by the gateway)
    codec: str = "f16"                 # --codec
    engine: EngineConfig = field(default_factory=EngineConfig)
    security: LinkSecurity = field(default_factory=LinkSecurity)
    cache_dir: Optional[str] = None    # --cache-dir for stage GGUFs
    ready_file: Optional[str] = None   # --ready-file: the bound port is written here once listening
    drain_timeout: float = 30.0        # --drain-timeout: SIGTERM drains for at most this many seconds
    metrics_port: Optional[int] = None  # --metrics-port: the stage's own /metrics (None: off; 0: any port)
    metrics_host: str = "127.0.0.1"    # --metrics-host
    join: JoinConfig = field(default_factory=JoinConfig)
    mmproj: Optional[str] = None       # --mmproj: the vision projector GGUF (first stage only)
    image_min_tokens: int = 0          # --image-min-tokens: the projector's minimum tokens per image (0: its own)
    step_costs_s: float = 2.0          # --step-costs: seconds to measure step costs by rows at start (0: skip)

    def __post_init__(self) -> None:
        _port(self.port, "--port")
        _port(self.metrics_port, "--metrics-port", allow_none=True)
        if not self.host:
            raise ConfigError("--host must not be empty (0.0.0.0: every address)")
        if self.codec not in CODECS:
            raise ConfigError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.layers is not None:
            check_layer_range(self.layers)
        _url(self.next_url, "--next", ("ws", "wss"))
        if not self.drain_timeout > 0 or self.drain_timeout == float("inf"):
            raise ConfigError(f"--drain-timeout must be > 0 seconds, got {self.drain_timeout}")
        if not 0 <= self.step_costs_s <= 600:
            raise ConfigError(f"--step-costs must be in 0..600 seconds, got {self.step_costs_s}")
        if self.join.url and (self.model or self.layers):
            raise ConfigError("--join takes its layers from the gateway: drop --model/--layers")

    @property
    def metrics(self) -> Optional[Tuple[str, int]]:
        """(host, port) of the stage's own Prometheus endpoint, or None."""
        return (self.metrics_host, self.metrics_port) if self.metrics_port is not None else None

    def to_argv(self) -> List[str]:
        """The ``molink-lite stage`` options that build this config again (``cli.stage_config``).

        Every setting is written out (None ones are left out: they are the option defaults), so the child
        gets exactly this config whatever the parser's defaults. The secret itself never goes on a command
        line (other local users can read those): only ``--secret-file``, or $MOLINK_SECRET in the environment."""
        e, s, j = self.engine, self.security, self.join
        opts: List[Tuple[str, Any]] = [
            ("--model", self.model), ("--layers", self.layers), ("--host", self.host), ("--port", self.port),
            ("--next", self.next_url), ("--codec", self.codec),
            ("--ctx", e.n_ctx), ("--max-seqs", e.max_seqs), ("--batch", e.n_batch),
            ("--n-gpu-layers", e.n_gpu_layers), ("--threads", e.threads), ("--flash-attn", e.flash_attn),
            ("--lanes", e.lanes), ("--device-sampling", "on" if e.device_sampling else "off"),
            ("--secret-file", s.secret_file), ("--tls", s.tls), ("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key),
            ("--cache-dir", self.cache_dir), ("--ready-file", self.ready_file),
            ("--mmproj", self.mmproj), ("--image-min-tokens", self.image_min_tokens or None),
            ("--drain-timeout", self.drain_timeout), ("--step-costs", self.step_costs_s),
            ("--metrics-port", self.metrics_port), ("--metrics-host", self.metrics_host),
            ("--join", j.url), ("--max-memory", j.max_memory), ("--advertise", j.advertise), ("--name", j.name),
        ]
        argv: List[str] = []
        for opt, value in opts:
            if value is not None:
                argv += [opt, str(value)]
        if s.insecure:
            argv.append("--insecure")
        return argv


__all__ = ["StageConfig", "EngineConfig", "LinkSecurity", "JoinConfig", "ConfigError", "CODECS", "FLASH_ATTN",
           "TLS_MODES", "check_layer_range"]
