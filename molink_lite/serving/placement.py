"""Layer placement over hosts: which host serves which layers, in how many pipelines (pure logic).

Given a GGUF model and hosts (backend, free memory, optionally a measured speed), :func:`plan`
builds pipelines of contiguous layer ranges:

* **Fewest stages first.** Every stage adds a network hop per step, so a pipeline uses the fewest
  hosts whose memory can hold the model. Among pipelines of that size (host subsets and orders),
  the one with the smallest **bottleneck** wins: the largest per-stage time, ``sec_per_layer x
  layer-equivalents`` where a layer-equivalent is a layer's weight elements over the mean layer's
  and the LM head (``split.stage_costs``) is counted on the last stage, as ``split.balanced_ranges``
  does. Within a pipeline the ranges minimize that bottleneck under each host's memory, so a host
  with little memory gets fewer layers and a fast host more.
* **Replicas.** Hosts left over are greedily formed into further pipelines the same way.
* **Search in bounded time.** Hosts with the same (memory, speed) are interchangeable, so the search runs
  over *classes* of hosts and distinct class orders, never over orders of equal hosts (a class's hosts are
  used in the order given). For each pipeline size k (smallest first): if the k hosts with the most memory
  fit in no order, no k hosts do (more memory never hurts), and k is skipped after that probe (all their
  orders when few, else the orders with memory-heavy hosts at the ends). If at most
  ``EXACT_ORDERS`` distinct class orders exist, all are tried (ties go to the earliest hosts given). Else
  only classes in the first k Pareto layers (memory vs speed) are kept (a host behind k layers of
  better-or-equal ones can always be swapped for a free one of them), tried exhaustively if that is few,
  else searched heuristically: host sets from a sweep over speed/memory trade-offs (fastest first ...
  most memory first), a few orders per set (memory-heavy hosts at the ends), then a local search (swap two
  stages, replace one host) under a hard cap of ``MAX_SPLITS`` evaluations.
  An evaluation (:func:`_split`, the split DP of one order) is O(k n^2) for n layers, pruned to the splits
  that could beat the best so far; an O(k) lower bound skips orders that cannot. Per pipeline size at most
  E = SET_ORDERS + max(EXACT_ORDERS, MAX_SPLITS) evaluations plus O(SWEEP C log C) ranking for C classes;
  at most n sizes per pipeline and len(hosts) pipelines per plan, evaluations memoized by class order
  across replicas: O(H n E k n^2) at worst for H hosts, whatever the number of ways to order equal hosts
  (100 equal or 100 different hosts: well under a second).
* **Constraints.** Every candidate range passes the architecture's split rule (``archs``; e.g.
  smollm3 stages start at multiples of 4); unsupported architectures are refused.

Memory model of one stage holding layers ``[a, b)`` (bytes; an estimate, not a measurement):

* weights: the GGUF byte sizes of its ``blk.N.*`` tensors, plus ``token_embd`` on the first stage,
  the output head (``output.weight``, or the tied ``token_embd``) and ``output_norm`` on the last
  stage, plus small global tensors (``rope_freqs``) on every stage;
* KV cache (f16, one cache shared by all sequences): ``cells x (n_embd_k_gqa + n_embd_v_gqa) x 2``
  per attention layer, ``n_embd_k_gqa = head_count_kv(il) x key_length`` (per-layer arrays honoured),
  ``cells = n_ctx``, or ``min(n_ctx, sliding_window x n_seqs + n_batch)`` on sliding-window layers;
  recurrent (SSM) layers hold ``n_seqs x ((conv_kernel - 1) + state_size) x inner_size x 4``;
* compute allowance: ``COMPUTE_FIXED + n_batch x (4 n_embd + 2 n_ff) x 4`` (activations of one
  layer at full batch, plus backend/graph overhead);
* output buffer: a last stage keeps ``n_seqs x n_vocab x 4`` bytes of logits; a first stage that is
  not last reserves ``n_chunk x n_vocab x 4`` with ``n_chunk`` chosen as in
  ``stage/engine.py`` (at most ``OUTPUT_BUFFER_BUDGET`` = 128 MiB, at least 32 rows).

Hosts report free memory (VRAM for ``cuda``, RAM for ``cpu``) already capped by their owner.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from ..model.archs import SplitContext, UnsupportedArchitecture, rule_for, split_support
from ..model.gguf_meta import GGUFFile, GGUFFormatError
from ..model.split import LayerRange, ModelInfo, SplitError, read_model_info
from ..wire.media import projector_bytes
from . import link_policy

BACKENDS = ("cuda", "cpu")
#: Default seconds per layer-step when a host has no measured ``sec_per_layer``: only the ratio
#: matters for placement (cuda 10x faster than cpu); the times printed are then nominal.
DEFAULT_SEC_PER_LAYER = {"cuda": 1e-4, "cpu": 1e-3}
COMPUTE_FIXED = 32 << 20            # backend + graph overhead per stage
OUTPUT_BUFFER_BUDGET = 128 << 20    # as stage/engine.py: non-last stages decode in chunks under this
N_BATCH = 512                       # rows per llama_decode (stage --batch default)
EXACT_ORDERS = 256                  # a pipeline size with at most this many distinct host orders: tried all
MAX_SPLITS = 160                    # otherwise at most this many _split evaluations per pipeline size
SET_ORDERS = 24                     # a set of hosts with at most this many distinct orders: all tried
SWEEP = 24                          # speed/memory trade-offs ranked to pick candidate host sets

_BLK = re.compile(r"^blk\.(\d+)\.")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


TOO_SMALL = "needs at least"  # how an unused host's reason starts when it cannot hold even one layer


class PlacementError(ValueError):
    """The hosts cannot serve the model (or the model cannot be placed); the message says why."""


# ---------------------------------------------------------------- hosts

@dataclass(frozen=True)
class HostSpec:
    """One host offering memory to the cluster."""

    name: str
    backend: str                          # "cuda" | "cpu"
    memory_bytes: int                     # free VRAM (cuda) or RAM (cpu), already capped by --max-memory
    sec_per_layer: Optional[float] = None  # measured seconds per layer-step; None: DEFAULT_SEC_PER_LAYER
    address: Optional[str] = None
    mbit: Optional[float] = None           # plan only: bandwidth of the link into this host (Mbit/s), if known
    rtt_ms: Optional[float] = None         # plan only: round trip of that link (ms)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"host {self.name!r}: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.memory_bytes <= 0:
            raise ValueError(f"host {self.name!r}: memory must be > 0")
        if self.sec_per_layer is not None and not self.sec_per_layer > 0:
            raise ValueError(f"host {self.name!r}: sec_per_layer must be > 0")

    @property
    def speed(self) -> float:
        """Seconds per layer-step used for placement."""
        return self.sec_per_layer if self.sec_per_layer is not None else DEFAULT_SEC_PER_LAYER[self.backend]

    @property
    def calibrated(self) -> bool:
        return self.sec_per_layer is not None


def parse_size(text: str) -> int:
    """``24GB`` (10^9), ``8GiB`` / ``8G`` (2^30), ``512MB``, ``512M``, ``1.5GiB``, or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad memory size {text!r}: expected e.g. 24GB, 8GiB, 16G or 512MB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"bad memory size {text!r}: must be > 0")
    return n


