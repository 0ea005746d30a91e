"""The protocol between the gateway and its stages: every message that crosses a link, as a type.

Both sides import this module and nothing of each other (the gateway never loads llama.cpp).

Vocabulary (``meta["type"]`` on the wire; the binary framing is :mod:`molink_lite.wire.codec`):

* :class:`StepFrame` (``step``): one micro-batch, gateway -> first stage -> ... -> last stage. Its parts map
  one-to-one onto vLLM's ``SchedulerOutput``: ``start`` (:class:`SeqStart`: sampling parameters sent once, when
  a sequence first runs, with the tokens it generated before a replay), ``free`` (finished sequences: drop their
  KV), ``trim`` (rejected speculative drafts: drop KV from a position on), ``drafts`` (tokens the last stage
  verifies) and the rows (``seq``, ``pos``, ``tokens`` on the first stage or ``hidden`` later, ``out``: rows
  whose next token is wanted). :meth:`StepFrame.decode` is the receiving boundary: every field is checked
  against the receiver's :class:`FrameLimits` before anything is applied.
* :class:`ResultFrame` (``result``): the last stage's sampled tokens, to the gateway.
* :class:`StepErrorFrame` (``step_error``): a stage could not run a step (nothing of it was applied there).
* Control: :class:`Configure` / ``configured``, :class:`LinkDown`, :class:`LinkUp`, :class:`Drain`, and the
  small requests ``hello`` (-> the stage's info, :class:`StageHello`), ``tokenize`` / ``detokenize`` (a stage
  with a vocabulary), ``grammar_check`` (the last stage compiles a GBNF grammar and says whether llama.cpp
  takes it), ``stats``, ``ping``, ``probe_next``.
* :data:`ROLE_FRAMES`: what each authenticated role may send to a stage.

Rules both sides share: :func:`lane_of` (sequence slot s lives in lane ``s % lanes``), :func:`chain_mismatch` /
:func:`check_chain` (stages tile one model), :class:`SamplingParams` (one range per field, checked when built).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, TypedDict, Union

import numpy as np

from .codec import CODECS, encode_frame

PROTOCOL_VERSION = 4  # 3: a fork names how many positions it copies (prefix cache); 4: ring rounds
MAX_DRAFT = 32  # draft tokens one sequence may carry in one step (speculative decoding)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit)
MAX_GRAMMAR_BYTES = 256 << 10  # GBNF text of one sequence's grammar
MAX_TRIGGERS = 16  # lazy grammar trigger words per sequence

# message types
STEP, RESULT, STEP_ERROR = "step", "result", "step_error"
HELLO, INFO, CONFIGURE, CONFIGURED = "hello", "info", "configure", "configured"
LINK_DOWN, LINK_UP, DRAIN = "link_down", "link_up", "drain"
TOKENIZE, STATS, PING, PROBE_NEXT, ERROR = "tokenize", "stats", "ping", "probe_next", "error"
DETOKENIZE, GRAMMAR_CHECK = "detokenize", "grammar_check"
# an idle model's stages free their llama.cpp model and context (the process, its links and its layer file stay) and
# load them again when the gateway has a request for it (serving.idle)
RELEASE, RELEASED, RESTORE, RESTORED = "release", "released", "restore", "restored"
RING_STOP = "ring_stop"   # closing the ring: the gateway asks the last stage to let ringed sequences go
MEDIA = "media"           # an image for the first stage's vision projector (:mod:`molink_lite.wire.media`)
MAX_MEDIA_ROWS = 16384    # rows one image may take; M-RoPE positions may run this far past the context


def is_media_id(x: object) -> bool:
    """An image's id on the wire: 32 lowercase hex digits (:func:`molink_lite.wire.media.media_id`)."""
    return isinstance(x, str) and len(x) == 32 and all(c in "0123456789abcdef" for c in x)

#: what each link role may send to a stage
ROLE_FRAMES = {"gateway": frozenset({HELLO, CONFIGURE, STEP, TOKENIZE, DETOKENIZE, GRAMMAR_CHECK, STATS, PING,
                                     PROBE_NEXT, ERROR, RELEASE, RESTORE, RING_STOP, MEDIA}),
               "upstream": frozenset({HELLO, STEP, PING, ERROR}),
               # the last stage's link to the first stage: ring rounds (closing the ring), nothing else
               "ring": frozenset({HELLO, STEP, PING, ERROR})}

_STEP_ARRAYS = frozenset({"seq", "pos", "tokens", "hidden", "out", "mpos"})


class ProtocolError(ValueError):
    """A message that breaks the protocol (missing, mistyped, inconsistent or out-of-range fields)."""


class StepError(ProtocolError):
    """A step frame that cannot be run."""


