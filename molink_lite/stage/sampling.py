"""Next-token sampling on the last stage with llama.cpp's own sampler chain.

Each sequence owns a ``llama_sampler`` chain (penalties -> top-k -> top-p -> min-p ->
temperature -> dist, or penalties -> greedy). Chains are applied to logit rows held
in numpy, so sampling does not depend on which ``llama_decode`` produced them.
Greedy sequences without penalties take a vectorized argmax path (identical choice:
both pick the first maximal id).
"""

from __future__ import annotations

import llama_cpp.llama_cpp as _llama  # noqa: I001 - before numpy

import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict
from typing import Dict, List, Optional, Sequence

import numpy as np

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(_llama.llama_token_data)


class SamplingError(ValueError):
    """Invalid sampling parameters."""


@dataclass
class SamplingParams:
    """OpenAI-style sampling parameters (plus llama.cpp's top_k, min_p, repeat penalty)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> "SamplingParams":
        """Raise :class:`SamplingError` for wrong types or out-of-range values; return self.

        Runs on the gateway and again on the last stage (a frame is checked where it arrives), so
        nothing a peer sends reaches llama.cpp's samplers unchecked.
        """
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name} must be a finite number")
        for name in ("top_k", "penalty_last_n") + (("seed",) if self.seed is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SamplingError(f"{name} must be an integer")
        if not 0 <= self.top_k <= 2**31 - 1:
            raise SamplingError("top_k must be in 0..2^31-1 (0 disables it)")
        if not -1 <= self.penalty_last_n <= 2**31 - 1:
            raise SamplingError("penalty_last_n must be in -1..2^31-1")
        if 0.0 < self.temperature < 1e-6 or 0.0 < self.repetition_penalty < 1e-6:
            raise SamplingError("temperature and repetition_penalty must be 0 or at least 1e-6 (smaller values "
                                "overflow float32 logits)")
        if not 0.0 <= self.temperature <= 10.0:
            raise SamplingError("temperature must be between 0 and 10")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise SamplingError("top_k must be >= 0 (0 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise SamplingError("presence_penalty and frequency_penalty must be between -2 and 2")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise SamplingError("repetition_penalty must be in (0, 10]")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise SamplingError("seed must be in 0..2^32-1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        """Parameters from a dict (unknown keys ignored); call :meth:`validate` before use."""
        if d is not None and not isinstance(d, dict):
            raise SamplingError(f"sampling parameters must be an object, got {type(d).__name__}")
        d = d or {}
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        return cls(**known)


class SequenceSampler:
    """A llama.cpp sampler chain for one sequence."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        self.params = params
        self.fast_greedy = params.greedy and not params.has_penalties
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
            seed = _llama.LLAMA_DEFAULT_SEED if params.seed is None else int(params.seed)
            add(_llama.llama_sampler_init_dist(seed))
        self._chain = chain

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from one row of logits and record it (for penalties)."""
        if self.fast_greedy:
            return int(np.argmax(logits))
        n = logits.shape[0]
        data = np.empty(n, dtype=TOKEN_DATA)
        data["id"] = np.arange(n, dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        arr = _llama.llama_token_data_array(
            data=data.ctypes.data_as(_llama.llama_token_data_p), size=n, selected=-1, sorted=False)
        _llama.llama_sampler_apply(self._chain, ctypes.byref(arr))
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

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._by_seq: Dict[int, SequenceSampler] = {}

    def start(self, seq_id: int, params: SamplingParams, history: Sequence[int] = ()) -> None:
        """A sampler for a sequence; ``history`` (tokens it generated before a replay) primes the penalties."""
        self.drop(seq_id)
        sampler = self._by_seq[seq_id] = SequenceSampler(params, self.n_vocab)
        if sampler._chain is not None:
            for t in history:
                _llama.llama_sampler_accept(sampler._chain, int(t))

    def drop(self, seq_id: int) -> None:
        s = self._by_seq.pop(seq_id, None)
        if s is not None:
            s.close()

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._by_seq

    def sample(self, seq_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        """One token per row of ``logits`` (row i belongs to ``seq_ids[i]``).

        Greedy rows take an argmax straight on the rows of ``logits`` (no copy; runs of
        consecutive greedy rows in one call, split over a few threads when large).
        """
        n = len(seq_ids)
        out = np.empty(n, dtype=np.int32)
        get = self._by_seq.get
        samplers: List[SequenceSampler] = [get(int(s)) or _GREEDY for s in seq_ids]
        slow = [i for i, s in enumerate(samplers) if not s.fast_greedy]
        if not slow:
            if n:
                argmax_rows(logits, out)
            return out
        # greedy runs between the rows that need a sampler chain
        start = 0
        for i in slow + [n]:
            if i > start:
                argmax_rows(logits[start:i], out[start:i])
            start = i + 1
        for i in slow:
            out[i] = samplers[i].sample(logits[i])
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
