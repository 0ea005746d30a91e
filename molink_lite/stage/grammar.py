"""GBNF grammars on the last stage: compiled by llama.cpp, fed only tokens it allows.

llama.cpp's grammar sampler (``llama_sampler_init_grammar``) is the constraint, as llama.cpp's own server uses it.
Measured with llama.cpp 0c1e570, a grammar can take the whole process down in these ways, each guarded here:

* **Parsing** is recursive descent: about 20,000 nested ``(`` overflow an 8 MiB stack (SIGSEGV). A repetition
  ``x{3,1}`` underflows an unsigned count and the parser generates rules until the process is OOM-killed, and
  ``"<10k chars>"{2000}`` takes 440 MiB. :func:`scan` refuses nesting deeper than :data:`MAX_GRAMMAR_NESTING`,
  such repetitions, expansions past :data:`MAX_GRAMMAR_ELEMENTS`, token references (below), NUL bytes, text
  that is not UTF-8 or longer than ``MAX_GRAMMAR_BYTES``, before llama.cpp sees the text. A parse error makes
  llama.cpp return NULL; its message (printed to stderr, followed by the whole grammar) is captured for the
  caller (:func:`compile_grammar`).
* **Accepting** a token the grammar does not allow throws a C++ exception through the C API (``terminate``), and
  an end-of-generation token before the grammar is complete is a ``GGML_ABORT``. :meth:`GrammarState.accept`
  accepts a token only after the grammar's own ``apply`` on that one token left it possible (``apply`` never
  throws and, without token references, rules out exactly what ``accept`` would refuse).
* **Token references** (``<[id]>``, ``<token>``, ``!<...>``): where a token's first characters match characters
  of the grammar and its rest meets a token reference, ``apply`` allows the token (by id) but ``accept`` drops
  that parse and throws. Grammars with token references are refused.
* **Lazy grammars** (trigger words): llama.cpp replays the text from the trigger word on in partial token
  pieces, unchecked, and searches its ever-growing buffer with a backtracking ``std::regex``. Here the trigger
  search runs in Python on a bounded tail with llama.cpp's semantics (the grammar applies from the earliest
  trigger occurrence on, the word included: the grammar must take it), and the replay goes through the same
  check: whole tokens as they are, a token the trigger starts inside of as single-byte tokens.
* **Ambiguity**: llama.cpp keeps one parse stack per way the text so far can be parsed, and a few hundred bytes
  of GBNF can hold millions: compiling ``r_i ::= r_{i-1}? r_{i-1}? r_{i-1}? r_{i-1}?`` ten levels deep does not
  finish in two minutes, and random nested repetitions end in ``std::bad_alloc`` (an abort) while compiling or
  applying. A grammar is therefore first compiled, and made to generate a few tokens, in a
  :class:`GrammarSandbox` (a worker process holding only the vocabulary, with a memory limit and a deadline):
  ``grammar_check`` answers from it, and a sequence's grammar is compiled in the stage only once the sandbox
  took it (verdicts cached by the text's hash). In the stage, :meth:`GrammarState.stacks` reads how many stacks
  the grammar holds (no accessor exists: the count is read from llama.cpp's own vector, at a layout verified
  against known fields first, libstdc++ only); past :data:`MAX_GRAMMAR_STACKS` the grammar ends its sequence.
* **Time**: an apply costs (vocabulary size) x (parse work per token): 60 optional items under a ``+`` take 13 s
  for one apply over Gemma 3's 262k tokens. :meth:`GrammarState.apply` times a strided sample first (the
  thread's CPU time, best of three) and refuses when the whole would take over :data:`MAX_APPLY_SECONDS`.

A grammar that can no longer go on (no allowed token, a trigger word it does not take, too ambiguous or too
costly) marks its state ``dead`` with the reason; the sampler then ends that sequence
(:mod:`molink_lite.stage.sampling`). What is left: a grammar that passes the sandbox and explodes only later in
a generation still runs in the stage's process.
"""

from __future__ import annotations

import llama_cpp.llama_cpp as _llama  # noqa: I001 - before numpy

import atexit
import ctypes
import hashlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..model.vocab import Vocab
from ..wire.protocol import MAX_GRAMMAR_BYTES, MAX_TRIGGERS, SamplingError

