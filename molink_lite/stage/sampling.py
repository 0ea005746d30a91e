"""Next-token sampling on the last stage with llama.cpp's own sampler chain.

Each sequence owns a ``llama_sampler`` chain (penalties -> top-k -> top-p -> min-p ->
temperature -> dist, or penalties -> greedy). Chains are applied to logit rows held
in numpy, so sampling does not depend on which ``llama_decode`` produced them.
Greedy sequences without penalties take a vectorized argmax path (identical choice:
both pick the first maximal id), or take the token the engine already picked on the
device (``device``: see ``StageEngine.last_sampled``); the pool tells the engine which
slots sample greedily (``on_greedy``), since only those can be sampled there.

A sequence with a GBNF grammar (:mod:`molink_lite.stage.grammar`) samples as llama.cpp's own server does
(``common_sampler_sample``): the chain picks a token, the grammar checks that one token, and only if it refuses
is the grammar applied to the whole row and the chain run again on what is left. Every token generated is fed
to the grammar (a replay's ``history`` too), so the grammar always knows where the text stands; end of
generation is possible only once the grammar is complete. A grammar that can no longer go on ends its sequence
(``ended``). Grammar sequences never take the vectorized or device argmax paths and never verify drafts.

Sequences that ask for logprobs (``SeqStart.logprobs``) keep the raw logits (never the device path); the
runner computes them (:func:`log_softmax_top`).
"""

from __future__ import annotations

import llama_cpp.llama_cpp as _llama  # noqa: I001 - before numpy

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..model.vocab import Vocab
from ..wire.protocol import SamplingError, SamplingParams, SeqStart
from .grammar import TOKEN_DATA, GrammarError, GrammarSandbox, GrammarState