def parse_host(text: str) -> HostSpec:
    """Parse the CLI form ``MEMORY,BACKEND[,name=N][,sec_per_layer=S][,address=A][,mbit=M][,rtt_ms=R]``.

    E.g. ``24GB,cuda``, ``8GiB,cpu``, ``16G,cuda,name=box1``, ``8G,cpu,sec_per_layer=0.002``,
    ``24GB,cuda,mbit=100,rtt_ms=20`` (the link into that host, for the plan's codec and micro-batches).
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"bad host {text!r}: expected MEMORY,BACKEND[,name=N][,sec_per_layer=S][,address=A], "
                         f"e.g. 24GB,cuda")
    memory = parse_size(parts[0])
    backend = parts[1].lower()
    if backend not in BACKENDS:
        raise ValueError(f"bad host {text!r}: backend must be one of {', '.join(BACKENDS)}, got {parts[1]!r}")
    kw: Dict[str, object] = {}
    aliases = {"name": "name", "sec_per_layer": "sec_per_layer", "spl": "sec_per_layer",
               "address": "address", "addr": "address", "mbit": "mbit", "rtt_ms": "rtt_ms", "rtt": "rtt_ms"}
    for p in parts[2:]:
        key, sep, value = p.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in aliases or not value.strip():
            raise ValueError(f"bad host {text!r}: unknown option {p!r} (use name=, sec_per_layer=, address=, "
                             f"mbit=, rtt_ms=)")
        if aliases[key] in ("sec_per_layer", "mbit", "rtt_ms"):
            try:
                num = float(value)
            except ValueError:
                raise ValueError(f"bad host {text!r}: {aliases[key]} must be a number, got {value!r}") from None
            if not num > 0 or not math.isfinite(num):
                raise ValueError(f"bad host {text!r}: {aliases[key]} must be > 0, got {value!r}")
            kw[aliases[key]] = num
        else:
            kw[aliases[key]] = value.strip()
    name = str(kw.pop("name", ""))
    return HostSpec(name=name, backend=backend, memory_bytes=memory, **kw)  # type: ignore[arg-type]


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _fmt_sec(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


# ---------------------------------------------------------------- memory and time model

class ModelCost:
    """Per-layer and per-role memory and time of a model for a context size (see the module doc)."""

    def __init__(self, model_path: str, n_ctx: int = 8192, n_seqs: int = 16, n_batch: int = N_BATCH,
                 mmproj: Optional[str] = None):
        if n_ctx < 1 or n_seqs < 1 or n_batch < 1:
            raise PlacementError("n_ctx, n_seqs and n_batch must be >= 1")
        try:   # a vision projector (mmproj GGUF) lives on the first stage: weights, encoder buffers, stored images
            self.vision_bytes = projector_bytes(mmproj) if mmproj else 0
        except OSError as e:
            raise PlacementError(f"--mmproj {mmproj}: {e.strerror or e}") from None
        try:
            reader = GGUFFile(model_path)
            self.info: ModelInfo = read_model_info(model_path, reader)
            self.rule = rule_for(self.info.arch)
        except (GGUFFormatError, SplitError, UnsupportedArchitecture) as e:
            raise PlacementError(str(e)) from None
        info, arch = self.info, self.info.arch
        self.n_ctx, self.n_seqs, self.n_batch = n_ctx, n_seqs, n_batch
        n = info.n_layer
        self.meta = {k: reader.value(k) for k in reader.fields if k.startswith(arch + ".")}
        self.layer_bytes = [0] * n
        embd = head = out_other = other = 0
        # compute proxies as split.stage_costs reads them (weight elements), from this one parse of the header
        layer_elems = [0] * n
        head_elems = embd_elems = 0
        for t in reader.tensors:
            m = _BLK.match(t.name)
            if m:
                il = int(m.group(1))
                if 0 <= il < n:
                    self.layer_bytes[il] += t.nbytes
                    layer_elems[il] += int(math.prod(t.ne))
            elif t.name == "token_embd.weight":
                embd = t.nbytes
                embd_elems = int(math.prod(t.ne))
            elif t.name == "output.weight":
                head = t.nbytes
                head_elems = int(math.prod(t.ne))
            elif t.name.startswith("output"):  # output_norm.weight/bias, output.bias
                out_other += t.nbytes
            else:
                other += t.nbytes
        self.embd_bytes = embd
        self.head_bytes = (head or embd) + out_other
        self.global_bytes = other  # every stage keeps these (rope_freqs, ...)
        self.kv_bytes = self._kv_per_layer()
        head_elems = head_elems or embd_elems
        mean = sum(layer_elems) / n if n else 1
        self.layer_units = [c / mean for c in layer_elems]  # layer-equivalents (mean layer = 1)
        self.head_units = head_elems / mean
        n_ff = self._int_per_layer("feed_forward_length", 4 * info.n_embd)
        self.compute_bytes = COMPUTE_FIXED + n_batch * (4 * info.n_embd + 2 * max(n_ff)) * 4
        vocab = max(1, info.n_vocab)
        n_chunk = max(32, min(n_batch, OUTPUT_BUFFER_BUDGET // (4 * vocab)))
        self.first_out_bytes = n_chunk * vocab * 4
        self.last_out_bytes = min(n_seqs, n_batch) * vocab * 4
        self._lp = [0]
        self._kp = [0]
        self._up = [0.0]
        for i in range(n):
            self._lp.append(self._lp[-1] + self.layer_bytes[i])
            self._kp.append(self._kp[-1] + self.kv_bytes[i])
            self._up.append(self._up[-1] + self.layer_units[i])
        self._refusals: Dict[Tuple[int, int], Optional[str]] = {}
        # the cheapest layer's memory and compute: no stage of m layers needs less than m times these
        self.min_layer_bytes = min((self.layer_bytes[i] + self.kv_bytes[i] for i in range(n)), default=0)
        self.min_layer_units = min(self.layer_units, default=0.0)
        self._tables: Optional[Tuple[List[List[int]], List[List[float]], List[List[Optional[bool]]]]] = None

    @property
    def n_layer(self) -> int:
        return self.info.n_layer

    def _int_per_layer(self, key: str, default: int) -> List[int]:
        v = self.meta.get(f"{self.info.arch}.{key}")
        if isinstance(v, list):
            if len(v) < self.n_layer:  # NextN blocks after the trunk may have entries too (not run)
                raise PlacementError(f"{self.info.arch}.{key} has {len(v)} entries for {self.n_layer} layers")
            return [int(x) for x in v[:self.n_layer]]
        return [int(v) if v is not None else default] * self.n_layer

    def _kv_per_layer(self) -> List[int]:
        """KV cache (or recurrent state) bytes of each layer."""
        arch, n = self.info.arch, self.n_layer
        heads = self._int_per_layer("attention.head_count", 0)
        heads_kv = self._int_per_layer("attention.head_count_kv", -1)
        head0 = next((h for h in heads if h > 0), 0)
        out = [0] * n
        if head0 > 0:
            dim = self.info.n_embd // head0 if self.info.n_embd else 0
            k_len = self._int_per_layer("attention.key_length", dim)
            v_len = self._int_per_layer("attention.value_length", dim)
            swa = None
            if self.rule.swa is not None:
                ctx = SplitContext(arch, n, 0, n, dict(self.meta), self.info.n_vocab)
                swa = self.rule.swa.layers(ctx)
            n_swa = int(self.meta.get(f"{arch}.attention.sliding_window", 0) or 0)
            swa_cells = min(self.n_ctx, n_swa * self.n_seqs + self.n_batch) if n_swa > 0 else self.n_ctx
            for il in range(n):
                hk = heads[il] if heads_kv[il] < 0 else heads_kv[il]
                if heads[il] <= 0 or hk <= 0:
                    continue
                cells = swa_cells if swa is not None and swa[il] else self.n_ctx
                out[il] = cells * hk * (k_len[il] + v_len[il]) * 2
        inner = int(self.meta.get(f"{arch}.ssm.inner_size", 0) or 0)
        if inner:
            conv = int(self.meta.get(f"{arch}.ssm.conv_kernel", 4) or 4)
            state = int(self.meta.get(f"{arch}.ssm.state_size", 16) or 16)
            per = self.n_seqs * ((conv - 1) + state) * inner * 4
            out = [o + per for o in out]
        return out

    # -- per stage
    def stage_bytes(self, a: int, b: int) -> int:
        """Estimated memory of a stage holding layers [a, b)."""
        first, last = a == 0, b == self.n_layer
        total = self._lp[b] - self._lp[a] + self._kp[b] - self._kp[a] + self.global_bytes + self.compute_bytes
        if first:
            total += self.embd_bytes + self.vision_bytes
            if not last:
                total += self.first_out_bytes
                if self.rule.output_required:
                    total += self.head_bytes
        if last:
            total += self.head_bytes + self.last_out_bytes
        return total

    def stage_units(self, a: int, b: int) -> float:
        """Compute of a stage in layer-equivalents (LM head counted on the last stage)."""
        return self._up[b] - self._up[a] + (self.head_units if b == self.n_layer else 0.0)

    def refusal(self, a: int, b: int) -> Optional[str]:
        """Why the architecture's split rule refuses a stage [a, b) (None: allowed)."""
        if a == 0 and b == self.n_layer:
            return None  # the whole model: no partial GGUF is written
        key = (a, b)
        if key not in self._refusals:
            ctx = SplitContext(self.info.arch, self.n_layer, a, b, self.meta, self.info.n_vocab)
            self._refusals[key] = self.rule.refusal(ctx)
        return self._refusals[key]

    def tables(self) -> Tuple[List[List[int]], List[List[float]], List[List[Optional[bool]]]]:
        """stage_bytes[a][b], stage_units[a][b] and (filled on demand) whether the rule allows [a, b)."""
        if self._tables is None:
            r = range(self.n_layer + 1)
            self._tables = ([[self.stage_bytes(a, b) if a < b else 0 for b in r] for a in r],
                            [[self.stage_units(a, b) if a < b else 0.0 for b in r] for a in r],
                            [[None] * (self.n_layer + 1) for _ in r])
        return self._tables

    def min_host_bytes(self) -> int:
        """Least memory that holds one (middle) layer with its KV and buffers."""
        return min(self.layer_bytes[i] + self.kv_bytes[i] for i in range(self.n_layer)) + self.global_bytes \
            + self.compute_bytes

    def min_total_bytes(self, k: int) -> int:
        """Least total memory of a k-stage pipeline (each stage pays its own buffers)."""
        k = max(1, min(k, self.n_layer))
        total = self._lp[-1] + self._kp[-1] + self.embd_bytes + self.head_bytes + self.last_out_bytes
        total += k * (self.global_bytes + self.compute_bytes) + self.vision_bytes
        if k > 1:
            total += self.first_out_bytes + (self.head_bytes if self.rule.output_required else 0)
        return total


