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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..model.archs import SplitContext, UnsupportedArchitecture, rule_for
from ..model.gguf_meta import GGUFFile, GGUFFormatError
from ..model.split import LayerRange, ModelInfo, SplitError, read_model_info, stage_costs

BACKENDS = ("cuda", "cpu")
#: Default seconds per layer-step when a host has no measured ``sec_per_layer``: only the ratio
#: matters for placement (cuda 10x faster than cpu); the times printed are then nominal.
DEFAULT_SEC_PER_LAYER = {"cuda": 1e-4, "cpu": 1e-3}
COMPUTE_FIXED = 32 << 20            # backend + graph overhead per stage
OUTPUT_BUFFER_BUDGET = 128 << 20    # as stage/engine.py: non-last stages decode in chunks under this
N_BATCH = 512                       # rows per llama_decode (stage --batch default)
MAX_CANDIDATES = 2000               # host orders evaluated per pipeline size

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
    """Parse the CLI form ``MEMORY,BACKEND[,name=N][,sec_per_layer=S][,address=A]``.

    E.g. ``24GB,cuda``, ``8GiB,cpu``, ``16G,cuda,name=box1``, ``8G,cpu,sec_per_layer=0.002``.
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
               "address": "address", "addr": "address"}
    for p in parts[2:]:
        key, sep, value = p.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in aliases or not value.strip():
            raise ValueError(f"bad host {text!r}: unknown option {p!r} (use name=, sec_per_layer=, address=)")
        if aliases[key] == "sec_per_layer":
            try:
                kw["sec_per_layer"] = float(value)
            except ValueError:
                raise ValueError(f"bad host {text!r}: sec_per_layer must be a number, got {value!r}") from None
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

    def __init__(self, model_path: str, n_ctx: int = 8192, n_seqs: int = 16, n_batch: int = N_BATCH):
        if n_ctx < 1 or n_seqs < 1 or n_batch < 1:
            raise PlacementError("n_ctx, n_seqs and n_batch must be >= 1")
        try:
            reader = GGUFFile(model_path)
            self.info: ModelInfo = read_model_info(model_path, reader)
            self.rule = rule_for(self.info.arch)
            layer_elems, head_elems = stage_costs(model_path)
        except (GGUFFormatError, SplitError, UnsupportedArchitecture) as e:
            raise PlacementError(str(e)) from None
        info, arch = self.info, self.info.arch
        self.n_ctx, self.n_seqs, self.n_batch = n_ctx, n_seqs, n_batch
        n = info.n_layer
        self.meta = {k: reader.value(k) for k in reader.fields if k.startswith(arch + ".")}
        self.layer_bytes = [0] * n
        embd = head = out_other = other = 0
        for t in reader.tensors:
            m = _BLK.match(t.name)
            if m:
                il = int(m.group(1))
                if 0 <= il < n:
                    self.layer_bytes[il] += t.nbytes
            elif t.name == "token_embd.weight":
                embd = t.nbytes
            elif t.name == "output.weight":
                head = t.nbytes
            elif t.name.startswith("output"):  # output_norm.weight/bias, output.bias
                out_other += t.nbytes
            else:
                other += t.nbytes
        self.embd_bytes = embd
        self.head_bytes = (head or embd) + out_other
        self.global_bytes = other  # every stage keeps these (rope_freqs, ...)
        self.kv_bytes = self._kv_per_layer()
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
            total += self.embd_bytes
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

    def min_host_bytes(self) -> int:
        """Least memory that holds one (middle) layer with its KV and buffers."""
        return min(self.layer_bytes[i] + self.kv_bytes[i] for i in range(self.n_layer)) + self.global_bytes \
            + self.compute_bytes

    def min_total_bytes(self, k: int) -> int:
        """Least total memory of a k-stage pipeline (each stage pays its own buffers)."""
        k = max(1, min(k, self.n_layer))
        total = self._lp[-1] + self._kp[-1] + self.embd_bytes + self.head_bytes + self.last_out_bytes
        total += k * (self.global_bytes + self.compute_bytes)
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

    @staticmethod
    def bottleneck(pipeline: Sequence[Stage]) -> int:
        return max(range(len(pipeline)), key=lambda i: pipeline[i].est_sec)

    def describe(self) -> str:
        m = self.model
        calibrated = all(s.host.calibrated for p in self.pipelines for s in p)
        lines = [f"model {m.name} ({m.arch}, {m.n_layer} layers), ctx {self.n_ctx}, {self.n_seqs} sequences: "
                 f"{len(self.pipelines)} pipeline(s)"]
        if not calibrated:
            lines.append("times use default speeds (cuda 10x cpu), not measurements: compare them, don't trust them")
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
        if self.unused:
            lines.append("")
            lines.append("unused hosts:")
            for h, why in self.unused:
                lines.append(f"  {h.name} ({h.backend}, {fmt_bytes(h.memory_bytes)}): {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def host(h: HostSpec) -> dict:
            return {"name": h.name, "backend": h.backend, "memory_bytes": h.memory_bytes,
                    "sec_per_layer": h.sec_per_layer, "address": h.address}

        return {
            "model": {"name": self.model.name, "arch": self.model.arch, "n_layer": self.model.n_layer,
                      "path": self.model.path, "fingerprint": self.model.fingerprint},
            "n_ctx": self.n_ctx, "n_seqs": self.n_seqs,
            "pipelines": [{
                "bottleneck_stage": self.bottleneck(p),
                "step_sec": p[self.bottleneck(p)].est_sec,
                "stages": [{"host": host(s.host), "layers": str(s.layers), "start": s.layers.start,
                            "stop": s.layers.stop, "est_bytes": s.est_bytes, "est_sec": s.est_sec} for s in p],
            } for p in self.pipelines],
            "unused": [{"host": host(h), "reason": why} for h, why in self.unused],
        }


def _split(cost: ModelCost, hosts: Sequence[HostSpec]) -> Optional[Tuple[Tuple[float, float], List[int]]]:
    """Best contiguous split of all layers over ``hosts`` in this order (every host >= 1 layer).

    Minimizes the largest stage time, then the sum of squared stage times, under each host's memory
    and the architecture's rule. Returns ((bottleneck, sum of squares), bounds) or None if none fits.
    """
    n, k = cost.n_layer, len(hosts)
    INF = (math.inf, math.inf)
    # best[j][b]: stages 0..j cover layers [0, b)
    best: List[List[Tuple[float, float]]] = [[INF] * (n + 1) for _ in range(k)]
    prev: List[List[int]] = [[-1] * (n + 1) for _ in range(k)]
    for j, h in enumerate(hosts):
        b_lo, b_hi = j + 1, n - (k - 1 - j)
        if j == k - 1:
            b_lo = n
        for b in range(b_lo, b_hi + 1):
            a_min = 0 if j == 0 else j
            a_max = 0 if j == 0 else b - 1
            for a in range(a_max, a_min - 1, -1):  # growing stage: memory only rises, so stop at the first miss
                if cost.stage_bytes(a, b) > h.memory_bytes:
                    break
                base = (0.0, 0.0) if j == 0 else best[j - 1][a]
                if base[0] == math.inf or cost.refusal(a, b) is not None:
                    continue
                t = h.speed * cost.stage_units(a, b)
                cand = (max(base[0], t), base[1] + t * t)
                if cand < best[j][b]:
                    best[j][b], prev[j][b] = cand, a
    if best[k - 1][n][0] == math.inf:
        return None
    bounds, b = [n], n
    for j in range(k - 1, -1, -1):
        b = prev[j][b]
        bounds.append(b)
    return best[k - 1][n], bounds[::-1]


def _pipeline(cost: ModelCost, hosts: List[HostSpec]) -> Optional[List[Stage]]:
    """The best pipeline over the fewest of ``hosts`` (any order), or None if they cannot hold the model."""
    by_mem = sorted((h.memory_bytes for h in hosts), reverse=True)
    for k in range(1, min(len(hosts), cost.n_layer) + 1):
        need = cost.min_total_bytes(k)
        if sum(by_mem[:k]) < need:
            continue
        best = None
        seen = set()
        for tried, order in enumerate(itertools.permutations(range(len(hosts)), k)):
            if tried >= 20 * MAX_CANDIDATES and best is not None:
                break
            chosen = [hosts[i] for i in order]
            sig = tuple((h.backend, h.memory_bytes, h.speed) for h in chosen)
            if sig in seen or sum(h.memory_bytes for h in chosen) < need:
                continue
            seen.add(sig)
            if len(seen) > MAX_CANDIDATES:
                break
            got = _split(cost, chosen)
            if got is not None and (best is None or got[0] < best[0]):
                best = (got[0], chosen, got[1])
        if best is not None:
            _, chosen, bounds = best
            return [Stage(h, LayerRange(a, b), cost.stage_bytes(a, b), h.speed * cost.stage_units(a, b))
                    for h, a, b in zip(chosen, bounds, bounds[1:])]
    return None


def plan(model_path: str, hosts: Sequence[HostSpec], n_ctx: int = 8192, n_seqs: int = 16,
         n_batch: int = N_BATCH) -> Plan:
    """Place the model's layers over ``hosts``: one pipeline on the fewest hosts that hold it, then
    replica pipelines from the hosts left over (see the module doc for the policy and memory model)."""
    if not hosts:
        raise PlacementError("no hosts given")
    hosts = [h if h.name else replace(h, name=f"host{i}") for i, h in enumerate(hosts, 1)]
    names = [h.name for h in hosts]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise PlacementError(f"duplicate host name(s): {', '.join(dup)}")
    cost = ModelCost(model_path, n_ctx=n_ctx, n_seqs=n_seqs, n_batch=n_batch)
    one = cost.min_host_bytes()
    unused: List[Tuple[HostSpec, str]] = []
    free: List[HostSpec] = []
    for h in hosts:
        if h.memory_bytes < one:
            unused.append((h, f"{TOO_SMALL} {fmt_bytes(one)} for one layer + KV, has {fmt_bytes(h.memory_bytes)}"))
        else:
            free.append(h)
    pipelines: List[List[Stage]] = []
    while free:
        p = _pipeline(cost, free)
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
    return Plan(cost.info, n_ctx, n_seqs, pipelines, unused)