class SamplingError(ValueError):
    """Invalid sampling parameters (``field``: which one, when known)."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------- the lane rule
def lane_of(seq: Any, lanes: int) -> Any:
    """The lane (llama.cpp context on every stage) of sequence slot ``seq``: ``seq % lanes``; an int for an int,
    an array for an array."""
    return seq % lanes


# ---------------------------------------------------------------------- sampling parameters
# One range per field, for the HTTP edge and the last stage alike: (low, high, low excluded, what it must be).
# temperature and repetition_penalty below 1e-6 (but above 0) would overflow float32 logits; the HTTP edge
# maps such values (and OpenAI's top_p 0) to the nearest allowed one before building SamplingParams.
MIN_TEMPERATURE = 1e-6
MIN_REPETITION_PENALTY = 1e-6
MIN_TOP_P = 1e-9
INT32_MAX = 2**31 - 1
SAMPLING_RANGES: Dict[str, Tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "top_k": (0, INT32_MAX, False),
    "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.0, 10.0, True),
    "penalty_last_n": (-1, INT32_MAX, False),
    "seed": (0, 2**32 - 1, False),
}
_INT_FIELDS = frozenset({"top_k", "penalty_last_n", "seed"})


def range_text(name: str) -> str:
    lo, hi, open_lo = SAMPLING_RANGES[name]
    return f"{'(' if open_lo else '['}{lo}, {hi}]"


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style sampling parameters (plus llama.cpp's top_k, min_p, repeat penalty); checked when built.

    Ranges: :data:`SAMPLING_RANGES`. Built at the HTTP edge (``openai_schema.parse_sampling``) and, from the
    wire, on the last stage (:meth:`from_dict`); nowhere else needs to check them again."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name, (lo, hi, open_lo) in SAMPLING_RANGES.items():
            v = getattr(self, name)
            if v is None and name == "seed":
                continue
            if name in _INT_FIELDS:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise SamplingError(f"{name} must be an integer", name)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name} must be a finite number", name)
            if not (lo < v if open_lo else lo <= v) or v > hi:
                raise SamplingError(f"{name} must be in {range_text(name)}, got {v!r}", name)
        for name, tiny in (("temperature", MIN_TEMPERATURE), ("repetition_penalty", MIN_REPETITION_PENALTY)):
            if 0.0 < getattr(self, name) < tiny:
                raise SamplingError(f"{name} must be 0 or at least {tiny} (smaller values overflow float32 logits)",
                                    name)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> "SamplingParams":
        """Parameters are checked when built; kept for callers that chain it."""
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        """Parameters from a dict (unknown keys ignored, ``None`` = default), checked."""
        if d is not None and not isinstance(d, dict):
            raise SamplingError(f"sampling parameters must be an object, got {type(d).__name__}")
        d = d or {}
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


# ---------------------------------------------------------------------- step frames
@dataclass(frozen=True)
class FrameLimits:
    """What a stage accepts in a step frame (its configuration)."""

    n_seq_max: int
    n_ctx: int
    max_rows: int
    n_vocab: int
    n_embd_inp: int
    is_first: bool
    is_last: bool
    lanes: int = 1
    mrope: bool = False   # the model's rope takes 4 positions per row (a step may carry ``mpos``)

    def max_frame_bytes(self) -> int:
        """Largest step frame this stage can be sent (f32 hidden rows plus ids), with room for the header."""
        return self.max_rows * (self.n_embd_inp * 4 + 16) + (1 << 20)

    @property
    def token_hi(self) -> int:
        """Token ids are below this (middle stages hold no vocabulary: any int32)."""
        return self.n_vocab if self.n_vocab > 1 else INT32_MAX


@dataclass(frozen=True)
class SeqStart:
    """A sequence's first step on a pipeline: its sampling parameters, the tokens it generated before (a replay
    re-feeds them, so penalties, the grammar and the detokenizer pick up where they were), whether it may send
    drafts, its grammar (GBNF text, root rule ``root``; ``triggers``: the grammar applies only from the first
    of these words on, as llama.cpp's lazy grammars do) and how many top alternatives each sampled token's
    logprob comes with (``logprobs``: -1 none, 0..20)."""

    params: SamplingParams
    history: Tuple[int, ...] = ()
    spec: bool = False
    grammar: str = ""
    triggers: Tuple[str, ...] = ()
    logprobs: int = -1

    def to_wire(self) -> dict:
        d = self.params.to_dict()
        if self.spec:
            d["spec"] = True
        if self.history:
            d["history"] = list(self.history)
        if self.grammar:
            d["grammar"] = self.grammar
            if self.triggers:
                d["triggers"] = list(self.triggers)
        if self.logprobs >= 0:
            d["logprobs"] = self.logprobs
        return d

    @classmethod
    def from_wire(cls, v: Any, lim: FrameLimits, seq: int) -> "SeqStart":
        if not isinstance(v, dict):
            raise StepError(f"'start' of sequence {seq} must be an object")
        try:
            params = SamplingParams.from_dict(v)
        except (SamplingError, TypeError, ValueError) as e:
            raise StepError(f"sampling parameters of sequence {seq}: {e}") from None
        history = v.get("history") or []
        hi = lim.token_hi
        if (not isinstance(history, list) or len(history) > lim.n_ctx
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < hi for t in history)):
            raise StepError(f"'history' of sequence {seq} must be at most {lim.n_ctx} token ids in 0..{hi - 1}")
        spec = v.get("spec", False)
        if not isinstance(spec, bool):
            raise StepError(f"'spec' of sequence {seq} must be true or false")
        grammar = v.get("grammar", "")
        if not isinstance(grammar, str) or len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
            raise StepError(f"'grammar' of sequence {seq} must be GBNF text of at most {MAX_GRAMMAR_BYTES} bytes")
        triggers = v.get("triggers") or []
        if (not isinstance(triggers, list) or len(triggers) > MAX_TRIGGERS
                or not all(isinstance(t, str) and 0 < len(t) <= 256 for t in triggers)):
            raise StepError(f"'triggers' of sequence {seq} must be at most {MAX_TRIGGERS} words of 1..256 characters")
        logprobs = v.get("logprobs", -1)
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not -1 <= logprobs <= MAX_LOGPROBS:
            raise StepError(f"'logprobs' of sequence {seq} must be an integer in -1..{MAX_LOGPROBS}")
        if spec and grammar:
            raise StepError(f"sequence {seq}: a sequence under a grammar does not speculate")
        return cls(params, tuple(history), spec, grammar, tuple(triggers), logprobs)


_EMPTY_I32 = np.zeros(0, np.int32)


@dataclass
class StepFrame:
    """One micro-batch (see the module docstring). Rows of one sequence are contiguous, at consecutive
    positions; ``tokens`` travel to the first stage, ``hidden`` to the others."""

    step: int
    seq: np.ndarray = field(default_factory=lambda: _EMPTY_I32)              # int32 [n]
    pos: np.ndarray = field(default_factory=lambda: _EMPTY_I32)              # int32 [n]
    tokens: Optional[np.ndarray] = None                                      # int32 [n] (first stage)
    hidden: Optional[np.ndarray] = None                                      # float [n, n_embd] (later stages)
    out: Optional[np.ndarray] = None                                         # bool [n]
    free: List[int] = field(default_factory=list)
    start: Dict[int, SeqStart] = field(default_factory=dict)
    trim: Dict[int, int] = field(default_factory=dict)                       # seq -> keep positions < this
    drafts: Dict[int, np.ndarray] = field(default_factory=dict)              # seq -> draft tokens (its last rows)
    lane: int = 0
    # child seq -> (parent seq, n): before the rows, every stage copies the parent's KV at positions 0..n-1 to the
    # child (n > 1: one prefill shared by n choices; the prefix cache: a cached or live sequence's prefix); the
    # child holds nothing before and n positions after; n <= what the parent holds (stages whose memory cannot
    # be cut, ``StageHello.prefix_reuse`` "whole", take only n == what the parent holds)
    fork: Dict[int, Tuple[int, int]] = field(default_factory=dict)
    # seq -> target token ids, one per output row of the sequence in this step but its last (prompt logprobs,
    # ``echo``): the last stage returns each target's logprob (and top alternatives) instead of sampling there
    score: Dict[int, np.ndarray] = field(default_factory=dict)
    # closing the ring (:mod:`molink_lite.stage.ring`): seq -> (rounds left, ends at an end-of-generation token).
    # After sampling, the last stage sends the sampled tokens of the sequences that go on straight to the first
    # stage as the step's next ``round`` (the gateway still gets every result), so a token costs one trip around
    # the stages. Round 0 is the gateway's step; a round >= 1 carries only one decode row per ringed sequence.
    ring: Dict[int, Tuple[int, bool]] = field(default_factory=dict)
    round: int = 0
    # images (:mod:`molink_lite.wire.media`): ``media`` (first stage) seq -> ids of the images whose rows this step
    # carries for it, in order: its rows of token id -1 take the stored rows of these images; ``mpos`` int32 [n, 4]:
    # every row's M-RoPE positions (t, y, x, z) when a sequence of the step holds an image (``pos`` stays the row's
    # index in its sequence: what positions are held, trims and forks count in)
    media: Dict[int, Tuple[str, ...]] = field(default_factory=dict)
    mpos: Optional[np.ndarray] = None
    # the step is one image's rows alone, decoded with causal attention off on every stage (Gemma 3's images)
    noncausal: bool = False
    _runs: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.seq.shape[0])

    @property
    def spec(self) -> Set[int]:
        """Started sequences that sample for verification (speculative decoding)."""
        return {s for s, st in self.start.items() if st.spec}

    def runs(self) -> Tuple[np.ndarray, np.ndarray]:
        """(index of each sequence's first row, index of its last row)."""
        if self._runs is None:
            n = self.n
            if n == 0:
                empty = np.zeros(0, np.int64)
                self._runs = (empty, empty)
            else:
                change = self.seq[1:] != self.seq[:-1]
                starts = np.concatenate(([0], np.flatnonzero(change) + 1))
                self._runs = (starts, np.concatenate((starts[1:] - 1, [n - 1])))
        return self._runs

    def named(self) -> Set[int]:
        """Every sequence this step names (rows, frees, starts, trims, drafts)."""
        out = set(self.free) | set(self.start) | set(self.trim) | set(self.drafts) | set(self.fork)
        out.update(p for p, _ in self.fork.values())
        out.update(self.score)
        if self.n:
            out.update(np.unique(self.seq).tolist())
        return out

    def forward(self, hidden: np.ndarray) -> "StepFrame":
        """This step as the next stage gets it: the same rows and sequence changes, ``hidden`` for the tokens."""
        return replace(self, tokens=None, hidden=hidden, media={}, _runs=self._runs)

    # -------------------------------------------------------------- wire
    def to_wire(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        meta: Dict[str, Any] = {"type": STEP, "step": self.step, "free": list(self.free),
                                "start": {str(s): st.to_wire() for s, st in self.start.items()}}
        if self.lane:
            meta["lane"] = self.lane
        if self.trim:
            meta["trim"] = {str(s): int(p) for s, p in self.trim.items()}
        if self.drafts:
            meta["drafts"] = {str(s): np.asarray(d).tolist() for s, d in self.drafts.items()}
        if self.fork:
            meta["fork"] = {str(c): [int(p), int(k)] for c, (p, k) in self.fork.items()}
        if self.score:
            meta["score"] = {str(s): np.asarray(t).tolist() for s, t in self.score.items()}
        if self.ring:
            meta["ring"] = {str(s): [int(b), bool(e)] for s, (b, e) in self.ring.items()}
        if self.round:
            meta["round"] = self.round
        if self.media:
            meta["media"] = {str(s): list(ids) for s, ids in self.media.items()}
        if self.noncausal:
            meta["noncausal"] = True
        arrays: Dict[str, np.ndarray] = {"seq": self.seq, "pos": self.pos}
        if self.mpos is not None:
            arrays["mpos"] = self.mpos
        if self.tokens is not None:
            arrays["tokens"] = self.tokens
        if self.hidden is not None:
            arrays["hidden"] = self.hidden
        if self.out is not None:
            arrays["out"] = self.out.astype(np.uint8, copy=False)
        return meta, arrays

    def encode(self, codec: str = "f16") -> bytes:
        return encode_frame(*self.to_wire(), codec=codec)

    @classmethod
    def decode(cls, meta: dict, arrays: Dict[str, np.ndarray], lim: FrameLimits) -> "StepFrame":
        """A step frame from the wire, every field checked against ``lim`` (:class:`StepError` otherwise).

        Checks what the frame says of itself; where the sequences stand on the receiving stage (positions
        held, trims) is the stage's check (:func:`molink_lite.stage.validate.check_step`)."""
        step = meta.get("step")
        if step is None:
            step = 0
        elif isinstance(step, bool) or not isinstance(step, int):
            raise StepError("'step' must be an integer")
        lane = meta.get("lane", 0)
        if isinstance(lane, bool) or not isinstance(lane, int) or not 0 <= lane < max(1, lim.lanes):
            raise StepError(f"'lane' must be an integer in 0..{max(1, lim.lanes) - 1}")
        extra = set(arrays) - _STEP_ARRAYS
        if extra:
            raise StepError(f"unknown array(s) {sorted(extra)} in a step frame")
        free = _int_list(meta.get("free"), "free", lim.n_seq_max)
        hi = lim.token_hi
        start_raw = _seq_map(meta.get("start"), "start", lim.n_seq_max)
        start = {s: SeqStart.from_wire(v, lim, s) for s, v in start_raw.items()}
        trim: Dict[int, int] = {}
        for s, p in _seq_map(meta.get("trim"), "trim", lim.n_seq_max).items():
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < lim.n_ctx:
                raise StepError(f"'trim' of sequence {s} must be a position in 0..{lim.n_ctx - 1}")
            trim[s] = p
        drafts: Dict[int, np.ndarray] = {}
        for s, d in _seq_map(meta.get("drafts"), "drafts", lim.n_seq_max).items():
            if (not isinstance(d, list) or not 1 <= len(d) <= MAX_DRAFT
                    or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < hi for t in d)):
                raise StepError(f"'drafts' of sequence {s} must be 1..{MAX_DRAFT} token ids in 0..{hi - 1}")
            drafts[s] = np.asarray(d, dtype=np.int32)
        fork: Dict[int, Tuple[int, int]] = {}
        for c, v in _seq_map(meta.get("fork"), "fork", lim.n_seq_max).items():
            p, k = v if isinstance(v, list) and len(v) == 2 else (None, None)
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < lim.n_seq_max or p == c:
                raise StepError(f"'fork' of sequence {c} must be [parent, positions] with another sequence id in "
                                f"0..{lim.n_seq_max - 1}")
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= lim.n_ctx:
                raise StepError(f"'fork' of sequence {c} copies 0..{lim.n_ctx} positions, not {k!r}")
            fork[c] = (p, k)
        if set(fork) & {p for p, _ in fork.values()}:
            raise StepError("'fork': a sequence cannot be both copied and copied to in one step")
        if {p for p, _ in fork.values()} & set(free):
            raise StepError("'fork' copies a sequence this step frees")
        score: Dict[int, np.ndarray] = {}
        for s_, t in _seq_map(meta.get("score"), "score", lim.n_seq_max).items():
            if (not isinstance(t, list) or len(t) > lim.max_rows
                    or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < hi for x in t)):
                raise StepError(f"'score' of sequence {s_} must be at most {lim.max_rows} token ids in 0..{hi - 1}")
            score[s_] = np.asarray(t, dtype=np.int32)
        ring: Dict[int, Tuple[int, bool]] = {}
        for s_, v in _seq_map(meta.get("ring"), "ring", lim.n_seq_max).items():
            b, e = v if isinstance(v, list) and len(v) == 2 else (None, None)
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < lim.n_ctx or not isinstance(e, bool):
                raise StepError(f"'ring' of sequence {s_} must be [rounds left in 0..{lim.n_ctx - 1}, true|false]")
            ring[s_] = (b, e)
        rnd = meta.get("round", 0)
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd < lim.n_ctx:
            raise StepError(f"'round' must be an integer in 0..{lim.n_ctx - 1}")
        if rnd and (free or start or trim or drafts or fork or score):
            raise StepError("a ring round carries only decode rows (no free, start, trim, drafts, fork or score)")
        media: Dict[int, Tuple[str, ...]] = {}
        for s_, ids in _seq_map(meta.get("media"), "media", lim.n_seq_max).items():
            if not lim.is_first:
                raise StepError("'media' goes to the first stage only")
            if not isinstance(ids, list) or not 1 <= len(ids) <= 64 or not all(is_media_id(x) for x in ids):
                raise StepError(f"'media' of sequence {s_} must be 1..64 image ids (32 hex digits)")
            media[s_] = tuple(ids)
        if set(media) & (set(ring) | set(drafts) | set(fork)) or (media and rnd):
            raise StepError("a sequence with images in a step may not ring, draft or fork there")
        noncausal = meta.get("noncausal", False)
        if not isinstance(noncausal, bool):
            raise StepError("'noncausal' must be true or false")
        if noncausal and (ring or rnd or drafts or fork or score or (lim.is_first and len(media) != 1)):
            raise StepError("a 'noncausal' step holds one image's rows and nothing else")

        seq = _ints(arrays, "seq", None)
        n = int(seq.shape[0])
        pos = _ints(arrays, "pos", n)
        if n > lim.max_rows:
            raise StepError(f"{n} rows in one step; this stage takes at most {lim.max_rows}")
        frame = cls(step, seq.astype(np.int32, copy=False), pos.astype(np.int32, copy=False), free=free,
                    start=start, trim=trim, drafts=drafts, lane=lane, fork=fork, score=score, ring=ring, round=rnd,
                    media=media, noncausal=noncausal)
        mpos = arrays.get("mpos")
        if mpos is not None:
            if not lim.mrope:
                raise StepError("'mpos' (4 positions per row) is for models with M-RoPE; this one has none")
            if mpos.shape != (n, 4) or not np.issubdtype(mpos.dtype, np.integer):
                raise StepError(f"'mpos' must be int [{n}, 4], got {mpos.dtype} {tuple(mpos.shape)}")
            if n and (int(mpos.min()) < 0 or int(mpos.max()) >= lim.n_ctx + MAX_MEDIA_ROWS):
                raise StepError("'mpos' holds positions outside the context")
            frame.mpos = mpos.astype(np.int32, copy=False)
        if noncausal and (n == 0 or bool((seq != seq[0]).any())):
            raise StepError("a 'noncausal' step holds the rows of one sequence")
        if n == 0:
            if drafts or score or ring or rnd or media:
                raise StepError("'drafts', 'score' or 'ring' names sequences without rows in this step")
            frame._check_lane(lim.lanes)
            return frame
        if int(seq.min()) < 0 or int(seq.max()) >= lim.n_seq_max:
            raise StepError(f"sequence ids must be in 0..{lim.n_seq_max - 1}")
        if int(pos.min()) < 0 or int(pos.max()) >= lim.n_ctx:
            raise StepError(f"positions must be in 0..{lim.n_ctx - 1} (the context size)")
        seq, pos = frame.seq, frame.pos
        starts, ends = frame.runs()
        change = seq[1:] != seq[:-1]
        if starts.shape[0] != np.unique(seq).shape[0]:
            raise StepError("the rows of each sequence must be contiguous in a step")
        if np.any(np.diff(pos)[~change] != 1):
            raise StepError("positions must increase by one within each sequence")
        if lim.is_first:
            if "hidden" in arrays:
                raise StepError("the first stage takes token ids, not hidden states")
            tokens = _ints(arrays, "tokens", n)
            if int(tokens.max()) >= lim.n_vocab:
                raise StepError(f"token ids must be in 0..{lim.n_vocab - 1}")
            if int(tokens.min()) < 0:   # only image rows (-1), of sequences the step names in 'media'
                bad = tokens < 0
                if (int(tokens.min()) < -1 or not media
                        or not np.isin(seq[bad], np.fromiter(media, dtype=np.int32, count=len(media))).all()):
                    raise StepError(f"token ids must be in 0..{lim.n_vocab - 1} (-1: an image's rows, of a "
                                    f"sequence 'media' names)")
            if noncausal and int(tokens.max()) >= 0:
                raise StepError("a 'noncausal' step holds image rows only")
            frame.tokens = tokens.astype(np.int32, copy=False)
        else:
            if "tokens" in arrays:
                raise StepError("this stage takes hidden states, not token ids")
            hidden = arrays.get("hidden")
            if hidden is None:
                raise StepError("step frame needs a 'hidden' array")
            if hidden.shape != (n, lim.n_embd_inp) or not np.issubdtype(hidden.dtype, np.floating):
                raise StepError(f"'hidden' must be float [{n}, {lim.n_embd_inp}], got {hidden.dtype} "
                                f"{tuple(hidden.shape)}")
            if not np.isfinite(hidden).all():
                raise StepError("'hidden' holds NaN or infinite values")
            frame.hidden = hidden
        out = arrays.get("out")
        if out is not None:
            out = _ints(arrays, "out", n)
            if int(out.min()) < 0 or int(out.max()) > 1:
                raise StepError("'out' must hold 0 or 1 per row")
            frame.out = out.astype(bool)
        if drafts:
            if frame.out is None:
                raise StepError("a step with 'drafts' needs an 'out' array")
            out = frame.out
            row_of = {int(x): i for i, x in enumerate(seq[starts].tolist())}
            for s, d in drafts.items():
                i = row_of.get(s)
                if i is None:
                    raise StepError(f"'drafts' names sequence {s}, which has no rows in this step")
                a, b, k = int(starts[i]), int(ends[i]), int(d.shape[0])
                if b - a < k:
                    raise StepError(f"sequence {s} carries {k} drafts in {b - a + 1} rows (needs at least {k + 1})")
                if not out[b - k:b + 1].all() or out[a:b - k].any():
                    raise StepError(f"sequence {s}: exactly its last {k + 1} rows (last token and drafts) must be "
                                    f"outputs")
                if frame.tokens is not None and not np.array_equal(frame.tokens[b - k + 1:b + 1], d):
                    raise StepError(f"sequence {s}: 'drafts' differ from the tokens of its last {k} rows")
        if score:
            if frame.out is None:
                raise StepError("a step with 'score' needs an 'out' array")
            row_of = {int(x): i for i, x in enumerate(seq[starts].tolist())}
            for s, t in score.items():
                i = row_of.get(s)
                if i is None:
                    raise StepError(f"'score' names sequence {s}, which has no rows in this step")
                if s in drafts:
                    raise StepError(f"sequence {s}: 'score' and 'drafts' in one step")
                n_out = int(frame.out[int(starts[i]):int(ends[i]) + 1].sum())
                if t.shape[0] not in (n_out, n_out - 1):
                    raise StepError(f"sequence {s}: 'score' holds {t.shape[0]} targets for {n_out} output rows")
        if ring or rnd:
            frame._check_ring(ends)
        frame._check_lane(lim.lanes)
        return frame

    def _check_ring(self, ends: np.ndarray) -> None:
        """Ringed sequences sample one token from their last row (no drafts, no scores); a round >= 1 is nothing
        but the decode rows of ringed sequences, one each."""
        if self.drafts:
            raise StepError("a step with 'drafts' may not ring")
        last_of = dict(zip(self.seq[ends].tolist(), ends.tolist()))
        for s in self.ring:
            b = last_of.get(s)
            if b is None:
                raise StepError(f"'ring' names sequence {s}, which has no rows in this step")
            if s in self.drafts or s in self.score:
                raise StepError(f"sequence {s}: 'ring' with 'drafts' or 'score' in one step")
            if self.out is not None and not self.out[b]:
                raise StepError(f"sequence {s}: a ringed sequence's last row must be an output row")
        if self.round:
            if ends.shape[0] != self.n or set(last_of) != set(self.ring):
                raise StepError("a ring round holds exactly one row for each ringed sequence and nothing else")

    def _check_lane(self, lanes: int) -> None:
        """Every sequence a step names must live in the step's lane (its KV is in that lane's context)."""
        if lanes <= 1:
            return
        wrong = sorted(x for x in self.named() if lane_of(int(x), lanes) != self.lane)
        if wrong:
            raise StepError(f"sequence {wrong[0]} is not in lane {self.lane} (lanes hold sequence ids modulo "
                            f"{lanes})")


def _int_list(v: object, what: str, hi: int) -> List[int]:
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > hi:
        raise StepError(f"'{what}' must be a list of at most {hi} sequence ids")
    for s in v:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < hi:
            raise StepError(f"'{what}' holds {s!r}: sequence ids are integers in 0..{hi - 1}")
    return list(v)


def _ints(arrays: Dict[str, np.ndarray], name: str, n: Optional[int]) -> np.ndarray:
    a = arrays.get(name)
    if a is None:
        raise StepError(f"step frame needs a '{name}' array")
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise StepError(f"'{name}' must be a 1-D integer array, got {a.dtype} {tuple(a.shape)}")
    if n is not None and a.shape[0] != n:
        raise StepError(f"'{name}' has {a.shape[0]} rows, 'seq' has {n}")
    return a


def _seq_map(v: object, what: str, n_seq_max: int) -> Dict[int, Any]:
    """A JSON object keyed by sequence ids (as strings)."""
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > n_seq_max:
        raise StepError(f"'{what}' must map at most {n_seq_max} sequence ids to values")
    out: Dict[int, Any] = {}
    for k, x in v.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) < 6 and int(k) < n_seq_max):
            raise StepError(f"'{what}' key {str(k)[:20]!r} is not a sequence id in 0..{n_seq_max - 1}")
        out[int(k)] = x
    return out