# ---------------------------------------------------------------- the plan

class Stage(NamedTuple):
    host: HostSpec
    layers: LayerRange
    est_bytes: int
    est_sec: float


@dataclass
class Plan:
    """Pipelines (each a list of stages in layer order) and the hosts left out, with reasons."""

    model: ModelInfo
    n_ctx: int
    n_seqs: int
    pipelines: List[List[Stage]]
    unused: List[Tuple[HostSpec, str]] = field(default_factory=list)
    vision_bytes: int = 0   # a vision projector's memory, counted on each pipeline's first stage

    @staticmethod
    def bottleneck(pipeline: Sequence[Stage]) -> int:
        return max(range(len(pipeline)), key=lambda i: pipeline[i].est_sec)

    def describe(self) -> str:
        m = self.model
        calibrated = all(s.host.calibrated for p in self.pipelines for s in p)
        lines = [f"model {m.name} ({m.arch}, {m.n_layer} layers), ctx {self.n_ctx}, {self.n_seqs} sequences: "
                 f"{len(self.pipelines)} pipeline(s)", f"split: {split_support(m.arch)[1]}"]
        if not calibrated:
            lines.append("times use default speeds (cuda 10x cpu), not measurements: compare them, don't trust them")
        if self.vision_bytes:
            lines.append(f"vision projector on each first stage: {fmt_bytes(self.vision_bytes)} (weights, encoder "
                         "buffers, stored images; counted in its memory)")
        for ip, p in enumerate(self.pipelines, 1):
            b = self.bottleneck(p)
            step = p[b].est_sec
            lines.append("")
            lines.append(f"pipeline {ip}: {len(p)} stage(s), ~{_fmt_sec(step)} per step "
                         f"(bottleneck: stage {b + 1} on {p[b].host.name})")
            rows = [("stage", "host", "backend", "layers", "memory used / available", "time/step", "of bottleneck")]
            for i, s in enumerate(p, 1):
                rows.append((str(i), s.host.name, s.host.backend, f"{s.layers} ({s.layers.n})",
                             f"{fmt_bytes(s.est_bytes)} / {fmt_bytes(s.host.memory_bytes)}",
                             _fmt_sec(s.est_sec), f"{100 * s.est_sec / step:.0f}%" + (" *" if i - 1 == b else "")))
            widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
            for r in rows:
                lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            choice = self.link_choice(p)
            if choice is not None:
                lines.append(f"  links (gateway with --codec auto, no --micro-batches): {choice.why}")
        if self.unused:
            lines.append("")
            lines.append("unused hosts:")
            for h, why in self.unused:
                lines.append(f"  {h.name} ({h.backend}, {fmt_bytes(h.memory_bytes)}): {why}")
        return "\n".join(lines)

    def link_choice(self, pipeline: Sequence[Stage]) -> Optional["link_policy.LinkChoice"]:
        """What a gateway would choose for this pipeline (:mod:`.link_policy`), from the links the hosts were given
        with (``mbit=``/``rtt_ms=``: the link into each stage's host after the first); None if none was given. The
        step path is taken as the sum of those round trips (the gateway next to the first stage)."""
        later = [s.host for s in pipeline[1:]]
        if not any(h.mbit or h.rtt_ms for h in later):
            return None
        links = [{"mbit": h.mbit} for h in later if h.mbit]
        rtts = [h.rtt_ms for h in later if h.rtt_ms]
        infos = [{"n_embd": self.model.n_embd, "lanes": 1, "backend": s.host.backend} for s in pipeline]
        return link_policy.choose(codec_opt=link_policy.AUTO, mb_opt=None, links=links,
                                  path_rtt_s=sum(rtts) / 1e3 if rtts else None, infos=infos, rows=self.n_seqs)

    def to_dict(self) -> dict:
        def host(h: HostSpec) -> dict:
            return {"name": h.name, "backend": h.backend, "memory_bytes": h.memory_bytes,
                    "sec_per_layer": h.sec_per_layer, "address": h.address, "mbit": h.mbit, "rtt_ms": h.rtt_ms}

        return {
            "model": {"name": self.model.name, "arch": self.model.arch, "n_layer": self.model.n_layer,
                      "path": self.model.path, "fingerprint": self.model.fingerprint},
            "n_ctx": self.n_ctx, "n_seqs": self.n_seqs, "vision_bytes": self.vision_bytes,
            "pipelines": [{
                "bottleneck_stage": self.bottleneck(p),
                "step_sec": p[self.bottleneck(p)].est_sec,
                "stages": [{"host": host(s.host), "layers": str(s.layers), "start": s.layers.start,
                            "stop": s.layers.stop, "est_bytes": s.est_bytes, "est_sec": s.est_sec} for s in p],
                "link_choice": (lambda c: c.summary() if c is not None else None)(self.link_choice(p)),
            } for p in self.pipelines],
            "unused": [{"host": host(h), "reason": why} for h, why in self.unused],
        }


