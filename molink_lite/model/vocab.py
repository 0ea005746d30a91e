"""Tokenizer access on a loaded stage model: tokenize, token pieces, end-of-generation, chat template."""

from __future__ import annotations

import llama_cpp.llama_cpp as _llama  # noqa: I001 - before numpy

import codecs
import ctypes
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np


class Vocab:
    """The llama.cpp vocabulary of a loaded model (first and last stages carry the real one)."""

    def __init__(self, model_ptr: ctypes.c_void_p):
        self._vocab = _llama.llama_model_get_vocab(model_ptr)
        self.n_vocab = _llama.llama_vocab_n_tokens(self._vocab)
        self.bos = _llama.llama_vocab_bos(self._vocab)
        self.eos = _llama.llama_vocab_eos(self._vocab)
        self.add_bos = bool(_llama.llama_vocab_get_add_bos(self._vocab))
        tmpl = _llama.llama_model_chat_template(model_ptr, None)
        self.chat_template: Optional[str] = tmpl.decode("utf-8", "replace") if tmpl else None
        self._eog = np.zeros(max(self.n_vocab, 1), dtype=bool)
        if self.n_vocab > 1:
            self._eog[:] = [bool(_llama.llama_vocab_is_eog(self._vocab, t)) for t in range(self.n_vocab)]
        self._local = threading.local()  # one piece buffer per thread: stage lanes detokenize side by side
        self._hex: Optional[np.ndarray] = None  # token id -> raw piece as hex (logprobs), filled on use
        self._bytes: Optional[Dict[int, int]] = None  # byte -> single-byte token (byte_tokens)

    def token_text(self, token: int) -> str:
        """The vocabulary entry of ``token`` (special tokens included), or '' if none."""
        if token < 0 or token >= self.n_vocab:
            return ""
        return (_llama.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> np.ndarray:
        """Token ids of ``text`` (int32)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (_llama.llama_token * n_max)()
        n = _llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (_llama.llama_token * n_max)()
            n = _llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise ValueError("tokenization failed")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (special tokens render as nothing)."""
        return self._to_piece(token, False)

    def _to_piece(self, token: int, special: bool) -> bytes:
        """``llama_token_to_piece`` into a per-thread buffer (a larger one for a long piece)."""
        pbuf = getattr(self._local, "buf", None)
        if pbuf is None:
            pbuf = self._local.buf = ctypes.create_string_buffer(256)
        n = _llama.llama_token_to_piece(self._vocab, int(token), pbuf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _llama.llama_token_to_piece(self._vocab, int(token), buf, -n, 0, special)
            return buf.raw[:n]
        return pbuf.raw[:n]

    def is_eog(self, tokens: np.ndarray) -> np.ndarray:
        """End-of-generation flags for an array of token ids."""
        return self._eog[np.asarray(tokens, dtype=np.int64)]

    @property
    def ptr(self) -> ctypes.c_void_p:
        """The ``llama_vocab *`` (grammar samplers are compiled against it)."""
        return self._vocab

    def raw_piece(self, token: int) -> bytes:
        """The raw bytes of ``token`` with special tokens rendered (``llama_token_to_piece(..., special=true)``):
        what llama.cpp's grammar sampler matches, and the ``bytes`` of a token in logprobs. Part of a UTF-8
        character for byte tokens; empty for an id outside the vocabulary."""
        if not 0 <= token < self.n_vocab:
            return b""
        return self._to_piece(token, True)

    def token_hex(self, tokens) -> list:
        """:meth:`raw_piece` of each token id as hex, '' for -1 (the padding id); any shape of ids gives lists of
        that shape. Cached per id (a gather over an object array: no Python loop once the ids were seen)."""
        ids = np.asarray(tokens, dtype=np.int64)
        table = self._hex
        if table is None:
            table = self._hex = np.full(self.n_vocab + 1, None, dtype=object)
            table[-1] = ""  # id -1
        ids = np.where((ids >= 0) & (ids < self.n_vocab), ids, -1)
        got = table[ids]
        if ids.size:
            miss = np.unique(ids[np.equal(got, None)])
            if miss.size:
                for t in miss.tolist():
                    table[t] = self.raw_piece(t).hex()
                got = table[ids]
        return got.tolist()

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of token ids (``special``: render special tokens such as BOS; otherwise they add nothing)."""
        ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        if ids.size == 0:
            return ""
        ptr = ids.ctypes.data_as(ctypes.POINTER(_llama.llama_token))
        n_max = max(64, 8 * int(ids.size))
        for _ in range(2):
            buf = ctypes.create_string_buffer(n_max)
            n = _llama.llama_detokenize(self._vocab, ptr, int(ids.size), buf, n_max, False, bool(special))
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            n_max = -n
        raise ValueError("detokenization failed")

    def byte_tokens(self) -> Dict[int, int]:
        """byte value -> a token whose raw piece is exactly that byte (byte-level BPE and byte-fallback
        vocabularies have all 256); scanned once, on first use."""
        if self._bytes is None:
            found: Dict[int, int] = {}
            for t in range(self.n_vocab):
                p = self.raw_piece(t)
                if len(p) == 1 and p[0] not in found and not self._eog[t]:
                    found[p[0]] = t
            self._bytes = found
        return self._bytes


class Detokenizer:
    """Per-sequence incremental UTF-8 decoding: a character split across tokens comes out whole."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._dec: Dict[int, codecs.IncrementalDecoder] = {}

    def start(self, seq_id: int, history: Sequence[int] = ()) -> None:
        """Start decoding a sequence; ``history`` (its earlier tokens, after a replay) is decoded silently so a
        character split across the replay point still comes out whole."""
        dec = self._dec[seq_id] = codecs.getincrementaldecoder("utf-8")("replace")
        for t in history:
            dec.decode(self.vocab.piece(int(t)))

    def drop(self, seq_id: int) -> None:
        self._dec.pop(seq_id, None)

    def pieces(self, seq_ids: np.ndarray, tokens: np.ndarray, final: np.ndarray) -> List[str]:
        """Text for each (sequence, token); ``final`` flushes a sequence's pending bytes."""
        out: List[str] = []
        for s, t, f in zip(seq_ids.tolist(), tokens.tolist(), final.tolist()):
            dec = self._dec.get(s)
            if dec is None:
                dec = self._dec[s] = codecs.getincrementaldecoder("utf-8")("replace")
            out.append(dec.decode(self.vocab.piece(t), final=bool(f)))
        return out