# ---------------------------------------------------------------------- results
@dataclass
class ResultFrame:
    """The last stage's answer to a step: one or more tokens per output sequence (in step order), whether each
    ends generation, and its text piece.

    Logprobs travel only for sequences that asked (``SeqStart.logprobs``): ``logprob[i]`` is token i's log
    probability under the model's raw distribution (log_softmax of the logits, before temperature, penalties and
    grammar, as OpenAI and vLLM report it; NaN for sequences that did not ask), ``top_ids`` / ``top_logprobs``
    [m, k] its k best alternatives (k = the most any sequence of the step asked; id -1 pads). Prompt scoring
    (``StepFrame.score``) comes back in the ``score_*`` arrays: one row per target, in step order. Floats always
    travel as float32 (never the hidden-state codec)."""

    step: int
    seq: np.ndarray = field(default_factory=lambda: _EMPTY_I32)      # int32 [m]
    tokens: np.ndarray = field(default_factory=lambda: _EMPTY_I32)   # int32 [m]
    eog: Optional[np.ndarray] = None                                 # bool [m]
    pieces: List[str] = field(default_factory=list)
    logprob: Optional[np.ndarray] = None                             # float32 [m]
    top_ids: Optional[np.ndarray] = None                             # int32 [m, k]
    top_logprobs: Optional[np.ndarray] = None                        # float32 [m, k]
    score_seq: Optional[np.ndarray] = None                           # int32 [q]
    score_logprob: Optional[np.ndarray] = None                       # float32 [q]
    score_top_ids: Optional[np.ndarray] = None                       # int32 [q, k]
    score_top_logprobs: Optional[np.ndarray] = None                  # float32 [q, k]
    # the raw bytes of those tokens (llama_token_to_piece, hex: a token may be part of a UTF-8 character), for
    # OpenAI's ``token`` / ``bytes`` fields; sent with the logprobs only
    token_bytes: Optional[List[str]] = None                          # [m]
    top_bytes: Optional[List[List[str]]] = None                      # [m][k]
    score_bytes: Optional[List[str]] = None                          # [q]
    score_top_bytes: Optional[List[List[str]]] = None                # [q][k]
    # closing the ring: the round of step ``step`` this answers (0: the gateway's own step), the ringed sequences
    # that left the ring with it (ended, out of rounds, or stopped: no stage sees them in this ring again), and
    # whether the ring is over (no round follows)
    round: int = 0
    ring_left: List[int] = field(default_factory=list)
    ring_end: bool = False

    _BYTES = ("token_bytes", "top_bytes", "score_bytes", "score_top_bytes")
    _OPTIONAL = (("logprob", np.float32), ("top_ids", np.int32), ("top_logprobs", np.float32),
                 ("score_seq", np.int32), ("score_logprob", np.float32), ("score_top_ids", np.int32),
                 ("score_top_logprobs", np.float32))

    def to_wire(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        meta: Dict[str, Any] = {"type": RESULT, "step": self.step}
        arrays = {"seq": self.seq.astype(np.int32, copy=False), "tokens": self.tokens.astype(np.int32, copy=False)}
        if self.eog is not None:
            arrays["eog"] = self.eog.astype(np.uint8, copy=False)
        if self.pieces:
            meta["pieces"] = self.pieces
        if self.round:
            meta["round"] = self.round
        if self.ring_left:
            meta["ring_left"] = list(self.ring_left)
        if self.ring_end:
            meta["ring_end"] = True
        for name, dt in self._OPTIONAL:
            v = getattr(self, name)
            if v is not None:
                arrays[name] = np.asarray(v).astype(dt, copy=False)
        for name in self._BYTES:
            v = getattr(self, name)
            if v is not None:
                meta[name] = v
        return meta, arrays

    def encode(self) -> bytes:
        return encode_frame(*self.to_wire(), codec="f32")

    @classmethod
    def decode(cls, meta: dict, arrays: Dict[str, np.ndarray]) -> "ResultFrame":
        seq = arrays.get("seq", _EMPTY_I32)
        tokens = arrays.get("tokens", _EMPTY_I32)
        m = int(seq.shape[0])
        eog = arrays.get("eog")
        pieces = meta.get("pieces") or [""] * m
        if (seq.ndim != 1 or tokens.shape != (m,) or not np.issubdtype(seq.dtype, np.integer)
                or not np.issubdtype(tokens.dtype, np.integer) or (eog is not None and eog.shape != (m,))
                or not isinstance(pieces, list) or len(pieces) != m or not all(isinstance(p, str) for p in pieces)):
            raise ProtocolError("a result frame's seq, tokens, eog and pieces must be lists of one length")
        out = cls(_step_id(meta), seq, tokens, None if eog is None else eog.astype(bool), pieces)
        rnd, left, end = meta.get("round", 0), meta.get("ring_left") or [], meta.get("ring_end", False)
        if (isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0 or not isinstance(end, bool)
                or not isinstance(left, list) or len(left) > 1 << 16
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 20 for x in left)):
            raise ProtocolError("a result frame's round, ring_left and ring_end must be an integer, sequence ids "
                                "and a boolean")
        out.round, out.ring_left, out.ring_end = rnd, left, end
        for name, dt in cls._OPTIONAL:
            v = arrays.get(name)
            if v is not None:
                if np.issubdtype(dt, np.integer) != np.issubdtype(v.dtype, np.integer):
                    raise ProtocolError(f"a result frame's {name!r} has dtype {v.dtype}")
                setattr(out, name, v)
        q = None if out.score_seq is None else int(out.score_seq.shape[0])
        for rows, names in ((m, ("logprob", "top_ids", "top_logprobs")),
                            (q, ("score_logprob", "score_top_ids", "score_top_logprobs"))):
            for name in names:
                v = getattr(out, name)
                if v is None:
                    continue
                if rows is None or v.shape[0] != rows or v.ndim != (1 if name.endswith("logprob") else 2):
                    raise ProtocolError(f"a result frame's {name!r} has shape {tuple(v.shape)}")
                if v.ndim == 2 and v.shape[1] > MAX_LOGPROBS:
                    raise ProtocolError(f"a result frame's {name!r} has more than {MAX_LOGPROBS} alternatives")
        for name, rows, two_d in (("token_bytes", m, False), ("top_bytes", m, True), ("score_bytes", q, False),
                                  ("score_top_bytes", q, True)):
            v = meta.get(name)
            if v is None:
                continue
            ok = isinstance(v, list) and rows is not None and len(v) == rows and all(
                (isinstance(r, list) and len(r) <= MAX_LOGPROBS and all(_is_hex(x) for x in r)) if two_d
                else _is_hex(r) for r in v)
            if not ok:
                raise ProtocolError(f"a result frame's {name!r} must be {rows} hex strings{' lists' if two_d else ''}")
            setattr(out, name, v)
        return out


