"""Per-architecture rules for splitting a GGUF model by layer range.

llama.cpp runs whole models. Cutting one into layer ranges breaks wherever an
architecture depends on the absolute layer index, on per-layer metadata arrays,
on how embedding input is scaled, on the layer count itself (model-size guesses),
or on tensors a stage drops. Each supported architecture gets an :class:`ArchRule`
here with its exactness level, each proven by ``tests/test_archs_exact.py``:

- ``exact``: the logits of a 2- and 3-stage chain are bit-identical to the whole model's
  (f32 wire);
- ``ulp``: the hidden state a later stage's graph starts from is within 1 float32 ulp of
  the whole model's at that layer (llama.cpp rescales any input there), with the measured
  max logit difference and greedy agreement stated in :attr:`ArchRule.measured`;
- ``bounded``: a later stage runs a graph that is the same computation in another order of sums
  (no route through llama.cpp keeps the order): greedy tokens identical on the test prompts and the
  logits within :attr:`ArchRule.max_logit_diff` of the whole model's, enforced by the test; how each bound
  was chosen is stated in :attr:`ArchRule.measured`.

Architectures that cannot be split at either level are listed in
:data:`UNSUPPORTED` with the reason; anything
not in :data:`RULES` is refused by :func:`rule_for` with a message naming the
supported ones. References like ``gemma2.cpp`` are files under ``src/models/`` of
the llama.cpp vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Per-layer metadata keys (without the "<arch>." prefix) that llama.cpp reads with
# get_key_or_arr(..., n_layer): when stored as arrays they must be sliced.
PER_LAYER_KEYS: Tuple[str, ...] = (
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
    "expert_feed_forward_length",
    "attention.sliding_window_pattern",
    "rope.pattern",
    "attention.rope_pattern",
    "attention.key_length",
    "attention.value_length",
)

TensorFix = Callable[["SplitContext", str, "object"], Optional["object"]]
# (ctx, tensor name, its row count) -> the order to write its rows in (rows[order]), or None to keep them; works on
# any ggml type (a row is whole quantization blocks), 1-D tensors have one element per row
RowOrder = Callable[["SplitContext", str, int], Optional["object"]]


@dataclass(frozen=True)
class SplitContext:
    """What a rule needs to know about the whole model and the stage being written."""

    arch: str
    n_layer: int          # layers of the whole model
    start: int            # first layer of the stage (absolute, inclusive)
    stop: int             # one past the last layer of the stage
    meta: Dict[str, object]  # the whole model's metadata values by key
    n_vocab: int = 0      # vocabulary size of the whole model (0: unknown)

    @property
    def n_stage(self) -> int:
        return self.stop - self.start

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.n_layer

    @property
    def is_middle(self) -> bool:
        return not self.is_first and not self.is_last

    def get(self, key: str, default: object = None) -> object:
        """Metadata value of ``<arch>.<key>``."""
        return self.meta.get(f"{self.arch}.{key}", default)

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.meta

    @property
    def layers(self) -> str:
        return f"{self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class SwaRule:
    """How llama.cpp derives the sliding-window layer pattern when no array is stored."""

    period: int
    dense_first: bool = False
    requires_key: Optional[str] = "attention.sliding_window"  # pattern only applies if this key > 0
    # True: a stage without SWA layers can turn SWA off by writing sliding_window = 0
    # (gemma3, olmo2 decide SWA from that key). False: llama.cpp keeps the SWA cache on
    # regardless and asserts is_swa_any() (gemma2, cohere2), so such a stage is refused.
    off_by_zero_window: bool = True

    def layers(self, ctx: SplitContext) -> Optional[List[bool]]:
        """Absolute per-layer SWA flags of the whole model, or None when SWA is off."""
        if self.requires_key is not None:
            n_swa = ctx.get(self.requires_key, 0) or 0
            if int(n_swa) <= 0:  # type: ignore[arg-type]
                return None
        stored = ctx.get("attention.sliding_window_pattern")
        if isinstance(stored, list):
            return [bool(x) for x in stored]
        period = int(stored) if isinstance(stored, (int, float)) else self.period
        if self.dense_first:
            return [period == 0 or (il % period != 0) for il in range(ctx.n_layer)]
        return [period == 0 or (il % period < period - 1) for il in range(ctx.n_layer)]


Check = Callable[[SplitContext], Optional[str]]

EXACT = "exact"
ULP = "ulp"
BOUNDED = "bounded"
LEVELS = (EXACT, ULP, BOUNDED)


@dataclass(frozen=True)
class ArchRule:
    """Everything the splitter and the stage engine must do differently for one architecture."""

    name: str
    swa: Optional[SwaRule] = None
    # EXACT, ULP or BOUNDED (see the module docstring); ULP and BOUNDED rules state what was measured (and, BOUNDED,
    # how the bound was chosen) in ``measured``.
    level: str = EXACT
    measured: str = ""
    # ULP and BOUNDED rules: the largest logit difference to the whole model tests/test_archs_exact.py allows (it
    # fails above it); None for EXACT rules (difference 0).
    max_logit_diff: Optional[float] = None
    # llama.cpp multiplies hidden states entering a non-first stage by this (it scales embedding
    # input even when the input is already a hidden state): the stage hands on the float32 x
    # whose product fl(x * scale) is nearest the hidden state (:func:`prescale`). Exact for
    # powers of two, else within 1 ulp (level ULP).
    hidden_input_scale: Callable[[SplitContext], float] = lambda ctx: 1.0
    # Write the stage under another llama.cpp architecture (None: keep it), for a graph that is the
    # same minus an input-only step (bloom's input LayerNorm) or whose choice depends on the layer
    # count (baichuan). Keys "<arch>.*" are renamed, ``stage_arch_kv`` added under the new name.
    stage_arch: Callable[[SplitContext], Optional[str]] = lambda ctx: None
    stage_arch_kv: Dict[str, object] = field(default_factory=dict)
    # Global tensors only the first stage's graph uses, dropped on later stages (with stage_arch).
    first_stage_only: Tuple[str, ...] = ()
    # Metadata overrides for non-first stages (e.g. granite's embedding_scale = 1).
    later_stage_kv: Dict[str, object] = field(default_factory=dict)
    # Metadata values computed per stage ("<arch>." is prepended); the source key's type is
    # kept when the key exists, else bool -> BOOL, float -> FLOAT32, int -> UINT32.
    stage_kv: Callable[[SplitContext], Dict[str, object]] = lambda ctx: {}
    # Tensor rewrites: name suffix -> fix(ctx, name, float32 array) returning a new array or None (no
    # change); called with None for a tensor that is not F32, it returns None or True (would change).
    tensor_fixes: Dict[str, TensorFix] = field(default_factory=dict)
    # Row reorders: name suffix -> RowOrder (e.g. glm4's q/k rows for the rotation pairs of M-RoPE).
    row_orders: Dict[str, RowOrder] = field(default_factory=dict)
    # Why every engine of this architecture (stages and whole model) runs without flash attention ("": it may).
    no_flash_attn: str = ""
    # Global tensors the graph adds to any input (e.g. gpt2's position_embd): written as
    # zeros (same type and size; all-zero bytes decode to 0) on non-first stages.
    zero_on_later_stages: Tuple[str, ...] = ()
    # llama.cpp requires output.weight (and output.bias where the arch has one) on every
    # stage: the first stage keeps them, middle stages get a one-row zero stand-in.
    output_required: bool = False
    # Reasons to refuse a layer range that cannot be exact (each returns None or a message).
    checks: Tuple[Check, ...] = ()
    # Global (non-block) tensors every stage keeps besides token_embd/output_norm/output.
    global_tensors: Tuple[str, ...] = ("rope_freqs.weight",)
    # Recurrent memory (mamba): non-last stages must create their llama.cpp context with
    # ``embeddings = true`` (every row an output). llama.cpp then splits a batch by sequence
    # (split_seq) and the captured hidden rows keep the batch order; with the default
    # split_equal, the rows of sequences of different lengths come back interleaved.
    # The batch must also hold each sequence's rows contiguously.
    embeddings_on_inner_stages: bool = False
    # Hybrid recurrent/attention memory (lfm2, granitehybrid): llama.cpp splits a batch into ubatches with
    # split_equal (equal token counts per sequence, sequence-major) for the whole model. Non-last stages keep
    # ``embeddings = false`` so they get the very same ubatches (split_seq would run single-row ubatches
    # through other kernels: logits off by ~1e-8), and the engine puts the captured rows, which come back in
    # ubatch order, back into batch order (:func:`split_equal_order`).
    equal_split_on_inner_stages: bool = False
    notes: str = ""

    def refusal(self, ctx: SplitContext) -> Optional[str]:
        """Why the stage ``ctx`` cannot be written exactly, or None when it can."""
        for check in (self._check_swa, *self.checks):
            reason = check(ctx)
            if reason:
                return reason
        return None

    def _check_swa(self, ctx: SplitContext) -> Optional[str]:
        if self.swa is None or self.swa.off_by_zero_window:
            return None
        pattern = self.swa.layers(ctx)
        if pattern is None or any(pattern[ctx.start:ctx.stop]):
            return None
        return (f"layers {ctx.layers} of this {ctx.arch} model hold no sliding-window layer; llama.cpp's "
                f"{ctx.arch} always builds a sliding-window KV cache and aborts without one "
                f"(GGML_ASSERT is_swa_any): give this stage more layers")


# ------------------------------------------------------------------ checks shared by rules

def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


# ------------------------------------------------------------------ gemma3

def _gemma3_attention_scale(n_embd: int, n_head: int, head_dim: int, n_layer: int) -> float:
    # src/models/gemma3.cpp: the 27B (62 layers) uses 1/sqrt(n_embd/n_head), others 1/sqrt(head_dim)
    if n_layer == 62:
        return 1.0 / math.sqrt(n_embd // n_head)
    return 1.0 / math.sqrt(head_dim)


def _gemma3_fix_q_norm(ctx: SplitContext, name: str, data: "object") -> Optional["object"]:
    """Fold the whole model's attention scale into attn_q_norm when the stage would pick another."""
    n_embd = int(ctx.get("embedding_length"))  # type: ignore[arg-type]
    n_head_v = ctx.get("attention.head_count")
    n_head = int(n_head_v[0] if isinstance(n_head_v, list) else n_head_v)  # type: ignore[index,arg-type]
    head_dim = int(ctx.get("attention.key_length", n_embd // n_head))  # type: ignore[arg-type]
    whole = _gemma3_attention_scale(n_embd, n_head, head_dim, ctx.n_layer)
    stage = _gemma3_attention_scale(n_embd, n_head, head_dim, ctx.n_stage)
    if whole == stage:
        return None
    if data is None:  # asked whether the tensor changes (it is not F32)
        return True
    return data * (whole / stage)  # type: ignore[operator]


def _sqrt_embd(ctx: SplitContext) -> float:
    """sqrtf(n_embd) as llama.cpp computes it (a float32), as a Python float."""
    import numpy as np

    return float(np.sqrt(np.float32(int(ctx.get("embedding_length")))))  # type: ignore[arg-type]


def prescale(hidden: "object", scale: float) -> "object":
    """The float32 array x whose products fl(x * scale) (llama.cpp's ``ggml_scale``) are nearest ``hidden``.

    x = fl(h / s) or one of its float32 neighbours, per value: fl(x * s) == h where any x gives h,
    otherwise 1 ulp from it (h values that no float32 times s rounds to). For a power-of-two
    ``scale`` this is the plain (exact) division.
    """
    import numpy as np

    s = np.float32(scale)
    h = np.asarray(hidden, dtype=np.float32)
    x = h / s
    if float(s) == 2.0 ** round(math.log2(float(s))):
        return x
    best = x
    err = np.abs(x * s - h)
    for toward in (-np.inf, np.inf):
        cand = np.nextafter(x, np.float32(toward))
        e = np.abs(cand * s - h)
        better = e < err
        best = np.where(better, cand, best)
        err = np.where(better, e, err)
    return best


# ------------------------------------------------------------------ gemma2

def _gemma2_attention_scale(n_embd: int, n_head: int, head_dim: int, n_layer: int) -> float:
    # src/models/gemma2.cpp: the 27B (46 layers) uses 1/sqrt(n_embd/n_head), others 1/sqrt(head_dim)
    if n_layer == 46:
        return 1.0 / math.sqrt(float(n_embd // n_head))
    return 1.0 / math.sqrt(float(head_dim))


def _gemma2_scales(ctx: SplitContext) -> Tuple[float, float]:
    n_embd = int(ctx.get("embedding_length"))  # type: ignore[arg-type]
    n_head_v = ctx.get("attention.head_count")
    n_head = int(n_head_v[0] if isinstance(n_head_v, list) else n_head_v)  # type: ignore[index,arg-type]
    head_dim = int(ctx.get("attention.key_length", n_embd // n_head))  # type: ignore[arg-type]
    return (_gemma2_attention_scale(n_embd, n_head, head_dim, ctx.n_layer),
            _gemma2_attention_scale(n_embd, n_head, head_dim, ctx.n_stage))


def _gemma2_kv(ctx: SplitContext) -> Dict[str, object]:
    """The 27B's attention scale where a stage's layer count would pick another: RoPE multiplies q and k by
    its attn_factor (``rope.scaling.attn_factor``, mscale of the rotation), so sqrt(whole/stage) there scales
    q.k by whole/stage. Works for quantized weights; same attention in exact arithmetic, not bit for bit
    (measured by ``test_gemma2_27b_attention_scale``)."""
    whole, stage = _gemma2_scales(ctx)
    if whole == stage:
        return {}
    base = float(ctx.get("rope.scaling.attn_factor", 1.0) or 1.0)  # type: ignore[arg-type]
    return {"rope.scaling.attn_factor": base * math.sqrt(whole / stage)}


def _gemma2_check(ctx: SplitContext) -> Optional[str]:
    whole, stage = _gemma2_scales(ctx)
    n_embd = int(ctx.get("embedding_length"))  # type: ignore[arg-type]
    n_head_v = ctx.get("attention.head_count")
    n_head = int(n_head_v[0] if isinstance(n_head_v, list) else n_head_v)  # type: ignore[index,arg-type]
    head_dim = int(ctx.get("attention.key_length", n_embd // n_head))  # type: ignore[arg-type]
    if whole != stage and int(ctx.get("rope.dimension_count", head_dim) or head_dim) != head_dim:  # type: ignore[arg-type]
        return ("this gemma2 model's attention scale depends on its layer count (46: the 27B) and RoPE covers "
                "only part of each head, so the scale cannot be carried by RoPE's attn_factor on a stage")
    return None


# ------------------------------------------------------------------ baichuan

def _baichuan_arch(ctx: SplitContext) -> Optional[str]:
    # baichuan.cpp: 32 layers (7B) -> RoPE, 40 (13B) -> ALiBi (max bias 8), else neither. A stage has
    # another layer count, so it is written under the architecture with the whole model's graph.
    return {32: "llama", 40: "refact"}.get(ctx.n_layer)


def _baichuan_check(ctx: SplitContext) -> Optional[str]:
    if ctx.n_layer not in (32, 40):
        return (f"baichuan.cpp picks RoPE (32 layers) or ALiBi (40 layers) from the layer count; this "
                f"{ctx.n_layer}-layer model uses neither, and no other llama.cpp graph matches that")
    return None


# ------------------------------------------------------------------ deepseek / deepseek2

def _dense_lead(ctx: SplitContext) -> Dict[str, object]:
    """leading_dense_block_count re-based to the stage: llama.cpp tests ``il < n`` on the local index."""
    if not ctx.has("leading_dense_block_count"):
        return {}
    lead = int(ctx.get("leading_dense_block_count") or 0)  # type: ignore[arg-type]
    return {"leading_dense_block_count": max(0, min(lead - ctx.start, ctx.n_stage))}


def _deepseek2_kv(ctx: SplitContext) -> Dict[str, object]:
    kv = _dense_lead(ctx)
    # deepseek2.cpp reads q_lora_rank only for non-"lite" layer counts (26, 27, 48): a stage of a
    # lite model (no q_lora_rank key) with another layer count would fail to load without it.
    if not ctx.has("attention.q_lora_rank"):
        kv["attention.q_lora_rank"] = 0
    # Without expert_gating_func the default depends on n_layer (47/48) and the vocabulary
    # (GLM 4.7 Lite): write the whole model's effective value.
    if not ctx.has("expert_gating_func"):
        glm_lite = ctx.n_layer in (47, 48) and ctx.n_vocab == 154880
        kv["expert_gating_func"] = 2 if glm_lite else 1  # SIGMOID : SOFTMAX
    return kv


def _deepseek2_lite_check(ctx: SplitContext) -> Optional[str]:
    q_lora = int(ctx.get("attention.q_lora_rank", 0) or 0)  # type: ignore[arg-type]
    if q_lora > 0 and ctx.n_stage in (26, 27, 48):
        return (f"a {ctx.n_stage}-layer stage of this deepseek2 model would be taken for a 'lite' model by "
                f"llama.cpp (deepseek2.cpp guesses it from the layer count) and lose its q_lora layers: "
                f"choose another layer count for this stage")
    return None


# ------------------------------------------------------------------ others

def _command_r_check(ctx: SplitContext) -> Optional[str]:
    # command-r.cpp creates attn_q_norm/attn_k_norm only when n_layer >= 64 (Command R+)
    if (ctx.n_layer >= 64) != (ctx.n_stage >= 64):
        return (f"llama.cpp's command-r uses q/k norms only in models of 64+ layers (command-r.cpp), "
                f"so a {ctx.n_stage}-layer stage of a {ctx.n_layer}-layer model cannot match it")
    return None


def _smollm3_check(ctx: SplitContext) -> Optional[str]:
    # smollm3.cpp: use_rope = (il + 1) % 4 != 0 on the local layer index (step hard-coded, no GGUF key)
    if ctx.start % 4 != 0:
        return (f"smollm3 skips RoPE on every 4th layer counted from the stage's first layer "
                f"(n_no_rope_layer_step = 4 is hard-coded in smollm3.cpp), so a stage must start at a "
                f"multiple of 4, not at layer {ctx.start}")
    return None


def _minicpm_kv(ctx: SplitContext) -> Dict[str, object]:
    # minicpm.cpp defaults residual_scale to 1.4f / sqrtf(n_layer): write the whole model's value
    if ctx.has("residual_scale"):
        return {}
    import numpy as np

    return {"residual_scale": float(np.float32(1.4) / np.sqrt(np.float32(ctx.n_layer)))}


def _llama4_check(ctx: SplitContext) -> Optional[str]:
    if ctx.has("attention.sliding_window") and int(ctx.get("attention.sliding_window") or 0) == 0:  # type: ignore[arg-type]
        if not ctx.is_last:
            return ("this llama4 model has no chunked attention (sliding_window = 0), for which llama4.cpp "
                    "skips RoPE on each stage's own last layer (n_no_rope_layer_step = n_layer of the stage): "
                    "only a stage holding the model's last layer matches")
        return None
    if ctx.n_stage < 4:
        return (f"a {ctx.n_stage}-layer llama4 stage has no no-RoPE layer (every 4th): llama4.cpp then leaves "
                f"its temperature-tuning input unallocated and aborts (and a stage of only chunked-attention "
                f"layers has an empty full-attention cache): give each stage at least 4 layers")
    step = _lcm(4, int(ctx.get("interleave_moe_layer_step", 1) or 1))  # type: ignore[arg-type]
    if ctx.start % step != 0:
        return (f"llama4.cpp counts its no-RoPE layers (every 4th) and MoE layers (every "
                f"{ctx.get('interleave_moe_layer_step')}th) from the stage's first layer, so a stage must start "
                f"at a multiple of {step}, not at layer {ctx.start}")
    return None


def _glm4moe_kv(ctx: SplitContext) -> Dict[str, object]:
    """Later stages: M-RoPE with every section at the same position, the only way glm4moe.cpp takes
    hidden-state input; its rotation and angles equal the NEOX RoPE of the whole model (ggml rope:
    mrope sections advance theta identically and rotate NEOX pairs)."""
    kv = _dense_lead(ctx)
    if not ctx.is_first:
        half = int(ctx.get("rope.dimension_count")) // 2  # type: ignore[arg-type]
        kv["rope.dimension_sections"] = [half - 1, 1, 0, 0]
    return kv


def _glm4_kv(ctx: SplitContext) -> Dict[str, object]:
    """Later stages: M-RoPE with every section at the token position (glm4.cpp takes hidden states only with
    M-RoPE); its pairs are NEOX's (i, i + n_rot/2), so :func:`_glm4_rows` reorders q and k to match."""
    if ctx.is_first:
        return {}
    half = int(ctx.get("rope.dimension_count")) // 2  # type: ignore[arg-type]
    return {"rope.dimension_sections": [half - 1, 1, 0, 0]}


def _glm4_rows(ctx: SplitContext, name: str, n_rows: int) -> Optional["object"]:
    """Later stages: q and k rows (weights and biases; in a fused qkv tensor, its q and k parts) reordered so
    that GLM-4's rotation pairs (2i, 2i+1) of each head sit at (i, i + n_rot/2), the pairs M-RoPE rotates with
    the same angle. q.k is then the same sum in another order (the bound of level ``bounded``)."""
    if ctx.is_first:
        return None
    import numpy as np

    n_embd = int(ctx.get("embedding_length"))  # type: ignore[arg-type]
    n_head_v = ctx.get("attention.head_count")
    n_head = int(n_head_v[0] if isinstance(n_head_v, list) else n_head_v)  # type: ignore[index,arg-type]
    kv_v = ctx.get("attention.head_count_kv", n_head)
    n_head_kv = int(kv_v[0] if isinstance(kv_v, list) else kv_v)  # type: ignore[index,arg-type]
    head = int(ctx.get("attention.key_length", n_embd // n_head))  # type: ignore[arg-type]
    n_rot = int(ctx.get("rope.dimension_count", head))  # type: ignore[arg-type]
    one = np.arange(head)
    one[:n_rot] = np.concatenate((np.arange(0, n_rot, 2), np.arange(1, n_rot, 2)))

    def heads(n: int, at: int) -> "object":
        return (at + np.arange(n)[:, None] * head + one[None, :]).reshape(-1)

    q, k = n_head * head, n_head_kv * head
    if ".attn_qkv." in name:
        v = n_rows - q - k
        order = np.concatenate((heads(n_head, 0), heads(n_head_kv, q), q + k + np.arange(v)))
    elif ".attn_q." in name:
        order = heads(n_head, 0)
    else:
        order = heads(n_head_kv, 0)
    if order.shape[0] != n_rows:
        raise ValueError(f"glm4: {name} has {n_rows} rows, the heads give {order.shape[0]}")
    return order


def _recurrent_layers(ctx: SplitContext) -> Optional[List[bool]]:
    """Absolute per-layer recurrent flags of a hybrid model, or None if unknown.

    lfm2/granitehybrid mark recurrent layers with head_count_kv 0; qwen35/qwen3next store
    attention.recurrent_layers or derive it from full_attention_interval on the layer index."""
    stored = ctx.get("attention.recurrent_layers")
    if isinstance(stored, list):
        return [bool(x) for x in stored[:ctx.n_layer]]
    if ctx.arch in ("qwen35", "qwen35moe", "qwen3next"):
        interval = int(ctx.get("full_attention_interval", 4) or 4)  # type: ignore[arg-type]
        return [(il + 1) % interval != 0 for il in range(ctx.n_layer)]
    kv = ctx.get("attention.head_count_kv")
    if isinstance(kv, list):
        return [int(x) == 0 for x in kv[:ctx.n_layer]]
    return None


def _recurrent_kv(ctx: SplitContext) -> Dict[str, object]:
    """attention.recurrent_layers as the stage's slice of the absolute pattern (llama.cpp would count the
    full-attention interval from the stage's first layer)."""
    flags = _recurrent_layers(ctx)
    return {} if flags is None else {"attention.recurrent_layers": flags[ctx.start:ctx.stop]}


def _hybrid_check(ctx: SplitContext) -> Optional[str]:
    flags = _recurrent_layers(ctx)
    if flags is None:
        return None
    mine = flags[ctx.start:ctx.stop]
    if all(mine) or not any(mine):
        return (f"layers {ctx.layers} of this {ctx.arch} model are all "
                f"{'recurrent' if all(mine) else 'attention'} layers; llama.cpp's hybrid "
                f"memory aborts without both kinds (GGML_ASSERT(buffer) on an empty cache): each stage must hold "
                f"at least one attention and one recurrent layer")
    return None


def _granite_check(ctx: SplitContext) -> Optional[str]:
    if ctx.has("deepstack_mapping"):
        return "granite vision models (deepstack_mapping: per-layer injection of the input embeddings) cannot be split"
    return None


def _measured(diff: float, steps: str) -> str:
    return (f"measured on tiny random-weight models (n_embd 96), 2- and 3-stage chains, f32 wire: max "
            f"logit difference <= {diff:g}, greedy tokens {steps}")


MAXDIFF_GEMMA = 2e-5
MAXDIFF_GEMMA2 = 2e-4
MAXDIFF_GEMMA2_27B = 2e-3  # the 27B (46 layers): attention scale carried by RoPE's attn_factor


# glm4 (level bounded): the largest logit difference the tests allow, and how it was chosen
GLM4_BOUND = 1e-4
GLM4_MEASURED = (
    "measured on tiny random-weight models (6 layers; head size 128 with 1 and 2 kv heads, and 4 heads of 128; "
    "F32, Q8_0 and Q4_K weights; 2- and 3-stage chains, f32 wire): max logit difference 1.7e-5 (0 for the "
    "quantized ones), greedy tokens identical; bound 1e-4 (6x the worst), enforced by tests/test_archs_exact.py. "
    "Relative to the largest logit (1.1) that is 1.5e-5, which on the demo model's logits (up to 44.5) would be "
    "6.9e-4, 15x below the smallest top-2 margin of its 1004 greedy steps on 4 prompts (1.06e-2; 1% of them are "
    "below 0.10). With flash attention the difference reached 2.8e-4 (F32 weights) and 2.3e-2 (Q4_K): llama.cpp's "
    "CPU kernel accumulates V in f16, which magnifies the reordered sums, so glm4 engines run without it")
GLM4_NO_FLASH_ATTN = ("with flash attention a split GLM-4 was up to 2.3e-2 off the whole model (Q4_K, measured): "
                      "llama.cpp accumulates V in f16 there, which magnifies the reordered q.k sums")

RULES: Dict[str, ArchRule] = {
    "llama": ArchRule("llama", notes="Llama 1/2/3 (`rope_freqs` kept on every stage), Mistral, Mixtral (experts)"),
    "qwen2": ArchRule("qwen2"),
    "qwen3": ArchRule("qwen3"),
    "gemma3": ArchRule(
        "gemma3",
        swa=SwaRule(period=6),
        tensor_fixes={"attn_q_norm.weight": _gemma3_fix_q_norm},
        notes="sliding-window pattern (period 6) written as an absolute per-layer array; input scaling "
              "applies to tokens only; 27B attention scale folded into `attn_q_norm`",
    ),
    "phi3": ArchRule("phi3", notes="Phi-3, Phi-4-mini (GQA through the fused QKV, partial rotary; LongRoPE "
                                   "`rope_factors_long`/`_short` kept on every stage)"),
    "phi2": ArchRule("phi2", output_required=True,
                     notes="`output.weight`/`output.bias` are required: middle stages get a one-row stand-in"),
    "qwen": ArchRule("qwen", output_required=True, notes="`output.weight` required on every stage"),
    "qwen2moe": ArchRule("qwen2moe", output_required=True, notes="shared experts; `output.weight` required on every stage"),
    "qwen3moe": ArchRule("qwen3moe"),
    "chatglm": ArchRule("chatglm"),
    "command-r": ArchRule("command-r", checks=(_command_r_check,),
                          notes="a 64+-layer model (q/k norms) is refused: llama.cpp enables them by layer count"),
    "cohere2": ArchRule(
        "cohere2", swa=SwaRule(period=4, off_by_zero_window=False),
        notes="sliding-window pattern (period 4, RoPE only on SWA layers) written as an absolute array; "
              "a stage must hold at least one SWA layer",
    ),
    "deepseek": ArchRule("deepseek", stage_kv=_dense_lead,
                         notes="`leading_dense_block_count` re-based per stage"),
    "deepseek2": ArchRule(
        "deepseek2", stage_kv=_deepseek2_kv, checks=(_deepseek2_lite_check,),
        notes="MLA; `leading_dense_block_count` re-based per stage; `q_lora_rank`/`expert_gating_func` "
              "written explicitly (llama.cpp guesses them from the layer count)",
    ),
    "falcon": ArchRule("falcon"),
    "gpt2": ArchRule("gpt2", zero_on_later_stages=("position_embd.weight",),
                     notes="learned position embeddings: later stages get a zero `position_embd` "
                           "(the graph adds it to any input)"),
    "starcoder2": ArchRule("starcoder2"),
    "mamba": ArchRule("mamba", embeddings_on_inner_stages=True,
                      notes="recurrent state kept per stage; non-last stages need a context with `embeddings = true` "
                            "(`embeddings_on_inner_stages`) so llama.cpp splits a batch by sequence and hidden "
                            "rows keep their order; a batch must hold each sequence's rows contiguously"),
    "olmo2": ArchRule("olmo2", swa=SwaRule(period=4), output_required=True,
                      notes="optional sliding window (period 4) written as an absolute array; "
                            "`output.weight` required on every stage"),
    "granite": ArchRule("granite", later_stage_kv={"embedding_scale": 1.0}, checks=(_granite_check,),
                        notes="`embedding_scale` set to 1 on later stages (llama.cpp scales any input)"),
    "internlm2": ArchRule("internlm2", output_required=True, notes="`output.weight` required on every stage"),
    "xverse": ArchRule("xverse", output_required=True, notes="`output.weight` required on every stage"),
    "orion": ArchRule("orion", output_required=True, notes="`output.weight` required on every stage"),
    "stablelm": ArchRule("stablelm", output_required=True,
                         notes="partial rotary; `output.weight` required on every stage"),
    "olmo": ArchRule("olmo", notes="non-parametric LayerNorm (no norm tensors), optional QKV clamp"),
    "exaone": ArchRule("exaone", notes="`rope_freqs` kept on every stage"),
    "arcee": ArchRule("arcee", notes="squared-ReLU MLP; `rope_freqs` kept on every stage"),
    "smollm3": ArchRule("smollm3", checks=(_smollm3_check,),
                        notes="no RoPE on every 4th layer, counted per stage (hard-coded step): "
                              "each stage must start at a multiple of 4"),
    "mistral3": ArchRule("mistral3", notes="Ministral 3 / Mistral Small 3.x (older Mistral GGUFs are `llama`): "
                                           "attention temperature tuning depends on the absolute position only"),
    "ernie4_5": ArchRule("ernie4_5", notes="dense ERNIE 4.5"),
    "minicpm": ArchRule("minicpm", later_stage_kv={"embedding_scale": 1.0}, stage_kv=_minicpm_kv,
                        notes="`embedding_scale` set to 1 on later stages (llama.cpp scales any input, "
                              "default 12); `residual_scale` written explicitly (default 1.4/sqrt(n_layer))"),
    "refact": ArchRule("refact", notes="ALiBi (no RoPE)"),
    "mpt": ArchRule("mpt", zero_on_later_stages=("position_embd.weight",),
                    notes="ALiBi, QKV clamp; an optional `position_embd` is zeroed on later stages"),
    "gptneox": ArchRule("gptneox", output_required=True,
                        notes="parallel residual, partial rotary; `output.weight` required on every stage"),
    "starcoder": ArchRule("starcoder", zero_on_later_stages=("position_embd.weight",),
                          notes="learned position embeddings: later stages get a zero `position_embd`"),
    "codeshell": ArchRule("codeshell", output_required=True, notes="`output.weight` required on every stage"),
    "gemma": ArchRule(
        "gemma", level=ULP, hidden_input_scale=_sqrt_embd,
        max_logit_diff=MAXDIFF_GEMMA, measured=_measured(MAXDIFF_GEMMA, "identical"),
        notes="gemma.cpp multiplies any input by sqrtf(n_embd): a later stage is handed the float32 x with "
              "fl(x*sqrtf(n_embd)) nearest the hidden state (equal, or 1 ulp off where no x gives it)",
    ),
    "gemma2": ArchRule(
        "gemma2", level=ULP, hidden_input_scale=_sqrt_embd,
        swa=SwaRule(period=2, requires_key=None, off_by_zero_window=False),
        stage_kv=_gemma2_kv, checks=(_gemma2_check,),
        max_logit_diff=MAXDIFF_GEMMA2, measured=_measured(MAXDIFF_GEMMA2, "identical"),
        notes="input scaled by sqrtf(n_embd) as for `gemma`; sliding-window pattern (period 2) written as an "
              "absolute array, a stage must hold a sliding-window layer; the 27B's attention scale (chosen "
              "from n_layer == 46) carried by `rope.scaling.attn_factor` (sqrt of the ratio on q and k; measured "
              "max logit difference <= 2e-3 on a 46-layer tiny model)",
    ),
    "bloom": ArchRule(
        "bloom", stage_arch=lambda ctx: None if ctx.is_first else "mpt",
        stage_arch_kv={"attention.max_alibi_bias": 8.0},
        first_stage_only=("token_embd_norm.weight", "token_embd_norm.bias"),
        notes="later stages are written as `mpt` (the same LayerNorm/fused-QKV/ALiBi/GELU graph without "
              "bloom's input LayerNorm, which would also normalize hidden states); ALiBi max bias 8 written",
    ),
    "gpt-oss": ArchRule(
        "gpt-oss", swa=SwaRule(period=2, requires_key=None, off_by_zero_window=False), output_required=True,
        notes="OpenAI gpt-oss: attention sinks, MoE; `output.weight` required on every stage; sliding-window pattern (period 2) written as an absolute "
              "array, a stage must hold a sliding-window layer",
    ),
    "llama4": ArchRule(
        "llama4", swa=SwaRule(period=4, requires_key=None, off_by_zero_window=False), checks=(_llama4_check,),
        notes="chunked-attention pattern (period 4) written as an absolute array; no-RoPE and MoE layers are "
              "counted per stage (hard-coded step 4, `interleave_moe_layer_step`), so a stage starts at a "
              "multiple of their least common multiple and holds at least 4 layers; a model without chunked attention splits only at the "
              "last stage (refused otherwise)",
    ),
    "dots1": ArchRule("dots1", stage_kv=_dense_lead, output_required=True,
                      notes="dots.llm1: sigmoid-gated experts with a shared one; `leading_dense_block_count` re-based "
                            "per stage; `output.weight` required on every stage"),
    "bailingmoe": ArchRule("bailingmoe", output_required=True,
                           notes="Ling: experts and a shared expert in every layer; `output.weight` required on every "
                                 "stage"),
    "phimoe": ArchRule("phimoe", output_required=True,
                       notes="PhiMoE: experts in every layer; `output.weight`/`output.bias` required on every stage"),
    "dbrx": ArchRule("dbrx", output_required=True,
                     notes="DBRX: fused clamped QKV, experts in every layer; `output.weight` required on every stage"),
    "arctic": ArchRule("arctic", notes="Snowflake Arctic: a dense MLP beside the experts in every layer"),
    "jais": ArchRule("jais", output_required=True,
                     notes="JAIS: ALiBi (slopes per head, not per layer); `output.weight` required on every stage"),
    "pangu-embedded": ArchRule("pangu-embedded", notes="openPangu-Embedded: q/k/v and output biases"),
    "openelm": ArchRule("openelm", notes="OpenELM: per-layer head counts sliced; LM head tied to the embeddings"),
    "plamo": ArchRule("plamo", output_required=True,
                      notes="PLaMo: attention and MLP in parallel; `output.weight` required on every stage"),
    "qwen2vl": ArchRule("qwen2vl", notes="Qwen2-VL's language model (text): M-RoPE positions handed on as llama.cpp "
                                         "expands them for text (sections 0-2 at the position)"),
    "maincoder": ArchRule("maincoder", notes="Maincoder: q/k norms"),
    "mellum": ArchRule("mellum", output_required=True,
                       notes="Mellum: experts in every layer, q/k norms; `output.weight` required on every stage"),
    "hunyuan-moe": ArchRule("hunyuan-moe", notes="Hunyuan-A13B: experts and a shared expert in every layer, q/k norms"),
    "bitnet": ArchRule("bitnet", notes="BitNet b1.58: sub-norms in attention and MLP; LM head tied to the embeddings"),
    "mamba2": ArchRule("mamba2", equal_split_on_inner_stages=True,
                       notes="Mamba-2: recurrent state kept per stage; non-last stages run llama.cpp's equal-split "
                             "ubatches like the whole model, as for `granitehybrid`"),
    "minimax-m2": ArchRule("minimax-m2", output_required=True,
                           notes="MiniMax-M2: q/k norms over all heads, sigmoid-gated experts; `output.weight` required "
                                 "on every stage"),
    "exaone4": ArchRule("exaone4", notes="EXAONE 4.0 (1.2B shape): post-attention and post-FFN norms, q/k norms"),
    "nemotron": ArchRule("nemotron", output_required=True,
                         notes="Nemotron: LayerNorm with bias, partial rotary, squared-ReLU MLP; `output.weight` "
                               "required on every stage"),
    "glm4": ArchRule(
        "glm4", level=BOUNDED, stage_kv=_glm4_kv,
        row_orders={suffix: _glm4_rows for suffix in (".attn_q.weight", ".attn_q.bias", ".attn_k.weight",
                                                       ".attn_k.bias", ".attn_qkv.weight", ".attn_qkv.bias")},
        max_logit_diff=GLM4_BOUND,
        measured=GLM4_MEASURED,
        no_flash_attn=GLM4_NO_FLASH_ATTN,
        notes="GLM-4: glm4.cpp takes hidden states only with M-RoPE, so later stages get "
              "`rope.dimension_sections` (every section at the token position) and their q/k rows reordered "
              "from GLM-4's rotation pairs (2i, 2i+1) to M-RoPE's (i, i+n_rot/2): the same angles, q.k summed in "
              "another order; engines run without flash attention",
    ),
    "glm4moe": ArchRule(
        "glm4moe", stage_kv=_glm4moe_kv,
        notes="GLM-4.5: later stages get `rope.dimension_sections` (M-RoPE, every section at the token "
              "position: the same angles and NEOX rotation as the whole model) since glm4moe.cpp takes "
              "hidden states only with M-RoPE; `leading_dense_block_count` re-based; NextN blocks dropped",
    ),
    "lfm2": ArchRule(
        "lfm2", equal_split_on_inner_stages=True, checks=(_hybrid_check,),
        notes="LFM2 hybrid: short-convolution state kept per stage; non-last stages run llama.cpp's "
              "equal-split ubatches like the whole model and restore the batch order of the rows; per-layer `head_count_kv` "
              "(0 marks a convolution layer) sliced; each stage must hold an attention and a convolution layer",
    ),
    "granitehybrid": ArchRule(
        "granitehybrid", equal_split_on_inner_stages=True, later_stage_kv={"embedding_scale": 1.0},
        checks=(_granite_check, _hybrid_check),
        notes="Granite 4 hybrid: Mamba-2 state kept per stage, equal-split ubatches as for `lfm2`; per-layer `head_count_kv` (0 marks "
              "a Mamba layer) sliced; each stage must hold an attention and a Mamba layer; `embedding_scale` set to 1 "
              "on later stages",
    ),
    "qwen35": ArchRule(
        "qwen35", equal_split_on_inner_stages=True, stage_kv=_recurrent_kv, checks=(_hybrid_check,),
        notes="Qwen3.5: gated delta-net state kept per stage, equal-split ubatches as for `lfm2`; the "
              "full-attention layers (every `full_attention_interval`-th, counted by llama.cpp from the stage's "
              "first layer) written as an absolute `attention.recurrent_layers` slice; M-RoPE positions of text "
              "handed on as llama.cpp expands them (sections 0-2 at the position, 3 at 0); each stage must hold "
              "an attention and a delta-net layer; NextN blocks dropped",
    ),
    "qwen35moe": ArchRule(
        "qwen35moe", equal_split_on_inner_stages=True, stage_kv=_recurrent_kv, checks=(_hybrid_check,),
        notes="Qwen3.5 MoE: as `qwen35`, with experts and a gated shared expert",
    ),
    "qwen3next": ArchRule(
        "qwen3next", equal_split_on_inner_stages=True, stage_kv=_recurrent_kv, checks=(_hybrid_check,),
        notes="Qwen3-Next: gated delta-net/attention hybrid as `qwen35` (plain RoPE), experts with a gated "
              "shared expert",
    ),
    "falcon-h1": ArchRule(
        "falcon-h1", equal_split_on_inner_stages=True,
        notes="Falcon-H1: Mamba-2 and attention in every layer; state kept per stage, equal-split ubatches as "
              "for `lfm2`",
    ),
    "olmoe": ArchRule("olmoe", output_required=True,
                      notes="OLMoE: experts in every layer, q/k norms; `output.weight` required on every stage"),
    "seed_oss": ArchRule("seed_oss", notes="Seed-OSS: q/k/v biases"),
    "granitemoe": ArchRule("granitemoe", later_stage_kv={"embedding_scale": 1.0}, checks=(_granite_check,),
                           notes="Granite MoE (with or without a shared expert): `embedding_scale` set to 1 on "
                                 "later stages"),
    "lfm2moe": ArchRule(
        "lfm2moe", equal_split_on_inner_stages=True, stage_kv=_dense_lead, checks=(_hybrid_check,),
        notes="LFM2 MoE: as `lfm2`; `leading_dense_block_count` re-based per stage",
    ),
    "baichuan": ArchRule(
        "baichuan", stage_arch=_baichuan_arch, checks=(_baichuan_check,),
        notes="baichuan.cpp picks the position encoding from the layer count: stages of Baichuan-7B "
              "(32 layers, RoPE) are written as `llama`, of Baichuan-13B (40 layers, ALiBi) as `refact`",
    ),
}

#: Architectures (llama.cpp spelling) that cannot be split at any level, with the reason.
UNSUPPORTED: Dict[str, str] = {
    "gemma3n": (
        "gemma3n.cpp adds per-layer inputs to every layer, computed from the token ids and the first layer's "
        "input (per_layer_token_embd, per_layer_model_proj, sized by the layer count): a later stage given hidden "
        "states uses the padding token's instead; its hidden state is 4 AltUp streams (4 x n_embd per token) while "
        "a stage hands on n_embd per token; and activation sparsity on layers 0-9 and KV reuse from layer 20 on "
        "(n_layer_kv_from_start = 20) are hard-coded by layer index, so a stage would count them from its own first "
        "layer. measured: on the random-weight 24-layer test model split in 2 stages (tests/test_archs_exact.py::"
        "test_gemma3n_split_is_far_from_exact), stage files written as for other architectures do not load "
        "(per_layer_token_embd.weight has the wrong shape); with the per-layer tensors sliced to the stage, the "
        "first stage's last layer gives 4 rows of n_embd per token; handing on the active stream, cuts at layers "
        "4, 12 and 22 give a max logit difference of 0.80-0.85 (the whole model's logits lie within +-0.61) and "
        "96-100% of greedy tokens differ; AltUp alone (per-layer inputs zeroed, 6 layers) still 0.78 and 90%"
    ),
}


def split_equal_order(seq_ids: Sequence[int], n_ubatch: int, sequential: bool = False) -> List[int]:
    """Batch indices in the order llama.cpp's ``llama_batch_allocr::split_equal`` (src/llama-batch.cpp,
    no kept tail) puts them into ubatches: per ubatch, the sequences in order of first unused row, each
    contributing its next rows (as many as the shortest of them has left, within n_ubatch), sequence-major."""
    n = len(seq_ids)
    by_seq: Dict[int, List[int]] = {}
    for i, s in enumerate(seq_ids):
        by_seq.setdefault(int(s), []).append(i)
    used = [False] * n
    order: List[int] = []
    while True:
        cur: List[int] = []
        seen = set()
        last = -1
        for i in range(n):
            if used[i]:
                continue
            s = int(seq_ids[i])
            add = s not in seen
            if sequential:
                add = add and (not cur or s == last + 1)
            if add:
                cur.append(s)
                seen.add(s)
                last = s
                if len(cur) > n_ubatch:
                    break
        if not cur:
            return order
        pos = {}
        for s in cur:
            k = 0
            while used[by_seq[s][k]]:
                k += 1
            pos[s] = k
        per: Dict[int, List[int]] = {s: [] for s in cur}
        while all(pos[s] < len(by_seq[s]) for s in cur):
            for s in cur:
                idx = by_seq[s][pos[s]]
                per[s].append(idx)
                used[idx] = True
                pos[s] += 1
            if (len(per[cur[0]]) + 1) * len(cur) > n_ubatch:
                break
        for s in cur:
            order.extend(per[s])


def supported_archs() -> List[str]:
    """Architecture names (llama.cpp spelling) that molink-lite can split exactly."""
    return sorted(RULES)


class UnsupportedArchitecture(ValueError):
    """Raised for a model whose architecture has no split rule."""


def split_support(arch: str) -> Tuple[Optional[str], str]:
    """Whether ``arch`` can be split, before anything is started: (level, a sentence). The level is
    :data:`EXACT` or :data:`ULP`, or None for an architecture that is refused (the sentence says why)."""
    rule = RULES.get(arch)
    if rule is None:
        why = UNSUPPORTED.get(arch)
        if why is not None:
            return None, f"{arch} cannot be split: {why}"
        return None, (f"{arch} cannot be split: molink-lite has no split rule for it ({len(RULES)} architectures "
                      f"have one; the README's table lists them)")
    if rule.level == EXACT:
        what = "exact: a split's logits are bit-identical to the whole model's over the f32 wire"
    elif rule.level == BOUNDED:
        what = (f"bounded: the same computation summed in another order on later stages; greedy tokens identical "
                f"in the tests, logits within {rule.max_logit_diff:g} of the whole model's")
    else:
        what = (f"ulp: a later stage starts within 1 float32 ulp of the whole model's hidden state (max logit "
                f"difference {rule.max_logit_diff:g} measured)")
    checks = " Some layer ranges are refused (see the architecture's notes)." if rule.checks or (
        rule.swa is not None and not rule.swa.off_by_zero_window) else ""
    return rule.level, f"{arch} can be split, level {what}.{checks}"


#: vision projectors (``clip.projector_type`` of an mmproj GGUF) a split serves: the first stage feeds their rows,
#: later stages take them with the positions mtmd gives; each tested (tests/test_vision_split.py) with a random-weight
#: projector through the API
VISION_SPLIT = {"qwen2vl_merger": "Qwen2-VL", "qwen2.5vl_merger": "Qwen2.5-VL",
                "gemma3": "Gemma 3; each image a step of its own, decoded with causal attention off on every stage"}
VISION_REFUSED = {
    "qwen3vl_merger": "its deepstack rows feed layers past the first stage; not built yet",
}


def vision_support(projector_type: str) -> Tuple[bool, str]:
    """Whether a split serves images of this projector type, and a sentence saying so."""
    if projector_type in VISION_SPLIT:
        return True, (f"vision projector {projector_type} ({VISION_SPLIT[projector_type]}): images split exactly "
                      f"(the first stage holds the projector; --mmproj on it)")
    why = VISION_REFUSED.get(projector_type, "molink-lite has not tested it")
    return False, f"vision projector {projector_type}: images are refused ({why})"


def rule_for(arch: str) -> ArchRule:
    """The split rule of ``arch``, or a clear error listing the supported architectures."""
    try:
        return RULES[arch]
    except KeyError:
        why = f": {UNSUPPORTED[arch]}" if arch in UNSUPPORTED else ""
        raise UnsupportedArchitecture(
            f"architecture '{arch}' is not supported for layer splitting{why} "
            f"(supported: {', '.join(supported_archs())})"
        ) from None


def slice_per_layer(values: Sequence[object], start: int, stop: int) -> List[object]:
    """Slice a per-layer metadata array to the stage's layers."""
    return list(values[start:stop])