def _split(cost: ModelCost, hosts: Sequence[HostSpec],
           bound: float = math.inf) -> Optional[Tuple[Tuple[float, float], List[int]]]:
    """Best contiguous split of all layers over ``hosts`` in this order (every host >= 1 layer).

    Minimizes the largest stage time, then the sum of squared stage times, under each host's memory
    and the architecture's rule. Returns ((bottleneck, sum of squares), bounds) or None if none fits.
    With ``bound``, only splits whose stages all take <= bound are considered (None: none such), which
    prunes the search when only a split that beats a known one matters. O(k n^2) for k hosts and n
    layers, less where memory or the bound cuts a stage short.
    """
    n, k = cost.n_layer, len(hosts)
    sb, su, ok = cost.tables()
    inf = math.inf
    # No host holds more layers than its memory (and the bound) allows at the cheapest layer's bytes (units):
    # so stage j ends no later than hosts 0..j can reach and no earlier than hosts j+1.. can cover from.
    caps = []
    for h in hosts:
        cap = n if cost.min_layer_bytes <= 0 else (h.memory_bytes - cost.global_bytes - cost.compute_bytes) \
            // cost.min_layer_bytes
        if bound < inf and cost.min_layer_units > 0:
            cap = min(cap, int(bound / (h.speed * cost.min_layer_units) * (1 + 1e-9)))
        caps.append(min(n, cap))
    if min(caps) < 1 or sum(caps) < n:
        return None
    reached, later = 0, sum(caps)
    lo_p = hi_p = 0  # the previous stage's reachable ends lie in [lo_p, hi_p]
    # bot[b], sq[b]: best (bottleneck, sum of squares) of stages 0..j covering layers [0, b); prev[j][b]: its start
    bot_p: List[float] = []
    sq_p: List[float] = []
    prev: List[List[int]] = []
    for j, h in enumerate(hosts):
        mem, speed = h.memory_bytes, h.speed
        bot, sq, pv = [inf] * (n + 1), [inf] * (n + 1), [-1] * (n + 1)
        reached, later = reached + caps[j], later - caps[j]
        b_lo, b_hi = max(j + 1, n - later), min(n - (k - 1 - j), reached)
        if j == k - 1:
            b_lo = n
        lo, hi = n + 1, -1
        for b in range(b_lo, b_hi + 1):
            best_b = best_s = inf
            arg = -1
            # growing stage: memory and time only rise; starts outside [lo_p, hi_p] are unreachable
            for a in (range(min(b - 1, hi_p), max(j, lo_p) - 1, -1) if j else (0,)):
                if sb[a][b] > mem:
                    break
                t = speed * su[a][b]
                if t > bound:
                    break
                if j:
                    b0 = bot_p[a]
                    if b0 == inf:
                        continue
                    s0 = sq_p[a]
                else:
                    b0 = s0 = 0.0
                allowed = ok[a][b]
                if allowed is None:
                    allowed = ok[a][b] = cost.refusal(a, b) is None
                if not allowed:
                    continue
                m = t if t > b0 else b0
                s = s0 + t * t
                if m < best_b or (m == best_b and s < best_s):
                    best_b, best_s, arg = m, s, a
            bot[b], sq[b], pv[b] = best_b, best_s, arg
            if arg >= 0:
                lo, hi = min(lo, b), b
        if hi < 0:
            return None
        lo_p, hi_p = lo, hi
        bot_p, sq_p = bot, sq
        prev.append(pv)
    if bot_p[n] == inf:
        return None
    bounds, b = [n], n
    for j in range(k - 1, -1, -1):
        b = prev[j][b]
        bounds.append(b)
    return (bot_p[n], sq_p[n]), bounds[::-1]