@dataclass
class StepErrorFrame:
    """A stage could not run step ``step``: nothing of it was applied there."""

    step: int
    message: str
    stage: str = ""

    def to_meta(self) -> dict:
        return {"type": STEP_ERROR, "step": self.step, "message": self.message, "stage": self.stage}

    @classmethod
    def decode(cls, meta: dict) -> "StepErrorFrame":
        return cls(_step_id(meta), str(meta.get("message"))[:2000], str(meta.get("stage") or "")[:40])


def _is_hex(x: object) -> bool:
    if not isinstance(x, str) or len(x) > 256 or len(x) % 2:
        return False
    try:
        bytes.fromhex(x)
    except ValueError:
        return False
    return True


def _step_id(meta: dict) -> int:
    step = meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


# ---------------------------------------------------------------------- control messages
@dataclass(frozen=True)
class Configure:
    """Gateway -> stage: become this pipeline's stage, send to ``next`` (None on the last stage) with ``codec``.
    ``gateway`` names the controller (fencing); ``takeover`` takes the stage from another controller."""

    next: Optional[str]
    codec: str
    gateway: str = ""
    takeover: bool = False
    ring: Optional[str] = None   # the last stage: the first stage's URL, to send ring rounds to (None: no ring)

    def to_meta(self) -> dict:
        meta: Dict[str, Any] = {"type": CONFIGURE, "next": self.next, "codec": self.codec}
        if self.gateway:
            meta.update(gateway=self.gateway, takeover=bool(self.takeover))
        if self.ring:
            meta["ring"] = self.ring
        return meta

    @classmethod
    def decode(cls, meta: dict, codec: str) -> "Configure":
        """A configure request from the wire (``codec``: the receiver's current one, for a request that names
        none); :class:`ProtocolError` for a bad field. A missing or empty ``next`` is None."""
        c = meta.get("codec", codec)
        if c not in CODECS:
            raise ProtocolError(f"unknown codec {c!r}; choose from {', '.join(CODECS)}")
        gid = meta.get("gateway")
        if gid is not None and (not isinstance(gid, str) or not 0 < len(gid) <= 64):
            raise ProtocolError("'gateway' must be a string of 1..64 characters")
        nxt, ring = meta.get("next"), meta.get("ring")
        for name, url in (("next", nxt), ("ring", ring)):
            if url and not (isinstance(url, str) and len(url) < 2048 and url.startswith(("ws://", "wss://"))):
                raise ProtocolError(f"'{name}' must be a ws:// or wss:// URL")
        return cls(nxt or None, c, gid or "", meta.get("takeover") is True, ring or None)


