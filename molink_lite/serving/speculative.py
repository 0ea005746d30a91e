"""Speculative decoding at the gateway: prompt-lookup (n-gram) drafts and how many to send.

Over slow links one stream gets one token per round trip. A decode step may instead carry, for a
sequence, its last token plus k draft tokens at the next positions; the last stage verifies them in
the same pass (see :meth:`molink_lite.stage.sampling.SamplerPool.sample_verify`) and returns 1..k+1
tokens; the next step tells every stage to drop the rejected positions from its KV (``trim``).

Drafts come from the sequence itself: the most recent earlier occurrence of its last n tokens (n from
``n_max`` down to 1) in prompt + output, and the k tokens that followed it. That pays on what people run
over their own text: editing, rewriting, extracting, answering from a document, code edits.

How many drafts each sequence sends is decided per step by a cost model (:func:`allocate`):

* per sequence, the chance that draft j is accepted is taken as ``r**j``, where ``r`` is the sequence's
  measured per-draft acceptance rate (a decayed count, :class:`SpecState`);
* per step, what a step of R rows costs the pipeline (:meth:`StepCost.seconds`). Where every stage said in its
  hello what a step of 1, 2, ... rows costs it (``step_costs``, measured when it started: stage/step_costs.py),
  that is ``max(slowest stage, (links + every stage) / m)`` for m steps in flight: the pipeline's micro-batches
  share the links, and the slowest stage bounds them. Otherwise a line ``a/m + b * R`` fitted online on the
  pipeline's own decode steps (``a`` the links' latency and fixed costs, ``b`` the per-row compute);
* the step takes the number of draft rows D (best-accepted first) that gives the most expected tokens per second,
  ``(tokens + accepted drafts expected) / seconds(R + D)``. For a line this is the marginal rule "add a draft while
  it pays for the time it adds"; for measured costs it sees that a CPU's matrix kernels work on tiles of rows
  (8 rows can cost less than 5), and fills a tile where a line would stop short. With one sequence over a 20 ms
  link almost any draft pays; with many sequences per step (the stages are busy) only well-accepted drafts do,
  and with fast links and slow compute few do: speculation backs off by itself.
"""

from __future__ import annotations

import bisect
import heapq
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from .sequence import SeqState

log = logging.getLogger(__name__)
MODES = ("off", "ngram", "auto")
AUTO_RTT_S = 0.005     # "auto" turns speculation on when a step's path round trip is at least this long
DEFAULT_K = 8          # most drafts per sequence per step
DEFAULT_N = 3          # longest n-gram matched
PRIOR_RATE = 0.8       # a pipeline's acceptance rate before any draft came back (AcceptancePrior)
PRIOR_WEIGHT = 2.0     # a new sequence starts at its pipeline's rate, worth this many verified drafts
PROBE_RATE = 0.95      # a sequence's drafts are planned with at least this rate until one of its steps came back:
#                        its first drafts find out what its text gives (a text that repeats accepts nearly all)
DECAY = 0.8            # weight of the older acceptance counts per verified step (a sequence)
POOL_DECAY = 0.95      # ... (a pipeline: every sequence's verified steps)
RECOVER = 0.05         # per step without drafts, a sequence's rate drifts back towards its pipeline's by this share
LOOKAHEAD = 16         # allocate() looks this many draft rows past its best count (tiles of rows are 4-8 wide)


@dataclass
class SpecConfig:
    mode: str = "off"      # off | ngram | auto (resolved per pipeline when it connects)
    k: int = DEFAULT_K
    n: int = DEFAULT_N

    def validate(self) -> "SpecConfig":
        if self.mode not in MODES:
            raise ValueError(f"--speculative must be one of {', '.join(MODES)}")
        if not 1 <= self.k <= 32:
            raise ValueError("--spec-k must be in 1..32")
        if not 1 <= self.n <= 16:
            raise ValueError("--spec-n must be in 1..16")
        return self


def propose(ctx: np.ndarray, n_max: int, k: int) -> np.ndarray:
    """Up to ``k`` draft tokens: what followed the latest earlier occurrence of the last n tokens of ``ctx``.

    Tries n = ``n_max`` .. 1 and takes the longest n that matches. Vectorized over the context (numpy).
    """
    L = int(ctx.shape[0])
    for n in range(min(n_max, L - 1), 0, -1):
        tail = ctx[L - n:]
        win = np.lib.stride_tricks.sliding_window_view(ctx[:L - 1], n)  # win[i] = ctx[i:i+n], i+n <= L-1
        hit = np.flatnonzero((win == tail).all(axis=1))
        if hit.size:
            i = int(hit[-1]) + n
            # the continuation runs into the end of ctx: the text repeats with period L - i, and so do the drafts
            return ctx[i:i + k].copy() if i + k <= L else np.resize(ctx[i:L], k)
    return ctx[:0].copy()