class SequenceSampler:
    """A llama.cpp sampler chain for one sequence.

    ``spec`` (speculative decoding, non-greedy only): the chain stops before llama.cpp's ``dist`` sampler
    and the token is drawn here by inverse CDF over the chain's candidates with a uniform number that
    depends only on (seed, position). A draft token d is accepted iff the drawn token equals d: that is
    the standard rejection rule for a point-mass draft (accept with probability p(d); on rejection the
    token follows p with d removed, renormalized), so the output distribution is the chain's, and a
    seeded sequence draws the same tokens whatever drafts it was offered (given the same logits).
    """

    def __init__(self, params: SamplingParams, n_vocab: int, spec: bool = False,
                 grammar: Optional[GrammarState] = None, logprobs: int = -1, eos: int = -1):
        self.params = params
        self.grammar = grammar
        self.logprobs = int(logprobs)
        self.eos = int(eos)  # what a sequence whose grammar cannot go on ends with
        self.ended: Optional[str] = None  # why the grammar ended this sequence (its last token is final)
        self.fast_greedy = params.greedy and not params.has_penalties and grammar is None
        # the engine's device sampler may pick this sequence's tokens (plain greedy, raw logits not needed)
        self.on_device = self.fast_greedy and self.logprobs < 0
        self.spec = bool(spec) and not params.greedy and grammar is None
        self._chain = None
        self._seed = None
        if params.greedy and not params.has_penalties:
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

    @staticmethod
    def _candidates(logits: np.ndarray) -> tuple:
        """One row of logits as llama.cpp's candidate array: (the buffer, the array over it)."""
        n = logits.shape[0]
        data = np.empty(n, dtype=TOKEN_DATA)
        data["id"] = np.arange(n, dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        arr = _llama.llama_token_data_array(
            data=data.ctypes.data_as(_llama.llama_token_data_p), size=n, selected=-1, sorted=False)
        return data, arr

    def _apply(self, logits: np.ndarray) -> tuple:
        """Run the sampler chain over one row of logits: (the candidate buffer it was given, the result array)."""
        data, arr = self._candidates(logits)
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
        """Pick the next token from one row of logits and record it (for penalties and the grammar);
        ``position``: where the picked token goes (used by spec-mode samplers only)."""
        g = self.grammar
        if g is not None and g.active:
            return self._sample_grammar(logits, g)
        if self._chain is None:
            token = int(np.argmax(logits))
        elif self.spec:
            return self._draw(logits, position)
        else:
            _, arr = self._apply(logits)
            token = self._selected(arr)
            _llama.llama_sampler_accept(self._chain, token)
        if g is not None and not g.accept(token):  # a lazy grammar whose trigger text it refuses
            self.ended = g.dead
        return token

    @staticmethod
    def _selected(arr: "_llama.llama_token_data_array") -> int:
        if not 0 <= arr.selected < arr.size:
            raise SamplingError("sampler chain selected no token")
        return int(arr.data[arr.selected].id)  # through the array's pointer: a sampler may swap the buffer

    def _sample_grammar(self, logits: np.ndarray, g: GrammarState) -> int:
        """llama.cpp's grammar sampling: the chain's pick if the grammar takes it, else the grammar on the whole
        row, then the chain on what is left."""
        if logits.shape[0] > g.vocab.n_vocab:  # llama.cpp would look up pieces of ids it does not have (abort)
            raise SamplingError(f"a logits row of {logits.shape[0]} tokens for a vocabulary of {g.vocab.n_vocab}")
        if self._chain is None:  # greedy without penalties
            token = int(np.argmax(logits))
            if not g.allows(token):
                token = self._greedy_under(logits, g)
        else:
            _, arr = self._apply(logits)
            token = self._selected(arr)
            if not g.allows(token):
                data, arr = self._candidates(logits)
                if not g.apply(arr) or np.isneginf(data["logit"]).all():
                    token = -1
                else:
                    _llama.llama_sampler_apply(self._chain, ctypes.byref(arr))
                    token = self._selected(arr)
        if token < 0 or not g.accept(token):
            self.ended = g.dead or "the grammar allows no token here"
            g.dead = self.ended
            if self.eos < 0:
                raise SamplingError(f"{self.ended}, and the vocabulary has no end-of-generation token")
            return self.eos
        if self._chain is not None:
            _llama.llama_sampler_accept(self._chain, token)
        return token

    #: a greedy row the grammar refuses first looks among this many best tokens (a grammar's apply over a whole
    #: 262k vocabulary takes tens of ms), then, if none is allowed, over the whole row
    GREEDY_GRAMMAR_SHORTLIST = 256

    @classmethod
    def _greedy_under(cls, logits: np.ndarray, g: GrammarState) -> int:
        """The best token the grammar allows (the first of equal ones): the same as the argmax of the row with the
        grammar applied, found among the best few tokens first."""
        n = logits.shape[0]
        k = min(cls.GREEDY_GRAMMAR_SHORTLIST, n)
        if k < n:
            cols, vals, _ = top_cols(logits[None, :], k)
            data = np.empty(k, dtype=TOKEN_DATA)
            data["id"], data["logit"], data["p"] = cols[0], vals[0], 0.0
            arr = _llama.llama_token_data_array(data=data.ctypes.data_as(_llama.llama_token_data_p), size=k,
                                                selected=-1, sorted=False)
            if not g.apply(arr):
                return -1
            ok = np.flatnonzero(np.isfinite(data["logit"]))
            if ok.size:  # best first, ties by lower id: the first allowed one is the masked row's argmax
                return int(data["id"][ok[0]])
        data, arr = cls._candidates(logits)
        if not g.apply(arr) or np.isneginf(data["logit"]).all():
            return -1  # too costly, or nothing allowed
        return int(np.argmax(data["logit"]))

    def replay(self, history: Sequence[int]) -> None:
        """Feed the tokens a sequence generated before a replay (penalties, the grammar); :class:`GrammarError`
        if the grammar refuses one."""
        for t in history:
            t = int(t)
            if self.grammar is not None and not self.grammar.accept(t):
                raise GrammarError(f"'history' does not follow the grammar: {self.grammar.dead}")
            if self._chain is not None:
                _llama.llama_sampler_accept(self._chain, t)

    def close(self) -> None:
        if self._chain is not None:
            _llama.llama_sampler_free(self._chain)
            self._chain = None
        if self.grammar is not None:
            self.grammar.close()

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


class SamplerPool:
    """Samplers of the live sequences on a last stage, keyed by sequence id."""

    def __init__(self, n_vocab: int, on_greedy: Optional[Callable[[int, bool], None]] = None,
                 vocab: Optional[Vocab] = None, sandbox: Optional[GrammarSandbox] = None) -> None:
        self.n_vocab = n_vocab
        self.vocab = vocab  # grammars are compiled against it
        self.sandbox = sandbox  # where a grammar compiles first (a hostile one can exhaust llama.cpp)
        self._by_seq: Dict[int, SequenceSampler] = {}
        self._special: Dict[int, SequenceSampler] = {}  # sequences with a grammar or logprobs
        # told (sequence id, plain greedy?) whenever a slot's sampler changes: the engine samples those on the device
        self._on_greedy = on_greedy or (lambda _s, _g: None)
        self._eos = -1
        if vocab is not None and vocab.n_vocab > 1:
            eog = np.flatnonzero(vocab.is_eog(np.arange(vocab.n_vocab)))
            self._eos = vocab.eos if 0 <= vocab.eos < vocab.n_vocab and vocab.is_eog([vocab.eos])[0] else (
                int(eog[0]) if eog.size else -1)

    def prepare(self, st: SeqStart) -> SequenceSampler:
        """A sampler for a sequence's start, its history replayed, not yet in use (:meth:`install`);
        :class:`SamplingError` (:class:`GrammarError` for the grammar) if it cannot be built."""
        grammar = None
        if st.grammar:
            if self.vocab is None or self.vocab.n_vocab <= 1:
                raise GrammarError("this stage has no vocabulary to compile a grammar against")
            if self.sandbox is not None:
                self.sandbox.check(st.grammar, st.triggers)
            grammar = GrammarState(self.vocab, st.grammar, st.triggers)
        sampler = SequenceSampler(st.params, self.n_vocab, st.spec, grammar, st.logprobs, self._eos)
        try:
            sampler.replay(st.history)
        except BaseException:
            sampler.close()
            raise
        return sampler

    def install(self, seq_id: int, sampler: SequenceSampler) -> None:
        """Make ``sampler`` (from :meth:`prepare`) the sequence's sampler."""
        self.drop(seq_id)
        self._by_seq[seq_id] = sampler
        if sampler.grammar is not None or sampler.logprobs >= 0:
            self._special[seq_id] = sampler
        if not sampler.on_device:
            self._on_greedy(seq_id, False)

    def start(self, seq_id: int, params: SamplingParams, history: Sequence[int] = (), spec: bool = False) -> None:
        """A sampler for a sequence; ``history`` (tokens it generated before a replay) primes the penalties;
        ``spec``: the sequence may send drafts to verify (see :class:`SequenceSampler`)."""
        self.install(seq_id, self.prepare(SeqStart(params, tuple(int(t) for t in history), spec)))

    def drop(self, seq_id: int) -> None:
        s = self._by_seq.pop(seq_id, None)
        self._special.pop(seq_id, None)
        if s is not None:
            if not s.on_device:
                self._on_greedy(seq_id, True)  # a free slot samples greedily (the default sampler)
            s.close()

    def need_logits(self, seq_id: int) -> None:
        """This sequence's rows must come with their raw logits (prompt scoring): off the device sampler."""
        sm = self._by_seq.get(seq_id)
        if sm is None:
            sm = self._by_seq[seq_id] = SequenceSampler(_GREEDY.params, self.n_vocab)
        if sm.on_device:
            sm.on_device = False
            self._on_greedy(seq_id, False)

    def logprobs_of(self, seq_id: int) -> int:
        """How many top alternatives the sequence's tokens come with (-1: no logprobs)."""
        sm = self._special.get(seq_id)
        return -1 if sm is None else sm.logprobs

    def ended(self, seq_ids: np.ndarray) -> Optional[np.ndarray]:
        """Rows whose sequence the grammar just ended (None if none)."""
        if not self._special:
            return None
        out = None
        for i, s in enumerate(seq_ids.tolist()):
            sm = self._special.get(s)
            if sm is not None and sm.ended is not None:
                if out is None:
                    out = np.zeros(len(seq_ids), dtype=bool)
                out[i] = True
        return out

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._by_seq

    def check_verifiable(self, drafts: Dict[int, np.ndarray], start: Dict[int, SeqStart], spec: set) -> None:
        """Drafts are verified only by greedy samplers and by samplers started in spec mode (``start``: this
        step's sampler starts; ``spec``: those of them in spec mode)."""
        for s in drafts:
            if s in start:
                ok = start[s].params.greedy or s in spec
                grammar = bool(start[s].grammar)
            else:
                sm = self._by_seq.get(s)
                ok = sm is None or sm.params.greedy or sm.spec
                grammar = sm is not None and sm.grammar is not None
            if grammar:
                raise SamplingError(f"sequence {s} carries drafts but samples under a grammar (it never speculates)")
            if not ok:
                raise SamplingError(f"sequence {s} carries drafts but its sampler was not started with 'spec'")

    def sample_verify(self, seq_ids: np.ndarray, logits: np.ndarray, drafts: Dict[int, np.ndarray],
                      positions: np.ndarray, device: Optional[np.ndarray] = None
                      ) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
        """Tokens for output rows where some sequences verify drafts; returns (sequence per token, tokens, the row
        of ``logits`` each token was sampled from).

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
        out_seq, out_tok, out_row = [], [], []
        for a, b in zip(starts, ends):  # one run per sequence
            s = int(seq_ids[a])
            d = drafts.get(s)
            if d is None:
                out_seq.append(seq_ids[a:b])
                out_tok.append(toks_plain[plain_at[a:b]])
                out_row.append(np.arange(a, b))
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
            out_row.append(np.arange(a, a + toks.shape[0]))
        return np.concatenate(out_seq), np.concatenate(out_tok).astype(np.int32), np.concatenate(out_row)

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
        if device is not None and not slow and (device >= 0).all() and all(s.on_device for s in samplers):
            out[:] = device  # every row greedy and sampled on the device: nothing to do here
            return out
        done = np.zeros(n, dtype=bool) if device is None else (device >= 0)
        if done.any():
            # a device token on a row with a sampler chain (or one that left the device) would be stale: never use it
            done[[i for i, s in enumerate(samplers) if not s.on_device]] = False
            out[done] = device[done]
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


# --------------------------------------------------------------------------- logprobs

def log_softmax_top(logits: np.ndarray, rows: np.ndarray, targets: np.ndarray, ks: np.ndarray,
                    k: int) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """Logprobs under the raw distribution (log_softmax of the logits: before temperature, penalties and the
    grammar) for rows ``rows`` of ``logits``: (logprob of ``targets[i]`` in row ``rows[i]`` [r] float32, the ``k``
    best token ids [r, k] int32, their logprobs [r, k] float32), best first (ties: lower id first). Row i keeps
    ``ks[i]`` alternatives; the rest of its k columns hold id -1 and -inf.

    Vectorized over the rows (split over the argmax threads when large). The top k come from the k blocks of
    columns with the largest maxima (every one of the k best values lies in one of them), so nothing sorts or
    partitions a whole row: 64 rows of a 262k vocabulary cost about what the log-sum-exp's one pass of exp does."""
    rows = np.asarray(rows, dtype=np.int64)
    r = int(rows.shape[0])
    lp = np.empty(r, dtype=np.float32)
    top_ids = np.full((r, k), -1, dtype=np.int32)
    top_lp = np.full((r, k), -np.inf, dtype=np.float32)
    if r == 0:
        return lp, top_ids, top_lp
    contiguous = bool(rows[0] == 0 and (np.diff(rows) == 1).all()) if r > 1 else rows[0] == 0
    x = logits[:r] if contiguous else logits[rows]  # a view when the rows are the first ones, else a copy
    targets = np.asarray(targets, dtype=np.int64)
    ks = np.asarray(ks, dtype=np.int64)

    def part(a: int, b: int) -> None:
        _log_softmax_top_rows(x[a:b], targets[a:b], ks[a:b], k, lp[a:b], top_ids[a:b], top_lp[a:b])

    threads = min(ARGMAX_THREADS, r, max(1, x.size // (ARGMAX_PAR_MIN // 2)))
    if threads <= 1 or x.size < ARGMAX_PAR_MIN:
        part(0, r)
    else:
        bounds = [r * j // threads for j in range(threads + 1)]
        futs = [_get_pool().submit(part, bounds[j], bounds[j + 1]) for j in range(1, threads)]
        part(0, bounds[1])
        for f in futs:
            f.result()
    return lp, top_ids, top_lp


def _log_softmax_top_rows(x: np.ndarray, targets: np.ndarray, ks: np.ndarray, k: int, lp: np.ndarray,
                          top_ids: np.ndarray, top_lp: np.ndarray) -> None:
    r, n = x.shape
    if r == 0:
        return
    kk = min(k, n)
    cols, vals, mx = top_cols(x, kk)
    tmp = np.subtract(x, mx[:, None])
    np.exp(tmp, out=tmp)
    lse = mx.astype(np.float64) + np.log(tmp.sum(axis=1).astype(np.float64))
    del tmp
    lp[:] = (x[np.arange(r), targets].astype(np.float64) - lse).astype(np.float32)
    if kk == 0:
        return
    keep = np.arange(kk)[None, :] < ks[:, None]
    top_ids[:, :kk] = np.where(keep, cols, -1)
    top_lp[:, :kk] = np.where(keep, (vals.astype(np.float64) - lse[:, None]).astype(np.float32), -np.inf)


def top_cols(x: np.ndarray, k: int) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """The ``k`` largest values of each row of ``x`` [r, n]: (their columns [r, k], values [r, k], best first, ties
    by lower column; the row maxima [r]). Nothing sorts or partitions a whole row: the columns are cut in blocks,
    and the k best values all lie in the k blocks with the largest maxima (or in the last, partial block)."""
    r, n = x.shape
    k = min(k, n)
    bsz = max(16, min(4096, int(np.sqrt(n / max(1, k))))) if k else 4096
    nb = n // bsz
    main = nb * bsz
    if nb:
        bmax = x[:, :main].reshape(r, nb, bsz).max(axis=2)
        mx = bmax.max(axis=1)
        if main < n:
            mx = np.maximum(mx, x[:, main:].max(axis=1))
    else:
        mx = x.max(axis=1)
    if k == 0:
        return np.zeros((r, 0), np.int64), np.zeros((r, 0), x.dtype), mx
    if nb > k:
        best = np.argpartition(bmax, nb - k, axis=1)[:, nb - k:]  # the k blocks with the largest maxima
        cols = (best[:, :, None] * bsz + np.arange(bsz)[None, None, :]).reshape(r, k * bsz)
        if main < n:
            cols = np.concatenate([cols, np.broadcast_to(np.arange(main, n), (r, n - main))], axis=1)
    else:
        cols = np.broadcast_to(np.arange(n), (r, n))
    vals = np.take_along_axis(x, cols, axis=1)
    m = vals.shape[1]
    if m > k:
        sel = np.argpartition(vals, m - k, axis=1)[:, m - k:]
        cols = np.take_along_axis(cols, sel, axis=1)
        vals = np.take_along_axis(vals, sel, axis=1)
    order = np.lexsort((cols, -vals), axis=-1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1), mx


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