@dataclass(frozen=True)
class RingStop:
    """Gateway -> last stage: these ringed sequences leave their ring at the next round the last stage samples
    (a stop string matched, the client went away, or the gateway has work to merge with them)."""

    step: int
    seqs: Tuple[int, ...]

    def to_meta(self) -> dict:
        return {"type": RING_STOP, "step": self.step, "seqs": list(self.seqs)}

    @classmethod
    def decode(cls, meta: dict, n_seq_max: int) -> "RingStop":
        """:class:`StepError` for a malformed request."""
        return cls(_step_id(meta), tuple(_int_list(meta.get("seqs"), "seqs", n_seq_max)))


@dataclass(frozen=True)
class LinkDown:
    """Stage -> gateway: stage ``stage`` ("a-b") lost its link to the next stage ``to``; steps sent since may be
    lost (the gateway fails the pipeline over); the stage reconnects."""

    stage: str
    to: Optional[str]
    reason: str

    def to_meta(self) -> dict:
        return {"type": LINK_DOWN, "stage": self.stage, "to": self.to, "reason": self.reason[:300]}

    @classmethod
    def decode(cls, meta: dict) -> "LinkDown":
        return cls(str(meta.get("stage"))[:40], str(meta.get("to"))[:300], str(meta.get("reason"))[:300])