def _counted(succ: float, trials: float, decay: float, k: int, accepted: int) -> Tuple[float, float]:
    """Acceptance counts after a verified step: ``accepted`` of ``k`` drafts agreed. Each accepted draft is a success,
    and the first rejected one (if any) a failure: ``succ / trials`` is the chance a draft is accepted given the one
    before it was."""
    return decay * succ + accepted, decay * trials + accepted + (1 if accepted < k else 0)


class AcceptancePrior:
    """A pipeline's acceptance rate over all its sequences' verified drafts (decayed): where a new sequence starts,
    and where one that stopped drafting drifts back to. A sequence's own few steps are noisy: one miss at a 0.5 prior
    ended its drafting where steps are dear (CPU stages), and a prior that low never paid for a first draft there."""

    def __init__(self, rate: float = PRIOR_RATE, weight: float = 4.0):
        self.succ, self.trials = rate * weight, weight

    @property
    def rate(self) -> float:
        return self.succ / self.trials

    def verified(self, k: int, accepted: int) -> None:
        self.succ, self.trials = _counted(self.succ, self.trials, POOL_DECAY, k, accepted)


@dataclass
class SpecState:
    """A sequence's speculation record: its tokens (for lookup), acceptance counts, the drafts in flight."""

    buf: np.ndarray                      # prompt + generated tokens (int32), filled up to ``length``
    length: int
    succ: float = PRIOR_RATE * PRIOR_WEIGHT
    trials: float = PRIOR_WEIGHT
    drafts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # sent in the step in flight
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    # a draft model's proposal (serving/draft_model.py) and the length of ``buf`` it continues (-1: none)
    model_drafts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    model_at: int = -1
    prior: Optional[AcceptancePrior] = None   # its pipeline's (adopt)

    def adopt(self, prior: AcceptancePrior) -> None:
        """Draft on a pipeline: start at its rate (before any verified step of this sequence) and report to it."""
        if self.prior is prior:
            return
        self.prior = prior
        if not self.rounds:
            self.succ, self.trials = prior.rate * PRIOR_WEIGHT, PRIOR_WEIGHT

    @classmethod
    def for_prompt(cls, prompt: np.ndarray, max_tokens: int, generated: Sequence[int] = ()) -> "SpecState":
        buf = np.zeros(int(prompt.shape[0]) + max_tokens + 1, np.int32)
        buf[:prompt.shape[0]] = prompt
        n = int(prompt.shape[0])
        if len(generated):
            buf[n:n + len(generated)] = np.asarray(generated, np.int32)
        return cls(buf, n + len(generated))

    def push(self, token: int) -> None:
        if self.length < self.buf.shape[0]:
            self.buf[self.length] = token
            self.length += 1

    @property
    def rate(self) -> float:
        return self.succ / self.trials

    @property
    def plan_rate(self) -> float:
        """The rate its drafts are planned with: :attr:`rate`, at least PROBE_RATE before any verified step."""
        return self.rate if self.rounds else max(self.rate, PROBE_RATE)

    def candidates(self, n_max: int, k: int) -> np.ndarray:
        """Up to ``k`` drafts: the draft model's if it has some for the tokens as they are now, else prompt lookup."""
        if k <= 0:
            return self.buf[:0]
        if self.model_at == self.length and self.model_drafts.shape[0]:
            return self.model_drafts[:k]
        return propose(self.buf[:self.length], n_max, k)

    def verified(self, k: int, accepted: int) -> None:
        """Drafts of the last step came back: ``accepted`` of ``k`` agreed with the model."""
        self.succ, self.trials = _counted(self.succ, self.trials, DECAY, k, accepted)
        if self.prior is not None:
            self.prior.verified(k, accepted)
        self.drafted += k
        self.accepted += accepted
        self.rounds += 1

    def idle(self) -> None:
        """A step without drafts: let the rate drift back to the prior (a text may turn repetitive later: a rate
        that stayed low would never draft again where steps are dear)."""
        target = self.prior.rate if self.prior is not None else PRIOR_RATE
        self.succ += RECOVER * (target * self.trials - self.succ)