Score = Tuple[float, float]
Split = Optional[Tuple[Score, List[int]]]
#: What placement sees of a host: hosts with the same (memory, speed) are interchangeable.
ClassKey = Tuple[int, float]
#: _split results by class order, with the bound they were computed under.
Memo = Dict[Tuple[ClassKey, ...], Tuple[Split, float]]


def _count_orders(counts: Sequence[int], k: int, cap: int) -> int:
    """Distinct sequences of length k using class i at most counts[i] times; any value above cap reads cap + 1."""
    if len(counts) >= k:  # at least P(classes, k) sequences of distinct classes
        p = 1
        for i in range(k):
            p *= len(counts) - i
            if p > cap:
                return cap + 1
    f = [1] + [0] * k  # f[j]: sequences of length j over the classes so far
    for c in counts:
        g = f[:]
        for j in range(k):
            if f[j]:
                comb = 1
                for m in range(1, min(c, k - j) + 1):
                    comb = comb * (j + m) // m  # C(j + m, m): where the m new items go
                    g[j + m] += f[j] * comb
        f = [min(x, cap + 1) for x in g]
    return f[k]


class _Search:
    """Pipeline search over the free hosts, grouped into classes of interchangeable hosts."""

    def __init__(self, cost: ModelCost, hosts: Sequence[HostSpec], memo: Memo):
        self.cost, self.hosts, self.memo = cost, hosts, memo
        index: Dict[ClassKey, int] = {}
        self.pos: List[List[int]] = []  # the hosts of each class, as indices into hosts (input order)
        self.keys: List[ClassKey] = []
        for i, h in enumerate(hosts):
            key = (h.memory_bytes, h.speed)
            if key not in index:
                index[key] = len(self.keys)
                self.keys.append(key)
                self.pos.append([])
            self.pos[index[key]].append(i)
        self.counts = [len(p) for p in self.pos]
        self.mem = [key[0] for key in self.keys]
        self.speed = [key[1] for key in self.keys]
        self.reps = [hosts[p[0]] for p in self.pos]
        self.splits = 0  # _split evaluations (memo misses) for the current pipeline size
        self._layers: Optional[List[int]] = None
        self._by_mem: Optional[List[int]] = None

    # -- evaluation
    def evaluate(self, seq: Tuple[int, ...], bound: float = math.inf) -> Split:
        """_split of a class order (see there for ``bound``), memoized: a result is exact; None under a bound
        means nothing within that bound, so it answers again for any smaller bound."""
        key = tuple(self.keys[c] for c in seq)
        hit = self.memo.get(key)
        if hit is not None and (hit[0] is not None or hit[1] >= bound):
            return hit[0]
        self.splits += 1
        got = _split(self.cost, [self.reps[c] for c in seq], bound)
        self.memo[key] = (got, bound)
        return got

    def lower_bound(self, seq: Sequence[int]) -> float:
        """A bottleneck no split over this order beats, in O(k): all compute spread in proportion to speed
        (ignoring memory and whole layers); the last stage runs at least the last layer and the LM head."""
        cost = self.cost
        units = cost.stage_units(0, cost.n_layer)
        return max(units / sum(1.0 / self.speed[c] for c in seq),
                   self.speed[seq[-1]] * cost.stage_units(cost.n_layer - 1, cost.n_layer),
                   self.speed[seq[0]] * cost.stage_units(0, 1))

    def hosts_of(self, seq: Sequence[int]) -> List[HostSpec]:
        """The hosts of a class order: each class's hosts in input order."""
        used = [0] * len(self.keys)
        out = []
        for c in seq:
            out.append(self.hosts[self.pos[c][used[c]]])
            used[c] += 1
        return out

    # -- enumeration
    def orders(self, counts: Sequence[int], k: int, need: int) -> Iterator[Tuple[int, ...]]:
        """Every distinct order of k classes (class c at most counts[c] times, memory >= need), in the order in
        which itertools.permutations over the hosts would first meet each: so ties go as they always went."""
        top = sorted((m for c, m in enumerate(self.mem) for _ in range(counts[c])), reverse=True)
        room = [0] * (k + 1)  # room[r]: most memory r more hosts can add
        for r in range(1, k + 1):
            room[r] = room[r - 1] + (top[r - 1] if r - 1 < len(top) else 0)
        used = [0] * len(self.keys)
        seq: List[int] = []

        def rec(mem: int) -> Iterator[Tuple[int, ...]]:
            r = k - len(seq)
            if r == 0:
                if mem >= need:
                    yield tuple(seq)
                return
            if mem + room[r] < need:
                return
            nxt = sorted((self.pos[c][used[c]], c) for c in range(len(self.keys)) if used[c] < counts[c])
            for _, c in nxt:
                used[c] += 1
                seq.append(c)
                yield from rec(mem + self.mem[c])
                seq.pop()
                used[c] -= 1

        return rec(0)

    def set_orders(self, ms: Sequence[int], need: int) -> List[Tuple[int, ...]]:
        """Orders to try for one multiset of classes: all of them if few, else the memory-heavy ends
        (first and last stages hold the embeddings and the head) filled in memory order."""
        counts = [0] * len(self.keys)
        for c in ms:
            counts[c] += 1
        k = len(ms)
        n_orders = math.factorial(k)
        for c in set(ms):
            n_orders //= math.factorial(counts[c])
        if n_orders <= SET_ORDERS:
            return list(self.orders(counts, k, need))
        by_mem = sorted(ms, key=lambda c: (-self.mem[c], self.speed[c], c))
        ends = list(dict.fromkeys(by_mem[:3]))
        out = [tuple(by_mem), tuple(by_mem[::-1])]
        for first in ends:
            for last in ends:
                rest = list(by_mem)
                rest.remove(first)
                if last not in rest:
                    continue
                rest.remove(last)
                out.append((first, *rest, last))
                out.append((first, *sorted(rest, key=lambda c: (self.speed[c], -self.mem[c], c)), last))
        return list(dict.fromkeys(out))

    def take(self, ranking: Sequence[int], counts: Sequence[int], k: int) -> Tuple[int, ...]:
        """The first k hosts along a ranking of classes, as a multiset (sorted class indices)."""
        ms: List[int] = []
        for c in ranking:
            ms.extend([c] * min(counts[c], k - len(ms)))
            if len(ms) == k:
                break
        return tuple(sorted(ms))

    # -- hosts worth considering
    def pareto_layers(self) -> List[int]:
        """Non-dominated sorting of the classes on (more memory, faster): layer 0 is dominated by none."""
        if self._layers is None:
            layer = [-1] * len(self.keys)
            left = sorted(range(len(self.keys)), key=lambda c: (-self.mem[c], self.speed[c]))
            depth = 0
            while left:
                fastest, rest = math.inf, []
                for c in left:  # more (or equal) memory comes first: dominated unless strictly faster
                    if self.speed[c] < fastest:
                        fastest, layer[c] = self.speed[c], depth
                    else:
                        rest.append(c)
                left, depth = rest, depth + 1
            self._layers = layer
        return self._layers

    def by_memory(self) -> List[int]:
        """Classes, most memory first (then fastest, then as given)."""
        if self._by_mem is None:
            self._by_mem = sorted(range(len(self.keys)), key=lambda c: (-self.mem[c], self.speed[c], c))
        return self._by_mem

    def rankings(self, pool: Sequence[int]) -> List[List[int]]:
        """Rankings of the pool's classes from fastest-first to most-memory-first: at a step time T a class can
        take about min(T / sec_per_layer, layers that fit in its memory) layers; one ranking per T swept."""
        cost = self.cost
        per_layer = (sum(cost.layer_bytes) + sum(cost.kv_bytes)) / max(1, cost.n_layer)
        fixed = cost.global_bytes + cost.compute_bytes
        fit = {c: max(0.0, (self.mem[c] - fixed) / max(1.0, per_layer)) for c in pool}
        out = [sorted(pool, key=lambda c: (self.speed[c], -self.mem[c], c)),
               sorted(pool, key=lambda c: (-self.mem[c], self.speed[c], c))]
        ts = sorted({self.speed[c] * fit[c] for c in pool if fit[c] > 0})
        if len(ts) > SWEEP:
            ts = [ts[round(i * (len(ts) - 1) / (SWEEP - 1))] for i in range(SWEEP)]
        for t in ts:
            out.append(sorted(pool, key=lambda c: (-min(t / self.speed[c], fit[c]), -self.mem[c], self.speed[c], c)))
        return out

    # -- one pipeline size
    def best(self, k: int, need: int) -> Optional[Tuple[Split, Tuple[int, ...]]]:
        """The best order of k hosts found (None: none fits), within the evaluation bounds."""
        self.splits = 0
        found: List = [None, None]  # (score, bounds), seq

        def consider(seq: Tuple[int, ...]) -> bool:  # only a split as good as the best so far can win
            bound = math.inf if found[0] is None else found[0][0][0]
            if bound < math.inf and self.lower_bound(seq) > bound * (1 + 1e-9):
                return False
            got = self.evaluate(seq, bound)
            if got is not None and (found[0] is None or got[0] < found[0][0]):
                found[0], found[1] = got, seq
                return True
            return False

        # probe: the k hosts with the most memory. More memory never hurts a fixed order, so if no order of these
        # fits, no k hosts fit.
        top = self.take(self.by_memory(), self.counts, k)
        exact = _count_orders(self.counts, k, EXACT_ORDERS) <= EXACT_ORDERS
        if exact:
            probe_counts = [0] * len(self.keys)
            for c in top:
                probe_counts[c] += 1
            probe = list(self.orders(probe_counts, k, need))
        else:
            probe = self.set_orders(top, need)
        if not any(self.evaluate(seq) is not None for seq in probe):
            return None
        if exact:  # few distinct orders: all of them, in the order the old exhaustive search met them
            for seq in self.orders(self.counts, k, need):
                consider(seq)
            return found[0], found[1]
        # Only the first k Pareto layers can matter: a host in a deeper layer is dominated by a chain of >= k
        # classes, one of which is not in the pipeline and would do at least as well in its place.
        layer = self.pareto_layers()
        pool = [c for c in range(len(self.keys)) if layer[c] < k]
        counts = [self.counts[c] if layer[c] < k else 0 for c in range(len(self.keys))]
        if _count_orders([counts[c] for c in pool], k, EXACT_ORDERS) <= EXACT_ORDERS:
            for seq in self.orders(counts, k, need):
                consider(seq)
            return found[0], found[1]
        # heuristic: seeds from the speed/memory sweep, then a bounded local search (swaps, replacements)
        for seq in probe:
            consider(seq)
        sets = dict.fromkeys(self.take(r, counts, k) for r in self.rankings(pool))
        for ms in sets:
            if sum(self.mem[c] for c in ms) >= need:
                for seq in self.set_orders(ms, need):
                    if self.splits >= MAX_SPLITS:
                        break
                    consider(seq)
        pool.sort(key=lambda c: (-self.mem[c], self.speed[c], c))
        attempts = 0
        improved = found[1] is not None
        while improved and self.splits < MAX_SPLITS and attempts < 8 * MAX_SPLITS:
            improved = False
            seq = found[1]
            used = [0] * len(self.keys)
            for c in seq:
                used[c] += 1
            mem = sum(self.mem[c] for c in seq)
            swaps = (seq[:i] + (seq[j],) + seq[i + 1:j] + (seq[i],) + seq[j + 1:]
                     for i in range(k) for j in range(i + 1, k) if seq[i] != seq[j])
            replacements = (seq[:i] + (d,) + seq[i + 1:] for i in range(k) for d in pool
                            if used[d] < counts[d] and d != seq[i] and mem - self.mem[seq[i]] + self.mem[d] >= need
                            and (self.mem[d] > self.mem[seq[i]] or self.speed[d] < self.speed[seq[i]]))  # undominated
            for move in itertools.chain(swaps, replacements):
                if self.splits >= MAX_SPLITS or attempts >= 8 * MAX_SPLITS:
                    break
                attempts += 1
                if consider(move):
                    improved = True
                    break
        return found[0], found[1]