@dataclass(frozen=True)
class LinkUp:
    """Stage -> gateway: the link to the next stage is back."""

    stage: str
    to: Optional[str]

    def to_meta(self) -> dict:
        return {"type": LINK_UP, "stage": self.stage, "to": self.to}

    @classmethod
    def decode(cls, meta: dict) -> "LinkUp":
        return cls(str(meta.get("stage"))[:40], str(meta.get("to"))[:300])


@dataclass(frozen=True)
class Drain:
    """Stage -> gateway: this stage is shutting down; move its sequences now."""

    def to_meta(self) -> dict:
        return {"type": DRAIN}


class StageHello(TypedDict, total=False):
    """A stage's answer to ``hello``: who it is (the chain checks read these)."""

    type: str
    protocol: int
    arch: str
    fingerprint: str
    layer_start: int
    layer_stop: int
    n_layer_total: int
    n_embd: int
    n_embd_inp: int
    n_vocab: int
    n_ctx: int
    n_ctx_lane: int
    max_seqs: int
    n_batch: int
    max_rows: int
    lanes: int
    model: str
    name: str
    next: Optional[str]
    codec: str
    host: str
    backend: str
    n_gpu_layers: int
    stage_output: str  # how a non-last stage hands on its output: "graph" (engine patch) or "callback"; "" last
    released: bool  # the stage freed its model for being idle (an idle model); it loads it again on ``restore``
    model_bytes: int
    chat_template: Optional[str]
    bos: str
    eos: str
    add_bos: bool
    # how a fork may copy this stage's KV: "any" (a prefix of any length), "whole" (only all a sequence holds:
    # sliding-window attention forgets old positions, recurrent state cannot be cut)
    prefix_reuse: str
    # [rows, seconds] of a forward step of that many rows, measured when the stage started (stage/step_costs.py)
    step_costs: List[List[float]]
    url: str  # added by the gateway