class StepCost:
    """What a step of R rows costs: from the stages' measured step costs and the links (:meth:`set_stages`), else an
    online least-squares fit of the observed round trips, ``a + b * rows`` (exponentially weighted)."""

    def __init__(self, a: float, b: float, decay: float = 0.97):
        self.a0, self.b0, self.decay = a, b, decay
        self.w = self.x = self.y = self.xx = self.xy = 0.0
        self.stages: List[List[Tuple[int, float]]] = []   # per stage: sorted (rows, seconds) measured there
        self.links_s = 0.0                                # a step's path round trip outside the stages' compute

    def set_stages(self, tables: Sequence[Sequence[Tuple[int, float]]], links_s: float) -> None:
        """Every stage's measured (rows, seconds) table and the step path's measured round trip; any stage without a
        table leaves the fitted line in use."""
        good = bool(tables) and all(tables)
        self.stages = [list(t) for t in tables] if good else []
        self.links_s = max(0.0, float(links_s))

    def seconds(self, rows: int, in_flight: int = 1) -> float:
        """What a step of ``rows`` rows costs the pipeline with ``in_flight`` steps in flight (this one included)."""
        m = max(1, int(in_flight))
        if self.stages:
            per = [_table_at(t, rows) for t in self.stages]
            return max(max(per), (self.links_s + sum(per)) / m)
        a, b = self.params()
        return a / m + b * rows

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w = d * self.w + 1
        self.x = d * self.x + rows
        self.y = d * self.y + seconds
        self.xx = d * self.xx + rows * rows
        self.xy = d * self.xy + rows * seconds

    def params(self) -> Tuple[float, float]:
        if self.w < 3:
            return self.a0, self.b0
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var < 0.5:  # every step had about the same rows: keep the prior slope
            b = self.b0
        else:
            b = (self.xy / self.w - mx * my) / var
        b = min(max(b, 1e-5), 1.0)
        a = max(my - b * mx, 1e-4)
        return a, b


def _table_at(table: Sequence[Tuple[int, float]], rows: int) -> float:
    """Seconds of a step of ``rows`` rows from a measured table: the entry, else linear between the nearest two,
    else past the last at the slope from the entry nearest half its rows to it (tiles make neighbours jump; at
    least the last entry's seconds per row, scaled down by 4)."""
    if rows <= table[0][0]:
        return table[0][1]
    j = bisect.bisect_left(table, (rows, 0.0))
    if j < len(table):
        (n0, s0), (n1, s1) = table[j - 1], table[j]
        return s0 + (rows - n0) / (n1 - n0) * (s1 - s0)
    n1, s1 = table[-1]
    n0, s0 = min(table[:-1], key=lambda e: abs(e[0] - n1 / 2), default=(0, 0.0))
    slope = max((s1 - s0) / (n1 - n0), s1 / n1 / 4)
    return s1 + slope * (rows - n1)


def linear(a: float, b: float) -> Callable[[int], float]:
    """A step cost ``a + b * rows`` (for :func:`allocate`)."""
    return lambda rows: a + b * rows


def allocate(rates: Sequence[float], limits: Sequence[int], n_tokens: int, rows: int,
             seconds: Callable[[int], float], budget: int) -> List[int]:
    """Drafts per candidate sequence for one step (see the module docstring for the rule).

    ``rates[i]``: per-draft acceptance rate of candidate i; ``limits[i]``: drafts it has available;
    ``n_tokens``: tokens the step yields without drafts (one per decoding sequence); ``rows``: rows it
    has; ``seconds(R)``: what a step of R rows costs; ``budget``: draft rows that still fit the step. Drafts are
    taken best-accepted first (a heap of each candidate's next draft); the step keeps the count of them with the most
    expected tokens per second, looking at most LOOKAHEAD drafts past the best so far.
    """
    heap = [(-float(r), i) for i, (r, lim) in enumerate(zip(rates, limits)) if lim > 0 and r > 0.0]
    heapq.heapify(heap)   # (-acceptance chance of the candidate's next draft, candidate)
    taken = [0] * len(rates)
    order: List[int] = []
    expected, R = float(n_tokens), rows
    best, best_d = expected / max(seconds(R), 1e-9), 0
    while budget > 0 and heap and len(order) - best_d < LOOKAHEAD:
        neg, i = heapq.heappop(heap)
        alpha = -neg
        order.append(i)
        taken[i] += 1
        expected += alpha
        R += 1
        budget -= 1
        if taken[i] < limits[i] and alpha * rates[i] > 0.0:
            heapq.heappush(heap, (-alpha * rates[i], i))
        rate = expected / max(seconds(R), 1e-9)
        if rate > best * (1 + 1e-9):
            best, best_d = rate, len(order)
    ks = [0] * len(rates)
    for i in order[:best_d]:
        ks[i] += 1
    return ks