def _pipeline(cost: ModelCost, hosts: List[HostSpec],
              memo: Optional[Memo] = None) -> Optional[List[Stage]]:
    """The best pipeline over the fewest of ``hosts`` (any order), or None if they cannot hold the model.

    ``memo`` keeps :func:`_split` results by class order across calls (plan() passes one for its replicas)."""
    search = _Search(cost, hosts, {} if memo is None else memo)
    by_mem = sorted((h.memory_bytes for h in hosts), reverse=True)
    for k in range(1, min(len(hosts), cost.n_layer) + 1):
        need = cost.min_total_bytes(k)
        if sum(by_mem[:k]) < need:
            continue
        got = search.best(k, need)
        if got is not None and got[0] is not None:
            (_, bounds), seq = got
            chosen = search.hosts_of(seq)
            return [Stage(h, LayerRange(a, b), cost.stage_bytes(a, b), h.speed * cost.stage_units(a, b))
                    for h, a, b in zip(chosen, bounds, bounds[1:])]
    return None


def plan(model_path: str, hosts: Sequence[HostSpec], n_ctx: int = 8192, n_seqs: int = 16,
         n_batch: int = N_BATCH, mmproj: Optional[str] = None) -> Plan:
    """Place the model's layers over ``hosts``: one pipeline on the fewest hosts that hold it, then
    replica pipelines from the hosts left over (see the module doc for the policy and memory model)."""
    if not hosts:
        raise PlacementError("no hosts given")
    hosts = [h if h.name else replace(h, name=f"host{i}") for i, h in enumerate(hosts, 1)]
    names = [h.name for h in hosts]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise PlacementError(f"duplicate host name(s): {', '.join(dup)}")
    cost = ModelCost(model_path, n_ctx=n_ctx, n_seqs=n_seqs, n_batch=n_batch, mmproj=mmproj)
    one = cost.min_host_bytes()
    unused: List[Tuple[HostSpec, str]] = []
    free: List[HostSpec] = []
    for h in hosts:
        if h.memory_bytes < one:
            unused.append((h, f"{TOO_SMALL} {fmt_bytes(one)} for one layer + KV, has {fmt_bytes(h.memory_bytes)}"))
        else:
            free.append(h)
    pipelines: List[List[Stage]] = []
    memo: Memo = {}  # _split by class order, shared by the replicas
    while free:  # each round uses >= 1 host: at most len(hosts) rounds
        p = _pipeline(cost, free, memo)
        if p is None:
            break
        pipelines.append(p)
        used = {s.host.name for s in p}
        free = [h for h in free if h.name not in used]
    if not pipelines:
        have = sum(h.memory_bytes for h in free)
        k = max(1, min(len(free), cost.n_layer))
        need = cost.min_total_bytes(k)
        where = (f"{len(free)} usable host(s) with {fmt_bytes(have)} in total" if free
                 else "no host can hold even one layer")
        if need > have:
            msg = (f"the hosts cannot hold {cost.info.name}: it needs at least {fmt_bytes(need)} "
                   f"(weights, KV cache for ctx {n_ctx} and buffers over {k} stage(s)), {where}: "
                   f"{fmt_bytes(need - have)} missing")
        else:
            msg = (f"the hosts cannot hold {cost.info.name}: {where} would be enough in sum "
                   f"({fmt_bytes(need)} needed), but no split into contiguous layer ranges fits each host's memory"
                   f"{' and the ' + cost.info.arch + ' split rules' if cost.rule.checks else ''}")
        if unused:
            msg += "; excluded: " + "; ".join(f"{h.name}: {why}" for h, why in unused)
        raise PlacementError(msg)
    for h in free:
        unused.append((h, "left over: the remaining hosts cannot hold another whole pipeline"))
    order = {h.name: i for i, h in enumerate(hosts)}
    unused.sort(key=lambda x: order[x[0].name])
    return Plan(cost.info, n_ctx, n_seqs, pipelines, unused, cost.vision_bytes)