log = logging.getLogger(__name__)

#: deepest nesting of ``( ... )`` groups a grammar may have (llama.cpp parses each level with ~0.5 KiB of stack)
MAX_GRAMMAR_NESTING = 256
MAX_TRIGGER_CHARS = 256
_MESSAGE_CHARS = 400
#: longest one grammar apply over a whole candidate array may take (estimated from a sample first)
MAX_APPLY_SECONDS = 1.0
#: parse stacks a grammar may hold (JSON-schema grammars hold a few; each costs a pass over the candidates)
MAX_GRAMMAR_STACKS = 512
_PROBE = 2048  # candidates timed before a large apply
#: llama.cpp's llama_token_data, as numpy sees a candidate array
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(_llama.llama_token_data)


class GrammarError(SamplingError):
    """A grammar llama.cpp refuses (or that this stage refuses to hand it); the message says why."""

    def __init__(self, message: str):
        super().__init__(message, "grammar")


# ---------------------------------------------------------------------- checking and compiling
def scan(text: str) -> bytes:
    """The grammar as UTF-8 bytes, after the checks that keep hostile text away from llama.cpp's parser."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("the grammar is empty")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise GrammarError("the grammar is not valid UTF-8 text") from None
    if len(data) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {len(data)} bytes; at most {MAX_GRAMMAR_BYTES} are taken")
    if b"\x00" in data:
        raise GrammarError("the grammar contains a NUL character")
    depth, problem = structure(data)
    if problem:
        raise GrammarError(problem)
    if depth > MAX_GRAMMAR_NESTING:
        raise GrammarError(f"the grammar nests groups {depth} deep; at most {MAX_GRAMMAR_NESTING} are taken")
    return data


_GAP = rb"(?:[ \t\r\n]|#[^\r\n]*)*"  # (a superset of) what llama.cpp's parse_space skips
_REPEAT = re.compile(rb"\{" + _GAP + rb"([0-9]+)" + _GAP + rb"(?:(,)" + _GAP + rb"([0-9]*)" + _GAP + rb")?\}")
_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
#: rule elements a grammar may expand to (repetitions copy what they repeat: ``"<10k chars>"{2000}`` is 20M
#: elements, 440 MiB in llama.cpp; 8 bytes each, and llama.cpp holds two copies while compiling)
MAX_GRAMMAR_ELEMENTS = 4_000_000
_LLAMA_MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD


def structure(data: bytes) -> Tuple[int, str]:
    """(deepest ``(`` group nesting, what is wrong or '') as llama.cpp's parser would see the text: string
    literals, character classes and comments skipped, backslash escapes honoured. Wrong: a repetition
    ``{m,n}`` with n < m (llama.cpp would generate rules without end), repetitions that expand to more than
    :data:`MAX_GRAMMAR_ELEMENTS` rule elements (an upper bound: each repetition multiplies the item before it),
    or a token reference (see the module's notes)."""
    depth = best = 0
    last = 1  # rule elements of the item a repetition would apply to (an upper bound)
    total = n = len(data)
    i = 0
    while i < n:
        c = data[i]
        if c == 0x23:  # '#': comment to the end of the line
            while i < n and data[i] not in (0x0A, 0x0D):
                i += 1
        elif c in (0x22, 0x5B):  # '"' literal or '[' class: to the unescaped closing quote or bracket
            close = 0x22 if c == 0x22 else 0x5D
            j = i + 1
            while j < n and data[j] != close:
                j += 2 if data[j] == 0x5C else 1
            last = 2 * (j - i) + 2
            i = j
        elif c == 0x28:
            depth += 1
            best = max(best, depth)
        elif c == 0x29:
            depth = max(0, depth - 1)
            last = 1  # a group is one reference to the rule it becomes
        elif c == 0x7B:  # '{m}', '{m,}', '{m,n}'
            m = _REPEAT.match(data, i)
            if m is not None:
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else int(m.group(3)) if m.group(3) else -1
                if 0 <= hi < lo:
                    return best, f"the repetition {{{lo},{hi}}} has its maximum below its minimum"
                times = max(lo, hi if 0 <= hi <= _LLAMA_MAX_REPETITION else lo) + 1
                last *= times
                total += last
                if total > MAX_GRAMMAR_ELEMENTS:
                    return best, (f"the grammar's repetitions expand to more than {MAX_GRAMMAR_ELEMENTS} rule "
                                  f"elements")
                i = m.end() - 1
        elif c in (0x2A, 0x2B, 0x3F):  # '*', '+', '?': at most two copies of the item
            last *= 2
            total += last
            if total > MAX_GRAMMAR_ELEMENTS:
                return best, f"the grammar's repetitions expand to more than {MAX_GRAMMAR_ELEMENTS} rule elements"
        elif c == 0x3C:  # '<...>': a token reference
            return best, ("token references (<[id]>, <token>, !<...>) are not taken: with them llama.cpp "
                          "(0c1e570) allows a token its grammar then cannot accept, and aborts the process")
        elif c in _NAME:  # a rule name, '.': one element
            while i + 1 < n and data[i + 1] in _NAME:
                i += 1
            last = 1
        i += 1
    return best, ""


def nesting(data: bytes) -> int:
    """Deepest ``(`` group nesting as llama.cpp's parser would see it (see :func:`structure`)."""
    return structure(data)[0]


def check_triggers(triggers: Sequence[str]) -> List[bytes]:
    """Trigger words as UTF-8 bytes (the limits :class:`~molink_lite.wire.protocol.SeqStart` applies)."""
    if not isinstance(triggers, (list, tuple)) or len(triggers) > MAX_TRIGGERS:
        raise GrammarError(f"'triggers' must be a list of at most {MAX_TRIGGERS} words")
    out = []
    for t in triggers:
        if not isinstance(t, str) or not 0 < len(t) <= MAX_TRIGGER_CHARS:
            raise GrammarError(f"a trigger word must be text of 1..{MAX_TRIGGER_CHARS} characters")
        try:
            out.append(t.encode("utf-8"))
        except UnicodeEncodeError:
            raise GrammarError("a trigger word is not valid UTF-8 text") from None
    return out


_stderr_lock = threading.Lock()
_PARSE_ERROR = "error parsing grammar: "


def compile_grammar(vocab: Vocab, text: str) -> ctypes.c_void_p:
    """A new ``llama_sampler`` for ``text`` (root rule ``root``) against ``vocab``; :class:`GrammarError` with
    llama.cpp's message if it refuses. The caller frees the sampler."""
    data = scan(text)
    smpl, said = _with_stderr(lambda: _llama.llama_sampler_init_grammar(vocab.ptr, data, b"root"), data)
    if smpl:
        return smpl
    raise GrammarError(f"llama.cpp refused the grammar: {said or 'it could not be parsed'}")


def check_grammar(vocab: Vocab, text: str, triggers: Sequence[str] = ()) -> None:
    """Compile ``text`` as a sequence's sampler would and free it (the ``grammar_check`` request)."""
    check_triggers(triggers)
    _llama.llama_sampler_free(compile_grammar(vocab, text))


def _with_stderr(fn, src: bytes) -> Tuple[object, str]:
    """Run ``fn`` with file descriptor 2 captured: llama.cpp prints a grammar's parse error (followed by the whole
    grammar) there. Returns (what ``fn`` returned, llama.cpp's message); anything else written meanwhile (other
    threads' logs) goes on to the real stderr."""
    with _stderr_lock:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        try:
            tmp = tempfile.TemporaryFile()
            saved = os.dup(2)
        except OSError:
            return fn(), ""
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                result = fn()
            finally:
                os.dup2(saved, 2)
            tmp.seek(0)
            out = tmp.read()
        finally:
            os.close(saved)
            tmp.close()
    message, rest = _split_message(out, src)
    if rest.strip():
        try:
            os.write(2, rest)
        except OSError:
            pass
    return result, message


def _split_message(out: bytes, src: bytes) -> Tuple[str, bytes]:
    """(llama.cpp's message about the grammar, the other output) from what stderr got."""
    message = ""
    i = out.find(_PARSE_ERROR.encode())
    if i >= 0:
        line_start = out.rfind(b"\n", 0, i) + 1
        tail = b"\n\n" + src + b"\n"
        j = out.find(tail, i)
        end = j + len(tail) if j >= 0 else len(out)
        what = out[i + len(_PARSE_ERROR):j if j >= 0 else len(out)]
        message = what.decode("utf-8", "replace")
        out = out[:line_start] + out[end:]
    lines = out.decode("utf-8", "replace").splitlines(keepends=True)
    keep = []
    for ln in lines:
        s = ln.strip()
        if s == "failed to parse grammar":
            continue
        if re.match(r"^(grammar does not contain|unsupported grammar|invalid grammar)", s):
            message = message or s
            continue
        keep.append(ln)
    message = " ".join(message.split())
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS] + "..."
    return message, "".join(keep).encode()


# ---------------------------------------------------------------------- compiling in a sandbox
#: longest a grammar may take to compile in the sandbox, and memory the sandbox may allocate
MAX_COMPILE_SECONDS = 5.0
SANDBOX_MEMORY_BYTES = 2 << 30
_SANDBOX_START_SECONDS = 120.0
_VERDICTS = 1024  # grammar verdicts a sandbox remembers


class GrammarSandbox:
    """Compiles grammars in a worker process (``python -m molink_lite.stage.grammar MODEL``: the model's vocabulary
    only, at most :data:`SANDBOX_MEMORY_BYTES` of heap where the OS can limit it) and says whether llama.cpp takes
    them within :data:`MAX_COMPILE_SECONDS` and :data:`MAX_GRAMMAR_STACKS`. A worker that runs out of time or
    memory is killed (and started again for the next grammar). One per model file (:meth:`for_model`), shared by
    a stage's lanes and its ``grammar_check`` requests; one grammar at a time."""

    _by_model: Dict[str, "GrammarSandbox"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._replies: "queue.Queue[Optional[str]]" = queue.Queue()
        self._verdicts: "OrderedDict[bytes, str]" = OrderedDict()  # hash -> '' (taken) or why not
        self.restarts = 0

    @classmethod
    def for_model(cls, model_path: str) -> "GrammarSandbox":
        key = os.path.realpath(str(model_path))
        with cls._registry_lock:
            box = cls._by_model.get(key)
            if box is None:
                box = cls._by_model[key] = cls(key)
            return box

    def check(self, text: str, triggers: Sequence[str] = ()) -> None:
        """:class:`GrammarError` unless the grammar compiles in the sandbox (cached verdicts)."""
        check_triggers(triggers)
        scan(text)
        key = hashlib.sha256(json.dumps([text, list(triggers)], ensure_ascii=True).encode()).digest()
        with self._lock:
            why = self._verdicts.get(key)
            if why is None:
                why = self._ask(text, list(triggers))
                self._verdicts[key] = why
                while len(self._verdicts) > _VERDICTS:
                    self._verdicts.popitem(last=False)
            else:
                self._verdicts.move_to_end(key)
        if why:
            raise GrammarError(why)

    def _ask(self, text: str, triggers: List[str]) -> str:
        if self._proc is None or self._proc.poll() is not None:
            why = self._start()
            if why:
                raise GrammarError(why)  # not cached: the next check starts a worker again
        try:
            self._proc.stdin.write((json.dumps({"grammar": text, "triggers": triggers}) + "\n").encode())
            self._proc.stdin.flush()
        except OSError:
            self._kill()
            raise GrammarError("the grammar sandbox went away; try again") from None
        try:
            line = self._replies.get(timeout=MAX_COMPILE_SECONDS)
        except queue.Empty:
            self._kill()
            return f"the grammar takes longer than {MAX_COMPILE_SECONDS:g} s to compile"
        if line is None:  # the worker died: out of memory (llama.cpp aborts on std::bad_alloc)
            self._kill()
            return "the grammar is too costly to compile (it exhausts the memory llama.cpp may use)"
        try:
            reply = json.loads(line)
        except ValueError:
            self._kill()
            return "the grammar sandbox answered nonsense"
        return "" if reply.get("ok") else str(reply.get("error") or "refused")[:_MESSAGE_CHARS + 100]

    def _start(self) -> str:
        """Start a worker; '' or why it could not start."""
        self._kill()
        self.restarts += 1
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "molink_lite.stage.grammar", self.model_path],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          env=env)
        except OSError as e:
            self._proc = None
            return f"the grammar sandbox could not start: {e}"
        replies: "queue.Queue[Optional[str]]" = queue.Queue()
        self._replies = replies
        proc = self._proc

        def read() -> None:
            for raw in proc.stdout:
                replies.put(raw.decode("utf-8", "replace"))
            replies.put(None)
        threading.Thread(target=read, name="grammar-sandbox", daemon=True).start()
        try:
            ready = replies.get(timeout=_SANDBOX_START_SECONDS)
        except queue.Empty:
            ready = None
        if ready is None or not ready.startswith("ready"):
            self._kill()
            return "the grammar sandbox could not load the model's vocabulary"
        return ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.kill()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._kill()

    @classmethod
    def close_all(cls) -> None:
        with cls._registry_lock:
            boxes = list(cls._by_model.values())
        for box in boxes:
            box._kill()