STEP_COSTS_MAX_ENTRIES = 64    # a hello's step_costs: at most this many [rows, seconds] pairs,
STEP_COSTS_MAX_ROWS = 1 << 16   # rows in 1..this,
STEP_COSTS_MAX_S = 600.0        # seconds in (0, this]


def parse_step_costs(value: Any) -> List[Tuple[int, float]]:
    """A hello's ``step_costs`` as (rows, seconds) pairs sorted by rows; [] for anything malformed (it comes off the
    network: the gateway then fits the step costs it observes)."""
    if not isinstance(value, list) or not 0 < len(value) <= STEP_COSTS_MAX_ENTRIES:
        return []
    out = []
    for e in value:
        if not (isinstance(e, (list, tuple)) and len(e) == 2):
            return []
        n, s = e
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= STEP_COSTS_MAX_ROWS:
            return []
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) <= STEP_COSTS_MAX_S:
            return []
        out.append((n, float(s)))
    out.sort()
    if len({n for n, _ in out}) != len(out):
        return []
    return out


# ---------------------------------------------------------------------- chain checks
def chain_mismatch(prev: Union[StageHello, dict], nxt: Union[StageHello, dict]) -> Optional[str]:
    """Why stage ``nxt`` cannot follow stage ``prev``, or None if it can."""
    if nxt.get("protocol") != PROTOCOL_VERSION:
        return f"protocol version {nxt.get('protocol')} differs from {PROTOCOL_VERSION}"
    if nxt.get("fingerprint") != prev.get("fingerprint"):
        return (f"holds a different model (fingerprint {nxt.get('fingerprint')} vs {prev.get('fingerprint')}, "
                f"{nxt.get('model')} vs {prev.get('model')})")
    if nxt.get("layer_start") != prev.get("layer_stop"):
        if nxt["layer_start"] > prev["layer_stop"]:
            return f"gap: layers {prev['layer_stop']}-{nxt['layer_start'] - 1} are served by no stage"
        return f"overlap: layers {nxt['layer_start']}-{prev['layer_stop'] - 1} are served twice"
    if nxt.get("n_embd_inp") != prev.get("n_embd"):
        return f"hidden width {prev.get('n_embd')} does not match the next stage's input width {nxt.get('n_embd_inp')}"
    return None


