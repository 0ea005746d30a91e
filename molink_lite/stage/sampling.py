"""Next-token sampling on the last stage with llama.cpp's own sampler chain.

Each sequence owns a ``llama_sampler`` chain (penalties -> top-k -> top-p -> min-p ->
temperature -> dist, or penalties -> greedy). Chains are applied to logit rows held
in numpy, so sampling does not depend on which ``llama_decode`` produced them.
Greedy sequences without penalties take a vectorized argmax path (identical choice:
both pick the first maximal id), or take the token the engine already picked on the
device (``device``: see ``StageEngine.last_sampled``); the pool tells the engine which
slots sample greedily (``on_greedy``), since only those can be sampled there.
"""

from __future__ import annotations

import llama_cpp.llama_cpp as _llama  # noqa: I001 - before numpy

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..wire.protocol import SamplingError, SamplingParams, SeqStart

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(_llama.llama_token_data)


class SequenceSampler:
    """A llama.cpp sampler chain for one sequence.

    ``spec`` (speculative decoding, non-greedy only): the chain stops before llama.cpp's ``dist`` sampler
    and the token is drawn here by inverse CDF over the chain's candidates with a uniform number that
    depends only on (seed, position). A draft token d is accepted iff the drawn token equals d: that is
    the standard rejection rule for a point-mass draft (accept with probability p(d); on rejection the
    token follows p with d removed, renormalized), so the output distribution is the chain's, and a
    seeded sequence draws the same tokens whatever drafts it was offered (given the same logits).
    """

    def __init__(self, params: SamplingParams, n_vocab: int, spec: bool = False):
        self.params = params
        self.fast_greedy = params.greedy and not params.has_penalties
        self.spec = bool(spec) and not params.greedy
        self._chain = None
        if self.fast_greedy:
            return
        chain = _llama.llama_sampler_chain_init(_llama.llama_sampler_chain_default_params())
        add = lambda s: _llama.llama_sampler_chain_add(chain, s)  # noqa: E731
        if params.has_penalties:
            add(_llama.llama_sampler_init_penalties(n_vocab, params.penalty_last_n, params.repetition_penalty,
                                                    params.frequency_penalty, params.presence_penalty))
        if params.greedy:
            add(_llama.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(_llama.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(_llama.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(_llama.llama_sampler_init_min_p(params.min_p, 1))
            add(_llama.llama_sampler_init_temp(params.temperature))
            if self.spec:
                self._seed = params.seed
                self._rng = np.random.default_rng() if params.seed is None else None
            else:
                seed = _llama.LLAMA_DEFAULT_SEED if params.seed is None else int(params.seed)
                add(_llama.llama_sampler_init_dist(seed))
        self._chain = chain

    def uniform(self, position: int) -> float:
        """The uniform number that draws the token at ``position`` (spec mode)."""
        if self._seed is None:
            return float(self._rng.random())
        return float(np.random.Generator(np.random.PCG64([int(self._seed), int(position)])).random())

    def _apply(self, logits: np.ndarray) -> tuple:
        """Run the sampler chain over one row of logits: (the candidate buffer it was given, the result array)."""
        n = logits.shape[0]
        data = np.empty(n, dtype=TOKEN_DATA)
        data["id"] = np.arange(n, dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        arr = _llama.llama_token_data_array(
            data=data.ctypes.data_as(_llama.llama_token_data_p), size=n, selected=-1, sorted=False)
        _llama.llama_sampler_apply(self._chain, ctypes.byref(arr))
        return data, arr

    def _draw(self, logits: np.ndarray, position: int) -> int:
        data, arr = self._apply(logits)
        size = int(arr.size)
        if size < 1:
            raise SamplingError("sampler chain left no candidate token")
        cand = data
        if ctypes.cast(arr.data, ctypes.c_void_p).value != data.ctypes.data:  # a sampler swapped the buffer
            raw = ctypes.cast(arr.data, ctypes.POINTER(ctypes.c_uint8))
            cand = np.ctypeslib.as_array(raw, shape=(size * TOKEN_DATA.itemsize,)).view(TOKEN_DATA).copy()
        lg = cand["logit"][:size].astype(np.float64)
        w = np.exp(lg - lg.max())
        c = np.cumsum(w)
        j = min(int(np.searchsorted(c, self.uniform(position) * c[-1], side="right")), size - 1)
        token = int(cand["id"][j])
        _llama.llama_sampler_accept(self._chain, token)
        return token

    def sample(self, logits: np.ndarray, position: int = 0) -> int:
        """Pick the next token from one row of logits and record it (for penalties); ``position``: where the
        picked token goes (used by spec-mode samplers only)."""
        if self.fast_greedy:
            return int(np.argmax(logits))
        if self.spec:
            return self._draw(logits, position)
        data, arr = self._apply(logits)
        if not 0 <= arr.selected < arr.size:
            raise SamplingError("sampler chain selected no token")
        token = int(data["id"][arr.selected])
        _llama.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            _llama.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


class SamplerPool:
    """Samplers of the live sequences on a last stage, keyed by sequence id."""

    def __init__(self, n_vocab: int, on_greedy: Optional[Callable[[int, bool], None]] = None) -> None:
        self.n_vocab = n_vocab
        self._by_seq: Dict[int, SequenceSampler] = {}
        # told (sequence id, plain greedy?) whenever a slot's sampler changes: the engine samples those on the device
        self._on_greedy = on_greedy or (lambda _s, _g: None)

    def start(self, seq_id: int, params: SamplingParams, history: Sequence[int] = (), spec: bool = False) -> None:
        """A sampler for a sequence; ``history`` (tokens it generated before a replay) primes the penalties;
        ``spec``: the sequence may send drafts to verify (see :class:`SequenceSampler`)."""
        self.drop(seq_id)
        sampler = self._by_seq[seq_id] = SequenceSampler(params, self.n_vocab, spec)
        if not sampler.fast_greedy:
            self._on_greedy(seq_id, False)
        if sampler._chain is not None:
            for t in history:
                _llama.llama_sampler_accept(sampler._chain, int(t))

    def drop(self, seq_id: int) -> None:
        s = self._by_seq.pop(seq_id, None)
        if s is not None:
            if not s.fast_greedy:
                self._on_greedy(seq_id, True)  # a free slot samples greedily (the default sampler)
            s.close()

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._by_seq

    def check_verifiable(self, drafts: Dict[int, np.ndarray], start: Dict[int, SeqStart], spec: set) -> None:
        """Drafts are verified only by greedy samplers and by samplers started in spec mode (``start``: this
        step's sampler starts; ``spec``: those of them in spec mode)."""
        for s in drafts:
            if s in start:
                ok = start[s].params.greedy or s in spec
            else:
                sm = self._by_seq.get(s)
                ok = sm is None or sm.params.greedy or sm.spec
            if not ok:
                raise SamplingError(f"sequence {s} carries drafts but its sampler was not started with 'spec'")

    def sample_verify(self, seq_ids: np.ndarray, logits: np.ndarray, drafts: Dict[int, np.ndarray],
                      positions: np.ndarray, device: Optional[np.ndarray] = None) -> "tuple[np.ndarray, np.ndarray]":
        """Tokens for output rows where some sequences verify drafts; returns (sequence per token, tokens).

        A sequence with k drafts owns k+1 consecutive output rows (its last token, then each draft): row j
        predicts the token after draft j. The longest prefix of drafts that the sampler agrees with is
        accepted and one more token (the correction, or the bonus after all k) follows: 1..k+1 tokens.
        Other sequences get one token per output row, as in :meth:`sample`. ``device``: as in :meth:`sample`.
        """
        n = int(seq_ids.shape[0])
        seq_ids = np.asarray(seq_ids, dtype=np.int32)
        positions = np.asarray(positions, dtype=np.int64)
        is_draft_row = np.isin(seq_ids, np.fromiter(drafts.keys(), dtype=np.int32, count=len(drafts)))
        plain = np.flatnonzero(~is_draft_row)
        toks_plain = (self.sample(seq_ids[plain], logits[plain], positions[plain],
                                  None if device is None else device[plain]) if plain.size else None)
        change = np.flatnonzero(np.diff(seq_ids)) + 1
        starts = np.concatenate(([0], change)).tolist()
        ends = change.tolist() + [n]
        plain_at = np.full(n, -1, np.int64)
        plain_at[plain] = np.arange(plain.size)
        out_seq, out_tok = [], []
        for a, b in zip(starts, ends):  # one run per sequence
            s = int(seq_ids[a])
            d = drafts.get(s)
            if d is None:
                out_seq.append(seq_ids[a:b])
                out_tok.append(toks_plain[plain_at[a:b]])
                continue
            k = int(d.shape[0])
            if b - a != k + 1:
                raise SamplingError(f"sequence {s}: {b - a} output rows for {k} drafts")
            sm = self._by_seq.get(s) or _GREEDY
            if sm.fast_greedy:
                if device is not None and (device[a:b] >= 0).all():
                    am = device[a:b]
                else:
                    am = np.argmax(logits[a:b], axis=-1).astype(np.int32)
                miss = np.flatnonzero(am[:k] != d)
                acc = int(miss[0]) if miss.size else k
                toks = am[:acc + 1]
            else:
                got = []
                for j in range(k + 1):
                    t = sm.sample(logits[a + j], int(positions[a + j]) + 1)
                    got.append(t)
                    if j == k or t != int(d[j]):
                        break
                toks = np.asarray(got, dtype=np.int32)
            out_seq.append(np.full(toks.shape[0], s, np.int32))
            out_tok.append(toks)
        return np.concatenate(out_seq), np.concatenate(out_tok).astype(np.int32)

    def sample(self, seq_ids: Sequence[int], logits: np.ndarray,
               positions: Optional[np.ndarray] = None, device: Optional[np.ndarray] = None) -> np.ndarray:
        """One token per row of ``logits`` (row i belongs to ``seq_ids[i]``; ``positions[i]``: that row's
        position, which seeds spec-mode samplers).

        ``device[i]`` >= 0: the token the engine's device sampler picked for row i (greedy rows only; the
        logits of such rows may not have been copied back, so they are not read). Other greedy rows take an
        argmax straight on the rows of ``logits`` (no copy; runs of consecutive greedy rows in one call, split
        over a few threads when large).
        """
        n = len(seq_ids)
        out = np.empty(n, dtype=np.int32)
        get = self._by_seq.get
        samplers: List[SequenceSampler] = [get(int(s)) or _GREEDY for s in seq_ids]
        slow = [i for i, s in enumerate(samplers) if not s.fast_greedy]
        if device is not None and not slow and (device >= 0).all():
            out[:] = device  # every row greedy and sampled on the device: nothing to do here
            return out
        done = np.zeros(n, dtype=bool) if device is None else (device >= 0)
        if done.any():
            out[done] = device[done]
            done[slow] = False  # a device token on a row with a sampler chain would be stale: never use it
        if not slow and not done.any():
            if n:
                argmax_rows(logits, out)
            return out
        # greedy runs between the rows that need a sampler chain or were sampled on the device
        start = 0
        for i in sorted(set(slow) | set(np.flatnonzero(done).tolist())) + [n]:
            if i > start:
                argmax_rows(logits[start:i], out[start:i])
            start = i + 1
        for i in slow:
            out[i] = samplers[i].sample(logits[i], 0 if positions is None else int(positions[i]) + 1)
        return out


# --------------------------------------------------------------------------- argmax

#: Split an argmax over threads only from this many values on (numpy's argmax
#: releases the GIL; below this the thread hand-off costs more than it saves).
ARGMAX_PAR_MIN = 1 << 21
_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def _argmax_threads() -> int:
    v = os.environ.get("MOLINK_ARGMAX_THREADS")
    if v is not None:
        try:
            return max(1, int(v))
        except ValueError:
            pass
    return max(1, min(8, (os.cpu_count() or 1) // 4))


ARGMAX_THREADS = _argmax_threads()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(ARGMAX_THREADS, thread_name_prefix="molink-argmax")
        return _pool


def argmax_rows(logits: np.ndarray, out: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
    """``out[i] = argmax(logits[i])`` (first maximal index, like ``np.argmax``) without copying ``logits``."""
    rows = logits.shape[0]
    k = ARGMAX_THREADS if threads is None else max(1, int(threads))
    k = min(k, rows, max(1, logits.size // (ARGMAX_PAR_MIN // 2)))
    if k <= 1 or logits.size < ARGMAX_PAR_MIN:
        out[...] = np.argmax(logits, axis=-1)
        return out
    bounds = [rows * j // k for j in range(k + 1)]

    def part(j: int) -> None:
        a, b = bounds[j], bounds[j + 1]
        out[a:b] = np.argmax(logits[a:b], axis=-1)

    futs = [_get_pool().submit(part, j) for j in range(1, k)]
    part(0)
    for f in futs:
        f.result()
    return out


_GREEDY = SequenceSampler(SamplingParams(temperature=0.0), 0)