atexit.register(GrammarSandbox.close_all)


#: tokens the sandbox generates under a grammar it checks (full applies over the vocabulary)
EXERCISE_TOKENS = 8


def _exercise(vocab: Vocab, text: str, triggers: Tuple[str, ...]) -> str:
    """Compile the grammar, write each trigger word under it (a lazy grammar applies from its trigger word on, so
    it must take the word), then generate a few tokens (each a random token the grammar allows over the whole
    vocabulary, seeded by the text), as sampling would: a grammar whose parse explodes early does so here, in
    the sandbox. '' or why the grammar is refused."""
    for word in triggers[1:]:
        g = GrammarState(vocab, text, (word,))
        try:
            for t in vocab.tokenize(word, add_special=False, parse_special=True).tolist():
                if not g.accept(t):
                    return f"the grammar does not take its trigger word {word!r}: {g.dead}"
        finally:
            g.close()
    g = GrammarState(vocab, text, triggers[:1])
    try:
        if triggers:
            for t in vocab.tokenize(triggers[0], add_special=False, parse_special=True).tolist():
                if not g.accept(t):
                    return f"the grammar does not take its trigger word {triggers[0]!r}: {g.dead}"
            if g.awaiting:
                return ""  # the word did not trigger as written alone (nothing to exercise)
        return _generate(g, vocab, text)
    finally:
        g.close()