def ring_mismatch(last: Union[StageHello, dict], first: Union[StageHello, dict]) -> Optional[str]:
    """Why stage ``first`` cannot take the ring rounds of last stage ``last`` (the same model, its first layers),
    or None if it can."""
    if first.get("protocol") != PROTOCOL_VERSION:
        return f"protocol version {first.get('protocol')} differs from {PROTOCOL_VERSION}"
    if first.get("fingerprint") != last.get("fingerprint"):
        return f"holds a different model (fingerprint {first.get('fingerprint')} vs {last.get('fingerprint')})"
    if first.get("layer_start") != 0:
        return f"is not a first stage (its layers start at {first.get('layer_start')})"
    return None


def check_chain(infos: Sequence[Union[StageHello, dict]]) -> Optional[str]:
    """Why these stages (in order) do not form one whole model, or None."""
    if not infos:
        return "no stages"
    for i in infos:
        if i.get("protocol") != PROTOCOL_VERSION:
            return f"stage {i.get('url')} speaks protocol {i.get('protocol')}, expected {PROTOCOL_VERSION}"
    if infos[0]["layer_start"] != 0:
        return (f"the first stage ({infos[0]['url']}) starts at layer {infos[0]['layer_start']}: "
                f"layers 0-{infos[0]['layer_start'] - 1} are served by no stage")
    for a, b in zip(infos, infos[1:]):
        problem = chain_mismatch(a, b)
        if problem:
            return f"stage {b['url']} cannot follow {a['url']}: {problem}"
    last = infos[-1]
    if last["layer_stop"] != last["n_layer_total"]:
        return (f"the last stage ({last['url']}) ends at layer {last['layer_stop'] - 1}: layers "
                f"{last['layer_stop']}-{last['n_layer_total'] - 1} are served by no stage")
    return None


__all__ = [
    "PROTOCOL_VERSION", "MEDIA", "MAX_MEDIA_ROWS", "is_media_id", "RELEASE", "RELEASED", "RESTORE", "RESTORED", "MAX_DRAFT", "MAX_LOGPROBS", "MAX_GRAMMAR_BYTES", "ROLE_FRAMES", "ProtocolError", "StepError", "SamplingError", "SamplingParams",
    "SAMPLING_RANGES", "FrameLimits", "SeqStart", "StepFrame", "ResultFrame", "StepErrorFrame", "Configure",
    "LinkDown", "LinkUp", "Drain", "StageHello", "parse_step_costs", "lane_of", "chain_mismatch", "check_chain",
]