def auto_enabled(path_rtt_s: Optional[float]) -> bool:
    """``--speculative auto``: on when a step's path (gateway -> stages -> gateway) takes at least 5 ms."""
    return path_rtt_s is not None and path_rtt_s >= AUTO_RTT_S


def for_path(cfg: SpecConfig, path_rtt_s: float, on: bool,
             stage_costs: Sequence[Sequence[Tuple[int, float]]] = ()) -> Tuple[bool, StepCost]:
    """Speculate or not (``auto``: :func:`auto_enabled`; otherwise ``on`` stays), and the step cost model, for a
    pipeline whose step path was measured to take ``path_rtt_s`` and whose stages measured ``stage_costs`` (one
    (rows, seconds) table each; a missing one leaves the fitted line in use)."""
    on = auto_enabled(path_rtt_s) if cfg.mode == "auto" else on
    log.info("step path round trip %.1f ms: speculative decoding %s (--speculative %s, k<=%d, n<=%d)",
             1e3 * path_rtt_s, "on" if on else "off", cfg.mode, cfg.k, cfg.n)
    cost = StepCost(path_rtt_s + 0.01, 0.001)
    cost.set_stages(stage_costs, path_rtt_s)
    return on, cost


def plan_drafts(decode: Sequence["SeqState"], prefill_rows: int, cfg: SpecConfig, cost: StepCost,
                max_batch_tokens: int, in_flight: int, prior: Optional[AcceptancePrior] = None) -> List[np.ndarray]:
    """Draft tokens for each decoding sequence of a step (empty arrays where none pay), by :func:`allocate`.

    Gives every decoding sequence its :class:`SpecState` (made on first use) and lets the rate of those that get
    no drafts drift back (:meth:`SpecState.idle`). ``in_flight``: steps in flight besides this one."""
    empty = np.zeros(0, np.int32)
    cands, limits, rates = [], [], []
    for s in decode:
        if not s.may_speculate:  # under a grammar: never drafts
            cands.append(empty)
            limits.append(0)
            rates.append(0.0)
            continue
        if s.spec is None:
            s.spec = SpecState.for_prompt(s.req.prompt, s.req.max_tokens, s.generated)
        if prior is not None:
            s.spec.adopt(prior)
        room = min(cfg.k, s.req.max_tokens - len(s.generated) - 1)
        c = s.spec.candidates(cfg.n, room)
        cands.append(c)
        limits.append(int(c.shape[0]))
        rates.append(s.spec.plan_rate)
    budget = max_batch_tokens - len(decode) - prefill_rows
    if not any(limits) or budget <= 0:
        for s in decode:
            if s.spec is not None:
                s.spec.idle()
        return [empty] * len(decode)
    # with m steps in flight the fixed part of a round trip (links, per-step work) is shared by m steps:
    # a busy pipeline is bound by per-row compute, where a draft row must nearly pay for itself
    m = in_flight + 1
    ks = allocate(rates, limits, len(decode), len(decode) + prefill_rows, lambda r: cost.seconds(r, m), budget)
    out = []
    for s, c, k in zip(decode, cands, ks):
        if k == 0 and s.spec is not None:
            s.spec.idle()
        out.append(c[:k])
    return out


def summary(cfg: SpecConfig, on: bool, stats: dict, cost: StepCost, path_rtt_s: Optional[float]) -> dict:
    """A pipeline's speculative decoding: setting, state, acceptance rate and tokens per round trip (decode
    entries), from its counters (``stats``)."""
    a, b = cost.params()
    drafted, entries = stats["drafted"], stats["decode_entries"]
    return {"mode": cfg.mode, "on": on, "k": cfg.k, "n": cfg.n,
            "path_rtt_ms": None if path_rtt_s is None else round(1e3 * path_rtt_s, 3),
            "drafted": drafted, "accepted": stats["accepted"],
            "acceptance": round(stats["accepted"] / drafted, 4) if drafted else None,
            "tokens_per_round_trip": round(stats["decode_tokens"] / entries, 4) if entries else None,
            "step_cost_ms": {"a": round(1e3 * a, 3), "b_per_row": round(1e3 * b, 4)},
            "step_cost_from": "stages' measured step costs" if cost.stages else "fitted round trips",
            "step_ms_by_rows": {str(n): round(1e3 * cost.seconds(n), 2) for n in (1, 2, 4, 8, 16, 32, 64)}}
