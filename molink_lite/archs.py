"""Per-architecture rules for splitting a GGUF model by layer range.

llama.cpp runs whole models. Cutting one into layer ranges breaks wherever an
architecture depends on the absolute layer index, on per-layer metadata arrays,
on how embedding input is scaled, or on tensors a stage drops. Each supported
architecture gets an :class:`ArchRule` here; anything not in :data:`RULES` is
refused by :func:`rule_for` with a message naming the supported ones.
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


@dataclass(frozen=True)
class SplitContext:
    """What a rule needs to know about the whole model and the stage being written."""

    arch: str
    n_layer: int          # layers of the whole model
    start: int            # first layer of the stage (absolute, inclusive)
    stop: int             # one past the last layer of the stage
    meta: Dict[str, object]  # the whole model's metadata values by key

    @property
    def n_stage(self) -> int:
        return self.stop - self.start

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.n_layer

    def get(self, key: str, default: object = None) -> object:
        """Metadata value of ``<arch>.<key>``."""
        return self.meta.get(f"{self.arch}.{key}", default)


@dataclass(frozen=True)
class SwaRule:
    """How llama.cpp derives the sliding-window layer pattern when no array is stored."""

    period: int
    dense_first: bool = False
    requires_key: Optional[str] = "attention.sliding_window"  # pattern only applies if this key > 0

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


@dataclass(frozen=True)
class ArchRule:
    """Everything the splitter and the stage engine must do differently for one architecture."""

    name: str
    swa: Optional[SwaRule] = None
    # Divide hidden states entering a non-first stage by this (llama.cpp scales embedding
    # input for some archs even when the input is already a hidden state).
    hidden_input_scale: Callable[[SplitContext], float] = lambda ctx: 1.0
    # Metadata overrides for non-first stages (e.g. granite's embedding_scale = 1).
    later_stage_kv: Dict[str, object] = field(default_factory=dict)
    # Tensor rewrites: name suffix -> fix(ctx, name, float32 array) returning a new array or None.
    tensor_fixes: Dict[str, TensorFix] = field(default_factory=dict)
    # Global (non-block) tensors every stage keeps besides token_embd/output_norm/output.
    global_tensors: Tuple[str, ...] = ("rope_freqs.weight",)
    notes: str = ""


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
    return data * (whole / stage)  # type: ignore[operator]


def _sqrt_embd(ctx: SplitContext) -> float:
    return math.sqrt(float(ctx.get("embedding_length")))  # type: ignore[arg-type]


RULES: Dict[str, ArchRule] = {
    "llama": ArchRule("llama", notes="Llama 1/2/3 (rope_freqs kept), Mistral, Mixtral (experts)"),
    "qwen2": ArchRule("qwen2"),
    "qwen3": ArchRule("qwen3"),
    "gemma3": ArchRule(
        "gemma3",
        swa=SwaRule(period=6),
        tensor_fixes={"attn_q_norm.weight": _gemma3_fix_q_norm},
        notes="SWA pattern written as absolute array; 27B attention scale folded into q_norm",
    ),
}


def supported_archs() -> List[str]:
    """Architecture names (llama.cpp spelling) that molink-lite can split exactly."""
    return sorted(RULES)


class UnsupportedArchitecture(ValueError):
    """Raised for a model whose architecture has no split rule."""


def rule_for(arch: str) -> ArchRule:
    """The split rule of ``arch``, or a clear error listing the supported architectures."""
    try:
        return RULES[arch]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture '{arch}' is not supported for layer splitting "
            f"(supported: {', '.join(supported_archs())})"
        ) from None


def slice_per_layer(values: Sequence[object], start: int, stop: int) -> List[object]:
    """Slice a per-layer metadata array to the stage's layers."""
    return list(values[start:stop])