def _generate(g: "GrammarState", vocab: Vocab, text: str) -> str:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
    n = vocab.n_vocab
    data = np.empty(n, dtype=TOKEN_DATA)
    for _ in range(EXERCISE_TOKENS):
        data["id"], data["logit"], data["p"] = np.arange(n, dtype=np.int32), 0.0, 0.0
        arr = _llama.llama_token_data_array(data=data.ctypes.data_as(_llama.llama_token_data_p), size=n,
                                            selected=-1, sorted=False)
        if not g.apply(arr):
            return g.dead or "the grammar is too costly to apply"
        ok = np.flatnonzero(np.isfinite(data["logit"]) & ~vocab.is_eog(np.arange(n)))
        if ok.size == 0:
            return ""
        if not g.accept(int(rng.choice(ok))):
            return g.dead or "the grammar refused a token it allowed"
    return ""


def _sandbox_main(model_path: str) -> int:
    """The sandbox worker: load the vocabulary, then compile one grammar per line of stdin (JSON), answering
    ``{"ok": true}`` or ``{"error": why}`` per line on stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (SANDBOX_MEMORY_BYTES, SANDBOX_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no such limit here (Windows): the deadline still holds
    out = sys.stdout.buffer
    _llama.llama_backend_init()
    def errors_only(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level >= 4 and text:  # GGML_LOG_LEVEL_ERROR: what compile_grammar reads back from stderr
            os.write(2, text)
    cb = _llama.llama_log_callback(errors_only)
    _llama.llama_log_set(cb, ctypes.c_void_p())
    params = _llama.llama_model_default_params()
    params.vocab_only = True
    model = _llama.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        return 1
    vocab = Vocab(model)
    out.write(b"ready\n")
    out.flush()
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
            why = _exercise(vocab, req["grammar"], tuple(req.get("triggers") or ()))
            reply = {"error": why} if why else {"ok": True}
        except GrammarError as e:
            reply = {"error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": f"bad request: {e}"}
        out.write((json.dumps(reply) + "\n").encode())
        out.flush()
    return 0


# ---------------------------------------------------------------------- llama.cpp's grammar, read
_VECTOR_BYTES = 24  # std::vector: begin, end, capacity pointers


def _stacks_vector(smpl: ctypes.c_void_p, vocab: Vocab, text_len: int) -> Optional[int]:
    """Address of the ``stacks`` vector of a grammar sampler's ``llama_grammar``, or None if the layout is not
    the one known (llama.cpp 0c1e570 built with libstdc++: ``llama_sampler {iface, ctx}``, ctx
    ``llama_sampler_grammar {vocab, std::string grammar_str, std::string grammar_root, llama_grammar *}``,
    ``llama_grammar {vocab, rules, stacks, ...}``). Only words inside those structs are read, and the grammar
    pointer only after the strings before it were recognized."""
    try:
        word = lambda a: ctypes.c_uint64.from_address(a).value  # noqa: E731
        vp = ctypes.cast(vocab.ptr, ctypes.c_void_p).value
        ctx = word(ctypes.cast(smpl, ctypes.c_void_p).value + 8)
        if not ctx or word(ctx) != vp:
            return None
        # grammar_str {ptr, len, 16-byte buffer}, then grammar_root "root" in its own buffer (short string)
        if word(ctx + 16) != text_len or word(ctx + 48) != 4 or word(ctx + 40) != ctx + 56:
            return None
        if ctypes.string_at(ctx + 56, 4) != b"root":
            return None
        g = word(ctx + 72)
        if not g or word(g) != vp:
            return None
        begin, end, cap = word(g + 32), word(g + 40), word(g + 48)
        if not (begin <= end <= cap) or (end - begin) % _VECTOR_BYTES:
            return None
        return g + 32
    except (ValueError, OSError, ctypes.ArgumentError):
        return None


# ---------------------------------------------------------------------- a sequence's grammar
class GrammarState:
    """One sequence's grammar: llama.cpp's grammar sampler, fed only tokens it allows, and (lazy grammars) the
    trigger search. ``awaiting``: no trigger word seen yet (nothing is constrained); ``dead``: why the grammar
    cannot go on (None while it can)."""

    def __init__(self, vocab: Vocab, text: str, triggers: Sequence[str] = ()):
        self.vocab = vocab
        self._triggers = check_triggers(triggers)
        self._smpl = compile_grammar(vocab, text)
        self._stacks_at = _stacks_vector(self._smpl, vocab, len(text.encode("utf-8")))
        n = self.stacks()
        if n > MAX_GRAMMAR_STACKS:
            self.close()
            raise GrammarError(f"the grammar is too ambiguous: it starts with {n} parse stacks (at most "
                               f"{MAX_GRAMMAR_STACKS})")
        self.awaiting = bool(self._triggers)
        self.dead: Optional[str] = None
        # lazy: the last bytes generated (enough to hold a trigger word split across tokens) and their tokens
        self._keep = max((len(t) for t in self._triggers), default=1) - 1
        self._tail = b""
        self._tail_tokens: List[Tuple[int, int, int]] = []  # (token, start, end) in _tail
        self._one = (_llama.llama_token_data * 1)()
        self._one_arr = _llama.llama_token_data_array(data=ctypes.cast(self._one, _llama.llama_token_data_p), size=1,
                                                      selected=-1, sorted=False)

    def stacks(self) -> int:
        """How many parse stacks llama.cpp holds for this grammar now (-1 where that cannot be read)."""
        if self._stacks_at is None or self._smpl is None:
            return -1
        begin = ctypes.c_uint64.from_address(self._stacks_at).value
        end = ctypes.c_uint64.from_address(self._stacks_at + 8).value
        return (end - begin) // _VECTOR_BYTES

    @property
    def active(self) -> bool:
        """The grammar constrains the next token."""
        return not self.awaiting and self.dead is None

    def allows(self, token: int) -> bool:
        """Whether the grammar takes ``token`` next (its apply on that one candidate)."""
        if not 0 <= token < self.vocab.n_vocab:
            return False
        self._one[0].id, self._one[0].logit, self._one[0].p = int(token), 0.0, 0.0
        self._one_arr.size, self._one_arr.selected = 1, -1
        _llama.llama_sampler_apply(self._smpl, ctypes.byref(self._one_arr))
        return self._one[0].logit != float("-inf")

    def apply(self, arr: _llama.llama_token_data_array) -> bool:
        """Set the logits of every token the grammar rules out to -inf (an active grammar only). False (and
        ``dead`` set, nothing applied) if it would take longer than :data:`MAX_APPLY_SECONDS`."""
        if not self.active:
            return self.dead is None
        n = int(arr.size)
        if n > 8 * _PROBE:
            raw = ctypes.cast(arr.data, ctypes.POINTER(ctypes.c_uint8))
            every = np.ctypeslib.as_array(raw, shape=(n * TOKEN_DATA.itemsize,)).view(TOKEN_DATA)
            estimate = float("inf")
            for offset in range(3):  # this thread's CPU time (not wall time: a busy host must not count), best of 3
                sample = np.ascontiguousarray(every[offset::n // _PROBE][:_PROBE])
                probe = _llama.llama_token_data_array(data=sample.ctypes.data_as(_llama.llama_token_data_p),
                                                      size=sample.shape[0], selected=-1, sorted=False)
                t0 = time.thread_time()
                _llama.llama_sampler_apply(self._smpl, ctypes.byref(probe))
                estimate = min(estimate, (time.thread_time() - t0) * n / sample.shape[0])
                if estimate <= MAX_APPLY_SECONDS:
                    break
            if estimate > MAX_APPLY_SECONDS:
                self.dead = (f"the grammar is too costly to apply (about {estimate:.0f} s per token over "
                             f"{n} tokens)")
                return False
        _llama.llama_sampler_apply(self._smpl, ctypes.byref(arr))
        return True

    def accept(self, token: int) -> bool:
        """Record a generated token; False (and ``dead`` set) if the grammar cannot take it."""
        if self.dead is not None:
            return False
        if self.awaiting:
            return self._await(int(token))
        return self._take(int(token))

    def _take(self, token: int) -> bool:
        if not self.allows(token):
            self.dead = f"the grammar does not allow token {token} ({self.vocab.raw_piece(token)!r})"
            return False
        _llama.llama_sampler_accept(self._smpl, token)
        n = self.stacks()
        if n > MAX_GRAMMAR_STACKS:
            self.dead = f"the grammar became too ambiguous ({n} parse stacks, at most {MAX_GRAMMAR_STACKS})"
            return False
        return True

    def _await(self, token: int) -> bool:
        """A token while no trigger word was seen: look for one that ends in it (llama.cpp's rule: the earliest
        occurrence), and if found, feed the grammar the text from there on."""
        piece = self.vocab.raw_piece(token)
        base = len(self._tail)
        window = self._tail + piece
        hits = [i for i in (window.find(t) for t in self._triggers) if i >= 0]
        if not hits:
            self._tail_tokens.append((token, base, base + len(piece)))
            cut = max(0, len(window) - self._keep)
            self._tail = window[cut:]
            self._tail_tokens = [(t, a - cut, b - cut) for t, a, b in self._tail_tokens if b > cut]
            return True
        start = min(hits)
        self.awaiting = False
        feed = self._tail_tokens + [(token, base, base + len(piece))]
        self._tail, self._tail_tokens = b"", []
        for t, a, b in feed:
            if b <= start:
                continue
            if a >= start:
                if not self._take(t):
                    return False
                continue
            # the trigger starts inside this token: its bytes from there on, as single-byte tokens
            byte_tok = self.vocab.byte_tokens()
            for c in window[start:b]:
                bt = byte_tok.get(c)
                if bt is None:
                    self.dead = f"no single-byte token for byte {c:#04x} of the trigger word"
                    return False
                if not self._take(bt):
                    return False
        return True

    def close(self) -> None:
        if self._smpl is not None:
            _llama.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


__all__ = ["GrammarError", "GrammarSandbox", "GrammarState", "MAX_APPLY_SECONDS", "MAX_COMPILE_SECONDS",
           "MAX_GRAMMAR_ELEMENTS", "MAX_GRAMMAR_NESTING", "MAX_GRAMMAR_STACKS", "TOKEN_DATA", "check_grammar",
           "compile_grammar", "nesting", "scan", "structure"]


if __name__ == "__main__":
    sys.exit(_sandbox_main(sys.argv[1]))
